"""Redelivered events dropped: keyed state of seen ``event_id``s, expired by an event-time timer.

Pub/Sub delivers at least once; SPEC §2 requires duplicates to be dropped,
and counted so the job's counts reconcile. The state key is the event id on
Dataflow and a bucket of it on the local DirectRunner (`statekeys`).
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import apache_beam as beam
import pandas as pd
from apache_beam import typehints
from apache_beam.coders import PickleCoder
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.utils.timestamp import Timestamp

from models import expiring_entries as entries_of
from transforms.health import Tag, count
from transforms.signatures import CachedSignatures
from transforms.streaming.refusals import Checked, KeyOrRefuseFn, Record
from transforms.streaming.statekeys import NATURAL, StateKeys, expire_held, state_keys_of
from transforms.streaming.windows import duration_of

IdRecord = Tuple[str, Record]           # (event_id, record)


@typehints.with_input_types(Record)
@typehints.with_output_types(Tuple[str, IdRecord])
class KeyByIdOrRefuseFn(KeyOrRefuseFn):
    """`KeyOrRefuseFn` by ``event_id``, under the state key `StateKeys` gives the id.

    Output: ``(state key, (event_id, record))``; the id travels with the
    record, since a bucket key holds many ids. The state key is a str either
    way (an id, or a bucket's ``"#n"``), so its coder is the one it was.
    """

    def __init__(self, table: str, keys: StateKeys):
        super().__init__(table, "DropDuplicates", ("event_id",))
        self.keys = keys

    def default_label(self) -> str:
        return "KeyOrRefuseFn"     # the step's label before buckets (update in place)

    def process(self, record: Record) -> Iterator:
        for out in super().process(record):
            if isinstance(out, beam.pvalue.TaggedOutput):
                yield out
            else:
                event_id, kept = out
                yield self.keys.key_of(event_id), (event_id, kept)


@typehints.with_input_types(Tuple[str, IdRecord])
@typehints.with_output_types(Record)
class DropDuplicateIdsFn(CachedSignatures, beam.DoFn):
    """Passes the first record of each ``event_id``; later copies are counted and dropped.

    State per key: the ids seen with their expiry, ``ttl`` after the event's
    time (`models.expiring_entries.Expiring`), and one event-time timer at the
    earliest expiry, rounded up to the key's grid, which removes every id due
    by then. A natural key (Dataflow) holds one id; a bucket (the local
    runner) ``rate x (ttl + grid) / buckets`` ids. Memory follows the stream's
    rate, not its age. A copy redelivered after the TTL passes again; the TTL
    is therefore at least the allowed lateness (checked at start-up), so a
    copy that could still change a window is always caught.
    """

    ENTRIES = ReadModifyWriteStateSpec("ids", PickleCoder())
    EXPIRY = TimerSpec("expiry", TimeDomain.WATERMARK)

    def __init__(self, table: str, ttl: pd.Timedelta, keys: StateKeys = NATURAL):
        self._table = table
        self.keys = keys
        self._ttl_us = duration_of(ttl).micros
        self._grid_us = keys.grid_us(self._ttl_us)

    def process(self, element: Tuple[str, IdRecord], timestamp=beam.DoFn.TimestampParam,
                ids=beam.DoFn.StateParam(ENTRIES),
                expiry=beam.DoFn.TimerParam(EXPIRY)) -> Iterator:
        _, (event_id, record) = element
        held = ids.read()
        if entries_of.get(held, event_id) is not None:
            yield count(f"{self._table}.deduplicated", 1)
            return
        held, timer = entries_of.admit(held, event_id, True, timestamp.micros + self._ttl_us,
                                       self._grid_us)
        ids.write(held)
        if timer is not None:
            expiry.set(Timestamp(micros=timer))
        yield record

    @on_timer(EXPIRY)
    def expire(self, fired=beam.DoFn.TimestampParam, ids=beam.DoFn.StateParam(ENTRIES),
               expiry=beam.DoFn.TimerParam(EXPIRY)) -> None:
        expire_held(ids, expiry, fired.micros, self._grid_us)


class DropDuplicates(beam.PTransform):
    """Records keyed by ``event_id``; redelivered copies dropped and counted (SPEC §2).

    ``keys`` (tests) overrides the state keys `state_keys_of` picks for the
    pipeline's runner: event ids on Dataflow, buckets of them locally.
    """

    def __init__(self, table: str, ttl: pd.Timedelta, keys: Optional[StateKeys] = None):
        super().__init__()
        self._table = table
        self._ttl = ttl
        self._keys = keys

    def expand(self, records: beam.PCollection) -> Checked:
        keys = self._keys if self._keys is not None else state_keys_of(records.pipeline)
        keyed = records | "KeyByEventId" >> beam.ParDo(
            KeyByIdOrRefuseFn(self._table, keys)).with_outputs(
            Tag.DEAD_LETTER.value, Tag.COUNTS.value, main=Tag.ROWS.value)
        out = (keyed[Tag.ROWS.value]
               | "FirstCopyOnly" >> beam.ParDo(
                   DropDuplicateIdsFn(self._table, self._ttl, keys)).with_outputs(
                   Tag.COUNTS.value, main=Tag.ROWS.value))
        counts = ((keyed[Tag.COUNTS.value], out[Tag.COUNTS.value])
                  | "FlattenDedupeCounts" >> beam.Flatten())
        return Checked(out[Tag.ROWS.value], keyed[Tag.DEAD_LETTER.value], counts)
