"""Redelivered events dropped: keyed state per ``event_id`` cleared by an event-time timer.

Pub/Sub delivers at least once; SPEC §2 requires duplicates to be dropped,
and counted so the job's counts reconcile.
"""
from __future__ import annotations

from typing import Iterator, Tuple

import apache_beam as beam
import pandas as pd
from apache_beam import typehints
from apache_beam.coders import PickleCoder
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer

from transforms.health import Tag, count
from transforms.signatures import CachedSignatures
from transforms.streaming.refusals import Checked, KeyOrRefuseFn, Record
from transforms.streaming.windows import duration_of


@typehints.with_input_types(Tuple[str, Record])
@typehints.with_output_types(Record)
class DropDuplicateIdsFn(CachedSignatures, beam.DoFn):
    """Passes the first record of each ``event_id``; later copies are counted and dropped.

    State per event id is one flag, cleared by an event-time timer ``ttl``
    after the event's time, so memory follows the stream's rate, not its age.
    A copy redelivered after the TTL passes again; the TTL is therefore at
    least the allowed lateness (checked at start-up), so a copy that could
    still change a window is always caught.
    """

    SEEN = ReadModifyWriteStateSpec("seen", PickleCoder())
    EXPIRY = TimerSpec("expiry", TimeDomain.WATERMARK)

    def __init__(self, table: str, ttl: pd.Timedelta):
        self._table = table
        self._ttl = duration_of(ttl)

    def process(self, element: Tuple[str, Record], timestamp=beam.DoFn.TimestampParam,
                seen=beam.DoFn.StateParam(SEEN),
                expiry=beam.DoFn.TimerParam(EXPIRY)) -> Iterator:
        _, record = element
        if seen.read():
            yield count(f"{self._table}.deduplicated", 1)
            return
        seen.write(True)
        expiry.set(timestamp + self._ttl)
        yield record

    @on_timer(EXPIRY)
    def expire(self, seen=beam.DoFn.StateParam(SEEN)) -> None:
        seen.clear()


class DropDuplicates(beam.PTransform):
    """Records keyed by ``event_id``; redelivered copies dropped and counted (SPEC §2)."""

    def __init__(self, table: str, ttl: pd.Timedelta):
        super().__init__()
        self._table = table
        self._ttl = ttl

    def expand(self, records: beam.PCollection) -> Checked:
        keyed = records | "KeyByEventId" >> beam.ParDo(
            KeyOrRefuseFn(self._table, "DropDuplicates", ("event_id",))).with_output_types(
            Tuple[str, Record]).with_outputs(
            Tag.DEAD_LETTER.value, Tag.COUNTS.value, main=Tag.ROWS.value)
        out = (keyed[Tag.ROWS.value]
               | "FirstCopyOnly" >> beam.ParDo(
                   DropDuplicateIdsFn(self._table, self._ttl)).with_outputs(
                   Tag.COUNTS.value, main=Tag.ROWS.value))
        counts = ((keyed[Tag.COUNTS.value], out[Tag.COUNTS.value])
                  | "FlattenDedupeCounts" >> beam.Flatten())
        return Checked(out[Tag.ROWS.value], keyed[Tag.DEAD_LETTER.value], counts)
