"""The candidate sources' shared tables in the stream: the history's, plus what a window adds.

The batch job builds :class:`models.candidates.SharedTables` once per run from
every order line (:func:`models.candidates.shared_tables`). The streaming
refresh scores a window whose lines are the history's (reference data) plus the
stream window's, at ``as_of`` = the window's end. Rebuilding the tables from all
those lines every window would redo the history's work each time, so the
history's part is built once per reference version (:class:`HistorySources`) and
each window only adds its own lines (:func:`window_tables`):

- **also-bought co-occurrence** is the sparse count matrix ``C = XᵀX`` of the
  binary users × SKUs matrix of each user's ``max_history`` most recent SKUs.
  It is additive over users, so a window changes only the rows of the users who
  ordered in it: ``C_window = C_history − X_oldᵀX_old + X_newᵀX_new`` over those
  users (old: their history rows; new: history plus window lines, capped again).
  Cost per window: the window's buyers × ``max_history²`` pair updates, then the
  similarity and top-N cut of the rows that moved (the SKUs in the buyers' old
  and new items and every SKU co-bought with one of them: their cells or their
  candidates' occurrences changed); every other row is the history's, kept
  (`candidates.similarity_table` is the cut both jobs use).
- **buy-again intervals** pool the gaps between a user's consecutive orders of a
  SKU. Only the (user, SKU) pairs ordered in the window gain gaps, so only the
  SKUs they name get a new median (their history gaps plus the pairs' recomputed
  ones); every other SKU keeps the history's interval.
- **trending** compares the last period ``P`` with the one before, both measured
  back from ``as_of``, which moves every window: the history's lines of the last
  ``2P`` (a slice of its time-sorted lines) plus the window's are scored again.
  Cost per window: the order lines of ``2P`` (56 days by default), vectorised.

Every function returns exactly what :func:`models.candidates.shared_tables`
returns over the history's lines plus the window's (tested window by window in
tests/test_streaming_sources.py). Nothing here imports Beam.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple

import numpy as np
import pandas as pd
from scipy import sparse

from models import candidates, profiles
from models.candidates import ItemSimilarity, SharedTables

LINE_COLUMNS = ("user_id", "sku", "order_id", "event_time")
_TIME = "datetime64[us, UTC]"
_MICRO = pd.Timedelta(microseconds=1)
_EPOCH = pd.Timestamp(0, tz="UTC")


def empty_lines() -> pd.DataFrame:
    """An order-lines frame without rows (the columns the sources read)."""
    return pd.DataFrame({"user_id": pd.Series(dtype=object), "sku": pd.Series(dtype=object),
                         "order_id": pd.Series(dtype=object),
                         "event_time": pd.Series(dtype=_TIME)})


def cells_of_events(events: pd.DataFrame) -> Dict[Tuple[str, str], Tuple[int, str]]:
    """A frame of events' order lines as window cells, ``{(order_id, sku): (time_us, user)}``.

    Each line at its earliest event (`profiles.order_lines`), as `WindowOrderLines`
    gathers them from the stream; `lines_of_cells` turns them back into a frame.
    """
    lines = profiles.order_lines(events)
    return {(o, s): (int(t.value // 1000), u) for o, s, t, u in
            zip(lines["order_id"], lines["sku"], lines["event_time"], lines["user_id"])}


def lines_of_cells(cells: Mapping[Tuple[str, str], Tuple[int, str]]) -> pd.DataFrame:
    """A window's order lines, ``{(order_id, sku): (event_time_us, user_id)}``, as a frame.

    >>> lines_of_cells({("O1", "A"): (0, "u")})[["user_id", "sku", "order_id"]].values.tolist()
    [['u', 'A', 'O1']]
    """
    if not cells:
        return empty_lines()
    keys = sorted(cells)
    return pd.DataFrame({
        "user_id": pd.Series([cells[k][1] for k in keys], dtype=object),
        "sku": pd.Series([k[1] for k in keys], dtype=object),
        "order_id": pd.Series([k[0] for k in keys], dtype=object),
        "event_time": pd.Series(pd.to_datetime(np.asarray([cells[k][0] for k in keys],
                                                          dtype=np.int64), unit="us", utc=True)
                                ).astype(_TIME)})


def _capped(lines: pd.DataFrame, max_history: Optional[int]) -> pd.DataFrame:
    """Distinct (user, sku) with the last order time, each user's ``max_history`` most recent
    (``candidates.capped_items``: the same cut, the same ties)."""
    kept, _ = candidates.capped_items(lines, "user_id", max_history)
    return kept


def _gaps(lines: pd.DataFrame, min_gap_days: float = 1.0) -> pd.DataFrame:
    """``user_id, sku, gap``: the gaps ``candidates.repurchase_intervals`` pools, one per
    consecutive pair of a user's orders of a SKU at least ``min_gap_days`` apart."""
    lines = lines.sort_values(["user_id", "sku", "event_time"], kind="stable")
    users, skus = lines["user_id"].to_numpy(), lines["sku"].to_numpy()
    same = (users == np.roll(users, 1)) & (skus == np.roll(skus, 1))
    if len(same):
        same[0] = False
    gap = lines["event_time"].diff().dt.total_seconds().to_numpy(float) / candidates.DAY_SECONDS
    keep = same & (gap >= min_gap_days)
    return pd.DataFrame({"user_id": users[keep], "sku": skus[keep], "gap": gap[keep]})


