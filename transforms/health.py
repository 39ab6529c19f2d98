"""Run-health plumbing: output tags, counters as data, dead-letter frames.

Counters travel as ``(name, count)`` elements as well as Beam metrics, so the
``pipeline_runs`` row is computed inside the pipeline (Dataflow's launcher
exits before the job ends) and the counts can be reconciled in tests.
"""
from __future__ import annotations

import enum
from typing import Iterable, Sequence, Tuple

import apache_beam as beam
import numpy as np
import pandas as pd
from apache_beam import typehints
from apache_beam.metrics import Metrics

from models.contracts import storable_text

Count = Tuple[str, int]
DEAD_LETTER_COLUMNS = ("table", "step", "reason", "record")
NAMESPACE = "segment_recs"


class Tag(str, enum.Enum):
    """Output tags of multi-output DoFns."""

    ROWS = "rows"
    DEAD_LETTER = "dead_letter"
    COUNTS = "counts"
    QA = "qa"


def count(name: str, value: int) -> beam.pvalue.TaggedOutput:
    """A counter increment, both as a Beam metric and as a tagged ``(name, n)`` element."""
    Metrics.counter(NAMESPACE, name).inc(int(value))
    return beam.pvalue.TaggedOutput(Tag.COUNTS.value, (name, int(value)))


def dead_letters(table: str, step: str, reasons: Sequence[str],
                 records: Sequence[str]) -> pd.DataFrame:
    """A dead-letter frame: the original record text and why it was refused.

    Record text is made storable (lone surrogates escaped): the record that a
    writer could not take must not stop the write of its own dead letter.
    """
    return pd.DataFrame({
        "table": np.full(len(reasons), table, dtype=object),
        "step": np.full(len(reasons), step, dtype=object),
        "reason": np.asarray(reasons, dtype=object),
        "record": np.asarray([storable_text(r) if isinstance(r, str) else r for r in records],
                             dtype=object),
    })


class CountRows(beam.PTransform):
    """``(name, total rows)`` of a frame collection; 0 when it is empty."""

    def __init__(self, name: str):
        super().__init__()
        self._name = name

    def expand(self, frames: beam.PCollection) -> beam.PCollection:
        return (frames
                | "RowsPerFrame" >> beam.Map(len)
                | "SumRows" >> beam.CombineGlobally(sum)
                | "NameCount" >> beam.Map(lambda n, name: (name, int(n)), self._name))


@typehints.with_input_types(pd.DataFrame)
@typehints.with_output_types(Count)
class _DeadLetterCountsFn(beam.DoFn):
    def process(self, frame: pd.DataFrame) -> Iterable[Count]:
        for (table, reason), n in frame.groupby(["table", "reason"]).size().items():
            yield f"{table}.dead_lettered", int(n)
            yield f"dead_letter.{reason}", int(n)


class DeadLetterCounts(beam.PTransform):
    """Per-table and per-reason dead-letter counts (``events.dead_lettered``, ``dead_letter.<reason>``)."""

    def expand(self, frames: beam.PCollection) -> beam.PCollection:
        return frames | "CountByTableAndReason" >> beam.ParDo(_DeadLetterCountsFn())


class SumCounts(beam.PTransform):
    """All counter elements summed per name into one dict (a singleton)."""

    def expand(self, counts: beam.PCollection) -> beam.PCollection:
        return (counts
                | "SumPerName" >> beam.CombinePerKey(sum)
                | "ToDict" >> beam.combiners.ToDict())
