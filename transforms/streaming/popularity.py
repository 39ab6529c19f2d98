"""Rolling segment popularity per sliding window (ranking changes: `transforms.streaming.ranking`).

`WindowedPopularity` keeps additive state only: each order line is counted
once (keyed state per (order_id, sku), expired by a timer), turned into one
decayed cell per (level, segment, sku) with the buyer's segment attached at
ingest, summed per key per period (`CombinePerKey`), slid into the windows,
summed per key per window, and re-expressed at the window's end, where the
history's popularity is added. Each window's first pane feeds the refreshes
and `transforms.streaming.ranking.RankingChanges`.

State and accumulators, and what bounds them (docs/streaming.md):

- ``FirstOrderLine``: one (time, event id, user) per order line, removed by an
  event-time timer ``size + lateness`` after the line: bounded by the order
  rate over a window, never by the stream's total (per order line on Dataflow,
  per bucket of them on the local runner: `statekeys`).
- ``SumPerPeriod`` (Dataflow and every runner but the local one:
  `statekeys.sums_per_cell_for`): one `Decayed` (an int, a float, an int) per
  (level, segment, sku) key and period: bounded by the catalogue times the
  segments, whatever the volume. The local runner has no such step.
- ``CellsPerPeriod``: per period, one `Decayed` per key it holds: bounded by
  the same key count; emitted as one `CellBlock` (columns).
- ``CellsPerWindow``: per window, its periods' blocks, summed per key when
  the pane is emitted and compacted into one block as soon as the rows beyond
  the first block outnumber it (`MergeCellsFn`): about twice the window's keys,
  bounded by the key count, never by the orders.
"""
from __future__ import annotations

from typing import Dict, FrozenSet, Iterable, Iterator, List, NamedTuple, Optional, Tuple

import apache_beam as beam
import pandas as pd
from apache_beam import typehints
from apache_beam.coders import PickleCoder
from apache_beam.transforms import trigger, window
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import PaneInfoTiming

from models import expiring_entries as entries_of
from models import stream_popularity as cells
from models.config import RecsConfig
from models.stream_popularity import CellBlock, CellKey, Decayed, LineState
from models.streaming import WindowSpec
from transforms.health import Tag, count
from transforms.signatures import CachedSignatures, FilterFn, MapFn, WindowInto
from transforms.streaming.reference import (FileReference, cached, into_version_windows,
                                            version_side_input)
from transforms.streaming.refusals import Record
from transforms.streaming.statekeys import (NATURAL, StateKeys, expire_held, state_keys_of,
                                            sums_per_cell_of)
from transforms.streaming.windows import MICROS, duration_of, period_buckets, utc_of, windowed

OrderLineKey = Tuple[str, str]                      # (order_id, sku)
CountedLine = Tuple[str, str, LineState, int]       # (order_id, sku, line, +1 / -1)
Cell = Tuple[CellKey, Decayed]


def order_line_key(record: Record, keys: StateKeys = NATURAL
                   ) -> Tuple[OrderLineKey, Tuple[OrderLineKey, Record]]:
    """An order record keyed for `FirstOrderLineFn`: ``(state key, ((order_id, sku), record))``.

    The contract makes order_id required here; the state key is the line on
    Dataflow and a bucket of it on the local runner (`statekeys`).
    """
    line = (record["order_id"], record["sku"])
    return keys.key_of(line), (line, record)


