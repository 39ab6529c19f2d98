"""Ranking changes: the vehicles whose default picks moved between consecutive windows.

`RankingChanges` takes the first popularity pane of each window
(`transforms.streaming.popularity.WindowedPopularity`), pairs it with the
pane of the window before by grouping on the window end (no state carried
from window to window, no single key), re-ranks the vehicles whose own
segments changed between the two, and notifies the vehicle's users when a
newer window shows them other products, at most once per interval
(`models.ranking_notices`).

What each step holds, and what bounds it (docs/streaming.md):

- ``PairWithNextWindow``: each pane twice, as ``this`` under its own window
  end and as ``previous`` under the next one; stateless.
- ``PairPerWindowEnd``: a GroupByKey per window end in fixed windows of one
  period: per key at most two panes (this window's and the one before),
  i.e. two popularity frames of one row per (level, segment, sku) cell:
  bounded by the catalogue times the segments, never by the order volume;
  each key lives for one period (plus the allowed lateness).
- ``VehiclePicks``: no state; per window end it ranks the vehicles whose
  own segments changed (at most the vehicle count, ~1,100 in the field)
  under both frames. Consecutive windows are different keys, so they rank
  in parallel on any worker.
- ``PicksChanged``: per vehicle, the picks its users were last told about, when,
  and the newest window's picks (`models.ranking_notices.NoticeState`), plus one
  re-check timer.
"""
from __future__ import annotations

from typing import Iterable, Iterator, Optional, Tuple

import apache_beam as beam
from apache_beam import typehints
from apache_beam.coders import PickleCoder
from apache_beam.transforms import trigger, window
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.utils.timestamp import Timestamp

from models import ranking_notices as notice_rule
from models import stream_popularity as cells
from models import streaming as model
from models.config import RankingNoticesConfig, RecsConfig
from models.streaming import WindowSpec
from transforms.health import Tag, count
from transforms.signatures import CachedSignatures, WindowInto
from transforms.streaming.popularity import WindowPopularity
from transforms.streaming.reference import (Reference, cached, into_version_windows,
                                            version_side_input)
from transforms.streaming.refusals import RowsAndCounts
from transforms.streaming.windows import duration_of, seconds_of, to_global_window

Picks = Tuple[str, ...]         # (source, rec_part_1, ...)
# (vehicle, (window end us, picks in this window, picks in the previous window))
VehiclePicks = Tuple[str, Tuple[int, Picks, Optional[Picks]]]
# (window end us, (role, pane)): a pane as this window's or as the previous window's
PairEntry = Tuple[int, Tuple[str, WindowPopularity]]


