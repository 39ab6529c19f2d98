"""Streaming refresh: Pub/Sub events in, fresh recommendations and bandit state in BigQuery.

    python -m pipelines.streaming_refresh \\
        --events_subscription projects/P/subscriptions/events \\
        --treatments_subscription projects/P/subscriptions/treatment-events \\
        --streaming_dataset P.recs --input_dir gs://bucket/world --project P

Reads ``events`` and ``treatment_events`` from Pub/Sub, keeps segment
popularity (history plus a sliding window of the stream) and bandit counts in
event-time windows, and writes to BigQuery, per refresh period: refreshed
recommendations of the users touched in it (``recommendation_updates``, and the
view ``recommendations_latest`` with each user's latest row), ``bandit_state``
per window, ``streaming_health`` (counters per period, late data per window)
and ``streaming_dead_letter``. docs/streaming.md explains the design.
On a local runner ``--max_runtime_seconds`` bounds the run (0: until stopped).
"""
from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from typing import Dict, List, NamedTuple, Optional, Tuple, Union

import apache_beam as beam
import pandas as pd
from apache_beam.io.gcp.pubsub import PubsubMessage, ReadFromPubSub, WriteToPubSub
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import (GoogleCloudOptions, PipelineOptions,
                                                  StandardOptions)

from models import streaming as model
from models.bandit import BanditConfig
from models.config import RecsConfig
from models.serving import ServingStore
from models.config_file import ConfigError, load_config
from pipelines.jobs import LOCAL_RUNNERS, UsageError, entry_point, job_options
from pipelines.options import (FITMENT_HINT, CommonOptions, RankerOptions,
                               check_attributes, require_columns, require_input_dir,
                               require_tables, run_id_of)
from transforms import bigquery
from transforms.bigquery import BigQueryOptions  # noqa: F401  (its flags are this job's too)
from transforms.bigquery_io import (INSERT_BATCH_ROWS, INSERT_RETRY_SECONDS,
                                    SourceSinkOptions,  # noqa: F401 (--source bigquery, tables)
                                    settings_from)
from transforms.health import NAMESPACE
from transforms.warehouse import bigquery_dataset, bigquery_project, parse_table, table_name
from transforms.signatures import FilterFn, MapFn
from transforms.serving import (ServingOptions,  # noqa: F401 (its flags are this job's)
                                WriteServingUpdates, store_from)
from transforms.streaming import (BANDIT_FIELDS, DEAD_LETTER_FIELDS, HEALTH_FIELDS,
                                  BigQueryReference, CheckFunnel, CheckSkus, DropDuplicates,
                                  FileReference, LateDataAudit, ModelReference, ModelVersions,
                                  ParseMessages,
                                  Reference, ReferenceVersions,
                                  PeriodCounters, RankingChanges, RefreshRecommendations,
                                  StreamingBandit, TouchedUsers, WindowedPopularity,
                                  WindowOrderLines, WriteRows,
                                  frames_to_rows, recommendation_fields, stamp, to_bigquery_row,
                                  to_global_window, treatment_counts)
from transforms.streaming.reference import (DELIVERIES, POLL, POLLING_RUNNERS, SIDE_INPUT,
                                            delivery_for)

JOB = "streaming_refresh"
MODEL_VERSION = "segment-popularity-v1+stream"
TABLES = ("recommendation_updates", "bandit_state", "streaming_health", "streaming_dead_letter")
VIEWS = {"recommendations_latest": ("recommendation_updates", ("user_id",)),
         "bandit_state_latest": ("bandit_state", ("window_start", "window_end", "segment",
                                                  "treatment_id"))}
_LOG = logging.getLogger(__name__)


