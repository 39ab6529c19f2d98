"""BigQuery sources and sinks: the SPEC §2 inputs as validated pandas batches, outputs as tables.

A BigQuery source gives exactly what :class:`transforms.io.ReadTable` gives for
a local file: typed row batches, dead letters with the original record and the
reason, and a ``<table>.read`` count. Whole tables are read with Beam's
``ReadFromBigQuery`` over the Storage Read API (parallel streams, no query); a
time window (``--events_since``/``--events_until``) is one parameterised query
whose result pages are read by a DoFn. Outputs are written by streaming
inserts (:class:`InsertRows`, a bounded retry through outages), with the
explicit schema, partitioning and clustering of ``transforms.schemas``; the
rows not written come back so the publishing step can gate on them.

``--bigquery_endpoint`` (``transforms.bigquery``) points every one of these
clients at an emulator; nothing here knows whether it talks to one.
"""
from __future__ import annotations

import argparse
import datetime
import decimal
import io
import logging
import time
import uuid
from typing import Dict, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import apache_beam as beam
import pandas as pd
import pyarrow as pa
from apache_beam import typehints
from apache_beam.io.gcp.bigquery import ReadFromBigQuery
from apache_beam.io.gcp.bigquery_tools import RetryStrategy
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions
from apache_beam.utils.windowed_value import WindowedValue

from models import contracts
from models.config import InputConfig
from transforms import schemas
from transforms.bigquery import BigQueryOptions
from transforms.health import NAMESPACE, Tag, count, dead_letters
from transforms.io import BATCH_ROWS, TableRead, find_table, to_arrow
from transforms.signatures import CachedSignatures
from transforms.warehouse import (TableRef, bigquery_dataset, bigquery_project, json_rows,
                                  parse_table, table_name)

INPUT_TABLES = ("catalog", "fitment", "users", "events", "treatment_events")
WINDOWED_TABLE, WINDOW_COLUMN = "events", "event_time"
INSERT_BATCH_ROWS = 500  # rows per insertAll request (BigQuery recommends about 500)
INSERT_RETRY_SECONDS = 120  # per bundle, through an outage, before rows count as not written
EMULATOR_PROJECT = "test-project"
_LOG = logging.getLogger(__name__)


class SourceSinkOptions(PipelineOptions):
    """Where a job reads its inputs and writes its outputs: local files or BigQuery."""

    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--source", default="local", choices=("local", "bigquery"),
                            help="local: the files in --input_dir; bigquery: the tables named "
                                 "by --<input>_table.")
        parser.add_argument("--sink", default="local", choices=("local", "bigquery"),
                            help="local: the DuckDB --warehouse; bigquery: the tables of "
                                 "--bigquery_dataset (staged, checked, backed up, swapped).")
        parser.add_argument("--bigquery_project", default=None,
                            help="Project of the BigQuery tables (default: --project).")
        parser.add_argument("--bigquery_dataset", default=None,
                            help="Dataset of the outputs, and of inputs named without one.")
        for table in INPUT_TABLES:
            parser.add_argument(f"--{table}_table", default=None,
                                help=f"BigQuery table of the {table} input (jobs that read "
                                     f"it): TABLE, DATASET.TABLE or PROJECT:DATASET.TABLE "
                                     f"(default: {table} in --bigquery_dataset).")
        parser.add_argument("--events_since", default=None,
                            help="Read only events at or after this RFC 3339 time "
                                 "(BigQuery source; default: all).")
        parser.add_argument("--events_until", default=None,
                            help="Read only events before this RFC 3339 time "
                                 "(BigQuery source; default: all).")


class TimeWindow(NamedTuple):
    """A half-open window ``[since, until)`` on a timestamp column; either end may be open."""

    column: str
    since: Optional[pd.Timestamp]
    until: Optional[pd.Timestamp]


class BigQuerySettings(NamedTuple):
    """The BigQuery side of a job's options, resolved and validated at start-up."""

    project: str
    dataset: Optional[str]
    endpoint: Optional[str]
    inputs: Dict[str, TableRef]
    events_window: Optional[TimeWindow]


def _time(flag: str, value: Optional[str]) -> Optional[pd.Timestamp]:
    if not value:
        return None
    stamp = contracts.parse_rfc3339(value)  # strict: an explicit offset, no "now"
    if stamp is None:
        raise ValueError(f"--{flag} {value!r} is not an RFC 3339 time with an explicit offset; "
                         f"write e.g. 2026-02-20T10:00:00Z")
    return stamp


