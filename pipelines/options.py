"""Options every job shares: where inputs and the warehouse are, and what identifies a run.

One class declares each flag once: Beam parses every ``PipelineOptions``
subclass imported in a process, so two classes declaring the same flag clash.
Jobs read these through ``options.view_as(CommonOptions)``.
"""
from __future__ import annotations

import argparse
import os
import re
import uuid
from datetime import datetime
from typing import Optional

from apache_beam.options.pipeline_options import PipelineOptions

from transforms.frames import DEFAULT_SHARDS


def require_input_dir(path: str) -> None:
    """Fail at start-up when a local ``--input_dir`` is missing (remote ones are checked per table)."""
    if "://" not in path and not os.path.isdir(path):
        raise SystemExit(f"--input_dir {path!r} is not a directory")


_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def run_id_of(given: Optional[str], now: datetime, prefix: str = "") -> str:
    """``--run_id`` if it is a safe name, else ``[prefix_]time_random``.

    A run id names staging folders, backup tables and output files, so one
    like ``../x`` or ``a;b`` is refused at start-up.
    """
    if not given:
        return f"{prefix + '_' if prefix else ''}{now:%Y%m%dT%H%M%SZ}_{uuid.uuid4().hex[:6]}"
    if not _RUN_ID.match(given):
        raise SystemExit(f"--run_id {given!r}: use letters, digits, '_', '.' and '-' "
                         f"(at most 128, starting with a letter or digit)")
    return given


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
                            help="Hash shards for the batched joins.")
        parser.add_argument("--config", default=None,
                            help="Retailer config (YAML/JSON); keys it does not name keep "
                                 "the SPEC defaults (configs/default.yaml).")