class StreamingOptions(PipelineOptions):
    """Options of the streaming refresh (shared ones are in CommonOptions).

    Defaults are for production: 7-day windows every hour (an order counts
    in 168 windows; recommendations feed e-mails sent a few times a day, so an
    hourly refresh is fresh, and a week holds enough orders per segment),
    6 hours of allowed lateness (a publisher outage of a shift; anything
    later is counted and left to the nightly batch job), and duplicates
    remembered for a day (at least the lateness). Tests use seconds.
    """

    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--events_subscription", default=None,
                            help="Pub/Sub subscription of the events stream "
                                 "(projects/<p>/subscriptions/<s>).")
        parser.add_argument("--treatments_subscription", default=None,
                            help="Pub/Sub subscription of the treatment-events stream.")
        parser.add_argument("--streaming_dataset", default=None,
                            help="BigQuery dataset of the output tables, <project>.<dataset> "
                                 "or <dataset> (then --project's).")
        parser.add_argument("--dead_letter_topic", default="",
                            help="Pub/Sub topic that also receives refused messages (raw "
                                 "payload, reason in attributes); empty: BigQuery only.")
        parser.add_argument("--window_seconds", type=int, default=7 * 86_400,
                            help="Length of each sliding event-time window.")
        parser.add_argument("--period_seconds", type=int, default=3_600,
                            help="A window closes, and touched users are refreshed, this often.")
        parser.add_argument("--allowed_lateness_seconds", type=int, default=6 * 3_600,
                            help="How long after a window's end its events still count.")
        parser.add_argument("--dedupe_ttl_seconds", type=int, default=86_400,
                            help="How long an event id is remembered to drop redeliveries "
                                 "(at least the allowed lateness).")
        parser.add_argument("--reference_refresh_seconds", type=int, default=600,
                            help="How often catalogue, fitment, users and history (files of "
                                 "--input_dir, or with --source bigquery tables) are checked "
                                 "for a new version.")
        parser.add_argument("--history_table", default="events",
                            help="Table of --input_dir whose orders and intent are the "
                                 "history under the stream; empty: the stream only.")
        parser.add_argument("--ranking_refresh", default="on", choices=("on", "off"),
                            help="on: also refresh every user of a vehicle whose top picks "
                                 "show other products than at its last notice (at most once "
                                 "per ranking_notices.min_interval_hours of the --config); "
                                 "off: only users with new events.")
        parser.add_argument("--max_runtime_seconds", type=int, default=0,
                            help="Local runners: cancel after this long (0: run until "
                                 "stopped). Ignored on Dataflow.")
        parser.add_argument("--insert_batch_size", type=int, default=INSERT_BATCH_ROWS,
                            help="Rows per BigQuery streaming insert request.")
        parser.add_argument("--bandit_segment_by", default="",
                            help="Comma-separated user attributes (e.g. make,model) to also "
                                 "keep bandit arms per segment, as bandit_report --segment_by; "
                                 "empty: per treatment only.")
        parser.add_argument("--reference_delivery", default="auto", choices=DELIVERIES,
                            help="How reference (and ranker artifact) versions reach the "
                                 "steps that use them: side_input (a PeriodicImpulse every "
                                 "--reference_refresh_seconds / --ranker_refresh_seconds, read "
                                 "as a windowed side input), poll (each worker checks), auto: "
                                 "poll on the local DirectRunner, side_input elsewhere.")
        parser.add_argument("--insert_retry_seconds", type=int, default=INSERT_RETRY_SECONDS,
                            help="How long a bundle retries BigQuery inserts through an "
                                 "outage before the rows not written become dead letters.")
        parser.add_argument("--ranker_refresh_seconds", type=int, default=300,
                            help="Check the ranker artifact for a new version this often: "
                                 "once for the job as a side input (--reference_delivery), or at "
                                 "most this often per worker process when polling.")


class StreamingContext(NamedTuple):
    """What identifies one run: fixed and checked before the graph is built."""

    run_id: str
    started_at: pd.Timestamp
    project: str
    dataset: str                 # project.dataset
    spec: model.WindowSpec
    config: RecsConfig
    bandit: BanditConfig
    dedupe_ttl: pd.Timedelta
    serving: Optional[ServingStore] = None   # with --serving_store (docs/serving.md)

    def table(self, name: str) -> str:
        """A table spec as Beam's BigQuery I/O takes it: project:dataset.table."""
        project, dataset = self.dataset.split(".", 1)
        return f"{project}:{dataset}.{name}"


