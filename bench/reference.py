"""How much memory the streaming job's reference data takes per worker process.

    python bench/reference.py                    # demo and full presets (generated if missing)
    python bench/reference.py --presets demo     # quick check

For each preset, a fresh subprocess builds the reference data exactly as a
streaming worker does (`FileReference.current()`: catalogue, fitment, users and
the order history, validated and resolved into `models.streaming.ReferenceData`)
and reports its resident memory before and after, the peak (``VmHWM``) after
the first load and after a reload for a new version (the catalogue file
touched), the loads' wall and CPU seconds, the table sizes and each part's size.
One process per preset, so nothing of one world stays in the next one's
figures. Results go to ``bench/results/reference.json`` with the load averages
(the machine is shared: CPU seconds are the steadier number).
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

RESULTS = os.path.join(ROOT, "bench", "results", "reference.json")
WORK = os.path.join(ROOT, "bench", "work")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def measure(world: str, history_table: str) -> dict:
    """In this (fresh) process: build the reference data of ``world`` and measure it."""
    import gc

    from models.config import DEFAULT_CONFIG
    from transforms.streaming import FileReference

    gc.collect()
    before = _status_kib("VmRSS")
    cpu0, wall0 = time.process_time(), time.perf_counter()
    reference = FileReference(world, DEFAULT_CONFIG, 3600, history_table)
    data = reference.current()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    gc.collect()
    after = _status_kib("VmRSS")
    peak_first = _status_kib("VmHWM")
    # A new version (the catalogue replaced): the old copy is dropped before the new one is
    # built, so the process peak is one copy plus the build's transient, not two copies.
    catalog = next(os.path.join(world, n) for n in os.listdir(world) if n.startswith("catalog."))
    os.utime(catalog, None)
    del data      # what a worker holds between elements: nothing but the reference's own copy
    cpu0, wall0 = time.process_time(), time.perf_counter()
    data = reference.current(reference.checked())
    reload_cpu, reload_wall = time.process_time() - cpu0, time.perf_counter() - wall0
    gc.collect()
    after_reload = _status_kib("VmRSS")
    parts = {}
    for name in ("catalog", "users", "servable", "history_lines", "history_popularity",
                 "history_events"):
        frame = getattr(data, name)
        parts[name] = {"rows": int(len(frame)),
                       "frame_mib": round(frame.memory_usage(deep=True).sum() / 2**20, 1)}
    for name in ("fitting", "history_index", "vehicle_users", "arrays"):
        parts[name] = {"pickled_mib": round(len(pickle.dumps(getattr(data, name), 4)) / 2**20, 1)}
    parts["fitting"]["vehicles"] = len(data.fitting)
    parts["fitting"]["sku_vehicle_pairs"] = int(sum(len(v) for v in data.fitting.values()))
    return {
        "rss_before_mib": round(before / 1024, 1),
        "rss_after_mib": round(after / 1024, 1),
        "rss_held_mib": round((after - before) / 1024, 1),
        "peak_rss_first_load_mib": round(peak_first / 1024, 1),
        "peak_rss_mib": round(_status_kib("VmHWM") / 1024, 1),
        "rss_after_reload_mib": round(after_reload / 1024, 1),
        "reload_wall_seconds": round(reload_wall, 1),
        "reload_cpu_seconds": round(reload_cpu, 1),
        "pickled_mib": round(len(pickle.dumps(data, 4)) / 2**20, 1),
        "load_wall_seconds": round(wall, 1),
        "load_cpu_seconds": round(cpu, 1),
        "parts": parts,
        "input_files_mib": {name: round(os.path.getsize(os.path.join(world, name)) / 2**20, 1)
                            for name in sorted(os.listdir(world))
                            if name.split(".")[0] in ("catalog", "fitment", "users", "events")},
    }


def world_of(preset: str) -> str:
    """The preset's world as Parquet under bench/work (seed 7), generated when missing."""
    world = os.path.join(WORK, f"{preset}_world")
    if not os.path.exists(os.path.join(world, "catalog.parquet")):
        subprocess.run([sys.executable, "-m", "pipelines.generate_world", "--preset", preset,
                        "--seed", "7", "--format", "parquet", "--bad_rows", "0",
                        "--out", world], check=True, cwd=ROOT)
    return world


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="demo,full")
    parser.add_argument("--history_table", default="events")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # the subprocess
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.history_table)))
        return
    runs = {}
    for preset in [p for p in args.presets.split(",") if p]:
        world = world_of(preset)
        load_before = os.getloadavg()
        proc = subprocess.run([sys.executable, __file__, "--measure", world,
                               "--history_table", args.history_table],
                              capture_output=True, text=True, check=True, cwd=ROOT)
        runs[preset] = {**json.loads(proc.stdout.strip().splitlines()[-1]),
                        "load_average_before": [round(x, 2) for x in load_before],
                        "load_average_after": [round(x, 2) for x in os.getloadavg()]}
        print(preset, json.dumps(runs[preset], indent=1))
    result = {"bench": "reference", "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                  time.gmtime()),
              "cpus": os.cpu_count(), "history_table": args.history_table, "presets": runs}
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as handle:
        json.dump(result, handle, indent=2)
        handle.write("\n")


if __name__ == "__main__":
    main()
