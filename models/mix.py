"""The slot mix: how many of a user's k slots each candidate source fills (issue #14).

The B2B origin served 20 buy-again + 5 discovery items per client; the
automotive e-mail is 4 discovery slots with the 365-day exclusion. Both are a
``mix``: an ordered sequence of ``(source, slots)``. :func:`fill_slots` turns
per-source candidate frames into each user's k SKUs, recording which source
filled each slot. This module also holds the per-user backtest figures the
slot mix is judged by (the paired interval needs per-user values, which
:mod:`models.metrics` averages away).

Pure pandas/numpy, no Beam: the ``Recommend`` composite will call it per key.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from models import metrics

REPURCHASE_SOURCES = frozenset({"buy_again"})
SLOT_COLUMNS = ("user_id", "slot", "sku", "source", "score")


class _Source:
    """One source's candidates, sorted best first, looked up per user by offsets."""

    def __init__(self, name: str, frame: pd.DataFrame, excluded: Optional[pd.DataFrame],
                 discovery: bool):
        self.name = name
        self.shared = "user_id" not in frame.columns
        self.discovery = discovery
        if self.shared:
            frame = frame.sort_values(["score", "sku"], ascending=[False, True], kind="stable")
            self.skus = frame["sku"].to_numpy(object)
            self.scores = frame["score"].to_numpy(float)
            return
        if discovery and excluded is not None and len(excluded) and len(frame):
            # Vectorised anti-join: the exclusion never reaches the per-user loop.
            flag = frame.merge(excluded.assign(_x=True), on=["user_id", "sku"],
                               how="left")["_x"].fillna(False).to_numpy(bool)
            frame = frame.loc[~flag]
        frame = frame.sort_values(["user_id", "score", "sku"], ascending=[True, False, True],
                                  kind="stable")
        self.skus = frame["sku"].to_numpy(object)
        self.scores = frame["score"].to_numpy(float)
        users = frame["user_id"].to_numpy(object)
        starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]]) if len(users) else []
        ends = np.r_[starts[1:], len(users)] if len(users) else []
        self.span: Dict[object, Tuple[int, int]] = {
            users[s]: (int(s), int(e)) for s, e in zip(starts, ends)}

    def users(self) -> Iterable:
        return () if self.shared else self.span.keys()

    def range(self, user) -> Tuple[int, int]:
        if self.shared:
            return 0, len(self.skus)
        return self.span.get(user, (0, 0))