def context_from(options: PipelineOptions) -> StreamingContext:
    """Resolve defaults and fail fast on bad options, before anything is read."""
    opts = options.view_as(StreamingOptions)
    common = options.view_as(CommonOptions)
    for flag in ("events_subscription", "treatments_subscription", "streaming_dataset"):
        if not getattr(opts, flag):
            raise UsageError(f"--{flag} is required")
    for flag, kind in (("events_subscription", "subscriptions"),
                       ("treatments_subscription", "subscriptions"),
                       ("dead_letter_topic", "topics")):
        value = getattr(opts, flag)
        if value and not model.is_pubsub_path(value, kind):
            raise UsageError(f"--{flag} must be projects/<project>/{kind}/<name>, got {value!r}")
    try:
        spec = model.WindowSpec.of_seconds(opts.window_seconds, opts.period_seconds,
                                           opts.allowed_lateness_seconds)
    except ValueError as err:
        raise UsageError(str(err))
    if opts.dedupe_ttl_seconds < opts.allowed_lateness_seconds:
        raise UsageError("--dedupe_ttl_seconds must be >= --allowed_lateness_seconds: a "
                         "redelivered copy that can still change a window must be caught")
    if min(opts.reference_refresh_seconds, opts.max_runtime_seconds,
           opts.insert_retry_seconds) < 0:
        raise UsageError("--reference_refresh_seconds, --max_runtime_seconds and "
                         "--insert_retry_seconds must be >= 0")
    if common.num_shards < 1:
        raise UsageError("--num_shards must be >= 1")
    if options.view_as(SourceSinkOptions).source != "bigquery":
        require_input_dir(common.input_dir)
    endpoint = options.view_as(BigQueryOptions).bigquery_endpoint
    if endpoint:  # fail in seconds, not after ten minutes of client retries
        why = bigquery.unreachable(endpoint)
        if why:
            raise UsageError(f"--bigquery_endpoint {endpoint} is unreachable ({why}); start "
                             f"the emulator or fix the address")
    try:
        config = load_config(common.config)
    except ConfigError as err:
        raise UsageError(f"--config: {err}")
    project = options.view_as(GoogleCloudOptions).project or (
        opts.streaming_dataset.split(".")[0] if "." in opts.streaming_dataset else None)
    if not project:
        raise UsageError("--project is required (or --streaming_dataset <project>.<dataset>)")
    dataset = opts.streaming_dataset if "." in opts.streaming_dataset else (
        f"{project}.{opts.streaming_dataset}")
    try:   # both are spliced into the latest-row views' SQL
        dataset_project, dataset_name = dataset.split(".", 1)
        dataset = f"{bigquery_project(dataset_project)}.{bigquery_dataset(dataset_name)}"
        if opts.history_table:
            table_name(opts.history_table)
    except ValueError as err:
        raise UsageError(f"--streaming_dataset/--history_table: {err}")
    now = pd.Timestamp.now(tz="UTC")
    run_id = run_id_of(common.run_id, now, JOB)
    try:
        serving = store_from(options)
    except ValueError as err:
        raise UsageError(str(err))
    return StreamingContext(run_id, now, project, dataset, spec, config, BanditConfig(),
                            pd.Timedelta(seconds=opts.dedupe_ttl_seconds), serving)


def reference_of(options: PipelineOptions, ctx: StreamingContext) -> Reference:
    """The reference-data source of a run, checked now so a missing table fails at start-up.

    Files of ``--input_dir``, or with ``--source bigquery`` the batch job's
    input tables (``--bigquery_dataset``, ``--<table>_table``); how their
    versions reach the steps is `delivery_for`'s choice.
    """
    opts = options.view_as(StreamingOptions)
    if options.view_as(SourceSinkOptions).source == "bigquery":
        reference = _bigquery_reference(options, ctx)
    else:
        reference = FileReference(options.view_as(CommonOptions).input_dir, ctx.config,
                                  opts.reference_refresh_seconds, opts.history_table)
        paths = require_tables(reference.input_dir, reference.tables)  # one line, fitment hint
        check_attributes(paths, ctx.config.segment_attributes, ctx.config.fitment_attributes)
        check_attributes(paths, bandit_segments(options), ())   # the bandit's segments, if any
    runner = options.view_as(StandardOptions).runner
    reference.delivery = delivery_for(runner, opts.reference_delivery)
    if reference.delivery == SIDE_INPUT and runner in POLLING_RUNNERS:
        raise UsageError("--reference_delivery side_input does not run on the local "
                         "DirectRunner (its PeriodicImpulse fails in streaming); use poll "
                         "or auto there")
    if reference.delivery == SIDE_INPUT and opts.reference_refresh_seconds < 1:
        raise UsageError("--reference_refresh_seconds must be >= 1 when reference versions "
                         "are a side input (--reference_delivery side_input, or auto on "
                         "Dataflow)")
    return reference


