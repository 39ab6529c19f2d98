"""Offline top-k metrics for a backtest on a held-out future period.

Pure functions over a (users × k) array of recommended SKUs and each user's set
of later purchases, following the usual definitions (binary relevance).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd


def hits_matrix(recommended: np.ndarray, purchased: Sequence[frozenset]) -> np.ndarray:
    """hits[u, i] is True when user u later bought the SKU at rank i."""
    return np.array([[sku in bought for sku in row] for row, bought in
                     zip(recommended, purchased)], dtype=bool).reshape(recommended.shape)


def precision_at_k(hits: np.ndarray) -> float:
    """Mean over users of |relevant ∩ top-k| / k."""
    return float(hits.mean()) if hits.size else 0.0


def recall_at_k(hits: np.ndarray, n_relevant: np.ndarray) -> float:
    """Mean over users of |relevant ∩ top-k| / |relevant| (users with a purchase only)."""
    has = n_relevant > 0
    return float((hits[has].sum(axis=1) / n_relevant[has]).mean()) if has.any() else 0.0


def ndcg_at_k(hits: np.ndarray, n_relevant: np.ndarray) -> float:
    """Mean NDCG@k = DCG / ideal DCG with gains 1/log2(rank + 1) (users with a purchase only)."""
    has = n_relevant > 0
    if not has.any():
        return 0.0
    k = hits.shape[1]
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = (hits[has] * discount).sum(axis=1)
    ideal = np.array([discount[:min(int(r), k)].sum() for r in n_relevant[has]])
    return float((dcg / ideal).mean())


def match_rate(hits: np.ndarray) -> float:
    """Share of recommended users who later bought at least one recommended SKU (field metric)."""
    return float(hits.any(axis=1).mean()) if hits.size else 0.0


def coverage(recommended: np.ndarray, catalogue_size: int) -> float:
    """Distinct recommended SKUs as a share of the catalogue."""
    return float(len(np.unique(recommended)) / catalogue_size) if catalogue_size else 0.0


def diversity(part_types: np.ndarray) -> float:
    """Mean number of distinct part types per user's list."""
    return float(np.mean([len(set(row)) for row in part_types])) if len(part_types) else 0.0


def evaluate(recs: pd.DataFrame, future_purchases: Mapping[str, frozenset], k: int,
             catalogue_size: int) -> dict:
    """All backtest figures for one strategy's recommendation rows.

    Precision, recall and NDCG average over users who bought anything in the
    held-out period (the others have no relevant item); match rate averages
    over every recommended user, as the field reported it.
    """
    recommended = recs[[f"rec_part_{i}" for i in range(1, k + 1)]].to_numpy(object)
    bought = [future_purchases.get(u, frozenset()) for u in recs["user_id"]]
    hits = hits_matrix(recommended, bought)
    n_relevant = np.array([len(b) for b in bought])
    buyers = n_relevant > 0
    prices = recs[[f"rec{i}_price" for i in range(1, k + 1)]].to_numpy(float)
    shares = recs["source"].value_counts(normalize=True)
    return {
        "users": int(len(recs)),
        "buyers_in_holdout": int(buyers.sum()),
        "match_rate": match_rate(hits),
        f"precision@{k}": precision_at_k(hits[buyers]),
        f"recall@{k}": recall_at_k(hits, n_relevant),
        f"ndcg@{k}": ndcg_at_k(hits, n_relevant),
        "coverage": coverage(recommended, catalogue_size),
        "diversity": diversity(recs[[f"rec{i}_part_type" for i in range(1, k + 1)]]
                               .to_numpy(object)),
        "avg_price": float(prices.mean()) if prices.size else 0.0,
        "fallback_shares": {str(k_): float(v) for k_, v in shares.items()},
    }
