"""Published outputs by hand: list the backups, roll back to one, prune old ones.

    python -m pipelines.publish list                         # the local out/warehouse.duckdb
    python -m pipelines.publish rollback --to 20260301T060000Z_ab12cd
    python -m pipelines.publish prune --keep 3
    python -m pipelines.publish list --bigquery_project my-project --bigquery_dataset recs
    python -m pipelines.publish load-inputs --input_dir out/demo_world \\
        --bigquery_dataset recs --bigquery_endpoint http://127.0.0.1:9050

Every publish of the batch job keeps the output it replaces as the backup
``<table>_backup_<id>``, where ``id`` is the replacing run's id. ``rollback``
makes a backup production again (the output it replaces becomes a backup in
turn, so a rollback can be undone) and records itself in ``pipeline_runs``.
``load-inputs`` loads a local world's input files into BigQuery tables (for
demos and the emulator). Exit status: 0 done, 2 refused (bad name, no such
backup, warehouse in use by a run, unreachable endpoint), 3 failure. A local
warehouse is locked while a command works on it, like a job's run.
With ``--serving_store``, ``rollback`` and ``prune`` keep the serving store in
step: it serves what the warehouse now publishes (docs/serving.md).
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from typing import List, Optional, Union

from pipelines.jobs import OneLineParser, UsageError, locked_warehouse, run_with_status
from pipelines.warehouse_args import add_warehouse_arguments
from transforms.bigquery import unreachable
from transforms.warehouse import BigQueryWarehouse, LocalWarehouse

Warehouse = Union[LocalWarehouse, BigQueryWarehouse]


def _parser() -> argparse.ArgumentParser:
    where = OneLineParser(add_help=False)
    target = add_warehouse_arguments(where)
    target.add_argument("--serving_store", default=None,
                        help="Redis URL of the serving store: rollback and prune keep it in "
                             "step with the warehouse (docs/serving.md).")
    target.add_argument("--serving_namespace", default="recs",
                        help="Key prefix of the serving store.")
    target.add_argument("--serving_keep_versions", type=int, default=2,
                        help="Versions the serving store keeps (the served one included).")
    parser = OneLineParser(prog="python -m pipelines.publish",
                                     description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", parents=[where], help="List backups, newest first.")
    rollback = commands.add_parser("rollback", parents=[where],
                                   help="Make a backup the production output again.")
    rollback.add_argument("--to", required=True, help="Backup id (see `list`).")
    prune = commands.add_parser("prune", parents=[where],
                                help="Drop all but the newest backups.")
    prune.add_argument("--keep", type=int, required=True, help="Backups to keep (>= 0).")
    load = commands.add_parser("load-inputs", parents=[where],
                               help="Load a world's input files into BigQuery tables.")
    load.add_argument("--input_dir", required=True, help="Directory with the SPEC §2 inputs.")
    load.add_argument("--max_bad_records", type=int, default=0,
                      help="Malformed lines BigQuery may skip per table (default 0: fail).")
    return parser


def warehouse_from(args: argparse.Namespace) -> Warehouse:
    if not args.bigquery_dataset:
        return LocalWarehouse(args.warehouse)
    project = args.bigquery_project or ("test-project" if args.bigquery_endpoint else None)
    if not project:
        raise ValueError("--bigquery_dataset needs --bigquery_project")
    why = unreachable(args.bigquery_endpoint) if args.bigquery_endpoint else None
    if why:
        raise ValueError(f"--bigquery_endpoint {args.bigquery_endpoint} is unreachable ({why})")
    return BigQueryWarehouse(project, args.bigquery_dataset, args.bigquery_endpoint)


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        warehouse = warehouse_from(args)
    except ValueError as err:
        print(f"refused: {err}", file=sys.stderr)
        return 2
    try:
        with (locked_warehouse(args.warehouse, f"publish {args.command}")
              if isinstance(warehouse, LocalWarehouse) else contextlib.nullcontext()):
            return _command(args, warehouse)
    except UsageError as err:  # busy or unreadable warehouse
        print(f"refused: {err}", file=sys.stderr)
        return 2


def _command(args: argparse.Namespace, warehouse: Warehouse) -> int:
    try:
        if args.command == "list":
            backups = warehouse.list_backups()
            if backups.empty:
                print(f"no backups in {warehouse.location}")
            else:
                print(f"backups in {warehouse.location}, newest first:")
                print(backups.to_string(index=False))
        elif args.command == "rollback":
            store = _serving_store(args)
            kept = warehouse.rollback(args.to)
            print(f"restored backup {args.to} in {warehouse.location}; the output it replaced "
                  f"is backup {kept}")
            if store is not None:
                _follow(store, warehouse)
        elif args.command == "prune":
            store = _serving_store(args)
            dropped = warehouse.prune_backups(args.keep)
            print(f"dropped {len(dropped)} backup(s) from {warehouse.location}"
                  + (": " + ", ".join(dropped) if dropped else ""))
            if store is not None:
                _follow(store, warehouse)
        else:
            if not isinstance(warehouse, BigQueryWarehouse):
                raise ValueError("load-inputs needs --bigquery_dataset")
            from transforms.bigquery_io import load_inputs
            loaded = load_inputs(args.input_dir, warehouse.project, warehouse.dataset,
                                 warehouse.endpoint, max_bad_records=args.max_bad_records)
            for table, rows in loaded.items():
                print(f"{table:18s} {rows:>10,} rows -> {warehouse.ref(table).id}")
    except ValueError as err:
        print(f"refused: {err}", file=sys.stderr)
        return 2
    return 0


def _serving_store(args: argparse.Namespace):
    """The serving store named by --serving_store, checked before the warehouse changes."""
    if not args.serving_store:
        return None
    from models.serving import ServingStore, StoreUnavailable
    if args.serving_keep_versions < 1:
        raise ValueError("--serving_keep_versions must be >= 1")
    store = ServingStore(args.serving_store, args.serving_namespace,
                         keep_versions=args.serving_keep_versions)
    try:
        store.check()
    except StoreUnavailable as err:
        raise ValueError(f"--serving_store {args.serving_store} does not answer ({err}); "
                         f"nothing was changed")
    return store


def _follow(store, warehouse: Warehouse) -> None:
    from transforms.serving import follow_warehouse
    done = follow_warehouse(store, warehouse)
    loaded = f"loaded {done['users']:,} users, " if done.get("users") is not None else ""
    print(f"serving store {store.url}: serves run {done['run_id']} ({loaded}switch "
          f"{done['switch_seconds'] * 1000:.1f} ms); dropped {len(done['pruned'])} old "
          f"version(s)")


if __name__ == "__main__":
    sys.exit(run_with_status(main, sys.argv[1:], job="publish"))