def _bigquery_reference(options: PipelineOptions, ctx: StreamingContext) -> BigQueryReference:
    """The reference tables in BigQuery, each checked to exist (one line naming the first not)."""
    opts = options.view_as(StreamingOptions)
    io_options = options.view_as(SourceSinkOptions)
    unused = [flag for flag, value in (("--sink bigquery", io_options.sink == "bigquery"),
                                        ("--events_since", io_options.events_since),
                                        ("--events_until", io_options.events_until),
                                        ("--treatment_events_table",
                                         io_options.treatment_events_table)) if value]
    if unused:
        raise UsageError(f"{unused[0]} is not used by the streaming job (it writes to "
                         f"--streaming_dataset and reads treatment events from Pub/Sub)")
    try:
        settings = settings_from(options)
        tables = {t: settings.inputs[t] for t in ("catalog", "users", "fitment")}
        if opts.history_table:
            tables[opts.history_table] = (
                settings.inputs["events"] if opts.history_table == "events"
                else parse_table(opts.history_table, settings.project, settings.dataset))
    except ValueError as err:
        raise UsageError(str(err))
    reference = BigQueryReference(tables, settings.project, ctx.config,
                                  opts.reference_refresh_seconds, opts.history_table,
                                  settings.endpoint)
    try:
        columns = reference.columns()
    except FileNotFoundError as err:
        hint = f"; {FITMENT_HINT}" if "(fitment)" in str(err) else ""
        raise UsageError(f"{err}{hint}") from None
    for table, wanted, setting in (
            ("users", ctx.config.segment_attributes, "segment attribute"),
            ("users", ctx.config.fitment_attributes, "fitment attribute"),
            ("fitment", ctx.config.fitment_attributes, "fitment attribute"),
            ("users", bandit_segments(options), "--bandit_segment_by attribute")):
        if table in columns:
            require_columns(table, reference.refs[table].id, columns[table], wanted, setting)
    return reference


def ranker_of(options: PipelineOptions, config: RecsConfig,
              delivery: str = POLL) -> Optional[ModelReference]:
    """The watched ranker artifact of a run (None without ``--ranker_model``), checked now.

    As in the batch job, a missing or unreadable artifact, or one trained on other
    sources than this configuration's mix, fails the launch in one line; one that
    did not beat the blend is reported and not served (the plain mix serves until
    a better artifact appears). ``delivery`` is the reference data's
    (`delivery_for`): the model's versions reach the scoring step the same way.
    """
    opts = options.view_as(StreamingOptions)
    model_path = options.view_as(RankerOptions).ranker_model
    if not model_path:
        return None
    if opts.ranker_refresh_seconds < 0:
        raise UsageError("--ranker_refresh_seconds must be >= 0")
    if delivery == SIDE_INPUT and opts.ranker_refresh_seconds < 1:
        raise UsageError("--ranker_refresh_seconds must be >= 1 when versions are a side "
                         "input (--reference_delivery side_input, or auto on Dataflow)")
    if config.candidates.popularity_only:
        raise UsageError("--ranker_model: the stream serves union rankers over a "
                         "candidates.mix; this configuration's mix is segment_popularity "
                         "alone (re-ranking popularity's pools is the batch job's)")
    ranker = ModelReference(model_path, config, opts.ranker_refresh_seconds)
    ranker.delivery = delivery
    try:
        _, refused = ranker.check()
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(f"--ranker_model: {err}")
    if refused:
        print(f"--ranker_model: {refused}", file=sys.stderr)
    return ranker


def bandit_segments(options: PipelineOptions) -> Tuple[str, ...]:
    """User attributes of the bandit's per-segment arms (``--bandit_segment_by``)."""
    flag = options.view_as(StreamingOptions).bandit_segment_by
    return tuple(a.strip() for a in flag.split(",") if a.strip())


