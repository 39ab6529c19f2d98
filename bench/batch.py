"""Benchmark of the batch recommendations job against the same scoring in DuckDB SQL.

    python bench/batch.py                      # full preset: 500,000 users, ~2M events
    python bench/batch.py --preset demo        # quick check (20,000 users)
    python bench/batch.py --beam_args="--direct_num_workers=2 --direct_running_mode=multi_processing"

Generates the world (Parquet) into bench/work/<preset>_world unless it is there, runs
``pipelines.batch_recommendations`` on it in a subprocess, then ``bench/batch.sql`` (the
warehouse approach: one DuckDB script over the same files) in another, and writes
bench/results/batch.json: wall seconds, users/s, peak RSS of the whole process tree
(sampled from /proc every 0.2 s), users recommended and the job's status line for each
side, the ratio Beam wall / DuckDB wall, and the agreement of the two outputs.

Each run also appends a one-line summary to ``runs`` in the results file, so results
of several configurations (in-process vs multi_processing) stay side by side.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORK = os.path.join(HERE, "work")
RESULTS = os.path.join(HERE, "results", "batch.json")
SQL_SCRIPT = os.path.join(HERE, "batch.sql")
TABLES = ("catalog", "fitment", "users", "events")
TARGET_USERS_PER_SECOND = 4_000
TARGET_PEAK_RSS_GIB = 6.0
SAMPLE_SECONDS = 0.2
GIB = 1024 ** 3


# ----------------------------------------------------------------------------- measuring

class TreeSampler(threading.Thread):
    """Samples the summed RSS of a process and all its descendants from /proc.

    RSS counts pages shared between processes once per process, so for a
    multi-process run the sum is an upper bound of the memory really used.
    """

    def __init__(self, root_pid: int, interval: float = SAMPLE_SECONDS):
        super().__init__(daemon=True)
        self.root_pid = root_pid
        self.interval = interval
        self.peak_bytes = 0
        self.peak_processes = 0
        self.samples = 0
        self._halt = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def _tree(self) -> List[int]:
        children: Dict[int, List[int]] = {}
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            # Field 4 (ppid) follows the parenthesised command, which may hold spaces.
            ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
            children.setdefault(ppid, []).append(int(name))
        tree, todo = [], [self.root_pid]
        while todo:
            pid = todo.pop()
            tree.append(pid)
            todo.extend(children.get(pid, ()))
        return tree

    def _rss(self, pids: List[int]) -> int:
        total = 0
        for pid in pids:
            try:
                with open(f"/proc/{pid}/statm", "rb") as f:
                    total += int(f.read().split()[1]) * self._page
            except (OSError, IndexError, ValueError):
                continue
        return total

    def run(self) -> None:
        while not self._halt.is_set():
            pids = self._tree()
            rss = self._rss(pids)
            self.samples += 1
            if rss > self.peak_bytes:
                self.peak_bytes = rss
            self.peak_processes = max(self.peak_processes, len(pids))
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def measured_run(cmd: List[str], log_prefix: str, env: Optional[dict] = None) -> dict:
    """Runs ``cmd`` with stdout/stderr to log files; wall time and peak tree RSS."""
    os.makedirs(os.path.dirname(log_prefix), exist_ok=True)
    out_path, err_path = log_prefix + ".stdout", log_prefix + ".stderr"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        load_before = _loadavg()
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, env=env)
        sampler = TreeSampler(proc.pid)
        sampler.start()
        # wait4 gives the CPU time of the child and of the descendants it waited for.
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        code = os.waitstatus_to_exitcode(status)
        proc.returncode = code
        sampler.stop()
    with open(out_path, encoding="utf-8", errors="replace") as f:
        stdout = f.read()
    with open(err_path, encoding="utf-8", errors="replace") as f:
        stderr = f.read()
    return {"cmd": cmd, "exit_code": code, "wall_seconds": round(wall, 3),
            "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 3),
            "loadavg_before": load_before, "loadavg_after": _loadavg(),
            "peak_rss_bytes": sampler.peak_bytes,
            "peak_rss_gib": round(sampler.peak_bytes / GIB, 3),
            "peak_processes": sampler.peak_processes, "rss_samples": sampler.samples,
            "stdout": stdout, "stderr_tail": stderr[-3000:],
            "logs": [os.path.relpath(out_path, ROOT), os.path.relpath(err_path, ROOT)]}


def _loadavg() -> Optional[List[float]]:
    """1, 5 and 15 minute load averages: the machine may be shared while measuring."""
    try:
        with open("/proc/loadavg", encoding="ascii") as f:
            return [float(x) for x in f.read().split()[:3]]
    except OSError:
        return None


def _git_state() -> dict:
    """The commit measured and the job's files that differ from it (others edit concurrently)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                                  check=True).stdout.rstrip("\n")
        except (OSError, subprocess.CalledProcessError):
            return ""
    changed = git("status", "--porcelain", "--", "models", "transforms", "pipelines")
    return {"commit": git("rev-parse", "HEAD").strip() or None,
            "uncommitted_job_files": [line[3:] for line in changed.splitlines()]}


