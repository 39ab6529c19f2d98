"""Composites of the campaign and bandit report jobs, adapting models/campaign.py to Beam.

Reading order: treatment events deduplicated by ``event_id`` → checked per
recipient against its send (`CleanTreatmentEvents`); order events kept and
deduplicated (`OrderEvents`); both meet per user shard for the report's
partial sums, gathered into the five tables (`CampaignReport`); a finished
run is gated, written to the warehouse and, for the campaign job, rendered as
HTML (`PublishReport`).
"""
from __future__ import annotations

import json
from typing import Dict, Iterator, List, Mapping, NamedTuple, Optional, Tuple

import apache_beam as beam
import numpy as np
import pandas as pd
import pyarrow as pa
from apache_beam import typehints
from apache_beam.io.filesystems import FileSystems

from models import campaign, contracts, health, report_html, sends
from models.contracts import ORDER_EVENT_NAMES
from transforms import schemas
from transforms.frames import DEFAULT_SHARDS, CoGroupFrames, GroupFrames
from transforms.health import Tag, count, dead_letters
from transforms.io import WriteFrames
from transforms.recommend import Cleaned, DedupeEvents
from transforms.warehouse import LocalWarehouse, read_staged

Shard = int
_TIMESTAMP = schemas.TIMESTAMP

BANDIT_STATE = pa.schema(
    [("window_start", _TIMESTAMP), ("window_end", _TIMESTAMP), ("segment", pa.string()),
     ("treatment_id", pa.string())]
    + [(field, pa.int64()) for field in campaign.COUNT_FIELDS + ("clicks_capped",)]
    + [(field, pa.float64()) for field in ("alpha", "beta", "mean", "ci_low", "ci_high",
                                           "p_best", "weight")]
    + [("scope", pa.string())])

BANDIT_ALLOCATION = pa.schema(
    [("allocation_version", pa.string()), ("window_start", _TIMESTAMP),
     ("window_end", _TIMESTAMP), ("segment", pa.string()), ("treatment_id", pa.string()),
     ("weight", pa.float64())])

REPORT_TABLES = {
    "campaign_funnel": pa.schema([
        ("campaign_id", pa.string()), ("treatment_id", pa.string()), ("stage", pa.string()),
        ("stage_order", pa.int64()), ("recipients", pa.int64()),
        ("rate_of_sent", pa.float64()), ("rate_of_previous", pa.float64())]),
    "campaign_revenue_by_path": pa.schema([
        ("campaign_id", pa.string()), ("path", pa.string()), ("orders", pa.int64()),
        ("revenue", pa.float64()), ("share_of_revenue", pa.float64()), ("aov", pa.float64())]),
    "campaign_aov": pa.schema([
        ("group", pa.string()), ("orders", pa.int64()), ("revenue", pa.float64()),
        ("aov", pa.float64()), ("median_order_value", pa.float64()),
        ("span_start", _TIMESTAMP), ("span_end", _TIMESTAMP)]),
    "campaign_time_to_order": pa.schema([
        ("campaign_id", pa.string()), ("kind", pa.string()), ("label", pa.string()),
        ("q", pa.float64()), ("hours_low", pa.float64()), ("hours_high", pa.float64()),
        ("orders", pa.int64())]),
    "campaign_delivery_failures": pa.schema([
        ("campaign_id", pa.string()), ("reason", pa.string()), ("failures", pa.int64()),
        ("share_of_failures", pa.float64()), ("share_of_sent", pa.float64())]),
    # Click-through per send: realised under the logging policy, and off-policy
    # estimates of uniform/greedy/Thompson with bootstrap intervals (models/sends.py).
    "campaign_policy_value": pa.schema([
        ("policy", pa.string()), ("method", pa.string()), ("value", pa.float64()),
        ("ci_low", pa.float64()), ("ci_high", pa.float64()), ("sends", pa.int64()),
        ("sends_without_propensity", pa.int64())]),
}


# --- treatment events ------------------------------------------------------------------

@typehints.with_input_types(Tuple[Shard, pd.DataFrame])
@typehints.with_output_types(pd.DataFrame)
class CheckFunnelFn(beam.DoFn):
    """Per user shard: events without a prior send are dead-lettered, repeated stages reconciled."""

    def process(self, element: Tuple[Shard, pd.DataFrame]) -> Iterator:
        _, frame = element
        check = campaign.check_funnel(frame)
        if len(check.rejected):
            yield beam.pvalue.TaggedOutput(Tag.DEAD_LETTER.value, dead_letters(
                "treatment_events", "CheckFunnel", check.rejected["refusal"].tolist(),
                contracts.to_record_json(check.rejected.drop(columns="refusal"),
                                         np.arange(len(check.rejected)))))
        # A stage reached twice is one stage reached: repeats reconcile as duplicates.
        yield count("treatment_events.deduplicated", len(check.repeats))
        for kind, n in check.repeats["kind"].value_counts().items():
            yield count(f"treatment_events.repeated.{kind}", int(n))
        yield count("treatment_events.processed", len(check.rows))
        if len(check.rows):
            yield check.rows


