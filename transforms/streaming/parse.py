"""Pub/Sub messages → timestamped records: the contract check of the streaming job.

Messages are validated a bundle at a time by `models.streaming.parse_messages`
(the batch job's contract and limits); each valid record takes its payload
``event_time`` as its element timestamp, every refused one becomes a dead letter.
"""
from __future__ import annotations

from typing import Dict, Iterator, List, NamedTuple, Optional, Tuple

import apache_beam as beam
from apache_beam import typehints
from apache_beam.transforms import window
from apache_beam.utils.timestamp import Timestamp

from models import contracts
from models import streaming as model
from models.config import InputConfig
from transforms.health import Tag, count
from transforms.signatures import CachedSignatures
from transforms.streaming.refusals import Record, dead_letter, refusal_counts
from transforms.streaming.windows import in_global_window


class Parsed(NamedTuple):
    """A parsed stream: timestamped records, dead letters, counters (all in the global window)."""

    rows: beam.PCollection
    dead_letters: beam.PCollection
    counts: beam.PCollection


@typehints.with_input_types(typehints.Any)
@typehints.with_output_types(Record)
class ParseMessagesFn(CachedSignatures, beam.DoFn):
    """Validates a bundle's messages together and timestamps each record with its event time.

    Messages are buffered per bundle (Pub/Sub hands the DirectRunner ten at a
    time, Dataflow many more) so the contract check runs vectorised; each
    valid record leaves with its payload ``event_time`` as the element
    timestamp. Refused messages become dead letters holding the raw payload,
    its attributes and the reason; they never stop the job.

    A message over the contract's record bound (`contracts.MAX_RECORD_BYTES`;
    Pub/Sub allows 10 MB) is refused as it arrives and never buffered, and
    the buffer is flushed at ``FLUSH_BYTES``: a bundle of large messages
    cannot hold gigabytes in a worker.
    """

    FLUSH_AT = 500
    FLUSH_BYTES = 32 * 1024 * 1024

    def __init__(self, table: str, limits: Optional[InputConfig] = None):
        self._table = table
        self._limits = limits

    def start_bundle(self) -> None:
        self._payloads: List[bytes] = []
        self._attributes: List[Optional[dict]] = []
        self._bytes = 0

    def process(self, message) -> Iterator:
        if isinstance(message, (bytes, str)):
            data, attributes = message, None
        else:
            data, attributes = message.data, dict(message.attributes or {})
        if len(data) > contracts.MAX_RECORD_BYTES:
            _, reason = contracts.parse_json_line(data)   # the bound comes first: no parse
            yield from self._outputs(1, [(reason, data, attributes)],
                                     model.ParsedMessages([], [], []), in_bundle=True)
            return
        self._payloads.append(data)
        self._attributes.append(attributes)
        self._bytes += len(data)
        if len(self._payloads) >= self.FLUSH_AT or self._bytes >= self.FLUSH_BYTES:
            yield from self._flush(in_bundle=True)

    def finish_bundle(self) -> Iterator:
        yield from self._flush(in_bundle=False)

    def _flush(self, in_bundle: bool) -> Iterator:
        if not self._payloads:
            return
        payloads, attributes = self._payloads, self._attributes
        self._payloads, self._attributes, self._bytes = [], [], 0
        parsed = model.parse_messages(self._table, payloads, attributes, self._limits)
        refused = [(reason, payloads[i], attributes[i]) for i, reason in parsed.bad]
        yield from self._outputs(len(payloads), refused, parsed, in_bundle)

    def _outputs(self, read: int, refused: List[Tuple[str, object, Optional[dict]]],
                 parsed: model.ParsedMessages, in_bundle: bool) -> Iterator:
        """Counters, dead letters and records of ``read`` messages.

        In a bundle (``process``) outputs are timestamped values; at its end
        (``finish_bundle``) they must be windowed values (the global window).
        """
        now = Timestamp.now()

        def emit(value, at: Timestamp, tag: Optional[str] = None):
            out = window.TimestampedValue(value, at) if in_bundle else in_global_window(value, at)
            return out if tag is None else beam.pvalue.TaggedOutput(tag, out)

        def counter(name: str, n: int):
            tagged = count(name, n)
            return emit(tagged.value, now, tagged.tag)

        yield counter(f"{self._table}.read", read)
        reasons: Dict[str, int] = {}
        for reason, payload, attributes in refused:
            # An oversized payload (up to Pub/Sub's 10 MB) is stored as its head and size.
            yield emit(dead_letter(self._table, "ParseMessages", reason, payload, attributes),
                       now, Tag.DEAD_LETTER.value)
            reasons[reason] = reasons.get(reason, 0) + 1
        for reason, n in sorted(reasons.items()):
            for tagged in refusal_counts(self._table, reason, n):
                yield emit(tagged.value, now, tagged.tag)
        for status in sorted(set(parsed.attribute_status) - {model.ATTRIBUTE_OK}):
            yield counter(f"{self._table}.event_time_attribute.{status}",
                          parsed.attribute_status.count(status))
        for record in parsed.records:
            yield emit(record, Timestamp(micros=record["event_time_us"]))


class ParseMessages(beam.PTransform):
    """Pub/Sub messages (with attributes) of one table → timestamped records + dead letters.

    ``limits`` are the config's plausibility bounds (``config.inputs``), the
    batch job's own; None keeps the contract's defaults.
    """

    def __init__(self, table: str, limits: Optional[InputConfig] = None):
        super().__init__()
        self._table = table
        self._limits = limits

    def expand(self, messages: beam.PCollection) -> Parsed:
        out = messages | "ParseAndValidate" >> beam.ParDo(
            ParseMessagesFn(self._table, self._limits)).with_outputs(
            Tag.DEAD_LETTER.value, Tag.COUNTS.value, main=Tag.ROWS.value)
        return Parsed(out[Tag.ROWS.value], out[Tag.DEAD_LETTER.value], out[Tag.COUNTS.value])
