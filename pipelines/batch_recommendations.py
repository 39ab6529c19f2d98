"""Batch recommendations: history in, one checked row per e-mail out (SPEC §3).

    python -m pipelines.batch_recommendations --input_dir out/demo_world \\
        --warehouse out/warehouse.duckdb --as_of 2026-06-30T00:00:00Z
    python -m pipelines.batch_recommendations --source bigquery --sink bigquery \\
        --bigquery_project my-project --bigquery_dataset recs --as_of 2026-06-30T00:00:00Z

Reads the SPEC §2 inputs from local files or BigQuery tables, computes
time-decayed segment popularity with fallback levels, applies intent and every
business rule, runs the QA checks on the output, and publishes to the warehouse
(DuckDB or BigQuery) only when the run is clean, keeping the previous output as
a backup. Exit status 0 means published; 1 means the run was gated.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import List, NamedTuple, Optional, Tuple, Union

import apache_beam as beam
import pandas as pd
from apache_beam.options.pipeline_options import PipelineOptions

from models import health, sanity
from models.stability import format_changes, format_report
from models.config import RecsConfig
from models.config_file import ConfigError, load_config
from pipelines.jobs import (UsageError, entry_point, finish_run, holder, job_options,
                           locked_warehouse)
from pipelines.options import (FITMENT_HINT, CommonOptions, RankerOptions, as_of_of,
                               check_attributes, sharding_of,
                               check_run_id, require_columns, require_input_dir,
                               require_tables, require_writable_dir, run_id_of, true_or_false)
from transforms import schemas
from models.features import FeatureConfig
from models.ranker import RankerModel, refusal
from models.recommend_handler import MixHandler, PopularityHandler
from models.serving import ServingStore
from transforms.ranker import FeatureDrift, check_model, resolve_model_path
from transforms.bigquery import (BigQueryOptions, apply_options,  # noqa: F401 (its flags)
                                 unreachable)
from transforms.bigquery_io import (BigQuerySettings, ReadBigQueryTable, SourceSinkOptions,
                                    WINDOWED_TABLE, settings_from)
from transforms.health import CountRows, DeadLetterCounts, SumCounts
from transforms.io import ReadTable, find_table
from transforms.publish import CountEventNames, GatherGateSignals, PublishRunFn, StageOutput
from transforms.serving import (ServingOptions,  # noqa: F401 (its flags are this job's)
                                SwitchServingFn, WriteServingVersion, store_from)
from transforms.recommend import (AddRunMetadata, CheckOneRowPerEmail, CleanCatalog,
                                  DedupeEvents, DropUnknownSkus, JoinUsersWithEvents,
                                  MarkDuplicateEmails, sum_violations)
from transforms.recommend_composite import RankerSpec, Recommend
from transforms.warehouse import (PUBLISHED_TABLES, BigQueryWarehouse, LocalWarehouse,
                                  backup_id, backup_table)

JOB = "batch_recommendations"
MODEL_VERSION = PopularityHandler.model_version
MIX_MODEL_VERSION = MixHandler.model_version
STRATEGIES = ("segment", "global")


class BatchOptions(PipelineOptions):
    """Options of the batch recommendations job (shared ones are in CommonOptions)."""

    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--strategy", default="segment", choices=STRATEGIES,
                            help="segment: segment popularity with fallbacks; global: "
                                 "global popularity only (the baseline).")
        parser.add_argument("--min_ratio_vs_last_run", type=float, default=0.5,
                            help="Gate the run when it writes fewer than this share of "
                                 "the last published run's rows.")
        parser.add_argument("--accept_changes", type=true_or_false, nargs="?", const=True,
                            default=False,
                            help="true (or the bare flag): publish even when more users' "
                                 "lists changed against the last published output than "
                                 "gates.max_changed_user_share allows (read the stability "
                                 "figures of the gated run first).")
        parser.add_argument("--keep_backups", type=int, default=7,
                            help="Backups of earlier outputs kept after a publish (at least "
                                 "1); older ones are dropped.")


Warehouse = Union[LocalWarehouse, BigQueryWarehouse]


class RunContext(NamedTuple):
    """What identifies one run: fixed before the graph is built."""

    run_id: str
    as_of: pd.Timestamp
    started_at: pd.Timestamp
    staging_dir: str
    config: RecsConfig
    warehouse: Warehouse
    bigquery: Optional[BigQuerySettings] = None
    ranker_path: Optional[str] = None
    ranker: Optional[RankerModel] = None
    serving: Optional[ServingStore] = None


def context_from(options: PipelineOptions) -> RunContext:
    """Resolve defaults and fail fast on bad options (before any data is read)."""
    batch = options.view_as(BatchOptions)
    options = options.view_as(CommonOptions)
    now = pd.Timestamp.now(tz="UTC")
    as_of = as_of_of(options.as_of, now)
    sharding_of(options)
    if batch.keep_backups < 1:
        raise UsageError("--keep_backups must be >= 1: the previous output is kept as a backup")
    io_options = options.view_as(SourceSinkOptions)
    bigquery = None
    if "bigquery" in (io_options.source, io_options.sink) or io_options.events_since or (
            io_options.events_until):
        try:
            bigquery = settings_from(options)
        except ValueError as err:
            raise UsageError(str(err))
        if bigquery.endpoint:  # fail in seconds, not after ten minutes of client retries
            why = unreachable(bigquery.endpoint)
            if why:
                raise UsageError(f"--bigquery_endpoint {bigquery.endpoint} is unreachable "
                                 f"({why}); start the emulator or fix the address")
        apply_options(options)  # --bigquery_endpoint: every BigQuery client of this process
    run_id = run_id_of(options.run_id, now)
    staging = options.staging_dir or os.path.join(
        os.path.dirname(os.path.abspath(options.warehouse)), "staging", run_id)
    require_writable_dir("staging_dir", staging)
    try:
        config = load_config(options.config)
    except ConfigError as err:
        raise UsageError(f"--config: {err}")
    if batch.strategy == "global":
        config = config.replace(segment_attributes=())
    if io_options.source == "local":
        require_input_dir(options.input_dir)
        check_attributes(require_tables(options.input_dir, input_tables(config)),
                         config.segment_attributes, config.fitment_attributes)
    ranker_path = ranker = None
    ranker_model = options.view_as(RankerOptions).ranker_model
    if ranker_model:
        if batch.strategy == "global":
            raise UsageError("--ranker_model re-ranks segment candidates; not with "
                             "--strategy global")
        try:
            ranker_path = resolve_model_path(ranker_model)
            ranker = check_model(ranker_path, config)  # loads it and checks its features
        except (FileNotFoundError, ValueError) as err:
            raise UsageError(f"--ranker_model: {err}")
        refused = refusal(ranker)  # #14: a model that lost to the plain order is not served
        if refused:
            print(f"--ranker_model: {refused}", file=sys.stderr)
            ranker_path = ranker = None
    warehouse = (BigQueryWarehouse(bigquery.project, bigquery.dataset, bigquery.endpoint)
                 if io_options.sink == "bigquery" else LocalWarehouse(options.warehouse))
    _check_connections(warehouse, bigquery, run_id, config)
    try:
        serving = store_from(options)
    except ValueError as err:
        raise UsageError(str(err))
    return RunContext(run_id, as_of, now, staging, config, warehouse, bigquery, ranker_path,
                      ranker, serving)


def input_tables(config: RecsConfig) -> Tuple[str, ...]:
    """The SPEC §2 inputs this job reads: fitment only when the config names fitment attributes
    (a retailer without fitment data configures none)."""
    return ("catalog", "users", "events") + (("fitment",) if config.fitment_attributes else ())


def _check_connections(warehouse: Warehouse, bigquery: Optional[BigQuerySettings],
                       run_id: str, config: RecsConfig) -> None:
    """Fail at start-up, not after the run: a missing dataset or input, a reused run id."""
    try:  # the run's backups are named after it
        for name in PUBLISHED_TABLES:
            backup_table(name, backup_id(run_id))
    except ValueError as err:
        raise UsageError(f"--run_id {run_id!r} is too long for its backup names: {err}")
    if warehouse.run_exists(run_id):
        raise UsageError(f"run id {run_id!r} is already recorded in pipeline_runs; give each "
                         f"run its own --run_id (its backups are named after it)")
    if isinstance(warehouse, BigQueryWarehouse):
        if not warehouse.dataset_exists():
            raise UsageError(f"BigQuery dataset {warehouse.project}.{warehouse.dataset} does "
                             f"not exist; create it first (bq mk --dataset ...)")
        try:
            leftovers = [t for t in warehouse.run_tables(run_id) if warehouse.exists(t)]
        except ValueError as err:
            raise UsageError(f"--run_id {run_id!r}: {err}")
        if leftovers:  # an earlier attempt of this run id crashed: never append to its rows
            raise UsageError(f"tables of an earlier attempt of run {run_id!r} exist "
                             f"({', '.join(leftovers)}); drop them or use a new --run_id")
    if bigquery is not None and bigquery.inputs:
        from google.api_core.exceptions import NotFound
        from transforms.bigquery import client
        bq = client(bigquery.project, bigquery.endpoint)
        columns = {}
        for table in input_tables(config):
            try:
                found = bq.get_table(bigquery.inputs[table].id)
            except NotFound:
                hint = f"; {FITMENT_HINT}" if table == "fitment" else ""
                raise UsageError(f"BigQuery input {bigquery.inputs[table].id} ({table}) "
                                 f"does not exist{hint}") from None
            columns[table] = {field.name for field in found.schema or ()} or None
        for table, wanted, setting in (
                ("users", config.segment_attributes, "segment attribute"),
                ("users", config.fitment_attributes, "fitment attribute"),
                ("fitment", config.fitment_attributes, "fitment attribute")):
            if table in columns:
                require_columns(table, bigquery.inputs[table].id, columns[table], wanted,
                                setting)


def build(pipeline: beam.Pipeline, options: PipelineOptions, ctx: RunContext
          ) -> beam.PCollection:
    """The batch graph; returns the singleton run-summary row."""
    batch = options.view_as(BatchOptions)
    options = options.view_as(CommonOptions)
    config, n_shards = ctx.config, sharding_of(options)
    read = {table: pipeline | f"Read{table.capitalize()}" >> _source(table, options, ctx)
            for table in input_tables(config)}

    catalog = read["catalog"].rows | "CleanCatalog" >> CleanCatalog()
    fitment_rows = (read["fitment"].rows if "fitment" in read
                    else pipeline | "NoFitment" >> beam.Create([]))
    fitment = fitment_rows | "FitmentSkus" >> DropUnknownSkus("fitment", catalog.rows)
    events = read["events"].rows | "EventSkus" >> DropUnknownSkus("events", catalog.rows)
    unique_events = events.rows | "DedupeEvents" >> DedupeEvents("events", n_shards)
    users = read["users"].rows | "DedupeEmails" >> MarkDuplicateEmails(n_shards)

    profiles, order_lines, join_counts = (
        {"users": users, "events": unique_events.rows}
        | "JoinUsersWithEvents" >> JoinUsersWithEvents(ctx.as_of, config, n_shards))
    ranker = None if ctx.ranker is None else RankerSpec(
        ctx.ranker_path, FeatureConfig.from_dict(ctx.ranker.metadata["feature_config"]))
    recommender = Recommend(catalog.rows, ctx.as_of, config, ctx.run_id, n_shards, ranker)
    recs = ({"users": profiles, "lines": order_lines, "fitment": fitment.rows,
             "events": unique_events.rows}
            | "Recommend" >> recommender)
    popularity = recs.popularity
    if ctx.ranker is None:
        model_version, ranker_counts = recommender.model_version(), []
    else:
        drift = recs.drift | "FeatureDrift" >> FeatureDrift(ctx.ranker_path)
        model_version, ranker_counts = ctx.ranker.version, [drift.counts]
    stamped = recs.rows | "AddRunMetadata" >> beam.ParDo(
        AddRunMetadata(ctx.started_at, ctx.run_id, model_version))

    violations = ((recs.qa, stamped | "OneRowPerEmail" >> CheckOneRowPerEmail(n_shards))
                  | "FlattenQA" >> beam.Flatten()
                  | "SumViolations" >> beam.CombineGlobally(sum_violations))
    dead = ([r.dead_letters for r in read.values()]
            + [catalog.dead_letters, fitment.dead_letters, events.dead_letters,
               recs.dead_letters]) | "FlattenDeadLetters" >> beam.Flatten()

    counters = ([r.counts for r in read.values()]
                + [catalog.counts, unique_events.counts, join_counts, recs.counts,
                   dead | "CountDeadLetters" >> DeadLetterCounts(),
                   stamped | "CountRecommendations" >> CountRows("recommendations.written"),
                   stamped | "CountUsersServed" >> CountRows("users.processed"),
                   unique_events.rows | "CountEventNames" >> CountEventNames(),
                   *ranker_counts]
                | "FlattenCounters" >> beam.Flatten()
                | "SumCounters" >> SumCounts())

    outputs = schemas.outputs(config.rules.recs_per_user,
                              slot_sources=not config.candidates.popularity_only)

    def stage(name: str) -> StageOutput:
        return StageOutput(ctx.warehouse, ctx.run_id, name, outputs[name], ctx.staging_dir)

    logged_dead = dead | "StampDeadLetters" >> beam.Map(
        lambda frame, run_id: frame.assign(run_id=run_id), ctx.run_id)
    staged = {
        "recommendations": stamped | "StageRecommendations" >> stage("recommendations"),
        "segment_popularity": popularity | "StagePopularity" >> stage("segment_popularity"),
        "dead_letter": logged_dead | "StageDeadLetters" >> stage("dead_letter"),
    }
    signals = ({"catalog": catalog.rows, "events": unique_events.rows,
                "recommendations": stamped}
               | "GatherGateSignals" >> GatherGateSignals(config, ctx.as_of))
    run_row = {"run_id": ctx.run_id, "job": JOB, "as_of": ctx.as_of,
               "started_at": ctx.started_at}
    gated = config if batch.strategy != "global" else config.replace(
        gates=sanity.baseline_gates(config.gates))  # the baseline's one list is not nonsense
    run = counters | "GateAndPublish" >> beam.ParDo(
        PublishRunFn(ctx.warehouse, run_row, gated, batch.min_ratio_vs_last_run,
                     batch.keep_backups, batch.accept_changes, input_tables(config)),
        beam.pvalue.AsSingleton(violations),
        beam.pvalue.AsList(staged["recommendations"]),
        beam.pvalue.AsList(staged["segment_popularity"]),
        beam.pvalue.AsList(staged["dead_letter"]),
        beam.pvalue.AsSingleton(signals))
    if ctx.serving is None:
        return run
    # Written beside the warehouse's staging; served only once the gate has published.
    written = stamped | "WriteServingStore" >> WriteServingVersion(
        ctx.serving, ctx.run_id, model_version, ctx.started_at)
    return run | "SwitchServingStore" >> beam.ParDo(
        SwitchServingFn(ctx.serving, ctx.warehouse), beam.pvalue.AsSingleton(written))


def _source(table: str, options: CommonOptions, ctx: RunContext) -> beam.PTransform:
    """The reader of one input: its local file, or its BigQuery table (windowed for events)."""
    if ctx.bigquery is not None and ctx.bigquery.inputs:
        return ReadBigQueryTable(
            table, ctx.bigquery.inputs[table],
            ctx.bigquery.events_window if table == WINDOWED_TABLE else None,
            ctx.bigquery.endpoint, limits=ctx.config.inputs)
    return ReadTable(table, find_table(options.input_dir, table), limits=ctx.config.inputs)


def summarise(warehouse: Warehouse, run_id: str, n: int) -> str:
    """A short human summary of one run, read back from the warehouse."""
    run = warehouse.query("SELECT * FROM pipeline_runs WHERE run_id = ?", [run_id]).iloc[0]
    checks = warehouse.query("SELECT rule_id, name, violations, value, threshold, detail "
                             "FROM qa_checks WHERE run_id = ? ORDER BY rule_id", [run_id])
    qa = checks[~checks["rule_id"].isin(list(sanity.GATE_IDS.values()))]
    counters = json.loads(run["counters"])
    served = run["recommendations_written"]
    lines = [f"run {run_id}: {run['status'].upper()} — {run['message']}",
             f"users read {run['users_read']:,}, eligible {run['eligible_users']:,}, "
             f"recommended {served:,}; dead-lettered {run['dead_lettered']:,}, "
             f"deduplicated {run['deduplicated']:,}"]
    sources = {k.split("users.source.", 1)[1]: v for k, v in counters.items()
               if k.startswith("users.source.")}
    if served:
        lines.append("served by level: " + ", ".join(
            f"{k} {v / served:.1%}" for k, v in sorted(sources.items(), key=lambda kv: -kv[1])))
    lines.append("QA checks: " + ", ".join(
        f"{r.rule_id}:{r.violations}" for r in qa.itertuples()))
    lines += sanity.format_gates(checks)
    for table, r in health.reconcile(counters).items():
        lines.append(f"  {table:8s} read {r['read']:>9,} = processed {r['processed']:>9,} "
                     f"+ dead-lettered {r['dead_lettered']:>6,} + deduplicated "
                     f"{r['deduplicated']:>6,} (unexplained {r['unexplained']})")
    if "ranker.psi_max_milli" in counters:
        lines.append(f"ranker: {counters.get('ranker.rows_scored', 0):,} rows scored, max PSI "
                     f"{counters['ranker.psi_max_milli'] / 1000:.3f}: "
                     + ("RETRAIN RECOMMENDED" if counters.get("ranker.retrain_recommended")
                        else "no drift"))
    stability = warehouse.query("SELECT * FROM stability_report WHERE run_id = ?", [run_id]) if (
        run["status"] == health.PUBLISHED) else None
    if stability is not None and len(stability):
        lines.append("stability vs the previous output:")
        lines += ["  " + line for line in format_report(stability.iloc[0].to_dict(), n)
                  .splitlines()]
    if warehouse.exists("stability_changes"):  # why the lists changed (#19)
        changes = warehouse.query("SELECT * FROM stability_changes WHERE run_id = ?", [run_id])
        if len(changes):
            lines += ["changes explained:"] + format_changes(changes)
    lines.append(f"warehouse: {warehouse.location}")
    return "\n".join(lines)


def run(argv: Optional[List[str]] = None, test_pipeline: Optional[beam.Pipeline] = None) -> int:
    """Run the job; returns 0 when published, 1 when gated (start-up refusals raise UsageError).

    A local warehouse is locked for the whole run, before anything reads it.
    """
    options = job_options(argv, __name__)
    local = options.view_as(SourceSinkOptions).sink != "bigquery"
    check_run_id(options)
    with (locked_warehouse(options.view_as(CommonOptions).warehouse, JOB) if local
          else contextlib.nullcontext()) as lock:
        ctx = context_from(options)
        if lock is not None:
            lock.note(holder(JOB, ctx.run_id))
        pipeline = test_pipeline or beam.Pipeline(options=options)
        build(pipeline, options, ctx)
        return finish_run(pipeline, ctx.warehouse, ctx.run_id, lambda: summarise(
            ctx.warehouse, ctx.run_id, ctx.config.rules.recs_per_user))


def main() -> None:
    entry_point(run)


if __name__ == "__main__":
    main()