def build(pipeline: beam.Pipeline, options: PipelineOptions, ctx: StreamingContext,
          reference: Reference, ranker: Optional[ModelReference] = None
          ) -> Dict[str, beam.PCollection]:
    """The streaming graph; returns the rows written per table (before BigQuery).

    The Pub/Sub reads carry attributes but no ``timestamp_attribute``: event
    times come from the validated payload (docs/streaming.md).
    """
    opts = options.view_as(StreamingOptions)
    common = options.view_as(CommonOptions)
    spec, config = ctx.spec, ctx.config
    events = (pipeline
              | "ReadEvents" >> ReadFromPubSub(subscription=opts.events_subscription,
                                               with_attributes=True)
              | "ParseEvents" >> ParseMessages("events", config.inputs))
    treatments = (pipeline
                  | "ReadTreatmentEvents" >> ReadFromPubSub(
                      subscription=opts.treatments_subscription, with_attributes=True)
                  | "ParseTreatmentEvents" >> ParseMessages("treatment_events", config.inputs))
    # The reference's versions, once per refresh interval for the whole job
    # (docs/streaming-reference.md); None where each worker polls (the local DirectRunner).
    versions = (pipeline | "ReferenceVersions" >> ReferenceVersions(reference)
                if reference.delivery == SIDE_INPUT else None)
    # The ranker artifact's versions, the same way (one mechanism: reference.Watched).
    ranker_versions = (pipeline | "RankerVersions" >> ModelVersions(ranker)
                       if ranker is not None and ranker.delivery == SIDE_INPUT else None)
    # As in the batch job: unknown SKUs refused before deduplication, the funnel after it.
    known_events = events.rows | "CheckEventSkus" >> CheckSkus("events", reference, versions)
    unique_events = known_events.rows | "DedupeEvents" >> DropDuplicates("events",
                                                                         ctx.dedupe_ttl)
    unique_treatments = treatments.rows | "DedupeTreatmentEvents" >> DropDuplicates(
        "treatment_events", ctx.dedupe_ttl)
    # A send is remembered for a window plus its lateness: the longest a click can still
    # meet its send in one bandit window (docs/streaming.md).
    funnel = unique_treatments.rows | "CheckTreatmentFunnel" >> CheckFunnel(
        spec.size + spec.lateness)

    orders = unique_events.rows | "OrderEvents" >> beam.ParDo(FilterFn(model.is_order))
    popularity = orders | "RollingPopularity" >> WindowedPopularity(spec, reference, config,
                                                                    versions)
    order_audit = orders | "AuditOrderLateness" >> LateDataAudit("orders", spec)
    if opts.ranking_refresh == "on":
        ranking = popularity.first_panes | "RankingChanges" >> RankingChanges(reference, config,
                                                                              spec, versions)
        notices, notice_counts = ranking.rows, [ranking.counts]
    else:
        notices, notice_counts = pipeline | "NoRankingNotices" >> beam.Create([]), []
    requests = ((unique_events.rows, notices)
                | "TouchedUsers" >> TouchedUsers(config))
    # The slot mix's shared tables: the history's plus each window's order lines.
    lines = (None if config.candidates.popularity_only
             else orders | "WindowOrderLines" >> WindowOrderLines(spec))
    recs = requests | "RefreshRecommendations" >> RefreshRecommendations(
        reference, popularity.first_panes, config, spec, common.num_shards, ctx.run_id,
        MODEL_VERSION, lines=lines, ranker=ranker, versions=versions,
        ranker_versions=ranker_versions)

    treatment_keyed = funnel.rows | "TreatmentCounts" >> beam.ParDo(MapFn(treatment_counts))
    bandit = funnel.rows | "RollingBanditState" >> StreamingBandit(
        ctx.bandit, spec, reference, bandit_segments(options), versions)
    treatment_audit = treatment_keyed | "AuditTreatmentLateness" >> LateDataAudit(
        "treatment_events", spec)

    counts = ([events.counts, treatments.counts, known_events.counts, unique_events.counts,
               unique_treatments.counts, funnel.counts]
              + notice_counts
              + [to_global_window(f"{name}CountsToGlobalWindow", pcoll) for name, pcoll in (
                  ("Popularity", popularity.counts), ("OrderAudit", order_audit.counts),
                  ("Refresh", recs.counts), ("Bandit", bandit.counts),
                  ("TreatmentAudit", treatment_audit.counts))]
              | "FlattenCounters" >> beam.Flatten())
    health = ((order_audit.rows, treatment_audit.rows,
               to_global_window("CountersToGlobalWindow",
                                counts | "CountersPerPeriod" >> PeriodCounters(spec.period)))
              | "FlattenHealth" >> beam.Flatten()
              | "StampHealth" >> beam.ParDo(MapFn(stamp), ctx.run_id, "emitted_at"))
    bandit_rows = (frames_to_rows("BanditRows", bandit.rows)
                   | "StampBandit" >> beam.ParDo(MapFn(stamp), ctx.run_id, "generated_at"))
    bandit_dead = frames_to_rows("BanditDeadLetterRows", bandit.dead_letters) | (
        "BanditDeadLetterRecords" >> beam.ParDo(MapFn(lambda r: {**r, "attributes": None})))
    refreshed = to_global_window("RecommendationsToGlobalWindow", recs.rows)
    if ctx.serving is not None:  # each refreshed user, served at once (docs/serving.md)
        refreshed | "WriteServingStore" >> WriteServingUpdates(ctx.serving)
    rows = {
        "recommendation_updates": frames_to_rows("RecommendationRows", refreshed),
        "bandit_state": bandit_rows,
        "streaming_health": health,
    }
    refused = [events.dead_letters, treatments.dead_letters, known_events.dead_letters,
               unique_events.dead_letters, unique_treatments.dead_letters, funnel.dead_letters,
               bandit_dead,
               to_global_window("RefreshDeadLettersToGlobalWindow", recs.dead_letters)]
    fields = {"recommendation_updates": recommendation_fields(config.rules.recs_per_user),
              "bandit_state": BANDIT_FIELDS, "streaming_health": HEALTH_FIELDS}
    for name, pcoll in rows.items():
        refused.append(pcoll
                       | f"{_camel(name)}ToJson" >> beam.ParDo(MapFn(to_bigquery_row))
                       | f"Write{_camel(name)}" >> WriteRows(ctx.table(name), fields[name],
                                                            opts.insert_batch_size,
                                                            opts.insert_retry_seconds))
    dead = (refused | "FlattenDeadLetters" >> beam.Flatten()
            | "StampDeadLetters" >> beam.ParDo(MapFn(stamp), ctx.run_id, "received_at"))
    unwritable = (dead
                  | "DeadLettersToJson" >> beam.ParDo(MapFn(to_bigquery_row))
                  | "WriteStreamingDeadLetter" >> WriteRows(ctx.table("streaming_dead_letter"),
                                                            DEAD_LETTER_FIELDS,
                                                            opts.insert_batch_size,
                                                            opts.insert_retry_seconds))
    # A dead letter BigQuery refuses has nowhere further to go: log and count it.
    unwritable | "LogUnwritableDeadLetters" >> beam.ParDo(MapFn(_log_unwritable))
    if opts.dead_letter_topic:
        (dead
         | "DeadLetterMessages" >> beam.ParDo(MapFn(_dead_letter_message))
         | "PublishDeadLetters" >> WriteToPubSub(opts.dead_letter_topic, with_attributes=True))
    rows["streaming_dead_letter"] = dead
    return rows


