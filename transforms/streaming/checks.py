"""Parity with the batch job's checks: unknown SKUs and the treatment funnel, per event.

`CheckSkus` refuses events of SKUs the reference catalogue lacks (the batch
``unknown sku``); `CheckFunnel` refuses treatment events without a send before
them (the batch `campaign.check_funnel`, one event at a time in keyed state).
"""
from __future__ import annotations

import uuid
from typing import Iterator, Optional, Tuple

import apache_beam as beam
import pandas as pd
from apache_beam import typehints
from apache_beam.coders import PickleCoder
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.utils.timestamp import Timestamp

from models import streaming as model
from transforms.health import Tag, count
from transforms.signatures import CachedSignatures, WindowInto
from transforms.streaming.reference import (Reference, cached,
                                            into_version_windows, version_side_input)
from transforms.streaming.refusals import (Checked, KeyOrRefuseFn, Record, dead_letter,
                                           record_text, refusal_counts)
from transforms.streaming.windows import duration_of


@typehints.with_input_types(Record)
@typehints.with_output_types(Record)
class CheckSkusFn(CachedSignatures, beam.DoFn):
    """Dead-letters events whose SKU the current reference catalogue lacks (the batch CheckSkus).

    The SKU set is built once per reference version and worker process.
    ``reference_version`` is the version side input where the job has one
    (`transforms.streaming.reference.version_side_input`); None polls.
    """

    def __init__(self, table: str, reference: Reference):
        self._table = table
        self._reference = reference
        self._key = uuid.uuid4().hex

    def process(self, record: Record, reference_version=None) -> Iterator:
        # reference_version: Optional[ReferenceVersion]; unannotated, as Beam's type check
        # takes the side input's NamedTuple for a mismatch with Optional of it.
        ref = self._reference.current(reference_version)
        skus = cached(self._key, ref.version, lambda: frozenset(ref.catalog["sku"]))
        if record.get("sku") in skus:
            yield record
            return
        reason = model.UNKNOWN_SKU_REASON
        yield beam.pvalue.TaggedOutput(Tag.DEAD_LETTER.value, dead_letter(
            self._table, "CheckSkus", reason, record_text(record)))
        yield from refusal_counts(self._table, reason)


class CheckSkus(beam.PTransform):
    """Events of known SKUs pass; the rest are dead-lettered as the batch job does (unknown sku).

    Applied before deduplication, where the batch job applies it, so a
    redelivered copy of a refused event is refused too and the counts of both
    jobs reconcile the same way (read = processed + dead-lettered + deduplicated).

    With ``versions`` (`ReferenceVersions`, the job's side input on Dataflow)
    records are checked in the versions' fixed windows, each against the
    catalogue of the version checked for its interval (or a newer one), and
    put back in the global window; without, each worker polls.
    """

    def __init__(self, table: str, reference: Reference,
                 versions: Optional[beam.PCollection] = None):
        super().__init__()
        self._table = table
        self._reference = reference
        self._versions = versions

    def expand(self, records: beam.PCollection) -> Checked:
        if self._versions is not None:
            records = into_version_windows(self._reference, "IntoReferenceWindows", records)
        out = records | "KnownSkusOnly" >> beam.ParDo(
            CheckSkusFn(self._table, self._reference),
            **version_side_input(self._versions)).with_outputs(
            Tag.DEAD_LETTER.value, Tag.COUNTS.value, main=Tag.ROWS.value)
        rows, dead, counts = (out[Tag.ROWS.value], out[Tag.DEAD_LETTER.value],
                              out[Tag.COUNTS.value])
        if self._versions is not None:   # the job's keyed steps after this are global-window
            rows, dead, counts = (
                pcoll | f"{name}ToGlobalWindow" >> WindowInto(beam.window.GlobalWindows())
                for name, pcoll in (("Rows", rows), ("DeadLetters", dead), ("Counts", counts)))
        return Checked(rows, dead, counts)


@typehints.with_input_types(Tuple[Tuple[str, str, str], Record])
@typehints.with_output_types(Record)
class FunnelStateFn(CachedSignatures, beam.DoFn):
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
        self._ttl = duration_of(ttl)
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
