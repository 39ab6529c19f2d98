"""The two plain-SQL baselines every strategy is judged against (issue #14).

A retailer's analyst can write either in ten lines of SQL over the input
files, so a recommender that does not beat them is not worth running:

* ``sql_global_popularity``: the k eligible SKUs with the most 30-day-decayed
  distinct orders, the same list for everyone;
* ``sql_own_then_popular``: each user's own most-bought eligible SKUs (distinct
  orders, ties by the latest purchase), topped up with global popularity.

The SQL text lives here once: ``pipelines.backtest`` and ``bench/candidates.py``
both run it. It reads the raw files as an analyst would (no validation, no
dead letters): a line DuckDB cannot parse, or an ``event_time`` that is not a
time, is skipped; order lines are distinct ``(order_id, sku)``, so the three
order event names of one order and duplicated events count once.

DuckDB only, no Beam.
"""
from __future__ import annotations

import os
from typing import Dict, Iterable, Optional

import duckdb
import pandas as pd

GLOBAL_POPULARITY = "sql_global_popularity"
OWN_THEN_POPULAR = "sql_own_then_popular"
ORDER_NAMES = "('Placed Order', 'Ordered Product', 'Consumer Website Order')"

# Distinct order lines of history and holdout; `$cutoff` in the baselines keeps the history.
LINES_SQL = f"""
CREATE OR REPLACE TABLE lines AS
SELECT order_id, sku, any_value(user_id) AS user_id, min(event_time) AS event_time
FROM (SELECT CAST(order_id AS VARCHAR) AS order_id, CAST(sku AS VARCHAR) AS sku,
             CAST(user_id AS VARCHAR) AS user_id,
             TRY_CAST(event_time AS TIMESTAMPTZ) AS event_time
      FROM {{reader}}
      WHERE event_name IN {ORDER_NAMES} AND order_id IS NOT NULL AND sku IS NOT NULL)
WHERE event_time IS NOT NULL
GROUP BY order_id, sku;
"""

# $cutoff: history is strictly before it; $k: list length. `eligible(sku)` is the retailer's
# eligible catalogue (the same set every strategy draws from); `users(user_id)` who to serve.
GLOBAL_POPULARITY_SQL = """
WITH pop AS (
  SELECT sku, sum(pow(0.5, date_diff('second', event_time, $cutoff) / 86400.0 / 30)) AS score
  FROM lines WHERE event_time < $cutoff AND sku IN (SELECT sku FROM eligible)
  GROUP BY sku),
top AS (SELECT sku, score, row_number() OVER (ORDER BY score DESC, sku) AS slot FROM pop
        QUALIFY slot <= $k)
SELECT u.user_id, t.slot, t.sku, t.score FROM users u CROSS JOIN top t
"""

OWN_THEN_POPULAR_SQL = """
WITH train AS (SELECT * FROM lines WHERE event_time < $cutoff
               AND sku IN (SELECT sku FROM eligible)),
pop AS (SELECT sku, sum(pow(0.5, date_diff('second', event_time, $cutoff) / 86400.0 / 30)) AS score
        FROM train GROUP BY sku ORDER BY score DESC, sku LIMIT 2 * $k),
own AS (SELECT user_id, sku, count(DISTINCT order_id) AS n, max(event_time) AS last
        FROM train GROUP BY user_id, sku),
cand AS (SELECT user_id, sku, 0 AS tier, n, last, 0.0 AS pop FROM own
         UNION ALL
         SELECT u.user_id, p.sku, 1, 0, NULL, p.score FROM users u CROSS JOIN pop p),
best AS (SELECT * FROM cand QUALIFY row_number() OVER (PARTITION BY user_id, sku ORDER BY tier) = 1)
SELECT user_id, row_number() OVER (PARTITION BY user_id
         ORDER BY tier, n DESC, last DESC NULLS LAST, pop DESC, sku) AS slot, sku,
       CAST(n AS DOUBLE) AS score
FROM best QUALIFY slot <= $k
"""

BASELINES = {GLOBAL_POPULARITY: GLOBAL_POPULARITY_SQL, OWN_THEN_POPULAR: OWN_THEN_POPULAR_SQL}


def _quoted(paths: Iterable[str]) -> str:
    return "[" + ", ".join("'" + p.replace("'", "''") + "'" for p in paths) + "]"


def table_reader(data: str, tables: Iterable[str]) -> str:
    """A DuckDB table function over the tables' files in ``data`` (Parquet or JSON Lines).

    JSON Lines are read with ``ignore_errors``: a line DuckDB cannot parse is
    skipped, as an analyst's query would, instead of failing the baseline.
    """
    tables = list(tables)
    parquet = os.path.exists(os.path.join(data, f"{tables[0]}.parquet"))
    suffix = "parquet" if parquet else "jsonl"
    files = [f for f in (os.path.join(data, f"{t}.{suffix}") for t in tables)
             if os.path.exists(f)]
    if parquet:
        return f"read_parquet({_quoted(files)}, union_by_name = true)"
    return (f"read_json_auto({_quoted(files)}, format = 'newline_delimited', "
            f"ignore_errors = true, union_by_name = true)")


def lines_sql(data: str) -> str:
    """LINES_SQL over the directory's events and holdout_events."""
    return LINES_SQL.format(reader=table_reader(data, ("events", "holdout_events")))


def connect(data: str, eligible: Iterable[str],
            users: Optional[Iterable[str]] = None) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection holding ``lines``, ``eligible`` and ``users`` for the baselines.

    Args:
      data: the input directory (the files the batch job reads).
      eligible: SKUs a recommendation may name (the retailer's rules).
      users: user ids to serve; by default every ``user_id`` of the users file.
    """
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.execute(lines_sql(data))
    con.register("eligible_frame", pd.DataFrame({"sku": pd.Series(sorted(set(eligible)),
                                                                  dtype=object)}))
    con.execute("CREATE TABLE eligible AS SELECT CAST(sku AS VARCHAR) AS sku "
                "FROM eligible_frame")
    if users is None:
        con.execute(f"CREATE TABLE users AS SELECT DISTINCT CAST(user_id AS VARCHAR) AS user_id "
                    f"FROM {table_reader(data, ('users',))} WHERE user_id IS NOT NULL")
    else:
        con.register("users_frame", pd.DataFrame({"user_id": pd.Series(
            sorted(set(map(str, users))), dtype=object)}))
        con.execute("CREATE TABLE users AS SELECT CAST(user_id AS VARCHAR) AS user_id "
                    "FROM users_frame")
    return con


def run_baseline(con: duckdb.DuckDBPyConnection, query: str, cutoff: pd.Timestamp,
                 k: int) -> pd.DataFrame:
    """One baseline's lists: frame ``user_id, slot (1..k), sku, score``, by user and slot."""
    out = con.execute(query, {"cutoff": pd.Timestamp(cutoff).to_pydatetime(), "k": int(k)}).df()
    out["user_id"] = out["user_id"].astype(str)
    out["sku"] = out["sku"].astype(str)
    out["slot"] = out["slot"].astype(int)
    return out.sort_values(["user_id", "slot"]).reset_index(drop=True)


def baseline_lists(data: str, cutoff: pd.Timestamp, k: int, eligible: Iterable[str],
                   users: Optional[Iterable[str]] = None) -> Dict[str, pd.DataFrame]:
    """Both baselines' lists at ``k`` from history strictly before ``cutoff``."""
    con = connect(data, eligible, users)
    try:
        return {name: run_baseline(con, query, cutoff, k) for name, query in BASELINES.items()}
    finally:
        con.close()
