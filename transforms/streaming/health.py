"""Run health of the streaming job: every counter summed per period into one health row.

Counter elements carry the event time of what they count. They are summed per
bundle (`PreSumPerBundleFn`), then held in keyed state per period until the
watermark passes the period's end (`PeriodSumsFn`, an event-time timer), which
writes the period's row. A counter arriving after its period was written
(late data) leaves at once as a further row for that period: rows of one
period add up, nothing is dropped for lateness and no timestamp is rewritten.
"""
from __future__ import annotations

import json
from typing import Dict, Iterator, Tuple

import apache_beam as beam
import pandas as pd
from apache_beam import typehints
from apache_beam.coders import PickleCoder
from apache_beam.transforms import window
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import BagStateSpec, TimerSpec, on_timer
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import WindowedValue

from transforms.health import Count
from transforms.signatures import CachedSignatures
from transforms.streaming.windows import period_end_of, utc_of

PeriodSums = Tuple[int, Dict[str, int]]       # (period end us, counter name → sum)


@typehints.with_input_types(Count)
@typehints.with_output_types(Tuple[int, PeriodSums])
class PreSumPerBundleFn(CachedSignatures, beam.DoFn):
    """Counter elements summed per period within a bundle, so one key sees few elements."""

    def __init__(self, period_us: int):
        self._period_us = period_us

    def start_bundle(self) -> None:
        self._sums: Dict[int, Dict[str, int]] = {}

    def process(self, element: Count, timestamp=beam.DoFn.TimestampParam) -> None:
        name, n = element
        sums = self._sums.setdefault(period_end_of(timestamp, self._period_us), {})
        sums[name] = sums.get(name, 0) + int(n)

    def finish_bundle(self) -> Iterator[WindowedValue]:
        for end, sums in self._sums.items():
            # Stamped at the period's last instant: the time of what it counts, never now.
            yield WindowedValue((0, (end, sums)), Timestamp(micros=end - 1),
                                [window.GlobalWindow()])
        self._sums = {}


@typehints.with_input_types(Tuple[int, PeriodSums])
@typehints.with_output_types(dict)
class PeriodSumsFn(CachedSignatures, beam.DoFn):
    """Holds counter sums per period until the watermark passes its end, then writes its row.

    State: one bag of per-bundle sums (a few dozen counter names each) for
    the periods the watermark has not passed yet; one timer at the earliest.
    """

    SUMS = BagStateSpec("sums", PickleCoder())
    FLUSH = TimerSpec("flush", TimeDomain.WATERMARK)

    def process(self, element: Tuple[int, PeriodSums], sums=beam.DoFn.StateParam(SUMS),
                flush=beam.DoFn.TimerParam(FLUSH)) -> None:
        _, (end, counts) = element
        held = [e for e, _ in sums.read()]
        sums.add((end, counts))
        if not held or end < min(held):
            flush.set(Timestamp(micros=end - 1))

    @on_timer(FLUSH)
    def release(self, fired=beam.DoFn.TimestampParam, sums=beam.DoFn.StateParam(SUMS),
                flush=beam.DoFn.TimerParam(FLUSH)) -> Iterator[dict]:
        # The end of the period the timer fired in (portable runners keep timer times in
        # whole milliseconds: end - 1 us fires at end - 1 ms; see GatherPeriodFn).
        now = period_end_of(fired, self._period_us)
        held = list(sums.read())
        due: Dict[int, Dict[str, int]] = {}
        later = []
        for end, counts in held:
            if end <= now:
                totals = due.setdefault(end, {})
                for name, n in counts.items():
                    totals[name] = totals.get(name, 0) + n
            else:
                later.append((end, counts))
        sums.clear()
        for item in later:
            sums.add(item)
        if later:
            flush.set(Timestamp(micros=min(e for e, _ in later) - 1))
        for end, totals in sorted(due.items()):
            yield {"kind": "counters", "stream": None,
                   "window_start": utc_of(Timestamp(micros=end - self._period_us)),
                   "window_end": utc_of(Timestamp(micros=end)),
                   "counters": json.dumps(dict(sorted(totals.items())))}

    def __init__(self, period_us: int):
        self._period_us = period_us


class PeriodCounters(beam.PTransform):
    """Counter elements (global window) → one health row per period with every counter's sum."""

    def __init__(self, period: pd.Timedelta):
        super().__init__()
        self._period_us = int(period // pd.Timedelta(microseconds=1))

    def expand(self, counts: beam.PCollection) -> beam.PCollection:
        return (counts
                | "PreSumPerBundle" >> beam.ParDo(PreSumPerBundleFn(self._period_us))
                | "GatherPeriod" >> beam.ParDo(PeriodSumsFn(self._period_us)))
