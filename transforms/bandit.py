"""Bandit counts in sliding event-time windows and each window's posterior state (SPEC §4).

Reading order: funnel-checked treatment events → counts per (treatment,
segment) and time bucket → sliding windows → summed per key
(`TreatmentCountsFn`) → gathered per window → posteriors, P(best) and weights
(`models.campaign.window_state`).

The batch job feeds `BanditState` pre-summed bucket counts (`TreatmentCounts`);
the streaming job will feed one ``((treatment_id, segment), FunnelCounts)``
element per message, timestamped with its event time. Both then share the
windowing, the CombineFn and the state, so they publish the same rows.
"""
from __future__ import annotations

from typing import Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import apache_beam as beam
import numpy as np
import pandas as pd
from apache_beam import typehints
from apache_beam.transforms import trigger, window
from apache_beam.utils.timestamp import Duration

from models import campaign, contracts, sends
from models.bandit import BanditConfig
from models.campaign import EPOCH, FunnelCounts
from transforms.frames import DEFAULT_SHARDS, CoGroupFrames
from transforms.health import Tag, count, dead_letters
from transforms.signatures import CachedSignatures, MapFn, WindowInto

Key = Tuple[str, str]                  # (treatment_id, segment)
KeyedCounts = Tuple[Key, FunnelCounts]
Shard = int
_ONE_SECOND = pd.Timedelta(seconds=1)


class BanditStateOut(NamedTuple):
    """`bandit_state` frames (one per window), refused counts, counters; in the global window."""

    rows: beam.PCollection
    dead_letters: beam.PCollection
    counts: beam.PCollection


@typehints.with_input_types(Tuple[Shard, dict])
@typehints.with_output_types(pd.DataFrame)
class AttachSegmentsFn(beam.DoFn):
    """Adds each treatment event's ``segment`` from its user's vehicle."""

    def __init__(self, attributes: Sequence[str]):
        self._attributes = list(attributes)

    def process(self, element: Tuple[Shard, dict]) -> Iterator[pd.DataFrame]:
        _, groups = element
        events = groups["treatment_events"]
        if len(events):
            yield campaign.attach_segments(events, groups["users"], self._attributes)


class AttachSegments(beam.PTransform):
    """Treatment events meet their users per ``user_id`` shard and gain a ``segment`` column."""

    def __init__(self, users: beam.PCollection, attributes: Sequence[str],
                 num_shards: int = DEFAULT_SHARDS):
        super().__init__()
        self._users = users
        self._attributes = list(attributes)
        self._num_shards = num_shards

    def expand(self, events: beam.PCollection) -> beam.PCollection:
        return ({"treatment_events": events, "users": self._users}
                | "ShardByUser" >> CoGroupFrames(
                    {"treatment_events": ["user_id"], "users": ["user_id"]}, self._num_shards)
                | "SegmentOfUser" >> beam.ParDo(AttachSegmentsFn(self._attributes)))


