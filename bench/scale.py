"""Scale law of the batch job: users 20k → 2M, every shuffle's largest element, and the codec.

    python bench/scale.py                              # 20k, 100k, 500k; SQL at 500k; skew at 500k
    python bench/scale.py --sizes 20000,100000 --sql_at 100000 --skew_at 100000   # quicker
    python bench/scale.py --sizes 2000000 --sql_at 0 --skew_at 0    # one more point, appended

For each size a world is generated as Parquet into bench/work/scale_<users>_world (the
`full` preset's catalogue, fitment and behaviour; only the number of users changes; seed
7), and the batch job runs on it in a subprocess measured like bench/batch.py (wall and
CPU seconds of the process tree, peak summed RSS sampled from /proc, load averages). The
subprocess is this script in ``--_job`` mode: it runs ``pipelines.batch_recommendations``
in-process and, when the run ends, writes the Beam metrics of namespace ``frames``
(distributions of the rows and in-memory bytes of every element each shuffle emitted,
transforms/frames.py) next to the results, so each shuffle's number of keys (elements)
and largest element are read from the run itself.

``--sql_at N``: at N users, bench/batch.sql (DuckDB) runs on the same files in the same
invocation and the two outputs are compared user by user (bench/batch.py's agreement).
``--skew_at N``: a world of N users where 66% of users have no vehicle (the grocer's
"unknown" segment: one key holds two thirds of the users of the per-vehicle shuffle).
``--codec_at N``: pickled pandas (Beam's FastPrimitivesCoder, what the job uses) against
Arrow IPC, encode + decode CPU and bytes, on the shard frames of the N-user world.

Results are merged into bench/results/scale.json by (kind, users), so sizes can be run
one invocation at a time.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import sys
import time
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import batch as batch_bench  # noqa: E402  (bench/batch.py: measuring, SQL side, agreement)

WORK = batch_bench.WORK
RESULTS = os.path.join(HERE, "results", "scale.json")
SKEW_NO_VEHICLE_SHARE = 0.66
GIB = 1024 ** 3
DEFAULT_BOUND = 200_000   # transforms.frames.DEFAULT_MAX_ROWS, for the sizing arithmetic


# ----------------------------------------------------------------------------- worlds

def ensure_world(n_users: int, skew: bool, seed: int) -> str:
    """bench/work/scale_<n>[_skew]_world: the full preset's world with n users (Parquet)."""
    from models.world import generate, write_world
    from models.world.spec import WorldSpec
    name = f"scale_{n_users}{'_skew' if skew else ''}"
    world = os.path.join(WORK, f"{name}_world")
    if os.path.exists(os.path.join(world, "world.json")):
        return world
    spec = dataclasses.replace(WorldSpec.preset("full"), name=name, n_users=n_users)
    if skew:
        spec = dataclasses.replace(spec, null_vehicle_share=SKEW_NO_VEHICLE_SHARE)
    print(f"generating {name} ...", flush=True)
    write_world(generate(spec, seed), world, "parquet", 5)
    return world


def _manifest(world: str) -> dict:
    with open(os.path.join(world, "world.json"), encoding="utf-8") as f:
        return json.load(f)


# ----------------------------------------------------------------------------- job side

