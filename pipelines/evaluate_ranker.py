"""Evaluate the ranker on the held-out future period: one table, AUCs, explanations, drift.

    python -m pipelines.evaluate_ranker --input_dir out/demo_world \\
        --as_of 2026-02-28T23:59:12Z --ranker_artifact out/models/ranker

One Beam graph over the batch job's cleaned inputs (history up to ``--as_of``)
builds four sets of recommendations the way the batch job would serve them,
SPEC §3 rules and QA checks included: global popularity, segment popularity,
the ranker (the artifact's selected model re-ranking segment-popularity
candidates) and its challenger (the best model of the other family, carried in
the artifact). The same graph builds the test exposures at ``--as_of`` (every
user's candidate pool, labelled with purchases in the 7 days after it, from
``holdout_events``) for ROC AUC, and the PSI of the scored features.

Then, in this process, each strategy is scored against the purchases of the
whole held-out period with ``models.metrics.evaluate`` (precision, recall and
NDCG at k, the config's ``recs_per_user``; match rate, coverage, diversity,
average price), and LightGBM
``pred_contrib`` explains the recommendations of a sample of users. Results go
to ``--ranker_eval_dir`` (JSON and CSV) and the warehouse table ``ranker_backtest``.
Nothing the models saw comes from after ``--as_of``: the holdout only labels.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
from typing import Dict, List, NamedTuple, Optional

import apache_beam as beam
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from models import features, metrics, ranker, union_ranker
from models.config import RecsConfig
from models.config_file import ConfigError, load_config
from models.popularity import order_lines
from models.recommend_handler import PopularityHandler, handler_for
from pipelines.jobs import UsageError, entry_point, holder, job_options, locked_warehouse
from pipelines.options import CommonOptions, check_run_id, require_input_dir, run_id_of
from pipelines.train_ranker import check_inputs, parse_as_of
from transforms import schemas
from transforms.features import BuildExamples, ReadCleanInputs, examples_schema
from transforms.io import WriteFrames, read_frame
from transforms.ranker import (FeatureDrift, load_model, mkdirs, resolve_model_path,
                               save_model)
from transforms.recommend import (AddRunMetadata, CheckOneRowPerEmail, JoinUsersWithEvents,
                                  sum_violations)
from transforms.recommend_composite import RankerSpec, Recommend, RecommendOut
from transforms.warehouse import LocalWarehouse

JOB = "evaluate_ranker"
SEGMENT_MODEL_VERSION = PopularityHandler.model_version
def table_columns(k: int) -> tuple:
    """Columns of the comparison table at list length k (every metric column, at any k)."""
    return ("strategy", "model_version", "users", "buyers_in_holdout", f"precision@{k}",
            f"recall@{k}", f"ndcg@{k}", "match_rate", "coverage", "diversity", "avg_price",
            "roc_auc", f"pool_ndcg@{k}", "qa_violations")


class EvaluateRankerOptions(PipelineOptions):
    """Flags of the evaluation job (the shared ones are in CommonOptions; names are unique)."""

    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--ranker_artifact", default="out/models/ranker",
                            help="Ranker artifact (.json) or model directory with LATEST.")
        parser.add_argument("--ranker_eval_dir", default=None,
                            help="Where the evaluation JSON/CSV go (default: beside the "
                                 "warehouse, under ranker_eval/).")
        parser.add_argument("--ranker_explain_users", type=int, default=20,
                            help="Users whose recommendations are explained (pred_contrib).")
        parser.add_argument("--ranker_eval_psi_threshold", type=float, default=None,
                            help="PSI above which a feature flags retraining (default: the "
                                 "threshold stored with the model).")


class EvalContext(NamedTuple):
    run_id: str
    as_of: pd.Timestamp
    staging_dir: str
    eval_dir: str
    config: RecsConfig
    fconfig: features.FeatureConfig
    model_path: str
    challenger_path: str
    model: ranker.RankerModel
    challenger: ranker.RankerModel


def context_from(options: PipelineOptions) -> EvalContext:
    """Resolve defaults and fail fast (bad artifact, missing inputs) before reading data."""
    own = options.view_as(EvaluateRankerOptions)
    common = options.view_as(CommonOptions)
    require_input_dir(common.input_dir)
    as_of = parse_as_of(common.as_of)
    try:
        config = load_config(common.config)
    except ConfigError as err:
        raise UsageError(f"--config: {err}")
    check_inputs(common.input_dir, config, holdout=True)
    try:
        model_path = resolve_model_path(own.ranker_artifact)
        model = load_model(model_path)
        model.check_features(config)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(f"--ranker_artifact: {err}")
    if union_ranker.is_union(model):  # evaluated in process (evaluate_union), no Beam graph
        now = pd.Timestamp.now(tz="UTC")
        run_id = run_id_of(common.run_id, now, JOB)
        base = os.path.dirname(os.path.abspath(common.warehouse))
        eval_dir = own.ranker_eval_dir or os.path.join(base, "ranker_eval")
        return EvalContext(run_id, as_of, "", eval_dir, config, features.FeatureConfig(),
                           model_path, "", model, None)
    if "challenger_artifact" not in model.metadata:
        raise UsageError("--ranker_artifact has no challenger model; retrain it with "
                         "pipelines.train_ranker")
    challenger = ranker.RankerModel.from_bytes(
        model.metadata["challenger_artifact"].encode("utf-8"))
    # Scoring needs the PSI baseline; the challenger shares the selected model's.
    challenger.metadata.update({
        "version": f"{model.version}.challenger",
        "feature_distributions": model.metadata.get("feature_distributions", {})})
    fconfig = features.FeatureConfig.from_dict(model.metadata.get("feature_config", {}))
    now = pd.Timestamp.now(tz="UTC")
    run_id = run_id_of(common.run_id, now, JOB)
    base = os.path.dirname(os.path.abspath(common.warehouse))
    staging = common.staging_dir or os.path.join(base, "staging", run_id)
    eval_dir = own.ranker_eval_dir or os.path.join(base, "ranker_eval")
    challenger_path = save_model(challenger, FileSystems.join(staging, "challenger"))
    return EvalContext(run_id, as_of, staging, eval_dir, config, fconfig, model_path,
                       challenger_path, model, challenger)


def _recs_schema(config: RecsConfig) -> pa.Schema:
    return schemas.recommendations(config.rules.recs_per_user)


def _stage(pcoll, name: str, ctx: EvalContext, schema: pa.Schema):
    return pcoll | f"Stage{name}" >> WriteFrames(
        FileSystems.join(ctx.staging_dir, name.lower(), "part"), schema)


def build(pipeline: beam.Pipeline, options: PipelineOptions, ctx: EvalContext) -> None:
    """Four recommendation strategies, test exposures, QA sums and drift → staged files."""
    common = options.view_as(CommonOptions)
    own = options.view_as(EvaluateRankerOptions)
    config, n = ctx.config, common.num_shards
    global_config = config.replace(segment_attributes=())
    inputs = pipeline | "ReadCleanInputs" >> ReadCleanInputs(
        common.input_dir, config, n, holdout=True)
    profiles, lines, _ = ({"users": inputs.users, "events": inputs.events}
                          | "JoinUsersWithEvents" >> JoinUsersWithEvents(ctx.as_of, config, n))

    def recommend(label: str, strategy_config: RecsConfig, name: str,
                  spec: Optional[RankerSpec] = None) -> RecommendOut:
        return ({"users": profiles, "lines": lines, "fitment": inputs.fitment,
                 "events": inputs.events}
                | f"Recommend{label}" >> Recommend(inputs.catalog, ctx.as_of, strategy_config,
                                                   f"{ctx.run_id}:{name}", n, spec))

    outputs = {
        "global": (recommend("Global", global_config, "global"), "global-popularity"),
        # segment popularity, or the configured slot mix when there is one
        "segment": (recommend("Segment", config, "segment"),
                    handler_for(config).model_version),
    }
    drift_tables = []
    for name, path, model in (("ranker", ctx.model_path, ctx.model),
                              ("challenger", ctx.challenger_path, ctx.challenger)):
        label = name.capitalize()
        recs = recommend(label, config, name, RankerSpec(path, ctx.fconfig))
        outputs[name] = (recs, model.version)
        drift = recs.drift | f"Drift{label}" >> FeatureDrift(path, own.ranker_eval_psi_threshold)
        drift_tables.append(drift.table | f"Name{label}Drift" >> beam.Map(
            lambda t, s: t.assign(strategy=s), name))

    qa_parts = []
    for name, (recs, version) in outputs.items():
        label = name.capitalize()
        stamped = recs.rows | f"Stamp{label}" >> beam.ParDo(
            AddRunMetadata(pd.Timestamp.now(tz="UTC"), ctx.run_id, version))
        _stage(stamped, f"Recs{label}", ctx, _recs_schema(config))
        qa_parts.append(
            (recs.qa, stamped | f"OneRowPerEmail{label}" >> CheckOneRowPerEmail(n))
            | f"FlattenQA{label}" >> beam.Flatten()
            | f"SumViolations{label}" >> beam.CombineGlobally(sum_violations)
            | f"Name{label}QA" >> beam.Map(lambda v, s: {"strategy": s, **{
                str(k): int(c) for k, c in v.items()}}, name))
    _ = (qa_parts
         | "FlattenQA" >> beam.Flatten()
         | "QaJson" >> beam.Map(json.dumps)
         | "WriteQA" >> beam.io.WriteToText(FileSystems.join(ctx.staging_dir, "qa"),
                                            file_name_suffix=".jsonl", num_shards=1,
                                            shard_name_template=""))
    _ = (drift_tables
         | "FlattenDrift" >> beam.Flatten()
         | "DriftJson" >> beam.Map(lambda t: t.to_json(orient="records"))
         | "WriteDrift" >> beam.io.WriteToText(FileSystems.join(ctx.staging_dir, "drift"),
                                               file_name_suffix=".jsonl", num_shards=1,
                                               shard_name_template=""))

    future_events = ((inputs.events, inputs.holdout) | "HistoryAndHoldout" >> beam.Flatten())
    test = ({"users": inputs.users, "events": future_events, "fitment": inputs.fitment}
            | "TestExposures" >> BuildExamples(inputs.catalog, [ctx.as_of], [], config,
                                               ctx.fconfig, f"{ctx.run_id}:test", n))
    _stage(test.rows, "Test", ctx, examples_schema(config))


# ----------------------------------------------------------------------------- in process

def _read_parquet(directory: str) -> pd.DataFrame:
    pattern = FileSystems.join(directory, "part*.parquet")
    frames = []
    for meta in FileSystems.match([pattern])[0].metadata_list:
        with FileSystems.open(meta.path) as handle:
            frames.append(pq.read_table(io.BytesIO(handle.read())).to_pandas())
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _read_jsonl(path: str) -> List:
    if not FileSystems.exists(path):
        return []
    with FileSystems.open(path) as handle:
        return [json.loads(line) for line in handle.read().decode().splitlines() if line]


def holdout_purchases(input_dir: str) -> Dict[str, frozenset]:
    """Each user's distinct SKUs ordered in the held-out period (as ``pipelines.backtest``)."""
    events, _ = read_frame(input_dir, "holdout_events")
    return order_lines(events).groupby("user_id")["sku"].agg(frozenset).to_dict()


