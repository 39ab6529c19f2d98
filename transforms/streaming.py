"""Composites of the streaming refresh job: thin Beam adapters over models/streaming.py.

Reading order of the graph (pipelines/streaming_refresh.py wires it):

    Pub/Sub messages → ParseMessages (contract check, event-time timestamps, dead letters)
      → events: CheckSkus (unknown SKUs dead-lettered, as the batch job does)
      → DropDuplicates (stateful per event_id, TTL timer)
      → orders → WindowedPopularity (per-period partials → sliding windows → popularity at end)
               → RankingChanges (consecutive windows → users of vehicles whose top picks moved)
      → events + notices → TouchedUsers (stateful per user: recent stream events)
      → RefreshRecommendations (per refresh period: the touched users, scored like the batch job)
    treatment events → CheckFunnel (stateful per recipient: no send, no count; as batch)
      → StreamingBandit (per-period sums → transforms.bandit.BanditState)

Nothing a message holds can stop the job: every refusal is a dead letter with
a reason (storable: escaped, bounded), and every keyed step refuses a key
Beam could not encode instead of failing its bundle.
    orders, treatment counts → LateDataAudit (seen vs included per window: late and too-late)

Slowly changing inputs (catalogue, fitment, users, order history) come from a
`FileReference`: every DoFn that needs them asks it for the current version,
and it re-reads the files when their fingerprint changes (checked at most
every refresh interval). docs/streaming.md explains why this is not a
PeriodicImpulse side input on the DirectRunner.
"""
from __future__ import annotations

import json
import logging
import threading
import time
import uuid
import zlib
from typing import (Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence,
                    Tuple)

import apache_beam as beam
import pandas as pd
from apache_beam import typehints
from apache_beam.coders import PickleCoder
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.transforms import trigger, window
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import (BagStateSpec, ReadModifyWriteStateSpec, TimerSpec,
                                              on_timer)
from apache_beam.utils.timestamp import Duration, Timestamp
from apache_beam.utils.windowed_value import PaneInfoTiming, WindowedValue

from models import contracts, rules
from models import streaming as model
from models.bandit import BanditConfig
from models.campaign import ALL, KIND_FIELDS, FunnelCounts
from models.config import InputConfig, RecsConfig
from models.streaming import RefreshRequest, WindowSpec
from transforms.bandit import BanditState, KeyedCounts, TreatmentCountsFn
from transforms.bigquery_io import INSERT_BATCH_ROWS, INSERT_RETRY_SECONDS, InsertRows
from transforms.health import NAMESPACE, Tag, count
from transforms.io import find_table, read_frame

Record = dict
DeadLetter = dict
Count = Tuple[str, int]
_LOG = logging.getLogger(__name__)
_US = 1_000_000


def _seconds(delta: pd.Timedelta) -> float:
    return delta / pd.Timedelta(seconds=1)


