"""Bandit state: views and clicks per treatment in sliding event-time windows (SPEC §4).

    python -m pipelines.bandit_report --input_dir out/demo_world \\
        --warehouse out/warehouse.duckdb --window_days 7 --period_days 1

Reads ``treatment_events`` (and ``users`` with ``--segment_by``), drops
duplicate event ids and events that contradict their send, counts the funnel
kinds per treatment in sliding windows and writes, per window and treatment
(and segment), the Beta posterior, its 95% interval, P(best) and the
allocation weight to the ``bandit_state`` table, plus one ``overall`` row per
treatment over all the data; views and clicks count at the time of the send
they follow (within ``--click_window_days``). The latest window's weights per
segment go to ``bandit_allocation``, versioned by the run id, for a sender's
`models.allocation.choose`. Exit status 0 means
published; 1 means the run was gated (nothing counted, or counts that do not
reconcile).
"""
from __future__ import annotations

import argparse
import json
import os
from typing import List, NamedTuple, Optional, Tuple

import apache_beam as beam
import pandas as pd
from apache_beam.options.pipeline_options import PipelineOptions

from models import allocation, campaign, health
from models.bandit import BanditConfig
from models.campaign import ALL, complete_windows, overall_rows
from models.config import DEFAULT_CONFIG, InputConfig
from models.config_file import ConfigError, load_config
from pipelines.jobs import (UsageError, entry_point, finish_run, holder, job_options,
                           locked_warehouse)
from pipelines.options import (CommonOptions, as_of_of, check_attributes, check_run_id,
                               require_input_dir, require_tables, require_writable_dir,
                               run_id_of, sharding_of)
from transforms.bandit import (AttachSegments, AttributeToSends, BanditState, BanditStateOut,
                               TreatmentCounts)
from transforms.campaign import (BANDIT_ALLOCATION, BANDIT_STATE, CleanTreatmentEvents,
                                 PublishReport)
from transforms.health import DeadLetterCounts, SumCounts
from transforms.io import ReadTable, find_table
from transforms.recommend import Cleaned
from transforms.warehouse import LocalWarehouse

JOB = "bandit_report"


class BanditOptions(PipelineOptions):
    """Options of the bandit job's windows and model.

    The flags every job shares (--input_dir, --warehouse, --staging_dir,
    --as_of, --run_id, --num_shards) are read through
    ``view_as(CommonOptions)``: two option classes declaring one flag break
    Beam's option parsing in any process that imports both.
    """

    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--window_days", type=int, default=7,
                            help="Length of each sliding event-time window, in days.")
        parser.add_argument("--period_days", type=int, default=1,
                            help="A new window starts every this many days.")
        parser.add_argument("--segment_by", default="",
                            help="Comma-separated user attributes (e.g. make,model) to also "
                                 "keep counts per segment; empty: per treatment only.")
        parser.add_argument("--prior_alpha", type=float, default=BanditConfig.alpha0,
                            help="Prior pseudo-clicks of Beta(alpha0, beta0).")
        parser.add_argument("--prior_beta", type=float, default=BanditConfig.beta0,
                            help="Prior pseudo-non-clicks of Beta(alpha0, beta0).")
        parser.add_argument("--bandit_draws", type=int, default=BanditConfig.draws,
                            help="Monte Carlo draws for P(best).")
        parser.add_argument("--bandit_seed", type=int, default=BanditConfig.seed,
                            help="Seed of the P(best) draws (published state is reproducible).")
        parser.add_argument("--exploration_floor", type=float,
                            default=BanditConfig.exploration_floor,
                            help="Minimum allocation weight of every treatment.")
        parser.add_argument("--click_window_days", type=int, default=7,
                            help="A view or click counts for the send it follows when within "
                                 "this many days of it, in the send's windows.")


class BanditContext(NamedTuple):
    """What identifies one run and its windows: fixed before the graph is built."""

    run_id: str
    as_of: pd.Timestamp
    started_at: pd.Timestamp
    staging_dir: str
    config: BanditConfig
    window: pd.Timedelta
    period: pd.Timedelta
    segment_by: Tuple[str, ...]
    limits: InputConfig = DEFAULT_CONFIG.inputs  # --config's `inputs`: what a plausible record is
    click_window: pd.Timedelta = pd.Timedelta(days=7)  # views/clicks count for their send within