@typehints.with_input_types(pd.DataFrame)
@typehints.with_output_types(KeyedCounts)
class BucketCountsFn(beam.DoFn):
    """One timestamped count element per (treatment, segment, time bucket) of a frame.

    The element's timestamp is its bucket's start; as buckets never straddle a
    window boundary (`campaign.common_bucket`), it lands in exactly the windows
    its events would have.
    """

    def __init__(self, bucket: pd.Timedelta, segmented: bool):
        self._bucket = bucket
        self._segmented = segmented

    def process(self, frame: pd.DataFrame) -> Iterator[window.TimestampedValue]:
        counts = campaign.bucket_counts(frame, self._bucket, self._segmented)
        seconds = ((counts["bucket_start"] - EPOCH) // _ONE_SECOND).to_numpy(np.int64)
        values = counts[list(campaign.COUNT_FIELDS)].to_numpy(np.int64).tolist()
        for treatment, segment, at, value in zip(counts["treatment_id"], counts["segment"],
                                                 seconds.tolist(), values):
            yield window.TimestampedValue(((treatment, segment), FunnelCounts(*value)), at)


class TreatmentCounts(beam.PTransform):
    """Funnel-checked treatment-event frames → timestamped ``((treatment, segment), counts)``."""

    def __init__(self, size: pd.Timedelta, period: pd.Timedelta, segmented: bool = False):
        super().__init__()
        self._bucket = campaign.common_bucket(size, period)
        self._segmented = segmented

    def expand(self, frames: beam.PCollection) -> beam.PCollection:
        return frames | "CountPerTimeBucket" >> beam.ParDo(
            BucketCountsFn(self._bucket, self._segmented))


@typehints.with_input_types(FunnelCounts)
@typehints.with_output_types(FunnelCounts)
class TreatmentCountsFn(beam.CombineFn):
    """Sums one key's funnel counts within one window.

    Accumulator: a list of five ints, ``[sent, delivered, delivery_failed,
    views, clicks]`` (`campaign.COUNT_FIELDS` order). Counts are additive, so
    merging is element-wise addition and any split into bundles gives the same
    sums. Clicks may exceed views here (a click whose open fell in an earlier
    window); `campaign.window_state` reconciles that per window.
    """

    def create_accumulator(self) -> List[int]:
        return [0] * len(campaign.COUNT_FIELDS)

    def add_input(self, acc: List[int], counts: FunnelCounts) -> List[int]:
        return campaign.add_counts(acc, counts)

    def merge_accumulators(self, accs: Iterable[List[int]]) -> List[int]:
        merged = self.create_accumulator()
        for acc in accs:
            merged = campaign.add_counts(merged, acc)
        return merged

    def extract_output(self, acc: List[int]) -> FunnelCounts:
        return FunnelCounts(*acc)

    def default_label(self) -> str:
        return "SumTreatmentCounts"


class SlidingTreatmentCounts(beam.PTransform):
    """Timestamped keyed counts → their sums per key in every sliding window.

    Trigger: one pane when the watermark passes the window's end, then one
    more per late element up to ``allowed_lateness``. Panes accumulate, so a
    late pane restates the key's whole window (batch input is never late, so
    batch gets exactly one pane per window and key).
    """

    def __init__(self, size: pd.Timedelta, period: pd.Timedelta,
                 allowed_lateness: pd.Timedelta = pd.Timedelta(0)):
        super().__init__()
        self._size = size
        self._period = period
        self._lateness = allowed_lateness

    def expand(self, counts: beam.PCollection) -> beam.PCollection:
        return (counts
                | "SlidingWindows" >> WindowInto(
                    window.SlidingWindows(self._size / _ONE_SECOND, self._period / _ONE_SECOND),
                    trigger=trigger.AfterWatermark(late=trigger.AfterCount(1)),
                    accumulation_mode=trigger.AccumulationMode.ACCUMULATING,
                    allowed_lateness=Duration(micros=self._lateness // pd.Timedelta(
                        microseconds=1)))
                | "SumPerTreatment" >> beam.CombinePerKey(TreatmentCountsFn()))


def _window_bounds(win: window.IntervalWindow) -> Tuple[pd.Timestamp, pd.Timestamp]:
    """A Beam window's [start, end) as UTC pandas timestamps."""
    return (pd.Timestamp(win.start.micros, unit="us", tz="UTC"),
            pd.Timestamp(win.end.micros, unit="us", tz="UTC"))


@typehints.with_input_types(Tuple[int, Iterable[KeyedCounts]])
@typehints.with_output_types(pd.DataFrame)
class WindowStateFn(CachedSignatures, beam.DoFn):
    """All keys of one window → its `bandit_state` rows; impossible counts are dead-lettered."""

    def __init__(self, config: BanditConfig):
        self._config = config

    def process(self, element: Tuple[int, Iterable[KeyedCounts]],
                win=beam.DoFn.WindowParam) -> Iterator:
        _, keyed = element
        start, end = _window_bounds(win)
        out = campaign.window_state(campaign.counts_frame(keyed), start, end, self._config)
        yield count("bandit.windows", 1)
        yield count("bandit.clicks_capped", out.clicks_capped)
        yield count("bandit_state.rows", len(out.state))
        if len(out.rejected):
            yield beam.pvalue.TaggedOutput(Tag.DEAD_LETTER.value, dead_letters(
                "treatment_counts", "WindowState", out.rejected["refusal"].tolist(),
                contracts.to_record_json(out.rejected.drop(columns="refusal").assign(
                    window_start=start, window_end=end), np.arange(len(out.rejected)))))
        if len(out.state):
            yield out.state


@typehints.with_input_types(pd.DataFrame)
@typehints.with_output_types(pd.DataFrame)
class AttributeToSendsFn(beam.DoFn):
    """Re-times a user shard's funnel events to their sends (`models.sends.attribute_to_sends`)."""

    def __init__(self, window: pd.Timedelta):
        self._window = window

    def process(self, frame: pd.DataFrame) -> Iterator:
        out = sends.attribute_to_sends(frame, self._window)
        yield count("bandit.beyond_attribution", out.beyond)
        yield count("bandit.opens_inferred", out.opens_inferred)
        if len(out.rows):
            yield out.rows


class AttributedOut(NamedTuple):
    """Funnel events at their sends' times, and the attribution counters."""

    rows: beam.PCollection
    counts: beam.PCollection