@typehints.with_input_types(Tuple[OrderLineKey, Tuple[OrderLineKey, Record]])
@typehints.with_output_types(CountedLine)
class FirstOrderLineFn(CachedSignatures, beam.DoFn):
    """Counts each order line (order_id, sku) once, at its earliest event, in keyed state.

    One order is reported under up to three event names (SPEC §2): the first
    copy counts (+1); a later copy that is earlier in event time takes it back
    (-1, at the first copy's time) and counts itself (+1), so the line ends up
    where the batch job's `order_lines` puts it whatever the arrival order.
    State per key: each line's `LineState` with its expiry, the first copy's
    time + window size + allowed lateness (the last moment any window holding
    it can still change; a copy after that could only be too late), in a
    `models.expiring_entries.Expiring`, and one event-time timer at the
    earliest expiry (rounded up to the key's grid) that removes every line
    due by then. A natural key (Dataflow) holds one line; a bucket (the local
    runner) the lines of ``order rate x (size + lateness + grid) / buckets``.
    """

    LINES = ReadModifyWriteStateSpec("lines", PickleCoder())
    EXPIRY = TimerSpec("expiry", TimeDomain.WATERMARK)

    def __init__(self, spec: WindowSpec, keys: StateKeys = NATURAL):
        self.keys = keys
        self._ttl_us = duration_of(spec.size + spec.lateness).micros
        self._grid_us = keys.grid_us(self._ttl_us)

    def process(self, element: Tuple[OrderLineKey, Tuple[OrderLineKey, Record]],
                timestamp=beam.DoFn.TimestampParam,
                lines=beam.DoFn.StateParam(LINES),
                expiry=beam.DoFn.TimerParam(EXPIRY)) -> Iterator:
        _, ((order_id, sku), record) = element
        held = lines.read()
        kept = entries_of.get(held, (order_id, sku))
        arriving = LineState(int(record["event_time_us"]), str(record["event_id"]),
                             str(record["user_id"]))
        state, changes = cells.line_update(kept, arriving)
        if not changes:
            yield count("popularity.order_lines.repeated", 1)
            return
        if kept is None:
            held, timer = entries_of.admit(held, (order_id, sku), state,
                                           timestamp.micros + self._ttl_us, self._grid_us)
            if timer is not None:
                expiry.set(Timestamp(micros=timer))
        else:
            held = entries_of.restate(held, (order_id, sku), state)
            yield count("popularity.order_lines.restated", 1)
        lines.write(held)
        for counted, sign in changes:
            yield window.TimestampedValue((order_id, sku, counted, sign), counted.at_us / MICROS)

    @on_timer(EXPIRY)
    def expire(self, fired=beam.DoFn.TimestampParam, lines=beam.DoFn.StateParam(LINES),
               expiry=beam.DoFn.TimerParam(EXPIRY)) -> None:
        expire_held(lines, expiry, fired.micros, self._grid_us)


@typehints.with_input_types(CountedLine)
@typehints.with_output_types(Cell)
class SegmentWeightsFn(CachedSignatures, beam.DoFn):
    """An order line → one decayed cell per level of its buyer's segment (attached at ingest).

    The segment is the buyer's in the reference users at the time the line
    arrives (the batch job joins today's users; a buyer who changes vehicle
    keeps past orders where they were made). A line the history already holds
    is skipped: the history counts it. ``reference_version`` is the version side
    input where the job has one (the line in the versions' window of its time);
    None polls.
    """

    def __init__(self, reference: FileReference, config: RecsConfig):
        self._reference = reference
        self._config = config

    def process(self, element: CountedLine, reference_version=None) -> Iterator:
        order_id, sku, line, sign = element
        ref = self._reference.current(reference_version)
        if (order_id, sku) in ref.history_keys:
            if sign > 0:
                yield count("popularity.order_lines.in_history", 1)
            return
        segments = cached(self._reference.key + ":segments", ref.version,
                          lambda: cells.segments_by_user(ref.users, self._config))
        yield count("popularity.order_lines", sign)
        yield from cells.line_cells(segments.get(line.user_id), sku, line.at_us, sign,
                                    self._config)