def bandit_context(pipeline_options: PipelineOptions, job: str) -> BanditContext:
    """Resolve defaults and fail fast on bad options, before any data is read."""
    now = pd.Timestamp.now(tz="UTC")
    shared = pipeline_options.view_as(CommonOptions)
    options = pipeline_options.view_as(BanditOptions)
    require_input_dir(shared.input_dir)
    if shared.num_shards < 1:
        raise UsageError("--num_shards must be >= 1")
    if options.click_window_days < 1:
        raise UsageError("--click_window_days must be >= 1")
    if not 1 <= options.period_days <= options.window_days:
        raise UsageError(f"need 1 <= --period_days ({options.period_days}) <= --window_days "
                         f"({options.window_days})")
    try:
        config = BanditConfig(alpha0=options.prior_alpha, beta0=options.prior_beta,
                              draws=options.bandit_draws, seed=options.bandit_seed,
                              exploration_floor=options.exploration_floor)
    except ValueError as err:
        raise UsageError(f"bad option: {err}")
    as_of = as_of_of(shared.as_of, now)
    run_id = run_id_of(shared.run_id, now, job)
    staging = shared.staging_dir or os.path.join(
        os.path.dirname(os.path.abspath(shared.warehouse)), "staging", run_id)
    require_writable_dir("staging_dir", staging)
    segment_by = tuple(a.strip() for a in options.segment_by.split(",") if a.strip())
    tables = ["treatment_events"] + (["users"] if segment_by else []) + (
        ["events"] if job == "campaign_report" else [])
    paths = require_tables(shared.input_dir, tables)
    if segment_by:  # the attributes to segment by must be columns of users
        check_attributes(paths, segment_by, ())
    try:
        limits = load_config(shared.config).inputs
    except ConfigError as err:
        raise UsageError(f"--config: {err}")
    return BanditContext(run_id, as_of, now, staging, config,
                         pd.Timedelta(days=options.window_days),
                         pd.Timedelta(days=options.period_days), segment_by, limits,
                         pd.Timedelta(days=options.click_window_days))


def read_treatment_events(pipeline: beam.Pipeline, options: CommonOptions,
                          ctx: BanditContext) -> Cleaned:
    """Treatment events read, validated, deduplicated and checked against their sends."""
    read = pipeline | "ReadTreatmentEvents" >> ReadTable(
        "treatment_events", find_table(options.input_dir, "treatment_events"), limits=ctx.limits)
    clean = read.rows | "CleanTreatmentEvents" >> CleanTreatmentEvents(sharding_of(options))
    return Cleaned(clean.rows,
                   (read.dead_letters, clean.dead_letters)
                   | "FlattenTreatmentDeadLetters" >> beam.Flatten(),
                   (read.counts, clean.counts) | "FlattenTreatmentCounts" >> beam.Flatten())


def bandit_state(events: beam.PCollection, ctx: BanditContext) -> BanditStateOut:
    """Checked treatment-event frames (with ``segment`` when segmenting) → windowed state.

    Views and clicks are counted at their sends' times (`AttributeToSends`),
    so each window's rows are the outcomes of the sends made in it; one more
    set of rows (``scope`` ``overall``) covers all the data.
    """
    attributed = events | "AttributeToSends" >> AttributeToSends(ctx.click_window)
    state = (attributed.rows
             | "TreatmentCounts" >> TreatmentCounts(ctx.window, ctx.period,
                                                    bool(ctx.segment_by))
             | "BanditState" >> BanditState(
                 ctx.config, ctx.window, ctx.period,
                 overall_bucket=campaign.common_bucket(ctx.window, ctx.period)))
    counts = (attributed.counts, state.counts) | "FlattenStateCounts" >> beam.Flatten()
    return BanditStateOut(state.rows, state.dead_letters, counts)


def _allocation(frames: List[pd.DataFrame], version: str, config: BanditConfig) -> pd.DataFrame:
    """All `bandit_state` frames of a run → its ``bandit_allocation`` rows (the latest window)."""
    state = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return allocation.allocation_table(state, version, config)


