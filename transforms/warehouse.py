"""Warehouses: a local DuckDB file, or a BigQuery dataset; the same publishing interface.

Publishing keeps the previous output as a backup (``<table>_backup_<run>``,
run ids start with their UTC start time), then swaps the new output in; a gated
run leaves production untouched. Both warehouses also roll back to a backup,
list their backups and prune old ones (``python -m pipelines.publish``).

Table, dataset and project names are validated before they reach SQL, and
every value a query needs is a bound parameter, never spliced into the text.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import re
from typing import (Any, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple,
                    Union)

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from transforms import schemas

PUBLISHED_TABLES = ("recommendations", "segment_popularity")
LOG_TABLES = ("qa_checks", "dead_letter", "pipeline_runs", "stability_report",
              "stability_changes")
JOB = "batch_recommendations"
# The last published run of the batch job: the baseline of the row-count and input-size gates.
_LAST_PUBLISHED = ("SELECT {column} FROM pipeline_runs WHERE status = 'published' AND job = ? "
                   "ORDER BY finished_at DESC LIMIT 1")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
# BigQuery: project ids (optionally domain-scoped, "example.com:proj") and dataset names.
_PROJECT = re.compile(r"^([a-z][a-z0-9.-]{0,61}[a-z0-9]:)?[a-z][a-z0-9-]{4,28}[a-z0-9]$")
_DATASET = re.compile(r"^[A-Za-z0-9_]{1,1024}$")
# [PROJECT:]DATASET.TABLE or PROJECT.DATASET.TABLE, each part validated separately.
_TABLE_SPEC = re.compile(r"^(?:(?P<project>[^.:]+(?::[^.:]+)?)[:.])?(?:(?P<dataset>[^.:]+)\.)?"
                         r"(?P<table>[^.:]+)$")


# --------------------------------------------------------------------------- names

def table_name(name: str) -> str:
    """``name`` itself when it is a safe table name (letters, digits, ``_``); else ValueError."""
    if not isinstance(name, str) or not _IDENTIFIER.match(name):
        raise ValueError(f"refusing table name {name!r}: use letters, digits and _ only "
                         f"(at most 128, not starting with a digit)")
    return name


def identifier(name: str) -> str:
    """A table name safe to splice into SQL, quoted; anything else is refused."""
    return f'"{table_name(name)}"'


def bigquery_project(name: str) -> str:
    """A BigQuery project id, validated (6-30 lower-case letters, digits and -)."""
    if not isinstance(name, str) or not _PROJECT.match(name):
        raise ValueError(f"refusing BigQuery project {name!r}: a project id is 6-30 lower-case "
                         f"letters, digits and -, starting with a letter")
    return name


def bigquery_dataset(name: str) -> str:
    """A BigQuery dataset name, validated (letters, digits and _)."""
    if not isinstance(name, str) or not _DATASET.match(name):
        raise ValueError(f"refusing BigQuery dataset {name!r}: use letters, digits and _ only")
    return name


class TableRef(NamedTuple):
    """A validated BigQuery table: each part checked, so every rendering is safe SQL."""

    project: str
    dataset: str
    table: str

    @property
    def id(self) -> str:
        """``project.dataset.table``, as google-cloud-bigquery takes it."""
        return f"{self.project}.{self.dataset}.{self.table}"

    @property
    def spec(self) -> str:
        """``project:dataset.table``, as Beam's BigQuery I/O takes it."""
        return f"{self.project}:{self.dataset}.{self.table}"

    @property
    def sql(self) -> str:
        """The quoted name for SQL text."""
        return f"`{self.id}`"


def parse_table(spec: str, project: str, dataset: Optional[str]) -> TableRef:
    """``TABLE``, ``DATASET.TABLE``, ``PROJECT:DATASET.TABLE`` or ``PROJECT.DATASET.TABLE``.

    Missing parts come from ``project`` and ``dataset``; every part is validated.

    >>> parse_table("events", "my-project", "shop").id
    'my-project.shop.events'
    >>> parse_table("x`; DROP TABLE y", "my-project", "shop")
    Traceback (most recent call last):
    ValueError: refusing BigQuery table 'x`; DROP TABLE y': ...
    """
    match = _TABLE_SPEC.match(spec) if isinstance(spec, str) else None
    try:
        if not match:
            raise ValueError("malformed")
        dataset = match["dataset"] or dataset
        if not dataset:
            raise ValueError("no dataset: qualify it as DATASET.TABLE or set --bigquery_dataset")
        return TableRef(bigquery_project(match["project"] or project),
                        bigquery_dataset(dataset), table_name(match["table"]))
    except ValueError as err:
        raise ValueError(f"refusing BigQuery table {spec!r}: {err}; write TABLE, DATASET.TABLE "
                         f"or PROJECT:DATASET.TABLE with letters, digits and _") from None