# ----------------------------------------------------------------------------- the world

def ensure_world(preset: str, seed: int, skip_generate: bool) -> str:
    """bench/work/<preset>_world, generated (Parquet) when missing."""
    world = os.path.join(WORK, f"{preset}_world")
    complete = all(os.path.exists(os.path.join(world, f"{t}.parquet")) for t in TABLES) \
        and os.path.exists(os.path.join(world, "world.json"))
    if complete:
        return world
    if skip_generate:
        raise SystemExit(f"--skip_generate given but {world} is missing or incomplete")
    print(f"generating the {preset} world into {os.path.relpath(world, ROOT)} ...", flush=True)
    subprocess.run([sys.executable, "-m", "pipelines.generate_world", "--preset", preset,
                    "--format", "parquet", "--seed", str(seed), "--out", world],
                   cwd=ROOT, check=True)
    return world


# ----------------------------------------------------------------------------- Beam side

def run_beam(world: str, as_of: str, preset: str, beam_args: List[str]) -> dict:
    """The batch job in a subprocess, on a fresh warehouse (so no last-run gate applies)."""
    warehouse = os.path.join(WORK, f"{preset}_beam_warehouse.duckdb")
    staging = os.path.join(WORK, f"{preset}_beam_staging")
    for path in (warehouse, warehouse + ".wal"):
        if os.path.exists(path):
            os.remove(path)
    shutil.rmtree(staging, ignore_errors=True)
    cmd = [sys.executable, "-m", "pipelines.batch_recommendations", "--input_dir", world,
           "--warehouse", warehouse, "--staging_dir", staging, "--as_of", as_of] + beam_args
    print("beam: " + " ".join(shlex.quote(c) for c in cmd[1:]), flush=True)
    result = measured_run(cmd, os.path.join(WORK, "logs", f"{preset}_beam"))
    lines = [line for line in result["stdout"].splitlines() if line.strip()]
    result["status_line"] = next((line for line in lines if line.startswith("run ")),
                                 lines[0] if lines else None)
    if result["exit_code"] < 0:
        result["error"] = (f"the job was killed by signal {-result['exit_code']} after "
                           f"{result['wall_seconds']:.0f} s (not by this benchmark)")
    elif result["exit_code"] != 0 and not (result["status_line"] or "").startswith("run "):
        result["error"] = (f"the job failed with exit code {result['exit_code']} "
                           f"(see {result['logs'][1]})")

    result["summary"] = lines
    result["warehouse"] = os.path.relpath(warehouse, ROOT)
    result["users_recommended"] = 0
    if os.path.exists(warehouse):
        import duckdb
        with duckdb.connect(warehouse, read_only=True) as con:
            tables = {r[0] for r in con.execute("SHOW TABLES").fetchall()}
            if "recommendations" in tables:
                result["users_recommended"] = con.execute(
                    "SELECT count(*) FROM recommendations").fetchone()[0]
    shutil.rmtree(staging, ignore_errors=True)
    return result


# ----------------------------------------------------------------------------- DuckDB side