def build(pipeline: beam.Pipeline, pipeline_options: PipelineOptions, ctx: BanditContext
          ) -> beam.PCollection:
    """The bandit graph; returns the singleton ``pipeline_runs`` row."""
    options = pipeline_options.view_as(CommonOptions)
    treatments = read_treatment_events(pipeline, options, ctx)
    events, dead, counts = treatments.rows, [treatments.dead_letters], [treatments.counts]
    if ctx.segment_by:
        users = pipeline | "ReadUsers" >> ReadTable(
            "users", find_table(options.input_dir, "users"), limits=ctx.limits)
        events = events | "AttachSegments" >> AttachSegments(
            users.rows, ctx.segment_by, sharding_of(options))
        dead.append(users.dead_letters)
        counts.append(users.counts)
    state = bandit_state(events, ctx)
    dead_letters = dead + [state.dead_letters] | "FlattenDeadLetters" >> beam.Flatten()
    counters = (counts + [state.counts,
                          dead_letters | "CountDeadLetters" >> DeadLetterCounts()]
                | "FlattenCounters" >> beam.Flatten()
                | "SumCounters" >> SumCounts())
    run_row = {"run_id": ctx.run_id, "job": JOB, "as_of": ctx.as_of,
               "started_at": ctx.started_at}
    allocation_rows = (state.rows
                       | "GatherState" >> beam.combiners.ToList()
                       | "AllocationOfLatestWindow" >> beam.Map(_allocation, ctx.run_id,
                                                                ctx.config))
    return ({"counters": counters, "dead_letter": dead_letters, "bandit_state": state.rows,
             "bandit_allocation": allocation_rows}
            | "GateAndPublish" >> PublishReport(
                LocalWarehouse(options.warehouse), run_row, ctx.staging_dir,
                {"bandit_state": BANDIT_STATE, "bandit_allocation": BANDIT_ALLOCATION},
                gate_counter="bandit_state.rows", reconciled=("treatment_events",)))


def summarise(warehouse: LocalWarehouse, run_id: str) -> str:
    """A short human summary of one run, read back from the warehouse."""
    run = warehouse.query("SELECT * FROM pipeline_runs WHERE run_id = ?", [run_id]).iloc[0]
    counters = json.loads(run["counters"])
    lines = [f"run {run_id}: {run['status'].upper()} — {run['message']}"]
    r = health.reconcile(counters, ("treatment_events",))["treatment_events"]
    lines.append(f"treatment_events read {r['read']:,} = processed {r['processed']:,} + "
                 f"dead-lettered {r['dead_lettered']:,} + deduplicated {r['deduplicated']:,} "
                 f"(unexplained {r['unexplained']}); views and clicks counted at their send; "
                 f"beyond the click window {counters.get('bandit.beyond_attribution', 0):,}, "
                 f"opens inferred from clicks {counters.get('bandit.opens_inferred', 0):,}")
    if run["status"] == health.PUBLISHED:
        state = warehouse.query("SELECT * FROM bandit_state WHERE segment = ?", [ALL])
        overall = overall_rows(state).sort_values("p_best", ascending=False)
        windows = complete_windows(state)
        lines.append(f"{state.loc[state['scope'] == 'window', 'window_end'].nunique()} windows "
                     f"hold sends, {windows['window_end'].nunique()} of them within the data; "
                     f"over all the data, {overall['window_start'].min():%Y-%m-%d %H:%M} to "
                     f"{overall['window_end'].max():%Y-%m-%d %H:%M}, the treatments rank:")
        for s in overall.head(5).itertuples(index=False):
            lines.append(f"  {s.treatment_id:>12s}  views {s.views:>6,}  clicks {s.clicks:>5,}  "
                         f"CTR {s.mean:6.2%} [{s.ci_low:.2%}, {s.ci_high:.2%}]  "
                         f"P(best) {s.p_best:.3f}")
        alloc = warehouse.query("SELECT * FROM bandit_allocation WHERE segment = ? "
                                "ORDER BY weight DESC", [ALL])
        if len(alloc):
            lines.append(f"allocation {alloc['allocation_version'].iloc[0]} (window "
                         f"{alloc['window_start'].iloc[0]:%Y-%m-%d} to "
                         f"{alloc['window_end'].iloc[0]:%Y-%m-%d}): " + ", ".join(
                             f"{a.treatment_id} {a.weight:.3f}"
                             for a in alloc.head(5).itertuples(index=False)))
    lines.append(f"warehouse: {os.path.abspath(warehouse.path)}")
    return "\n".join(lines)


def run(argv: Optional[List[str]] = None, test_pipeline: Optional[beam.Pipeline] = None) -> int:
    """Run the job; returns 0 when published, 1 when gated."""
    options = job_options(argv, __name__).view_as(BanditOptions)
    check_run_id(options)
    path = options.view_as(CommonOptions).warehouse
    with locked_warehouse(path, JOB) as lock:
        ctx = bandit_context(options, JOB)
        lock.note(holder(JOB, ctx.run_id))
        pipeline = test_pipeline or beam.Pipeline(options=options)
        build(pipeline, options, ctx)
        warehouse = LocalWarehouse(path)
        return finish_run(pipeline, warehouse, ctx.run_id,
                          lambda: summarise(warehouse, ctx.run_id))


def main() -> None:
    entry_point(run)


if __name__ == "__main__":
    main()