def exposure_scores(test: pd.DataFrame, ctx: EvalContext) -> Dict[str, np.ndarray]:
    """Score of every test exposure under each strategy's own ranking function."""
    names = list(features.feature_names(ctx.config))
    x = test[names].to_numpy(np.float32)
    return {"global": test["i_global_pop"].to_numpy(float),
            "segment": ranker.popularity_order(test[names].to_numpy(float), names,
                                               ctx.config.scoring),
            "ranker": ctx.model.predict(x), "challenger": ctx.challenger.predict(x)}


def explain_sample(recs: pd.DataFrame, test: pd.DataFrame, model: ranker.RankerModel,
                   users: int, seed: int = 7) -> dict:
    """Top feature contributions behind the ranker's recommendations for sampled users.

    The feature rows come from the test exposures (built by the training code
    path at ``as_of``); their model score is compared with the score the batch
    path wrote, which checks that scoring and training compute the same features.
    """
    n = len([c for c in recs.columns if c.startswith("rec_part_")])
    long = pd.concat([pd.DataFrame({"user_id": recs["user_id"], "rank": i,
                                    "sku": recs[f"rec_part_{i}"],
                                    "served_score": recs[f"rec{i}_score"]})
                      for i in range(1, n + 1)], ignore_index=True)
    joined = long.merge(test, on=["user_id", "sku"], how="inner")
    if not len(joined):
        return {"users": [], "rows_matched": 0}
    x = joined[list(model.features)].to_numpy(np.float32)
    rescored = model.predict(x)
    parity = float(np.max(np.abs(rescored - joined["served_score"].to_numpy(float))))
    rng = np.random.default_rng(seed)
    # Prefer users with some history, whose explanations say more than "popular here".
    active = joined.loc[joined["p_views_sku"].to_numpy() > 0, "user_id"].unique()
    pool = active if len(active) >= users else joined["user_id"].unique()
    chosen = set(rng.choice(pool, min(users, len(pool)), replace=False))
    picked = joined.loc[joined["user_id"].isin(chosen)].sort_values(
        ["user_id", "rank"]).reset_index(drop=True)
    reasons = ranker.explain(model, picked[list(model.features)].to_numpy(np.float32), top=3)
    out = []
    for user, rows in picked.groupby("user_id", sort=True).indices.items():
        out.append({"user_id": user, "recommendations": [
            {"rank": int(picked.at[i, "rank"]), "sku": picked.at[i, "sku"],
             "score": float(picked.at[i, "served_score"]),
             "top_contributions": [{"feature": f, "contribution": round(c, 4)}
                                   for f, c in reasons[i]]}
            for i in rows]})
    return {"rows_matched": int(len(joined)), "rows_recommended": int(len(long)),
            "max_abs_score_difference_batch_vs_training_path": parity, "users": out}


