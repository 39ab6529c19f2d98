"""Benchmark of the ranker: training on 1M (user, sku) rows, scoring 500,000 users × 50 candidates.

    python bench/ranker.py                  # both parts (generates missing worlds)
    python bench/ranker.py --part train     # examples from the demo world, fits on 1M rows
    python bench/ranker.py --part score     # re-ranked recommendations for the full world

Training part: runs the training job's Beam graph (``pipelines.train_ranker.build``)
on the demo world (Parquet, seed 7) with a high negative ratio so that the
training snapshots hold at least 1,000,000 rows, takes exactly 1,000,000 of them
(seeded), and times each learner on them: LightGBM binary and lambdarank with
the job's early stopping on the validation snapshots, LightGBM binary for a
fixed ``max_rounds`` (the worst case), and the logistic baseline. The binary
model is saved as the artifact the scoring part uses.

Scoring part: the full world (500,000 users, Parquet, seed 7) cleaned in process
with the batch job's own functions, the ranker's user states at ``as_of``, then
``recommend_all`` with the ``RerankingRecommender`` (exactly what ``RerankHandler``
runs per shard: pools of 50 candidates + intent, features, LightGBM, rules) and
with the plain ``Recommender`` for comparison. Reports rows scored per second,
users per second and the split between feature building and prediction.

Every timing records wall and CPU seconds and the load average before and after:
the machine is shared, and a load above its 2 cores stretches wall time.
Results: bench/results/ranker.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import subprocess
import sys
import time
from typing import Callable, Dict, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

WORK = os.path.join(HERE, "work")
OWN = os.path.join(WORK, "ranker")
RESULTS = os.path.join(HERE, "results", "ranker.json")
TRAIN_ROWS = 1_000_000
TARGET_TRAIN_SECONDS = 60.0
TARGET_USERS = 500_000
CANDIDATES = 50


def loadavg():
    try:
        with open("/proc/loadavg", encoding="ascii") as handle:
            return [float(v) for v in handle.read().split()[:3]]
    except OSError:
        return None


def timed(label: str, fn: Callable, log: Dict[str, dict]):
    """Runs ``fn``; records wall and CPU seconds and load averages under ``label``."""
    before, wall, cpu = loadavg(), time.perf_counter(), time.process_time()
    out = fn()
    log[label] = {"wall_seconds": round(time.perf_counter() - wall, 3),
                  "cpu_seconds": round(time.process_time() - cpu, 3),
                  "loadavg_before": before, "loadavg_after": loadavg()}
    print(f"  {label}: {log[label]['wall_seconds']:.1f} s wall, "
          f"{log[label]['cpu_seconds']:.1f} s CPU, load {log[label]['loadavg_after']}",
          flush=True)
    return out


def ensure_world(preset: str) -> str:
    """bench/work/<preset>_world as Parquet (seed 7), generated when missing."""
    out = os.path.join(WORK, f"{preset}_world")
    if not os.path.exists(os.path.join(out, "world.json")):
        subprocess.run([sys.executable, "-m", "pipelines.generate_world", "--preset", preset,
                        "--seed", "7", "--format", "parquet", "--out", out], cwd=ROOT,
                       check=True)
    return out


def as_of_of(world: str) -> str:
    with open(os.path.join(world, "world.json")) as handle:
        return json.load(handle)["as_of"]


# ----------------------------------------------------------------------------- training

def bench_train(args) -> dict:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from models import features, ranker
    from pipelines import train_ranker
    from transforms.ranker import save_model

    world = ensure_world("demo")
    staging = os.path.join(OWN, "demo_examples")
    log: Dict[str, dict] = {}
    argv = ["--input_dir", world, "--as_of", as_of_of(world),
            "--warehouse", os.path.join(OWN, "unused.duckdb"), "--staging_dir", staging,
            "--run_id", "bench_ranker", "--num_shards", "8",
            "--ranker_negative_ratio", str(args.negative_ratio)] + args.beam_args.split()
    options = PipelineOptions(argv)
    ctx = train_ranker.context_from(options)
    if not args.reuse_examples or not os.path.isdir(os.path.join(staging, "examples")):
        def run_pipeline():
            pipeline = beam.Pipeline(options=options)
            train_ranker.build(pipeline, options, ctx)
            pipeline.run().wait_until_finish()
        timed("beam_examples_demo", run_pipeline, log)
    examples = timed("read_examples", lambda: train_ranker.read_examples(staging), log)
    names = features.feature_names(ctx.config)
    cutoff = pd.to_datetime(examples["cutoff"], utc=True)
    train_frame = examples.loc[cutoff < min(ctx.valid_cutoffs)]
    valid_frame = examples.loc[cutoff >= min(ctx.valid_cutoffs)]
    available = len(train_frame)
    if available < TRAIN_ROWS:
        raise SystemExit(f"only {available:,} training rows; raise --negative_ratio")
    rows = np.sort(np.random.default_rng(7).choice(available, TRAIN_ROWS, replace=False))
    sample = train_frame.iloc[rows]
    train = ranker.to_split(sample, names)
    valid = ranker.to_split(valid_frame, names)
    fits = {}
    kept = logistic = None
    # Each learner with one and two LightGBM threads: on a shared 2-core machine OpenMP
    # threads that wait for each other can make two threads slower than one.
    for threads in (1, 2):
        tconfig = ranker.TrainConfig(num_threads=threads)
        for objective in ("binary", "lambdarank"):
            label = f"fit_lightgbm_{objective}_{threads}_thread"
            model, info = timed(label, lambda o=objective, c=tconfig: ranker.train_lightgbm(
                train, valid, names, o, c), log)
            fits[f"lightgbm_{objective}_{threads}_thread"] = {
                **info, **ranker.evaluate_split(model, valid, 4), **log[label]}
            if objective == "binary" and threads == 1:
                kept = model
        fixed = dataclasses.replace(tconfig, early_stopping_rounds=10 ** 6)
        label = f"fit_lightgbm_binary_fixed_rounds_{threads}_thread"
        _, info = timed(label, lambda c=fixed: ranker.train_lightgbm(
            train, valid, names, "binary", c), log)
        fits[f"lightgbm_binary_fixed_{fixed.max_rounds}_rounds_{threads}_thread"] = {
            **info, **log[label]}
    logistic, info = timed("fit_logistic", lambda: ranker.train_logistic(
        train, names, ranker.TrainConfig()), log)
    fits["logistic"] = {**info, **ranker.evaluate_split(logistic, valid, 4),
                        **log["fit_logistic"]}
    kept.metadata.update({
        "features": list(names), "selected": "lightgbm_binary", "challenger": "logistic",
        "feature_distributions": ranker.feature_distributions(
            valid_frame[list(names)].to_numpy(float), names),
        "challenger_artifact": logistic.to_bytes().decode()})
    kept.metadata["version"] = ranker.model_version(kept, pd.Timestamp.now(tz="UTC"))
    path = save_model(kept, os.path.join(OWN, "models"))
    return {
        "world": os.path.relpath(world, ROOT), "as_of": as_of_of(world),
        "negative_ratio": args.negative_ratio,
        "training_rows_available": int(available), "rows": int(len(train)),
        "positives": int(train.y.sum()), "groups": int(train.group.max() + 1),
        "valid_rows": int(len(valid)), "valid_positives": int(valid.y.sum()),
        "features": len(names), "fits": fits, "stages": log, "artifact": path,
        "target_seconds": TARGET_TRAIN_SECONDS,
        "meets_target": bool(
            fits[f"lightgbm_binary_{ranker.TrainConfig().num_threads}_thread"]["wall_seconds"]
            < TARGET_TRAIN_SECONDS and fits["logistic"]["wall_seconds"] < TARGET_TRAIN_SECONDS),
        "default_threads": ranker.TrainConfig().num_threads,
    }


# ----------------------------------------------------------------------------- scoring

def load_clean(world: str, config):
    """The batch job's cleaning, in process (validation, catalogue, unknown SKUs, duplicates)."""
    from models import profiles
    from models.catalog import resolve_conflicts
    from transforms.io import read_frame

    catalog = resolve_conflicts(read_frame(world, "catalog")[0]).catalog
    fitment = read_frame(world, "fitment")[0]
    fitment = fitment.loc[fitment["sku"].isin(catalog["sku"])].drop_duplicates(
        ["sku", *config.fitment_attributes])
    events = read_frame(world, "events")[0]
    events = profiles.dedupe_events(events.loc[events["sku"].isin(catalog["sku"])]).rows
    users = profiles.mark_duplicate_users(read_frame(world, "users")[0], "email_lower")
    return catalog, fitment, events, users


