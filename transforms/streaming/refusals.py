"""The streaming job's refusal plumbing: the dead-letter row, its counters, safe keying.

Every step that refuses a record builds its dead letter with `dead_letter`
(storable whatever the record held) and counts it with `refusal_counts`, so
the counts reconcile (read = processed + dead-lettered + deduplicated).
`KeyOrRefuseFn` keys records for stateful steps without ever failing a bundle
on a key Beam cannot encode. `Checked` is the output shape of every check.
"""
from __future__ import annotations

import json
from typing import Iterator, NamedTuple, Optional, Sequence, Tuple

import apache_beam as beam
import pandas as pd
from apache_beam import typehints

from models import streaming as model
from transforms.health import Tag, count
from transforms.signatures import CachedSignatures


Record = dict
DeadLetter = dict


def dead_letter(table: str, step: str, reason: str, record,
                attributes: Optional[dict] = None) -> DeadLetter:
    """A dead-letter row: the original payload, where it was refused and why.

    Always storable: text UTF-8 cannot encode is escaped and a payload over
    `models.streaming.DEAD_LETTER_RECORD_BYTES` keeps its head and its size
    (`models.streaming.dead_letter_text`), so writing a dead letter never fails
    for what the refused record held.
    """
    return {"table": table, "step": step, "reason": model.storable(reason),
            "record": model.dead_letter_text(record),
            "attributes": json.dumps(attributes, sort_keys=True) if attributes else None}


def refusal_counts(table: str, reason: str, n: int = 1) -> Iterator[beam.pvalue.TaggedOutput]:
    """The counters of ``n`` dead letters: per table (reconciliation) and per reason."""
    yield count(f"{table}.dead_lettered", n)
    yield count(f"dead_letter.{model.storable(reason)}", n)


class RowsAndCounts(NamedTuple):
    rows: beam.PCollection
    counts: beam.PCollection


class Checked(NamedTuple):
    """Records that passed a check, the refused ones as dead letters, counters (global window)."""

    rows: beam.PCollection
    dead_letters: beam.PCollection
    counts: beam.PCollection


def record_text(record: Record) -> str:
    """A parsed record as JSON text for its dead letter (``event_time`` as RFC 3339 again)."""
    payload = {k: v for k, v in record.items() if k != "event_time_us"}
    if "event_time_us" in record:
        payload["event_time"] = pd.Timestamp(record["event_time_us"], unit="us",
                                             tz="UTC").isoformat()
    return json.dumps(payload, sort_keys=True, default=str)


@typehints.with_input_types(Record)
@typehints.with_output_types(Tuple[typehints.Any, Record])
class KeyOrRefuseFn(CachedSignatures, beam.DoFn):
    """Keys a record by some of its fields; a key UTF-8 cannot encode becomes a dead letter.

    A state or shuffle key is encoded before any code of ours sees it, so a
    key holding a lone surrogate would fail its bundle on every retry: the
    DirectRunner gives up after four attempts, Dataflow retries forever, and
    either way the stream stops. `ParseMessages` refuses such records first;
    this keeps every keyed step safe on its own as well.
    """

    def __init__(self, table: str, step: str, fields: Sequence[str]):
        self._table = table
        self._step = step
        self._fields = tuple(fields)

    def process(self, record: Record) -> Iterator:
        field = model.unencodable_field(record, self._fields)
        if field is None:
            key = tuple(record.get(f) for f in self._fields)
            yield key[0] if len(key) == 1 else key, record
            return
        reason = model.UNENCODABLE_REASON.format(field=field)
        yield beam.pvalue.TaggedOutput(Tag.DEAD_LETTER.value, dead_letter(
            self._table, self._step, reason, record_text(record)))
        yield from refusal_counts(self._table, reason)
