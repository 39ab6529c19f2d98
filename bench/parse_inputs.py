"""Benchmark of reading inputs: JSON Lines parsed and validated as the batch job does.

    python bench/parse_inputs.py                     # the demo world (generated if missing)
    python bench/parse_inputs.py --world out/demo_world --repeats 5

Runs ``ParseJsonLinesFn`` (orjson, the repeated-key check, ``contracts.validate``)
over every line of the five SPEC §2 tables of a world, in the job's batches of
``BATCH_ROWS`` lines, without a runner, so the figure is the parser's alone. Reports
the best of ``--repeats`` runs in wall and CPU seconds, rows kept and dead letters,
and the load average: the machine is shared, and a load above its cores stretches
wall time (compare CPU seconds).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pandas as pd  # noqa: E402

from pipelines import generate_world  # noqa: E402
from transforms.io import BATCH_ROWS, ParseJsonLinesFn  # noqa: E402

TABLES = ("catalog", "fitment", "users", "events", "treatment_events")


def parse_all(data):
    """Rows kept and dead letters over every table, batch by batch."""
    rows = dead = 0
    for table, lines in data.items():
        fn = ParseJsonLinesFn(table)
        for start in range(0, len(lines), BATCH_ROWS):
            for out in fn.process(lines[start:start + BATCH_ROWS]):
                if isinstance(out, pd.DataFrame):
                    rows += len(out)
                elif out.tag == "dead_letter":
                    dead += len(out.value)
    return rows, dead


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", default="out/demo_world")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if not os.path.exists(os.path.join(args.world, "events.jsonl")):
        generate_world.main(["--preset", "demo", "--seed", "1", "--out", args.world])
    data = {}
    for table in TABLES:
        with open(os.path.join(args.world, f"{table}.jsonl"), "rb") as handle:
            data[table] = handle.read().splitlines()
    load_before = os.getloadavg()[0]
    best = None
    for _ in range(args.repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        rows, dead = parse_all(data)
        timing = (time.perf_counter() - wall, time.process_time() - cpu)
        best = timing if best is None or timing[1] < best[1] else best
    print(json.dumps({"lines": sum(map(len, data.values())), "rows": rows, "dead_letters": dead,
                      "wall_s": round(best[0], 2), "cpu_s": round(best[1], 2),
                      "load_before": load_before, "load_after": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