def settings_from(options: PipelineOptions) -> BigQuerySettings:
    """Resolve and check every BigQuery name and the events window; ValueError on a bad one.

    Names are validated here, at start-up, so a table name such as
    ``x`; DROP TABLE y`` never reaches a client.
    """
    io_options = options.view_as(SourceSinkOptions)
    endpoint = options.view_as(BigQueryOptions).bigquery_endpoint
    since = _time("events_since", io_options.events_since)
    until = _time("events_until", io_options.events_until)
    window = None
    if since is not None or until is not None:
        if io_options.source != "bigquery":
            raise ValueError("--events_since/--events_until need --source bigquery")
        if since is not None and until is not None and since >= until:
            raise ValueError("--events_since must be before --events_until")
        window = TimeWindow(WINDOW_COLUMN, since, until)
    project = (io_options.bigquery_project or options.view_as(GoogleCloudOptions).project
               or (EMULATOR_PROJECT if endpoint else None))
    if not project:
        raise ValueError("BigQuery needs a project: set --bigquery_project or --project")
    project = bigquery_project(project)
    dataset = io_options.bigquery_dataset
    if dataset is not None:
        dataset = bigquery_dataset(dataset)
    if io_options.sink == "bigquery" and not dataset:
        raise ValueError("--sink bigquery needs --bigquery_dataset")
    inputs = {}
    if io_options.source == "bigquery":
        for table in INPUT_TABLES:
            inputs[table] = parse_table(getattr(io_options, f"{table}_table") or table,
                                        project, dataset)
    return BigQuerySettings(project, dataset, endpoint, inputs, window)


# --------------------------------------------------------------------------- sources

def rows_to_frame(table: str, rows: Sequence[dict]) -> pd.DataFrame:
    """BigQuery rows (dicts of Python values) as the frame the contract validator takes.

    The client gives TIMESTAMP as ``datetime`` and NUMERIC as ``Decimal``; the
    validator takes pandas timestamps and floats, as Parquet gives them.
    """
    frame = contracts.records_frame(table, rows)
    for column in contracts.SCHEMAS[table]:
        values = frame[column.name].tolist()
        if column.kind == "time" and all(v is None or isinstance(v, datetime.datetime)
                                         for v in values):
            frame[column.name] = pd.to_datetime(pd.Series(values, index=frame.index,
                                                          dtype=object), utc=True)
        elif column.kind in ("float", "int") and any(isinstance(v, decimal.Decimal)
                                                     for v in values):
            # Object dtype keeps None (absent) apart from NaN (a bad value), as for JSON.
            frame[column.name] = pd.Series(
                [float(v) if isinstance(v, decimal.Decimal) else v for v in values],
                index=frame.index, dtype=object)
    return frame


@typehints.with_input_types(List[dict])
@typehints.with_output_types(pd.DataFrame)
class ValidateRowsFn(beam.DoFn):
    """Validates a batch of BigQuery rows against the table's contract (as ``ReadTable``)."""

    def __init__(self, table: str, limits: InputConfig = contracts.DEFAULT_LIMITS):
        self._table = table
        self._limits = limits

    def process(self, rows: List[dict]) -> Iterator:
        if not rows:
            return
        frame = rows_to_frame(self._table, rows)
        yield count(f"{self._table}.read", len(frame))
        checked = contracts.validate(self._table, frame, self._limits)
        if len(checked.bad_positions):
            yield beam.pvalue.TaggedOutput(Tag.DEAD_LETTER.value, dead_letters(
                self._table, "Validate", checked.bad_reasons,
                contracts.to_record_json(frame, checked.bad_positions)))
        if len(checked.rows):
            yield checked.rows


@typehints.with_input_types(TimeWindow)
@typehints.with_output_types(List[dict])
class QueryPagesFn(beam.DoFn):
    """Runs one parameterised window query and emits its result page by page.

    The window's ends are query parameters; the table and column names were
    validated when the options were read.
    """

    def __init__(self, ref: TableRef, endpoint: Optional[str], page_rows: int = BATCH_ROWS):
        self._ref = ref
        self._endpoint = endpoint
        self._page_rows = page_rows
        self._client = None

    def setup(self) -> None:
        from transforms.bigquery import client
        self._client = client(self._ref.project, self._endpoint)

    def process(self, window: TimeWindow) -> Iterator[List[dict]]:
        from google.cloud import bigquery
        column = f"`{table_name(window.column)}`"  # a column name, validated like a table's
        sql = (f"SELECT * FROM {self._ref.sql} WHERE (@since IS NULL OR {column} >= @since) "
               f"AND (@until IS NULL OR {column} < @until)")
        config = bigquery.QueryJobConfig(query_parameters=[
            bigquery.ScalarQueryParameter("since", "TIMESTAMP", _py(window.since)),
            bigquery.ScalarQueryParameter("until", "TIMESTAMP", _py(window.until))])
        result = self._client.query(sql, job_config=config).result(page_size=self._page_rows)
        for page in result.pages:
            rows = [dict(row.items()) for row in page]
            if rows:
                yield rows


