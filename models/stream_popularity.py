"""Additive, decayed popularity cells of the stream: what the streaming job combines per key.

Batch popularity (`models.popularity.partial_popularity`) is, per
(level, segment, sku), the number of distinct orders containing the SKU and
their weights 0.5 ** (age / half-life) at ``as_of``. Both are sums, so the
stream keeps them as one small cell per key instead of the order lines:

    Decayed(at_us, weight, orders)   the weight is expressed at instant ``at_us``

Two cells add by re-expressing the earlier at the later instant (every weight
shrinks by the same factor over the same time, `decay_factor`), so adding is
associative and commutative and a cell never grows with the number of orders
it counts. At a window's end the cell is re-expressed once more, at that end
(`at_window_end`): this is the batch job's weight for the same lines. An
order line that must be taken back (an earlier copy of the same line arrived
later, `LineState`) adds a cell of weight -1 and orders -1.

Nothing here imports Beam.
"""
from __future__ import annotations

from itertools import chain, compress
from operator import itemgetter
from typing import (Dict, FrozenSet, Iterable, List, Mapping, NamedTuple, Optional, Sequence,
                    Tuple, Union)

import numpy as np
import pandas as pd

from models import popularity
from models.config import RecsConfig

_MICROS_PER_DAY = 86_400 * 1_000_000

CellKey = Tuple[str, str, str]          # (level name, segment, sku)


class Decayed(NamedTuple):
    """A decayed order count at one instant.

    Attributes:
      at_us: the instant (microseconds since the epoch) the weight is expressed at;
        always the latest order time added, so re-expressing only ever decays.
      weight: sum of 0.5 ** ((at_us - order time) / half-life) over the orders.
      orders: how many distinct orders (order lines) were added (minus taken back).
    """

    at_us: int
    weight: float
    orders: int


EMPTY = Decayed(0, 0.0, 0)


def decay_factor(from_us: int, to_us: int, half_life_days: float) -> float:
    """0.5 ** (days from ``from_us`` to ``to_us`` / half-life): how a weight shrinks meanwhile.

    >>> decay_factor(0, 30 * 86_400 * 1_000_000, 30.0)
    0.5
    """
    # Plain float power: this runs once per cell and window, where numpy's scalar call costs ~10x.
    return 0.5 ** ((to_us - from_us) / _MICROS_PER_DAY / half_life_days)


def add(a: Decayed, b: Decayed, half_life_days: float) -> Decayed:
    """The sum of two cells, expressed at the later instant (associative and commutative).

    >>> day = 86_400 * 1_000_000
    >>> add(Decayed(0, 1.0, 1), Decayed(30 * day, 1.0, 1), 30.0)
    Decayed(at_us=2592000000000, weight=1.5, orders=2)
    >>> add(EMPTY, Decayed(5, 1.0, 1), 30.0) == Decayed(5, 1.0, 1)
    True
    """
    if not a.orders and not a.weight:
        return b
    if not b.orders and not b.weight:
        return a
    if a.at_us < b.at_us:
        a, b = b, a
    return Decayed(a.at_us, a.weight + b.weight * decay_factor(b.at_us, a.at_us, half_life_days),
                   a.orders + b.orders)


def add_all(cells: Iterable[Decayed], half_life_days: float) -> Decayed:
    """The sum of any number of cells (`add` folded)."""
    total = EMPTY
    for cell in cells:
        total = add(total, cell, half_life_days)
    return total


def at_window_end(cell: Decayed, end_us: int, half_life_days: float) -> float:
    """A cell's weight at a window's end: the batch job's weight of the same orders at ``as_of``."""
    return cell.weight * decay_factor(cell.at_us, end_us, half_life_days)


def one_order(at_us: int, sign: int = 1) -> Decayed:
    """The cell of one order line (``sign`` -1 takes one back)."""
    return Decayed(int(at_us), float(sign), int(sign))


# --- the buyer's segment, attached at ingest --------------------------------------------------