def _intervals_of(gaps: pd.DataFrame, min_gaps: int = 1) -> pd.DataFrame:
    out = gaps.groupby("sku", sort=True).agg(interval_days=("gap", "median"),
                                             gaps=("gap", "size")).reset_index()
    return out.loc[out["gaps"] >= min_gaps].reset_index(drop=True)


@dataclass(frozen=True)
class HistorySources:
    """The history's part of every shared table, built once per reference version.

    Attributes:
      skus: every SKU a line may name, sorted (the co-occurrence matrix's codes,
        so ties broken by code are ties broken by SKU as in the batch build).
      lines: the history's order lines, sorted by time (trending slices them).
      times_us: their times in microseconds, for the slice.
      by_user: user → positions of the user's lines.
      items: each user's capped (user, sku, last time) rows (also-bought).
      items_by_user: user → positions in ``items``.
      cooccurrence: ``XᵀX`` over ``items`` (diagonal = occurrences), float counts.
      lines_capped / pairs_generated: ``ItemSimilarity``'s statistics of the history.
      gaps: ``user_id, sku, gap`` of the history (buy-again intervals).
      gaps_by_sku: sku → positions in ``gaps``.
      intervals: the history's intervals (every SKU no window touches keeps its row).
      table / table_codes: the history's similarity table and each row's SKU code
        (the rows no window touches are kept as they are).
      row_pairs: per SKU code, the distinct pairs of its row at or above the minimum.
    """

    skus: pd.Index
    lines: pd.DataFrame
    times_us: np.ndarray
    by_user: Mapping[str, np.ndarray]
    items: pd.DataFrame
    items_by_user: Mapping[str, np.ndarray]
    cooccurrence: sparse.csr_matrix
    lines_capped: int
    pairs_generated: int
    gaps: pd.DataFrame
    gaps_by_sku: Mapping[str, np.ndarray]
    intervals: pd.DataFrame
    table: pd.DataFrame
    table_codes: np.ndarray
    row_pairs: np.ndarray

    @classmethod
    def build(cls, history_lines: pd.DataFrame, catalog_skus, config) -> "HistorySources":
        """From the history's deduplicated order lines and the catalogue's SKUs.

        Args:
          config: the ``CandidatesConfig`` (its ``also_bought.max_history`` caps the items).
        """
        lines = (candidates.source_lines(history_lines).copy() if len(history_lines)
                 else empty_lines())
        lines = lines.astype({"event_time": _TIME}).sort_values(
            "event_time", kind="stable").reset_index(drop=True)
        skus = pd.Index(np.unique(np.concatenate([np.asarray(catalog_skus, dtype=str),
                                                  lines["sku"].to_numpy(str)])))
        items = _capped(lines, config.also_bought.max_history)
        x = _binary(items, skus)
        per_row = np.asarray(x.sum(axis=1)).ravel().astype(np.int64)
        distinct = lines[["user_id", "sku"]].drop_duplicates()
        gaps = _gaps(lines)
        co = (x.T @ x).tocsr()
        ab = config.also_bought
        table, _ = candidates.similarity_table(co, np.asarray(skus, dtype=object),
                                               ab.similarity, ab.top_n, ab.min_cooccurrence)
        return cls(skus, lines, _micros(lines["event_time"]), _positions(lines["user_id"]),
                   items, _positions(items["user_id"]), co,
                   len(distinct) - len(items), int((per_row * (per_row - 1)).sum()),
                   gaps, _positions(gaps["sku"]), _intervals_of(gaps), table,
                   skus.get_indexer(table["sku"].to_numpy(str)),
                   _row_pairs(co, ab.min_cooccurrence))

    def user_lines(self, users) -> pd.DataFrame:
        found = [self.by_user[u] for u in users if u in self.by_user]
        return self.lines.iloc[np.concatenate(found)] if found else self.lines.iloc[:0]

    def user_items(self, users) -> pd.DataFrame:
        found = [self.items_by_user[u] for u in users if u in self.items_by_user]
        return self.items.iloc[np.concatenate(found)] if found else self.items.iloc[:0]

    @property
    def cells(self) -> int:
        """Non-zero co-occurrence cells held (the also-bought state's size)."""
        return int(self.cooccurrence.nnz)