def _duration(delta: pd.Timedelta) -> Duration:
    return Duration(micros=int(delta // pd.Timedelta(microseconds=1)))


def _utc(stamp: Timestamp) -> pd.Timestamp:
    return pd.Timestamp(stamp.micros, unit="us", tz="UTC")


def sliding_windows(spec: WindowSpec) -> window.SlidingWindows:
    """The Beam WindowFn of a `WindowSpec` (windows start on multiples of the period)."""
    return window.SlidingWindows(_seconds(spec.size), _seconds(spec.period))


def windowed(spec: WindowSpec, accumulation: trigger.AccumulationMode) -> beam.WindowInto:
    """Sliding windows that fire once when the watermark passes their end, then once per late pane.

    Elements within ``spec.lateness`` after the end still count (each late
    pane restates or adds to the window); later ones are dropped by the
    runner, which is why `LateDataAudit` counts what was seen beside it.
    """
    return beam.WindowInto(sliding_windows(spec),
                           trigger=trigger.AfterWatermark(late=trigger.AfterCount(1)),
                           accumulation_mode=accumulation,
                           allowed_lateness=_duration(spec.lateness))


def period_buckets(spec: WindowSpec) -> beam.WindowInto:
    """Fixed windows of one period, where elements are pre-summed before sliding.

    Sliding windows start every period, so every instant of one period lies in
    the same windows: one partial per period (and key) can replace its
    elements, and the sliding fan-out (``spec.overlap`` windows each) applies
    to partials instead of events. A period accepts late data for as long as
    any sliding window holding it does (size + lateness), so pre-summing never
    drops what a window would keep, and its panes discard: a late pane carries
    only the new elements, which the sliding stage then adds or drops per window.
    """
    return beam.WindowInto(window.FixedWindows(_seconds(spec.period)),
                           trigger=trigger.AfterWatermark(late=trigger.AfterCount(1)),
                           accumulation_mode=trigger.AccumulationMode.DISCARDING,
                           allowed_lateness=_duration(spec.size + spec.lateness))


def _global(value, at: Timestamp) -> WindowedValue:
    return WindowedValue(value, at, [window.GlobalWindow()])


def to_global_window(label: str, pcoll: beam.PCollection) -> beam.PCollection:
    """Re-window into the global window so side outputs of any windowing can be flattened."""
    return pcoll | label >> beam.WindowInto(window.GlobalWindows())


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


# --- reference data ------------------------------------------------------------------------

# Per worker process: what each source (by key) last fingerprinted and when, and the data
# built for that fingerprint. A module-level cache, not ``shared.Shared``: the
# bundle-based DirectRunner builds a new DoFn per bundle and Shared keeps alive only
# the last object acquired across all tokens, so both would reload every bundle.
_VERSIONS: Dict[str, Tuple[str, float]] = {}
_LOADED: Dict[str, Tuple[str, object]] = {}
_CACHE_LOCK = threading.Lock()
_LOAD_LOCK = threading.Lock()


def cached(key: str, tag: str, build: Callable[[], object]) -> object:
    """The object built for (key, tag) in this process; a new tag replaces the old object."""
    with _CACHE_LOCK:
        held = _LOADED.get(key)
    if held is not None and held[0] == tag:
        return held[1]
    with _LOAD_LOCK:   # one build at a time: a second caller waits and reuses it
        with _CACHE_LOCK:
            held = _LOADED.get(key)
        if held is None or held[0] != tag:
            held = (tag, build())
            with _CACHE_LOCK:
                _LOADED[key] = held
    return held[1]


class FileReference:
    """Catalogue, fitment, users and order history from an input directory, reloaded on change.

    `current` fingerprints the files (path, size, modification time) at most
    every ``refresh_seconds`` per worker process and rebuilds
    `models.streaming.ReferenceData` when the fingerprint changed, once per
    process, so a new catalogue is picked up without restarting the job.
    Every DoFn handed the same instance shares the data.
    """

    def __init__(self, input_dir: str, config: RecsConfig, refresh_seconds: float,
                 history_table: str = "events"):
        self.input_dir = input_dir
        self.config = config
        self.refresh_seconds = float(refresh_seconds)
        self.history_table = history_table
        self.tables = ("catalog", "users") + (
            ("fitment",) if config.fitment_attributes else ()) + (
            (history_table,) if history_table else ())
        self.key = uuid.uuid4().hex

    def check(self) -> None:
        """Fails fast (at start-up) when an input is missing."""
        for table in self.tables:
            find_table(self.input_dir, table)

    def fingerprint(self) -> str:
        """Path, size and modification time of every input: changes when a file is replaced."""
        parts = []
        for table in self.tables:
            path = find_table(self.input_dir, table)
            meta = FileSystems.match([path])[0].metadata_list[0]
            parts.append(f"{table}:{meta.size_in_bytes}:{meta.last_updated_in_seconds}")
        return "|".join(parts)

    def version(self) -> str:
        """The inputs' fingerprint, re-checked at most every ``refresh_seconds`` per process."""
        now = time.monotonic()
        with _CACHE_LOCK:
            known = _VERSIONS.get(self.key)
        if known is None or now - known[1] >= self.refresh_seconds:
            known = (self.fingerprint(), now)
            with _CACHE_LOCK:
                _VERSIONS[self.key] = known
        return known[0]

    def current(self) -> model.ReferenceData:
        """The reference data in force now (reloaded when the inputs changed)."""
        version = self.version()
        return cached(self.key, version, lambda: self._load(version))

    def _load(self, version: str) -> model.ReferenceData:
        started = time.perf_counter()
        frames, rejected = {}, {}
        for table in self.tables:
            frames[table], rejected[table] = read_frame(self.input_dir, table)
        data = model.build_reference(
            frames["catalog"], frames.get("fitment"), frames["users"],
            frames.get(self.history_table), self.config, version)
        Metrics.counter(NAMESPACE, "reference.loads").inc()
        _LOG.info("reference data %s loaded in %.1f s (rejected rows: %s)", version,
                  time.perf_counter() - started, rejected)
        return data


# --- parsing Pub/Sub messages ---------------------------------------------------------------

class Parsed(NamedTuple):
    """A parsed stream: timestamped records, dead letters, counters (all in the global window)."""

    rows: beam.PCollection
    dead_letters: beam.PCollection
    counts: beam.PCollection


@typehints.with_input_types(typehints.Any)
@typehints.with_output_types(Record)
class ParseMessagesFn(beam.DoFn):
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
            out = window.TimestampedValue(value, at) if in_bundle else _global(value, at)
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


# --- duplicates ---------------------------------------------------------------------------------

@typehints.with_input_types(Tuple[str, Record])
@typehints.with_output_types(Record)
class DropDuplicateIdsFn(beam.DoFn):
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
        self._ttl = _duration(ttl)

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
class KeyOrRefuseFn(beam.DoFn):
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


# --- parity with the batch job: unknown SKUs, the treatment funnel --------------------------------

@typehints.with_input_types(Record)
@typehints.with_output_types(Record)
class CheckSkusFn(beam.DoFn):
    """Dead-letters events whose SKU the current reference catalogue lacks (the batch CheckSkus).

    The SKU set is built once per reference version and worker process.
    """

    def __init__(self, table: str, reference: FileReference):
        self._table = table
        self._reference = reference
        self._key = uuid.uuid4().hex

    def process(self, record: Record) -> Iterator:
        ref = self._reference.current()
        skus = cached(self._key, ref.version, lambda: frozenset(ref.catalog["sku"]))
        if record.get("sku") in skus:
            yield record
            return
        reason = model.UNKNOWN_SKU_REASON
        yield beam.pvalue.TaggedOutput(Tag.DEAD_LETTER.value, dead_letter(
            self._table, "CheckSkus", reason, record_text(record)))
        yield from refusal_counts(self._table, reason)


class CheckSkus(beam.PTransform):
    """Events of known SKUs pass; the rest are dead-lettered as the batch job does (``unknown sku``).

    Applied before deduplication, where the batch job applies it, so a
    redelivered copy of a refused event is refused too and the counts of both
    jobs reconcile the same way (read = processed + dead-lettered + deduplicated).
    """

    def __init__(self, table: str, reference: FileReference):
        super().__init__()
        self._table = table
        self._reference = reference

    def expand(self, records: beam.PCollection) -> Checked:
        out = records | "KnownSkusOnly" >> beam.ParDo(
            CheckSkusFn(self._table, self._reference)).with_outputs(
            Tag.DEAD_LETTER.value, Tag.COUNTS.value, main=Tag.ROWS.value)
        return Checked(out[Tag.ROWS.value], out[Tag.DEAD_LETTER.value], out[Tag.COUNTS.value])


@typehints.with_input_types(Tuple[Tuple[str, str, str], Record])
@typehints.with_output_types(Record)
class FunnelStateFn(beam.DoFn):
    """Per recipient (campaign, treatment, user): events without a send are dead letters.

    The batch job's `campaign.check_funnel`, event by event
    (`models.streaming.funnel_step`): state is the earliest SENT's time and
    the kinds already counted; an event other than SENT with no send before
    it is refused with the batch job's words (``'click without send'``), a
    stage reached twice is reconciled as a duplicate (as the batch job counts
    it). The state is cleared by an event-time timer ``ttl`` after the send:
    the TTL covers a window plus its allowed lateness, the longest a click can
    still meet its send in a bandit window (a click later than that could
    not count with it in any window anyway).

    Unlike the batch job, which sees every event at once, the stream judges a
    click on what arrived before it: a click that arrives ahead of its own
    send (Pub/Sub does not order messages) is refused as without send.
    """

    MEMORY = ReadModifyWriteStateSpec("memory", PickleCoder())
    EXPIRY = TimerSpec("expiry", TimeDomain.WATERMARK)

    def __init__(self, ttl: pd.Timedelta, table: str = "treatment_events"):
        self._ttl = _duration(ttl)
        self._table = table

    def process(self, element: Tuple[Tuple[str, str, str], Record],
                memory=beam.DoFn.StateParam(MEMORY),
                expiry=beam.DoFn.TimerParam(EXPIRY)) -> Iterator:
        _, record = element
        before = memory.read()
        at, kind = int(record["event_time_us"]), record["kind"]
        verdict = model.funnel_step(before, kind, at)
        if verdict.refusal is not None:
            yield beam.pvalue.TaggedOutput(Tag.DEAD_LETTER.value, dead_letter(
                self._table, "CheckFunnel", verdict.refusal, record_text(record)))
            yield from refusal_counts(self._table, verdict.refusal)
            return
        if verdict.memory != before:
            memory.write(verdict.memory)
            if before is None or verdict.memory.sent_at_us != before.sent_at_us:
                expiry.set(Timestamp(micros=verdict.memory.sent_at_us) + self._ttl)
        if verdict.repeat:
            # A stage reached twice is one stage reached (the batch CheckFunnel's counters).
            yield count(f"{self._table}.deduplicated", 1)
            yield count(f"{self._table}.repeated.{kind}", 1)
            return
        yield record

    @on_timer(EXPIRY)
    def expire(self, memory=beam.DoFn.StateParam(MEMORY)) -> None:
        memory.clear()


class CheckFunnel(beam.PTransform):
    """Treatment records → those consistent with their recipient's send (the batch CheckFunnel)."""

    def __init__(self, ttl: pd.Timedelta, table: str = "treatment_events"):
        super().__init__()
        self._ttl = ttl
        self._table = table

    def expand(self, records: beam.PCollection) -> Checked:
        keyed = records | "KeyByRecipient" >> beam.ParDo(
            KeyOrRefuseFn(self._table, "CheckFunnel", model.RECIPIENT_KEY)).with_output_types(
            Tuple[Tuple[str, str, str], Record]).with_outputs(
            Tag.DEAD_LETTER.value, Tag.COUNTS.value, main=Tag.ROWS.value)
        out = (keyed[Tag.ROWS.value]
               | "FirstOfEachStage" >> beam.ParDo(
                   FunnelStateFn(self._ttl, self._table)).with_outputs(
                   Tag.DEAD_LETTER.value, Tag.COUNTS.value, main=Tag.ROWS.value))
        dead = ((keyed[Tag.DEAD_LETTER.value], out[Tag.DEAD_LETTER.value])
                | "FlattenFunnelDeadLetters" >> beam.Flatten())
        counts = ((keyed[Tag.COUNTS.value], out[Tag.COUNTS.value])
                  | "FlattenFunnelCounts" >> beam.Flatten())
        return Checked(out[Tag.ROWS.value], dead, counts)


# --- rolling popularity --------------------------------------------------------------------------

OrderLines = Dict[model.OrderKey, model.OrderLine]


@typehints.with_input_types(Record)
@typehints.with_output_types(Tuple[OrderLines, int])
class OrderLinesCombineFn(beam.CombineFn):
    """A window's distinct order lines.

    Accumulator: ``(lines, events)``: ``lines`` maps (order_id, sku) to the
    earliest (event_time_us, event_id, user_id, event_name) reporting it, so
    one order under three event names is one line (as the batch job's
    `order_lines`); ``events`` counts the order events added. Merging keeps the
    earliest line per key and sums the counts, so bundles may split anywhere.
    """

    def create_accumulator(self) -> Tuple[OrderLines, int]:
        return {}, 0

    def add_input(self, acc: Tuple[OrderLines, int], record: Record) -> Tuple[OrderLines, int]:
        lines, events = acc
        model.add_order(lines, record)
        return lines, events + 1

    def merge_accumulators(self, accs: Iterable[Tuple[OrderLines, int]]
                           ) -> Tuple[OrderLines, int]:
        # The first accumulator absorbs the others (Beam lets a merge reuse its first input).
        accs = iter(accs)
        lines, events = next(accs, ({}, 0))
        for more, n in accs:
            model.merge_orders_into(lines, more)
            events += n
        return lines, events

    def extract_output(self, acc: Tuple[OrderLines, int]) -> Tuple[OrderLines, int]:
        # A copy: with accumulating panes the accumulator keeps growing after it is emitted.
        return dict(acc[0]), acc[1]

    def default_label(self) -> str:
        return "OrderLinesPerPeriod"


@typehints.with_input_types(Tuple[OrderLines, int])
@typehints.with_output_types(Tuple[OrderLines, int])
class MergeOrderLinesCombineFn(OrderLinesCombineFn):
    """Merges per-period order lines into a window's (same accumulator as `OrderLinesCombineFn`)."""

    def add_input(self, acc: Tuple[OrderLines, int], partial: Tuple[OrderLines, int]
                  ) -> Tuple[OrderLines, int]:
        lines, events = acc
        model.merge_orders_into(lines, partial[0])   # the partial itself is never modified
        return lines, events + partial[1]

    def default_label(self) -> str:
        return "OrderLinesPerWindow"


class WindowPopularity(NamedTuple):
    """Popularity of one pane of one window (``as_of`` = the window's end)."""

    window_start: pd.Timestamp
    window_end: pd.Timestamp
    timing: str          # ON_TIME or LATE (EARLY never: no early firings)
    is_first: bool       # the window's first pane (what refreshes and change detection use)
    events: int          # order events the window included so far
    lines: int           # distinct order lines among them
    popularity: pd.DataFrame


@typehints.with_input_types(Tuple[OrderLines, int])
@typehints.with_output_types(WindowPopularity)
class PopularityAtWindowEndFn(beam.DoFn):
    """A window's order lines → its segment popularity, scored at the window's end."""

    def __init__(self, reference: FileReference, config: RecsConfig):
        self._reference = reference
        self._config = config

    def process(self, acc: Tuple[OrderLines, int], win=beam.DoFn.WindowParam,
                pane=beam.DoFn.PaneInfoParam) -> Iterator:
        lines, events = acc
        end = _utc(win.end)
        frame = model.window_popularity(model.orders_frame(lines), self._reference.current(),
                                        end, self._config)
        timing = PaneInfoTiming.to_string(pane.timing)
        yield count("popularity.panes", 1)
        if pane.timing == PaneInfoTiming.LATE:
            yield count("popularity.late_panes", 1)
        yield WindowPopularity(_utc(win.start), end, timing, bool(pane.is_first), events,
                               len(lines), frame)


class PopularityOut(NamedTuple):
    """Every pane (sliding-windowed), the first pane of each window, and counters."""

    panes: beam.PCollection
    first_panes: beam.PCollection
    counts: beam.PCollection


class WindowedPopularity(beam.PTransform):
    """Timestamped order records → segment popularity per sliding window.

    Trigger: one pane when the watermark passes a window's end, then one per
    late element within the allowed lateness; panes accumulate, so a late
    pane restates its window whole. Refreshes use each window's first pane
    only: a late order also falls in windows that have not closed yet (the
    lateness is shorter than a window), so it reaches the next refresh anyway.
    """

    def __init__(self, spec: WindowSpec, reference: FileReference, config: RecsConfig):
        super().__init__()
        self._spec = spec
        self._reference = reference
        self._config = config

    def expand(self, orders: beam.PCollection) -> PopularityOut:
        panes = (orders
                 | "PeriodBuckets" >> period_buckets(self._spec)
                 | "OrderLinesPerPeriod" >> beam.CombineGlobally(
                     OrderLinesCombineFn()).without_defaults()
                 | "SlidingWindows" >> windowed(self._spec,
                                                trigger.AccumulationMode.ACCUMULATING)
                 | "OrderLinesPerWindow" >> beam.CombineGlobally(
                     MergeOrderLinesCombineFn()).without_defaults()
                 | "PopularityAtWindowEnd" >> beam.ParDo(
                     PopularityAtWindowEndFn(self._reference, self._config)).with_outputs(
                     Tag.COUNTS.value, main=Tag.ROWS.value))
        rows = panes[Tag.ROWS.value]
        first = rows | "FirstPaneOfWindow" >> beam.Filter(lambda p: p.is_first)
        return PopularityOut(rows, first, panes[Tag.COUNTS.value])


# --- late-data audit ----------------------------------------------------------------------------

AuditKey = Tuple[str, int, int]        # (stream, window start µs, window end µs)
AuditUpdate = Tuple[str, int]          # ("seen" | "on_time" | "late", n)
_AUDIT_KINDS = ("seen", "on_time", "late")


@typehints.with_input_types(typehints.Any)
@typehints.with_output_types(Tuple[AuditKey, AuditUpdate])
class SeenPerWindowFn(beam.DoFn):
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
            yield _global(((self._stream, start, end), ("seen", n)), Timestamp(micros=first))
        self._seen = {}


@typehints.with_input_types(int)
@typehints.with_output_types(Tuple[AuditKey, AuditUpdate])
class PaneCountFn(beam.DoFn):
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
class ReconcileWindowFn(beam.DoFn):
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
        self._lateness = _duration(spec.lateness)

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
                    | "OnePerElement" >> beam.Map(lambda _: 1)
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


# --- users whose ranking changed -----------------------------------------------------------------

@typehints.with_input_types(Tuple[int, WindowPopularity])
@typehints.with_output_types(Tuple[WindowPopularity, WindowPopularity])
class PairWithPreviousFn(beam.DoFn):
    """Emits (previous window, this window) for consecutive first panes (one key, global window)."""

    PREVIOUS = ReadModifyWriteStateSpec("previous", PickleCoder())

    def process(self, element: Tuple[int, WindowPopularity],
                previous=beam.DoFn.StateParam(PREVIOUS)) -> Iterator:
        _, current = element
        before = previous.read()
        # An older window arriving after a newer one has nothing newer to compare with.
        if before is None or before.window_end < current.window_end:
            previous.write(current)
            if before is not None:
                yield window.TimestampedValue((before, current), current.window_end.timestamp())


Notice = Tuple[str, Tuple[str, object]]     # (user_id, ("notice", reason))


@typehints.with_input_types(Tuple[WindowPopularity, WindowPopularity])
@typehints.with_output_types(Notice)
class ChangedVehiclesFn(beam.DoFn):
    """Users of every vehicle whose default top picks differ between two consecutive windows."""

    def __init__(self, reference: FileReference, config: RecsConfig):
        self._reference = reference
        self._config = config

    def process(self, pair: Tuple[WindowPopularity, WindowPopularity]) -> Iterator:
        before, after = pair
        ref = self._reference.current()
        vehicles = model.changed_vehicles(
            model.scorer(ref, before.popularity, self._config),
            model.scorer(ref, after.popularity, self._config),
            before.popularity, after.popularity, ref, self._config)
        users = [u for v in vehicles for u in ref.vehicle_users[v]]
        yield count("ranking.vehicles_changed", len(vehicles))
        yield count("ranking.users_notified", len(users))
        at = after.window_end.timestamp()
        for user in users:
            yield window.TimestampedValue((user, ("notice", model.REASON_SEGMENT)), at)


class RankingChanges(beam.PTransform):
    """First panes of popularity → a notice for every user whose vehicle's ranking changed."""

    def __init__(self, reference: FileReference, config: RecsConfig):
        super().__init__()
        self._reference = reference
        self._config = config

    def expand(self, first_panes: beam.PCollection) -> RowsAndCounts:
        out = (first_panes
               | "PopularityToGlobalWindow" >> beam.WindowInto(window.GlobalWindows())
               | "OneKey" >> beam.Map(lambda p: (0, p)).with_output_types(
                   Tuple[int, WindowPopularity])
               | "PairWithPrevious" >> beam.ParDo(PairWithPreviousFn())
               | "ChangedVehicles" >> beam.ParDo(
                   ChangedVehiclesFn(self._reference, self._config)).with_outputs(
                   Tag.COUNTS.value, main=Tag.ROWS.value))
        return RowsAndCounts(out[Tag.ROWS.value], out[Tag.COUNTS.value])


# --- touched users --------------------------------------------------------------------------------

Touch = Tuple[str, Tuple[str, object]]       # (user_id, ("event", event tuple) | ("notice", reason))


def event_touch(record: Record) -> Touch:
    """A user's event as the compact tuple kept in state."""
    return record["user_id"], ("event", (record["event_id"], record["event_name"], record["sku"],
                                         record.get("order_id"), record["event_time_us"]))


@typehints.with_input_types(Touch)
@typehints.with_output_types(Tuple[str, RefreshRequest])
class UserSignalsFn(beam.DoFn):
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
        touches = events | "UserOfEvent" >> beam.Map(event_touch).with_output_types(Touch)
        return ((touches, notices)
                | "FlattenTouches" >> beam.Flatten()
                | "UserSignals" >> beam.ParDo(UserSignalsFn(self._config)))


# --- refreshed recommendations ------------------------------------------------------------------

@typehints.with_input_types(typehints.Any)
@typehints.with_output_types(typehints.Any)
class StampRefreshTimeFn(beam.DoFn):
    """Moves an element's timestamp to now (never back): a refresh happens when it is asked for.

    An old event (late data, a replayed backlog) must refresh the user with
    today's catalogue and popularity, not be filed under its own past window.
    ``clock`` is injectable so TestStream tests can keep event times.
    """

    def __init__(self, clock: Callable[[], float] = time.time):
        self._clock = clock

    def process(self, element, timestamp=beam.DoFn.TimestampParam) -> Iterator:
        now = Timestamp(micros=int(self._clock() * _US))
        yield window.TimestampedValue(element, max(timestamp, now))


def shard_of_user(user_id: str, num_shards: int) -> int:
    """Stable shard of a user id (the same in every worker process)."""
    # surrogatepass: a hash never fails, whatever text reached it.
    return zlib.crc32(user_id.encode("utf-8", "surrogatepass")) % num_shards


@typehints.with_input_types(Tuple[int, Iterable[Tuple[str, RefreshRequest]]],
                            typehints.Optional[WindowPopularity])
@typehints.with_output_types(pd.DataFrame)
class RefreshShardFn(beam.DoFn):
    """Scores one refresh period's touched users of one shard against that period's popularity.

    The popularity is the side input of the sliding window that closes with
    this refresh period; a window without orders has none, and then the
    history alone is scored at the window's end. The scorer is built once per
    window and worker process and reused by every shard.
    """

    def __init__(self, reference: FileReference, config: RecsConfig, run_id: str,
                 model_version: str, clock: Callable[[], float] = time.time):
        self._reference = reference
        self._config = config
        self._run_id = run_id
        self._model_version = model_version
        self._clock = clock
        self._key = uuid.uuid4().hex

    def _scorer(self, ref: model.ReferenceData, pop: Optional[WindowPopularity],
                end: pd.Timestamp) -> model.Scorer:
        def build() -> model.Scorer:
            frame = pop.popularity if pop is not None else model.window_popularity(
                model.orders_frame({}), ref, end, self._config)
            return model.scorer(ref, frame, self._config)
        return cached(self._key, f"{end.value}|{ref.version}|{pop is not None}", build)

    def process(self, element, pop: Optional[WindowPopularity],
                win=beam.DoFn.WindowParam) -> Iterator:
        _, requests = element
        requests = model.merge_requests(requests)
        end = _utc(win.end)
        ref = self._reference.current()
        scorer = self._scorer(ref, pop, end)
        out = model.refresh_users(requests, ref, scorer, end, self._config)
        yield count("refresh.requests", len(requests))
        yield count("refresh.unknown_users", len(out.unknown_users))
        yield count("refresh.duplicate_users", len(out.duplicate_users))
        if pop is None:
            yield count("refresh.without_window_popularity", 1)
        if len(out.unserved):
            yield count("users.unserved", len(out.unserved))
            yield count(f"dead_letter.{model.recommend.UNSERVED_REASON}", len(out.unserved))
            for user in out.unserved["user_id"]:
                yield beam.pvalue.TaggedOutput(Tag.DEAD_LETTER.value, dead_letter(
                    "users", "RefreshRecommendations", model.recommend.UNSERVED_REASON,
                    json.dumps({"user_id": user})))
        if not len(out.rows):
            return
        context = rules.QAContext(
            catalog=ref.catalog.set_index("sku"), fitting=ref.fitting,
            bought=dict(zip(out.signals["user_id"], out.signals["bought"])),
            popularity=scorer.index, catalog_skus=ref.arrays.sku,
            eligible_skus=frozenset(ref.arrays.sku[ref.arrays.eligible]))
        for rule, n in rules.check(out.rows, context, self._config).items():
            if n:
                yield count(f"qa.rule_{rule}", n)
        for source, n in out.rows["source"].value_counts().items():
            yield count(f"users.source.{source}", int(n))
        yield count("recommendations.written", len(out.rows))
        n = self._config.rules.recs_per_user
        columns = model.recommend.rec_columns(n)
        yield out.rows[columns + ["reason"]].assign(
            generated_at=pd.Timestamp(int(self._clock() * _US), unit="us", tz="UTC"),
            run_id=self._run_id, model_version=self._model_version, popularity_as_of=end)


class Refreshed(NamedTuple):
    rows: beam.PCollection          # recommendation frames (SPEC §3 + reason, stamps)
    dead_letters: beam.PCollection
    counts: beam.PCollection


class RefreshRecommendations(beam.PTransform):
    """Refresh requests → recommendation rows, once per period for the users touched in it.

    Requests are stamped with the time they are served and gathered per
    refresh period (fixed windows of the popularity's period, so each one
    ends with the sliding window whose popularity it uses), sharded by user.
    """

    def __init__(self, reference: FileReference, popularity: beam.PCollection,
                 config: RecsConfig, spec: WindowSpec, num_shards: int, run_id: str,
                 model_version: str, clock: Callable[[], float] = time.time):
        super().__init__()
        self._reference = reference
        self._popularity = popularity
        self._config = config
        self._spec = spec
        self._num_shards = num_shards
        self._run_id = run_id
        self._model_version = model_version
        self._clock = clock

    def expand(self, requests: beam.PCollection) -> Refreshed:
        out = (requests
               | "StampRefreshTime" >> beam.ParDo(StampRefreshTimeFn(self._clock))
               | "RefreshPeriods" >> beam.WindowInto(
                   window.FixedWindows(_seconds(self._spec.period)),
                   allowed_lateness=_duration(self._spec.lateness))
               | "ShardByUser" >> beam.Map(
                   lambda kv, n: (shard_of_user(kv[0], n), kv), self._num_shards)
               | "GatherShard" >> beam.GroupByKey()
               | "RefreshShard" >> beam.ParDo(
                   RefreshShardFn(self._reference, self._config, self._run_id,
                                  self._model_version, self._clock),
                   beam.pvalue.AsSingleton(self._popularity, default_value=None)).with_outputs(
                   Tag.DEAD_LETTER.value, Tag.COUNTS.value, main=Tag.ROWS.value))
        return Refreshed(out[Tag.ROWS.value], out[Tag.DEAD_LETTER.value], out[Tag.COUNTS.value])


# --- bandit ---------------------------------------------------------------------------------------

_KINDS = tuple(KIND_FIELDS)


def treatment_counts(record: Record) -> KeyedCounts:
    """One treatment event as a one-hot ``((treatment_id, ALL), FunnelCounts)``."""
    return (record["treatment_id"], ALL), FunnelCounts(
        *(int(record["kind"] == kind) for kind in _KINDS))


class StreamingBandit(beam.PTransform):
    """Timestamped treatment records → `bandit_state` frames, one per window pane.

    The very transform the batch job uses (`transforms.bandit.BanditState`),
    fed per-period sums as the batch job feeds it per-bucket sums (here the
    sums are a streaming combine, so late messages add late deltas); late
    panes restate a window, and its latest row wins.
    """

    def __init__(self, config: BanditConfig, spec: WindowSpec):
        super().__init__()
        self._config = config
        self._spec = spec

    def expand(self, treatments: beam.PCollection):
        return (treatments
                | "CountsPerMessage" >> beam.Map(treatment_counts).with_output_types(KeyedCounts)
                | "PeriodBuckets" >> period_buckets(self._spec)
                | "SumPerPeriod" >> beam.CombinePerKey(TreatmentCountsFn()).with_output_types(
                    KeyedCounts)
                | "BanditState" >> BanditState(self._config, self._spec.size, self._spec.period,
                                               self._spec.lateness))


# --- run health ------------------------------------------------------------------------------------

@typehints.with_input_types(Tuple[int, Iterable[Count]])
@typehints.with_output_types(dict)
class CountersRowFn(beam.DoFn):
    """One period's summed counters → one `streaming_health` row."""

    def process(self, element, win=beam.DoFn.WindowParam) -> Iterator[dict]:
        _, counts = element
        totals: Dict[str, int] = {}
        for name, n in counts:
            totals[name] = totals.get(name, 0) + int(n)
        yield {"kind": "counters", "stream": None, "window_start": _utc(win.start),
               "window_end": _utc(win.end), "counters": json.dumps(dict(sorted(totals.items())))}


class PeriodCounters(beam.PTransform):
    """Counter elements (global window) → one health row per period with every counter's sum."""

    def __init__(self, period: pd.Timedelta, clock: Callable[[], float] = time.time):
        super().__init__()
        self._period = period
        self._clock = clock

    def expand(self, counts: beam.PCollection) -> beam.PCollection:
        return (counts
                | "StampCountTime" >> beam.ParDo(StampRefreshTimeFn(self._clock))
                | "CounterPeriods" >> beam.WindowInto(window.FixedWindows(_seconds(self._period)))
                | "SumPerName" >> beam.CombinePerKey(sum)
                | "OneKey" >> beam.Map(lambda kv: (0, kv))
                | "GatherPeriod" >> beam.GroupByKey()
                | "CountersRow" >> beam.ParDo(CountersRowFn()))


# --- BigQuery ---------------------------------------------------------------------------------------

def _fields(*pairs: Tuple[str, str]) -> List[dict]:
    return [{"name": name, "type": kind, "mode": "NULLABLE"} for name, kind in pairs]


def recommendation_fields(n: int) -> List[dict]:
    """`recommendation_updates`: SPEC §3 columns, why and when the row was refreshed."""
    pairs = []
    for name in model.recommend.rec_columns(n):
        if name == "year":
            kind = "INT64"
        elif name.endswith(("_price", "_score")):
            kind = "FLOAT64"
        else:
            kind = "STRING"
        pairs.append((name, kind))
    pairs += [("reason", "STRING"), ("generated_at", "TIMESTAMP"), ("run_id", "STRING"),
              ("model_version", "STRING"), ("popularity_as_of", "TIMESTAMP")]
    return _fields(*pairs)


BANDIT_FIELDS = _fields(
    ("window_start", "TIMESTAMP"), ("window_end", "TIMESTAMP"), ("segment", "STRING"),
    ("treatment_id", "STRING"), ("sent", "INT64"), ("delivered", "INT64"),
    ("delivery_failed", "INT64"), ("views", "INT64"), ("clicks", "INT64"),
    ("clicks_capped", "INT64"), ("alpha", "FLOAT64"), ("beta", "FLOAT64"), ("mean", "FLOAT64"),
    ("ci_low", "FLOAT64"), ("ci_high", "FLOAT64"), ("p_best", "FLOAT64"), ("weight", "FLOAT64"),
    ("generated_at", "TIMESTAMP"), ("run_id", "STRING"))

HEALTH_FIELDS = _fields(
    ("run_id", "STRING"), ("kind", "STRING"), ("stream", "STRING"),
    ("window_start", "TIMESTAMP"), ("window_end", "TIMESTAMP"), ("seen", "INT64"),
    ("on_time", "INT64"), ("late", "INT64"), ("too_late", "INT64"), ("counters", "STRING"),
    ("emitted_at", "TIMESTAMP"))

DEAD_LETTER_FIELDS = _fields(
    ("table", "STRING"), ("step", "STRING"), ("reason", "STRING"), ("record", "STRING"),
    ("attributes", "STRING"), ("run_id", "STRING"), ("received_at", "TIMESTAMP"))


def stamp(row: dict, run_id: str, at_field: str, clock: Callable[[], float] = time.time) -> dict:
    """A row with the run id and the current time under ``at_field``."""
    return {**row, "run_id": run_id,
            at_field: pd.Timestamp(int(clock() * _US), unit="us", tz="UTC")}


def to_bigquery_row(row: dict) -> dict:
    """A dict row with JSON-safe values (ISO times, None for missing)."""
    return {k: model.json_safe_value(v) for k, v in row.items()}


class WriteRows(beam.PTransform):
    """Dict rows → one BigQuery table; rows not written come back as dead letters.

    `transforms.bigquery_io.InsertRows` does the writing: batched streaming
    inserts retried through outages for at most ``retry_seconds`` per bundle.
    """

    def __init__(self, table_spec: str, fields: Sequence[dict],
                 batch_size: int = INSERT_BATCH_ROWS,
                 retry_seconds: float = INSERT_RETRY_SECONDS):
        super().__init__()
        self._table_spec = table_spec
        self._table = {"schema": {"fields": list(fields)}}
        self._batch_size = batch_size
        self._retry_seconds = retry_seconds

    def expand(self, rows: beam.PCollection) -> beam.PCollection:
        table = self._table_spec.split(".")[-1]
        failed = rows | "StreamingInsert" >> beam.ParDo(InsertRows(
            self._table_spec, self._table, self._batch_size, self._retry_seconds))
        return failed | "RefusedRows" >> beam.Map(
            lambda failed, name: dead_letter(name, "WriteToBigQuery",
                                             f"bigquery refused the row: {failed[2]}",
                                             json.dumps(failed[1], default=str)), table)


def frames_to_rows(label: str, frames: beam.PCollection) -> beam.PCollection:
    """Frames → JSON-safe dict rows."""
    return frames | label >> beam.FlatMap(model.json_safe_rows)
