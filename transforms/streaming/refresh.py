"""Refreshed recommendations: the users a stream touched, scored once per refresh period.

`TouchedUsers` keeps each user's recent stream events in keyed state and asks
for a refresh on every event or ranking notice; `RefreshRecommendations`
gathers the requests per refresh period and user shard and scores them like
the batch job, against the popularity of the window closing with the period.
"""
from __future__ import annotations

import json
import time
import uuid
import zlib
from typing import Callable, Iterable, Iterator, List, NamedTuple, Optional, Tuple

import apache_beam as beam
import pandas as pd
from apache_beam import typehints
from apache_beam.coders import PickleCoder
from apache_beam.transforms import trigger, window
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import (BagStateSpec, ReadModifyWriteStateSpec,
                                               TimerSpec, on_timer)
from apache_beam.utils.timestamp import Timestamp

from models import stream_popularity, stream_sources
from models import streaming as model
from models.recommend_handler import UnionRerankHandler, handler_for
from models.config import RecsConfig
from models.streaming import RefreshRequest, WindowSpec
from transforms.health import Tag, count
from transforms.signatures import CachedSignatures, MapFn, WindowInto
from transforms.streaming.popularity import WindowPopularity
from transforms.streaming.reference import (RANKER_VERSION_ARG, Reference, cached,
                                            version_side_input)
from transforms.streaming.refusals import Record, dead_letter
from transforms.streaming.sources import ModelReference, WindowLines
from transforms.streaming.windows import MICROS, period_end_of, seconds_of, utc_of

# (user_id, ("event", event tuple) | ("notice", reason))
Touch = Tuple[str, Tuple[str, object]]
PeriodKey = Tuple[int, int]      # (user shard, refresh period end in microseconds)


def event_touch(record: Record) -> Touch:
    """A user's event as the compact tuple kept in state."""
    return record["user_id"], ("event", (record["event_id"], record["event_name"], record["sku"],
                                         record.get("order_id"), record["event_time_us"]))