def backup_id(run_id: str) -> str:
    """The backup id a run gives the output it replaces: its run id, made a name."""
    return re.sub(r"[^A-Za-z0-9]", "_", run_id)


def backup_table(name: str, backup: str) -> str:
    return table_name(f"{name}_backup_{backup}")


# --------------------------------------------------------------------------- staging

class Staged(NamedTuple):
    """One staged output of a run, ready for the gate.

    ``data`` holds the rows (local warehouse), or ``table`` names the BigQuery
    table holding them; ``refused`` counts rows the sink refused (a gap that gates).
    """

    schema: pa.Schema
    data: Optional[pa.Table] = None
    table: Optional[str] = None
    refused: int = 0


def read_staged(files: Sequence[str], schema: pa.Schema) -> pa.Table:
    """Staged Parquet files as one table; no files gives an empty table of ``schema``."""
    tables = [pq.read_table(f).cast(schema) for f in files if os.path.getsize(f)]
    return pa.concat_tables(tables) if tables else schema.empty_table()


def _as_arrow(value: Union[pa.Table, Staged]) -> pa.Table:
    return value.data if isinstance(value, Staged) else value


def json_value(value: Any) -> Any:
    """A Python value as BigQuery's JSON takes it: ISO timestamps, no NaN, plain numbers."""
    if value is None:
        return None
    if isinstance(value, (datetime.datetime, pd.Timestamp)):
        stamp = pd.Timestamp(value)
        stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
        return stamp.isoformat()
    if isinstance(value, (float, np.floating)):
        return None if not math.isfinite(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (list, tuple, np.ndarray)):
        return [json_value(v) for v in value]
    return value


def json_rows(table: pa.Table) -> List[Dict[str, Any]]:
    """Arrow rows as BigQuery JSON rows (``insertAll``)."""
    return [{k: json_value(v) for k, v in row.items()} for row in table.to_pylist()]


def _backups_frame(found: Mapping[str, List[str]], runs: pd.DataFrame,
                   held: Mapping[str, Tuple[Optional[str], int]]) -> pd.DataFrame:
    """One row per backup id, newest first: when, which run's output, rows, tables."""
    finished = {backup_id(r): t for r, t in zip(runs.get("run_id", []),
                                                runs.get("finished_at", []))}
    rows = []
    for backup, tables in found.items():
        run, count = held.get(backup, (None, 0))
        taken = finished.get(backup)
        rows.append({"backup_id": backup, "taken_at": pd.Timestamp(taken) if taken is not None
                     and not pd.isna(taken) else pd.NaT, "run_id": run,
                     "recommendations": count, "tables": ",".join(sorted(tables))})
    frame = pd.DataFrame(rows, columns=["backup_id", "taken_at", "run_id", "recommendations",
                                        "tables"])
    frame["taken_at"] = pd.to_datetime(frame["taken_at"], utc=True)
    order = frame.assign(_t=frame["taken_at"].fillna(pd.Timestamp(0, tz="UTC")))
    return (order.sort_values(["_t", "backup_id"], ascending=False)
            .drop(columns="_t").reset_index(drop=True))


def _find_backups(names: Iterable[str], tables: Sequence[str]) -> Dict[str, List[str]]:
    found: Dict[str, List[str]] = {}
    for name in names:
        for table in tables:
            prefix = f"{table}_backup_"
            if name.startswith(prefix) and len(name) > len(prefix):
                found.setdefault(name[len(prefix):], []).append(table)
    return found


def _rollback_run(run_id: str, backup: str, held: Optional[str], rows: int) -> pa.Table:
    now = pd.Timestamp.now(tz="UTC")
    return pa.Table.from_pylist([{
        "run_id": run_id, "job": "rollback", "as_of": None, "started_at": now,
        "finished_at": now, "status": "rolled_back",
        "message": f"restored backup {backup} (output of run {held}); the replaced output "
                   f"is backup {backup_id(run_id)}",
        "recommendations_written": rows, "counters": "{}"}], schema=schemas.PIPELINE_RUNS)


