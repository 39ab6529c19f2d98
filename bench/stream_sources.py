"""Candidate sources in the streaming refresh: what the slot mix and the union ranker cost.

    python bench/stream_sources.py                 # demo world, results in bench/results/stream_sources.json
    python bench/stream_sources.py --preset tiny --users 500

Refresh cost: one week of the generated world's stream (``holdout_events``)
is one window; its buyers and browsers are refreshed as `RefreshShardFn` does
(`models.streaming.refresh_users` with a `Serving`), in shards of ``--shard``
users, under three configurations (plus the refresh as it was before the
handler: `recommend_all` with the same popularity, then the QA checks the DoFn
ran itself then): segment popularity alone (the default),
the tuned mix of bench/results/tune_completejourney.yaml (buy-again 2,
also-bought 1, popularity 1) and the same mix re-ranked by a union ranker
(trained here on synthetic examples: its cost, not its quality, is measured).
Reported: CPU seconds per 1,000 users refreshed (process CPU, beside wall
seconds) and the once-per-window cost (the window's shared tables, the
handler's load), with the load average before and after (the machine is
shared).

State sizes (a mix of all four sources): the history's co-occurrence cells
(`HistorySources.cells`), the window's line accumulator (`LinesPerWindow`,
pickled bytes) and the cost of one window's tables, with the window's orders at
1x and 10x (synthetic lines: buyers drawn from the world's users, SKUs from its
order mix), and the history's co-occurrence at 1x and 10x history lines drawn
the same way.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from models import profiles, stream_sources, union_ranker  # noqa: E402
from models import streaming as model  # noqa: E402
from models.config import CandidatesConfig, RecsConfig  # noqa: E402
from models.ranker import TrainConfig  # noqa: E402
from models.recommend_handler import UnionRerankHandler, handler_for  # noqa: E402
from models.world import WorldSpec, generate, write_world  # noqa: E402
from transforms.streaming import FileReference  # noqa: E402

RESULTS = os.path.join(ROOT, "bench", "results", "stream_sources.json")
WEEK_US = 7 * 86_400 * 1_000_000
TUNED = (("buy_again", 2), ("also_bought", 1), ("segment_popularity", 1))


def _clock():
    return time.perf_counter(), time.process_time()


def _since(start):
    wall, cpu = _clock()
    return round(wall - start[0], 3), round(cpu - start[1], 3)


def _union_model(config):
    """A union ranker for the mix's sources, trained on synthetic rows (for its cost only)."""
    sources = config.candidates.sources
    rng = np.random.default_rng(1)

    def examples(seed):
        rows = {s: [] for s in sources}
        future, blend = {}, []
        for u in range(80):
            user = f"s{seed}u{u}"
            for k, source in enumerate(sources):
                skus = [f"{source[:2]}{j}" for j in rng.permutation(30)[:6]]
                for sku, score in zip(skus, np.sort(rng.random(6))[::-1]):
                    rows[source].append((user, sku, float(score)))
                if k == 0:
                    blend.append((user, 1, skus[0]))
                if k == 1:
                    future[user] = frozenset({skus[2]})
        frame = union_ranker.union_features(
            {s: pd.DataFrame(r, columns=["user_id", "sku", "score"]) for s, r in rows.items()},
            list(sources))
        frame = frame.assign(y=union_ranker.label(frame, future))
        return union_ranker.Examples(frame, pd.DataFrame(blend, columns=["user_id", "slot",
                                                                         "sku"])), future
    train, _ = examples(1)
    valid, future = examples(2)
    found, _ = union_ranker.train_union(train, valid, future, config, TrainConfig(
        k=1, objective="binary", min_data_in_leaf=5, max_rounds=30), k=1)
    return found