def source_views(world: str) -> List[str]:
    """CREATE VIEW statements for the src_* tables batch.sql reads (Parquet or JSON Lines)."""
    views = []
    for table in TABLES:
        for suffix in (".parquet", ".jsonl", ".jsonl.gz"):
            path = os.path.join(world, table + suffix)
            if os.path.exists(path):
                break
        else:
            raise SystemExit(f"no {table} file in {world}")
        quoted = path.replace("'", "''")
        if suffix == ".parquet":
            reader = f"read_parquet('{quoted}')"
        else:  # every field as text; batch.sql casts and validates
            reader = (f"read_json('{quoted}', format='newline_delimited', "
                      f"ignore_errors=true, sample_size=-1, "
                      f"columns={_json_columns(table)})")
        views.append(f"CREATE OR REPLACE TEMP VIEW src_{table} AS SELECT * FROM {reader}")
    return views


def _json_columns(table: str) -> str:
    fields = {
        "catalog": ("sku", "title", "part_type", "brand", "price", "image_url", "tags",
                    "is_universal", "variant_group"),
        "fitment": ("sku", "make", "model", "year"),
        "users": ("user_id", "email", "make", "model", "year", "updated_at"),
        "events": ("event_id", "event_time", "user_id", "event_name", "sku", "quantity",
                   "price", "order_id"),
    }[table]
    return "{" + ", ".join(f"'{f}': '{'VARCHAR[]' if f == 'tags' else 'VARCHAR'}'"
                           for f in fields) + "}"


def sql_worker(world: str, as_of: str, database: str, timings_path: str) -> None:
    """Runs batch.sql statement by statement (child process of the benchmark)."""
    import duckdb
    for path in (database, database + ".wal"):
        if os.path.exists(path):
            os.remove(path)
    con = duckdb.connect(database)
    con.execute("SET VARIABLE as_of = ?::TIMESTAMPTZ", [as_of])
    for view in source_views(world):
        con.execute(view)
    with open(SQL_SCRIPT, encoding="utf-8") as f:
        script = f.read()
    timings = []
    for statement in duckdb.extract_statements(script):
        started = time.perf_counter()
        con.execute(statement)
        text = " ".join(statement.query.split())
        timings.append({"statement": text[:110], "seconds": round(time.perf_counter() - started, 3)})
    served = con.execute("SELECT count(*) FROM sql_recommendations").fetchone()[0]
    threads = con.execute("SELECT current_setting('threads')").fetchone()[0]
    con.close()
    with open(timings_path, "w", encoding="utf-8") as f:
        json.dump({"statements": timings, "users_recommended": served, "threads": threads}, f)
    print(f"duckdb: {served:,} users recommended in sql_recommendations ({database})")


def run_sql(world: str, as_of: str, preset: str) -> dict:
    database = os.path.join(WORK, f"{preset}_sql.duckdb")
    timings_path = os.path.join(WORK, "logs", f"{preset}_sql_timings.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--_sql_worker", world, as_of, database,
           timings_path]
    print("duckdb: bench/batch.sql", flush=True)
    result = measured_run(cmd, os.path.join(WORK, "logs", f"{preset}_sql"))
    if result["exit_code"] != 0:
        raise SystemExit(f"DuckDB run failed:\n{result['stderr_tail']}")
    with open(timings_path, encoding="utf-8") as f:
        detail = json.load(f)
    result["users_recommended"] = detail["users_recommended"]
    result["threads"] = detail["threads"]
    result["slowest_statements"] = sorted(detail["statements"], key=lambda s: -s["seconds"])[:8]
    result["status_line"] = result["stdout"].strip().splitlines()[-1]
    result["database"] = os.path.relpath(database, ROOT)
    return result


# ----------------------------------------------------------------------------- agreement