class CleanTreatmentEvents(beam.PTransform):
    """Validated treatment-event frames → deduplicated, funnel-consistent frames."""

    def __init__(self, num_shards: int = DEFAULT_SHARDS):
        super().__init__()
        self._num_shards = num_shards

    def expand(self, rows: beam.PCollection) -> Cleaned:
        unique = rows | "DedupeByEventId" >> DedupeEvents("treatment_events", self._num_shards)
        checked = (unique.rows
                   | "ShardByUser" >> GroupFrames(["user_id"], self._num_shards)
                   | "CheckFunnel" >> beam.ParDo(CheckFunnelFn()).with_outputs(
                       Tag.DEAD_LETTER.value, Tag.COUNTS.value, main=Tag.ROWS.value))
        return Cleaned(
            checked[Tag.ROWS.value],
            (unique.dead_letters, checked[Tag.DEAD_LETTER.value])
            | "FlattenDeadLetters" >> beam.Flatten(),
            (unique.counts, checked[Tag.COUNTS.value]) | "FlattenCounts" >> beam.Flatten())


# --- orders and the report ---------------------------------------------------------------

@typehints.with_input_types(pd.DataFrame)
@typehints.with_output_types(pd.DataFrame)
class KeepOrderEventsFn(beam.DoFn):
    """Keeps order events; the others are processed here, as the report has no use for them."""

    def process(self, frame: pd.DataFrame) -> Iterator:
        is_order = frame["event_name"].isin(ORDER_EVENT_NAMES).to_numpy(bool)
        yield count("events.processed", int((~is_order).sum()))
        if is_order.any():
            yield frame.loc[is_order].reset_index(drop=True)


class OrderEvents(beam.PTransform):
    """Validated event frames → order events, deduplicated by ``event_id``."""

    def __init__(self, num_shards: int = DEFAULT_SHARDS):
        super().__init__()
        self._num_shards = num_shards

    def expand(self, rows: beam.PCollection) -> Cleaned:
        kept = rows | "KeepOrderEvents" >> beam.ParDo(KeepOrderEventsFn()).with_outputs(
            Tag.COUNTS.value, main=Tag.ROWS.value)
        unique = kept[Tag.ROWS.value] | "DedupeByEventId" >> DedupeEvents(
            "events", self._num_shards)
        return Cleaned(unique.rows, unique.dead_letters,
                       (kept[Tag.COUNTS.value], unique.counts) | "FlattenCounts" >> beam.Flatten())


@typehints.with_input_types(Tuple[Shard, Dict[str, pd.DataFrame]])
@typehints.with_output_types(campaign.CampaignPartials)
class CampaignPartialsFn(beam.DoFn):
    """Per user shard: the report's partial sums (funnel, failures, attributed orders, orders)."""

    def __init__(self, attribution_window: pd.Timedelta):
        self._window = attribution_window

    def process(self, element: Tuple[Shard, Dict[str, pd.DataFrame]]) -> Iterator:
        _, groups = element
        treatments = groups["treatment_events"]
        parts = campaign.campaign_partials(treatments, groups["orders"], self._window)
        # The send log is per-cell counts, so shards ship little to the gathering step.
        parts = parts._replace(sends=sends.send_log(treatments, self._window))
        yield count("events.processed", len(groups["orders"]))
        yield count("campaign.recipients", int(parts.funnel["sent"].sum()))
        yield parts


def _build_tables(parts: List[campaign.CampaignPartials], window: pd.Timedelta,
                  resamples: int = 1000, seed: int = 2026) -> Dict[str, pd.DataFrame]:
    """All shards' partials → the five report tables and ``campaign_policy_value``."""
    merged = campaign.merge_partials(parts)
    return {**campaign.campaign_tables(merged, window),
            "campaign_policy_value": sends.policy_value_table(merged.sends, resamples, seed)}


class CampaignReportOut(NamedTuple):
    """A singleton dict of the five report tables, and the report's counters."""

    tables: beam.PCollection
    counts: beam.PCollection


class CampaignReport(beam.PTransform):
    """``{"treatment_events", "orders"}`` frames → the five report tables.

    Both inputs meet per user shard, so a user's sends and orders are
    attributed together; the shards' partial sums are small (per treatment,
    per reason, per order) and are gathered on one worker to finish the tables.
    """

    def __init__(self, attribution_window: pd.Timedelta, num_shards: int = DEFAULT_SHARDS):
        super().__init__()
        self._window = attribution_window
        self._num_shards = num_shards

    def expand(self, inputs: Dict[str, beam.PCollection]) -> CampaignReportOut:
        partials = (inputs
                    | "ShardByUser" >> CoGroupFrames(
                        {"treatment_events": ["user_id"], "orders": ["user_id"]},
                        self._num_shards)
                    | "PartialsPerShard" >> beam.ParDo(
                        CampaignPartialsFn(self._window)).with_outputs(
                        Tag.COUNTS.value, main=Tag.ROWS.value))
        tables = (partials[Tag.ROWS.value]
                  | "GatherPartials" >> beam.combiners.ToList()
                  | "BuildTables" >> beam.Map(_build_tables, self._window))
        return CampaignReportOut(tables, partials[Tag.COUNTS.value])


