"""Local-file sources and staging sinks: JSON Lines or Parquet in, Parquet out.

Sources validate as they read: every table comes out as typed pandas batches
plus a dead-letter collection carrying the original record and the reason.
"""
from __future__ import annotations

from typing import Dict, Iterator, List, NamedTuple, Sequence, Tuple

import apache_beam as beam
import pandas as pd
import pyarrow as pa
from apache_beam import coders, typehints
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.parquetio import ReadFromParquetBatched, WriteToParquetBatched

from models import contracts
from models.config import InputConfig
from transforms.health import Tag, count, dead_letters

BATCH_ROWS = 20_000
SOURCE_SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz", ".json")


class TableRead(NamedTuple):
    """A validated source: typed row batches, dead letters and read/valid counts."""

    rows: beam.PCollection
    dead_letters: beam.PCollection
    counts: beam.PCollection


def find_table(directory: str, table: str) -> str:
    """The file holding ``table`` in an input directory (first of the known suffixes)."""
    for suffix in SOURCE_SUFFIXES:
        path = FileSystems.join(directory, table + suffix)
        if FileSystems.exists(path):
            return path
    raise FileNotFoundError(
        f"no input for table {table!r} in {directory!r} (looked for {table}"
        f"{{{','.join(SOURCE_SUFFIXES)}}})")


@typehints.with_input_types(List[bytes])
@typehints.with_output_types(pd.DataFrame)
class ParseJsonLinesFn(beam.DoFn):
    """Parses a batch of JSON lines and validates it against the table's contract.

    A UTF-8 byte-order mark starting a line is dropped: some exporters put one where
    a file (or each of several concatenated files) starts, and it is not data.
    """

    def __init__(self, table: str, limits: InputConfig = contracts.DEFAULT_LIMITS):
        self._table = table
        self._limits = limits

    def process(self, lines: List[bytes]) -> Iterator:
        records, raw, bad_lines, bad_reasons = [], [], [], []
        lines = [line for line in map(contracts.strip_bom, lines) if line.strip()]
        for line, (record, reason) in zip(lines, contracts.parse_json_lines(lines)):
            if record is None:
                bad_lines.append(_text(line))
                bad_reasons.append(reason)
            else:
                records.append(record)
                raw.append(line)
        yield count(f"{self._table}.read", len(records) + len(bad_lines))
        if bad_lines:
            yield beam.pvalue.TaggedOutput(Tag.DEAD_LETTER.value, dead_letters(
                self._table, "Parse", bad_reasons, bad_lines))
        if records:
            checked = contracts.validate(self._table, contracts.records_frame(self._table, records),
                                         self._limits)
            yield from _emit(self._table, checked,
                             [_text(raw[i]) for i in checked.bad_positions])


@typehints.with_input_types(pa.Table)
@typehints.with_output_types(pd.DataFrame)
class ValidateArrowFn(beam.DoFn):
    """Validates a Parquet record batch against the table's contract."""

    def __init__(self, table: str, limits: InputConfig = contracts.DEFAULT_LIMITS):
        self._table = table
        self._limits = limits

    def process(self, table: pa.Table) -> Iterator:
        frame = arrow_frame(table)
        yield count(f"{self._table}.read", len(frame))
        checked = contracts.validate(self._table, frame, self._limits)
        yield from _emit(self._table, checked,
                         contracts.to_record_json(frame, checked.bad_positions))


def arrow_frame(table: pa.Table) -> pd.DataFrame:
    """An Arrow table as the frame the validator takes: Arrow nulls → None, so a NaN stays
    a bad value (a null year is absent, as in JSON; a NaN year is refused)."""
    frame = table.to_pandas()
    for name in table.column_names:
        nulls = table.column(name).is_null().to_numpy(zero_copy_only=False)
        if nulls.any():
            frame[name] = frame[name].astype(object).where(~nulls, None)
    return frame


def _text(line: bytes, limit: int = 10_000) -> str:
    """A raw line as storable text: bad bytes and lone surrogates escaped, huge lines cut."""
    text = (line.decode("utf-8", errors="backslashreplace") if isinstance(line, bytes)
            else contracts.storable_text(line))
    return text if len(text) <= limit else text[:limit] + f"... [{len(text):,} chars]"