@typehints.with_input_types(Touch)
@typehints.with_output_types(Tuple[str, RefreshRequest])
class UserSignalsFn(CachedSignatures, beam.DoFn):
    """Keeps each user's recent stream events and asks for a refresh on every touch.

    State per user: the stream events inside the longest signal window (the
    purchase exclusion, 365 days by default), pruned as newer ones arrive and
    cleared by an event-time timer once the user has been quiet that long.
    """

    EVENTS = BagStateSpec("events", PickleCoder())
    CLEANUP = TimerSpec("cleanup", TimeDomain.WATERMARK)

    def __init__(self, config: RecsConfig):
        days = max(config.rules.exclusion_days, config.scoring.intent_window_days)
        self._retention_us = int(pd.Timedelta(days=days) // pd.Timedelta(microseconds=1))

    def process(self, touch: Touch, events=beam.DoFn.StateParam(EVENTS),
                cleanup=beam.DoFn.TimerParam(CLEANUP)) -> Iterator:
        user, (kind, payload) = touch
        kept = {e[0]: e for e in events.read()}
        if kind == "event":
            reason = model.REASON_ORDER if payload[1] in model.ORDER_EVENT_NAMES else (
                model.REASON_INTENT)
            if payload[0] not in kept:
                kept[payload[0]] = payload
                events.add(payload)
            newest = max(e[4] for e in kept.values())
            fresh = {k: e for k, e in kept.items() if e[4] >= newest - self._retention_us}
            if len(fresh) < len(kept):
                events.clear()
                for e in fresh.values():
                    events.add(e)
            kept = fresh
            cleanup.set(Timestamp(micros=newest + self._retention_us))
        else:
            reason = payload
        ordered = tuple(sorted(kept.values(), key=lambda e: (e[4], e[0])))
        yield user, RefreshRequest((reason,), ordered)

    @on_timer(CLEANUP)
    def forget(self, events=beam.DoFn.StateParam(EVENTS)) -> None:
        events.clear()


class TouchedUsers(beam.PTransform):
    """(event records, ranking notices) → one refresh request per touch, with the user's events."""

    def __init__(self, config: RecsConfig):
        super().__init__()
        self._config = config

    def expand(self, inputs: Tuple[beam.PCollection, beam.PCollection]) -> beam.PCollection:
        events, notices = inputs
        touches = events | "UserOfEvent" >> beam.ParDo(MapFn(event_touch)).with_output_types(Touch)
        return ((touches, notices)
                | "FlattenTouches" >> beam.Flatten()
                | "UserSignals" >> beam.ParDo(UserSignalsFn(self._config)))


def shard_of_user(user_id: str, num_shards: int) -> int:
    """Stable shard of a user id (the same in every worker process)."""
    # surrogatepass: a hash never fails, whatever text reached it.
    return zlib.crc32(user_id.encode("utf-8", "surrogatepass")) % num_shards


@typehints.with_input_types(Tuple[PeriodKey, Iterable[List[Tuple[str, RefreshRequest]]]],
                            typehints.Optional[WindowPopularity])
@typehints.with_output_types(pd.DataFrame)
class RefreshShardFn(CachedSignatures, beam.DoFn):
    """Scores one refresh period's touched users of one shard as the batch job scores them.

    The private adapter of a `models.recommend_handler` handler (Beam's
    ModelHandler/RunInference split): `handler_for(config)` (segment popularity
    or the slot mix), or a `UnionRerankHandler` serving the model the
    `ModelReference` has in force. The popularity is the side input of the
    sliding window that closes with this refresh period (a window without
    orders has none, and then the history alone is scored at the window's
    end); with a mix, the sources' shared tables are the history's plus that
    window's order lines (`WindowOrderLines`, `models.stream_sources`). What a
    window needs is built once per window, reference version and model, per
    worker process, and reused by every shard.

    The reference data's and the model's versions are the keyword side inputs
    ``reference_version`` and ``ranker_version`` where the job has them (on
    Dataflow: `version_side_input`, each the version of the interval the
    refresh period ends in); None polls.
    """

    def __init__(self, reference: Reference, config: RecsConfig, run_id: str,
                 model_version: str, clock: Callable[[], float] = time.time,
                 ranker: Optional[ModelReference] = None):
        self._reference = reference
        self._config = config
        self._run_id = run_id
        self._model_version = model_version
        self._clock = clock
        self._ranker = ranker
        self._key = uuid.uuid4().hex

    def _history(self, ref: model.ReferenceData) -> stream_sources.HistorySources:
        return cached(self._key + ":history", ref.version, lambda: (
            stream_sources.HistorySources.build(ref.history_lines, ref.arrays.sku,
                                                self._config.candidates)))

    def _serving(self, ref: model.ReferenceData, pop: Optional[WindowPopularity],
                 lines: Optional[WindowLines], end: pd.Timestamp, ranker
                 ) -> Tuple[model.Serving, Optional[stream_sources.WindowSources], bool]:
        """What scores this window, and whether this call built it (counted once then)."""
        config = self._config
        built = []
        mix = not config.candidates.popularity_only
        # Built before, not inside, the window's build: `cached` builds one thing at a time.
        history = self._history(ref) if mix else None

        def build():
            built.append(True)
            frame = pop.popularity if pop is not None else stream_popularity.window_popularity(
                [], ref, end.value // 1_000, config)
            sources = None
            if mix:
                fresh = stream_sources.fresh_lines(lines.cells if lines is not None else {},
                                                   ref.arrays.sku, ref.history_keys)
                sources = stream_sources.tables_at(
                    history, ref.history_lines, ref.history_as_of, fresh, end,
                    config.candidates, frozenset(ref.arrays.sku[ref.arrays.eligible]))
            if ranker is not None:
                handler = UnionRerankHandler(config, lambda: ranker)
                version = ranker.version
            else:
                handler = handler_for(config)
                version = self._model_version if not mix else f"{handler.model_version}+stream"
            return model.serving(ref, frame, handler, sources and sources.tables,
                                 version), sources
        tag = (f"{end.value}|{ref.version}|{pop is not None}|{lines is not None}|"
               f"{ranker.version if ranker is not None else ''}|{id(ranker)}")
        serving, sources = cached(self._key, tag, build)
        return serving, sources, bool(built)

    # The versions are unannotated: Beam's type check takes a side input's NamedTuple for a
    # mismatch with Optional of it (as in CheckSkusFn).
    def process(self, element, pop: Optional[WindowPopularity],
                win=beam.DoFn.WindowParam, reference_version=None,
                ranker_version=None) -> Iterator:
        return self._refresh(element, pop, None, win, reference_version, ranker_version)

    def _refresh(self, element, pop: Optional[WindowPopularity], lines: Optional[WindowLines],
                 win, reference_version=None, ranker_version=None) -> Iterator:
        _, batches = element
        requests = model.merge_requests(r for batch in batches for r in batch)
        end = utc_of(win.end)
        ref = self._reference.current(reference_version)
        ranker = (self._ranker.current(ranker_version) if self._ranker is not None
                  else None)
        serving, sources, built = self._serving(ref, pop, lines, end, ranker)
        out = model.refresh_users(requests, ref, serving, end, self._config)
        yield count("refresh.requests", len(requests))
        yield count("refresh.unknown_users", len(out.unknown_users))
        yield count("refresh.duplicate_users", len(out.duplicate_users))
        if pop is None:
            yield count("refresh.without_window_popularity", 1)
        if sources is not None and built:   # once per window and worker process
            yield count("sources.windows_built", 1)
            yield count("sources.window_lines", sources.window_lines)
            yield count("sources.similarity_rows_rescored", sources.rows_rescored)
        for name, n in out.counters:
            if n and name.startswith(("slots.", "ranker.", "users.vehicle_unknown")):
                yield count(name, n)
        if len(out.unserved):
            reason = out.unserved_reason
            yield count("users.unserved", len(out.unserved))
            yield count(f"dead_letter.{reason}", len(out.unserved))
            for user in out.unserved["user_id"]:
                yield beam.pvalue.TaggedOutput(Tag.DEAD_LETTER.value, dead_letter(
                    "users", "RefreshRecommendations", reason, json.dumps({"user_id": user})))
        if not len(out.rows):
            return
        for rule, n in (out.violations or {}).items():
            if n:
                yield count(f"qa.rule_{rule}", n)
        for source, n in out.rows["source"].value_counts().items():
            yield count(f"users.source.{source}", int(n))
        yield count("recommendations.written", len(out.rows))
        n = self._config.rules.recs_per_user
        columns = model.recommend.rec_columns(n)
        yield out.rows[columns + ["reason"]].assign(
            generated_at=pd.Timestamp(int(self._clock() * MICROS), unit="us", tz="UTC"),
            run_id=self._run_id, model_version=serving.model_version, popularity_as_of=end)


@typehints.with_input_types(Tuple[PeriodKey, Iterable[List[Tuple[str, RefreshRequest]]]],
                            typehints.Optional[WindowPopularity],
                            typehints.Optional[WindowLines])
@typehints.with_output_types(pd.DataFrame)
class RefreshMixShardFn(RefreshShardFn):
    """`RefreshShardFn` with the window's order lines as a second side input (the slot mix)."""

    def process(self, element, pop: Optional[WindowPopularity], lines: Optional[WindowLines],
                win=beam.DoFn.WindowParam, reference_version=None,
                ranker_version=None) -> Iterator:
        return self._refresh(element, pop, lines, win, reference_version, ranker_version)

    def default_label(self) -> str:
        # The step keeps its label whatever the configuration (update in place matches it).
        return "RefreshShardFn"


class Refreshed(NamedTuple):
    rows: beam.PCollection          # recommendation frames (SPEC §3 + reason, stamps)
    dead_letters: beam.PCollection
    counts: beam.PCollection


@typehints.with_input_types(Tuple[int, Tuple[str, RefreshRequest]])
@typehints.with_output_types(Tuple[PeriodKey, List[Tuple[str, RefreshRequest]]])
class GatherPeriodFn(CachedSignatures, beam.DoFn):
    """Keyed per user shard: holds refresh requests until their refresh period ends in event time.

    A request waits for the end of the period its timestamp falls in (an
    event-time timer), then leaves with every other request of the shard due
    by then, stamped at that period's last instant by the timer itself: no
    timestamp is rewritten with the wall clock, and the period's window (whose
    side input is the popularity of the sliding window closing with it) is
    the request's own. A request for a period this shard already released
    (late data) joins the next period not yet released, counted
    (``refresh.late_requests``): it is refreshed with the popularity in force
    then, and nothing is dropped for lateness. State per shard: the pending
    requests (users touched in the periods the watermark has not passed),
    the earliest pending period end and the last released one.
    """

    PENDING = BagStateSpec("pending", PickleCoder())
    NEXT = ReadModifyWriteStateSpec("next", PickleCoder())
    RELEASED = ReadModifyWriteStateSpec("released", PickleCoder())
    FLUSH = TimerSpec("flush", TimeDomain.WATERMARK)

    def __init__(self, period: pd.Timedelta):
        self._period_us = int(period // pd.Timedelta(microseconds=1))

    def process(self, element: Tuple[int, Tuple[str, RefreshRequest]],
                timestamp=beam.DoFn.TimestampParam,
                pending=beam.DoFn.StateParam(PENDING), next_end=beam.DoFn.StateParam(NEXT),
                released=beam.DoFn.StateParam(RELEASED),
                flush=beam.DoFn.TimerParam(FLUSH)) -> Iterator:
        _, request = element
        end = period_end_of(timestamp, self._period_us)
        last = released.read()
        if last is not None and end <= last:
            end = last + self._period_us
            yield count("refresh.late_requests", 1)
        pending.add((end, request))
        due = next_end.read()
        if due is None or end < due:
            next_end.write(end)
            flush.set(Timestamp(micros=end - 1))

    @on_timer(FLUSH)
    def release(self, key=beam.DoFn.KeyParam, fired=beam.DoFn.TimestampParam,
                pending=beam.DoFn.StateParam(PENDING), next_end=beam.DoFn.StateParam(NEXT),
                released=beam.DoFn.StateParam(RELEASED),
                flush=beam.DoFn.TimerParam(FLUSH)) -> Iterator:
        # The end of the period the timer fired in: portable runners (the FnApiRunner,
        # Dataflow's runner v2) keep timer times in whole milliseconds, so a timer set at
        # end - 1 us fires at end - 1 ms there; taken as end - 1 us + 1, its period's own
        # requests were never due and the timer was set again at the same instant, for ever.
        now = period_end_of(fired, self._period_us)
        held = list(pending.read())
        due = [r for end, r in held if end <= now]
        later = [(end, r) for end, r in held if end > now]
        pending.clear()
        for item in later:
            pending.add(item)
        if later:
            following = min(end for end, _ in later)
            next_end.write(following)
            flush.set(Timestamp(micros=following - 1))
        else:
            next_end.clear()
        released.write(max(now, released.read() or now))
        if due:
            yield (key, now), due


def at_period_end(element: Tuple[PeriodKey, Iterable]) -> window.TimestampedValue:
    """A gathered (shard, period end) back at its period's last instant (event time, from the key).

    A GroupByKey in the global window stamps its output at the window's end
    on the DirectRunner whatever the timestamp combiner; the period the
    requests belong to travels in the key.
    """
    return window.TimestampedValue(element, Timestamp(micros=element[0][1] - 1))


class RefreshRecommendations(beam.PTransform):
    """Refresh requests → recommendation rows, once per period for the users touched in it.

    Requests are sharded by user and held per shard until their refresh
    period ends in event time (`GatherPeriodFn`, keyed state and a timer),
    then scored in that period's window, which ends with the sliding window
    whose popularity it uses.

    ``GatherShard`` (a GroupByKey per (shard, period) in the global window,
    fired per element, then `at_period_end`) is a DirectRunner seam:
    that runner hands a side-input ParDo the empty bundle every stateful
    step commits and then fails on it (``'NoneType' object has no attribute
    'max_timestamp'``, Beam 2.77), which a GroupByKey never emits. It never
    drops anything (the global window never expires) and costs one shuffle
    of what is already grouped.

    With ``versions`` (`ReferenceVersions`) and ``ranker_versions``
    (`ModelVersions`), the job's side inputs on Dataflow, the scoring reads
    the reference data and the model of the version checked for the interval
    its refresh period ends in (the period's fixed window maps onto it as it
    is); without, each worker polls.
    """

    def __init__(self, reference: Reference, popularity: beam.PCollection,
                 config: RecsConfig, spec: WindowSpec, num_shards: int, run_id: str,
                 model_version: str, clock: Callable[[], float] = time.time,
                 lines: Optional[beam.PCollection] = None,
                 ranker: Optional[ModelReference] = None,
                 versions: Optional[beam.PCollection] = None,
                 ranker_versions: Optional[beam.PCollection] = None):
        super().__init__()
        self._versions = versions
        self._ranker_versions = ranker_versions
        self._reference = reference
        self._popularity = popularity
        self._lines = lines
        self._ranker = ranker
        self._config = config
        self._spec = spec
        self._num_shards = num_shards
        self._run_id = run_id
        self._model_version = model_version
        self._clock = clock

    def expand(self, requests: beam.PCollection) -> Refreshed:
        out = (requests
               | "ShardByUser" >> beam.ParDo(MapFn(
                   lambda kv, n: (shard_of_user(kv[0], n), kv)), self._num_shards
               ).with_output_types(Tuple[int, Tuple[str, RefreshRequest]])
               | "GatherPeriod" >> beam.ParDo(GatherPeriodFn(self._spec.period)).with_outputs(
                   Tag.COUNTS.value, main=Tag.ROWS.value))
        periods = (out[Tag.ROWS.value]
                   | "ShardPeriodPanes" >> WindowInto(
                       window.GlobalWindows(), trigger=trigger.Repeatedly(trigger.AfterCount(1)),
                       accumulation_mode=trigger.AccumulationMode.DISCARDING,
                       timestamp_combiner=window.TimestampCombiner.OUTPUT_AT_EARLIEST)
                   | "GatherShard" >> beam.GroupByKey()
                   | "AtPeriodEnd" >> beam.ParDo(MapFn(at_period_end))
                   | "RefreshPeriods" >> WindowInto(
                       window.FixedWindows(seconds_of(self._spec.period))))
        side = [beam.pvalue.AsSingleton(self._popularity, default_value=None)]
        fn = RefreshShardFn
        if self._lines is not None:   # the mix's shared tables need the window's order lines
            side.append(beam.pvalue.AsSingleton(self._lines, default_value=None))
            fn = RefreshMixShardFn
        scored = periods | "RefreshShard" >> beam.ParDo(
            fn(self._reference, self._config, self._run_id, self._model_version,
               self._clock, self._ranker), *side, **version_side_input(self._versions),
            **version_side_input(self._ranker_versions, RANKER_VERSION_ARG)).with_outputs(
            Tag.DEAD_LETTER.value, Tag.COUNTS.value, main=Tag.ROWS.value)
        counts = ((out[Tag.COUNTS.value] | "HeldCountsToGlobalWindow" >> WindowInto(
                      window.GlobalWindows()),
                   scored[Tag.COUNTS.value] | "RefreshCountsToGlobalWindow" >> WindowInto(
                      window.GlobalWindows()))
                  | "FlattenRefreshCounts" >> beam.Flatten())
        return Refreshed(scored[Tag.ROWS.value], scored[Tag.DEAD_LETTER.value], counts)
