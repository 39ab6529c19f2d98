"""Options every job shares: where inputs and the warehouse are, and what identifies a run.

One class declares each flag once: Beam parses every ``PipelineOptions``
subclass imported in a process, so two classes declaring the same flag clash.
Jobs read these through ``options.view_as(CommonOptions)``.
"""
from __future__ import annotations

import argparse
import difflib
import os
import re
import uuid
from datetime import datetime
from typing import Iterable, Optional, Sequence, Set

import pandas as pd
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from models.contracts import parse_json_line, parse_rfc3339
from pipelines.jobs import UsageError
from transforms.frames import DEFAULT_MAX_ROWS, DEFAULT_SHARDS, Sharding
from transforms.io import SOURCE_SUFFIXES

# Records read from the top of a JSON Lines input to learn its columns (a few
# malformed or sparse first lines must not hide a column).
SAMPLE_RECORDS = 200
FITMENT_HINT = ("a shop without fitment sets `fitment_attributes: []` in its --config")


def require_input_dir(path: str) -> None:
    """Fail at start-up when a local ``--input_dir`` is missing (remote ones are checked per table)."""
    if "://" not in path and not os.path.isdir(path):
        raise UsageError(f"--input_dir {path!r} is not a directory")


def time_flag(flag: str, value: Optional[str]) -> Optional[pd.Timestamp]:
    """``--<flag>`` as a UTC time, None when not given; a UsageError unless strict RFC 3339.

    An explicit offset is required: ``2026-02-20T10:00:00`` could be any of
    24 hours, and ``now``, ``03/02/2026`` or ``2026`` are not times a run can
    be reproduced from (models.contracts.parse_rfc3339 is the one parser).
    """
    if value is None or value == "":
        return None
    stamp = parse_rfc3339(value)
    if stamp is None:
        raise UsageError(f"--{flag} {value!r} is not an RFC 3339 time with an explicit offset; "
                         f"write e.g. 2026-02-20T10:00:00Z or 2026-02-20T10:00:00+01:00")
    return stamp


def as_of_of(value: Optional[str], now: pd.Timestamp) -> pd.Timestamp:
    """``--as_of`` checked strictly, or ``now`` when it is not given."""
    stamp = time_flag("as_of", value)
    return now if stamp is None else stamp


def require_tables(input_dir: str, tables: Iterable[str]) -> dict:
    """The file of each input table, or a UsageError naming the first missing one.

    Checked at start-up so that a missing file is one line (with the config
    hint for fitment, which a shop without fitment data switches off), not a
    traceback from inside the graph.
    """
    found = {}
    for table in tables:
        for suffix in SOURCE_SUFFIXES:
            path = FileSystems.join(input_dir, table + suffix)
            if FileSystems.exists(path):
                found[table] = path
                break
        else:
            names = "/".join([f"{table}{SOURCE_SUFFIXES[1]}"]
                             + [s for s in SOURCE_SUFFIXES[2:]] + [SOURCE_SUFFIXES[0]])
            hint = f"; {FITMENT_HINT}" if table == "fitment" else ""
            raise UsageError(f"no {table} table in {input_dir} ({names}){hint}")
    return found