def segments_by_user(users: pd.DataFrame, config: RecsConfig) -> Dict[str, Tuple[Tuple[str, str],
                                                                               ...]]:
    """(level name, segment) of every level where a user's attributes are complete.

    The same user row `profiles.orders_with_segments` joins (a non-duplicate
    row first), so a stream order lands in the batch job's segments. A buyer
    missing from ``users`` is absent here and counts at the levels without
    attributes (the global level) only, as in batch.
    """
    profile = users.sort_values("is_duplicate", kind="stable").drop_duplicates("user_id")
    keys = [(config.level_name(level), popularity.segment_keys(profile, level).to_numpy(object))
            for level in config.levels]
    ids = profile["user_id"].to_numpy(object)
    return {user: tuple((name, k[i]) for name, k in keys if k[i] is not None)
            for i, user in enumerate(ids)}


def global_levels(config: RecsConfig) -> Tuple[Tuple[str, str], ...]:
    """The levels an unknown buyer counts at: those without attributes (segment "")."""
    return tuple((config.level_name(level), "") for level in config.levels if not level)


def line_cells(user_segments: Optional[Sequence[Tuple[str, str]]], sku: str, at_us: int,
               sign: int, config: RecsConfig) -> List[Tuple[CellKey, Decayed]]:
    """The keyed cells one order line adds: one per level its buyer has a segment at."""
    levels = user_segments if user_segments is not None else global_levels(config)
    cell = one_order(at_us, sign)
    return [((level, segment, sku), cell) for level, segment in levels]


# --- a window's popularity from its cells ------------------------------------------------------

class CellBlock(NamedTuple):
    """Cells as columns: what a period's and a window's sums travel as between steps.

    One row per (level, segment, sku) key (unique when made by `block_of` or
    `merge_blocks`), with ``weight`` expressed at ``at_us`` as in `Decayed`.
    Columns pickle as a few arrays and one tuple of keys, where a map of
    `Decayed` pickles (and is rebuilt) object by object, and the window end's
    arithmetic runs on whole columns.
    """

    keys: Tuple[CellKey, ...]
    at_us: np.ndarray        # int64
    weight: np.ndarray       # float64
    orders: np.ndarray       # int64


EMPTY_BLOCK = CellBlock((), np.zeros(0, np.int64), np.zeros(0, float), np.zeros(0, np.int64))

Cells = Union[CellBlock, Mapping[CellKey, Decayed], Iterable[Tuple[CellKey, Decayed]]]


def block_of(cells: Cells) -> CellBlock:
    """Cells (a block, a map of cells, or (key, cell) pairs, kept row by row) as a `CellBlock`."""
    if isinstance(cells, CellBlock):
        return cells
    if isinstance(cells, Mapping):
        keys, values = tuple(cells), list(cells.values())
    else:
        pairs = list(cells)
        keys, values = tuple(map(itemgetter(0), pairs)), list(map(itemgetter(1), pairs))
    if not keys:
        return EMPTY_BLOCK
    n = len(keys)
    return CellBlock(keys, np.fromiter(map(itemgetter(0), values), np.int64, n),
                     np.fromiter(map(itemgetter(1), values), float, n),
                     np.fromiter(map(itemgetter(2), values), np.int64, n))


def merge_blocks(blocks: Iterable[CellBlock], half_life_days: float) -> CellBlock:
    """The per-key sum of blocks, each key's weight at its latest instant (as `add` folds it).

    Every weight is decayed straight to its key's latest instant: the same
    sum as adding cells pairwise in any order (`add`), to rounding.

    >>> day = 86_400 * 1_000_000
    >>> a = block_of([(("g", "", "S1"), Decayed(0, 1.0, 1))])
    >>> b = block_of([(("g", "", "S1"), Decayed(30 * day, 1.0, 1)),
    ...               (("g", "", "S2"), Decayed(day, 1.0, 1))])
    >>> m = merge_blocks([a, b], 30.0)
    >>> m.keys, m.weight.tolist(), m.orders.tolist()
    ((('g', '', 'S1'), ('g', '', 'S2')), [1.5, 1.0], [2, 1])
    """
    blocks = [b for b in blocks if len(b.keys)]
    if len(blocks) <= 1:
        return blocks[0] if blocks else EMPTY_BLOCK
    index: Dict[CellKey, int] = {}
    keys = list(chain.from_iterable(b.keys for b in blocks))
    codes = np.fromiter((index.setdefault(k, len(index)) for k in keys), np.int64, len(keys))
    at = np.concatenate([b.at_us for b in blocks])
    latest = np.full(len(index), np.iinfo(np.int64).min, np.int64)
    np.maximum.at(latest, codes, at)
    factor = np.power(0.5, (latest[codes] - at) / _MICROS_PER_DAY / half_life_days)
    weight = np.bincount(codes, np.concatenate([b.weight for b in blocks]) * factor,
                         minlength=len(index))
    orders = np.bincount(codes, np.concatenate([b.orders for b in blocks]).astype(float),
                         minlength=len(index))
    return CellBlock(tuple(index), latest, weight, orders.round().astype(np.int64))


