"""Late-data audit: per window, what the job saw against what the windowed steps included.

Counted runner-independently (seen in the global window, included by the same
windowing as the aggregation); the difference, settled once the allowed
lateness has passed, is what the runner dropped as too late.
"""
from __future__ import annotations

from typing import Dict, Iterator, List, NamedTuple, Tuple

import apache_beam as beam
import pandas as pd
from apache_beam import typehints
from apache_beam.coders import PickleCoder
from apache_beam.transforms import trigger
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import PaneInfoTiming, WindowedValue

from models import streaming as model
from models.streaming import WindowSpec
from transforms.health import Tag, count
from transforms.signatures import CachedSignatures, MapFn
from transforms.streaming.windows import (duration_of, in_global_window, period_buckets,
                                          to_global_window, windowed)

AuditKey = Tuple[str, int, int]        # (stream, window start µs, window end µs)
AuditUpdate = Tuple[str, int]          # ("seen" | "on_time" | "late", n)
_AUDIT_KINDS = ("seen", "on_time", "late")


@typehints.with_input_types(typehints.Any)
@typehints.with_output_types(Tuple[AuditKey, AuditUpdate])
class SeenPerWindowFn(CachedSignatures, beam.DoFn):
    """Counts every element in each window it belongs to, before any window can drop it.

    Runs in the global window, so nothing is ever late here. Counts are
    summed per bundle and period (every instant of a period lies in the same
    windows) and emitted per window with the earliest element time, which
    holds the downstream watermark until they are delivered.
    """

    def __init__(self, stream: str, spec: WindowSpec):
        self._stream = stream
        self._spec = spec
        self._period = int(spec.period // pd.Timedelta(microseconds=1))

    def start_bundle(self) -> None:
        self._seen: Dict[int, List[int]] = {}

    def process(self, element, timestamp=beam.DoFn.TimestampParam) -> None:
        at = timestamp.micros
        entry = self._seen.setdefault(at - at % self._period, [0, at])
        entry[0] += 1
        entry[1] = min(entry[1], at)

    def finish_bundle(self) -> Iterator[WindowedValue]:
        per_window: Dict[Tuple[int, int], List[int]] = {}
        for bucket, (n, first) in self._seen.items():
            for bounds in self._spec.windows_of(bucket):
                entry = per_window.setdefault(bounds, [0, first])
                entry[0] += n
                entry[1] = min(entry[1], first)
        for (start, end), (n, first) in per_window.items():
            yield in_global_window(((self._stream, start, end), ("seen", n)),
                                   Timestamp(micros=first))
        self._seen = {}


@typehints.with_input_types(int)
@typehints.with_output_types(Tuple[AuditKey, AuditUpdate])
class PaneCountFn(CachedSignatures, beam.DoFn):
    """One pane's element count keyed by its window, as on time or late."""

    def __init__(self, stream: str):
        self._stream = stream

    def process(self, n: int, win=beam.DoFn.WindowParam, pane=beam.DoFn.PaneInfoParam
                ) -> Iterator:
        late = pane.timing == PaneInfoTiming.LATE
        if late:
            yield count(f"late.{self._stream}.allowed", n)
        yield ((self._stream, win.start.micros, win.end.micros), ("late" if late else "on_time", n))


@typehints.with_input_types(Tuple[AuditKey, AuditUpdate])
@typehints.with_output_types(dict)
class ReconcileWindowFn(CachedSignatures, beam.DoFn):
    """Per window: seen vs included, settled when the window can no longer change.

    A timer at the window's end plus the allowed lateness fires once every
    element the aggregation accepts has been counted: then ``seen - on_time -
    late`` elements were too late and dropped. The row is emitted and the
    state cleared; an element arriving even later opens the window's state
    again and is reported in a further row (rows are additive per window).
    """

    COUNTS = ReadModifyWriteStateSpec("counts", PickleCoder())
    SETTLE = TimerSpec("settle", TimeDomain.WATERMARK)

    def __init__(self, spec: WindowSpec):
        self._lateness = duration_of(spec.lateness)

    def process(self, element: Tuple[AuditKey, AuditUpdate],
                counts=beam.DoFn.StateParam(COUNTS),
                settle=beam.DoFn.TimerParam(SETTLE)) -> None:
        (_, _, end), (kind, n) = element
        current = counts.read() or (0, 0, 0)
        i = _AUDIT_KINDS.index(kind)
        counts.write(tuple(c + n if j == i else c for j, c in enumerate(current)))
        settle.set(Timestamp(micros=end) + self._lateness)

    @on_timer(SETTLE)
    def settled(self, key=beam.DoFn.KeyParam, counts=beam.DoFn.StateParam(COUNTS)) -> Iterator:
        stream, start, end = key
        audit = model.WindowAudit(*(counts.read() or (0, 0, 0)))
        counts.clear()
        if audit.too_late:
            yield count(f"late.{stream}.too_late", audit.too_late)
        yield {"kind": "late_data", "stream": stream,
               "window_start": pd.Timestamp(start, unit="us", tz="UTC"),
               "window_end": pd.Timestamp(end, unit="us", tz="UTC"),
               "seen": audit.seen, "on_time": audit.on_time, "late": audit.late,
               "too_late": audit.too_late}


class AuditOut(NamedTuple):
    rows: beam.PCollection      # one health row per window (plus one per too-late straggler)
    counts: beam.PCollection


class LateDataAudit(beam.PTransform):
    """Timestamped elements → per-window counts of on-time, late-but-allowed and too-late ones.

    Runner-independent: what the job *saw* is counted per window in the
    global window, where nothing is dropped; what a windowed aggregation
    *included* is counted by the same windowing, trigger and allowed
    lateness, one discarding pane at a time (a late pane's count is its late
    elements). The difference, settled after the lateness has passed, is what
    the runner dropped as too late.
    """

    def __init__(self, stream: str, spec: WindowSpec):
        super().__init__()
        self._stream = stream
        self._spec = spec

    def expand(self, elements: beam.PCollection) -> AuditOut:
        seen = elements | "SeenPerWindow" >> beam.ParDo(
            SeenPerWindowFn(self._stream, self._spec))
        included = (elements
                    | "OnePerElement" >> beam.ParDo(MapFn(lambda _: 1))
                    | "AuditPeriodBuckets" >> period_buckets(self._spec)
                    | "CountPerPeriod" >> beam.CombineGlobally(sum).without_defaults()
                    | "AuditWindows" >> windowed(self._spec,
                                                 trigger.AccumulationMode.DISCARDING)
                    | "CountPerPane" >> beam.CombineGlobally(sum).without_defaults()
                    | "KeyByWindow" >> beam.ParDo(PaneCountFn(self._stream)).with_outputs(
                        Tag.COUNTS.value, main=Tag.ROWS.value))
        settled = ((seen, to_global_window("IncludedToGlobalWindow", included[Tag.ROWS.value]))
                   | "FlattenAudit" >> beam.Flatten()
                   | "ReconcilePerWindow" >> beam.ParDo(
                       ReconcileWindowFn(self._spec)).with_outputs(
                       Tag.COUNTS.value, main=Tag.ROWS.value))
        counts = ((to_global_window("LateCountsToGlobalWindow", included[Tag.COUNTS.value]),
                   settled[Tag.COUNTS.value])
                  | "FlattenAuditCounts" >> beam.Flatten())
        return AuditOut(settled[Tag.ROWS.value], counts)