AGREEMENT_SQL = """
WITH b AS (SELECT * FROM beam.recommendations),
s AS (SELECT * FROM sql_recommendations),
j AS (
    SELECT coalesce(b.user_id, s.user_id) AS user_id, b.user_id IS NOT NULL AS in_beam,
           s.user_id IS NOT NULL AS in_sql,
           [b.rec_part_1, b.rec_part_2, b.rec_part_3, b.rec_part_4] AS b_recs,
           [s.rec_part_1, s.rec_part_2, s.rec_part_3, s.rec_part_4] AS s_recs,
           b.source AS b_source, s.source AS s_source,
           b.rec1_score AS b_score1, s.rec1_score AS s_score1
    FROM b FULL OUTER JOIN s ON b.user_id = s.user_id
)
SELECT count(*) AS users_union,
       count(*) FILTER (in_beam) AS users_beam,
       count(*) FILTER (in_sql) AS users_sql,
       count(*) FILTER (in_beam AND in_sql) AS users_both,
       count(*) FILTER (in_beam AND in_sql AND b_recs = s_recs) AS identical_in_order,
       count(*) FILTER (in_beam AND in_sql
                        AND list_sort(b_recs) = list_sort(s_recs)) AS identical_as_set,
       count(*) FILTER (in_beam AND in_sql AND b_recs[1] = s_recs[1]) AS rec1_match,
       count(*) FILTER (in_beam AND in_sql AND b_source = s_source) AS source_match,
       max(abs(b_score1 - s_score1)) FILTER (in_beam AND in_sql AND b_recs[1] = s_recs[1])
           AS max_rec1_score_diff
FROM j
"""


def agreement(sql_database: str, beam_warehouse: str) -> dict:
    """How often the DuckDB script and the Beam job recommend the same SKUs to a user."""
    import duckdb
    with duckdb.connect(sql_database, read_only=True) as con:
        quoted = beam_warehouse.replace("'", "''")
        con.execute(f"ATTACH '{quoted}' AS beam (READ_ONLY)")
        row = con.execute(AGREEMENT_SQL).fetchone()
        names = [d[0] for d in con.description]
        stats = dict(zip(names, row))
        by_source = con.execute("""
            SELECT b.source, count(*) AS users,
                   avg(([b.rec_part_1, b.rec_part_2, b.rec_part_3, b.rec_part_4]
                        = [s.rec_part_1, s.rec_part_2, s.rec_part_3, s.rec_part_4])::INT)
                       AS identical_share
            FROM beam.recommendations b JOIN sql_recommendations s USING (user_id)
            GROUP BY ALL ORDER BY users DESC""").fetchall()
    union, both = stats["users_union"] or 1, stats["users_both"] or 1
    return {
        **{k: v for k, v in stats.items()},
        "identical_4_in_order_share": round(stats["identical_in_order"] / union, 6),
        "identical_4_as_set_share": round(stats["identical_as_set"] / union, 6),
        "rec_part_1_match_share": round(stats["rec1_match"] / union, 6),
        "source_match_share": round(stats["source_match"] / union, 6),
        "identical_4_in_order_share_of_common": round(stats["identical_in_order"] / both, 6),
        "rec_part_1_match_share_of_common": round(stats["rec1_match"] / both, 6),
        "denominator": "shares are over the union of users recommended by either side "
                       "(a user missing on one side counts as a disagreement); "
                       "*_of_common over users recommended by both",
        "identical_share_by_beam_source": [
            {"source": s, "users": n, "identical_share": round(float(x), 6)}
            for s, n, x in by_source],
    }


# ----------------------------------------------------------------------------- main