def key_columns(block: CellBlock) -> Tuple[List[str], List[str], List[str]]:
    """The level, segment and sku of every row of a block.

    Lists, not object arrays: pandas turns a list of str into its string
    column about ten times faster than an object array (measured, pandas 3.1).
    Built with ``itemgetter``, which allocates no object per row: ``zip(*keys)``
    allocates one iterator per row, and with a worker's reference data in
    memory the garbage collector's full passes it triggers cost ~10x the
    work itself (measured: 24 ms against 1.4 ms for 22,000 keys).
    """
    return tuple(list(map(itemgetter(i), block.keys)) for i in range(3))


def _with_orders(block: CellBlock, *columns: Sequence) -> List[Sequence]:
    """Each column restricted to the rows holding at least one order."""
    kept = block.orders > 0
    if kept.all():
        return list(columns)
    mask = kept.tolist()
    return [list(compress(column, mask)) for column in columns]


def _cell_rows(cells: Cells, end_us: int, half_life_days: float) -> pd.DataFrame:
    """A window's cells with orders as popularity rows at its end, not yet summed per key."""
    block = block_of(cells)
    kept = block.orders > 0
    level, segment, sku = _with_orders(block, *key_columns(block))
    return pd.DataFrame({
        "level": level, "segment": segment, "sku": sku,
        "weight": block.weight[kept] * np.power(
            0.5, (end_us - block.at_us[kept]) / _MICROS_PER_DAY / half_life_days),
        "orders": block.orders[kept]},
        columns=list(popularity.POPULARITY_COLUMNS))


def cells_frame(cells: Cells, end_us: int, half_life_days: float) -> pd.DataFrame:
    """A window's cells as a popularity frame at its end (cells netting to no order dropped).

    The columns and order are `models.popularity.merge_popularity`'s.
    """
    return popularity.merge_popularity([_cell_rows(cells, end_us, half_life_days)])


def stream_lines(block: CellBlock, config: RecsConfig) -> int:
    """Distinct stream order lines a window's cells count: the global level's orders."""
    level = key_columns(block)[0]
    return max((int(block.orders[np.fromiter(map(name.__eq__, level), bool, len(level))].sum())
                for name, _ in global_levels(config)), default=0)


def segments_with_orders(block: CellBlock) -> FrozenSet[Tuple[str, str]]:
    """(level, segment) pairs holding at least one order in a window's cells."""
    level, segment, _ = key_columns(block)
    level, segment = _with_orders(block, level, segment)
    pairs = set()
    for name in set(level):      # a few levels; no tuple per row (see `key_columns`)
        pairs.update((name, seg) for seg in set(compress(segment, map(name.__eq__, level))))
    return frozenset(pairs)


class LineState(NamedTuple):
    """What the stream keeps per order line (order_id, sku) until its TTL: the line counted."""

    at_us: int
    event_id: str
    user_id: str


def line_update(kept: Optional[LineState], arriving: LineState
                ) -> Tuple[Optional[LineState], List[Tuple[LineState, int]]]:
    """The state after a copy of an order line arrives, and the lines to add (+1) or take back (-1).

    The first copy counts; a later copy counts only when it is earlier (time,
    then event id), which takes the first back: the line then counts at its
    earliest event, as the batch job's `order_lines` has it, whatever the
    arrival order.

    >>> first, earlier = LineState(5, "E2", "U"), LineState(3, "E1", "U")
    >>> line_update(None, first)
    (LineState(at_us=5, event_id='E2', user_id='U'), [(LineState(at_us=5, event_id='E2', user_id='U'), 1)])
    >>> line_update(first, earlier)[1]
    [(LineState(at_us=5, event_id='E2', user_id='U'), -1), (LineState(at_us=3, event_id='E1', user_id='U'), 1)]
    >>> line_update(earlier, first)
    (LineState(at_us=3, event_id='E1', user_id='U'), [])
    """
    if kept is None:
        return arriving, [(arriving, 1)]
    if (arriving.at_us, arriving.event_id) < (kept.at_us, kept.event_id):
        return arriving, [(kept, -1), (arriving, 1)]
    return kept, []