def _check_backup(backup: str, known: Iterable[str]) -> None:
    """Refuse a backup id that is not a name, or names no backup."""
    if not isinstance(backup, str) or not re.match(r"^[A-Za-z0-9_]{1,100}$", backup):
        raise ValueError(f"refusing backup id {backup!r}: use letters, digits and _ only")
    known = sorted(known)
    if backup not in known:
        raise ValueError(f"no backup {backup!r}; backups: {', '.join(known) if known else 'none'}")


# --------------------------------------------------------------------------- DuckDB

class WarehouseBusy(Exception):
    """Another run holds the warehouse's lock; ``str()`` says who."""


class WarehouseLock:
    """An exclusive lock on a local warehouse, held for a whole run.

    ``fcntl.flock`` on ``<warehouse>.lock``: the OS releases it when the
    process exits, crash or kill -9 included, so a stale lock cannot outlive
    its holder. The file records who holds it (pid, host, job, run id, start
    time) for the message the next run prints. Two DuckDB writers otherwise
    meet only at publish time, where the loser dies on DuckDB's own lock
    after the whole pipeline ran. On a runner that submits and exits
    (Dataflow), the lock covers only the submission (docs/operations.md).
    """

    def __init__(self, warehouse_path: str):
        self.path = os.path.abspath(warehouse_path) + ".lock"
        self._handle = None

    def acquire(self, holder: Mapping[str, Any]) -> None:
        """Take the lock without waiting; WarehouseBusy naming the holder if it is taken."""
        import fcntl
        handle = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            recorded = handle.read().strip()
            handle.close()
            try:
                who = json.loads(recorded)
                text = ", ".join(f"{k} {who[k]}" for k in ("job", "run_id", "pid", "host",
                                                             "started_at") if who.get(k))
            except ValueError:
                text = "an unknown process"
            raise WarehouseBusy(text or "an unknown process") from None
        self._handle = handle
        self.note(holder)

    def note(self, holder: Mapping[str, Any]) -> None:
        """Rewrite who holds the lock (e.g. once the run id is known)."""
        if self._handle is None:
            return
        self._handle.seek(0)
        self._handle.truncate()
        self._handle.write(json.dumps(dict(holder), default=str))
        self._handle.flush()

    def release(self) -> None:
        """Release the lock (also done by the OS when the process ends)."""
        if self._handle is not None:
            import fcntl
            try:
                self._handle.seek(0)
                self._handle.truncate()
                fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
            finally:
                self._handle.close()
                self._handle = None


class _LastPublishedRun:
    """What both warehouses answer about the last published batch run, from one column read
    (``_last_published``, each warehouse's own query of :data:`_LAST_PUBLISHED`)."""

    def _last_published(self, column: str) -> Any:
        raise NotImplementedError

    def last_published_rows(self) -> Optional[int]:
        """Recommendations written by the last published run, if any."""
        rows = self._last_published("recommendations_written")
        return None if rows is None else int(rows)

    def last_published_run(self) -> Optional[Dict[str, Any]]:
        """The whole ``pipeline_runs`` row of the last published batch run (whatever columns
        the table has: older warehouses lack the provenance ones), or None."""
        if not self.exists("pipeline_runs"):
            return None
        found = self.query(_LAST_PUBLISHED.format(column="*"), [JOB])
        return found.iloc[0].to_dict() if len(found) else None

    def last_published_counters(self) -> Optional[Dict[str, Any]]:
        """The ``counters`` of the last published run, if any (the input-size gate's baseline)."""
        counters = self._last_published("counters")
        return json.loads(counters) if counters else None