class AttributeToSends(beam.PTransform):
    """Funnel-checked frames (whole recipients per frame) → events timed at their sends.

    A view or click within ``window`` after its send then lands in the send's
    sliding windows, whatever boundary lies between them; later ones are
    counted (``bandit.beyond_attribution``) and left out of the bandit only.
    """

    def __init__(self, window: pd.Timedelta):
        super().__init__()
        self._window = window

    def expand(self, frames: beam.PCollection) -> AttributedOut:
        out = frames | "AttributeToSends" >> beam.ParDo(
            AttributeToSendsFn(self._window)).with_outputs(Tag.COUNTS.value, main=Tag.ROWS.value)
        return AttributedOut(out[Tag.ROWS.value], out[Tag.COUNTS.value])


@typehints.with_input_types(KeyedCounts)
@typehints.with_output_types(Tuple[Key, FunnelCounts, int])
class WithTimestampFn(CachedSignatures, beam.DoFn):
    """Keeps each count element's bucket start (its timestamp, in seconds) beside it."""

    def process(self, kv: KeyedCounts, at=beam.DoFn.TimestampParam) -> Iterator:
        yield kv[0], kv[1], int(at.micros // 1_000_000)


@typehints.with_input_types(List[Tuple[Key, FunnelCounts, int]])
@typehints.with_output_types(pd.DataFrame)
class OverallStateFn(CachedSignatures, beam.DoFn):
    """Every key's counts over the whole input → the ``overall`` `bandit_state` rows.

    The span is the first bucket's start to the last bucket's end. Impossible
    counts are dead-lettered by the windows that hold them, not again here.
    """

    def __init__(self, config: BanditConfig, bucket: pd.Timedelta):
        self._config = config
        self._bucket = bucket

    def process(self, elements: List[Tuple[Key, FunnelCounts, int]]) -> Iterator:
        if not elements:
            return
        seconds = [at for _, _, at in elements]
        start = pd.Timestamp(min(seconds), unit="s", tz="UTC")
        end = pd.Timestamp(max(seconds), unit="s", tz="UTC") + self._bucket
        out = campaign.window_state(campaign.counts_frame(
            [(key, counts) for key, counts, _ in elements], summed=True), start, end,
            self._config, campaign.OVERALL_SCOPE)
        yield count("bandit.overall_refused", len(out.rejected))
        yield count("bandit_state.rows", len(out.state))
        if len(out.state):
            yield out.state


class BanditState(beam.PTransform):
    """Timestamped ``((treatment, segment), counts)`` → `bandit_state` frames, one per window.

    The outputs are re-windowed into the global window: the window bounds
    travel as the ``window_start``/``window_end`` columns from here on, so
    the state can meet run-wide counters and sinks. With ``overall_bucket``
    (bounded input only: the batch jobs) one more frame holds the
    ``overall`` rows, each arm over all the data.
    """

    def __init__(self, config: BanditConfig, size: pd.Timedelta, period: pd.Timedelta,
                 allowed_lateness: pd.Timedelta = pd.Timedelta(0),
                 overall_bucket: Optional[pd.Timedelta] = None):
        super().__init__()
        self._config = config
        self._size = size
        self._period = period
        self._lateness = allowed_lateness
        self._overall_bucket = overall_bucket

    def expand(self, counts: beam.PCollection) -> BanditStateOut:
        state = (counts
                 | "SlidingTreatmentCounts" >> SlidingTreatmentCounts(
                     self._size, self._period, self._lateness)
                 | "OneKeyPerWindow" >> beam.ParDo(MapFn(lambda kv: (0, kv))).with_output_types(
                     Tuple[int, KeyedCounts])
                 | "GatherWindow" >> beam.GroupByKey()
                 | "PosteriorPerWindow" >> beam.ParDo(WindowStateFn(self._config)).with_outputs(
                     Tag.DEAD_LETTER.value, Tag.COUNTS.value, main=Tag.ROWS.value))
        rows = state[Tag.ROWS.value] | "StateToGlobalWindow" >> WindowInto(
            window.GlobalWindows())
        counters = state[Tag.COUNTS.value] | "CountsToGlobalWindow" >> WindowInto(
            window.GlobalWindows())
        if self._overall_bucket is not None:
            overall = (counts
                       | "KeepBucketStart" >> beam.ParDo(WithTimestampFn())
                       | "OverallToGlobalWindow" >> WindowInto(window.GlobalWindows())
                       | "GatherOverall" >> beam.combiners.ToList()
                       | "OverallState" >> beam.ParDo(OverallStateFn(
                           self._config, self._overall_bucket)).with_outputs(
                           Tag.COUNTS.value, main=Tag.ROWS.value))
            rows = (rows, overall[Tag.ROWS.value]) | "WithOverallRows" >> beam.Flatten()
            counters = ((counters, overall[Tag.COUNTS.value])
                        | "WithOverallCounts" >> beam.Flatten())
        return BanditStateOut(
            rows,
            state[Tag.DEAD_LETTER.value] | "DeadLettersToGlobalWindow" >> WindowInto(
                window.GlobalWindows()),
            counters)
