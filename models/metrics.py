"""Offline top-k metrics for a backtest on a held-out future period.

Pure functions over a (users × k) array of recommended SKUs and each user's set
of later purchases, following the usual definitions (binary relevance).
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

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


def average_precision_at_k(hits: np.ndarray, n_relevant: np.ndarray) -> float:
    """MAP@k: mean over users with a purchase of AP@k.

    AP@k(u) = (1 / min(|R_u|, k)) · Σ_{i=1..k} P@i(u) · rel_i(u), where rel_i is
    1 when the SKU at rank i is relevant and P@i(u) = (hits in the top i) / i.
    Dividing by min(|R_u|, k) makes a list whose k slots are all hits score 1
    even when the user bought more than k SKUs.
    """
    has = n_relevant > 0
    if not has.any():
        return 0.0
    hit = hits[has].astype(float)
    k = hit.shape[1]
    precision_at_i = np.cumsum(hit, axis=1) / np.arange(1, k + 1)
    ap = (precision_at_i * hit).sum(axis=1) / np.minimum(n_relevant[has], k)
    return float(ap.mean())


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


def lists_matrix(slots: pd.DataFrame, users: Sequence, k: int) -> np.ndarray:
    """(users × k) SKUs of long-format lists (``user_id, slot, sku``); None where empty.

    A user without a list, or with fewer than k slots, has empty slots, which
    are never hits: a short or missing list is penalised like a wrong one.
    """
    out = np.full((len(users), k), None, dtype=object)
    ranks = slots.loc[(slots["slot"] >= 1) & (slots["slot"] <= k)]
    row = pd.Index(users).get_indexer(ranks["user_id"])
    keep = row >= 0
    out[row[keep], ranks["slot"].to_numpy(int)[keep] - 1] = ranks["sku"].to_numpy(object)[keep]
    return out


def evaluate_lists(slots: pd.DataFrame, future_purchases: Mapping[str, frozenset], k: int,
                   catalogue_size: int, price_of: Mapping[str, float],
                   users: Optional[Sequence] = None) -> dict:
    """Backtest figures at k of one strategy's lists, the same for every strategy.

    Precision, recall, NDCG, MAP and hit rate are averaged over ``users``
    (default: every user who bought anything in the held-out period), served
    or not, so two strategies are compared on the same people and their
    per-user precisions pair up (``per_user_precision``, in ``users`` order).
    Coverage (distinct SKUs over the catalogue) and average price (of every
    recommended slot) describe the lists of every served user.

    Args:
      slots: frame ``user_id, slot (1..), sku``: the strategy's lists.
      future_purchases: user → distinct SKUs bought in the held-out period.
      price_of: SKU → price (for the average recommended price).
    """
    if users is None:
        users = sorted((u for u, b in future_purchases.items() if b), key=str)
    recommended = lists_matrix(slots, users, k)
    bought = [future_purchases.get(u, frozenset()) for u in users]
    hits = hits_matrix(recommended, bought)
    n_relevant = np.array([len(b) for b in bought])
    served = slots.loc[(slots["slot"] >= 1) & (slots["slot"] <= k)]
    prices = served["sku"].map(price_of).to_numpy(float)
    return {
        "users_served": int(served["user_id"].nunique()),
        "buyers_in_holdout": int(len(users)),
        "precision_at_k": precision_at_k(hits),
        "recall_at_k": recall_at_k(hits, n_relevant),
        "ndcg_at_k": ndcg_at_k(hits, n_relevant),
        "map_at_k": average_precision_at_k(hits, n_relevant),
        "hit_rate": match_rate(hits),
        "coverage": (float(served["sku"].nunique() / catalogue_size)
                     if catalogue_size else 0.0),
        "avg_price": float(np.nanmean(prices)) if np.isfinite(prices).any() else 0.0,
        "per_user_precision": hits.mean(axis=1) if len(users) else np.zeros(0),
    }
