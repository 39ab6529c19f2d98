"""Ranking changes per window: one key with state (before) against pairs per window end (now).

    python bench/streaming_ranking.py                         # demo world, results merged into
                                                              # bench/results/streaming_ranking.json
    python bench/streaming_ranking.py --preset tiny --windows 4 --skip_pipeline   # a quick look

`RankingChanges` (transforms/streaming/ranking.py) compares each window with
the one before. Before, one key held the previous window's frame and the
picks of the vehicles ranked in it, so a vehicle re-ranked in consecutive
windows was ranked once per window; now each window end's group ranks its
vehicles under both windows (nothing is carried over). What that costs:

* ``per_window`` (no Beam): production-shaped windows (7 days every hour by
  default) over the world's history plus a stream of orders at
  ``--orders_per_hour`` (the field's ~2,000 orders in two days: ~42/hour);
  for each window, the vehicles whose own segments changed are ranked the old
  way (this window, plus the previous window only for vehicles not ranked
  in it) with the per-vehicle lookup of the code before and with today's
  vectorised one, and the new way (both windows), timed in CPU and wall
  seconds; all three must give the same picks. Also
  the pickled size of a pane (the new graph shuffles each pane twice; the old
  one wrote it to state once and read it back once) and what pickling costs.
* ``pipeline`` (DirectRunner, TestStream): `WindowedPopularity` alone, then
  with the old `RankingChanges` (read from git, ``--before_commit``; with the
  old per-vehicle lookup, ``before_as_it_was``, and with today's models,
  ``before``) and with this one, on the same stream; the ranking's cost is
  the difference.

The machine is shared: every figure is quoted with the load average at its start.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from models import ranking_notices as rule  # noqa: E402
from models import stream_popularity as cells  # noqa: E402
from models import streaming as model  # noqa: E402
from models.config import DEFAULT_CONFIG, RankingNoticesConfig  # noqa: E402
from models.world import WorldSpec, generate, write_world  # noqa: E402
from transforms.streaming import FileReference, WindowPopularity  # noqa: E402

RESULTS = os.path.join(ROOT, "bench", "results", "streaming_ranking.json")
HOUR_US = 3_600 * 1_000_000
CONFIG = DEFAULT_CONFIG


def _world(directory: str, preset: str) -> str:
    if not os.path.exists(os.path.join(directory, "world.json")):
        write_world(generate(WorldSpec.preset(preset), 7), directory, "jsonl", 0)
    return directory


def _load() -> List[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _timed(fn):
    cpu, wall = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - cpu, time.perf_counter() - wall


def _orders(ref, n: int, start_us: int, span_us: int, seed: int):
    """``n`` order lines of servable users (each counted at its buyer's segments) over a span."""
    rng = np.random.default_rng(seed)
    by_user = cells.segments_by_user(ref.users, CONFIG)
    users = [u for vehicle_users in ref.vehicle_users.values() for u in vehicle_users]
    skus = list(ref.catalog["sku"])
    times = np.sort(rng.integers(start_us, start_us + span_us, n))
    return [(int(at), c) for at in times
            for c in cells.line_cells(by_user.get(users[int(rng.integers(len(users)))]),
                                      skus[int(rng.integers(len(skus)))], int(at), 1, CONFIG)]


def _default_picks_per_row(scorer, reference, vehicles, config) -> Dict:
    """`models.streaming.default_picks` as it was before (d5abe45): one lookup per vehicle."""
    from models import popularity, recommend
    group = list(config.group_attributes)
    probes = [reference.servable.loc[reference.vehicle_users[v][0],
                                     ["user_id", "email_lower", *group]] for v in vehicles]
    if not probes:
        return {}
    users = pd.DataFrame(probes).reset_index(drop=True)
    recs, _ = recommend.recommend_all(scorer.recommender, users, reference.fitting)
    parts = ["source"] + [f"rec_part_{i}" for i in range(1, config.rules.recs_per_user + 1)]
    keys = popularity.segment_keys(recs, group).to_numpy(object)
    return {k: tuple(row) for k, row in zip(keys, recs[parts].itertuples(index=False))}


def per_window(args, ref) -> Dict:
    """Old and new ranking per window, on the same frames (no Beam)."""
    size_us, period_us = args.window_hours * HOUR_US, HOUR_US
    end0 = int(pd.Timestamp("2026-03-08", tz="UTC").value // 1_000)
    span = size_us + args.windows * period_us
    lines = _orders(ref, int(args.orders_per_hour * span / HOUR_US), end0 - size_us, span, 11)
    times = np.array([at for at, _ in lines])
    levels = [CONFIG.level_name(level) for level in CONFIG.levels[:2]]
    by_segment = cells.vehicles_by_segment(ref.vehicle_users, CONFIG)

    def frame(end_us):
        lo, hi = np.searchsorted(times, [end_us - size_us, end_us])
        return cells.window_popularity([c for _, c in lines[lo:hi]], ref, end_us, CONFIG)

    rows = []
    previous = frame(end0 - period_us)
    previous_picks: Dict = {}
    for k in range(args.windows):
        end = end0 + k * period_us
        current = frame(end)
        ranked, cpu_changed, wall_changed = _timed(
            lambda: rule.ranked_vehicles(previous, current, by_segment, levels))

        def old(rank):  # the state's way: this window, and the previous only where not kept
            picks = rank(model.scorer(ref, current, CONFIG), ref, ranked, CONFIG) if ranked else {}
            missing = [v for v in ranked if v not in previous_picks]
            if missing:
                rank(model.scorer(ref, previous, CONFIG), ref, missing, CONFIG)
            return picks, len(missing)

        (picks, missing), cpu_was, wall_was = _timed(lambda: old(_default_picks_per_row))
        (same, _), cpu_old, wall_old = _timed(lambda: old(model.default_picks))
        new, cpu_new, wall_new = _timed(
            lambda: rule.picks_between(ref, previous, current, ranked, CONFIG))
        assert same == picks and {v: p for v, (p, _) in new.items()} == {
            v: tuple(str(x) for x in p) for v, p in picks.items()}
        pane = WindowPopularity(pd.Timestamp(end - size_us, unit="us", tz="UTC"),
                                pd.Timestamp(end, unit="us", tz="UTC"), "ON_TIME", True,
                                0, 0, current)
        blob, cpu_pickle, wall_pickle = _timed(lambda: pickle.dumps(pane, protocol=4))
        _, cpu_unpickle, _ = _timed(lambda: pickle.loads(blob))
        rows.append({"window": k, "vehicles_ranked": len(ranked),
                     "previous_ranked_again_before": missing,
                     "changed_cpu_s": cpu_changed, "changed_wall_s": wall_changed,
                     "before_as_it_was_cpu_s": cpu_was, "before_as_it_was_wall_s": wall_was,
                     "before_cpu_s": cpu_old, "before_wall_s": wall_old,
                     "now_cpu_s": cpu_new, "now_wall_s": wall_new,
                     "pane_pickled_bytes": len(blob), "pickle_cpu_s": cpu_pickle,
                     "unpickle_cpu_s": cpu_unpickle, "load_average": _load()})
        previous, previous_picks = current, picks
    measured = rows[1:] or rows     # the first window ranks its previous fully either way

    def median(key):
        return round(statistics.median(r[key] for r in measured), 4)

    def total(key):
        return round(sum(r[key] for r in measured), 3)

    return {
        "windows": args.windows, "window_hours": args.window_hours, "period_hours": 1,
        "orders_per_hour": args.orders_per_hour,
        "stream_order_lines_in_a_window": int(args.orders_per_hour * args.window_hours),
        "vehicles": len(ref.vehicle_users),
        "frame_rows": int(len(previous)),
        "median_vehicles_ranked_per_window": statistics.median(
            r["vehicles_ranked"] for r in measured),
        "median_cpu_s_per_window": {
            "before_as_it_was": median("before_as_it_was_cpu_s"),
            "before_reuse_with_vectorised_lookup": median("before_cpu_s"),
            "now_pairs_rank_both": median("now_cpu_s"),
            "changed_segments": median("changed_cpu_s")},
        "median_wall_s_per_window": {
            "before_as_it_was": median("before_as_it_was_wall_s"),
            "before_reuse_with_vectorised_lookup": median("before_wall_s"),
            "now_pairs_rank_both": median("now_wall_s")},
        "total_cpu_s": {"before_as_it_was": total("before_as_it_was_cpu_s"),
                        "before_reuse_with_vectorised_lookup": total("before_cpu_s"),
                        "now": total("now_cpu_s")},
        "total_wall_s": {"before_as_it_was": total("before_as_it_was_wall_s"),
                         "before_reuse_with_vectorised_lookup": total("before_wall_s"),
                         "now": total("now_wall_s")},
        "median_previous_ranked_again_before": statistics.median(
            r["previous_ranked_again_before"] for r in measured),
        "pane_pickled_mb": round(statistics.median(r["pane_pickled_bytes"]
                                                   for r in measured) / 2**20, 2),
        "median_pickle_cpu_s": median("pickle_cpu_s"),
        "median_unpickle_cpu_s": median("unpickle_cpu_s"),
        "per_window": rows,
    }


# --- the same in a Beam pipeline ------------------------------------------------------------------

def _before_module(commit: str):
    """`transforms/streaming/popularity.py` as of ``commit`` (it held RankingChanges then)."""
    source = subprocess.run(["git", "-C", ROOT, "show",
                             f"{commit}:transforms/streaming/popularity.py"],
                            check=True, capture_output=True, text=True).stdout
    path = os.path.join(tempfile.mkdtemp(), "popularity_before.py")
    with open(path, "w") as handle:
        handle.write(source)
    spec = importlib.util.spec_from_file_location("popularity_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["popularity_before"] = module
    spec.loader.exec_module(module)
    return module


def pipeline(args, world: str) -> Dict:
    """WindowedPopularity alone, + the old RankingChanges, + this one: CPU and wall, DirectRunner."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
    from apache_beam.testing.test_stream import TestStream
    from apache_beam.transforms.window import TimestampedValue
    from transforms.streaming import RankingChanges, WindowedPopularity

    before = _before_module(args.before_commit)
    reference = FileReference(world, CONFIG, 3600, "")
    ref = reference.current()
    spec = model.WindowSpec.of_seconds(args.pipeline_window_seconds, args.pipeline_period_seconds,
                                       0)
    base = 1_700_000_000
    users = [u for vehicle_users in ref.vehicle_users.values() for u in vehicle_users]
    skus = list(ref.catalog["sku"])
    rng = np.random.default_rng(5)
    span = args.pipeline_periods * args.pipeline_period_seconds
    seconds = np.sort(rng.uniform(0, span, args.pipeline_orders))
    records = [TimestampedValue({"event_id": f"E{i}", "user_id": users[int(rng.integers(len(users)))],
                                 "event_name": "Placed Order",
                                 "sku": skus[int(rng.integers(len(skus)))], "order_id": f"O{i}",
                                 "quantity": 1, "price": 100.0,
                                 "event_time_us": int((base + s) * 1_000_000)}, base + s)
               for i, s in enumerate(seconds)]
    unthrottled = CONFIG.replace(ranking_notices=RankingNoticesConfig(min_interval_hours=0.0))

    def run(which: str) -> Dict:
        stream = TestStream().advance_watermark_to(base)
        for k in range(args.pipeline_periods):
            lo, hi = k * args.pipeline_period_seconds, (k + 1) * args.pipeline_period_seconds
            stream = stream.add_elements([r for r in records if lo <= r.timestamp - base < hi])
            stream = stream.advance_watermark_to(base + hi)
        stream = stream.advance_watermark_to(base + span + 10_000).advance_watermark_to_infinity()
        options = PipelineOptions()
        options.view_as(StandardOptions).streaming = True
        load = _load()
        vectorised = model.default_picks
        if which == "before_as_it_was":      # the old graph with the old per-vehicle lookup
            model.default_picks = _default_picks_per_row
        cpu, wall = time.process_time(), time.perf_counter()
        try:
            with beam.Pipeline(runner="BundleBasedDirectRunner", options=options) as p:
                pop = p | stream | WindowedPopularity(spec, reference, CONFIG)
                if which in ("before", "before_as_it_was"):
                    pop.first_panes | before.RankingChanges(reference, unthrottled, spec)
                elif which == "now":
                    pop.first_panes | RankingChanges(reference, unthrottled, spec)
        finally:
            model.default_picks = vectorised
        return {"cpu_s": round(time.process_time() - cpu, 2),
                "wall_s": round(time.perf_counter() - wall, 2), "load_average_at_start": load}

    runs = {}
    for which in args.pipeline_order.split(","):
        runs.setdefault(which, []).append(run(which))
    best = {k: min(v, key=lambda r: r["cpu_s"]) for k, v in runs.items()}
    windows = args.pipeline_periods + spec.overlap - 1
    out = {"orders": args.pipeline_orders, "window_seconds": args.pipeline_window_seconds,
           "period_seconds": args.pipeline_period_seconds, "windows": windows,
           "before_commit": args.before_commit, "runs": runs}
    if "popularity_only" in best:
        for which in ("before_as_it_was", "before", "now"):
            if which in best:
                extra = best[which]["cpu_s"] - best["popularity_only"]["cpu_s"]
                out[f"ranking_cpu_s_per_window_{which}"] = round(extra / windows, 4)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo", choices=("tiny", "demo"))
    parser.add_argument("--windows", type=int, default=24, help="consecutive windows ranked")
    parser.add_argument("--window_hours", type=int, default=168)
    parser.add_argument("--orders_per_hour", type=float, default=42.0)
    parser.add_argument("--skip_per_window", action="store_true")
    parser.add_argument("--skip_pipeline", action="store_true")
    parser.add_argument("--before_commit", default="d5abe45",
                        help="commit whose transforms/streaming/popularity.py holds the "
                             "one-key RankingChanges")
    parser.add_argument("--pipeline_orders", type=int, default=300)
    parser.add_argument("--pipeline_window_seconds", type=int, default=60)
    parser.add_argument("--pipeline_period_seconds", type=int, default=10)
    parser.add_argument("--pipeline_periods", type=int, default=12)
    parser.add_argument("--pipeline_order",
                        default="popularity_only,before_as_it_was,before,now,now,before,"
                                "before_as_it_was,popularity_only",
                        help="runs, in order (each kind's run with the least CPU is used)")
    parser.add_argument("--label", default="", help="a key to file this run under")
    args = parser.parse_args(argv)

    world = _world(os.path.join(ROOT, "out", f"bench_world_{args.preset}"), args.preset)
    results = {}
    if os.path.exists(RESULTS):
        with open(RESULTS) as handle:
            results = json.load(handle)
    run = {"at": pd.Timestamp.now(tz="UTC").isoformat(), "preset": args.preset,
           "load_average_at_start": _load(), "cpus": os.cpu_count()}
    if not args.skip_per_window:
        ref, cpu, wall = _timed(lambda: FileReference(world, CONFIG, 3600, "").current())
        run["reference_load"] = {"cpu_s": round(cpu, 2), "wall_s": round(wall, 2)}
        run["per_window"] = per_window(args, ref)
    if not args.skip_pipeline:
        run["pipeline"] = pipeline(args, world)
    run["load_average_at_end"] = _load()
    key = args.label or f"{args.preset}_{run['at'][:16]}"
    results[key] = run          # earlier runs' keys are kept
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as handle:
        json.dump(results, handle, indent=2, default=float)
    summary = {k: v for k, v in run.get("per_window", {}).items() if k != "per_window"}
    print(json.dumps({"per_window": summary, "pipeline": run.get("pipeline")}, indent=2,
                     default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
