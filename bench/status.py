"""What unattended operation costs (#19): ``pipelines.status`` and the changes explanation.

    python bench/status.py                  # the demo preset (20,000 users)
    python bench/status.py --preset tiny    # quick check

Generates the world into bench/work/<preset>_world unless it is there, runs the batch
job twice on one fresh DuckDB warehouse (the second run with a larger
``scoring.specific_bonus`` and ``--accept_changes``, so its lists change), then
measures, on those real outputs: ``models.stability.explain_changes`` in this
process (wall and CPU seconds), and ``python -m pipelines.status --html`` as a
subprocess (wall and CPU seconds, its exit status). Writes bench/results/status.json
with the load average, since the machine is shared.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORK = os.path.join(HERE, "work")
RESULTS = os.path.join(HERE, "results", "status.json")
sys.path.insert(0, ROOT)


def _child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run(argv, **kwargs):
    cpu, wall = _child_cpu(), time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, capture_output=True,
                          text=True, **kwargs)
    return proc, time.perf_counter() - wall, _child_cpu() - cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="demo")
    args = parser.parse_args()
    world = os.path.join(WORK, f"{args.preset}_world")
    if not os.path.exists(os.path.join(world, "world.json")):
        subprocess.run([sys.executable, "-m", "pipelines.generate_world", "--preset",
                        args.preset, "--seed", "7", "--out", world], cwd=ROOT, check=True)
    with open(os.path.join(world, "world.json")) as handle:
        as_of = json.load(handle)["as_of"]
    out = os.path.join(WORK, "status")
    os.makedirs(out, exist_ok=True)
    warehouse = os.path.join(out, f"{args.preset}.duckdb")
    for path in (warehouse, warehouse + ".lock"):
        if os.path.exists(path):
            os.remove(path)
    config = os.path.join(out, "changed.yaml")
    with open(config, "w") as handle:
        handle.write("scoring:\n  specific_bonus: 1.0\n")
    batch = {}
    for run_id, extra in (("bench_first", []),
                          ("bench_second", ["--config", config, "--accept_changes"])):
        proc, wall, cpu = _run(["pipelines.batch_recommendations", "--input_dir", world,
                                "--warehouse", warehouse, "--as_of", as_of, "--run_id",
                                run_id, *extra])
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
            return 1
        batch[run_id] = {"wall_seconds": round(wall, 1), "cpu_seconds": round(cpu, 1)}

    import duckdb
    from models.stability import explain_changes
    with duckdb.connect(warehouse, read_only=True) as con:
        backup = con.execute("SELECT table_name FROM information_schema.tables WHERE "
                             "table_name LIKE 'recommendations_backup_%'").fetchone()[0]
        previous = con.execute(f'SELECT * FROM "{backup}"').df()
        current = con.execute("SELECT * FROM recommendations").df()
        dead = con.execute("SELECT * FROM dead_letter WHERE run_id = 'bench_second'").df()
        popularity = con.execute("SELECT * FROM segment_popularity").df()
        counters = json.loads(con.execute("SELECT counters FROM pipeline_runs WHERE run_id = "
                                          "'bench_second'").fetchone()[0])
        stored = con.execute("SELECT kind, count(*) FROM stability_changes WHERE run_id = "
                             "'bench_second' GROUP BY kind ORDER BY kind").fetchall()
        top = con.execute("SELECT detail FROM stability_changes WHERE run_id = 'bench_second' "
                          "ORDER BY rank LIMIT 3").fetchall()
    cpu, wall = time.process_time(), time.perf_counter()
    changes = explain_changes(previous, current, 4, dead, popularity, popularity, counters,
                              counters)
    explain = {"wall_seconds": round(time.perf_counter() - wall, 3),
               "cpu_seconds": round(time.process_time() - cpu, 3),
               "users_previous": len(previous), "users_current": len(current),
               "rows": len(changes), "stored_rows_by_kind": dict(stored),
               "first_lines": [t[0] for t in top]}
    page = os.path.join(out, "status.html")
    proc, wall, cpu = _run(["pipelines.status", "--warehouse", warehouse, "--html", page,
                            "--verify"])
    status = {"exit": proc.returncode, "wall_seconds": round(wall, 2),
              "cpu_seconds": round(cpu, 2), "page_bytes": os.path.getsize(page),
              "first_line": (proc.stdout.splitlines()[0] if proc.stdout else "").replace(
                  ROOT + os.sep, "")}
    result = {"preset": args.preset, "loadavg": [round(x, 2) for x in os.getloadavg()],
              "cpus": os.cpu_count(), "batch_runs": batch, "explain_changes": explain,
              "status_cli": status}
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as handle:
        json.dump(result, handle, indent=2)
        handle.write("\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