def refresh_cost(world_dir, window, as_of, users, shard):
    out = {}
    mix = RecsConfig().replace(candidates=CandidatesConfig(mix=TUNED))
    ranker = _union_model(mix)
    for name, config, union in (("segment_popularity_before", RecsConfig(), None),
                                ("segment_popularity", RecsConfig(), False),
                                ("tuned_mix", mix, False), ("tuned_mix_union_ranker", mix, True)):
        ref = FileReference(world_dir, config, 0, "events").current()
        start = _clock()
        orders = window.loc[window["event_name"].isin(model.ORDER_EVENT_NAMES)]
        pop = model.window_popularity(orders, ref, as_of, config)
        pop_cost = _since(start)
        start = _clock()
        tables = None
        if not config.candidates.popularity_only:
            base = stream_sources.HistorySources.build(ref.history_lines, ref.arrays.sku,
                                                       config.candidates)
            history_cost = _since(start)
            start = _clock()
            lines = stream_sources.fresh_lines(stream_sources.cells_of_events(window),
                                               ref.arrays.sku, ref.history_keys)
            tables = stream_sources.tables_at(
                base, ref.history_lines, ref.history_as_of, lines, as_of, config.candidates,
                frozenset(ref.arrays.sku[ref.arrays.eligible])).tables
        else:
            history_cost = (0.0, 0.0)
        if union is None:   # the refresh before #16 item 2: recommend_all, no handler
            serving = model.scorer(ref, pop, config)
        else:
            handler = (UnionRerankHandler(config, lambda: ranker) if union
                       else handler_for(config))
            serving = model.serving(ref, pop, handler, tables)
        window_cost = _since(start)
        requests = model.requests_of_events(window.loc[window["user_id"].isin(users)])
        names = sorted(requests)
        start = _clock()
        rows = unserved = 0
        for i in range(0, len(names), shard):
            part = {u: requests[u] for u in names[i:i + shard]}
            done = model.refresh_users(part, ref, serving, as_of, config)
            if union is None and len(done.rows):   # the QA the DoFn ran itself before
                from models import rules
                rules.check(done.rows, rules.QAContext(
                    catalog=ref.catalog.set_index("sku"), fitting=ref.fitting,
                    bought=dict(zip(done.signals["user_id"], done.signals["bought"])),
                    popularity=serving.index, catalog_skus=ref.arrays.sku,
                    eligible_skus=frozenset(ref.arrays.sku[ref.arrays.eligible])), config)
            rows += len(done.rows)
            unserved += len(done.unserved)
        wall, cpu = _since(start)
        out[name] = {"users_refreshed": len(names), "rows": rows, "unserved": unserved,
                     "shard_users": shard, "refresh_wall_s": wall, "refresh_cpu_s": cpu,
                     "cpu_s_per_1000_users": round(1000 * cpu / max(len(names), 1), 3),
                     "wall_s_per_1000_users": round(1000 * wall / max(len(names), 1), 3),
                     "model_version": getattr(serving, "model_version", "(scorer)"),
                     "per_window": {"popularity_wall_cpu_s": pop_cost,
                                    "tables_and_load_wall_cpu_s": window_cost},
                     "per_reference_version": {"history_tables_wall_cpu_s": history_cost}}
        print(name, json.dumps(out[name]), flush=True)
    return out


def _synthetic_lines(n, users, skus, weights, start_us, span_us, rng, prefix):
    at = rng.integers(start_us, start_us + span_us, size=n)
    return pd.DataFrame({
        "user_id": pd.Series(rng.choice(users, size=n), dtype=object),
        "sku": pd.Series(rng.choice(skus, size=n, p=weights), dtype=object),
        "order_id": pd.Series([f"{prefix}{i}" for i in range(n)], dtype=object),
        "event_time": pd.Series(pd.to_datetime(at, unit="us", utc=True)).astype(
            "datetime64[us, UTC]")})