def _log_unwritable(row: dict) -> None:
    Metrics.counter(NAMESPACE, "dead_letter.unwritable").inc()
    # The payload may hold e-mails; log where it came from and why, never the record.
    _LOG.error("dead letter refused by BigQuery: table=%s step=%s reason=%s",
               row.get("table"), row.get("step"), row.get("reason"))


def _dead_letter_message(row: dict) -> PubsubMessage:
    """A refused record as a message: the raw payload, with table, step and reason attributes."""
    # Storable text only (dead letters already are; a publish must never be what fails).
    attributes = {k: model.storable(str(row[k])) for k in ("table", "step", "reason", "run_id")
                  if row.get(k)}
    return PubsubMessage(model.storable(row.get("record") or "").encode("utf-8"), attributes)


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def prepare_bigquery(ctx: StreamingContext, config: RecsConfig) -> None:
    """Creates the dataset, the tables (partitioned by time, clustered) and the latest-row views.

    Done by the launcher before the job starts, so the views can be created
    over existing tables and a permission problem fails the launch, not a
    worker. Existing tables and views are kept (replaced views are identical).
    """
    from google.api_core.exceptions import Conflict
    from google.cloud import bigquery as bq

    client = bigquery.client(ctx.project)
    client.create_dataset(ctx.dataset, exists_ok=True)
    fields = {"recommendation_updates": recommendation_fields(config.rules.recs_per_user),
              "bandit_state": BANDIT_FIELDS, "streaming_health": HEALTH_FIELDS,
              "streaming_dead_letter": DEAD_LETTER_FIELDS}
    partition = {"recommendation_updates": ("generated_at", ["user_id"]),
                 "bandit_state": ("generated_at", ["treatment_id"]),
                 "streaming_health": ("emitted_at", ["kind"]),
                 "streaming_dead_letter": ("received_at", ["table"])}
    for name in TABLES:
        table = bq.Table(f"{ctx.dataset}.{name}", schema=[
            bq.SchemaField(f["name"], f["type"], mode=f["mode"]) for f in fields[name]])
        column, clustering = partition[name]
        table.time_partitioning = bq.TimePartitioning(field=column)
        table.clustering_fields = clustering
        try:
            client.create_table(table)
        except Conflict:
            pass
    for view, (source, keys) in VIEWS.items():
        sql = model.latest_rows_sql(f"`{ctx.dataset}.{source}`", keys)
        client.query(f"CREATE OR REPLACE VIEW `{ctx.dataset}.{view}` AS\n{sql}").result()