def history_popularity_at(reference, as_of: pd.Timestamp, config: RecsConfig) -> pd.DataFrame:
    """The history's popularity at a window's end (``reference``: `models.streaming.ReferenceData`).

    Re-expressed from the once-computed frame when the window ends after the
    history (the usual case: one multiplication); a window ending before the
    history's last order is scored from the history's lines, as batch would.
    """
    from models.streaming import rescale   # models.streaming imports nothing from here
    if not len(reference.history_lines):
        return popularity.merge_popularity([])
    if as_of < reference.history_as_of:
        return popularity.partial_popularity(reference.history_lines, as_of, config)
    return rescale(reference.history_popularity, reference.history_as_of, as_of,
                   config.scoring.half_life_days)


def window_popularity(cells: Cells, reference, end_us: int,
                      config: RecsConfig) -> pd.DataFrame:
    """A window's popularity at its end: the history's plus the stream's cells (batch's numbers).

    Stream cells never hold a line the history holds (`SegmentWeights` skips
    those at ingest), so the two add like two partials (`merge_popularity`).
    """
    as_of = pd.Timestamp(end_us, unit="us", tz="UTC")
    # One sum per key over the history's rows and the cells' (summing the cells first
    # would group them twice).
    stream = _cell_rows(cells, end_us, config.scoring.half_life_days)
    return popularity.merge_popularity([history_popularity_at(reference, as_of, config), stream])


# --- which vehicles a window's stream can re-rank ----------------------------------------------

def vehicles_by_segment(vehicles: Iterable[str], config: RecsConfig
                        ) -> Dict[Tuple[str, str], Tuple[str, ...]]:
    """(level name, segment) of the two most specific levels → the vehicles under it.

    A vehicle key joins the group attributes with `popularity.KEY_SEPARATOR`
    (`ReferenceData.vehicle_users`). Changes at coarser levels alone move
    every vehicle a little and almost never reorder one, so only these two
    levels decide which vehicles are re-ranked.

    >>> from models.config import DEFAULT_CONFIG
    >>> sorted(vehicles_by_segment(["Ford|Mustang|2015"], DEFAULT_CONFIG).items())[0]
    (('make+model', 'Ford|Mustang'), ('Ford|Mustang|2015',))
    """
    group = list(config.group_attributes)
    out: Dict[Tuple[str, str], List[str]] = {}
    for vehicle in vehicles:
        named = dict(zip(group, vehicle.split(popularity.KEY_SEPARATOR)))
        for level in config.levels[:2]:
            key = popularity.KEY_SEPARATOR.join(named[a] for a in level) if level else ""
            out.setdefault((config.level_name(level), key), []).append(vehicle)
    return {k: tuple(sorted(v)) for k, v in out.items()}


def changed_segments(previous: pd.DataFrame, current: pd.DataFrame,
                     levels: Sequence[str]) -> FrozenSet[Tuple[str, str]]:
    """(level, segment) pairs whose distinct-order counts differ between two popularity frames.

    Decay alone never reorders a segment (every weight shrinks by the same
    factor); only orders entering or leaving the window can, so only these
    segments' vehicles need re-ranking between two consecutive windows.
    """
    def counts(frame: pd.DataFrame) -> pd.Series:
        rows = frame.loc[frame["level"].isin(list(levels)), ["level", "segment", "sku", "orders"]]
        return rows.set_index(["level", "segment", "sku"])["orders"]
    a, b = counts(previous), counts(current)
    both = a.index.union(b.index)
    diff = a.reindex(both, fill_value=0).to_numpy() != b.reindex(both, fill_value=0).to_numpy()
    return frozenset((level, segment) for level, segment, _ in both[diff])