def _py(stamp: Optional[pd.Timestamp]):
    return None if stamp is None else stamp.to_pydatetime()


class ReadBigQueryTable(beam.PTransform):
    """Reads one SPEC §2 table from BigQuery and validates it, like ``ReadTable`` for files.

    Args:
        table: the contract's table name (``catalog``, ``events``, ...).
        ref: the BigQuery table holding it.
        window: read only rows inside this time window (a parameterised query).
        endpoint: the emulator endpoint, for the window query's client; None on Google Cloud.
        limits: the run's ``inputs`` configuration (what a plausible record is).
    """

    def __init__(self, table: str, ref: TableRef, window: Optional[TimeWindow] = None,
                 endpoint: Optional[str] = None, batch_rows: int = BATCH_ROWS,
                 limits: InputConfig = contracts.DEFAULT_LIMITS):
        super().__init__()
        self._limits = limits
        self._table = table
        self._ref = ref
        self._window = window
        self._endpoint = endpoint
        self._batch_rows = batch_rows

    def expand(self, pbegin: beam.pvalue.PBegin) -> TableRead:
        if self._window is None:
            batches = (pbegin
                       | "ReadStorageApi" >> ReadFromBigQuery(
                           table=self._ref.spec, method=ReadFromBigQuery.Method.DIRECT_READ)
                       | "BatchRows" >> beam.BatchElements(
                           min_batch_size=self._batch_rows, max_batch_size=self._batch_rows))
        else:
            batches = (pbegin
                       | "Window" >> beam.Create([self._window])
                       | "QueryWindow" >> beam.ParDo(QueryPagesFn(self._ref, self._endpoint,
                                                                  self._batch_rows))
                       | "SpreadPages" >> beam.Reshuffle())
        validated = batches | "Validate" >> beam.ParDo(
            ValidateRowsFn(self._table, self._limits)).with_outputs(
            Tag.DEAD_LETTER.value, Tag.COUNTS.value, main=Tag.ROWS.value)
        return TableRead(validated[Tag.ROWS.value], validated[Tag.DEAD_LETTER.value],
                         validated[Tag.COUNTS.value])


# --------------------------------------------------------------------------- sinks

def frame_rows(frame: pd.DataFrame, schema: pa.Schema) -> List[dict]:
    """A frame as BigQuery JSON rows of exactly ``schema`` (as the Parquet staging types it)."""
    return json_rows(to_arrow(frame, schema))


class WriteFramesToBigQuery(beam.PTransform):
    """Writes frames to one BigQuery table by streaming inserts (:class:`InsertRows`).

    The table is created when missing with the explicit schema, partitioning and
    clustering of ``transforms.schemas.bigquery_table(name, schema)``; each row
    carries an insert id, so a retried batch does not duplicate it. Returns the
    rows not written, ``(table, row, errors)``: the publishing step takes them
    as a side input (and gates on them), which also makes it wait until every
    insert has finished.
    """

    def __init__(self, ref: TableRef, name: str, schema: pa.Schema,
                 retry_seconds: float = INSERT_RETRY_SECONDS):
        super().__init__()
        self._ref = ref
        self._schema = schema
        self._table = schemas.bigquery_table(name, schema)
        self._retry_seconds = retry_seconds

    def expand(self, frames: beam.PCollection) -> beam.PCollection:
        return (frames
                | "ToRows" >> beam.FlatMap(frame_rows, self._schema)
                | "StreamingInserts" >> beam.ParDo(InsertRows(
                    self._ref.spec, self._table, INSERT_BATCH_ROWS, self._retry_seconds)))