class Launched(NamedTuple):
    result: beam.runners.runner.PipelineResult
    context: StreamingContext


def launch(argv: Optional[List[str]] = None) -> Launched:
    """Parse options, prepare BigQuery and start the job; returns without waiting."""
    options = PipelineOptions(argv)
    standard = options.view_as(StandardOptions)
    standard.streaming = True
    if standard.runner in (None, "DirectRunner"):
        # The DirectRunner would try Prism first, which cannot run Python's
        # Pub/Sub source; the bundle-based runner is the one that streams it.
        standard.runner = "BundleBasedDirectRunner"
    ctx = context_from(options)
    reference = reference_of(options, ctx)
    ranker = ranker_of(options, ctx.config, reference.delivery)
    bigquery.apply_options(options)
    prepare_bigquery(ctx, ctx.config)
    pipeline = beam.Pipeline(options=options)
    build(pipeline, options, ctx, reference, ranker)
    return Launched(pipeline.run(test_runner_api=runner_api_round_trip(standard.runner)), ctx)


def runner_api_round_trip(runner: Optional[str]) -> Union[bool, str]:
    """Whether ``Pipeline.run`` first rebuilds the graph from its runner-API form.

    Beam does that round trip before a non-portable runner such as the
    bundle-based DirectRunner, and the rebuilt graph holds Beam's own
    `WindowInto` (its DoFn re-inspected for every bundle) instead of the job's
    (`transforms.signatures.WindowInto`). On that runner, and only there, the
    job runs the graph it built; Dataflow and the portable runners translate
    the same graph to the same protos (tests/test_signatures.py checks the
    WindowInto URN and payload) and never run these DoFns themselves.

    Returns:
        False on the bundle-based DirectRunner, else 'AUTO' (Beam's default).
    """
    return False if runner == "BundleBasedDirectRunner" else "AUTO"


def wait(result, seconds: float) -> None:
    """Let a local streaming job run for ``seconds`` (forever if 0), then cancel it.

    Re-raises the job's own failure if it stopped by itself.
    """
    errors: List[BaseException] = []

    def waiter():
        try:
            result.wait_until_finish()
        except BaseException as err:  # noqa: BLE001 (re-raised below, in the caller's thread)
            errors.append(err)

    thread = threading.Thread(target=waiter, name="wait-streaming-job", daemon=True)
    thread.start()
    thread.join(timeout=seconds or None)
    if thread.is_alive():
        result.cancel()
    if errors and not thread.is_alive() and not str(result.state).endswith("CANCELLED"):
        raise errors[0]


def run(argv: Optional[List[str]] = None) -> int:
    """Run the job: on Dataflow submit and return; locally run for --max_runtime_seconds."""
    options = job_options(argv, __name__)  # unknown flags refused before anything starts
    launched = launch(argv)
    runner = options.view_as(StandardOptions).runner
    if runner not in LOCAL_RUNNERS + ("BundleBasedDirectRunner",):
        _LOG.info("submitted streaming run %s", launched.context.run_id)
        return 0
    started = time.monotonic()
    wait(launched.result, options.view_as(StreamingOptions).max_runtime_seconds)
    print(f"streaming run {launched.context.run_id} stopped after "
          f"{time.monotonic() - started:.0f} s; rows in {launched.context.dataset}")
    return 0


def main() -> None:
    entry_point(run)


if __name__ == "__main__":
    main()