def split_tables(tables: beam.PCollection) -> Dict[str, beam.PCollection]:
    """The singleton dict of report tables → one frame collection per table."""
    return {name: tables | f"Take{_camel(name)}" >> beam.Map(lambda t, n: t[n], name)
            for name in REPORT_TABLES}


# --- publishing ----------------------------------------------------------------------------

class PublishReportFn(beam.DoFn):
    """Gates a report run, writes its tables and run log, and renders the HTML report.

    The run publishes (swaps its tables in, keeping backups) only when the
    `gate_counter` is non-zero and the counts of the `reconciled` tables add
    up (`campaign.run_verdict`); otherwise only the run log and dead letters
    are written.
    """

    def __init__(self, warehouse: LocalWarehouse, run: Dict[str, object],
                 table_schemas: Mapping[str, pa.Schema], gate_counter: str,
                 reconciled: Tuple[str, ...], html_path: Optional[str],
                 html_meta: Mapping[str, str], render_only: Mapping[str, pa.Schema]):
        self._warehouse = warehouse
        self._run = run
        self._schemas = dict(table_schemas)
        self._render_only = dict(render_only)
        self._gate = gate_counter
        self._reconciled = reconciled
        self._html_path = html_path
        self._html_meta = dict(html_meta)

    def process(self, counters: Dict[str, int], dead_letter_files: List[str],
                **staged_files: List[str]) -> Iterator[Dict[str, object]]:
        tables = {name: read_staged(staged_files[name], schema)
                  for name, schema in self._schemas.items()}
        shown = {name: read_staged(staged_files[name], schema)
                 for name, schema in self._render_only.items()}
        verdict = campaign.run_verdict(self._gate, counters, self._reconciled)
        run_id = self._run["run_id"]
        dead = read_staged(dead_letter_files, schemas.DEAD_LETTER)
        row = {**self._run, "finished_at": pd.Timestamp.now(tz="UTC"),
               "status": verdict.status, "message": verdict.message,
               # pipeline_runs is shaped for the recommendations job; a report fills
               # its recommendation columns with 0 and keeps its own figures in counters.
               "users_read": 0, "eligible_users": 0, "recommendations_written": 0,
               "dead_lettered": sum(v for k, v in counters.items()
                                    if k.endswith(".dead_lettered")),
               "deduplicated": sum(v for k, v in counters.items()
                                   if k.endswith(".deduplicated")),
               "qa_violations": 0, "counters": json.dumps(dict(sorted(counters.items())))}
        logs = {
            "dead_letter": dead.append_column("run_id", pa.array([run_id] * dead.num_rows,
                                                                 pa.string())),
            "pipeline_runs": pa.Table.from_pylist([row], schema=schemas.PIPELINE_RUNS),
        }
        self._warehouse.publish(run_id, tables, logs, swap=verdict.status == health.PUBLISHED)
        if self._html_path:
            html = report_html.render(
                {name: table.to_pandas() for name, table in {**tables, **shown}.items()},
                {**self._html_meta, "run_id": str(run_id), "status": verdict.status,
                 "message": verdict.message})
            with FileSystems.create(self._html_path, mime_type="text/html") as handle:
                handle.write(html.encode("utf-8"))
        yield row


class PublishReport(beam.PTransform):
    """Stages each table and the dead letters as Parquet, then gates and publishes the run.

    Input: a dict with ``counters`` (the `SumCounts` singleton), ``dead_letter``
    frames and one frame collection per name in `table_schemas` (published)
    and in `render_only` (shown in the HTML, owned by another job). Output: the
    run's `pipeline_runs` row. Publishing waits for every staged write (their
    file lists are side inputs) and runs inside the pipeline, because a
    template's launcher exits before the job ends.
    """

    def __init__(self, warehouse: LocalWarehouse, run: Dict[str, object], staging_dir: str,
                 table_schemas: Mapping[str, pa.Schema], gate_counter: str,
                 reconciled: Tuple[str, ...], html_path: Optional[str] = None,
                 html_meta: Optional[Mapping[str, str]] = None,
                 render_only: Optional[Mapping[str, pa.Schema]] = None):
        super().__init__()
        self._fn = PublishReportFn(warehouse, run, table_schemas, gate_counter, reconciled,
                                   html_path, html_meta or {}, render_only or {})
        self._staging_dir = staging_dir
        self._schemas = {**table_schemas, **(render_only or {})}

    def expand(self, inputs: Dict[str, beam.PCollection]) -> beam.PCollection:
        staged = {name: inputs[name] | f"Stage{_camel(name)}" >> WriteFrames(
            FileSystems.join(self._staging_dir, name, "part"), schema)
            for name, schema in self._schemas.items()}
        dead = inputs["dead_letter"] | "StageDeadLetters" >> WriteFrames(
            FileSystems.join(self._staging_dir, "dead_letter", "part"), schemas.DEAD_LETTER)
        return inputs["counters"] | "GateAndPublish" >> beam.ParDo(
            self._fn, beam.pvalue.AsList(dead),
            **{name: beam.pvalue.AsList(files) for name, files in staged.items()})


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))