@typehints.with_input_types(Decayed)
@typehints.with_output_types(Decayed)
class DecayedCountFn(beam.CombineFn):
    """Sums decayed order counts of one (level, segment, sku) key.

    Accumulator: ``Decayed(at_us, weight, orders)``, three numbers whatever
    the volume: the weight is held at the latest order time added and older
    weights are decayed to it on merge (`models.stream_popularity.add`:
    associative and commutative, so bundles may split and merge anywhere).
    The inputs are cells too, so the same CombineFn sums order lines per
    period and period partials per window.
    """

    def __init__(self, half_life_days: float, label: str = "SumDecayedCounts"):
        self._half_life = half_life_days
        self._label = label

    def create_accumulator(self) -> Decayed:
        return cells.EMPTY

    def add_input(self, acc: Decayed, cell: Decayed) -> Decayed:
        return cells.add(acc, cell, self._half_life)

    def merge_accumulators(self, accs: Iterable[Decayed]) -> Decayed:
        return cells.add_all(accs, self._half_life)

    def extract_output(self, acc: Decayed) -> Decayed:
        return acc

    def default_label(self) -> str:
        return self._label


WindowCells = Dict[CellKey, Decayed]


@typehints.with_input_types(Cell)
@typehints.with_output_types(CellBlock)
class WindowCellsFn(beam.CombineFn):
    """Per-key period sums → one block of decayed cells per (level, segment, sku) key.

    Accumulator: ``{(level, segment, sku): Decayed}``, one `Decayed` (three
    numbers) per key the period holds: bounded by the catalogue times the
    segments, never by the number of orders (a period arrives summed per key
    by ``SumPerPeriod``, or, on the local runner, as its cells, which add into
    the map as they come). Merging adds cells key by key
    (`models.stream_popularity.add`: associative and commutative). The output
    is the map as columns (`models.stream_popularity.CellBlock`), which is what
    slides into the windows.
    """

    def __init__(self, half_life_days: float):
        self._half_life = half_life_days

    def create_accumulator(self) -> WindowCells:
        return {}

    def add_input(self, acc: WindowCells, cell: Cell) -> WindowCells:
        key, value = cell
        acc[key] = cells.add(acc.get(key, cells.EMPTY), value, self._half_life)
        return acc

    def merge_accumulators(self, accs: Iterable[WindowCells]) -> WindowCells:
        accs = iter(accs)
        merged = next(accs, {})      # Beam lets a merge reuse its first input
        for more in accs:
            for key, value in more.items():
                merged[key] = cells.add(merged.get(key, cells.EMPTY), value, self._half_life)
        return merged

    def extract_output(self, acc: WindowCells) -> CellBlock:
        # New arrays: with accumulating panes the accumulator lives on after it is emitted.
        return cells.block_of(acc)

    def default_label(self) -> str:
        return "CellCounts"


@typehints.with_input_types(CellBlock)
@typehints.with_output_types(CellBlock)
class MergeCellsFn(beam.CombineFn):
    """Period blocks → a window's block, summed per key once, when the window is emitted.

    Each period's block lies in ``size / period`` windows; adding it is
    appending it (no per-cell work per window), and the per-key sum runs on
    whole columns (`models.stream_popularity.merge_blocks`) when the pane is
    emitted, or earlier to bound the accumulator.
    Accumulator: the window's period blocks, compacted into one block (summed
    per key) as soon as the rows held beyond the first block outnumber the
    first block's rows and `COMPACT_ROWS`, or `COMPACT_AT` blocks gather. So
    it holds at most about twice the window's distinct keys plus
    `COMPACT_ROWS` and one period's block (each row is summed about twice on
    average), bounded by the key count, never by the orders; without the
    rule a window would hold each key once per period it appears in (up to
    ``size / period`` times).
    """

    COMPACT_AT = 512
    COMPACT_ROWS = 10_000

    def __init__(self, half_life_days: float):
        self._half_life = half_life_days

    def create_accumulator(self) -> List[CellBlock]:
        return []

    def add_input(self, acc: List[CellBlock], block: CellBlock) -> List[CellBlock]:
        acc.append(block)            # blocks are never modified, so sharing one is safe
        return self._bounded(acc)

    def merge_accumulators(self, accs: Iterable[List[CellBlock]]) -> List[CellBlock]:
        return self._bounded([block for acc in accs for block in acc])

    def extract_output(self, acc: List[CellBlock]) -> CellBlock:
        return cells.merge_blocks(acc, self._half_life)

    def _bounded(self, acc: List[CellBlock]) -> List[CellBlock]:
        if len(acc) < 2:
            return acc
        beyond_first = sum(len(block.keys) for block in acc[1:])
        if (len(acc) > self.COMPACT_AT
                or beyond_first > max(len(acc[0].keys), self.COMPACT_ROWS)):
            return [cells.merge_blocks(acc, self._half_life)]
        return acc

    def default_label(self) -> str:
        return "CellCounts"