@typehints.with_input_types(dict)
@typehints.with_output_types(Tuple[str, dict, List[dict]])
class InsertRows(CachedSignatures, beam.DoFn):
    """Streaming inserts with a bounded retry; outputs ``(table, row, errors)`` not written.

    Rows go in batches of ``batch_size`` per bundle, each with its own insert
    id, kept when the row is sent again (BigQuery de-duplicates a resent row
    by it, best effort; two equal rows stay two rows). Transient failures are
    retried with exponential backoff for at most ``retry_seconds`` per bundle:
    per-row errors other than the permanent ones (Beam's
    ``RetryStrategy.RETRY_ON_TRANSIENT_ERROR``), 408/429/5xx responses, and
    BigQuery being unreachable (connection refused or reset, timeout). A row refused for good (bad value, schema mismatch),
    or still unwritten when the budget is spent, is output with its errors:
    the job neither dies nor loses it silently. ``table`` is the REST table
    resource (schema, partitioning, clustering) used to create the table when
    it is missing.

    Not Beam's WriteToBigQuery: on a connection error (Beam 2.77) its client
    retries for 10 minutes, then raises a RetryError that Beam neither retries
    per row nor returns in ``failed_rows_with_errors``; the bundle fails after
    4 such calls (~40 minutes), the DirectRunner gives up after 4 bundle
    attempts and the job dies; Dataflow retries the bundle forever (a
    streaming job stalls, a batch job fails).
    """

    FIRST_DELAY, MAX_DELAY = 0.2, 10.0

    def __init__(self, table_spec: str, table: Mapping[str, object], batch_size: int,
                 retry_seconds: float):
        self._table_spec = table_spec
        self._table = dict(table)
        self._batch_size = batch_size
        self._retry_seconds = retry_seconds
        self._retries = Metrics.counter(NAMESPACE, "bigquery.insert_retries")
        self._written = Metrics.counter(NAMESPACE, "bigquery.rows_written")
        self._failed = Metrics.counter(NAMESPACE, "bigquery.rows_failed")

    def setup(self) -> None:
        from apache_beam.io.gcp.bigquery_tools import parse_table_reference
        ref = parse_table_reference(self._table_spec)
        self._project = ref.projectId
        self._table_id = f"{ref.projectId}.{ref.datasetId}.{ref.tableId}"
        # Made at the first insert: the bundle-based DirectRunner sets a DoFn up for every
        # bundle, and most bundles of a streaming job's writers are empty.
        self._client = None
        self._created = False

    def start_bundle(self) -> None:
        self._batch: List[Tuple[dict, str, WindowedValue]] = []
        self._not_written: List[WindowedValue] = []
        self._deadline: Optional[float] = None
        self._delay = self.FIRST_DELAY

    def process(self, row: dict, element=beam.DoFn.WindowedValueParam) -> None:
        insert_id = uuid.uuid4().hex   # kept across this bundle's retries of the row
        self._batch.append((row, insert_id, element))
        if len(self._batch) >= self._batch_size:
            self._flush()

    def finish_bundle(self) -> Iterator[WindowedValue]:
        # Emitted here, in each row's own windows (rows not written are rare).
        self._flush()
        yield from self._not_written

    def _flush(self) -> None:
        pending, self._batch = self._batch, []
        while pending:
            errors = self._insert(pending)
            self._written.inc(len(pending) - len(errors))
            transient = {i for i, e in errors.items() if self._transient(e)}
            if not transient:  # BigQuery answered: the next outage gets a whole budget
                self._deadline, self._delay = None, self.FIRST_DELAY
            delay = self._backoff() if transient else None
            for i, e in sorted(errors.items()):
                if delay is None or i not in transient:
                    self._failed.inc()
                    self._not_written.append(
                        pending[i][2].with_value((self._table_spec, pending[i][0], e)))
            if delay is None:
                return
            self._retries.inc()
            _LOG.warning("BigQuery insert into %s: %d rows not written (%s); retrying in "
                         "%.1f s", self._table_id, len(transient),
                         errors[min(transient)][0].get("reason"), delay)
            time.sleep(delay)
            pending = [pending[i] for i in sorted(transient)]

    def _insert(self, batch: List[Tuple[dict, str, WindowedValue]]) -> Dict[int, List[dict]]:
        """One insertAll call, no client-side retry; the errors per row index."""
        from google.api_core import exceptions
        from google.auth.exceptions import TransportError
        remaining = (self._deadline or time.monotonic() + self._retry_seconds) - (
            time.monotonic())
        if self._client is None:
            from transforms.bigquery import client
            self._client = client(self._project)
        try:
            found = self._client.insert_rows_json(
                self._table_id, [r for r, _, _ in batch], row_ids=[i for _, i, _ in batch],
                skip_invalid_rows=True, retry=None, timeout=max(5.0, min(60.0, remaining)))
            return {e["index"]: e["errors"] for e in found}
        except exceptions.NotFound as err:  # CREATE_IF_NEEDED, once per worker
            error = {"reason": "notFound", "message": str(err)[:500]}
            if not self._created:
                self._created = True
                self._create_table()
                error["reason"] = "tableCreated"  # retried
        except exceptions.GoogleAPICallError as err:
            error = {"reason": "http_%s" % err.code, "message": str(err)[:500]}
        except (OSError, exceptions.GoogleAPIError, TransportError) as err:
            # requests' ConnectionError and Timeout are OSErrors: BigQuery unreachable.
            error = {"reason": "unreachable",
                     "message": f"{type(err).__name__}: {err}"[:500]}
        return {i: [error] for i in range(len(batch))}

    def _create_table(self) -> None:
        from google.cloud import bigquery as bq
        try:
            project, dataset, table = self._table_id.split(".")
            self._client.create_table(bq.Table.from_api_repr({
                "tableReference": {"projectId": project, "datasetId": dataset,
                                   "tableId": table}, **self._table}), exists_ok=True)
        except Exception as err:  # noqa: BLE001 (the rows then fail with notFound)
            _LOG.warning("could not create %s: %s", self._table_id, err)

    @staticmethod
    def _transient(errors: List[dict]) -> bool:
        reason = errors[0].get("reason") if errors else None
        if reason == "notFound" or ((reason or "").startswith("http_4")
                                    and reason not in ("http_408", "http_429")):
            return False
        return RetryStrategy.should_retry(RetryStrategy.RETRY_ON_TRANSIENT_ERROR, reason)

    def _backoff(self) -> Optional[float]:
        """Seconds to wait before the next attempt, or None when the budget is spent."""
        now = time.monotonic()
        if self._deadline is None:
            self._deadline = now + self._retry_seconds
        if now >= self._deadline:
            return None
        delay = min(self._delay, self.MAX_DELAY, self._deadline - now)
        self._delay = min(self._delay * 2, self.MAX_DELAY)
        return delay


