"""Train the ranker (SPEC §6): point-in-time examples in Beam, LightGBM and a baseline, artifact.

    python -m pipelines.train_ranker --input_dir out/demo_world \\
        --as_of 2026-02-28T23:59:12Z --ranker_model_dir out/models/ranker

1. Beam (any runner): the batch job's cleaned inputs → one state row per
   (user, cutoff) at weekly cutoffs before ``--as_of`` → the candidate stage's
   pool per user (segment popularity + intent) → labels (a purchase within 7
   days after the cutoff) → negatives downsampled in training cutoffs → Parquet
   examples under the staging directory.
2. In this process: LightGBM (lambdarank and binary objectives, or the one
   ``--ranker_objective`` names) and a logistic-regression baseline trained on
   the older cutoffs, compared on the newest (validation NDCG@k, k the config's
   ``recs_per_user``); the best is kept, the best of the other family rides
   along as the challenger. The best must also beat the plain popularity order
   it re-ranks on the same validation pools: if it does not, the job says so in
   one line and the artifact records ``beats_baseline: false``, so the batch
   job refuses it and serves the popularity order (``models.ranker.refusal``).
3. The artifact ``<ranker_model_dir>/<version>.json`` (local or ``gs://``)
   carries the model, feature list, training window, row counts, metrics,
   library versions and the feature distributions PSI is computed against;
   ``<ranker_model_dir>/LATEST`` names it.

Prints the selection report; exit status 0 when an artifact was written.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import time
from typing import List, NamedTuple, Optional, Tuple

import apache_beam as beam
import pandas as pd
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from models import features, ranker
from models.config import RecsConfig
from models.config_file import ConfigError, load_config
from pipelines.jobs import UsageError, entry_point, job_options
from pipelines.options import (CommonOptions, as_of_of, check_attributes, require_input_dir,
                               require_tables, require_writable_dir, run_id_of,
                               sharding_of)
from transforms.features import BuildExamples, ReadCleanInputs, examples_schema
from transforms.health import SumCounts
from transforms.io import WriteFrames
from transforms.ranker import save_model

JOB = "train_ranker"
_F = features.FeatureConfig()
_T = ranker.TrainConfig()


class TrainRankerOptions(PipelineOptions):
    """Flags of the training job (the shared ones are in CommonOptions; names are unique)."""

    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--ranker_model_dir", default="out/models/ranker",
                            help="Where the versioned artifact and LATEST go (path or gs://).")
        parser.add_argument("--ranker_objective", default=_T.objective,
                            choices=ranker.OBJECTIVES + ("auto",),
                            help="LightGBM objective; auto trains both and keeps the better.")
        parser.add_argument("--ranker_cutoffs", type=int, default=_F.n_cutoffs,
                            help="Training snapshots before --as_of (newest ones validate).")
        parser.add_argument("--ranker_cutoff_step_days", type=int, default=_F.cutoff_step_days)
        parser.add_argument("--ranker_valid_cutoffs", type=int, default=_F.valid_cutoffs)
        parser.add_argument("--ranker_negative_ratio", type=float, default=_F.negative_ratio,
                            help="Negatives kept per positive in training rows (0: all).")
        parser.add_argument("--ranker_eval_user_share", type=float,
                            default=_F.eval_user_share,
                            help="Share of non-buying users kept in validation snapshots.")
        parser.add_argument("--ranker_candidates", type=int, default=_F.candidates_per_user,
                            help="Candidates per user from segment popularity.")
        parser.add_argument("--ranker_max_rounds", type=int, default=_T.max_rounds)


class TrainContext(NamedTuple):
    """Fixed before the graph is built."""

    run_id: str
    as_of: pd.Timestamp
    staging_dir: str
    model_dir: str
    config: RecsConfig
    fconfig: features.FeatureConfig
    tconfig: ranker.TrainConfig
    cutoffs: Tuple[pd.Timestamp, ...]
    train_cutoffs: Tuple[pd.Timestamp, ...]
    valid_cutoffs: Tuple[pd.Timestamp, ...]


def parse_as_of(value: Optional[str]) -> pd.Timestamp:
    """``--as_of`` as a UTC time (now when absent); a UsageError unless strict RFC 3339."""
    return as_of_of(value, pd.Timestamp.now(tz="UTC"))


def check_inputs(input_dir: str, config: RecsConfig, holdout: bool = False) -> None:
    """The tables ReadCleanInputs reads exist, and the configured attributes are their columns."""
    tables = ["catalog", "users", "events"] + (["fitment"] if config.fitment_attributes
                                               else []) + (["holdout_events"] if holdout else [])
    check_attributes(require_tables(input_dir, tables), config.segment_attributes,
                     config.fitment_attributes)


def context_from(options: PipelineOptions) -> TrainContext:
    """Resolve defaults and fail fast on bad options (before any data is read)."""
    own = options.view_as(TrainRankerOptions)
    common = options.view_as(CommonOptions)
    require_input_dir(common.input_dir)
    if common.num_shards < 1:
        raise UsageError("--num_shards must be >= 1")
    as_of = parse_as_of(common.as_of)
    try:
        config = load_config(common.config)
    except ConfigError as err:
        raise UsageError(f"--config: {err}")
    check_inputs(common.input_dir, config)
    try:
        fconfig = features.FeatureConfig(
            n_cutoffs=own.ranker_cutoffs, cutoff_step_days=own.ranker_cutoff_step_days,
            valid_cutoffs=own.ranker_valid_cutoffs, negative_ratio=own.ranker_negative_ratio,
            candidates_per_user=own.ranker_candidates,
            eval_user_share=own.ranker_eval_user_share)
        tconfig = ranker.TrainConfig(objective=own.ranker_objective,
                                     max_rounds=own.ranker_max_rounds,
                                     k=config.rules.recs_per_user)
    except ValueError as err:
        raise UsageError(str(err))
    now = pd.Timestamp.now(tz="UTC")
    run_id = run_id_of(common.run_id, now, JOB)
    staging = common.staging_dir or os.path.join(
        os.path.dirname(os.path.abspath(common.warehouse)), "staging", run_id)
    require_writable_dir("staging_dir", staging)
    require_writable_dir("ranker_model_dir", own.ranker_model_dir)
    cutoffs = tuple(features.cutoff_grid(as_of, fconfig))
    split = len(cutoffs) - fconfig.valid_cutoffs
    return TrainContext(run_id, as_of, staging, own.ranker_model_dir, config, fconfig, tconfig,
                        cutoffs, cutoffs[:split], cutoffs[split:])


def clear_staging(staging_dir: str) -> None:
    """Removes examples a previous run left in a reused ``--staging_dir``.

    Sink file names depend on the shard count, so stale part files would
    otherwise be read back as this run's examples.
    """
    pattern = FileSystems.join(staging_dir, "examples", "part*")
    stale = [m.path for m in FileSystems.match([pattern])[0].metadata_list]
    if stale:
        FileSystems.delete(stale)


def build(pipeline: beam.Pipeline, options: PipelineOptions, ctx: TrainContext) -> None:
    """The example-building graph: cleaned inputs → Parquet examples and a counters file.

    Clears stale examples in the staging directory first (at construction time).
    """
    common = options.view_as(CommonOptions)
    clear_staging(ctx.staging_dir)
    inputs = pipeline | "ReadCleanInputs" >> ReadCleanInputs(
        common.input_dir, ctx.config, sharding_of(options))
    examples = ({"users": inputs.users, "events": inputs.events, "fitment": inputs.fitment}
                | "BuildExamples" >> BuildExamples(
                    inputs.catalog, ctx.cutoffs, ctx.train_cutoffs, ctx.config, ctx.fconfig,
                    cache_tag=ctx.run_id, num_shards=sharding_of(options)))
    _ = examples.rows | "StageExamples" >> WriteFrames(
        FileSystems.join(ctx.staging_dir, "examples", "part"), examples_schema(ctx.config))
    _ = ((inputs.counts, examples.counts)
         | "FlattenCounters" >> beam.Flatten()
         | "SumCounters" >> SumCounts()
         | "CountersJson" >> beam.Map(json.dumps, sort_keys=True)
         | "WriteCounters" >> beam.io.WriteToText(
             FileSystems.join(ctx.staging_dir, "counters"), file_name_suffix=".json",
             num_shards=1, shard_name_template=""))


def read_examples(staging_dir: str) -> pd.DataFrame:
    """Every staged example file (local or object store) as one frame."""
    pattern = FileSystems.join(staging_dir, "examples", "part*.parquet")
    paths = sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)
    frames = []
    for path in paths:
        with FileSystems.open(path) as handle:
            frames.append(pq.read_table(io.BytesIO(handle.read())).to_pandas())
    if not frames:
        raise SystemExit(f"no examples were produced under {staging_dir!r}: is there history "
                         f"before the cutoffs?")
    return pd.concat(frames, ignore_index=True)


def read_counters(staging_dir: str) -> dict:
    path = FileSystems.join(staging_dir, "counters.json")
    if not FileSystems.exists(path):
        return {}
    with FileSystems.open(path) as handle:
        return json.loads(handle.read().decode() or "{}")


def train(examples: pd.DataFrame, ctx: TrainContext, counters: Optional[dict] = None,
          trained_at: Optional[pd.Timestamp] = None) -> ranker.RankerModel:
    """Time-based split, both learners, selection, metadata: the artifact's model."""
    names = features.feature_names(ctx.config)
    cutoff = pd.to_datetime(examples["cutoff"], utc=True)
    first_valid = min(ctx.valid_cutoffs)
    train_frame = examples.loc[cutoff < first_valid]
    valid_frame = examples.loc[cutoff >= first_valid]
    if not len(train_frame) or not int(train_frame["label"].sum()):
        raise SystemExit("no positive training examples: the history before the training "
                         "cutoffs has no purchases of candidate SKUs")
    if not int(valid_frame["label"].sum()):
        raise SystemExit("no positive validation examples: widen --ranker_valid_cutoffs")
    train_split = ranker.to_split(train_frame, names)
    valid_split = ranker.to_split(valid_frame, names)
    started = time.perf_counter()
    trained = ranker.train_and_select(train_split, valid_split, names, ctx.tconfig,
                                      ctx.config.scoring)
    seconds = time.perf_counter() - started
    # PSI baseline: the newest validation snapshot, closest to what scoring will see.
    newest = valid_frame.loc[pd.to_datetime(valid_frame["cutoff"], utc=True)
                             == max(ctx.valid_cutoffs)]
    trained_at = trained_at or pd.Timestamp.now(tz="UTC")
    model, challenger = trained.model, trained.challenger
    model.metadata.update({
        "job": JOB, "run_id": ctx.run_id, "trained_at": trained_at.isoformat(),
        "selected": trained.report["selected"], "challenger": trained.report["challenger"],
        "selection_metric": trained.report["selection_metric"],
        "beats_baseline": trained.report["beats_baseline"],
        "baseline": {"name": trained.report["baseline_name"], **trained.report["baseline"]},
        "features": list(names),
        "training_window": {
            "as_of": ctx.as_of.isoformat(),
            "train_cutoffs": [c.isoformat() for c in ctx.train_cutoffs],
            "valid_cutoffs": [c.isoformat() for c in ctx.valid_cutoffs],
            "feature_window_days": ctx.fconfig.window_days,
            "intent_window_days": ctx.config.scoring.intent_window_days,
            "label_days": ctx.fconfig.label_days,
            "labels_end": (max(ctx.cutoffs) + pd.Timedelta(
                days=ctx.fconfig.label_days)).isoformat()},
        "row_counts": {
            "train_rows": int(len(train_split)), "train_positives": int(train_split.y.sum()),
            "valid_rows": int(len(valid_split)), "valid_positives": int(valid_split.y.sum()),
            "train_groups": int(train_split.group.max() + 1),
            "valid_groups": int(valid_split.group.max() + 1),
            "negative_keep_rate": ranker.keep_rate_of(train_split),
            "pipeline_counters": {k: v for k, v in (counters or {}).items()
                                  if k.startswith("ranker.")}},
        "metrics": {**trained.report["candidates"], "train_and_select_seconds":
                    round(seconds, 3)},
        "library_versions": ranker.library_versions(),
        "feature_distributions": ranker.feature_distributions(
            newest[list(names)].to_numpy(float), names),
        "psi_threshold": ranker.DEFAULT_PSI_THRESHOLD,
        "feature_config": ctx.fconfig.to_dict(),
        "train_config": dataclasses.asdict(ctx.tconfig),
        "recs_config": {"segment_attributes": list(ctx.config.segment_attributes),
                        "fitment_attributes": list(ctx.config.fitment_attributes)},
        "challenger_artifact": challenger.to_bytes().decode("utf-8"),
    })
    model.metadata["version"] = ranker.model_version(model, trained_at)
    return model


