"""Campaign report: funnel, attribution, AOV, time to order, failures; tables and HTML (SPEC §5).

    python -m pipelines.campaign_report --input_dir out/demo_world \\
        --warehouse out/warehouse.duckdb --report_html out/campaign_report.html

Reads ``treatment_events`` and ``events``, checks treatment events against
their sends, attributes each order (counted once whatever names report it) to
the buyer's latest send within ``--attribution_days``, and writes the tables
campaign_funnel, campaign_revenue_by_path, campaign_aov,
campaign_time_to_order and campaign_delivery_failures, plus a self-contained
HTML page with the funnel, the bandit posteriors per treatment and CTR with
95% intervals over time. Exit status 0 means published; 1 means gated.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import List, Optional

import apache_beam as beam
import pandas as pd
from apache_beam.options.pipeline_options import PipelineOptions

from models import health
from pipelines.bandit_report import (BanditContext, BanditOptions, bandit_context,
                                     bandit_state, read_treatment_events)
from pipelines.jobs import (UsageError, entry_point, finish_run, holder, job_options,
                           locked_warehouse)
from pipelines.options import CommonOptions, check_run_id, require_writable_file, sharding_of
from transforms.campaign import (BANDIT_STATE, REPORT_TABLES, CampaignReport, OrderEvents,
                                 PublishReport, split_tables)
from transforms.health import DeadLetterCounts, SumCounts
from transforms.io import ReadTable, find_table
from transforms.warehouse import LocalWarehouse

JOB = "campaign_report"


class CampaignOptions(PipelineOptions):
    """Options of the campaign report.

    The bandit's window and model options (`BanditOptions`) shape its CTR
    charts; the shared flags are read through ``view_as(CommonOptions)``.
    """

    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--attribution_days", type=int, default=7,
                            help="An order counts for a send when placed within this many "
                                 "days after it.")
        parser.add_argument("--report_html", default="out/campaign_report.html",
                            help="Where the self-contained HTML report is written.")


def campaign_context(options: PipelineOptions) -> BanditContext:
    """The bandit context, after failing fast on options the report cannot honour."""
    if options.view_as(BanditOptions).segment_by:
        raise UsageError("--segment_by belongs to pipelines.bandit_report; the campaign "
                         "report charts the per-treatment posteriors")
    if options.view_as(CampaignOptions).attribution_days < 1:
        raise UsageError("--attribution_days must be >= 1")
    # Checked before the run: a directory here used to fail only after publishing.
    require_writable_file("report_html", options.view_as(CampaignOptions).report_html)
    return bandit_context(options, JOB)


def build(pipeline: beam.Pipeline, pipeline_options: PipelineOptions, ctx: BanditContext
          ) -> beam.PCollection:
    """The campaign report graph; returns the singleton ``pipeline_runs`` row."""
    options = pipeline_options.view_as(CommonOptions)
    report = pipeline_options.view_as(CampaignOptions)
    window = pd.Timedelta(days=report.attribution_days)
    treatments = read_treatment_events(pipeline, options, ctx)
    read_events = pipeline | "ReadEvents" >> ReadTable(
        "events", find_table(options.input_dir, "events"), limits=ctx.limits)
    orders = read_events.rows | "OrderEvents" >> OrderEvents(sharding_of(options))
    tables, report_counts = ({"treatment_events": treatments.rows, "orders": orders.rows}
                             | "CampaignReport" >> CampaignReport(window, sharding_of(options)))
    state = bandit_state(treatments.rows, ctx)

    dead_letters = ([treatments.dead_letters, read_events.dead_letters, orders.dead_letters,
                     state.dead_letters] | "FlattenDeadLetters" >> beam.Flatten())
    counters = ([treatments.counts, read_events.counts, orders.counts, report_counts,
                 state.counts, dead_letters | "CountDeadLetters" >> DeadLetterCounts()]
                | "FlattenCounters" >> beam.Flatten()
                | "SumCounters" >> SumCounts())
    run_row = {"run_id": ctx.run_id, "job": JOB, "as_of": ctx.as_of,
               "started_at": ctx.started_at}
    meta = {"generated_at": f"{ctx.started_at:%Y-%m-%d %H:%M} UTC",
            "attribution_days": str(report.attribution_days),
            "window_days": str(ctx.window.days)}
    return ({"counters": counters, "dead_letter": dead_letters, "bandit_state": state.rows,
             **split_tables(tables)}
            | "GateAndPublish" >> PublishReport(
                LocalWarehouse(options.warehouse), run_row, ctx.staging_dir, REPORT_TABLES,
                gate_counter="campaign.recipients", reconciled=("treatment_events", "events"),
                html_path=report.report_html, html_meta=meta,
                render_only={"bandit_state": BANDIT_STATE}))


def policy_lines(policy: pd.DataFrame) -> List[str]:
    """Click-through per send: realised, the uniform estimate, the lift, with intervals."""
    if not len(policy):
        return ["click-through per send: no sends with a recorded propensity, so no "
                "off-policy estimates"]
    row = policy.set_index(["policy", "method"])
    first = policy.iloc[0]

    def show(key):
        r = row.loc[key]
        return f"{r['value']:.3%} [{r['ci_low']:.3%}, {r['ci_high']:.3%}]"

    return [f"click-through per send over {first['sends']:,} sends with a propensity "
            f"({first['sends_without_propensity']:,} without): realised "
            f"{show(('logged', 'realised'))}, uniform random (SNIPS) {show(('uniform', 'snips'))}, lift "
            f"{show(('lift_vs_uniform', 'snips'))}; greedy (DR) {show(('greedy', 'dr'))}, "
            f"Thompson (DR) {show(('thompson', 'dr'))}"]


def summarise(warehouse: LocalWarehouse, run_id: str, html_path: str) -> str:
    """A short human summary of one run, read back from the warehouse."""
    run = warehouse.query("SELECT * FROM pipeline_runs WHERE run_id = ?", [run_id]).iloc[0]
    counters = json.loads(run["counters"])
    lines = [f"run {run_id}: {run['status'].upper()} — {run['message']}"]
    for table, r in health.reconcile(counters, ("treatment_events", "events")).items():
        lines.append(f"  {table:16s} read {r['read']:>9,} = processed {r['processed']:>9,} "
                     f"+ dead-lettered {r['dead_lettered']:>6,} + deduplicated "
                     f"{r['deduplicated']:>6,} (unexplained {r['unexplained']})")
    if run["status"] == health.PUBLISHED:
        funnel = warehouse.query(
            "SELECT stage, recipients, rate_of_sent FROM campaign_funnel WHERE campaign_id = '*' "
            "AND treatment_id = '*' ORDER BY stage_order")
        lines.append("funnel: " + " → ".join(
            f"{r.stage} {r.recipients:,} ({r.rate_of_sent:.2%})"
            for r in funnel.itertuples(index=False)))
        paths = warehouse.query("SELECT path, orders, revenue FROM campaign_revenue_by_path "
                                "WHERE campaign_id = '*'")
        lines.append("revenue: " + ", ".join(f"{r.path} ${r.revenue:,.0f} ({r.orders} orders)"
                                             for r in paths.itertuples(index=False)))
        aov = warehouse.query('SELECT "group", orders, aov FROM campaign_aov')
        lines.append("AOV: " + ", ".join(f"{r.group} ${r.aov:,.0f} ({r.orders} orders)"
                                         for r in aov.itertuples(index=False)))
        policy = warehouse.query("SELECT * FROM campaign_policy_value")
        lines.extend(policy_lines(policy))
        lines.append(f"report: {os.path.abspath(html_path)}")
    lines.append(f"warehouse: {os.path.abspath(warehouse.path)}")
    return "\n".join(lines)


def run(argv: Optional[List[str]] = None, test_pipeline: Optional[beam.Pipeline] = None) -> int:
    """Run the job; returns 0 when published, 1 when gated."""
    options = job_options(argv, __name__).view_as(CampaignOptions)
    check_run_id(options)
    path = options.view_as(CommonOptions).warehouse
    with locked_warehouse(path, JOB) as lock:
        ctx = campaign_context(options)
        lock.note(holder(JOB, ctx.run_id))
        pipeline = test_pipeline or beam.Pipeline(options=options)
        build(pipeline, options, ctx)
        warehouse = LocalWarehouse(path)
        return finish_run(pipeline, warehouse, ctx.run_id,
                          lambda: summarise(warehouse, ctx.run_id, options.report_html))


def main() -> None:
    entry_point(run)


if __name__ == "__main__":
    main()