def _emit(table: str, checked: contracts.Validated, bad_records: Sequence[str]) -> Iterator:
    if len(checked.bad_positions):
        yield beam.pvalue.TaggedOutput(Tag.DEAD_LETTER.value, dead_letters(
            table, "Validate", checked.bad_reasons, bad_records))
    if len(checked.rows):
        yield checked.rows


def read_frame(directory: str, table: str, limits: InputConfig = contracts.DEFAULT_LIMITS
               ) -> Tuple[pd.DataFrame, Dict[str, int]]:
    """A whole local table validated in memory (for small reports), with rejects by reason."""
    path = find_table(directory, table)
    rejected: Dict[str, int] = {}
    if path.endswith(".parquet"):   # read as the batch source reads it (ValidateArrowFn)
        import pyarrow.parquet as pq
        with FileSystems.open(path) as handle:
            frame = arrow_frame(pq.read_table(handle))
    else:
        records = []
        with FileSystems.open(path) as handle:
            for line in iter(handle.readline, b""):  # a .gz handle is not iterable
                line = contracts.strip_bom(line)
                if not line.strip():
                    continue
                record, reason = contracts.parse_json_line(line)
                if record is None:
                    rejected[reason] = rejected.get(reason, 0) + 1
                else:
                    records.append(record)
        frame = contracts.records_frame(table, records)
    checked = contracts.validate(table, frame, limits)
    for reason in checked.bad_reasons:
        rejected[reason] = rejected.get(reason, 0) + 1
    return checked.rows, rejected


class ReadTable(beam.PTransform):
    """Reads one SPEC §2 table from a local file (JSON Lines or Parquet) and validates it.

    ``limits`` is the run's ``inputs`` configuration: what a plausible record is.
    """

    def __init__(self, table: str, path: str, batch_rows: int = BATCH_ROWS,
                 limits: InputConfig = contracts.DEFAULT_LIMITS):
        super().__init__()
        self._table = table
        self._path = path
        self._batch_rows = batch_rows
        self._limits = limits

    def expand(self, pbegin: beam.pvalue.PBegin) -> TableRead:
        if self._path.endswith(".parquet"):
            validated = (pbegin
                         | "ReadParquet" >> ReadFromParquetBatched(self._path)
                         | "Validate" >> beam.ParDo(
                             ValidateArrowFn(self._table, self._limits)).with_outputs(
                             Tag.DEAD_LETTER.value, Tag.COUNTS.value, main=Tag.ROWS.value))
        else:
            validated = (pbegin
                         # Bytes, not str: a line that is not UTF-8 is a dead letter, not a crash.
                         | "ReadLines" >> beam.io.ReadFromText(self._path,
                                                               coder=coders.BytesCoder())
                         | "BatchLines" >> beam.BatchElements(
                             min_batch_size=self._batch_rows, max_batch_size=self._batch_rows)
                         | "ParseAndValidate" >> beam.ParDo(
                             ParseJsonLinesFn(self._table, self._limits)).with_outputs(
                             Tag.DEAD_LETTER.value, Tag.COUNTS.value, main=Tag.ROWS.value))
        return TableRead(validated[Tag.ROWS.value], validated[Tag.DEAD_LETTER.value],
                         validated[Tag.COUNTS.value])


class WriteFrames(beam.PTransform):
    """Writes frames to Parquet files under ``prefix`` with a fixed schema.

    Returns the written file names, so a later step can wait for the write.
    Beam writes to temporary files and renames on finalisation, so a retried
    bundle never leaves a duplicate file.
    """

    def __init__(self, prefix: str, schema: pa.Schema):
        super().__init__()
        self._prefix = prefix
        self._schema = schema

    def expand(self, frames: beam.PCollection) -> beam.PCollection:
        return (frames
                | "ToArrow" >> beam.Map(to_arrow, self._schema)
                | "WriteParquet" >> WriteToParquetBatched(
                    self._prefix, self._schema, file_name_suffix=".parquet"))


def to_arrow(frame: pd.DataFrame, schema: pa.Schema) -> pa.Table:
    """A frame as an Arrow table of exactly ``schema`` (missing columns become nulls)."""
    frame = frame.reindex(columns=schema.names)
    return pa.Table.from_pandas(frame, schema=schema, preserve_index=False)