def summarise(model: ranker.RankerModel, path: str) -> str:
    meta = model.metadata
    lines = [f"ranker {model.version} → {path}",
             f"selected {meta['selected']} by {meta['selection_metric']} on the validation "
             f"snapshots; challenger {meta['challenger']}"]
    counts = meta["row_counts"]
    lines.append(f"train rows {counts['train_rows']:,} ({counts['train_positives']:,} "
                 f"positive), validation rows {counts['valid_rows']:,} "
                 f"({counts['valid_positives']:,} positive); negative keep rate "
                 f"{counts['negative_keep_rate']:.4f}")
    baseline = meta.get("baseline", {})
    for name, figures in list(meta["metrics"].items()) + [
            (baseline.get("name", "baseline"), {k: v for k, v in baseline.items()
                                                if k != "name"})]:
        if isinstance(figures, dict):
            lines.append(f"  {name:22s} " + ", ".join(
                f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                for k, v in figures.items()))
    refused = ranker.refusal(model)
    if refused:
        lines.append(f"NOT SERVED: {refused} (artifact beats_baseline: false)")
    return "\n".join(lines)


def train_union(input_dir: str, ctx: TrainContext,
                trained_at: Optional[pd.Timestamp] = None) -> ranker.RankerModel:
    """The ranker over the union of the mix's sources (#14), trained in this process.

    Examples are the mix's own restricted candidates at each cutoff
    (:func:`models.union_ranker.examples_over`), labelled by the next
    ``label_days``; the older cutoffs train, the ``valid_cutoffs`` newest
    validate. The model is kept for serving only if its validation precision@k
    beats the blend's own lists on the same (cutoff, user) pairs.
    """
    from models import union_ranker
    from pipelines.tune import load_data
    data = load_data(input_dir, ctx.config, False)
    days = ctx.fconfig.label_days
    started = time.perf_counter()
    train_ex, _ = union_ranker.examples_over(data.users, data.events, data.catalog,
                                             data.fitment, ctx.train_cutoffs, days, ctx.config)
    valid_ex, valid_future = union_ranker.examples_over(
        data.users, data.events, data.catalog, data.fitment, ctx.valid_cutoffs, days,
        ctx.config)
    examples_seconds = time.perf_counter() - started
    if not int(train_ex.frame["y"].sum()):
        raise SystemExit("no positive training examples: no candidate of the mix was bought "
                         "after the training cutoffs")
    if not int(valid_ex.frame["y"].sum()):
        raise SystemExit("no positive validation examples: widen --ranker_valid_cutoffs")
    model, report = union_ranker.train_union(train_ex, valid_ex, valid_future, ctx.config,
                                             ctx.tconfig, ctx.tconfig.k)
    trained_at = trained_at or pd.Timestamp.now(tz="UTC")
    names = list(model.features)
    model.metadata.update({
        "job": JOB, "run_id": ctx.run_id, "trained_at": trained_at.isoformat(),
        "features": names,
        "training_window": {
            "as_of": ctx.as_of.isoformat(),
            "train_cutoffs": [c.isoformat() for c in ctx.train_cutoffs],
            "valid_cutoffs": [c.isoformat() for c in ctx.valid_cutoffs],
            "label_days": days},
        "row_counts": {
            "train_rows": int(len(train_ex.frame)),
            "train_positives": int(train_ex.frame["y"].sum()),
            "valid_rows": int(len(valid_ex.frame)),
            "valid_positives": int(valid_ex.frame["y"].sum())},
        "examples_seconds": round(examples_seconds, 3),
        "library_versions": ranker.library_versions(),
        "feature_distributions": ranker.feature_distributions(
            valid_ex.frame[names].to_numpy(float), names),
        "psi_threshold": ranker.DEFAULT_PSI_THRESHOLD,
        "train_config": dataclasses.asdict(ctx.tconfig),
        "feature_config": ctx.fconfig.to_dict(),
    })
    model.metadata["version"] = ranker.model_version(model, trained_at)
    return model