def _row_pairs(co: sparse.csr_matrix, min_cooccurrence: int) -> np.ndarray:
    """Per row of ``C``: off-diagonal cells at or above the minimum (``pairs_distinct``'s terms)."""
    coo = co.tocoo()
    off = (coo.row != coo.col) & (coo.data >= min_cooccurrence)
    return np.bincount(coo.row[off], minlength=co.shape[0]).astype(np.int64)


def _micros(stamps: pd.Series) -> np.ndarray:
    return ((stamps.astype(_TIME) - _EPOCH) // _MICRO).to_numpy(np.int64)


def _positions(column: pd.Series) -> Dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in column.groupby(column.to_numpy(object),
                                                        sort=False).indices.items()}


def _binary(items: pd.DataFrame, skus: pd.Index, users: Optional[pd.Index] = None
            ) -> sparse.csr_matrix:
    """The binary users × SKUs matrix of ``items`` (rows: ``users``, default its own)."""
    if users is None:
        users = pd.Index(pd.unique(items["user_id"].to_numpy(object)))
    return sparse.csr_matrix(
        (np.ones(len(items)), (users.get_indexer(items["user_id"].to_numpy(object)),
                               skus.get_indexer(items["sku"].to_numpy(str)))),
        shape=(len(users), len(skus)))


@dataclass(frozen=True)
class WindowSources:
    """A window's shared tables and what producing them touched (the per-window cost).

    Attributes:
      tables: exactly ``candidates.shared_tables`` over the history's lines plus the window's.
      window_lines: the window's own lines (not already in the history).
      buyers: users with lines in the window (rows of the co-occurrence update).
      pair_updates: co-occurrence cells subtracted and added for them.
      cells: non-zero co-occurrence cells of the window's matrix (also-bought state).
      trending_lines: lines rescored for trending (history's last 2P + the window's).
      rows_rescored: SKUs whose similarity rows were cut again (the others are the history's).
    """

    tables: SharedTables
    window_lines: int
    buyers: int
    pair_updates: int
    cells: int
    trending_lines: int
    rows_rescored: int = 0