def bench_score(args) -> dict:
    from models import features, popularity, profiles, ranker, recommend
    from models.catalog import CatalogArrays
    from models.config import DEFAULT_CONFIG as config
    from transforms.features import fitting_by_vehicle
    from transforms.ranker import load_model

    world = ensure_world(args.score_preset)
    as_of = pd.Timestamp(as_of_of(world))
    fconfig = features.FeatureConfig(candidates_per_user=CANDIDATES)
    log: Dict[str, dict] = {}
    catalog, fitment, events, users = timed("read_and_clean", lambda: load_clean(world, config),
                                            log)
    arrays = CatalogArrays.build(catalog, config.rules)

    def prepare():
        lines = profiles.orders_with_segments(events, users, list(config.segment_attributes))
        index = popularity.PopularityIndex(popularity.partial_popularity(lines, as_of, config),
                                           arrays.sku, config)
        hist = features.build_history(events, catalog)
        items = features.ItemTable.build(arrays, features.item_counts(hist, [as_of], fconfig),
                                         index, fconfig)
        return index, hist, items
    index, hist, items = timed("popularity_and_item_table", prepare, log)
    deduped = profiles.mark_duplicate_users(users, "user_id")
    kept = deduped.loc[~deduped["is_duplicate"].to_numpy(bool)].reset_index(drop=True)
    states = timed("user_states", lambda: features.user_states(
        kept, hist, [as_of], fconfig, config, labels=False), log)
    fitting = {k: frozenset(v) for k, v in fitting_by_vehicle(
        fitment, config.fitment_attributes).items()}
    model = load_model(args.model or os.path.join(OWN, "models"))
    baseline = recommend.Recommender(arrays, index, config)
    base_recs, _ = timed("recommend_segment_popularity", lambda: recommend.recommend_all(
        baseline, states, fitting), log)
    reranker = ranker.RerankingRecommender(
        arrays, index, config, model, items, fconfig,
        drift=ranker.DriftCounts(model.metadata.get("feature_distributions", {})))
    recs, unserved = timed("recommend_reranked", lambda: recommend.recommend_all(
        reranker, states, fitting), log)
    # Prediction alone, on a sample of real feature rows, to split the scoring time.
    x = _sample_matrix(reranker, states, fitting, 1_000_000)
    timed("predict_1m_rows", lambda: model.predict(x), log)
    timed("predict_1m_rows_single_thread", lambda: model.model.predict(
        x, num_threads=1) if model.kind == "lightgbm" else model.predict(x), log)
    rerank_seconds = log["recommend_reranked"]["wall_seconds"]
    predict_share = (log["predict_1m_rows"]["wall_seconds"] / 1e6 * reranker.rows_scored
                     / rerank_seconds) if rerank_seconds else None
    drift = ranker.drift_table(model.metadata.get("feature_distributions", {}), reranker.drift)
    return {
        "world": os.path.relpath(world, ROOT), "as_of": str(as_of),
        "users": int(len(states)), "users_recommended": int(len(recs)),
        "users_unserved": int(len(unserved)), "candidates_per_user": CANDIDATES,
        "rows_scored": int(reranker.rows_scored),
        "rows_per_user_scored": round(reranker.rows_scored / max(len(states), 1), 2),
        "cold_users_share": round(float(ranker._cold(states).mean()), 4),
        "rows_per_second": round(reranker.rows_scored / rerank_seconds, 1),
        "users_per_second": round(len(states) / rerank_seconds, 1),
        "candidate_rows_per_second": round(len(states) * CANDIDATES / rerank_seconds, 1),
        "predict_rows_per_second": round(1e6 / log["predict_1m_rows"]["wall_seconds"], 1),
        "estimated_predict_share_of_scoring": round(predict_share, 3) if predict_share else None,
        "overhead_vs_segment_popularity_seconds": round(
            rerank_seconds - log["recommend_segment_popularity"]["wall_seconds"], 3),
        "model": model.version, "model_trees": int(model.model.num_trees())
        if model.kind == "lightgbm" else None,
        "psi_max": float(drift["psi"].max()) if len(drift) else None,
        "retrain_recommended": bool(drift["flagged"].any()) if len(drift) else False,
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2, 3),
        "stages": log,
    }