class WindowPopularity(NamedTuple):
    """Popularity of one window's first pane (``window_end`` = the window's end = ``as_of``)."""

    window_start: pd.Timestamp
    window_end: pd.Timestamp
    timing: str          # ON_TIME (late panes are counted, not computed)
    is_first: bool       # always True: only the first pane is scored
    cells: int           # (level, segment, sku) cells the stream holds in the window
    lines: int           # distinct stream order lines in the window (the global level's count)
    popularity: pd.DataFrame
    segments: FrozenSet[Tuple[str, str]] = frozenset()   # (level, segment) with stream orders


@typehints.with_input_types(CellBlock)
@typehints.with_output_types(WindowPopularity)
class PopularityAtWindowEndFn(CachedSignatures, beam.DoFn):
    """A window's cells → its segment popularity at the window's end, plus the history's.

    Only the first pane is scored: refreshes and change detection use it, and a
    late order also falls in the windows that have not closed yet (the lateness
    is shorter than a window), so it reaches the next refresh anyway. A late
    pane is counted with the cells it restates (`LateDataAudit` counts its
    elements), never scored and thrown away. The cells arrive as columns
    (`CellBlock`), so the window's arithmetic runs on arrays, not per cell.
    ``reference_version`` is the version side input where the job has one (that
    of the interval the sliding window ends in); None polls.
    """

    def __init__(self, reference: FileReference, config: RecsConfig):
        self._reference = reference
        self._config = config

    def process(self, block: CellBlock, win=beam.DoFn.WindowParam,
                pane=beam.DoFn.PaneInfoParam, reference_version=None) -> Iterator:
        if not pane.is_first:
            yield count("popularity.late_panes", 1)
            yield count("popularity.late_cells", len(block.keys))
            return
        end = utc_of(win.end)
        frame = cells.window_popularity(block, self._reference.current(reference_version),
                                        win.end.micros, self._config)
        yield count("popularity.panes", 1)
        yield count("popularity.cells", len(block.keys))
        yield WindowPopularity(utc_of(win.start), end, PaneInfoTiming.to_string(pane.timing),
                               True, len(block.keys), cells.stream_lines(block, self._config),
                               frame, cells.segments_with_orders(block))


class PopularityOut(NamedTuple):
    """The scored first pane of each window (sliding-windowed, twice for old callers), counters."""

    panes: beam.PCollection
    first_panes: beam.PCollection
    counts: beam.PCollection