def end_us_of(pane: WindowPopularity) -> int:
    """A pane's window end in microseconds since the epoch."""
    return int(pane.window_end.value // 1_000)


@typehints.with_input_types(WindowPopularity)
@typehints.with_output_types(PairEntry)
class PairWithNextWindowFn(CachedSignatures, beam.DoFn):
    """A window's first pane → itself under its window end, and again under the next window's.

    Each copy is stamped inside the fixed window of one period that ends at
    its key (``end - 1 µs``: the pane's own timestamp, and one period later),
    so the GroupByKey after it brings a window together with the one before
    in one group per window end (`models.ranking_notices.pair_keys`). The copy
    stamped later never holds the watermark back: it is ahead of it.
    """

    def __init__(self, period_us: int):
        self._period_us = period_us

    def process(self, pane: WindowPopularity) -> Iterator:
        for end_us, role in notice_rule.pair_keys(end_us_of(pane), self._period_us):
            yield window.TimestampedValue((end_us, (role, pane)), Timestamp(micros=end_us - 1))


@typehints.with_input_types(Tuple[int, Iterable[Tuple[str, WindowPopularity]]])
@typehints.with_output_types(VehiclePicks)
class VehiclePicksFn(CachedSignatures, beam.DoFn):
    """Two consecutive windows (one group per window end) → each re-ranked vehicle's picks in both.

    Re-ranked are the vehicles whose own segments (the two most specific
    levels) gained or lost orders between the previous window and this one
    (`models.stream_popularity.changed_segments`): a change at the make or
    global level alone moves every vehicle a little and almost never reorders
    one, and decay alone never does. Each is ranked with the previous window's
    popularity and with this one's, so a notice means the list a user would get
    changed between two consecutive windows, never that it differs from some
    older ranking. When the previous window held no stream orders (no pane
    was emitted for it), its popularity is the history's alone at its end. A
    group without this window's pane (this window held no stream orders, so
    no pane exists for it) ranks nothing, as before the pairs: the next window
    with orders is compared with the history alone.

    No state: each group holds at most two panes, and both windows are ranked
    here (the previous window's picks are not kept from the group before;
    bench/streaming_ranking.py measures what ranking them again costs). A late
    pane re-fires its group; vehicles compared there before are then stale for
    `PicksChangedFn`, which ignores them.

    ``reference_version`` is the versions side input where the job has one
    (`transforms.streaming.reference.version_side_input`); None polls.
    """

    def __init__(self, reference: Reference, config: RecsConfig, period_us: int):
        self._reference = reference
        self._config = config
        self._period_us = period_us

    def process(self, element: Tuple[int, Iterable[Tuple[str, WindowPopularity]]],
                pane_info=beam.DoFn.PaneInfoParam, reference_version=None) -> Iterator:
        # reference_version: Optional[ReferenceVersion]; unannotated (see CheckSkusFn).
        end_us, entries = element
        this, previous = notice_rule.split_pair(entries)
        if this is not None:    # else this window held no stream orders: no pane to compare
            yield from self._picks(end_us, this, previous, pane_info, reference_version)

    def _picks(self, end_us: int, this: WindowPopularity, previous: Optional[WindowPopularity],
               pane_info, reference_version) -> Iterator:
        if not pane_info.is_first:
            yield count("ranking.late_pairs", 1)
        ref = self._reference.current(reference_version)
        if previous is not None:
            previous_frame = previous.popularity
        else:           # the previous window held no stream orders: the history alone
            previous_frame = cells.window_popularity([], ref, end_us - self._period_us,
                                                     self._config)
            yield count("ranking.previous_from_history", 1)
        levels = [self._config.level_name(level) for level in self._config.levels[:2]]
        by_segment = cached(self._reference.key + ":vehicles", ref.version,
                            lambda: cells.vehicles_by_segment(ref.vehicle_users, self._config))
        ranked = notice_rule.ranked_vehicles(previous_frame, this.popularity, by_segment, levels)
        yield count("ranking.vehicles_ranked", len(ranked))
        picks = notice_rule.picks_between(ref, previous_frame, this.popularity, ranked,
                                          self._config)
        for vehicle, (chosen, earlier) in picks.items():
            yield vehicle, (end_us, chosen, earlier)


@typehints.with_input_types(VehiclePicks)
@typehints.with_output_types(Tuple[str, int])
class PicksChangedFn(CachedSignatures, beam.DoFn):
    """Keyed per vehicle: emits the vehicle when its picks moved in a way its users would see.

    A notice means: the products of the vehicle's default picks differ (at
    least ``min_changed_picks`` of them; order ignored) from the ones its users
    were last told about, and the last notice is at least
    ``min_interval_hours`` of event time old. A visible change inside the
    interval is held: an event-time timer at the interval's end notices it
    then if it still holds, so a list that flips and flips back costs nothing
    and a lasting change is never lost (`models.ranking_notices`). Counted:
    ``ranking.notices_held`` (windows whose change waited), ``ranking.notices_after_hold``
    (notices the timer sent), ``ranking.changes_not_visible`` (picks that moved
    between consecutive windows without new products for the users).

    State (`models.ranking_notices.NoticeState`): the picks last told, when,
    and the newest window's end and picks: two short tuples and two integers
    per vehicle (~1,100 vehicles in the field), never more; one timer per vehicle.
    """

    STATE = ReadModifyWriteStateSpec("notice", PickleCoder())
    RECHECK = TimerSpec("recheck", TimeDomain.WATERMARK)

    def __init__(self, notices: Optional[RankingNoticesConfig] = None):
        notices = notices or RankingNoticesConfig()
        self._min_changed = notices.min_changed_picks
        self._interval_us = notice_rule.interval_us(notices)

    def process(self, element: VehiclePicks, state=beam.DoFn.StateParam(STATE),
                recheck=beam.DoFn.TimerParam(RECHECK)) -> Iterator:
        vehicle, (end_us, picks, earlier) = element
        new, decision = notice_rule.notice_decision(state.read(), end_us, picks, earlier,
                                                    self._min_changed, self._interval_us)
        if decision == notice_rule.STALE:
            return
        state.write(new)
        if decision == notice_rule.NOTIFY:
            yield window.TimestampedValue((vehicle, end_us), Timestamp(micros=end_us))
        elif decision == notice_rule.HOLD:
            yield count("ranking.notices_held", 1)
            recheck.set(Timestamp(micros=notice_rule.recheck_at(new, self._interval_us)))
        elif earlier is not None and earlier != picks:
            yield count("ranking.changes_not_visible", 1)

    @on_timer(RECHECK)
    def after_hold(self, key=beam.DoFn.KeyParam, fired=beam.DoFn.TimestampParam,
                   state=beam.DoFn.StateParam(STATE)) -> Iterator:
        kept = state.read()
        if kept is None:
            return
        new, notify = notice_rule.recheck(kept, fired.micros, self._min_changed)
        if notify:
            state.write(new)
            yield count("ranking.notices_after_hold", 1)
            yield window.TimestampedValue((key, fired.micros), fired)


def paired_picks(first_panes: beam.PCollection, reference: Reference, config: RecsConfig,
                 spec: WindowSpec, versions: Optional[beam.PCollection] = None
                 ) -> beam.pvalue.DoOutputsTuple:
    """First panes → each re-ranked vehicle's picks in consecutive windows, and counters.

    The pairing of `RankingChanges` (its steps, labelled as there): each pane
    under its own window end and the next one, grouped per window end in fixed
    windows of one period. The group fires when the watermark passes the
    window end (both panes are in by then: each is held back by its sliding
    window until emitted), then once per late pane within the allowed
    lateness, accumulating, so a late pane meets its partner. Outputs are in
    those fixed windows (``Tag.ROWS``: `VehiclePicks`; ``Tag.COUNTS``).
    """
    period_us = int(spec.period.value // 1_000)
    return (first_panes
            | "PairWithNextWindow" >> beam.ParDo(PairWithNextWindowFn(period_us))
            | "PeriodWindows" >> WindowInto(
                window.FixedWindows(seconds_of(spec.period)),
                trigger=trigger.AfterWatermark(late=trigger.AfterCount(1)),
                accumulation_mode=trigger.AccumulationMode.ACCUMULATING,
                allowed_lateness=duration_of(spec.lateness))
            | "PairPerWindowEnd" >> beam.GroupByKey()
            | "VehiclePicks" >> beam.ParDo(
                VehiclePicksFn(reference, config, period_us),
                **version_side_input(versions)).with_outputs(Tag.COUNTS.value,
                                                              main=Tag.ROWS.value))


Notice = Tuple[str, Tuple[str, object]]     # (user_id, ("notice", reason))


@typehints.with_input_types(Tuple[str, int])
@typehints.with_output_types(Notice)
class NotifyUsersFn(CachedSignatures, beam.DoFn):
    """A vehicle whose picks moved → a ranking notice for each of its users.

    ``reference_version`` is the versions side input where the job has one; None polls.
    """

    def __init__(self, reference: Reference):
        self._reference = reference

    def process(self, changed: Tuple[str, int], reference_version=None) -> Iterator:
        vehicle, _ = changed
        users = self._reference.current(reference_version).vehicle_users.get(vehicle, ())
        yield count("ranking.vehicles_changed", 1)
        yield count("ranking.users_notified", len(users))
        for user in users:
            yield user, ("notice", model.REASON_SEGMENT)


class RankingChanges(beam.PTransform):
    """First panes of popularity → a notice for every user whose vehicle's default picks moved.

    Consecutive windows are paired by a GroupByKey per window end (in fixed
    windows of one period), so no step holds every window on one key; the
    notice rule then keeps its state per vehicle.

    Args:
        reference: the reference data (users, vehicles, catalogue, history).
        config: scoring and the ``ranking_notices`` rule.
        spec: the job's windows (the period pairs them; the lateness bounds
            how late a pane may join its pair).
        versions: the reference versions side input (`ReferenceVersions`) where
            the job has one; None: each worker polls.
    """

    def __init__(self, reference: Reference, config: RecsConfig, spec: WindowSpec,
                 versions: Optional[beam.PCollection] = None):
        super().__init__()
        self._reference = reference
        self._config = config
        self._spec = spec
        self._versions = versions

    def expand(self, first_panes: beam.PCollection) -> RowsAndCounts:
        side = version_side_input(self._versions)
        picks = paired_picks(first_panes, self._reference, self._config, self._spec,
                             self._versions)
        changed = (to_global_window("PicksToGlobalWindow", picks[Tag.ROWS.value])
                   | "PicksChanged" >> beam.ParDo(
                       PicksChangedFn(self._config.ranking_notices)).with_outputs(
                       Tag.COUNTS.value, main=Tag.ROWS.value))
        vehicles = changed[Tag.ROWS.value]
        if self._versions is not None:   # read the version of the interval the notice is in
            vehicles = into_version_windows(self._reference, "NoticesIntoReferenceWindows",
                                            vehicles)
        out = vehicles | "NotifyUsers" >> beam.ParDo(NotifyUsersFn(self._reference),
                                                     **side).with_outputs(
            Tag.COUNTS.value, main=Tag.ROWS.value)
        rows, notify_counts = out[Tag.ROWS.value], out[Tag.COUNTS.value]
        if self._versions is not None:   # TouchedUsers after this is global-window
            rows = to_global_window("NoticesToGlobalWindow", rows)
            notify_counts = to_global_window("NoticeCountsToGlobalWindow", notify_counts)
        counts = ((to_global_window("PickCountsToGlobalWindow", picks[Tag.COUNTS.value]),
                   changed[Tag.COUNTS.value], notify_counts)
                  | "FlattenRankingCounts" >> beam.Flatten())
        return RowsAndCounts(rows, counts)