class LocalWarehouse(_LastPublishedRun):
    """Tables in one DuckDB file; every publish is one transaction."""

    def __init__(self, path: str):
        self.path = path

    @property
    def location(self) -> str:
        return os.path.abspath(self.path)

    def check_readable(self) -> None:
        """Open the file and list its tables: a truncated or foreign file fails here, at start-up
        (duckdb.Error), not at publish time after the whole pipeline ran."""
        if os.path.exists(self.path):
            with duckdb.connect(self.path, read_only=True) as con:
                con.execute("SELECT count(*) FROM information_schema.tables").fetchone()

    def connect(self) -> duckdb.DuckDBPyConnection:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        return duckdb.connect(self.path)

    def _last_published(self, column: str) -> Any:
        """One column of the last published batch run's ``pipeline_runs`` row (None if none)."""
        if not os.path.exists(self.path):
            return None
        with duckdb.connect(self.path, read_only=True) as con:
            if not _exists(con, "pipeline_runs"):
                return None
            row = con.execute(_LAST_PUBLISHED.format(column=column), [JOB]).fetchone()
        return row[0] if row else None

    def exists(self, name: str) -> bool:
        """Whether table ``name`` exists (as :meth:`BigQueryWarehouse.exists`)."""
        if not os.path.exists(self.path):
            return False
        with duckdb.connect(self.path, read_only=True) as con:
            return _exists(con, table_name(name))

    def run_exists(self, run_id: str) -> bool:
        """Whether ``pipeline_runs`` already records ``run_id``."""
        if not os.path.exists(self.path):
            return False
        with duckdb.connect(self.path, read_only=True) as con:
            return _exists(con, "pipeline_runs") and bool(con.execute(
                "SELECT count(*) FROM pipeline_runs WHERE run_id = ?", [run_id]).fetchone()[0])

    def read(self, name: str, columns: Optional[Sequence[str]] = None) -> Optional[pd.DataFrame]:
        """A whole table (or some columns), or None when it does not exist yet."""
        table = identifier(name)
        select = ", ".join(identifier(c) for c in columns) if columns else "*"
        if not os.path.exists(self.path):
            return None
        with duckdb.connect(self.path, read_only=True) as con:
            if not _exists(con, name):
                return None
            return con.execute(f"SELECT {select} FROM {table}").df()

    def leftovers(self, run_id: str) -> List[str]:
        """Tables other runs left behind: none here, a publish is one transaction."""
        return []

    def staged(self, run_id: str, name: str, schema: pa.Schema, files: Sequence[str]) -> Staged:
        """What the run staged for ``name``: its Parquet files, read back."""
        return Staged(schema, data=read_staged(files, schema))

    def frame(self, staged: Staged) -> pd.DataFrame:
        return staged.data.to_pandas()

    def publish(self, run_id: str, published: Mapping[str, Union[pa.Table, Staged]],
                logs: Mapping[str, Union[pa.Table, Staged]], swap: bool) -> Optional[str]:
        """Append run logs; when ``swap``, back up and replace the published tables.

        Returns the backup id when a swap replaced an earlier output.
        """
        backup = backup_id(run_id)
        with self.connect() as con:
            con.execute("BEGIN TRANSACTION")
            try:
                for name, table in logs.items():
                    _append(con, name, _as_arrow(table))
                backed_up = None
                if swap:
                    for name, table in published.items():
                        if _exists(con, name):
                            con.execute(f"ALTER TABLE {identifier(name)} RENAME TO "
                                        f"{identifier(backup_table(name, backup))}")
                            backed_up = backup
                        con.register("staged", _as_arrow(table))
                        con.execute(f"CREATE TABLE {identifier(name)} AS SELECT * FROM staged")
                        con.unregister("staged")
                con.execute("COMMIT")
            except Exception:
                con.execute("ROLLBACK")
                raise
        return backed_up

    def list_backups(self, tables: Sequence[str] = PUBLISHED_TABLES) -> pd.DataFrame:
        """Backups of the published tables, newest first (see :func:`_backups_frame`)."""
        if not os.path.exists(self.path):
            return _backups_frame({}, pd.DataFrame(), {})
        with duckdb.connect(self.path, read_only=True) as con:
            names = [r[0] for r in con.execute(
                "SELECT table_name FROM information_schema.tables").fetchall()]
            found = _find_backups(names, tables)
            runs = (con.execute("SELECT run_id, finished_at FROM pipeline_runs").df()
                    if _exists(con, "pipeline_runs") else pd.DataFrame())
            held = {}
            for backup, present in found.items():
                if "recommendations" in present:
                    held[backup] = con.execute(
                        f"SELECT min(run_id), count(*) FROM "
                        f"{identifier(backup_table('recommendations', backup))}").fetchone()
        return _backups_frame(found, runs, held)

    def rollback(self, to: str, tables: Sequence[str] = PUBLISHED_TABLES) -> str:
        """Restore backup ``to`` as production; the replaced output becomes a backup too.

        Returns the id of the backup that now holds the replaced output, so a
        rollback can itself be undone.
        """
        backups = self.list_backups(tables).set_index("backup_id")
        _check_backup(to, backups.index)
        run_id = f"rollback_{pd.Timestamp.now(tz='UTC'):%Y%m%dT%H%M%S%fZ}"
        keep = backup_id(run_id)
        with self.connect() as con:
            con.execute("BEGIN TRANSACTION")
            try:
                for name in backups.loc[to, "tables"].split(","):
                    if _exists(con, name):
                        con.execute(f"ALTER TABLE {identifier(name)} RENAME TO "
                                    f"{identifier(backup_table(name, keep))}")
                    con.execute(f"CREATE TABLE {identifier(name)} AS SELECT * FROM "
                                f"{identifier(backup_table(name, to))}")
                _append(con, "pipeline_runs", _rollback_run(
                    run_id, to, backups.loc[to, "run_id"],
                    int(backups.loc[to, "recommendations"])))
                con.execute("COMMIT")
            except Exception:
                con.execute("ROLLBACK")
                raise
        return keep

    def prune_backups(self, keep: int, tables: Sequence[str] = PUBLISHED_TABLES) -> List[str]:
        """Drop all but the newest ``keep`` backups; returns the ids dropped."""
        if keep < 0:
            raise ValueError("keep must be >= 0")
        backups = self.list_backups(tables)
        dropped = backups.iloc[keep:]
        if dropped.empty:
            return []
        with self.connect() as con:
            for backup, present in zip(dropped["backup_id"], dropped["tables"]):
                for name in present.split(","):
                    con.execute(f"DROP TABLE IF EXISTS {identifier(backup_table(name, backup))}")
        return list(dropped["backup_id"])

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
        _add_new_columns(con, name)
        con.execute(f"INSERT INTO {identifier(name)} BY NAME SELECT * FROM incoming")
    else:
        con.execute(f"CREATE TABLE {identifier(name)} AS SELECT * FROM incoming")
    con.unregister("incoming")