class WindowedPopularity(beam.PTransform):
    """Timestamped order records → segment popularity per sliding window, from additive cells.

    Trigger: one pane when the watermark passes a window's end, then one per
    late element within the allowed lateness; panes accumulate per key. The
    first pane is scored at the window's end; late panes are counted.
    ``SumPerPeriod`` sums each period per (level, segment, sku) key before
    ``CellsPerPeriod`` gathers it on Dataflow; on the local runner the cells go
    straight into ``CellsPerPeriod`` (`statekeys.sums_per_cell_for`; the same
    popularity, without a key per cell that runner would keep for ever).
    ``sums_per_cell`` overrides the runner's choice (tests compare both graphs).
    With ``versions`` (`ReferenceVersions`, the job's side input on Dataflow)
    ``SegmentWeights`` and ``PopularityAtWindowEnd`` read the reference data of
    the version checked for the interval of the line's time / the window's end;
    without, each worker polls.
    """

    def __init__(self, spec: WindowSpec, reference: FileReference, config: RecsConfig,
                 versions: Optional[beam.PCollection] = None,
                 sums_per_cell: Optional[bool] = None):
        super().__init__()
        self._spec = spec
        self._reference = reference
        self._config = config
        self._versions = versions
        self._per_cell = sums_per_cell

    def _sums_per_cell(self, pipeline: beam.Pipeline) -> bool:
        """`SumPerPeriod` per cell key or not: the runner's choice (`statekeys`) unless given."""
        return sums_per_cell_of(pipeline) if self._per_cell is None else self._per_cell

    def expand(self, orders: beam.PCollection) -> PopularityOut:
        half_life = self._config.scoring.half_life_days
        keys = state_keys_of(orders.pipeline)   # order lines, or buckets of them locally
        lines = (orders
                 | "KeyByOrderLine" >> beam.ParDo(MapFn(order_line_key), keys).with_output_types(
                     Tuple[OrderLineKey, Tuple[OrderLineKey, Record]])
                 | "FirstOrderLine" >> beam.ParDo(FirstOrderLineFn(self._spec, keys)).with_outputs(
                     Tag.COUNTS.value, main=Tag.ROWS.value))
        counted = lines[Tag.ROWS.value]
        if self._versions is not None:   # lines read the version of their time's interval
            counted = into_version_windows(self._reference, "IntoReferenceWindows", counted)
        weights = (counted
                   | "SegmentWeights" >> beam.ParDo(
                       SegmentWeightsFn(self._reference, self._config),
                       **version_side_input(self._versions)).with_outputs(
                       Tag.COUNTS.value, main=Tag.ROWS.value))
        weight_counts = weights[Tag.COUNTS.value]
        if self._versions is not None:
            weight_counts = weight_counts | "WeightCountsToGlobalWindow" >> WindowInto(
                window.GlobalWindows())
        period_cells = weights[Tag.ROWS.value] | "PeriodBuckets" >> period_buckets(self._spec)
        if self._sums_per_cell(orders.pipeline):   # Dataflow: per cell key, over workers
            period_cells = period_cells | "SumPerPeriod" >> beam.CombinePerKey(
                DecayedCountFn(half_life, "SumPerPeriod")).with_output_types(Cell)
        panes = (period_cells
                 | "CellsPerPeriod" >> beam.CombineGlobally(
                     WindowCellsFn(half_life)).without_defaults()
                 | "SlidingWindows" >> windowed(self._spec,
                                                trigger.AccumulationMode.ACCUMULATING)
                 | "CellsPerWindow" >> beam.CombineGlobally(
                     MergeCellsFn(half_life)).without_defaults()
                 | "PopularityAtWindowEnd" >> beam.ParDo(
                     PopularityAtWindowEndFn(self._reference, self._config),
                     **version_side_input(self._versions)).with_outputs(
                     Tag.COUNTS.value, main=Tag.ROWS.value))
        counts = ((lines[Tag.COUNTS.value], weight_counts)
                  | "FlattenLineCounts" >> beam.Flatten()
                  | "LineCountsToGlobalWindow" >> WindowInto(window.GlobalWindows()))
        pane_counts = panes[Tag.COUNTS.value] | "PaneCountsToGlobalWindow" >> WindowInto(
            window.GlobalWindows())
        rows = panes[Tag.ROWS.value]
        # A step of its own: the DirectRunner's side-input view of a multi-output ParDo's main
        # output also holds the ParDo's tagged outputs (Beam 2.77), and refreshes read this one.
        first = rows | "FirstPaneOfWindow" >> beam.ParDo(FilterFn(lambda p: p.is_first))
        return PopularityOut(rows, first, (counts, pane_counts)
                             | "FlattenPopularityCounts" >> beam.Flatten())
