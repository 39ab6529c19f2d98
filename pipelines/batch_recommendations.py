"""Batch recommendations: history in, one checked row per e-mail out (SPEC §3).

    python -m pipelines.batch_recommendations --input_dir out/demo_world \\
        --warehouse out/warehouse.duckdb --as_of 2026-06-30T00:00:00Z

Reads the five SPEC §2 inputs from local files, computes time-decayed segment
popularity with fallback levels, applies intent and every business rule, runs
the QA checks on the output, and publishes to the warehouse only when the run
is clean. Exit status 0 means published; 1 means the run was gated.
"""
from __future__ import annotations

import argparse
import json
import os
import uuid
from typing import List, NamedTuple, Optional

import apache_beam as beam
import pandas as pd
from apache_beam.options.pipeline_options import PipelineOptions

from models import health
from models.stability import format_report
from models.config import RecsConfig
from models.config_file import ConfigError, load_config
from pipelines.jobs import entry_point, finish_run
from pipelines.options import CommonOptions, require_input_dir
from transforms import schemas
from transforms.health import CountRows, DeadLetterCounts, SumCounts
from transforms.io import ReadTable, WriteFrames, find_table
from transforms.publish import PublishRunFn
from transforms.recommend import (AddRunMetadata, CheckOneRowPerEmail, CleanCatalog,
                                  DedupeEvents, DropUnknownSkus, JoinUsersWithEvents,
                                  MarkDuplicateEmails, RecommendPerVehicle, SegmentPopularity,
                                  sum_violations)
from transforms.warehouse import LocalWarehouse

JOB = "batch_recommendations"
MODEL_VERSION = "segment-popularity-v1"
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


class RunContext(NamedTuple):
    """What identifies one run: fixed before the graph is built."""

    run_id: str
    as_of: pd.Timestamp
    started_at: pd.Timestamp
    staging_dir: str
    config: RecsConfig


def context_from(options: PipelineOptions) -> RunContext:
    """Resolve defaults and fail fast on bad options (before any data is read)."""
    batch = options.view_as(BatchOptions)
    options = options.view_as(CommonOptions)
    now = pd.Timestamp.now(tz="UTC")
    try:
        as_of = pd.Timestamp(options.as_of) if options.as_of else now
    except ValueError as err:
        raise SystemExit(f"--as_of {options.as_of!r} is not an RFC 3339 time: {err}")
    as_of = as_of.tz_localize("UTC") if as_of.tzinfo is None else as_of.tz_convert("UTC")
    if options.num_shards < 1:
        raise SystemExit("--num_shards must be >= 1")
    require_input_dir(options.input_dir)
    run_id = options.run_id or f"{now:%Y%m%dT%H%M%SZ}_{uuid.uuid4().hex[:6]}"
    staging = options.staging_dir or os.path.join(
        os.path.dirname(os.path.abspath(options.warehouse)), "staging", run_id)
    try:
        config = load_config(options.config)
    except ConfigError as err:
        raise SystemExit(f"--config: {err}")
    if batch.strategy == "global":
        config = config.replace(segment_attributes=())
    return RunContext(run_id, as_of, now, staging, config)


def build(pipeline: beam.Pipeline, options: PipelineOptions, ctx: RunContext
          ) -> beam.PCollection:
    """The batch graph; returns the singleton run-summary row."""
    batch = options.view_as(BatchOptions)
    options = options.view_as(CommonOptions)
    config, n_shards = ctx.config, options.num_shards
    # Fitment is optional: a retailer without fitment data configures no fitment attributes.
    tables = ("catalog", "users", "events") + (("fitment",) if config.fitment_attributes else ())
    read = {table: pipeline | f"Read{table.capitalize()}" >> ReadTable(
        table, find_table(options.input_dir, table)) for table in tables}

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
    popularity = order_lines | "SegmentPopularity" >> SegmentPopularity(ctx.as_of, config)
    recs = ({"users": profiles, "fitment": fitment.rows}
            | "RecommendPerVehicle" >> RecommendPerVehicle(
                catalog.rows, popularity, config, ctx.run_id, n_shards))
    stamped = recs.rows | "AddRunMetadata" >> beam.ParDo(
        AddRunMetadata(ctx.started_at, ctx.run_id, MODEL_VERSION))

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
                   stamped | "CountUsersServed" >> CountRows("users.processed")]
                | "FlattenCounters" >> beam.Flatten()
                | "SumCounters" >> SumCounts())

    staged = {
        "recommendations": stamped | "StageRecommendations" >> WriteFrames(
            os.path.join(ctx.staging_dir, "recommendations", "part"),
            schemas.recommendations(config.rules.recs_per_user)),
        "segment_popularity": popularity | "StagePopularity" >> WriteFrames(
            os.path.join(ctx.staging_dir, "segment_popularity", "part"),
            schemas.SEGMENT_POPULARITY),
        "dead_letter": dead | "StageDeadLetters" >> WriteFrames(
            os.path.join(ctx.staging_dir, "dead_letter", "part"), schemas.DEAD_LETTER),
    }
    run_row = {"run_id": ctx.run_id, "job": JOB, "as_of": ctx.as_of,
               "started_at": ctx.started_at}
    return counters | "GateAndPublish" >> beam.ParDo(
        PublishRunFn(LocalWarehouse(options.warehouse), run_row, config,
                     batch.min_ratio_vs_last_run),
        beam.pvalue.AsSingleton(violations),
        beam.pvalue.AsList(staged["recommendations"]),
        beam.pvalue.AsList(staged["segment_popularity"]),
        beam.pvalue.AsList(staged["dead_letter"]))


def summarise(warehouse: LocalWarehouse, run_id: str, n: int) -> str:
    """A short human summary of one run, read back from the warehouse."""
    run = warehouse.query("SELECT * FROM pipeline_runs WHERE run_id = ?", [run_id]).iloc[0]
    qa = warehouse.query("SELECT rule_id, name, violations FROM qa_checks WHERE run_id = ? "
                         "ORDER BY rule_id", [run_id])
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
    for table, r in health.reconcile(counters).items():
        lines.append(f"  {table:8s} read {r['read']:>9,} = processed {r['processed']:>9,} "
                     f"+ dead-lettered {r['dead_lettered']:>6,} + deduplicated "
                     f"{r['deduplicated']:>6,} (unexplained {r['unexplained']})")
    stability = warehouse.query("SELECT * FROM stability_report WHERE run_id = ?", [run_id]) if (
        run["status"] == health.PUBLISHED) else None
    if stability is not None and len(stability):
        lines.append("stability vs the previous output:")
        lines += ["  " + line for line in format_report(stability.iloc[0].to_dict(), n)
                  .splitlines()]
    lines.append(f"warehouse: {os.path.abspath(warehouse.path)}")
    return "\n".join(lines)


def run(argv: Optional[List[str]] = None, test_pipeline: Optional[beam.Pipeline] = None) -> int:
    """Run the job; returns 0 when published, 1 when gated."""
    options = PipelineOptions(argv)
    ctx = context_from(options)
    pipeline = test_pipeline or beam.Pipeline(options=options)
    build(pipeline, options, ctx)
    warehouse = LocalWarehouse(options.view_as(CommonOptions).warehouse)
    return finish_run(pipeline, warehouse, ctx.run_id, lambda: summarise(warehouse, ctx.run_id, ctx.config.rules.recs_per_user))


def main() -> None:
    entry_point(run)


if __name__ == "__main__":
    main()