def table_columns(path: str, sample: int = SAMPLE_RECORDS) -> Optional[Set[str]]:
    """Column names of a local or remote input file: its Parquet schema, or the keys of its
    first ``sample`` JSON records. None when nothing can be learnt (an empty file)."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq
        with FileSystems.open(path) as handle:
            return set(pq.read_schema(handle).names)
    columns: Set[str] = set()
    seen = 0
    with FileSystems.open(path) as handle:
        for line in handle:
            if not line.strip():
                continue
            record, _ = parse_json_line(line.lstrip(b"\xef\xbb\xbf"))
            if record is not None:
                columns.update(record)
                seen += 1
                if seen >= sample:
                    break
    return columns if seen else None


def require_columns(table: str, where: str, columns: Optional[Iterable[str]],
                    wanted: Sequence[str], setting: str) -> None:
    """A UsageError when a configured attribute is not a column of ``table``.

    Names the attribute, the columns there are and the closest one: a misspelt
    segment attribute otherwise passes validation and dies mid-pipeline.
    """
    if columns is None:
        return
    columns = set(columns)
    for name in wanted:
        if name not in columns:
            close = difflib.get_close_matches(name, sorted(columns), n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            shown = sorted(columns)[:40] + (["..."] if len(columns) > 40 else [])
            raise UsageError(f"{setting} {name!r} is not a column of the {table} table "
                             f"({where}){hint}; its columns: {', '.join(shown)}")


def check_attributes(paths: dict, segment_attributes: Sequence[str],
                     fitment_attributes: Sequence[str]) -> None:
    """Segment and fitment attributes against the users and fitment inputs' columns.

    ``paths`` maps table names to their files (require_tables); tables not in
    it are not checked.
    """
    if "users" in paths:
        users = table_columns(paths["users"])
        require_columns("users", paths["users"], users, segment_attributes,
                        "segment attribute")
        require_columns("users", paths["users"], users, fitment_attributes,
                        "fitment attribute")
    if "fitment" in paths and fitment_attributes:
        require_columns("fitment", paths["fitment"], table_columns(paths["fitment"]),
                        fitment_attributes, "fitment attribute")


def require_writable_file(flag: str, path: str) -> None:
    """A UsageError unless ``path`` can be written as a file: checked before a run, not after
    it published (a directory given as ``--report_html`` failed only at the end)."""
    if "://" in path:
        return
    if os.path.isdir(path):
        raise UsageError(f"--{flag} {path!r} is a directory; give a file name")
    parent = os.path.dirname(os.path.abspath(path))
    require_writable_dir(flag, parent)
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise UsageError(f"--{flag} {path!r} is not writable")


def require_writable_dir(flag: str, path: str) -> None:
    """A UsageError unless directory ``path`` exists (or can be made) and is writable."""
    if "://" in path:
        return
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise UsageError(f"--{flag}: cannot create directory {path!r}: "
                         f"{err.strerror or err}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"--{flag}: directory {path!r} is not writable")


_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def run_id_of(given: Optional[str], now: datetime, prefix: str = "") -> str:
    """``--run_id`` if it is a safe name, else ``[prefix_]time_random``.

    A run id names staging folders, backup tables and output files, so one
    like ``../x`` or ``a;b`` is refused at start-up.
    """
    if not given:
        return f"{prefix + '_' if prefix else ''}{now:%Y%m%dT%H%M%SZ}_{uuid.uuid4().hex[:6]}"
    if not _RUN_ID.match(given):
        raise UsageError(f"--run_id {given!r}: use letters, digits, '_', '.' and '-' "
                         f"(at most 128, starting with a letter or digit)")
    return given


def check_run_id(options: PipelineOptions) -> None:
    """Refuse a bad ``--run_id`` before anything is written, even the warehouse's lock file."""
    run_id_of(options.view_as(CommonOptions).run_id, datetime.now())


def true_or_false(text: str) -> bool:
    """The type of a boolean flag: ``--flag=true|false`` (a Flex Template passes every
    parameter with a value), or the bare ``--flag`` with ``nargs="?", const=True``."""
    value = {"true": True, "false": False}.get(str(text).strip().lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value


class RankerOptions(PipelineOptions):
    """The ranker artifact a job serves: one flag for the batch job and the streaming refresh."""

    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--ranker_model", default=None,
                            help="Ranker artifact (.json, or a model directory with LATEST; "
                                 "local or gs://; pipelines.train_ranker writes it). The "
                                 "batch job re-ranks segment-popularity candidates or, with "
                                 "a union model, the candidates.mix; the streaming refresh "
                                 "serves union models and swaps a new artifact in without a "
                                 "restart (see its --ranker_refresh_seconds).")


class CommonOptions(PipelineOptions):
    """Inputs, warehouse, reference time and run id."""

    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--input_dir", default="out/demo_world",
                            help="Directory with the SPEC §2 inputs "
                                 "(.jsonl, .jsonl.gz or .parquet).")
        parser.add_argument("--warehouse", default="out/warehouse.duckdb",
                            help="DuckDB file that receives the output tables.")
        parser.add_argument("--staging_dir", default=None,
                            help="Where staged Parquet files go (default: beside the "
                                 "warehouse, under staging/<run_id>).")
        parser.add_argument("--as_of", default=None,
                            help="Reference time (RFC 3339) for windows and decay; "
                                 "default now. Fix it for reproducible runs.")
        parser.add_argument("--run_id", default=None, help="Run id (default: time + random).")
        parser.add_argument("--num_shards", type=int, default=DEFAULT_SHARDS,
                            help="Hash shards for the batched joins (the minimum: more "
                                 "when the data would put over --max_rows_per_element "
                                 "rows in a shard).")
        parser.add_argument("--max_rows_per_element", type=int, default=DEFAULT_MAX_ROWS,
                            help="Bound on the rows of one shuffled frame element: shard "
                                 "counts grow with the data and hot keys are split to "
                                 "stay under it (docs/scaling.md).")
        parser.add_argument("--config", default=None,
                            help="Retailer config (YAML/JSON); keys it does not name keep "
                                 "the SPEC defaults (configs/default.yaml).")


def sharding_of(options: PipelineOptions) -> Sharding:
    """The shuffles' ``Sharding`` from --num_shards and --max_rows_per_element."""
    common = options.view_as(CommonOptions)
    if common.num_shards < 1:
        raise UsageError("--num_shards must be >= 1")
    if common.max_rows_per_element < 8:
        raise UsageError("--max_rows_per_element must be >= 8")
    return Sharding(common.num_shards, common.max_rows_per_element)