def summarise_union(model: ranker.RankerModel, path: str) -> str:
    """The union ranker's selection in a few lines (the blend is its baseline)."""
    meta = model.metadata
    key = meta["selection_metric"]
    counts = meta["row_counts"]
    interval = meta.get("paired_interval") or {}
    lines = [f"union ranker {model.version} → {path}",
             f"sources {', '.join(meta['union_sources'])}; selected {meta['selected']} by "
             f"{key} on {meta['validation_users']} validation (cutoff, user) pairs",
             f"train rows {counts['train_rows']:,} ({counts['train_positives']:,} positive), "
             f"validation rows {counts['valid_rows']:,} ({counts['valid_positives']:,} "
             f"positive)"]
    for name, figures in meta["candidates"].items():
        lines.append(f"  {name:22s} {key} {figures[key]:.4f}")
    lines.append(f"  {'blended mix order':22s} {key} {meta['baseline'][key]:.4f}")
    if interval:
        lines.append(f"  ranker − blend {interval['mean']:+.4f} "
                     f"(95% paired interval {interval['low']:+.4f} … {interval['high']:+.4f})")
    refused = ranker.refusal(model)
    if refused:
        lines.append(f"NOT SERVED: {refused} (artifact beats_baseline: false)")
    return "\n".join(lines)


def run(argv: Optional[List[str]] = None, test_pipeline: Optional[beam.Pipeline] = None) -> str:
    """Build examples, train, save; returns the artifact path.

    With a ``candidates.mix`` of other sources than segment popularity the ranker
    is the union ranker (:func:`train_union`), trained without the Beam stage.
    """
    options = job_options(argv, __name__)
    ctx = context_from(options)
    if not ctx.config.candidates.popularity_only:
        model = train_union(options.view_as(CommonOptions).input_dir, ctx)
        path = save_model(model, ctx.model_dir)
        print(summarise_union(model, path))
        return path
    pipeline = test_pipeline or beam.Pipeline(options=options)
    build(pipeline, options, ctx)
    pipeline.run().wait_until_finish()
    model = train(read_examples(ctx.staging_dir), ctx, read_counters(ctx.staging_dir))
    path = save_model(model, ctx.model_dir)
    print(summarise(model, path))
    return path


def main() -> None:
    entry_point(run, returns_status=False)   # a finished run prints its summary


if __name__ == "__main__":
    main()
