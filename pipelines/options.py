"""Options every job shares: where inputs and the warehouse are, and what identifies a run.

One class declares each flag once: Beam parses every ``PipelineOptions``
subclass imported in a process, so two classes declaring the same flag clash.
Jobs read these through ``options.view_as(CommonOptions)``.
"""
from __future__ import annotations

import argparse
import os

from apache_beam.options.pipeline_options import PipelineOptions

from transforms.frames import DEFAULT_SHARDS


def require_input_dir(path: str) -> None:
    """Fail at start-up when a local ``--input_dir`` is missing (remote ones are checked per table)."""
    if "://" not in path and not os.path.isdir(path):
        raise SystemExit(f"--input_dir {path!r} is not a directory")


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
