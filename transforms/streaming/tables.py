"""The streaming job's BigQuery output: table fields, row stamping, JSON-safe rows, the writer.

The fields of `recommendation_updates`, `bandit_state` and the dead-letter
table are the batch job's schemas (`transforms.schemas`, `transforms.campaign`)
plus the stream's own columns, so the two jobs' tables cannot drift apart;
`streaming_health` is the stream's alone. Writing goes through the batch job's
`transforms.bigquery_io.InsertRows` (batched streaming inserts retried through
outages); rows BigQuery refuses come back as dead letters.
"""
from __future__ import annotations

import json
import time
from typing import Callable, List, Sequence, Tuple

import apache_beam as beam
import pandas as pd
import pyarrow as pa

from models import streaming as model
from models.recommend import rec_columns
from transforms import schemas
from transforms.bigquery_io import INSERT_BATCH_ROWS, INSERT_RETRY_SECONDS, InsertRows
from transforms.campaign import BANDIT_STATE
from transforms.signatures import FlatMapFn, MapFn
from transforms.streaming.refusals import dead_letter
from transforms.streaming.windows import MICROS


def _fields(*pairs: Tuple[str, str]) -> List[dict]:
    return [{"name": name, "type": kind, "mode": "NULLABLE"} for name, kind in pairs]


def recommendation_fields(n: int) -> List[dict]:
    """`recommendation_updates`: SPEC §3 columns, why and when the row was refreshed.

    The batch job's `transforms.schemas.recommendations` with the stream's
    ``reason`` after the SPEC §3 columns and ``popularity_as_of`` at the end,
    so a column type fixed for batch is fixed here too.
    """
    batch = schemas.recommendations(n)
    streaming = batch.insert(len(rec_columns(n)), pa.field("reason", pa.string())).append(
        pa.field("popularity_as_of", schemas.TIMESTAMP))
    return schemas.bigquery_fields(streaming)


# The batch `bandit_state` (transforms.campaign.BANDIT_STATE) stamped with when and by which run.
BANDIT_FIELDS = schemas.bigquery_fields(BANDIT_STATE) + _fields(
    ("generated_at", "TIMESTAMP"), ("run_id", "STRING"))

HEALTH_FIELDS = _fields(
    ("run_id", "STRING"), ("kind", "STRING"), ("stream", "STRING"),
    ("window_start", "TIMESTAMP"), ("window_end", "TIMESTAMP"), ("seen", "INT64"),
    ("on_time", "INT64"), ("late", "INT64"), ("too_late", "INT64"), ("counters", "STRING"),
    ("emitted_at", "TIMESTAMP"))

# The batch dead-letter row (transforms.schemas.DEAD_LETTER) plus the message's attributes,
# the run and when it was refused.
DEAD_LETTER_FIELDS = schemas.bigquery_fields(schemas.DEAD_LETTER) + _fields(
    ("attributes", "STRING"), ("run_id", "STRING"), ("received_at", "TIMESTAMP"))


def stamp(row: dict, run_id: str, at_field: str, clock: Callable[[], float] = time.time) -> dict:
    """A row with the run id and the current time under ``at_field``."""
    return {**row, "run_id": run_id,
            at_field: pd.Timestamp(int(clock() * MICROS), unit="us", tz="UTC")}


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
        return failed | "RefusedRows" >> beam.ParDo(MapFn(
            lambda failed, name: dead_letter(name, "WriteToBigQuery",
                                             f"bigquery refused the row: {failed[2]}",
                                             json.dumps(failed[1], default=str))), table)


def frames_to_rows(label: str, frames: beam.PCollection) -> beam.PCollection:
    """Frames → JSON-safe dict rows."""
    return frames | label >> beam.ParDo(FlatMapFn(model.json_safe_rows))
