"""Reliability figures of the hand-written hostile corpus (issue #13, docs/reliability.md).

    python bench/hostile.py            # prints the tables, writes bench/results/hostile.json

The corpus is tests/hostile/ (one cases file per input table, one of Pub/Sub
messages; each case carries its expected verdict and why). This script runs
the same harness as tests/test_hostile_corpus.py and counts, per table and for
Pub/Sub: tried, accepted as expected, dead-lettered with the expected reason,
dead-lettered for another reason, wrongly accepted, wrongly refused, lost,
crashed. It also runs the batch job on the tiny world (seed 11) with and
without the corpus appended and records, per table, what the corpus added to
read / processed / dead-lettered / deduplicated, the unexplained gap, how many
expected dead letters were found with their reason, and any published value
that no contract should have let through.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results", "hostile.json")
sys.path.insert(0, ROOT)

from models.health import RECONCILED_TABLES, reconcile  # noqa: E402
from pipelines import generate_world  # noqa: E402
from tests.hostile import harness as h  # noqa: E402


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _table(title: str, rows: dict) -> str:
    names = ("tried", "accepted", "dead-lettered (expected reason)", "dead-lettered (other)",
             "wrongly accepted", "wrongly refused", "lost", "crashed")
    lines = [f"| {title} | " + " | ".join(names) + " |",
             "| --- " * (len(names) + 1) + "|"]
    for label, figures in rows.items():
        lines.append(f"| {label} | " + " | ".join(str(figures[k]) for k in h.FIGURES) + " |")
    return "\n".join(lines)


def _total(rows: dict) -> dict:
    return {k: sum(r[k] for r in rows.values()) for k in h.FIGURES}


def job_figures(world_dir: str, as_of: str, work: str) -> dict:
    """The batch job without and with the corpus: what the corpus added, per table."""
    runs = {}
    for name in ("clean", "hostile"):
        directory = os.path.join(work, name)
        os.makedirs(directory)
        for table in h.TABLES:
            shutil.copy(os.path.join(world_dir, f"{table}.jsonl"), directory)
        added = h.append_corpus(directory) if name == "hostile" else {}
        started = time.perf_counter()
        try:
            run = h.run_batch_job(directory, os.path.join(directory, "warehouse.duckdb"), as_of)
        except Exception as err:  # noqa: BLE001 - a crash is a figure here
            return {"crashed": f"{type(err).__name__}: {err}"[:500]}
        runs[name] = (run, added, time.perf_counter() - started)
    (clean, _, _), (hostile, added, seconds) = runs["clean"], runs["hostile"]
    before, after = reconcile(clean.counters), reconcile(hostile.counters)
    tables = {}
    for table in RECONCILED_TABLES:
        cases = h.load_cases(table)
        paired = h.match_dead_letters(cases, hostile.dead_letters)
        expected_dead = [i for i, c in enumerate(cases) if h.expected_kind(c.expect) == h.DEAD]
        figures = {k: after[table][k] - before[table][k]
                   for k in ("read", "processed", "dead_lettered", "deduplicated")}
        figures.update({
            "lines_added": added[table], "unexplained": after[table]["unexplained"],
            "expected_dead": len(expected_dead),
            "expected_dead_found_with_reason": sum(1 for i in expected_dead if i in paired),
            "not_found": [f"{cases[i].label}: {cases[i].why}" for i in expected_dead
                          if i not in paired]})
        tables[table] = figures
    unsafe = h.unsafe_published_values(hostile.recommendations)
    return {"exit_code": hostile.exit_code, "status": hostile.status,
            "seconds": round(seconds, 1), "users_published": int(len(hostile.recommendations)),
            "dead_letters_without_reason": int((~hostile.dead_letters["reason"].map(
                lambda r: isinstance(r, str) and r.strip() != "")).sum()),
            "tables": tables, "unsafe_published_values": unsafe}


def main() -> int:
    work = tempfile.mkdtemp(prefix="hostile_")
    try:
        world_dir = os.path.join(work, "world")
        generate_world.main(["--preset", "tiny", "--seed", "11", "--out", world_dir,
                             "--bad_rows", "0"])
        with open(os.path.join(world_dir, "world.json")) as handle:
            as_of = json.load(handle)["as_of"]
        world = h.World.read(world_dir)

        batch, mismatches = {}, []
        for table, (cases, outcomes) in h.all_batch_outcomes(world).items():
            batch[table] = h.figures(cases, outcomes)
            mismatches += h.mismatches(cases, outcomes)
        messages = h.load_messages()
        parsed = h.stream_outcomes(messages)
        final = h.stream_reference_outcomes(messages, parsed, h.reference_skus(world))
        pubsub = {}
        for table in ("events", "treatment_events"):
            mine = [i for i, m in enumerate(messages) if m.table == table]
            pubsub[f"Pub/Sub {table}"] = h.figures([messages[i] for i in mine],
                                                    [final[i] for i in mine])
        mismatches += h.mismatches(messages, final)
        job = job_figures(world_dir, as_of, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    result = {"commit": _commit(), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                time.gmtime()),
              "batch": {**batch, "total": _total(batch)},
              "pubsub": {**pubsub, "total": _total(pubsub)},
              "job": job, "mismatches": mismatches}
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as handle:
        json.dump(result, handle, indent=2, ensure_ascii=True)
        handle.write("\n")
    print(_table("batch checks", result["batch"]))
    print()
    print(_table("streaming", result["pubsub"]))
    print()
    if "tables" in job:
        print(f"batch job with the corpus: exit {job['exit_code']} ({job['status']}), "
              f"{job['users_published']:,} users published in {job['seconds']} s")
        for table, f in job["tables"].items():
            print(f"  {table:8s} +{f['lines_added']} lines: read +{f['read']}, processed "
                  f"+{f['processed']}, dead-lettered +{f['dead_lettered']}, deduplicated "
                  f"+{f['deduplicated']}, unexplained {f['unexplained']}; expected dead "
                  f"letters found with their reason {f['expected_dead_found_with_reason']}/"
                  f"{f['expected_dead']}")
        print(f"  unsafe published values: {len(job['unsafe_published_values'])}")
    else:
        print(f"batch job CRASHED: {job['crashed']}")
    print(f"\n{len(mismatches)} cases off their expected verdict:")
    for line in mismatches:
        print("  " + line)
    print(f"\nwrote {os.path.relpath(RESULTS, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