def evaluate(ctx: EvalContext, input_dir: str, explain_users: int) -> dict:
    """The comparison table and everything around it, from the staged files."""
    future = holdout_purchases(input_dir)
    catalogue_size = read_frame(input_dir, "catalog")[0]["sku"].nunique()
    k = ctx.config.rules.recs_per_user
    test = _read_parquet(FileSystems.join(ctx.staging_dir, "test"))
    scores = exposure_scores(test, ctx) if len(test) else {}
    group = (test["user_id"].astype(str) + "|" + test["cutoff"].astype(str)).to_numpy() \
        if len(test) else np.array([])
    qa = {row["strategy"]: row for row in _read_jsonl(
        FileSystems.join(ctx.staging_dir, "qa.jsonl"))}
    rows, recs_by = [], {}
    for name in ("global", "segment", "ranker", "challenger"):
        recs = _read_parquet(FileSystems.join(ctx.staging_dir, f"recs{name}"))
        recs_by[name] = recs
        figures = metrics.evaluate(recs, future, k, catalogue_size)
        figures.pop("fallback_shares")
        label = test["label"].to_numpy() if len(test) else np.array([])
        rows.append({
            "strategy": name if name not in ("ranker", "challenger") else
            f"{name}:{(ctx.model if name == 'ranker' else ctx.challenger).kind}",
            "model_version": recs["model_version"].iloc[0] if len(recs) else None,
            **figures,
            "roc_auc": ranker.roc_auc(label, scores[name]) if len(test) else float("nan"),
            f"pool_ndcg@{k}": ranker.pool_ndcg(group, label, scores[name], k)
            if len(test) else float("nan"),
            "qa_violations": int(sum(v for key, v in qa.get(name, {}).items()
                                     if key != "strategy")),
        })
    missing = [c for c in table_columns(k) if c not in pd.DataFrame(rows).columns]
    if missing:  # a metric silently missing is how k != 4 lost its columns (#14)
        raise ValueError(f"evaluation table lacks {', '.join(missing)}")
    table = pd.DataFrame(rows)[list(table_columns(k))]
    drift = pd.DataFrame([r for records in _read_jsonl(FileSystems.join(
        ctx.staging_dir, "drift.jsonl")) for r in records])
    ranker_drift = drift.loc[drift["strategy"] == "ranker"] if len(drift) else drift
    return {
        "as_of": ctx.as_of.isoformat(), "model": ctx.model.version,
        "k": k,
        "selected": ctx.model.metadata.get("selected"),
        "beats_baseline": ctx.model.metadata.get("beats_baseline"),
        "challenger": ctx.model.metadata.get("challenger"),
        "table": table.to_dict(orient="records"),
        "test_exposures": {"rows": int(len(test)),
                           "positives": int(test["label"].sum()) if len(test) else 0,
                           "label": f"purchase within {ctx.fconfig.label_days} days after "
                                    f"as_of (holdout_events)"},
        "validation_metrics": ctx.model.metadata.get("metrics", {}),
        "drift": {"threshold": float(ranker_drift["threshold"].iloc[0])
                  if len(ranker_drift) else None,
                  "retrain_recommended": bool(ranker_drift["flagged"].any())
                  if len(ranker_drift) else False,
                  "psi": ranker_drift[["feature", "psi", "flagged"]].to_dict(orient="records")
                  if len(ranker_drift) else []},
        "explanations": explain_sample(recs_by["ranker"], test, ctx.model, explain_users)
        if len(test) and len(recs_by["ranker"]) else {},
    }


