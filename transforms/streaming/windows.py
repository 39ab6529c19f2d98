"""Event-time windowing of the streaming job: the WindowFns, triggers and time conversions.

Every windowed step (rolling popularity, late-data audit, bandit, refresh
periods, health counters) takes its windows from here, so they all slide on
the same period boundaries of one `models.streaming.WindowSpec`.
"""
from __future__ import annotations

import apache_beam as beam
import pandas as pd
from apache_beam.transforms import trigger, window
from apache_beam.utils.timestamp import Duration, Timestamp
from apache_beam.utils.windowed_value import WindowedValue

from models.streaming import WindowSpec
from transforms.signatures import WindowInto

MICROS = 1_000_000      # microseconds per second (Beam timestamps count microseconds)


def seconds_of(delta: pd.Timedelta) -> float:
    """A duration in seconds, as Beam's WindowFns take it."""
    return delta / pd.Timedelta(seconds=1)


def duration_of(delta: pd.Timedelta) -> Duration:
    """A duration as a Beam `Duration` (timers, allowed lateness), exact to the microsecond."""
    return Duration(micros=int(delta // pd.Timedelta(microseconds=1)))


def utc_of(stamp: Timestamp) -> pd.Timestamp:
    """A Beam timestamp (a window's start or end) as the UTC time the models work in."""
    return pd.Timestamp(stamp.micros, unit="us", tz="UTC")


def sliding_windows(spec: WindowSpec) -> window.SlidingWindows:
    """The Beam WindowFn of a `WindowSpec` (windows start on multiples of the period)."""
    return window.SlidingWindows(seconds_of(spec.size), seconds_of(spec.period))


def windowed(spec: WindowSpec, accumulation: trigger.AccumulationMode) -> WindowInto:
    """Sliding windows that fire once when the watermark passes their end, then once per late pane.

    Elements within ``spec.lateness`` after the end still count (each late
    pane restates or adds to the window); later ones are dropped by the
    runner, which is why `LateDataAudit` counts what was seen beside it.
    """
    return WindowInto(sliding_windows(spec),
                      trigger=trigger.AfterWatermark(late=trigger.AfterCount(1)),
                      accumulation_mode=accumulation,
                      allowed_lateness=duration_of(spec.lateness))


def period_buckets(spec: WindowSpec) -> WindowInto:
    """Fixed windows of one period, where elements are pre-summed before sliding.

    Sliding windows start every period, so every instant of one period lies in
    the same windows: one partial per period (and key) can replace its
    elements, and the sliding fan-out (``spec.overlap`` windows each) applies
    to partials instead of events. A period accepts late data for as long as
    any sliding window holding it does (size + lateness), so pre-summing never
    drops what a window would keep, and its panes discard: a late pane carries
    only the new elements, which the sliding stage then adds or drops per window.
    """
    return WindowInto(window.FixedWindows(seconds_of(spec.period)),
                      trigger=trigger.AfterWatermark(late=trigger.AfterCount(1)),
                      accumulation_mode=trigger.AccumulationMode.DISCARDING,
                      allowed_lateness=duration_of(spec.size + spec.lateness))


def in_global_window(value, at: Timestamp) -> WindowedValue:
    """A value output from ``finish_bundle``, which must carry its window (the global one)."""
    return WindowedValue(value, at, [window.GlobalWindow()])


def to_global_window(label: str, pcoll: beam.PCollection) -> beam.PCollection:
    """Re-window into the global window so side outputs of any windowing can be flattened."""
    return pcoll | label >> WindowInto(window.GlobalWindows())


def period_end_of(at: Timestamp, period_us: int) -> int:
    """The end (exclusive, microseconds) of the period holding an instant.

    Period timers release the period they fire in through this: portable
    runners keep timer times in whole milliseconds, so a timer set at
    ``end - 1 µs`` fires at ``end - 1 ms``, still inside its period.
    """
    return (at.micros // period_us + 1) * period_us