def state_sizes(world_dir, window, as_of):
    # Every source, so the trending slice is measured too.
    config = RecsConfig().replace(candidates=CandidatesConfig(mix=(
        ("buy_again", 1), ("also_bought", 1), ("trending", 1), ("segment_popularity", 1))))
    ref = FileReference(world_dir, config, 0, "events").current()
    rng = np.random.default_rng(3)
    counts = ref.history_lines["sku"].value_counts()
    skus, weights = counts.index.to_numpy(object), (counts / counts.sum()).to_numpy(float)
    users = ref.servable["user_id"].to_numpy(object)
    real = len(profiles.order_lines(window))
    out = {"window_lines_real": real, "catalogue_skus": int(len(ref.arrays.sku))}
    hist_start = int(model.micros(ref.history_lines["event_time"]).min())
    hist_span = int(model.micros(ref.history_lines["event_time"]).max()) - hist_start
    for scale in (1, 10):
        lines = _synthetic_lines(scale * len(ref.history_lines), users, skus, weights,
                                 hist_start, hist_span, rng, f"H{scale}_")
        start = _clock()
        base = stream_sources.HistorySources.build(lines, ref.arrays.sku, config.candidates)
        cost = _since(start)
        out[f"history_{scale}x"] = {
            "history_lines": len(lines), "cooccurrence_cells": base.cells,
            "cooccurrence_bytes": int(base.cooccurrence.data.nbytes
                                      + base.cooccurrence.indices.nbytes
                                      + base.cooccurrence.indptr.nbytes),
            "gaps_rows": len(base.gaps), "build_wall_cpu_s": cost}
        print("history", scale, out[f"history_{scale}x"], flush=True)
    base = stream_sources.HistorySources.build(ref.history_lines, ref.arrays.sku,
                                               config.candidates)
    out["history_real"] = {"history_lines": len(ref.history_lines),
                           "cooccurrence_cells": base.cells}
    for scale in (1, 10):
        lines = _synthetic_lines(scale * real, users, skus, weights, as_of.value // 1000 - WEEK_US,
                                 WEEK_US, rng, f"W{scale}_")
        cells = {(o, s): (int(t.value // 1000), u) for o, s, t, u in zip(
            lines["order_id"], lines["sku"], lines["event_time"], lines["user_id"])}
        start = _clock()
        fresh = stream_sources.fresh_lines(cells, ref.arrays.sku, ref.history_keys)
        got = stream_sources.window_tables(base, fresh, as_of, config.candidates)
        cost = _since(start)
        out[f"window_{scale}x"] = {
            "window_lines": got.window_lines, "buyers": got.buyers,
            "accumulator_pickled_bytes": len(pickle.dumps(cells, protocol=4)),
            "pair_updates": got.pair_updates, "cooccurrence_cells": got.cells,
            "similarity_rows_rescored": got.rows_rescored,
            "tables_wall_cpu_s": cost, "trending_lines_rescored": got.trending_lines}
        print("window", scale, out[f"window_{scale}x"], flush=True)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--users", type=int, default=2000, help="users refreshed per strategy")
    parser.add_argument("--shard", type=int, default=250, help="users per refresh call")
    parser.add_argument("--output", default=RESULTS)
    args = parser.parse_args(argv)
    load_before = list(os.getloadavg())
    with tempfile.TemporaryDirectory() as tmp:
        start = _clock()
        write_world(generate(WorldSpec.preset(args.preset), args.seed), tmp, "jsonl", 0)
        print("world written", _since(start), flush=True)
        ref = FileReference(tmp, RecsConfig(), 0, "events").current()
        from transforms.io import read_frame
        stream, _ = read_frame(tmp, "holdout_events")
        stream = profiles.dedupe_events(stream.loc[stream["sku"].isin(ref.catalog["sku"])]).rows
        times = model.micros(stream["event_time"])
        end = (int(times.min()) // WEEK_US + 2) * WEEK_US
        window = stream.loc[(times >= end - WEEK_US) & (times < end)].reset_index(drop=True)
        as_of = pd.Timestamp(end, unit="us", tz="UTC")
        touched = sorted(set(window["user_id"]) & set(ref.servable.index))[:args.users]
        result = {"preset": args.preset, "seed": args.seed, "as_of": str(as_of),
                  "window_events": len(window),
                  "refresh": refresh_cost(tmp, window, as_of, touched, args.shard),
                  "state_sizes": state_sizes(tmp, window, as_of)}
    result["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                         "loadavg_before": load_before, "loadavg_after": list(os.getloadavg()),
                         "note": "shared 2-core machine; CPU seconds are the process's own"}
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as handle:
        json.dump(result, handle, indent=1, default=str)
        handle.write("\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
