"""The local warehouse: a DuckDB file standing in for the BigQuery dataset.

Publishing swaps tables inside one transaction, after keeping the previous
output as a timestamped backup, so a reader never sees a half-written table
and a gated run leaves production untouched.
"""
from __future__ import annotations

import os
import re
from typing import Mapping, Optional, Sequence

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

PUBLISHED_TABLES = ("recommendations", "segment_popularity")
LOG_TABLES = ("qa_checks", "dead_letter", "pipeline_runs")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


def identifier(name: str) -> str:
    """A table name safe to splice into SQL, quoted; anything else is refused."""
    if not isinstance(name, str) or not _IDENTIFIER.match(name):
        raise ValueError(f"refusing table name {name!r}: use letters, digits and _ only")
    return f'"{name}"'


def read_staged(files: Sequence[str], schema: pa.Schema) -> pa.Table:
    """Staged Parquet files as one table; no files gives an empty table of ``schema``."""
    tables = [pq.read_table(f).cast(schema) for f in files if os.path.getsize(f)]
    return pa.concat_tables(tables) if tables else schema.empty_table()


class LocalWarehouse:
    """Tables in one DuckDB file; every publish is one transaction."""

    def __init__(self, path: str):
        self.path = path

    def connect(self) -> duckdb.DuckDBPyConnection:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        return duckdb.connect(self.path)

    def last_published_rows(self) -> Optional[int]:
        """Recommendations written by the last published run, if any."""
        if not os.path.exists(self.path):
            return None
        with duckdb.connect(self.path, read_only=True) as con:
            if not _exists(con, "pipeline_runs"):
                return None
            row = con.execute(
                "SELECT recommendations_written FROM pipeline_runs WHERE status = 'published' "
                "AND job = 'batch_recommendations' ORDER BY finished_at DESC LIMIT 1").fetchone()
        return int(row[0]) if row else None

    def read(self, name: str) -> Optional[pd.DataFrame]:
        """A whole table, or None when it does not exist yet."""
        if not os.path.exists(self.path):
            return None
        with duckdb.connect(self.path, read_only=True) as con:
            if not _exists(con, name):
                return None
            return con.execute(f"SELECT * FROM {identifier(name)}").df()

    def publish(self, run_id: str, published: Mapping[str, pa.Table],
                logs: Mapping[str, pa.Table], swap: bool) -> Optional[str]:
        """Append run logs; when ``swap``, back up and replace the published tables.

        Returns the backup suffix when a swap happened.
        """
        suffix = "backup_" + re.sub(r"[^A-Za-z0-9]", "_", run_id)
        with self.connect() as con:
            con.execute("BEGIN TRANSACTION")
            try:
                for name, table in logs.items():
                    _append(con, name, table)
                backed_up = None
                if swap:
                    for name, table in published.items():
                        if _exists(con, name):
                            con.execute(f"ALTER TABLE {identifier(name)} RENAME TO "
                                        f"{identifier(f'{name}_{suffix}')}")
                            backed_up = suffix
                        con.register("staged", table)
                        con.execute(f"CREATE TABLE {identifier(name)} AS SELECT * FROM staged")
                        con.unregister("staged")
                con.execute("COMMIT")
            except Exception:
                con.execute("ROLLBACK")
                raise
        return backed_up

    def query(self, sql: str, params: Sequence = ()) -> pd.DataFrame:
        """Read-only query (parameters bound, never spliced)."""
        with duckdb.connect(self.path, read_only=True) as con:
            return con.execute(sql, list(params)).df()


def _exists(con: duckdb.DuckDBPyConnection, name: str) -> bool:
    return bool(con.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [name]
    ).fetchone()[0])


def _append(con: duckdb.DuckDBPyConnection, name: str, table: pa.Table) -> None:
    con.register("incoming", table)
    if _exists(con, name):
        con.execute(f"INSERT INTO {identifier(name)} BY NAME SELECT * FROM incoming")
    else:
        con.execute(f"CREATE TABLE {identifier(name)} AS SELECT * FROM incoming")
    con.unregister("incoming")