def _add_new_columns(con: duckdb.DuckDBPyConnection, name: str) -> None:
    """Columns the table's schema gained since the table was created (e.g. the gates' value,
    threshold and detail in ``qa_checks``, #13) are added, NULL in older rows, so a warehouse
    made by an earlier version keeps accepting rows."""
    have = {r[0] for r in con.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_name = ?",
        [name]).fetchall()}
    for column, kind, *_ in con.execute("DESCRIBE SELECT * FROM incoming").fetchall():
        if column not in have:
            con.execute(f"ALTER TABLE {identifier(name)} ADD COLUMN {identifier(column)} {kind}")


# --------------------------------------------------------------------------- BigQuery

def _parameter(value: Any, name: Optional[str] = None):
    """A positional (or named) query parameter with the BigQuery type of ``value``."""
    from google.cloud import bigquery
    if isinstance(value, (list, tuple)):
        kinds = {_scalar_type(v) for v in value if v is not None} or {"STRING"}
        if len(kinds) > 1:
            raise TypeError(f"mixed types in array parameter: {sorted(kinds)}")
        return bigquery.ArrayQueryParameter(name, kinds.pop(), list(value))
    return bigquery.ScalarQueryParameter(name, _scalar_type(value), value)


def _scalar_type(value: Any) -> str:
    if value is None or isinstance(value, str):
        return "STRING"
    if isinstance(value, (bool, np.bool_)):
        return "BOOL"
    if isinstance(value, (int, np.integer)):
        return "INT64"
    if isinstance(value, (float, np.floating)):
        return "FLOAT64"
    if isinstance(value, (datetime.datetime, pd.Timestamp)):
        return "TIMESTAMP"
    raise TypeError(f"no BigQuery parameter type for {type(value).__name__}")