def window_tables(base: HistorySources, lines: pd.DataFrame, as_of: pd.Timestamp, config,
                  eligible: Optional[frozenset] = None) -> WindowSources:
    """The shared tables at ``as_of`` over the history's lines plus a window's ``lines``.

    ``lines`` are the window's order lines the history does not hold (the caller
    drops those whose (order_id, sku) the history has, as popularity does), all
    at or before ``as_of``; ``config`` is the ``CandidatesConfig``. A window
    ending before the history's last line cannot use the history's tables as they
    are (they hold lines after its end): the caller scores it whole instead.
    """
    lines = candidates.source_lines(lines).astype({"event_time": _TIME}) if len(lines) else (
        empty_lines())
    lines = lines.loc[lines["event_time"] <= as_of].reset_index(drop=True)
    names = {name for name, _ in config.mix}
    buyers = pd.Index(pd.unique(lines["user_id"].to_numpy(object)))
    mine = pd.concat([base.user_lines(buyers), lines], ignore_index=True)
    intervals = (_window_intervals(base, mine, lines) if "buy_again" in names
                 else pd.DataFrame({"sku": [], "interval_days": [], "gaps": []}))
    similarity, updates, cells, rescored = None, 0, base.cells, 0
    if "also_bought" in names:
        similarity, updates, cells, rescored = _window_similarity(base, buyers, mine,
                                                                  config.also_bought)
    hot = boost = None
    tr = config.trending
    trended = 0
    if "trending" in names or tr.boost_sources:
        since = int((as_of - pd.Timedelta(days=2 * tr.period_days) - _EPOCH) // _MICRO)
        recent = base.lines.iloc[int(np.searchsorted(base.times_us, since, side="right")):]
        recent = pd.concat([recent, lines], ignore_index=True)
        trended = len(recent)
        growth = candidates.trending(recent, as_of, tr.period_days, tr.min_count, tr.growth,
                                     tr.boost)
        if "trending" in names:
            hot = candidates.trending_candidates(growth)
        if tr.boost_sources:
            boost = growth.loc[growth["multiplier"] > 1.0, ["sku", "multiplier"]].reset_index(
                drop=True)
    return WindowSources(SharedTables(intervals, similarity, hot, eligible, boost), len(lines),
                         len(buyers), updates, cells, trended, rescored)


def _window_intervals(base: HistorySources, mine: pd.DataFrame, lines: pd.DataFrame
                      ) -> pd.DataFrame:
    """Intervals with the gaps of the (user, sku) pairs ordered in the window recomputed."""
    if not len(lines):
        return base.intervals
    touched = lines[["user_id", "sku"]].drop_duplicates()
    skus = touched["sku"].unique()
    pairs = set(zip(touched["user_id"], touched["sku"]))
    found = [base.gaps_by_sku[s] for s in skus if s in base.gaps_by_sku]
    old = base.gaps.iloc[np.concatenate(found)] if found else base.gaps.iloc[:0]
    keep = np.fromiter(((u, s) not in pairs for u, s in zip(old["user_id"], old["sku"])),
                       dtype=bool, count=len(old))
    own = mine.merge(touched, on=["user_id", "sku"], how="inner")
    changed = _intervals_of(pd.concat([old.loc[keep], _gaps(own)], ignore_index=True))
    kept = base.intervals.loc[~base.intervals["sku"].isin(skus)]
    return (pd.concat([kept, changed], ignore_index=True).sort_values("sku", kind="stable")
            .reset_index(drop=True).astype({"gaps": np.int64}))


def _window_similarity(base: HistorySources, buyers: pd.Index, mine: pd.DataFrame, ab
                       ) -> Tuple[ItemSimilarity, int, int, int]:
    """The co-occurrence with the window's buyers' rows replaced; its similarity table."""
    old = base.user_items(buyers)
    new = _capped(mine, ab.max_history)
    x_old, x_new = _binary(old, base.skus, buyers), _binary(new, base.skus, buyers)
    co = base.cooccurrence - (x_old.T @ x_old) + (x_new.T @ x_new)
    co.eliminate_zeros()
    per_old = np.asarray(x_old.sum(axis=1)).ravel().astype(np.int64)
    per_new = np.asarray(x_new.sum(axis=1)).ravel().astype(np.int64)
    updates = int((per_old * per_old).sum() + (per_new * per_new).sum())
    rows = len(base.items_by_user) + int(sum(1 for u in buyers if u not in base.items_by_user))
    distinct_new = len(mine[["user_id", "sku"]].drop_duplicates())
    distinct_old = len(base.user_lines(buyers)[["user_id", "sku"]].drop_duplicates())
    capped = base.lines_capped + (distinct_new - len(new)) - (distinct_old - len(old))
    generated = base.pairs_generated + int((per_new * (per_new - 1)).sum()
                                           - (per_old * (per_old - 1)).sum())
    # Only rows whose cells or whose candidates' occurrences moved are cut again: the
    # SKUs of the buyers' old and new items, and every SKU co-bought with one of them.
    moved = np.unique(np.concatenate([base.skus.get_indexer(old["sku"].to_numpy(str)),
                                      base.skus.get_indexer(new["sku"].to_numpy(str))]))
    moved = moved[moved >= 0]
    touched = np.union1d(moved, np.unique(co.tocsc()[:, moved].nonzero()[0]))
    names = np.asarray(base.skus, dtype=object)
    fresh, fresh_pairs = candidates.similarity_table(co, names, ab.similarity, ab.top_n,
                                                     ab.min_cooccurrence, rows=touched)
    kept = ~np.isin(base.table_codes, touched)
    codes = np.concatenate([base.table_codes[kept],
                            base.skus.get_indexer(fresh["sku"].to_numpy(str))])
    order = np.argsort(codes, kind="stable")
    # Built from arrays as `similarity_table` builds its own, so the column types are its.
    table = pd.DataFrame({
        name: np.concatenate([base.table[name].to_numpy(kind)[kept],
                              fresh[name].to_numpy(kind)])[order]
        for name, kind in (("sku", object), ("neighbour", object), ("similarity", float),
                           ("cooccurrence", np.int64))})
    distinct = int(base.row_pairs.sum() - base.row_pairs[touched].sum() + fresh_pairs)
    return (ItemSimilarity(table, rows, int(capped), generated, distinct, len(table)),
            updates, int(co.nnz), len(touched))


def fresh_lines(cells: Mapping[Tuple[str, str], Tuple[int, str]], catalog_skus,
                history_keys: frozenset) -> pd.DataFrame:
    """A window's order lines of catalogue SKUs that the history does not already hold.

    >>> fresh_lines({("O1", "A"): (0, "u"), ("O2", "A"): (0, "u"), ("O3", "Z"): (0, "u")},
    ...             ["A"], frozenset({("O1", "A")}))["order_id"].tolist()
    ['O2']
    """
    known = set(catalog_skus)
    return lines_of_cells({k: v for k, v in cells.items()
                           if k[1] in known and k not in history_keys})


def tables_at(base: HistorySources, history_lines: pd.DataFrame,
              history_as_of: Optional[pd.Timestamp], lines: pd.DataFrame, as_of: pd.Timestamp,
              config, eligible: Optional[frozenset] = None) -> WindowSources:
    """`window_tables`, or the batch build over every line for a window older than the history.

    A window that ends before the history's last line cannot start from the
    history's tables (they hold lines after its end); it is scored whole, as
    `models.streaming.window_popularity` scores its popularity (counted by the
    caller; it happens only while a backlog older than the reference data drains).
    """
    if history_as_of is None or as_of >= history_as_of:
        return window_tables(base, lines, as_of, config, eligible)
    both = pd.concat([candidates.source_lines(history_lines), candidates.source_lines(lines)],
                     ignore_index=True)
    both = (both.sort_values(["order_id", "sku", "event_time"], kind="stable")
            .drop_duplicates(["order_id", "sku"], keep="first").reset_index(drop=True))
    tables = candidates.shared_tables(both, as_of, config, eligible)
    return WindowSources(tables, len(lines), int(lines["user_id"].nunique()), 0,
                         0 if tables.similarity is None else tables.similarity.pairs_distinct,
                         len(both))
