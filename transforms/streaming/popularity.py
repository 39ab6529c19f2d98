"""Rolling segment popularity per sliding window, and the users whose ranking it changed.

`WindowedPopularity` pre-sums order lines per period, slides them into
windows and scores popularity at each window's end; `RankingChanges` compares
consecutive windows' first panes and notifies the users of every vehicle
whose default top picks moved.
"""
from __future__ import annotations

from typing import Dict, Iterable, Iterator, NamedTuple, Tuple

import apache_beam as beam
import pandas as pd
from apache_beam import typehints
from apache_beam.coders import PickleCoder
from apache_beam.transforms import trigger, window
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec
from apache_beam.utils.windowed_value import PaneInfoTiming

from models import streaming as model
from models.config import RecsConfig
from models.streaming import WindowSpec
from transforms.health import Tag, count
from transforms.streaming.reference import FileReference
from transforms.streaming.refusals import Record, RowsAndCounts
from transforms.streaming.windows import period_buckets, utc_of, windowed

OrderLines = Dict[model.OrderKey, model.OrderLine]


@typehints.with_input_types(Record)
@typehints.with_output_types(Tuple[OrderLines, int])
class OrderLinesCombineFn(beam.CombineFn):
    """A window's distinct order lines.

    Accumulator: ``(lines, events)``: ``lines`` maps (order_id, sku) to the
    earliest (event_time_us, event_id, user_id, event_name) reporting it, so
    one order under three event names is one line (as the batch job's
    `order_lines`); ``events`` counts the order events added. Merging keeps the
    earliest line per key and sums the counts, so bundles may split anywhere.
    """

    def create_accumulator(self) -> Tuple[OrderLines, int]:
        return {}, 0

    def add_input(self, acc: Tuple[OrderLines, int], record: Record) -> Tuple[OrderLines, int]:
        lines, events = acc
        model.add_order(lines, record)
        return lines, events + 1

    def merge_accumulators(self, accs: Iterable[Tuple[OrderLines, int]]
                           ) -> Tuple[OrderLines, int]:
        # The first accumulator absorbs the others (Beam lets a merge reuse its first input).
        accs = iter(accs)
        lines, events = next(accs, ({}, 0))
        for more, n in accs:
            model.merge_orders_into(lines, more)
            events += n
        return lines, events

    def extract_output(self, acc: Tuple[OrderLines, int]) -> Tuple[OrderLines, int]:
        # A copy: with accumulating panes the accumulator keeps growing after it is emitted.
        return dict(acc[0]), acc[1]

    def default_label(self) -> str:
        return "OrderLinesPerPeriod"


@typehints.with_input_types(Tuple[OrderLines, int])
@typehints.with_output_types(Tuple[OrderLines, int])
class MergeOrderLinesCombineFn(OrderLinesCombineFn):
    """Merges per-period order lines into a window's (same accumulator as `OrderLinesCombineFn`)."""

    def add_input(self, acc: Tuple[OrderLines, int], partial: Tuple[OrderLines, int]
                  ) -> Tuple[OrderLines, int]:
        lines, events = acc
        model.merge_orders_into(lines, partial[0])   # the partial itself is never modified
        return lines, events + partial[1]

    def default_label(self) -> str:
        return "OrderLinesPerWindow"


class WindowPopularity(NamedTuple):
    """Popularity of one pane of one window (``as_of`` = the window's end)."""

    window_start: pd.Timestamp
    window_end: pd.Timestamp
    timing: str          # ON_TIME or LATE (EARLY never: no early firings)
    is_first: bool       # the window's first pane (what refreshes and change detection use)
    events: int          # order events the window included so far
    lines: int           # distinct order lines among them
    popularity: pd.DataFrame


@typehints.with_input_types(Tuple[OrderLines, int])
@typehints.with_output_types(WindowPopularity)
class PopularityAtWindowEndFn(beam.DoFn):
    """A window's order lines → its segment popularity, scored at the window's end."""

    def __init__(self, reference: FileReference, config: RecsConfig):
        self._reference = reference
        self._config = config

    def process(self, acc: Tuple[OrderLines, int], win=beam.DoFn.WindowParam,
                pane=beam.DoFn.PaneInfoParam) -> Iterator:
        lines, events = acc
        end = utc_of(win.end)
        frame = model.window_popularity(model.orders_frame(lines), self._reference.current(),
                                        end, self._config)
        timing = PaneInfoTiming.to_string(pane.timing)
        yield count("popularity.panes", 1)
        if pane.timing == PaneInfoTiming.LATE:
            yield count("popularity.late_panes", 1)
        yield WindowPopularity(utc_of(win.start), end, timing, bool(pane.is_first), events,
                               len(lines), frame)


