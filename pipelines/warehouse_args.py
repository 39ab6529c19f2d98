"""The flags that name a warehouse, shared by the commands that open one after the fact.

``publish``, ``status`` and ``serve rebuild`` all read or change a warehouse a job
wrote: a local DuckDB file, or a BigQuery dataset (optionally on an emulator). One
definition keeps their spelling and help identical. No Beam import: ``serve``
loads this module.
"""
from __future__ import annotations

import argparse


def add_warehouse_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Adds ``--warehouse``, ``--bigquery_project/_dataset/_endpoint`` as one group.

    Returns:
      the group, so a command can add its own warehouse flags beside them.
    """
    where = parser.add_argument_group("warehouse (local unless --bigquery_dataset is given)")
    where.add_argument("--warehouse", default="out/warehouse.duckdb",
                       help="DuckDB file of the local warehouse.")
    where.add_argument("--bigquery_project", default=None,
                       help="Project of the BigQuery dataset (default: test-project with "
                            "--bigquery_endpoint, else required).")
    where.add_argument("--bigquery_dataset", default=None,
                       help="Use this BigQuery dataset instead of the local warehouse.")
    where.add_argument("--bigquery_endpoint", default=None,
                       help="A BigQuery emulator's URL (anonymous credentials).")
    return where
