"""Composites of the streaming refresh job: thin Beam adapters over models/streaming.py.

Reading order of the graph (pipelines/streaming_refresh.py wires it):

    Pub/Sub messages → ParseMessages (contract check, event-time timestamps, dead letters)
      → events: CheckSkus (unknown SKUs dead-lettered, as the batch job does)
      → DropDuplicates (stateful per event_id, TTL timer)
      → orders → WindowedPopularity (order lines once, keyed; decayed cells per (level, segment,
                 sku) summed per period, slid, summed per window, scored at the window's end)
               → RankingChanges (consecutive windows paired per window end; keyed per
                 vehicle: users of vehicles whose top picks moved)
      → events + notices → TouchedUsers (stateful per user: recent stream events)
      → RefreshRecommendations (keyed per user shard, held until the period ends in event
                 time by a timer; scored like the batch job)
    treatment events → CheckFunnel (stateful per recipient: no send, no count; as batch)
      → StreamingBandit (per-period sums → transforms.bandit.BanditState)
    orders, treatment counts → LateDataAudit (seen vs included per window: late and too-late)

Nothing a message holds can stop the job: every refusal is a dead letter with
a reason (storable: escaped, bounded), and every keyed step refuses a key
Beam could not encode instead of failing its bundle.

Slowly changing inputs (catalogue, fitment, users, order history; the ranker
artifact) are watched sources (`reference.Watched`): every DoFn that needs them
asks for the version in force, a windowed side input of a PeriodicImpulse on
Dataflow and polled on the local DirectRunner (docs/streaming.md, "Reference
data"), and the data is re-read once per process when the fingerprint changes.

One module per concern; this package re-exports every public name, so
``from transforms.streaming import X`` keeps working:

    windows     event-time windows, triggers, time conversions
    refusals    the dead-letter row and its counters, safe keying, the `Checked` shape
    reference   `Reference` (files, BigQuery), its versions side input, the per-process cache
    parse       `ParseMessages`: Pub/Sub messages → timestamped records
    dedupe      `DropDuplicates`: keyed state per event id
    statekeys   per-event state keys per runner: natural keys, or buckets locally
    checks      `CheckSkus`, `CheckFunnel`: the batch job's checks, event by event
    popularity  `WindowedPopularity`
    ranking     `RankingChanges`: vehicles whose picks moved between consecutive windows
    audit       `LateDataAudit`
    refresh     `TouchedUsers`, `RefreshRecommendations`
    sources     `WindowOrderLines` (the mix's window lines), `ModelReference` (watched ranker)
    bandit      `StreamingBandit`
    health      `PeriodCounters`
    tables      BigQuery fields of the output tables, row stamping, `WriteRows`

Step labels are those of the single module this package replaced
(tests/test_streaming_step_labels.py pins them: Dataflow's update in place
matches steps by label).
"""
from transforms.health import Count
from transforms.streaming.audit import (AuditKey, AuditOut, AuditUpdate, LateDataAudit,
                                        PaneCountFn, ReconcileWindowFn, SeenPerWindowFn)
from transforms.streaming.bandit import StreamingBandit, treatment_counts
from transforms.streaming.checks import CheckFunnel, CheckSkus, CheckSkusFn, FunnelStateFn
from transforms.streaming.dedupe import DropDuplicateIdsFn, DropDuplicates
from transforms.streaming.health import PeriodCounters, PeriodSumsFn, PreSumPerBundleFn
from transforms.streaming.parse import ParseMessages, ParseMessagesFn, Parsed
from transforms.streaming.popularity import (DecayedCountFn, FirstOrderLineFn, MergeCellsFn,
                                             PopularityAtWindowEndFn, PopularityOut,
                                             SegmentWeightsFn,
                                             WindowedPopularity, WindowPopularity)
from transforms.streaming.ranking import (Notice, NotifyUsersFn, PicksChangedFn, RankingChanges,
                                          VehiclePicksFn)
from transforms.streaming.reference import (BigQueryReference, FileReference, Reference,
                                            ReferenceVersion, ReferenceVersions, Watched,
                                            WatchedVersions, cached, delivery_for,
                                            version_side_input)
from transforms.streaming.refresh import (GatherPeriodFn, RefreshRecommendations, Refreshed,
                                          RefreshShardFn,
                                          Touch, TouchedUsers, UserSignalsFn, event_touch,
                                          shard_of_user)
from transforms.streaming.refusals import (Checked, DeadLetter, KeyOrRefuseFn, Record,
                                           RowsAndCounts, dead_letter, record_text,
                                           refusal_counts)
from transforms.streaming.sources import (EarliestLinesFn, ModelReference, ModelVersions,
                                          WindowLines, WindowOrderLines)
from transforms.streaming.tables import (BANDIT_FIELDS, DEAD_LETTER_FIELDS, HEALTH_FIELDS,
                                         WriteRows, frames_to_rows, recommendation_fields,
                                         stamp, to_bigquery_row)
from transforms.streaming.windows import (period_buckets, sliding_windows, to_global_window,
                                          windowed)

__all__ = [
    "AuditKey", "AuditOut", "AuditUpdate", "BANDIT_FIELDS", "BigQueryReference",
    "CheckFunnel", "CheckSkus",
    "CheckSkusFn", "Checked", "Count", "DEAD_LETTER_FIELDS", "DeadLetter", "DecayedCountFn",
    "DropDuplicateIdsFn", "DropDuplicates", "FileReference", "FirstOrderLineFn",
    "FunnelStateFn", "GatherPeriodFn", "HEALTH_FIELDS", "KeyOrRefuseFn", "LateDataAudit",
    "MergeCellsFn", "Notice", "NotifyUsersFn", "PaneCountFn", "ParseMessages",
    "ParseMessagesFn", "Parsed", "PeriodCounters", "PeriodSumsFn", "PicksChangedFn",
    "PopularityAtWindowEndFn", "PopularityOut", "PreSumPerBundleFn", "RankingChanges",
    "ReconcileWindowFn", "Record", "Reference", "ReferenceVersion", "ReferenceVersions",
    "RefreshRecommendations", "RefreshShardFn", "Refreshed",
    "RowsAndCounts", "SeenPerWindowFn", "SegmentWeightsFn", "StreamingBandit", "Touch",
    "TouchedUsers", "UserSignalsFn", "VehiclePicksFn", "WindowPopularity",
    "WindowedPopularity", "WriteRows", "cached", "dead_letter", "delivery_for", "event_touch",
    "frames_to_rows", "period_buckets", "recommendation_fields", "record_text",
    "refusal_counts", "shard_of_user", "sliding_windows", "stamp", "to_bigquery_row",
    "to_global_window", "treatment_counts", "version_side_input", "windowed",
]
__all__ += ["EarliestLinesFn", "ModelReference", "WindowLines", "WindowOrderLines"]
__all__ += ["ModelVersions", "Watched", "WatchedVersions"]