# --------------------------------------------------------------------------- loading inputs

def load_inputs(input_dir: str, project: str, dataset: str, endpoint: Optional[str] = None,
                tables: Sequence[str] = INPUT_TABLES, max_bad_records: int = 0
                ) -> Dict[str, int]:
    """Load a local world's input files into BigQuery tables of the SPEC §2 schema.

    For demos, tests and the emulator: one load job per table (replacing its
    rows), from JSON Lines or Parquet. Creates the dataset when missing. Returns
    the row count of each loaded table; tables without a file are skipped.
    A typed table cannot hold a malformed line (broken JSON, text in a number
    column): such lines fail the load unless ``max_bad_records`` lets BigQuery
    skip that many; rows that load but break the contract are the job's to
    dead-letter.
    """
    from google.cloud import bigquery
    from transforms.bigquery import client as make_client
    client = make_client(project, endpoint)
    client.create_dataset(f"{bigquery_project(project)}.{bigquery_dataset(dataset)}",
                          exists_ok=True)
    loaded = {}
    for table in tables:
        try:
            path = find_table(input_dir, table)
        except FileNotFoundError:
            continue
        ref = parse_table(table, project, dataset)
        spec = schemas.input_table(table)
        client.delete_table(ref.id, not_found_ok=True)
        client.create_table(bigquery.Table.from_api_repr({
            "tableReference": {"projectId": ref.project, "datasetId": ref.dataset,
                               "tableId": ref.table}, **spec}))
        parquet = path.endswith(".parquet")
        config = bigquery.LoadJobConfig(
            source_format="PARQUET" if parquet else "NEWLINE_DELIMITED_JSON",
            schema=[bigquery.SchemaField.from_api_repr(f) for f in spec["schema"]["fields"]],
            ignore_unknown_values=True, write_disposition="WRITE_TRUNCATE",
            max_bad_records=max_bad_records)
        with FileSystems.open(path) as handle:  # .gz is decompressed on the fly
            data = io.BytesIO(handle.read())
        # No size= : the emulator refuses multipart uploads, a plain file object works.
        client.load_table_from_file(data, ref.id, job_config=config).result()
        loaded[table] = client.get_table(ref.id).num_rows
    return loaded


def read_table_frame(client, ref: TableRef, table: str,
                     limits: InputConfig = contracts.DEFAULT_LIMITS,
                     page_rows: int = BATCH_ROWS) -> Tuple[pd.DataFrame, Dict[str, int]]:
    """A whole BigQuery table validated in memory, with rejects by reason (``io.read_frame``'s
    BigQuery twin, for reference data a streaming worker holds).

    Read with ``tabledata.list`` (no query, no cost), converted and validated
    exactly as `ValidateRowsFn` converts and validates the batch source's rows.
    """
    rows = [dict(row.items()) for row in client.list_rows(ref.id, page_size=page_rows)]
    checked = contracts.validate(table, rows_to_frame(table, rows), limits)
    rejected: Dict[str, int] = {}
    for reason in checked.bad_reasons:
        rejected[reason] = rejected.get(reason, 0) + 1
    return checked.rows, rejected