def _sample_matrix(reranker, states, fitting, rows: int) -> np.ndarray:
    """Feature rows of the first vehicles' pools, repeated to ``rows`` rows."""
    from models import popularity, recommend
    config = reranker.config
    mats, total = [], 0
    for _, group in recommend.vehicle_groups(states, config.group_attributes):
        group = group.reset_index(drop=True)
        first = group.iloc[0]
        vehicle = popularity.segment_key([first[a] for a in config.fitment_attributes])
        cand = reranker.candidates(reranker.catalog.index_of(sorted(fitting.get(vehicle, ()))))
        if not len(cand):
            continue
        levels, pools = reranker.builder.build(group, cand, reranker.popularity)
        mats.append(reranker.builder.matrix(group, pools, cand, levels, reranker.items))
        total += len(mats[-1])
        if total >= rows:
            break
    x = np.concatenate(mats)
    return np.resize(x, (rows, x.shape[1])) if len(x) < rows else x[:rows]


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("train", "score", "all"), default="all")
    parser.add_argument("--negative_ratio", type=float, default=2000.0,
                        help="Negatives per positive in the demo training snapshots "
                             "(high enough for 1M training rows).")
    parser.add_argument("--reuse_examples", action="store_true",
                        help="Reuse bench/work/ranker/demo_examples if present.")
    parser.add_argument("--score_preset", default="full", choices=("tiny", "demo", "full"))
    parser.add_argument("--model", default=None,
                        help="Artifact for scoring (default: the one the train part saved).")
    parser.add_argument("--beam_args", default="", help="Extra Beam options for the train part.")
    args = parser.parse_args(argv)
    os.makedirs(OWN, exist_ok=True)
    results = {}
    if os.path.exists(RESULTS):
        with open(RESULTS) as handle:
            results = json.load(handle)
    import apache_beam
    import lightgbm
    import sklearn
    results["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "apache_beam": apache_beam.__version__,
                          "lightgbm": lightgbm.__version__, "scikit-learn": sklearn.__version__,
                          "platform": platform.platform()}
    if args.part in ("train", "all"):
        print("training benchmark (demo world, 1M rows):", flush=True)
        results["training"] = bench_train(args)
    if args.part in ("score", "all"):
        print(f"scoring benchmark ({args.score_preset} world):", flush=True)
        results["scoring"] = bench_score(args)
    results["measured_at"] = pd.Timestamp.now(tz="UTC").isoformat()
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as handle:
        json.dump(results, handle, indent=2, default=str)
    print(json.dumps({k: v for k, v in results.items() if k != "machine"}, indent=2,
                     default=str)[:4000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
