"""Candidate sources beyond segment popularity: buy-again, also-bought and trending (issue #14).

Every source is a pure function of the same deduplicated order lines (one row
per distinct ``(order_id, sku)``, columns ``user_id``, ``sku``, ``order_id``,
``event_time`` as :func:`models.popularity.order_lines` produces them; other
columns are ignored) and the run's ``as_of``. Lines after ``as_of`` are dropped
first, so a backtest never sees its own future. The functions are vectorised
over all users at once and import no Beam: the ``Recommend`` composite will
call them per key through a thin adapter.

Segment popularity, the fourth source, is :mod:`models.popularity` as it is;
see docs/recommenders.md for how its per-user ranking enters the slot mix.

A purchase's weight everywhere is ``0.5 ** (age_days / half_life_days)`` with
``age_days = (as_of - event_time)`` (the same decay as popularity), and one
order counts once per SKU whatever its quantity.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import pandas as pd
from scipy import sparse

SIMILARITIES = ("count", "jaccard", "lift", "cosine")
MODES = ("user", "basket")
DAY_SECONDS = 86_400.0
# Relative tolerance on growth comparisons: 3 orders against 2 is exactly +50% even
# when decay weights are summed in floating point.
GROWTH_TOLERANCE = 1e-9


def _upto(order_lines: pd.DataFrame, as_of: pd.Timestamp) -> pd.DataFrame:
    """The lines at or before ``as_of`` with only the columns the sources read."""
    lines = order_lines.loc[order_lines["event_time"] <= as_of,
                            ["user_id", "sku", "order_id", "event_time"]]
    return lines.reset_index(drop=True)


def _decay(event_times: pd.Series, as_of: pd.Timestamp,
           half_life_days: Optional[float]) -> np.ndarray:
    """``0.5 ** (age_days / half_life)``; all ones when ``half_life_days`` is None (no decay).

    >>> t = pd.Series(pd.to_datetime(["2026-01-31", "2026-01-01"], utc=True))
    >>> _decay(t, pd.Timestamp("2026-01-31", tz="UTC"), 30.0).round(3).tolist()
    [1.0, 0.5]
    """
    if half_life_days is None:
        return np.ones(len(event_times))
    age = (as_of - event_times).dt.total_seconds().to_numpy(float) / DAY_SECONDS
    return np.power(0.5, age / half_life_days)


def _top_per(frame: pd.DataFrame, key: str, n: Optional[int], by: list,
             ascending: list) -> pd.DataFrame:
    """Rows sorted by ``key`` then ``by``; at most ``n`` per ``key`` (all if None)."""
    frame = frame.sort_values([key, *by], ascending=[True, *ascending], kind="stable")
    if n is not None:
        frame = frame.loc[frame.groupby(key, sort=False).cumcount().to_numpy() < n]
    return frame.reset_index(drop=True)


def recently_bought(order_lines: pd.DataFrame, as_of: pd.Timestamp, days: int) -> pd.DataFrame:
    """Distinct ``(user_id, sku)`` bought in the ``days`` before ``as_of`` (SPEC rule 4).

    This is the exclusion the slot mix applies to discovery slots only;
    ``days == 0`` excludes nothing.

    >>> lines = pd.DataFrame({"user_id": ["u", "u"], "sku": ["A", "B"], "order_id": ["1", "2"],
    ...     "event_time": pd.to_datetime(["2026-01-01", "2025-01-01"], utc=True)})
    >>> recently_bought(lines, pd.Timestamp("2026-02-01", tz="UTC"), 365)["sku"].tolist()
    ['A']
    """
    lines = _upto(order_lines, as_of)
    if days <= 0:
        lines = lines.iloc[:0]
    lines = lines.loc[lines["event_time"] > as_of - pd.Timedelta(days=days)]
    return lines[["user_id", "sku"]].drop_duplicates().reset_index(drop=True)


# --- buy-again -------------------------------------------------------------------------------

def repurchase_intervals(order_lines: pd.DataFrame, as_of: pd.Timestamp,
                         min_gap_days: float = 1.0, min_gaps: int = 1) -> pd.DataFrame:
    """Each SKU's typical repurchase interval: median gap between a user's consecutive orders of it.

    Gaps are pooled over every user who bought the SKU twice or more. A gap
    under ``min_gap_days`` (two baskets on one shopping trip) is not a
    repurchase cycle and is left out; a SKU with fewer than ``min_gaps``
    gaps has no interval (it is absent from the result).

    Returns:
      frame ``sku, interval_days, gaps``.
    """
    lines = _upto(order_lines, as_of).sort_values(["user_id", "sku", "event_time"],
                                                  kind="stable")
    same = ((lines["user_id"].to_numpy() == np.roll(lines["user_id"].to_numpy(), 1))
            & (lines["sku"].to_numpy() == np.roll(lines["sku"].to_numpy(), 1)))
    if len(same):
        same[0] = False
    gap = lines["event_time"].diff().dt.total_seconds().to_numpy(float) / DAY_SECONDS
    keep = same & (gap >= min_gap_days)
    gaps = pd.DataFrame({"sku": lines["sku"].to_numpy()[keep], "gap": gap[keep]})
    out = gaps.groupby("sku", sort=True).agg(interval_days=("gap", "median"),
                                             gaps=("gap", "size")).reset_index()
    return out.loc[out["gaps"] >= min_gaps].reset_index(drop=True)


def buy_again(order_lines: pd.DataFrame, as_of: pd.Timestamp, half_life_days: float = 30.0,
              max_due: float = 1.0, min_gap_days: float = 1.0, min_gaps: int = 1,
              max_per_user: Optional[int] = None, due: bool = True,
              intervals: Optional[pd.DataFrame] = None) -> pd.DataFrame:
    """Score each ``(user, sku)`` the user bought before by decayed frequency × due-ness.

    Formula, for user u and SKU i::

        frequency(u, i) = Σ over u's distinct orders of i of 0.5 ** (age_days / half_life_days)
        days_since(u, i) = (as_of - u's last order of i) in days
        interval(i)      = median gap between consecutive orders of i by the same user, over
                           all users (:func:`repurchase_intervals`)
        due(u, i)        = min(days_since / interval, max_due)   if i has an interval
                         = 1.0                                    otherwise (neutral)
        score(u, i)      = frequency(u, i) × due(u, i)

    With the default ``max_due = 1`` an item bought a day ago that is usually
    re-bought weekly scores 1/7 of its frequency, and an item that is due or
    overdue keeps its whole frequency (long-forgotten items fade through the
    decay instead). ``max_due > 1`` lets overdue items rise above their
    frequency.

    Args:
      max_per_user: keep only each user's best N (None: all), bounding the
        output at N rows per user.
      due: False scores by decayed frequency alone (every due factor 1): on
        the grocer's sampled history due-ness lost (docs/recommenders.md).
      intervals: :func:`repurchase_intervals` computed beforehand over every
        user; a job that scores one shard of users at a time passes the
        global table so an item's typical interval is not the shard's.

    Returns:
      frame ``user_id, sku, score, frequency, orders, days_since, interval_days, due``
      sorted by user, score descending, SKU.

    >>> t = pd.to_datetime(["2026-01-01", "2026-01-08", "2026-01-29"], utc=True)
    >>> lines = pd.DataFrame({"user_id": ["u", "u", "u"], "sku": ["milk", "milk", "tv"],
    ...                       "order_id": ["1", "2", "3"], "event_time": t})
    >>> out = buy_again(lines, pd.Timestamp("2026-01-31", tz="UTC"), half_life_days=1e9)
    >>> out[["sku", "interval_days", "due", "score"]].round(3).values.tolist()
    [['milk', 7.0, 1.0, 2.0], ['tv', nan, 1.0, 1.0]]
    """
    lines = _upto(order_lines, as_of)
    lines = lines.assign(_w=_decay(lines["event_time"], as_of, half_life_days))
    per = (lines.groupby(["user_id", "sku"], sort=False)
           .agg(frequency=("_w", "sum"), orders=("order_id", "size"),
                last=("event_time", "max")).reset_index())
    per["days_since"] = (as_of - per["last"]).dt.total_seconds().to_numpy(float) / DAY_SECONDS
    if intervals is None:
        intervals = repurchase_intervals(lines, as_of, min_gap_days, min_gaps)
    if not due:
        intervals = intervals.iloc[:0]
    per = per.merge(intervals[["sku", "interval_days"]], on="sku", how="left")
    ratio = per["days_since"].to_numpy(float) / per["interval_days"].to_numpy(float)
    per["due"] = np.where(np.isnan(ratio), 1.0, np.minimum(ratio, max_due))
    per["score"] = per["frequency"] * per["due"]
    per = per[["user_id", "sku", "score", "frequency", "orders", "days_since",
               "interval_days", "due"]]
    return _top_per(per, "user_id", max_per_user, ["score", "sku"], [False, True])


# --- also-bought -----------------------------------------------------------------------------

@dataclass(frozen=True)
class ItemSimilarity:
    """An item-to-item similarity table and what building it cost.

    Attributes:
      table: ``sku, neighbour, similarity, cooccurrence``, at most ``top_n``
        neighbours per SKU, best first (ties: higher co-occurrence, then neighbour).
      rows: users (mode "user") or baskets (mode "basket") that contributed.
      lines_capped: (row, sku) items dropped by ``max_history``.
      pairs_generated: ordered pairs (i, j), i ≠ j, emitted by the capped rows,
        Σ n·(n − 1): the work and the bound; at most rows × max_history².
      pairs_distinct: distinct ordered pairs with co-occurrence ≥ the minimum.
      pairs_kept: rows of ``table`` after the top-N cut.
    """

    table: pd.DataFrame
    rows: int
    lines_capped: int
    pairs_generated: int
    pairs_distinct: int
    pairs_kept: int


def _similarity(measure: str, c_ij: np.ndarray, c_ii: np.ndarray, c_jj: np.ndarray) -> np.ndarray:
    """SAR's similarity of i and j from co-occurrence c_ij and occurrences c_ii, c_jj.

    count = c_ij; jaccard = c_ij / (c_ii + c_jj − c_ij); lift = c_ij / (c_ii · c_jj);
    cosine = c_ij / √(c_ii · c_jj).

    >>> [float(_similarity(m, np.array([2.]), np.array([3.]), np.array([4.]))[0].round(4))
    ...  for m in SIMILARITIES]
    [2.0, 0.4, 0.1667, 0.5774]
    """
    if measure == "count":
        return c_ij.astype(float)
    if measure == "jaccard":
        return c_ij / (c_ii + c_jj - c_ij)
    if measure == "lift":
        return c_ij / (c_ii * c_jj)
    if measure == "cosine":
        return c_ij / np.sqrt(c_ii * c_jj)
    raise ValueError(f"similarity must be one of {', '.join(SIMILARITIES)}, got {measure!r}")


def capped_items(lines: pd.DataFrame, unit: str, max_history: Optional[int]):
    """Distinct (unit, sku), each unit's ``max_history`` most recent SKUs; and the number cut."""
    last = lines.groupby([unit, "sku"], sort=False)["event_time"].max().reset_index()
    kept = _top_per(last, unit, max_history, ["event_time", "sku"], [False, True])
    return kept, len(last) - len(kept)


def item_similarity(order_lines: pd.DataFrame, as_of: pd.Timestamp, similarity: str = "jaccard",
                    top_n: Optional[int] = 50, max_history: Optional[int] = 100,
                    mode: str = "user", min_cooccurrence: int = 1) -> ItemSimilarity:
    """Item-to-item co-occurrence over users' (or baskets') histories, as SAR builds it.

    A row is a user (``mode="user"``: everything the user bought) or a basket
    (``mode="basket"``: one order). Each row keeps its ``max_history`` most
    recently bought distinct SKUs, so the pairs one row can emit are bounded
    by ``max_history²``. ``c_ij`` = number of rows holding both i and j,
    ``c_ii`` = rows holding i; the similarity is :func:`_similarity` of them.
    The co-occurrence matrix is one sparse product ``Xᵀ·X`` of the binary
    rows × SKUs matrix, so memory is proportional to the distinct pairs.
    Pairs with ``c_ij < min_cooccurrence`` are dropped (SAR's threshold);
    the diagonal (an item with itself) is never a neighbour.
    """
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {', '.join(SIMILARITIES)}, got {similarity!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    unit = "user_id" if mode == "user" else "order_id"
    items, capped = capped_items(_upto(order_lines, as_of), unit, max_history)
    row_codes, rows = pd.factorize(items[unit], sort=True)
    col_codes, skus = pd.factorize(items["sku"], sort=True)
    x = sparse.csr_matrix((np.ones(len(items), dtype=np.float64), (row_codes, col_codes)),
                          shape=(len(rows), len(skus)))
    per_row = np.bincount(row_codes, minlength=len(rows)).astype(np.int64)
    generated = int((per_row * (per_row - 1)).sum())
    table, distinct = similarity_table((x.T @ x), np.asarray(skus, dtype=object), similarity,
                                       top_n, min_cooccurrence)
    return ItemSimilarity(table, len(rows), int(capped), generated, distinct, len(table))


def similarity_table(cooccurrence, names: np.ndarray, similarity: str, top_n: Optional[int],
                     min_cooccurrence: int = 1, rows: Optional[np.ndarray] = None):
    """The neighbour table of :func:`item_similarity` from a co-occurrence matrix ``C = XᵀX``.

    ``C`` is square over ``names`` (sorted, so ties broken by code are ties broken
    by SKU) with the occurrences on its diagonal; the streaming refresh keeps it
    up to date incrementally (:mod:`models.stream_sources`) and cuts it here, so
    both jobs share one cut. ``rows`` (SKU codes) cuts only those SKUs' rows: a
    row depends only on its own cells and the occurrences, so the others keep
    the table they had.

    Returns:
      ``(table, pairs_distinct)``: ``sku, neighbour, similarity, cooccurrence``, at most
      ``top_n`` per SKU, and the distinct ordered pairs at or above the minimum (of
      ``rows`` when given).
    """
    full = sparse.csr_matrix(cooccurrence)
    occurrences = full.diagonal() if full.shape[0] else np.zeros(0)
    if rows is None:
        co = full.tocoo()
        row_codes = co.row
    else:
        rows = np.asarray(rows, dtype=np.int64)
        co = full[rows].tocoo()
        row_codes = rows[co.row]
    off = (row_codes != co.col) & (co.data >= min_cooccurrence)
    i, j, c = row_codes[off], co.col[off], co.data[off]
    sim = _similarity(similarity, c, occurrences[i], occurrences[j])
    # Top-N on integer codes (codes follow SKU order, so ties by code are ties by SKU); the
    # strings are attached to the kept rows only, which keeps memory near the sparse matrix.
    order = np.lexsort((j, -c, -sim, i))
    i, j, c, sim = i[order], j[order], c[order], sim[order]
    starts = np.flatnonzero(np.r_[True, i[1:] != i[:-1]]) if len(i) else np.zeros(0, int)
    rank = np.arange(len(i)) - np.repeat(starts, np.diff(np.r_[starts, len(i)]))
    keep = rank < top_n if top_n is not None else np.ones(len(i), dtype=bool)
    table = pd.DataFrame({"sku": names[i[keep]], "neighbour": names[j[keep]],
                          "similarity": sim[keep], "cooccurrence": c[keep].astype(np.int64)})
    return table, int(off.sum())


def also_bought_scores(order_lines: pd.DataFrame, table: pd.DataFrame, as_of: pd.Timestamp,
                       half_life_days: float = 30.0, max_history: Optional[int] = 100,
                       exclude_seen: bool = True, max_per_user: Optional[int] = 50,
                       carts: Optional[pd.DataFrame] = None) -> pd.DataFrame:
    """Each user's also-bought scores: Σ over what they bought and carted, affinity × similarity.

    ``affinity(u, i)`` is the buy-again frequency (Σ of decayed distinct
    orders) over the user's ``max_history`` most recent SKUs, plus
    ``carts.weight`` for each ``(user_id, sku)`` of ``carts`` (what is in their
    cart now; the caller caps its rows per user), and
    ``score(u, j) = Σ_i affinity(u, i) · similarity(i → j)`` using the
    neighbour table of :func:`item_similarity` (SAR's user-affinity ×
    item-similarity product, one sparse matrix product for all users).
    ``exclude_seen`` drops every SKU the user already bought, also those
    beyond the history cap (SAR's ``remove_seen``): what they buy again is
    buy-again's job.

    >>> t = pd.to_datetime(["2026-01-01"], utc=True)
    >>> lines = pd.DataFrame({"user_id": ["u"], "sku": ["A"], "order_id": ["1"], "event_time": t})
    >>> sim = pd.DataFrame({"sku": ["A", "B"], "neighbour": ["C", "C"], "similarity": [0.4, 0.5]})
    >>> carts = pd.DataFrame({"user_id": ["u", "v"], "sku": ["B", "B"], "weight": [2.0, 1.0]})
    >>> also_bought_scores(lines, sim, t[0], carts=carts).values.tolist()  # u: 1·0.4 + 2·0.5
    [['u', 'C', 1.4], ['v', 'C', 0.5]]

    Returns:
      frame ``user_id, sku, score``, at most ``max_per_user`` per user, best first.
    """
    lines = _upto(order_lines, as_of)
    lines = lines.assign(_w=_decay(lines["event_time"], as_of, half_life_days))
    affinity = lines.groupby(["user_id", "sku"], sort=False).agg(
        a=("_w", "sum"), event_time=("event_time", "max")).reset_index()
    bought = affinity[["user_id", "sku"]]  # everything, for exclude_seen
    affinity = _top_per(affinity, "user_id", max_history, ["event_time", "sku"], [False, True])
    affinity = affinity[["user_id", "sku", "a"]]
    if carts is not None and len(carts):
        affinity = pd.concat([affinity, pd.DataFrame({
            "user_id": carts["user_id"].to_numpy(object), "sku": carts["sku"].to_numpy(object),
            "a": carts["weight"].to_numpy(float)})], ignore_index=True)
    skus = pd.Index(np.union1d(np.union1d(np.union1d(bought["sku"].to_numpy(str),
                                                     affinity["sku"].to_numpy(str)),
                                          table["sku"].to_numpy(str)),
                               table["neighbour"].to_numpy(str)))
    users = pd.Index(pd.unique(np.concatenate([bought["user_id"].to_numpy(object),
                                               affinity["user_id"].to_numpy(object)]))
                     ).sort_values()
    u_codes = users.get_indexer(affinity["user_id"])
    a = sparse.csr_matrix((affinity["a"].to_numpy(float),
                           (u_codes, skus.get_indexer(affinity["sku"].to_numpy(str)))),
                          shape=(len(users), len(skus)))
    s = sparse.csr_matrix((table["similarity"].to_numpy(float),
                           (skus.get_indexer(table["sku"].to_numpy(str)),
                            skus.get_indexer(table["neighbour"].to_numpy(str)))),
                          shape=(len(skus), len(skus)))
    product = a @ s
    if exclude_seen:  # zero every SKU the user bought (beyond the history cap too), all at once
        seen = sparse.csr_matrix((np.ones(len(bought)), (
            users.get_indexer(bought["user_id"]),
            skus.get_indexer(bought["sku"].to_numpy(str)))), shape=product.shape)
        product = product - product.multiply(seen)
    scores = product.tocoo()
    out = pd.DataFrame({"user_id": np.asarray(users, dtype=object)[scores.row],
                        "sku": np.asarray(skus, dtype=object)[scores.col],
                        "score": scores.data})
    out = out.loc[out["score"] > 0]
    return _top_per(out, "user_id", max_per_user, ["score", "sku"], [False, True])


@dataclass(frozen=True)
class AlsoBought:
    """The also-bought source: the similarity build and the users' scores."""

    similarity: ItemSimilarity
    scores: pd.DataFrame


def also_bought(order_lines: pd.DataFrame, as_of: pd.Timestamp, similarity: str = "jaccard",
                top_n: Optional[int] = 50, max_history: Optional[int] = 100, mode: str = "user",
                half_life_days: float = 30.0, min_cooccurrence: int = 1,
                exclude_seen: bool = True, max_per_user: Optional[int] = 50) -> AlsoBought:
    """:func:`item_similarity` then :func:`also_bought_scores` on the same lines.

    The history cap applies to both: the pairs a user emits and the items that
    carry their affinity are the same ``max_history`` most recent SKUs.
    """
    built = item_similarity(order_lines, as_of, similarity, top_n, max_history, mode,
                            min_cooccurrence)
    scores = also_bought_scores(order_lines, built.table, as_of, half_life_days, max_history,
                                exclude_seen, max_per_user)
    return AlsoBought(built, scores)


# --- trending --------------------------------------------------------------------------------

def trending(order_lines: pd.DataFrame, as_of: pd.Timestamp, period_days: float = 28.0,
             min_count: int = 5, growth_threshold: float = 0.5, boost: float = 0.2,
             half_life_days: Optional[float] = 30.0) -> pd.DataFrame:
    """Growth of each SKU's decayed orders in the recent period against the one before.

    Formula, with P = ``period_days``::

        recent(i)   = Σ orders of i in (as_of − P, as_of]      of 0.5 ** ((as_of − t) / h)
        previous(i) = Σ orders of i in (as_of − 2P, as_of − P] of 0.5 ** ((as_of − P − t) / h)
        growth(i)   = recent / previous − 1           (+inf when previous = 0)
        multiplier  = 1 + boost   if recent_orders ≥ min_count and growth ≥ growth_threshold
                    = 1           otherwise

    Each period is decayed to its own end, so a SKU that sells the same every
    day shows zero growth rather than the decay's drop. ``recent_orders`` is the
    plain count of distinct orders in the recent period: a SKU needs that many
    before any growth counts (3 orders after 1 is +200% and noise). A SKU new
    in the recent period has infinite growth and is boosted once it meets
    ``min_count``. Defaults are the B2B origin's: +20% for ≥ 50% growth.

    Returns:
      frame ``sku, recent_orders, previous_orders, recent, previous, growth,
      multiplier`` for every SKU ordered in either period, by SKU.

    >>> t = pd.to_datetime(["2026-01-20"] * 3 + ["2026-01-05"] * 2, utc=True)
    >>> lines = pd.DataFrame({"user_id": list("abcde"), "sku": ["A"] * 5,
    ...                       "order_id": list("12345"), "event_time": t})
    >>> out = trending(lines, pd.Timestamp("2026-01-29", tz="UTC"), 14, 3, half_life_days=None)
    >>> out[["recent_orders", "previous_orders", "growth", "multiplier"]].values.tolist()
    [[3.0, 2.0, 0.5, 1.2]]
    """
    lines = _upto(order_lines, as_of)
    period = pd.Timedelta(days=period_days)
    recent_mask = lines["event_time"] > as_of - period
    previous_mask = ~recent_mask & (lines["event_time"] > as_of - 2 * period)
    frames = []
    for mask, end, name in ((recent_mask, as_of, "recent"),
                            (previous_mask, as_of - period, "previous")):
        part = lines.loc[mask]
        frames.append(pd.DataFrame({
            "sku": part["sku"].to_numpy(), "period": name,
            "weight": _decay(part["event_time"], end, half_life_days)}))
    both = pd.concat(frames, ignore_index=True)
    out = pd.DataFrame(index=pd.Index(np.unique(both["sku"].to_numpy(str)), name="sku"))
    for name in ("recent", "previous"):
        part = both.loc[both["period"] == name].groupby("sku")["weight"]
        out[f"{name}_orders"] = part.size().reindex(out.index, fill_value=0).astype(float)
        out[name] = part.sum().reindex(out.index, fill_value=0.0).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        growth = np.where(out["previous"] > 0, out["recent"] / out["previous"] - 1.0, np.inf)
    growth = np.where(out["recent"] > 0, growth, np.where(out["previous"] > 0, -1.0, 0.0))
    out["growth"] = growth
    threshold = growth_threshold - GROWTH_TOLERANCE * max(1.0, abs(growth_threshold))
    hot = (out["recent_orders"] >= min_count) & (out["growth"] >= threshold)
    out["multiplier"] = np.where(hot, 1.0 + boost, 1.0)
    return out.reset_index()


def trending_candidates(table: pd.DataFrame) -> pd.DataFrame:
    """The trending source as a global list: boosted SKUs ranked by their recent decayed orders.

    >>> t = pd.DataFrame({"sku": ["A", "B"], "recent": [3.0, 9.0], "multiplier": [1.2, 1.0]})
    >>> trending_candidates(t).values.tolist()
    [['A', 3.0]]
    """
    hot = table.loc[table["multiplier"] > 1.0, ["sku", "recent"]].rename(
        columns={"recent": "score"})
    return hot.sort_values(["score", "sku"], ascending=[False, True],
                           kind="stable").reset_index(drop=True)


def apply_boost(scores: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """A source's ``score`` times each SKU's trending multiplier (1 for SKUs not in ``table``).

    >>> s = pd.DataFrame({"sku": ["A", "B"], "score": [1.0, 1.1]})
    >>> t = pd.DataFrame({"sku": ["A"], "multiplier": [1.2]})
    >>> apply_boost(s, t)["score"].tolist()
    [1.2, 1.1]
    """
    factor = scores["sku"].map(table.set_index("sku")["multiplier"]).fillna(1.0)
    return scores.assign(score=scores["score"].to_numpy(float) * factor.to_numpy(float))


# --- the sources as the batch job calls them (per shard of users) ----------------------------

PURCHASED = "purchased"
"""Pseudo-source of :func:`personal_candidates`: every SKU the user bought up to ``as_of``.
It fills no slot; the QA check of buy-again slots reads it (a buy-again slot must hold one)."""
LINE_COLUMNS = ("user_id", "sku", "order_id", "event_time")


@dataclass(frozen=True)
class SharedTables:
    """What the sources need from all users at once, built once per run (a side input).

    Attributes:
      intervals: :func:`repurchase_intervals` over every user (buy-again's due-ness).
      similarity: :func:`item_similarity` (also-bought), None when the mix has no also-bought.
      trending: :func:`trending_candidates` (a shared list), None when the mix has no trending.
      eligible: SKUs that pass the catalogue rules (None: not known); per-user lists are
        cut to their length after dropping the others, so ineligible favourites cannot
        crowd out eligible ones.
      boost: ``sku, multiplier`` of the trending SKUs (multiplier 1 + boost), None
        when ``trending.boost_sources`` is empty; :func:`apply_boost` applies it.
    """

    intervals: pd.DataFrame
    similarity: Optional[ItemSimilarity]
    trending: Optional[pd.DataFrame]
    eligible: Optional[frozenset] = None
    boost: Optional[pd.DataFrame] = None


def source_lines(order_lines: pd.DataFrame) -> pd.DataFrame:
    """The order-line columns the sources read; an empty input gives an empty typed frame."""
    if not len(order_lines) or not set(LINE_COLUMNS) <= set(order_lines.columns):
        return pd.DataFrame({"user_id": pd.Series(dtype=object), "sku": pd.Series(dtype=object),
                             "order_id": pd.Series(dtype=object),
                             "event_time": pd.Series(dtype="datetime64[us, UTC]")})
    return order_lines[list(LINE_COLUMNS)]


def shared_tables(order_lines: pd.DataFrame, as_of: pd.Timestamp, config,
                  eligible: Optional[frozenset] = None) -> SharedTables:
    """The global tables of the sources named in ``config.mix`` (a ``CandidatesConfig``).

    Every source reads the same deduplicated order lines the popularity reads.
    """
    lines = source_lines(order_lines)
    names = {name for name, _ in config.mix}
    intervals = (repurchase_intervals(lines, as_of) if "buy_again" in names
                 else pd.DataFrame({"sku": [], "interval_days": [], "gaps": []}))
    similarity = None
    if "also_bought" in names:
        ab = config.also_bought
        similarity = item_similarity(lines, as_of, ab.similarity, ab.top_n, ab.max_history,
                                     "user", ab.min_cooccurrence)
    hot = boost = None
    tr = config.trending
    if "trending" in names or tr.boost_sources:
        growth = trending(lines, as_of, tr.period_days, tr.min_count, tr.growth, tr.boost)
        if "trending" in names:
            hot = trending_candidates(growth)
        if tr.boost_sources:
            boost = growth.loc[growth["multiplier"] > 1.0, ["sku", "multiplier"]].reset_index(
                drop=True)
    return SharedTables(intervals, similarity, hot, eligible, boost)


def cart_affinity(users: pd.DataFrame, weight: float, max_carts: int) -> pd.DataFrame:
    """``user_id, sku, weight``: each user's carted SKUs (profile column ``carted``), at most
    ``max_carts`` per user, each carrying ``weight`` of also-bought affinity.

    >>> users = pd.DataFrame({"user_id": ["u", "v"], "carted": [("A", "B", "C"), ()]})
    >>> cart_affinity(users, 0.5, 2).values.tolist()
    [['u', 'A', 0.5], ['u', 'B', 0.5]]
    """
    if weight <= 0 or max_carts <= 0 or "carted" not in users.columns or not len(users):
        return pd.DataFrame({"user_id": pd.Series(dtype=object),
                             "sku": pd.Series(dtype=object), "weight": pd.Series(dtype=float)})
    rows = users[["user_id", "carted"]].explode("carted").dropna()
    rows = rows.loc[rows.groupby("user_id", sort=False).cumcount().to_numpy() < max_carts]
    return pd.DataFrame({"user_id": rows["user_id"].to_numpy(object),
                         "sku": rows["carted"].to_numpy(object), "weight": float(weight)})


def personal_candidates(order_lines: pd.DataFrame, users: Sequence, as_of: pd.Timestamp,
                        config, tables: SharedTables, max_per_user: int,
                        carts: Optional[pd.DataFrame] = None) -> pd.DataFrame:
    """Per-user candidates of the mix's personal sources for ``users`` (one shard of them).

    ``order_lines`` must hold every line of these users (the job shards lines and
    users by ``user_id`` together); ``carts`` (:func:`cart_affinity`) adds what is in
    their carts to also-bought's affinity. Returns ``user_id, sku, score, source``: at
    most ``max_per_user`` rows per user and source, plus one :data:`PURCHASED` row
    per SKU each user bought (score 0) for the QA checks. With ``also_bought`` in
    ``trending.boost_sources`` its scores are multiplied by the trending multiplier
    (``tables.boost``) before each user's cut.
    """
    lines = source_lines(order_lines)
    lines = lines.loc[lines["user_id"].isin(list(users)) & (lines["event_time"] <= as_of)]
    names = {name for name, _ in config.mix}
    parts = [lines[["user_id", "sku"]].drop_duplicates().assign(score=0.0, source=PURCHASED)]
    # Ineligible SKUs are dropped before each user's cut, so they cannot crowd out eligible
    # ones: buy-again scores (user, sku) pairs independently (the intervals are global), and
    # an also-bought score of j sums only over the table's rows whose neighbour is j.
    table = tables.similarity.table if tables.similarity is not None else None
    scorable = lines
    if tables.eligible is not None:
        scorable = lines.loc[lines["sku"].isin(tables.eligible)]
        if table is not None:
            table = table.loc[table["neighbour"].isin(tables.eligible)]
    if "buy_again" in names:
        ba = config.buy_again
        scored = buy_again(scorable, as_of, ba.half_life_days, ba.max_due,
                           max_per_user=max_per_user, due=ba.due, intervals=tables.intervals)
        parts.append(scored[["user_id", "sku", "score"]].assign(source="buy_again"))
    if carts is not None:
        carts = carts.loc[carts["user_id"].isin(list(users))]
    if "also_bought" in names and table is not None and (
            len(lines) or (carts is not None and len(carts))):
        ab = config.also_bought
        boosted = tables.boost is not None and "also_bought" in config.trending.boost_sources
        scored = also_bought_scores(lines, table, as_of, ab.half_life_days, ab.max_history,
                                    True, None if boosted else max_per_user, carts)
        if boosted:
            scored = _top_per(apply_boost(scored, tables.boost), "user_id", max_per_user,
                              ["score", "sku"], [False, True])
        parts.append(scored[["user_id", "sku", "score"]].assign(source="also_bought"))
    out = pd.concat(parts, ignore_index=True)
    return out.astype({"user_id": object, "sku": object, "score": float, "source": object})
