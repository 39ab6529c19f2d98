"""Run health of the streaming job: every counter summed per period into one health row.
"""
from __future__ import annotations

import json
import time
from typing import Callable, Dict, Iterable, Iterator, Tuple

import apache_beam as beam
import pandas as pd
from apache_beam import typehints
from apache_beam.transforms import window

from transforms.health import Count
from transforms.streaming.windows import StampRefreshTimeFn, seconds_of, utc_of


@typehints.with_input_types(Tuple[int, Iterable[Count]])
@typehints.with_output_types(dict)
class CountersRowFn(beam.DoFn):
    """One period's summed counters → one `streaming_health` row."""

    def process(self, element, win=beam.DoFn.WindowParam) -> Iterator[dict]:
        _, counts = element
        totals: Dict[str, int] = {}
        for name, n in counts:
            totals[name] = totals.get(name, 0) + int(n)
        yield {"kind": "counters", "stream": None, "window_start": utc_of(win.start),
               "window_end": utc_of(win.end),
               "counters": json.dumps(dict(sorted(totals.items())))}


class PeriodCounters(beam.PTransform):
    """Counter elements (global window) → one health row per period with every counter's sum."""

    def __init__(self, period: pd.Timedelta, clock: Callable[[], float] = time.time):
        super().__init__()
        self._period = period
        self._clock = clock

    def expand(self, counts: beam.PCollection) -> beam.PCollection:
        return (counts
                | "StampCountTime" >> beam.ParDo(StampRefreshTimeFn(self._clock))
                | "CounterPeriods" >> beam.WindowInto(
                    window.FixedWindows(seconds_of(self._period)))
                | "SumPerName" >> beam.CombinePerKey(sum)
                | "OneKey" >> beam.Map(lambda kv: (0, kv))
                | "GatherPeriod" >> beam.GroupByKey()
                | "CountersRow" >> beam.ParDo(CountersRowFn()))