def format_table(result: dict) -> str:
    table = pd.DataFrame(result["table"]).set_index("strategy").drop(columns="model_version")
    return table.T.to_string(float_format=lambda v: f"{v:.4f}")


def write_outputs(result: dict, ctx: EvalContext, warehouse: Optional[str]) -> str:
    mkdirs(ctx.eval_dir)
    path = FileSystems.join(ctx.eval_dir, "ranker_evaluation.json")
    with FileSystems.create(path) as handle:
        handle.write(json.dumps(result, indent=2, default=str).encode())
    table = pd.DataFrame(result["table"])
    with FileSystems.create(FileSystems.join(ctx.eval_dir, "ranker_evaluation.csv")) as handle:
        handle.write(table.to_csv(index=False).encode())
    if warehouse:
        # One table for every k: `precision@10` is no column name, `precision_at_k` + `k` is.
        k = result["k"]
        published = table.rename(columns=lambda c: c.replace(f"@{k}", "_at_k")).assign(
            k=k, as_of=ctx.as_of, run_id=ctx.run_id, model=ctx.model.version)
        name = ("union_ranker_backtest" if union_ranker.is_union(ctx.model)
                else "ranker_backtest")
        LocalWarehouse(warehouse).publish(
            ctx.run_id, {}, {name: pa.Table.from_pandas(
                published, preserve_index=False)}, swap=False)
    return path