def job_main(metrics_path: str, job_args: List[str]) -> int:
    """Runs the batch job in this process; writes its ``frames`` distributions on the way out."""
    import apache_beam as beam
    from apache_beam.metrics.metric import MetricsFilter
    from pipelines import batch_recommendations
    from transforms.frames import METRICS_NAMESPACE
    results = []
    original = beam.Pipeline.run

    def run(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        results.append(result)
        return result

    beam.Pipeline.run = run
    code = batch_recommendations.run(job_args)
    shuffles: Dict[str, dict] = {}
    if results:
        found = results[-1].metrics().query(MetricsFilter().with_namespace(METRICS_NAMESPACE))
        for d in found["distributions"]:
            value = d.committed
            if value is None or not value.count:
                continue
            step = d.key.step.split("/")
            name = "/".join(step[:-1]) or d.key.step   # drop ConcatShard / ConcatPerShard
            entry = shuffles.setdefault(name, {"shuffle": name})
            kind = d.key.metric.name.replace("element_", "")
            entry["keys"] = int(value.count)
            entry[f"largest_{kind}"] = int(value.max)
            entry[f"total_{kind}"] = int(value.sum)
            entry[f"mean_{kind}"] = round(value.sum / value.count, 1)
    with open(metrics_path, "w", encoding="utf-8") as f:
        json.dump(sorted(shuffles.values(), key=lambda e: -e.get("largest_rows", 0)), f)
    return code


def run_job(world: str, tag: str, beam_args: List[str]) -> dict:
    """The batch job on ``world`` in a measured subprocess, on a fresh warehouse."""
    import shutil
    warehouse = os.path.join(WORK, f"{tag}_beam_warehouse.duckdb")
    staging = os.path.join(WORK, f"{tag}_beam_staging")
    metrics = os.path.join(WORK, "logs", f"{tag}_frames_metrics.json")
    for path in (warehouse, warehouse + ".wal", metrics):
        if os.path.exists(path):
            os.remove(path)
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(os.path.dirname(metrics), exist_ok=True)
    job_args = ["--input_dir", world, "--warehouse", warehouse, "--staging_dir", staging,
                "--as_of", _manifest(world)["as_of"]] + beam_args
    cmd = [sys.executable, os.path.abspath(__file__), "--_job", metrics, "--"] + job_args
    print(f"beam {tag}: {' '.join(job_args[-len(beam_args):]) if beam_args else ''}", flush=True)
    result = batch_bench.measured_run(cmd, os.path.join(WORK, "logs", f"{tag}_beam"))
    shutil.rmtree(staging, ignore_errors=True)
    lines = [line for line in result["stdout"].splitlines() if line.strip()]
    result["status_line"] = next((line for line in lines if line.startswith("run ")), None)
    result["warehouse"] = warehouse
    result["users_recommended"] = 0
    if os.path.exists(warehouse):
        import duckdb
        with duckdb.connect(warehouse, read_only=True) as con:
            if "recommendations" in {r[0] for r in con.execute("SHOW TABLES").fetchall()}:
                result["users_recommended"] = con.execute(
                    "SELECT count(*) FROM recommendations").fetchone()[0]
    result["shuffles"] = []
    if os.path.exists(metrics):
        with open(metrics, encoding="utf-8") as f:
            result["shuffles"] = json.load(f)
    return result


def summarise(kind: str, n_users: int, world: str, result: dict, max_rows: int) -> dict:
    manifest = _manifest(world)
    cpu, wall = result["cpu_seconds"], result["wall_seconds"]
    users = result["users_recommended"]
    shuffles = result["shuffles"]
    largest = max(shuffles, key=lambda s: s.get("largest_rows", 0)) if shuffles else {}
    out = {
        "kind": kind, "users": n_users, "input_dir": os.path.relpath(world, ROOT),
        "format": "parquet", "row_counts": manifest.get("row_counts"),
        "exit_code": result["exit_code"], "status_line": result["status_line"],
        "users_recommended": users, "wall_seconds": wall, "cpu_seconds": cpu,
        "peak_rss_gib": result["peak_rss_gib"],
        "users_per_cpu_second": round(users / cpu, 1) if cpu else None,
        "cpu_ms_per_user": round(1000 * cpu / users, 3) if users else None,
        "users_per_wall_second": round(users / wall, 1) if wall else None,
        "loadavg_before": result["loadavg_before"], "loadavg_after": result["loadavg_after"],
        "max_rows_per_element": max_rows,
        "largest_element": {k: largest.get(k) for k in ("shuffle", "largest_rows",
                                                         "largest_bytes", "keys")},
        "largest_element_under_bound": bool(largest) and largest["largest_rows"] <= max_rows,
        "shuffles": shuffles,
        "logs": result["logs"],
    }
    if result["exit_code"] not in (0, 1):
        out["stderr_tail"] = result["stderr_tail"]
    return out


# ----------------------------------------------------------------------------- codec

def codec(world: str, max_rows: int) -> dict:
    """Pickled pandas (the job's coder) against Arrow IPC on the job's shard frames."""
    import apache_beam as beam
    import pyarrow as pa
    from transforms.frames import Sharding, shard_of
    from transforms.io import read_frame

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    def arrow_encode(frame):
        table = pa.Table.from_pandas(frame, preserve_index=False)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        return sink.getvalue().to_pybytes()

    def arrow_decode(blob):
        return pa.ipc.open_stream(blob).read_all().to_pandas()

    pickled = beam.coders.FastPrimitivesCoder()
    coders = {"pickle (FastPrimitivesCoder)": (pickled.encode, pickled.decode),
              "arrow_ipc": (arrow_encode, arrow_decode)}
    keys = {"events": ["event_id"], "users": ["email_lower"], "fitment": ["make", "model", "year"]}
    tables = []
    totals = {name: {"encode_cpu_seconds": 0.0, "decode_cpu_seconds": 0.0, "bytes": 0}
              for name in coders}
    for table, key in keys.items():
        frame, _ = read_frame(world, table)
        if table == "users":
            frame = frame.assign(email_lower=frame["email"].str.lower())
        n = Sharding(16, max_rows).shards_for(len(frame))
        parts = [p.reset_index(drop=True) for _, p in frame.groupby(shard_of(frame, key, n))]
        row = {"table": table, "rows": len(frame), "shards": len(parts)}
        for name, (encode, decode) in coders.items():
            c0 = cpu()
            blobs = [encode(p) for p in parts]
            c1 = cpu()
            back = [decode(b) for b in blobs]
            c2 = cpu()
            same = all(b.equals(p) and list(b.dtypes) == list(p.dtypes)
                       for b, p in zip(back, parts))
            row[name] = {"encode_cpu_seconds": round(c1 - c0, 3),
                         "decode_cpu_seconds": round(c2 - c1, 3),
                         "bytes": sum(len(b) for b in blobs), "round_trip_identical": same}
            totals[name]["encode_cpu_seconds"] += c1 - c0
            totals[name]["decode_cpu_seconds"] += c2 - c1
            totals[name]["bytes"] += sum(len(b) for b in blobs)
        tables.append(row)
    for t in totals.values():
        t["encode_cpu_seconds"] = round(t["encode_cpu_seconds"], 3)
        t["decode_cpu_seconds"] = round(t["decode_cpu_seconds"], 3)
        t["cpu_seconds"] = round(t["encode_cpu_seconds"] + t["decode_cpu_seconds"], 3)
    return {"world": os.path.relpath(world, ROOT), "tables": tables, "totals": totals}


# ----------------------------------------------------------------------------- sizing

# Dataflow batch list prices (us-central1, USD) used for the cost line; check before quoting.
PRICE_VCPU_HOUR = 0.056
PRICE_GB_HOUR = 0.003557
PRICE_SHUFFLE_GB = 0.011
WORKER_VCPUS, WORKER_GB, UTILISATION = 4, 15.0, 0.8


def sizing(runs: List[dict], users: int = 50_000_000, events: int = 1_000_000_000,
           window_hours: float = 2.0) -> Optional[dict]:
    """A 50M-user / 1B-event estimate extrapolated from the uniform runs (labelled as such).

    CPU and shuffle bytes are fitted as ``fixed + per_user * users`` over the measured
    sizes (the fixed part is the catalogue and fitment, which do not grow with users).
    The measured worlds have ~4 events per user; the target has 20, so the per-user
    slope is converted to a per-input-row slope (users + events) before extrapolating.
    """
    import numpy as np
    points = [r for r in runs if r.get("kind") == "uniform" and r.get("exit_code") == 0
              and r.get("shuffles")]
    if len(points) < 2:
        return None
    n = np.array([r["users"] for r in points], float)
    cpu = np.array([r["cpu_seconds"] for r in points], float)
    shuffled = np.array([sum(s.get("total_bytes", 0) for s in r["shuffles"]) for r in points],
                        float)
    cpu_slope, cpu_fixed = np.polyfit(n, cpu, 1)
    bytes_slope, bytes_fixed = np.polyfit(n, shuffled, 1)
    biggest = max(points, key=lambda r: r["users"])
    counts = biggest.get("row_counts") or {}
    rows_per_user = (biggest["users"] + counts.get("events", 0)) / biggest["users"]
    rows = users + events
    cpu_seconds = cpu_fixed + cpu_slope / rows_per_user * rows
    shuffle_gb = (bytes_fixed + bytes_slope / rows_per_user * rows) / 1e9
    vcpu_hours = cpu_seconds / 3600 / UTILISATION
    workers = math_ceil(vcpu_hours / (WORKER_VCPUS * window_hours))
    memory_gb_hours = vcpu_hours / WORKER_VCPUS * WORKER_GB
    cost = (vcpu_hours * PRICE_VCPU_HOUR + memory_gb_hours * PRICE_GB_HOUR
            + shuffle_gb * PRICE_SHUFFLE_GB)
    return {
        "label": "EXTRAPOLATED from the measured sizes, not measured",
        "users": users, "events": events, "fit_over_users": [int(u) for u in n],
        "cpu_seconds_fixed": round(float(cpu_fixed), 1),
        "cpu_ms_per_user_measured_mix": round(float(cpu_slope) * 1000, 4),
        "input_rows_per_user_measured": round(rows_per_user, 2),
        "cpu_us_per_input_row": round(float(cpu_slope / rows_per_user) * 1e6, 2),
        "shuffle_bytes_per_input_row": round(float(bytes_slope / rows_per_user), 1),
        "cpu_hours": round(cpu_seconds / 3600, 1),
        "vcpu_hours_at_utilisation": round(vcpu_hours, 1), "utilisation": UTILISATION,
        "shuffle_gb": round(shuffle_gb, 1),
        "window_hours": window_hours,
        "workers_n1_standard_4": workers,
        "cost_usd": round(cost, 2),
        "prices": {"vcpu_hour": PRICE_VCPU_HOUR, "gb_hour": PRICE_GB_HOUR,
                   "shuffle_gb": PRICE_SHUFFLE_GB},
        "shards_at_default_bound": {
            "JoinUsersWithEvents/ShardByUserId": math_ceil(rows / (DEFAULT_BOUND / 2)),
            "DedupeEvents/ShardByEventId": math_ceil(events / (DEFAULT_BOUND / 2))},
    }


def math_ceil(x: float) -> int:
    import math
    return int(math.ceil(x))


# ----------------------------------------------------------------------------- main

def _load(path: str) -> dict:
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            pass
    return {"runs": []}


def _save(path: str, results: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, default=str)
        f.write("\n")


def _put(results: dict, entry: dict) -> None:
    """Replaces the run of the same kind and size (so sizes can be measured one by one)."""
    results["runs"] = [r for r in results["runs"]
                       if (r.get("kind"), r.get("users")) != (entry["kind"], entry["users"])]
    results["runs"].append(entry)
    results["runs"].sort(key=lambda r: (r["kind"], r["users"]))


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--_job":
        return job_main(argv[1], argv[3:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="20000,100000,500000",
                        help="Comma-separated user counts.")
    parser.add_argument("--sql_at", type=int, default=500_000,
                        help="Run bench/batch.sql too at this size (0: never).")
    parser.add_argument("--skew_at", type=int, default=500_000,
                        help="Users of the skewed world (0: no skew run).")
    parser.add_argument("--codec_at", type=int, default=500_000,
                        help="World size for the pickle/Arrow codec measurement (0: none).")
    parser.add_argument("--max_rows_per_element", type=int, default=None,
                        help="Passed to the job (default: the job's default bound).")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--results", default=RESULTS)
    args = parser.parse_args(argv)
    from transforms.frames import DEFAULT_MAX_ROWS
    max_rows = args.max_rows_per_element or DEFAULT_MAX_ROWS
    beam_args = ([] if args.max_rows_per_element is None
                 else ["--max_rows_per_element", str(max_rows)])
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]

    results = _load(args.results)
    import apache_beam
    import duckdb
    results["machine"] = {"cpus": os.cpu_count(), "apache_beam": apache_beam.__version__,
                          "duckdb": duckdb.__version__}
    results["method"] = ("bench/scale.py: world = the full preset with only n_users changed "
                         "(Parquet, seed 7); one DirectRunner process; CPU = user+sys of the "
                         "process tree; peak RSS summed over the tree, sampled every 0.2 s")
    for n in sizes:
        world = ensure_world(n, False, args.seed)
        tag = f"scale_{n}"
        result = run_job(world, tag, beam_args)
        entry = summarise("uniform", n, world, result, max_rows)
        entry["code"] = batch_bench._git_state()
        entry["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        print(f"{tag}: {entry['wall_seconds']:.0f} s wall, {entry['cpu_seconds']:.0f} CPU-s, "
              f"{entry['users_per_cpu_second']} users/CPU-s, peak {entry['peak_rss_gib']} GiB, "
              f"largest element {entry['largest_element']}", flush=True)
        if n == args.sql_at:
            sql = batch_bench.run_sql(world, _manifest(world)["as_of"], tag)
            agree = batch_bench.agreement(os.path.join(ROOT, sql["database"]),
                                          result["warehouse"])
            entry["duckdb"] = {k: sql[k] for k in ("wall_seconds", "cpu_seconds", "peak_rss_gib",
                                                   "users_recommended", "loadavg_before",
                                                   "loadavg_after")}
            entry["ratio_beam_cpu_over_duckdb_cpu"] = round(
                entry["cpu_seconds"] / sql["cpu_seconds"], 2)
            entry["ratio_beam_wall_over_duckdb_wall"] = round(
                entry["wall_seconds"] / sql["wall_seconds"], 2)
            entry["agreement"] = {k: agree[k] for k in (
                "users_union", "users_both", "identical_4_in_order_share",
                "rec_part_1_match_share", "source_match_share")}
            print(f"  duckdb {sql['cpu_seconds']:.1f} CPU-s; ratio "
                  f"{entry['ratio_beam_cpu_over_duckdb_cpu']}x CPU; agreement "
                  f"{entry['agreement']['identical_4_in_order_share']:.2%}", flush=True)
        _put(results, entry)
        _save(args.results, results)
    if args.skew_at:
        world = ensure_world(args.skew_at, True, args.seed)
        tag = f"scale_{args.skew_at}_skew"
        entry = summarise("skew", args.skew_at, world, run_job(world, tag, beam_args), max_rows)
        entry["no_vehicle_share"] = SKEW_NO_VEHICLE_SHARE
        entry["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        print(f"{tag}: largest element {entry['largest_element']}", flush=True)
        _put(results, entry)
        _save(args.results, results)
    results["sizing_50m_users_1b_events"] = sizing(results["runs"])
    _save(args.results, results)
    if args.codec_at:
        results["codec"] = codec(ensure_world(args.codec_at, False, args.seed), max_rows)
        results["codec"]["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        print(f"codec: {json.dumps(results['codec']['totals'])}", flush=True)
        _save(args.results, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
