"""Ranking changes: the vehicles whose default picks moved between consecutive windows.

`RankingChanges` takes the first popularity pane of each window
(`transforms.streaming.popularity.WindowedPopularity`), re-ranks the vehicles
whose own segments changed since the window before, and notifies the
vehicle's users when a newer window shows them other products, at most once
per interval (`models.ranking_notices`).

State, and what bounds it (docs/streaming.md):

- ``VehiclePicks``: one key, the previous window's end, its popularity frame
  and the picks of the vehicles ranked in it (at most the vehicle count).
- ``PicksChanged``: per vehicle, the picks its users were last told about, when,
  and the newest window's picks (`models.ranking_notices.NoticeState`), plus one
  re-check timer.
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import apache_beam as beam
import pandas as pd
from apache_beam import typehints
from apache_beam.coders import PickleCoder
from apache_beam.transforms import window
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.utils.timestamp import Timestamp

from models import ranking_notices as notice_rule
from models import stream_popularity as cells
from models import streaming as model
from models.config import RankingNoticesConfig, RecsConfig
from models.streaming import WindowSpec
from transforms.health import Tag, count
from transforms.signatures import CachedSignatures
from transforms.streaming.popularity import WindowPopularity
from transforms.streaming.reference import FileReference, cached
from transforms.streaming.refusals import RowsAndCounts


Picks = Tuple[str, ...]         # (source, rec_part_1, ...)
# (vehicle, (window end us, picks in this window, picks in the previous window))
VehiclePicks = Tuple[str, Tuple[int, Picks, Optional[Picks]]]


@typehints.with_input_types(Tuple[int, WindowPopularity])
@typehints.with_output_types(VehiclePicks)
class VehiclePicksFn(CachedSignatures, beam.DoFn):
    """Two consecutive windows → each re-ranked vehicle's default picks in both.

    Re-ranked are the vehicles whose own segments (the two most specific
    levels) gained or lost orders between the previous window and this one
    (`models.stream_popularity.changed_segments`): a change at the make or
    global level alone moves every vehicle a little and almost never reorders
    one, and decay alone never does. Each is ranked with the previous window's
    popularity and with this one's, so a notice means the list a user would get
    changed between two consecutive windows, never that it differs from some
    older ranking. When the previous window held no stream orders (none was
    emitted), its popularity is the history's alone at its end.

    State, on the one key all windows share: the previous window's end, its
    popularity frame (one row per (level, segment, sku) cell: bounded by the
    catalogue times the segments, never by the order volume) and the picks of
    the vehicles ranked in it (at most the vehicle count), reused as their
    previous picks so a vehicle re-ranked in consecutive windows is ranked once
    per window.
    """

    PREVIOUS = ReadModifyWriteStateSpec("previous", PickleCoder())

    def __init__(self, reference: FileReference, config: RecsConfig,
                 period: Optional[pd.Timedelta] = None):
        self._reference = reference
        self._config = config
        self._period_us = (int(period // pd.Timedelta(microseconds=1))
                           if period is not None else None)

    def process(self, element: Tuple[int, WindowPopularity],
                previous=beam.DoFn.StateParam(PREVIOUS)) -> Iterator:
        _, pane = element
        end_us = int(pane.window_end.value // 1_000)
        before = previous.read()
        if before is not None and before[0] >= end_us:
            return      # an older window after a newer one: nothing newer to compare with
        ref = self._reference.current()
        previous_end = end_us - self._period_us if self._period_us else end_us
        if before is not None and (self._period_us is None or before[0] == previous_end):
            _, previous_frame, previous_picks = before
        else:           # the previous window held no stream orders: the history alone
            previous_frame = cells.window_popularity([], ref, previous_end, self._config)
            previous_picks = {}
        levels = [self._config.level_name(level) for level in self._config.levels[:2]]
        changed = cells.changed_segments(previous_frame, pane.popularity, levels)
        by_segment = cached(self._reference.key + ":vehicles", ref.version,
                            lambda: cells.vehicles_by_segment(ref.vehicle_users, self._config))
        ranked = sorted({v for seg in changed for v in by_segment.get(seg, ())})
        picks = (model.default_picks(model.scorer(ref, pane.popularity, self._config), ref,
                                     ranked, self._config) if ranked else {})
        previous.write((end_us, pane.popularity, picks))
        yield count("ranking.vehicles_ranked", len(ranked))
        if not ranked:
            return
        missing = [v for v in ranked if v not in previous_picks]
        earlier = {v: previous_picks[v] for v in ranked if v in previous_picks}
        if missing:
            earlier.update(model.default_picks(model.scorer(ref, previous_frame, self._config),
                                               ref, missing, self._config))
        for vehicle, chosen in picks.items():
            base = earlier.get(vehicle)
            yield vehicle, (end_us, tuple(str(p) for p in chosen),
                            tuple(str(p) for p in base) if base is not None else None)


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


Notice = Tuple[str, Tuple[str, object]]     # (user_id, ("notice", reason))


@typehints.with_input_types(Tuple[str, int])
@typehints.with_output_types(Notice)
class NotifyUsersFn(CachedSignatures, beam.DoFn):
    """A vehicle whose picks moved → a ranking notice for each of its users."""

    def __init__(self, reference: FileReference):
        self._reference = reference

    def process(self, changed: Tuple[str, int]) -> Iterator:
        vehicle, _ = changed
        users = self._reference.current().vehicle_users.get(vehicle, ())
        yield count("ranking.vehicles_changed", 1)
        yield count("ranking.users_notified", len(users))
        for user in users:
            yield user, ("notice", model.REASON_SEGMENT)


class RankingChanges(beam.PTransform):
    """First panes of popularity → a notice for every user whose vehicle's default picks moved."""

    def __init__(self, reference: FileReference, config: RecsConfig,
                 spec: Optional[WindowSpec] = None):
        super().__init__()
        self._reference = reference
        self._config = config
        self._period = spec.period if spec is not None else None

    def expand(self, first_panes: beam.PCollection) -> RowsAndCounts:
        picks = (first_panes
                 | "PopularityToGlobalWindow" >> beam.WindowInto(window.GlobalWindows())
                 | "OneKey" >> beam.Map(lambda p: (0, p)).with_output_types(
                     Tuple[int, WindowPopularity])
                 | "VehiclePicks" >> beam.ParDo(
                     VehiclePicksFn(self._reference, self._config, self._period)).with_outputs(
                     Tag.COUNTS.value, main=Tag.ROWS.value))
        changed = (picks[Tag.ROWS.value]
                   | "PicksChanged" >> beam.ParDo(
                       PicksChangedFn(self._config.ranking_notices)).with_outputs(
                       Tag.COUNTS.value, main=Tag.ROWS.value))
        out = (changed[Tag.ROWS.value]
               | "NotifyUsers" >> beam.ParDo(NotifyUsersFn(self._reference)).with_outputs(
                   Tag.COUNTS.value, main=Tag.ROWS.value))
        counts = ((picks[Tag.COUNTS.value], changed[Tag.COUNTS.value], out[Tag.COUNTS.value])
                  | "FlattenRankingCounts" >> beam.Flatten())
        return RowsAndCounts(out[Tag.ROWS.value], counts)