def _side(result: dict) -> dict:
    users = result["users_recommended"]
    wall = result["wall_seconds"]
    keep = {k: v for k, v in result.items() if k not in ("stdout", "cmd")}
    keep["users_per_second"] = round(users / wall, 1) if wall else None
    return keep


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--_sql_worker":
        sql_worker(*argv[1:5])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=("full", "demo"), default="full")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--skip_generate", action="store_true",
                        help="Fail instead of generating a missing world.")
    parser.add_argument("--beam_args", default="",
                        help="Extra pipeline options for the Beam job, one string, e.g. "
                             "--beam_args=\"--direct_num_workers=2 "
                             "--direct_running_mode=multi_processing\".")
    parser.add_argument("--results", default=RESULTS, help="Where the JSON results go.")
    args = parser.parse_args(argv)
    beam_args = shlex.split(args.beam_args)

    code_version = _git_state()
    world = ensure_world(args.preset, args.seed, args.skip_generate)
    with open(os.path.join(world, "world.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    as_of = manifest["as_of"]

    beam = run_beam(world, as_of, args.preset, beam_args)
    print(f"beam:   {beam['wall_seconds']:.1f} s, {beam['users_recommended']:,} users, "
          f"peak RSS {beam['peak_rss_gib']:.2f} GiB; {beam['status_line']}", flush=True)
    if beam.get("error"):
        print(f"beam: {beam['error']}\n{beam['stderr_tail']}", file=sys.stderr)
    sql = run_sql(world, as_of, args.preset)
    print(f"duckdb: {sql['wall_seconds']:.1f} s, {sql['users_recommended']:,} users, "
          f"peak RSS {sql['peak_rss_gib']:.2f} GiB", flush=True)

    agree = None
    if beam["users_recommended"]:
        agree = agreement(os.path.join(ROOT, sql["database"]),
                          os.path.join(ROOT, beam["warehouse"]))

    import apache_beam
    import duckdb
    beam_side, sql_side = _side(beam), _side(sql)
    ratio = round(beam["wall_seconds"] / sql["wall_seconds"], 2)
    results = {
        "preset": args.preset, "seed": args.seed, "as_of": as_of,
        "input_dir": os.path.relpath(world, ROOT), "format": "parquet",
        "row_counts": manifest.get("row_counts"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "apache_beam": apache_beam.__version__, "duckdb": duckdb.__version__,
                    "platform": platform.platform()},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "code": code_version,
        "beam": {"pipeline_args": beam_args, **beam_side},
        "duckdb": sql_side,
        "ratio_beam_wall_over_duckdb_wall": ratio,
        # CPU seconds move less than wall seconds when other work shares the machine.
        "ratio_beam_cpu_over_duckdb_cpu": round(beam["cpu_seconds"] / sql["cpu_seconds"], 2)
        if sql["cpu_seconds"] else None,
        "agreement": agree,
        "target": {
            "users_per_second": TARGET_USERS_PER_SECOND, "peak_rss_gib": TARGET_PEAK_RSS_GIB,
            "beam_meets_throughput": (beam_side["users_per_second"] or 0)
            >= TARGET_USERS_PER_SECOND,
            "beam_meets_memory": beam["peak_rss_gib"] < TARGET_PEAK_RSS_GIB,
        },
    }
    previous = []
    if os.path.exists(args.results):
        try:
            with open(args.results, encoding="utf-8") as f:
                previous = json.load(f).get("runs", [])
        except (ValueError, OSError):
            previous = []
    results["runs"] = previous + [{
        "measured_at": results["measured_at"], "preset": args.preset,
        "commit": code_version["commit"],
        "beam_args": beam_args, "beam_wall_seconds": beam["wall_seconds"],
        "beam_users_per_second": beam_side["users_per_second"],
        "beam_cpu_seconds": beam["cpu_seconds"], "beam_loadavg_after": beam["loadavg_after"],
        "beam_peak_rss_gib": beam["peak_rss_gib"], "beam_users": beam["users_recommended"],
        "duckdb_wall_seconds": sql["wall_seconds"],
        "duckdb_peak_rss_gib": sql["peak_rss_gib"], "ratio": ratio,
        "identical_4_share": agree and agree["identical_4_in_order_share"],
        "rec_part_1_match_share": agree and agree["rec_part_1_match_share"],
    }]
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    with open(args.results, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, default=str)
        f.write("\n")
    print(f"ratio beam/duckdb wall: {ratio}")
    if agree:
        print(f"agreement: identical 4 SKUs {agree['identical_4_in_order_share']:.2%}, "
              f"rec_part_1 {agree['rec_part_1_match_share']:.2%} "
              f"(users beam {agree['users_beam']:,}, duckdb {agree['users_sql']:,})")
    print(f"results: {os.path.relpath(args.results, ROOT)}")
    return 0 if beam["exit_code"] == 0 else 1


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.exit(main())
