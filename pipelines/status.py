"""Is production healthy? One command for a probe, a scheduler or an operator.

    python -m pipelines.status --warehouse out/warehouse.duckdb
    python -m pipelines.status --bigquery_project P --bigquery_dataset recs \\
        --streaming_dataset recs_stream --html status.html
    python -m pipelines.status --warehouse out/warehouse.duckdb --verify \\
        --template_spec gs://BUCKET/templates/batch_recommendations/latest.json

Reads the warehouse (DuckDB file or BigQuery dataset) and prints the last runs
with status, counts and QA, the age of the published output, backups, model
version and drift, the streaming job's newest health row, and (``--verify``)
whether the deployed template, the last run and the published rows agree.
``--html`` also writes the same as one page with trend plots. Read-only: it
takes no lock and writes nothing to the warehouse.

Exit status (docs/operations.md has what to do for each): 0 no alarm; 1 the
last batch run was gated; 2 usage error; 3 failure (the warehouse could not be
read); 4 zero rows written or published; 5 the published output is older than
status.max_published_age_hours (or nothing is published); 6 the streaming
health is stale; 7 (--verify) the chain diverges; 8 the last run dead-lettered
more than status.max_dead_letter_share. With several alarms the first of
4, 1, 5, 6, 7, 8 is the exit status; every alarm is printed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

import pandas as pd

from models import status as model
from models.config_file import ConfigError, load_config
from models.contracts import parse_rfc3339
from pipelines.jobs import OneLineParser, UsageError, run_with_status
from pipelines.warehouse_args import add_warehouse_arguments
from transforms.bigquery import unreachable
from transforms.status import read_snapshot
from transforms.warehouse import BigQueryWarehouse, LocalWarehouse


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m pipelines.status",
                           description=__doc__.split("\n\n")[0],
                           epilog=__doc__.split("\n\n")[-1],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    where = add_warehouse_arguments(parser)
    where.add_argument("--streaming_dataset", default=None,
                       help="BigQuery dataset of the streaming job's streaming_health table "
                            "(default: the warehouse itself). Naming it makes a missing "
                            "health row an alarm.")
    parser.add_argument("--config", default=None,
                        help="YAML/JSON configuration; its status section sets the alarms' "
                             "limits (default: configs/default.yaml's values).")
    parser.add_argument("--now", default=None,
                        help="Measure ages against this time (RFC 3339 with offset; default: "
                             "the current time).")
    parser.add_argument("--html", default=None, help="Also write the status page here.")
    parser.add_argument("--verify", action="store_true",
                        help="Check that the deployed template, the last run and the "
                             "published rows name the same commit, version and model.")
    parser.add_argument("--template_spec", default=None,
                        help="With --verify: the deployed template's spec JSON (local path "
                             "or gs://…/templates/batch_recommendations/latest.json).")
    parser.add_argument("--expect_streaming", action="store_true",
                        help="A missing streaming_health row is an alarm (implied by "
                             "--streaming_dataset).")
    return parser


def _warehouses(args: argparse.Namespace):
    project = args.bigquery_project or ("test-project" if args.bigquery_endpoint else None)
    if (args.bigquery_dataset or args.streaming_dataset) and not project:
        raise UsageError("--bigquery_dataset/--streaming_dataset need --bigquery_project")
    if args.bigquery_endpoint:
        why = unreachable(args.bigquery_endpoint)
        if why:
            raise UsageError(f"--bigquery_endpoint {args.bigquery_endpoint} is unreachable "
                             f"({why})")
    try:
        if args.bigquery_dataset:
            warehouse = BigQueryWarehouse(project, args.bigquery_dataset, args.bigquery_endpoint)
        else:
            if not os.path.exists(args.warehouse):
                raise UsageError(f"--warehouse {args.warehouse} does not exist")
            warehouse = LocalWarehouse(args.warehouse)
        streaming = (BigQueryWarehouse(project, args.streaming_dataset, args.bigquery_endpoint)
                     if args.streaming_dataset else None)
    except ValueError as err:
        raise UsageError(str(err)) from None
    return warehouse, streaming


def read_spec(path: str) -> dict:
    """A template spec JSON, local or on any Beam filesystem (gs://)."""
    if "://" in path:
        from apache_beam.io.filesystems import FileSystems
        with FileSystems.open(path) as handle:
            return json.loads(handle.read().decode("utf-8"))
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def run(argv: Optional[List[str]] = None) -> int:
    """Print the status (and write the page); returns the exit status of the worst alarm."""
    args = _parser().parse_args(argv)
    try:
        config = load_config(args.config).status
    except ConfigError as err:
        raise UsageError(f"--config: {err}") from None
    now = parse_rfc3339(args.now) if args.now else pd.Timestamp.now(tz="UTC")
    if now is None:
        raise UsageError(f"--now {args.now!r}: give an RFC 3339 time with an offset, "
                         f"e.g. 2026-03-01T06:00:00Z")
    if args.template_spec and not args.verify:
        raise UsageError("--template_spec is read by --verify only")
    if args.html:
        folder = os.path.dirname(os.path.abspath(args.html))
        if os.path.isdir(args.html) or not os.access(folder, os.W_OK):
            raise UsageError(f"--html {args.html}: not a writable file name")
    warehouse, streaming = _warehouses(args)
    template = None
    if args.verify and args.template_spec:
        try:
            template = model.template_info(read_spec(args.template_spec), args.template_spec)
        except (OSError, ValueError) as err:
            raise UsageError(f"--template_spec {args.template_spec}: {err}") from None
    snapshot = read_snapshot(warehouse, now, config.runs_shown, streaming,
                             streaming_expected=bool(args.streaming_dataset
                                                     or args.expect_streaming))
    found = model.alarms(snapshot, config)
    divergences = model.verify(snapshot, template) if args.verify else None
    if divergences:
        found.append(model.Alarm(model.CHAIN, "; ".join(divergences),
                                 "redeploy or rerun so template, run and table agree "
                                 "(docs/operations.md, 'the chain')"))
    print(model.render_text(snapshot, found, config, divergences))
    if args.html:
        with open(args.html, "w", encoding="utf-8") as handle:
            handle.write(model.render_html(snapshot, found, config, divergences))
        print(f"page: {args.html}")
    return model.exit_code(found)


def main() -> None:
    sys.exit(run_with_status(run, sys.argv[1:], job="status"))


if __name__ == "__main__":
    main()