def run(argv: Optional[List[str]] = None, test_pipeline: Optional[beam.Pipeline] = None,
        publish: bool = True) -> dict:
    """Build and run the graph, evaluate, write; returns the result document.

    With ``publish`` the warehouse (which receives ``ranker_backtest``) is
    locked for the whole run.
    """
    options = job_options(argv, __name__)
    common = options.view_as(CommonOptions)
    check_run_id(options)
    with (locked_warehouse(common.warehouse, JOB) if publish
          else contextlib.nullcontext()) as lock:
        ctx = context_from(options)
        if lock is not None:
            lock.note(holder(JOB, ctx.run_id))
        return _run(options, ctx, test_pipeline, publish)


UNION_STRATEGIES = ("union_ranker", "blend")


def evaluate_union(ctx: EvalContext, input_dir: str) -> dict:
    """The union ranker against the blend it re-ranks and the SQL baselines, at k.

    In this process, as ``pipelines.tune`` scores a variant: the history up to
    ``--as_of``, each strategy's lists through the same handler the batch job
    applies (the blend: ``MixHandler``; the ranker: ``UnionRerankHandler``), the
    two SQL baselines of :mod:`models.baselines` on the same files, every list
    scored against the held-out period's buyers (the same people for every
    strategy), and the ranker's paired 95% interval against each of the others.
    """
    from models.catalog import CatalogArrays
    from models.mix import paired_interval
    from models.recommend_handler import (UnionRerankHandler, prepare_history,
                                          recommend_history)
    from models.tuning import long_lists, periods_of
    from pipelines.tune import load_data
    config, k, model = ctx.config, ctx.config.rules.recs_per_user, ctx.model
    data = load_data(input_dir, config, True)
    period = periods_of(data, input_dir, ctx.as_of, 1, 0.0, k, config, holdout=True)[0]
    times = pd.to_datetime(data.events["event_time"], utc=True)
    history = prepare_history(data.users, data.events.loc[(times <= ctx.as_of).to_numpy(bool)],
                              ctx.as_of, config)
    arrays = CatalogArrays.build(data.catalog, config.rules)
    price_of = dict(zip(arrays.sku, arrays.price))
    cache: dict = {}
    scored = {
        "blend": recommend_history(history, data.catalog, data.fitment, ctx.as_of, config,
                                   cache),
        "union_ranker": recommend_history(history, data.catalog, data.fitment, ctx.as_of,
                                          config, cache,
                                          handler=UnionRerankHandler(config, lambda: model)),
    }
    lists = {name: long_lists(s.rows.assign(user_id=s.rows["user_id"].astype(str)), k)
             for name, s in scored.items()}
    lists.update(period.baselines)
    rows, per_user = [], {}
    for name, frame in lists.items():
        got = metrics.evaluate_lists(frame, period.future, k, len(arrays.sku), price_of,
                                     period.users)
        per_user[name] = got.pop("per_user_precision")
        got = {key.replace("_at_k", f"@{k}"): v for key, v in got.items()}
        qa = int(sum(scored[name].violations.values())) if name in scored else None
        rows.append({"strategy": name, "model_version": model.version
                     if name == "union_ranker" else None, **got, "qa_violations": qa})
    for row in rows:
        if row["strategy"] != "union_ranker":
            interval = paired_interval(per_user["union_ranker"], per_user[row["strategy"]])
            row[f"ranker_minus_this_precision@{k}"] = interval["mean"]
            row["interval_low"], row["interval_high"] = interval["low"], interval["high"]
    return {"as_of": ctx.as_of.isoformat(), "model": model.version, "k": k,
            "sources": model.metadata.get(union_ranker.SOURCES_KEY),
            "selected": model.metadata.get("selected"),
            "beats_baseline": model.metadata.get("beats_baseline"),
            "validation": {"ranker": model.metadata.get("metrics"),
                           "blend": model.metadata.get("baseline")},
            "table": rows}