class PopularityOut(NamedTuple):
    """Every pane (sliding-windowed), the first pane of each window, and counters."""

    panes: beam.PCollection
    first_panes: beam.PCollection
    counts: beam.PCollection


class WindowedPopularity(beam.PTransform):
    """Timestamped order records → segment popularity per sliding window.

    Trigger: one pane when the watermark passes a window's end, then one per
    late element within the allowed lateness; panes accumulate, so a late
    pane restates its window whole. Refreshes use each window's first pane
    only: a late order also falls in windows that have not closed yet (the
    lateness is shorter than a window), so it reaches the next refresh anyway.
    """

    def __init__(self, spec: WindowSpec, reference: FileReference, config: RecsConfig):
        super().__init__()
        self._spec = spec
        self._reference = reference
        self._config = config

    def expand(self, orders: beam.PCollection) -> PopularityOut:
        panes = (orders
                 | "PeriodBuckets" >> period_buckets(self._spec)
                 | "OrderLinesPerPeriod" >> beam.CombineGlobally(
                     OrderLinesCombineFn()).without_defaults()
                 | "SlidingWindows" >> windowed(self._spec,
                                                trigger.AccumulationMode.ACCUMULATING)
                 | "OrderLinesPerWindow" >> beam.CombineGlobally(
                     MergeOrderLinesCombineFn()).without_defaults()
                 | "PopularityAtWindowEnd" >> beam.ParDo(
                     PopularityAtWindowEndFn(self._reference, self._config)).with_outputs(
                     Tag.COUNTS.value, main=Tag.ROWS.value))
        rows = panes[Tag.ROWS.value]
        first = rows | "FirstPaneOfWindow" >> beam.Filter(lambda p: p.is_first)
        return PopularityOut(rows, first, panes[Tag.COUNTS.value])


@typehints.with_input_types(Tuple[int, WindowPopularity])
@typehints.with_output_types(Tuple[WindowPopularity, WindowPopularity])
class PairWithPreviousFn(beam.DoFn):
    """Emits (previous window, this window) for consecutive first panes (one key, global window)."""

    PREVIOUS = ReadModifyWriteStateSpec("previous", PickleCoder())

    def process(self, element: Tuple[int, WindowPopularity],
                previous=beam.DoFn.StateParam(PREVIOUS)) -> Iterator:
        _, current = element
        before = previous.read()
        # An older window arriving after a newer one has nothing newer to compare with.
        if before is None or before.window_end < current.window_end:
            previous.write(current)
            if before is not None:
                yield window.TimestampedValue((before, current), current.window_end.timestamp())


Notice = Tuple[str, Tuple[str, object]]     # (user_id, ("notice", reason))


@typehints.with_input_types(Tuple[WindowPopularity, WindowPopularity])
@typehints.with_output_types(Notice)
class ChangedVehiclesFn(beam.DoFn):
    """Users of every vehicle whose default top picks differ between two consecutive windows."""

    def __init__(self, reference: FileReference, config: RecsConfig):
        self._reference = reference
        self._config = config

    def process(self, pair: Tuple[WindowPopularity, WindowPopularity]) -> Iterator:
        before, after = pair
        ref = self._reference.current()
        vehicles = model.changed_vehicles(
            model.scorer(ref, before.popularity, self._config),
            model.scorer(ref, after.popularity, self._config),
            before.popularity, after.popularity, ref, self._config)
        users = [u for v in vehicles for u in ref.vehicle_users[v]]
        yield count("ranking.vehicles_changed", len(vehicles))
        yield count("ranking.users_notified", len(users))
        at = after.window_end.timestamp()
        for user in users:
            yield window.TimestampedValue((user, ("notice", model.REASON_SEGMENT)), at)


class RankingChanges(beam.PTransform):
    """First panes of popularity → a notice for every user whose vehicle's ranking changed."""

    def __init__(self, reference: FileReference, config: RecsConfig):
        super().__init__()
        self._reference = reference
        self._config = config

    def expand(self, first_panes: beam.PCollection) -> RowsAndCounts:
        out = (first_panes
               | "PopularityToGlobalWindow" >> beam.WindowInto(window.GlobalWindows())
               | "OneKey" >> beam.Map(lambda p: (0, p)).with_output_types(
                   Tuple[int, WindowPopularity])
               | "PairWithPrevious" >> beam.ParDo(PairWithPreviousFn())
               | "ChangedVehicles" >> beam.ParDo(
                   ChangedVehiclesFn(self._reference, self._config)).with_outputs(
                   Tag.COUNTS.value, main=Tag.ROWS.value))
        return RowsAndCounts(out[Tag.ROWS.value], out[Tag.COUNTS.value])