def fill_slots(candidates_by_source: Mapping[str, pd.DataFrame],
               mix: Sequence[Tuple[str, int]], k: int,
               max_per_group: Optional[int] = None,
               group_of_sku: Optional[Mapping] = None,
               excluded_for_discovery: Optional[pd.DataFrame] = None,
               repurchase_sources: Iterable[str] = REPURCHASE_SOURCES,
               users: Optional[Sequence] = None,
               unique_of_sku: Optional[Mapping] = None) -> pd.DataFrame:
    """Each user's k SKUs, slot by slot, with the source that filled each slot.

    Rules, in this order of precedence:

    1. Sources are taken in ``mix`` order; source number p may fill slots up
       to the cumulative quota Σ_{q ≤ p} slots_q (capped at k). A source that
       runs dry leaves its unused slots to the next source: that is the same
       cumulative quota.
    2. If the list is still short after the last source, the sources are
       taken again in ``mix`` order, each from where it stopped, until k
       (every source's remaining candidates top the list up). A user can end
       with fewer than k rows only when every source is exhausted.
    3. No SKU twice: a SKU already chosen is skipped wherever it reappears.
    4. Diversity: at most ``max_per_group`` SKUs of one group
       (``group_of_sku[sku]``) over the whole list; SKUs without a group are
       not capped.
    5. ``excluded_for_discovery`` (``user_id, sku`` pairs, e.g.
       :func:`models.candidates.recently_bought` over 365 days: SPEC rule 4)
       removes candidates from discovery sources only; a source named in
       ``repurchase_sources`` (buy-again) is exempt by design.

    Args:
      candidates_by_source: source name → frame ``user_id, sku, score``; a
        frame without ``user_id`` is one shared list offered to every user
        (e.g. global popularity, trending).
      users: users to serve; by default every user with a personal candidate.
      unique_of_sku: SKU → a group of which at most one SKU may be listed
        (SPEC rule 9's variant group: a SKU and its variants); SKUs without
        an entry are unconstrained.

    Returns:
      frame ``user_id, slot (1..k), sku, source, score``, users in sorted order.

    Cost: the exclusion and the sorting are vectorised over all users; the
    greedy pick scans each user's candidates in order and stops at k, so a
    user costs O(k + skipped candidates).

    >>> again = pd.DataFrame({"user_id": ["u"], "sku": ["milk"], "score": [3.0]})
    >>> popular = pd.DataFrame({"sku": ["milk", "bread", "eggs"], "score": [9., 8., 7.]})
    >>> fill_slots({"buy_again": again, "popularity": popular},
    ...            [("buy_again", 2), ("popularity", 2)], k=3)[["sku", "source"]].values.tolist()
    [['milk', 'buy_again'], ['bread', 'popularity'], ['eggs', 'popularity']]
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    unknown = [name for name, _ in mix if name not in candidates_by_source]
    if unknown:
        raise ValueError(f"mix names sources without candidates: {', '.join(unknown)}")
    exempt = frozenset(repurchase_sources)
    sources = [_Source(name, candidates_by_source[name], excluded_for_discovery,
                       name not in exempt) for name, _ in mix]
    shared_excluded: Dict[object, set] = {}
    if excluded_for_discovery is not None and any(s.shared and s.discovery for s in sources):
        for user, sku in excluded_for_discovery[["user_id", "sku"]].itertuples(index=False):
            shared_excluded.setdefault(user, set()).add(sku)
    quotas = np.minimum(np.cumsum([int(slots) for _, slots in mix]), k)
    if users is None:
        users = sorted(set().union(*(set(s.users()) for s in sources)), key=str)
        if not users and any(s.shared for s in sources):
            raise ValueError("only shared sources: pass the users to serve")
    groups = group_of_sku if (max_per_group is not None and group_of_sku is not None) else {}
    cap = max_per_group if groups else None
    variants = unique_of_sku or {}

    out_user: List = []
    out_sku: List = []
    out_source: List = []
    out_score: List[float] = []
    for user in users:
        chosen: set = set()
        per_group: Dict[object, int] = {}
        seen_variants: set = set()
        excluded_here = shared_excluded.get(user, ())
        cursors = [list(source.range(user)) for source in sources]
        n = 0
        for rounds in (quotas, np.full(len(sources), k)):
            for p, source in enumerate(sources):
                cursor, limit = cursors[p], int(rounds[p])
                while n < limit and cursor[0] < cursor[1]:
                    i = cursor[0]
                    cursor[0] += 1
                    sku = source.skus[i]
                    if sku in chosen or (source.shared and source.discovery
                                         and sku in excluded_here):
                        continue
                    group = groups.get(sku) if cap is not None else None
                    if group is not None and per_group.get(group, 0) >= cap:
                        continue
                    variant = variants.get(sku)
                    if variant is not None:
                        if variant in seen_variants:
                            continue
                        seen_variants.add(variant)
                    chosen.add(sku)
                    if group is not None:
                        per_group[group] = per_group.get(group, 0) + 1
                    out_user.append(user)
                    out_sku.append(sku)
                    out_source.append(source.name)
                    out_score.append(source.scores[i])
                    n += 1
            if n >= k:
                break
    frame = pd.DataFrame({"user_id": pd.Series(out_user, dtype=object),
                          "sku": pd.Series(out_sku, dtype=object),
                          "source": pd.Series(out_source, dtype=object),
                          "score": pd.Series(out_score, dtype=float)})
    frame.insert(1, "slot", frame.groupby("user_id", sort=False).cumcount().to_numpy() + 1)
    return frame[list(SLOT_COLUMNS)]


# --- judging a mix: per-user backtest figures ------------------------------------------------

def hits_per_user(slots: pd.DataFrame, purchases: Mapping[object, frozenset],
                  users: Sequence, k: int) -> np.ndarray:
    """``hits[u, r]``: user ``users[u]`` bought the SKU in slot r + 1 later (False past the list).

    A user missing from ``slots`` (or with fewer than k rows) has empty slots,
    which are never hits, so a short list is penalised like a wrong one.
    """
    position = pd.Index(users)
    ranks = slots.loc[slots["slot"] <= k]
    row = position.get_indexer(ranks["user_id"])
    keep = row >= 0
    ranks, row = ranks.loc[keep], row[keep]
    hit = np.fromiter((sku in purchases.get(user, ()) for user, sku in
                       zip(ranks["user_id"], ranks["sku"])), dtype=bool, count=len(ranks))
    hits = np.zeros((len(users), k), dtype=bool)
    hits[row, ranks["slot"].to_numpy(int) - 1] = hit
    return hits


def list_metrics(slots: pd.DataFrame, purchases: Mapping[object, frozenset], k: int,
                 catalogue_size: int, users: Optional[Sequence] = None) -> dict:
    """Precision, recall, NDCG, hit rate and coverage at k of one strategy's slots.

    Evaluated over ``users`` (default: every user who bought anything in
    ``purchases``, as :func:`models.metrics.evaluate` averages precision),
    with the definitions of :mod:`models.metrics`. ``per_user_precision``
    (hits / k per evaluated user, in ``users`` order) is what
    :func:`paired_interval` compares.
    """
    if users is None:
        users = sorted((u for u, b in purchases.items() if b), key=str)
    hits = hits_per_user(slots, purchases, users, k)
    n_relevant = np.array([len(purchases.get(u, ())) for u in users])
    served = slots.loc[slots["slot"] <= k]
    return {
        "users": int(len(users)),
        f"precision@{k}": metrics.precision_at_k(hits),
        f"recall@{k}": metrics.recall_at_k(hits, n_relevant),
        f"ndcg@{k}": metrics.ndcg_at_k(hits, n_relevant),
        "hit_rate": metrics.match_rate(hits),
        "coverage": (served["sku"].nunique() / catalogue_size) if catalogue_size else 0.0,
        "distinct_skus": int(served["sku"].nunique()),
        "per_user_precision": hits.mean(axis=1) if len(users) else np.zeros(0),
    }


def paired_interval(a: np.ndarray, b: np.ndarray, z: float = 1.96,
                    clusters: Optional[Sequence] = None) -> dict:
    """Mean of the paired differences ``a − b`` with its normal-approximation interval.

    ``a`` and ``b`` are one value per user (the same users, same order).
    Interval = mean ± z · se. Without ``clusters``, se = sd / √n (sample sd of
    the differences). With ``clusters`` (e.g. the user of each user-period when
    several backtest periods are pooled) the values of one cluster are not
    independent, so se is the cluster-robust one:
    se² = Σ_c (Σ_{i∈c} (d_i − mean))² / n².

    >>> r = paired_interval(np.array([0.5, 0.25, 0.0, 0.25]), np.array([0.25, 0.25, 0.0, 0.0]))
    >>> round(r["mean"], 4), round(r["low"], 4), round(r["high"], 4)
    (0.125, -0.0165, 0.2665)
    >>> r = paired_interval(np.array([0.5, 0.25, 0.0, 0.25]), np.array([0.25, 0.25, 0.0, 0.0]),
    ...                     clusters=["u", "u", "u", "v"])
    >>> round(r["high"] - r["mean"], 4)  # sums −0.125 (u), 0.125 (v): se = √0.03125 / 4
    0.0866
    """
    d = np.asarray(a, float) - np.asarray(b, float)
    n = len(d)
    if n < 2:
        return {"mean": float(d.mean()) if n else 0.0, "low": float("nan"),
                "high": float("nan"), "n": int(n)}
    mean = float(d.mean())
    if clusters is None:
        se = d.std(ddof=1) / np.sqrt(n)
    else:
        sums = pd.Series(d - mean).groupby(np.asarray(clusters, dtype=object)).sum()
        se = float(np.sqrt((sums.to_numpy(float) ** 2).sum()) / n)
    return {"mean": mean, "low": float(mean - z * se), "high": float(mean + z * se), "n": int(n)}