def _summarise(result: dict, ctx: EvalContext, warehouse: Optional[str], title: str) -> str:
    """Writes the evaluation, prints its table and whether the batch job would refuse the
    artifact; returns where it was written."""
    path = write_outputs(result, ctx, warehouse)
    print(f"\n{title}:")
    print(format_table(result))
    refused = ranker.refusal(ctx.model)
    if refused:
        print(f"note: {refused} (the batch job refuses this artifact)")
    return path


def _run(options: PipelineOptions, ctx: EvalContext, test_pipeline: Optional[beam.Pipeline],
         publish: bool) -> dict:
    common = options.view_as(CommonOptions)
    if union_ranker.is_union(ctx.model):
        result = evaluate_union(ctx, common.input_dir)
        path = _summarise(result, ctx, common.warehouse if publish else None,
                          f"Union ranker evaluation on the held-out period at k={result['k']} "
                          f"({ctx.model.version}; sources {', '.join(result['sources'])})")
        print(f"written: {path}")
        return result
    pipeline = test_pipeline or beam.Pipeline(options=options)
    build(pipeline, options, ctx)
    pipeline.run().wait_until_finish()
    result = evaluate(ctx, common.input_dir,
                      options.view_as(EvaluateRankerOptions).ranker_explain_users)
    path = _summarise(result, ctx, common.warehouse if publish else None,
                      f"Ranker evaluation on the held-out period at k={result['k']} "
                      f"({ctx.model.version})")
    drift = result["drift"]
    print(f"feature drift (PSI vs training, threshold {drift['threshold']}): "
          f"{'RETRAIN RECOMMENDED' if drift['retrain_recommended'] else 'stable'}; "
          f"largest {max((r['psi'] for r in drift['psi']), default=float('nan')):.3f}")
    parity = result.get("explanations", {}).get(
        "max_abs_score_difference_batch_vs_training_path")
    if parity is not None:
        print(f"train/serve parity: max |score difference| {parity:.2e}")
    print(f"written: {path}")
    return result


def main() -> None:
    entry_point(run, returns_status=False)   # a finished run prints its summary


if __name__ == "__main__":
    main()