def rows_frame(rows) -> pd.DataFrame:
    """A google-cloud-bigquery RowIterator as a frame, column by column (no db-dtypes needed)."""
    records = [row.values() for row in rows]
    names = [field.name for field in rows.schema]
    frame = pd.DataFrame({name: pd.Series([r[i] for r in records], dtype=object)
                          for i, name in enumerate(names)}, columns=names)
    for field in rows.schema:  # typed like the DuckDB reads: numbers, timestamps
        column = frame[field.name]
        if field.mode == "REPEATED":
            continue
        if field.field_type in ("TIMESTAMP", "DATETIME", "DATE"):
            frame[field.name] = pd.to_datetime(column, utc=field.field_type == "TIMESTAMP")
        elif field.field_type in ("FLOAT", "FLOAT64", "NUMERIC", "BIGNUMERIC"):
            frame[field.name] = column.astype(float)
        elif field.field_type in ("INTEGER", "INT64"):
            frame[field.name] = column.astype("Int64" if column.isna().any() else "int64")
        elif field.field_type in ("BOOLEAN", "BOOL") and not column.isna().any():
            frame[field.name] = column.astype(bool)
        elif field.field_type == "STRING":
            frame[field.name] = column.astype("str")
    return frame


class BigQueryWarehouse(_LastPublishedRun):
    """Tables in one BigQuery dataset, the same interface as :class:`LocalWarehouse`.

    Publishing (see :meth:`publish`) never renames a table: BigQuery has no
    transactional rename, so the previous table is copied to its backup and the
    new output replaces production with one ``WRITE_TRUNCATE`` copy job, which
    readers see atomically.

    Args:
        project: the project holding ``dataset`` (and billed for queries).
        dataset: where the outputs, logs and backups live.
        endpoint: a BigQuery emulator's URL (``--bigquery_endpoint``); None on Google Cloud.
    """

    PAGE_ROWS = 50_000

    def __init__(self, project: str, dataset: str, endpoint: Optional[str] = None):
        self.project = bigquery_project(project)
        self.dataset = bigquery_dataset(dataset)
        self.endpoint = endpoint
        self._client = None

    def __getstate__(self) -> Dict[str, Any]:  # a client does not pickle; workers make their own
        return {**self.__dict__, "_client": None}

    @property
    def client(self):
        if self._client is None:
            from transforms.bigquery import client
            self._client = client(self.project, self.endpoint)
        return self._client

    @property
    def location(self) -> str:
        where = f"bigquery://{self.project}.{self.dataset}"
        return where + (f" (emulator {self.endpoint})" if self.endpoint else "")

    def ref(self, name: str) -> TableRef:
        return TableRef(self.project, self.dataset, table_name(name))

    def dataset_exists(self) -> bool:
        from google.api_core.exceptions import NotFound
        try:
            self.client.get_dataset(f"{self.project}.{self.dataset}")
            return True
        except NotFound:
            return False

    def exists(self, name: str) -> bool:
        from google.api_core.exceptions import NotFound
        try:
            self.client.get_table(self.ref(name).id)
            return True
        except NotFound:
            return False

    # ---- reading

    def query(self, sql: str, params: Sequence = ()) -> pd.DataFrame:
        """A query with ``?`` placeholders bound to ``params``.

        Unqualified table names are this dataset's tables.
        """
        return rows_frame(self._run(sql, [_parameter(v) for v in params]))

    def _run(self, sql: str, parameters: Sequence = ()):
        from google.cloud import bigquery
        config = bigquery.QueryJobConfig(default_dataset=f"{self.project}.{self.dataset}",
                                         query_parameters=list(parameters))
        return self.client.query(sql, job_config=config).result(page_size=self.PAGE_ROWS)

    def read(self, name: str, columns: Optional[Sequence[str]] = None) -> Optional[pd.DataFrame]:
        """A whole table (or some columns), or None when it does not exist yet.

        A query rather than a table listing, so rows still in the streaming
        buffer of a staging table are included.
        """
        if not self.exists(name):
            return None
        select = ", ".join(f"`{table_name(c)}`" for c in columns) if columns else "*"
        return rows_frame(self._run(f"SELECT {select} FROM {self.ref(name).sql}"))

    def _last_published(self, column: str) -> Any:
        """One column of the last published batch run's ``pipeline_runs`` row (None if none)."""
        if not self.exists("pipeline_runs"):
            return None
        found = self.query(_LAST_PUBLISHED.format(column=column), [JOB])
        return found.iloc[0, 0] if len(found) else None

    def run_exists(self, run_id: str) -> bool:
        """Whether ``pipeline_runs`` already records ``run_id``."""
        return self.exists("pipeline_runs") and bool(self.query(
            "SELECT count(*) AS n FROM pipeline_runs WHERE run_id = ?", [run_id]).iloc[0, 0])

    # ---- staging

    def sink_table(self, run_id: str, name: str) -> str:
        """Where the pipeline writes output ``name``: logs go straight to their table,
        published outputs to a staging table of this run."""
        return name if name in LOG_TABLES else table_name(f"{name}_staging_{backup_id(run_id)}")

    def run_tables(self, run_id: str) -> List[str]:
        """The staging and candidate tables a run creates (validated names)."""
        return [table_name(f"{name}_{kind}_{backup_id(run_id)}")
                for name in PUBLISHED_TABLES for kind in ("staging", "candidate")]

    def leftovers(self, run_id: str) -> List[str]:
        """Staging and candidate tables of other runs: left by a run that died before its
        publish finished (or one still running). Listed for the operator, never dropped."""
        own = set(self.run_tables(run_id))
        pattern = re.compile(r"^(%s)_(staging|candidate)_[A-Za-z0-9_]+$"
                             % "|".join(PUBLISHED_TABLES))
        return sorted(t for t in self._table_names() if pattern.match(t) and t not in own)

    def staged(self, run_id: str, name: str, schema: pa.Schema,
               refused: Sequence[Any]) -> Staged:
        """What the run staged for ``name``: a table, and the rows BigQuery refused."""
        return Staged(schema, table=self.sink_table(run_id, name), refused=len(refused))

    def frame(self, staged: Staged) -> pd.DataFrame:
        found = self.read(staged.table)
        return found if found is not None else staged.schema.empty_table().to_pandas()

    # ---- writing

    def ensure_table(self, name: str, schema: pa.Schema, like: Optional[str] = None) -> None:
        """Create table ``name`` with its schema, partitioning and clustering, if missing.

        ``like`` names the output whose layout it takes (a candidate of ``recommendations``
        is partitioned and clustered as ``recommendations`` is).
        """
        from google.cloud import bigquery
        ref = self.ref(name)
        spec = {"tableReference": {"projectId": ref.project, "datasetId": ref.dataset,
                                   "tableId": ref.table},
                **schemas.bigquery_table(like or name, schema)}
        existing = self.client.create_table(bigquery.Table.from_api_repr(spec), exists_ok=True)
        have = {f.name for f in existing.schema}
        new = [bigquery.SchemaField.from_api_repr(f) for f in spec["schema"]["fields"]
               if f["name"] not in have and f["mode"] != "REQUIRED"]
        if new:  # columns added since the table was made (#13: qa_checks' gate columns)
            existing.schema = list(existing.schema) + new
            self.client.update_table(existing, ["schema"])

    def append(self, name: str, table: Union[pa.Table, Staged]) -> None:
        """Append rows to a log table (streaming insert, one insert id per row)."""
        if isinstance(table, Staged):
            if table.table == name:  # the pipeline wrote these rows to the log itself
                return
            table = pa.Table.from_pandas(self.frame(table), schema=table.schema,
                                         preserve_index=False)
        if not table.num_rows:
            return
        self.ensure_table(name, table.schema)
        rows = json_rows(table)
        # Insert ids make a retried insert a no-op on BigQuery (best-effort de-duplication).
        ids = [f"{name}:{i}:" + hashlib.sha1(json.dumps(r, sort_keys=True).encode()).hexdigest()
               for i, r in enumerate(rows)]
        errors = self.client.insert_rows_json(self.ref(name).id, rows, row_ids=ids)
        if errors:
            raise RuntimeError(f"BigQuery refused rows of {name}: {errors[:3]}")

    def _copy(self, source: str, destination: str, truncate: bool = False) -> None:
        from google.cloud import bigquery
        config = bigquery.CopyJobConfig(
            write_disposition="WRITE_TRUNCATE" if truncate else "WRITE_EMPTY")
        self.client.copy_table(self.ref(source).id, self.ref(destination).id,
                               job_config=config).result()

    def _drop(self, name: str) -> None:
        self.client.delete_table(self.ref(name).id, not_found_ok=True)

    def _candidate(self, run_id: str, name: str, staged: Staged) -> str:
        """The staged rows as a table copy jobs can read: created with the production
        layout, filled by a query (copy jobs may miss rows still in the streaming buffer).
        No staging table means nothing was staged: the candidate stays empty."""
        candidate = table_name(f"{name}_candidate_{backup_id(run_id)}")
        self._drop(candidate)  # a retried publish starts again from the staging table
        self.ensure_table(candidate, staged.schema, like=name)
        if self.exists(staged.table):  # the sink creates it with the first row only
            columns = ", ".join(f"`{table_name(c)}`" for c in staged.schema.names)
            self._run(f"INSERT INTO {self.ref(candidate).sql} ({columns}) "
                      f"SELECT {columns} FROM {self.ref(staged.table).sql}")
        return candidate

    def publish(self, run_id: str, published: Mapping[str, Staged],
                logs: Mapping[str, Union[pa.Table, Staged]], swap: bool) -> Optional[str]:
        """Append run logs; when ``swap``, back up and replace the published tables.

        Steps, each safe to repeat when the publishing step is retried: every
        staged output becomes a candidate table; every production table is
        copied to ``<table>_backup_<run>`` (kept if an earlier attempt made it);
        every candidate replaces its production table (``WRITE_TRUNCATE``
        copy); the logs are appended; staging and candidates are dropped. A
        gated run only appends its logs and drops its staging tables.
        Returns the backup id when a swap replaced an earlier output.
        """
        backup = backup_id(run_id)
        backed_up = None
        candidates = []
        if swap:
            candidates = [(name, self._candidate(run_id, name, staged))
                          for name, staged in published.items()]
            for name, _ in candidates:
                if self.exists(name):
                    if not self.exists(backup_table(name, backup)):
                        self._copy(name, backup_table(name, backup))
                    backed_up = backup
            for name, candidate in candidates:
                self._copy(candidate, name, truncate=True)
        for name, table in logs.items():
            self.append(name, table)
        for staged in list(published.values()) + list(logs.values()):
            if isinstance(staged, Staged) and staged.table not in LOG_TABLES + PUBLISHED_TABLES:
                self._drop(staged.table)
        for _, candidate in candidates:
            self._drop(candidate)
        return backed_up

    # ---- backups

    def _table_names(self) -> List[str]:
        return [t.table_id for t in self.client.list_tables(f"{self.project}.{self.dataset}")]

    def list_backups(self, tables: Sequence[str] = PUBLISHED_TABLES) -> pd.DataFrame:
        """Backups of the published tables, newest first (see :func:`_backups_frame`)."""
        found = _find_backups(self._table_names(), tables)
        runs = (self.query("SELECT run_id, finished_at FROM pipeline_runs")
                if self.exists("pipeline_runs") else pd.DataFrame())
        held = {}
        for backup, present in found.items():
            if "recommendations" in present:
                row = rows_frame(self._run(
                    f"SELECT MIN(run_id) AS run_id, COUNT(*) AS n FROM "
                    f"{self.ref(backup_table('recommendations', backup)).sql}")).iloc[0]
                held[backup] = (row["run_id"], int(row["n"]))
        return _backups_frame(found, runs, held)

    def rollback(self, to: str, tables: Sequence[str] = PUBLISHED_TABLES) -> str:
        """Restore backup ``to`` as production; the replaced output becomes a backup too.

        Returns the id of the backup that now holds the replaced output.
        """
        backups = self.list_backups(tables).set_index("backup_id")
        _check_backup(to, backups.index)
        run_id = f"rollback_{pd.Timestamp.now(tz='UTC'):%Y%m%dT%H%M%S%fZ}"
        keep = backup_id(run_id)
        restored = backups.loc[to, "tables"].split(",")
        for name in restored:
            if self.exists(name):
                self._copy(name, backup_table(name, keep))
        for name in restored:
            self._copy(backup_table(name, to), name, truncate=True)
        self.append("pipeline_runs", _rollback_run(run_id, to, backups.loc[to, "run_id"],
                                                   int(backups.loc[to, "recommendations"])))
        return keep

    def prune_backups(self, keep: int, tables: Sequence[str] = PUBLISHED_TABLES) -> List[str]:
        """Drop all but the newest ``keep`` backups; returns the ids dropped."""
        if keep < 0:
            raise ValueError("keep must be >= 0")
        dropped = self.list_backups(tables).iloc[keep:]
        for backup, present in zip(dropped["backup_id"], dropped["tables"]):
            for name in present.split(","):
                self._drop(backup_table(name, backup))
        return list(dropped["backup_id"])
