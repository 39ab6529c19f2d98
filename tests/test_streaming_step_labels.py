"""The streaming graph's step labels and output schemas stay what running jobs already have.

Dataflow updates a running streaming job in place only when every step of the
new graph finds its old step by full label (state and in-flight windows are
carried over per step); a renamed step means draining the job and losing its
windows. The BigQuery field lists are pinned for the same reason: the tables
already exist and are kept. ``tests/golden/streaming_step_labels.json`` was
generated from the graph as it was before ``transforms/streaming.py`` became a
package (issue #16) and regenerated once for the keyed-state graph of #16
(docs/streaming-update.md lists the steps that changed: a job launched before it is
drained and relaunched); a change to it must be deliberate (and come with a
Dataflow transform-name mapping), so this test fails on any difference. It pins
Dataflow's graph (update in place is Dataflow's); the local runner's graph lacks
the per-cell ``SumPerPeriod`` (`LOCAL_ONLY_GONE`, checked here too).
Regenerate with ``python tests/test_streaming_step_labels.py --write``.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Dict, List, Optional

import apache_beam as beam
import pandas as pd
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from models import streaming as model  # noqa: E402
from models.bandit import BanditConfig  # noqa: E402
from models.config import DEFAULT_CONFIG, CandidatesConfig  # noqa: E402
from pipelines import streaming_refresh as job  # noqa: E402
from transforms import schemas  # noqa: E402
from transforms.campaign import BANDIT_STATE  # noqa: E402
from transforms.streaming import (BANDIT_FIELDS, DEAD_LETTER_FIELDS, HEALTH_FIELDS,  # noqa: E402
                                  FileReference, ModelReference, dead_letter, delivery_for,
                                  recommendation_fields, stamp)

GOLDEN = os.path.join(ROOT, "tests", "golden", "streaming_step_labels.json")
SUBSCRIPTIONS = ("projects/test-project/subscriptions/events",
                 "projects/test-project/subscriptions/treatment-events")
# Every branch of build(): the ranking refresh on (with a dead-letter topic) and off.
VARIANTS = {"ranking_on_with_topic": ["--dead_letter_topic",
                                      "projects/test-project/topics/dead-letters"],
            "ranking_off": ["--ranking_refresh", "off"],
            # Dataflow's graph: reference versions as a side input (docs/streaming.md).
            "reference_side_input": ["--reference_delivery", "side_input"],
            "tuned_mix": [],
            # Dataflow's graph with every version reader: the bandit's segments and the
            # ranker artifact's versions as a side input too.
            "side_input_ranker_bandit_segments": ["--reference_delivery", "side_input",
                                                  "--bandit_segment_by", "make,model"]}
# A configuration whose candidates.mix is more than segment popularity adds the window's
# order lines (WindowOrderLines) and the mix's refresh DoFn (docs/streaming.md).
VARIANT_CONFIGS = {"tuned_mix": DEFAULT_CONFIG.replace(candidates=CandidatesConfig(mix=(
    ("buy_again", 2), ("also_bought", 1), ("segment_popularity", 1))))}
VARIANT_CONFIGS["side_input_ranker_bandit_segments"] = VARIANT_CONFIGS["tuned_mix"]
VARIANT_RANKED = {"side_input_ranker_bandit_segments"}   # built with a (never read) ranker


def graph_labels(extra: List[str], config=DEFAULT_CONFIG, ranked: bool = False,
                 runner: Optional[str] = "DataflowRunner") -> List[str]:
    """Full labels of every step (composite or primitive) of the streaming graph.

    The graph is the one built for ``runner`` (Dataflow's by default: update in
    place is Dataflow's; the local runner's graph differs by `LOCAL_ONLY_GONE`).
    """
    options = PipelineOptions(["--events_subscription", SUBSCRIPTIONS[0],
                               "--treatments_subscription", SUBSCRIPTIONS[1],
                               "--streaming_dataset", "test-project.recs",
                               "--input_dir", "unused"] + extra)
    options.view_as(StandardOptions).streaming = True
    options.view_as(StandardOptions).runner = runner   # what the graph is built for
    ctx = job.StreamingContext("run", pd.Timestamp("2026-01-01", tz="UTC"), "test-project",
                               "test-project.recs", model.WindowSpec.of_seconds(3600, 60, 600),
                               config, BanditConfig(), pd.Timedelta(seconds=600))
    pipeline = beam.Pipeline(runner="DirectRunner", options=options)   # built, never run
    reference = FileReference("unused", config, 60)
    reference.delivery = delivery_for(None, options.view_as(job.StreamingOptions).reference_delivery)
    ranker = None
    if ranked:
        ranker = ModelReference("unused", config, 60)
        ranker.delivery = reference.delivery
    job.build(pipeline, options, ctx, reference, ranker)
    labels = set()

    class Labels(beam.pipeline.PipelineVisitor):
        def enter_composite_transform(self, node) -> None:
            labels.add(node.full_label)

        def visit_transform(self, node) -> None:
            labels.add(node.full_label)

    pipeline.visit(Labels())
    return sorted(labels)


def current() -> Dict[str, object]:
    """Labels per variant and the BigQuery field lists, as the golden file holds them."""
    return {"labels": {name: graph_labels(extra, VARIANT_CONFIGS.get(name, DEFAULT_CONFIG),
                                          name in VARIANT_RANKED)
                       for name, extra in VARIANTS.items()},
            "fields": {"recommendation_updates_4": recommendation_fields(4),
                       "recommendation_updates_2": recommendation_fields(2),
                       "bandit_state": BANDIT_FIELDS, "streaming_health": HEALTH_FIELDS,
                       "streaming_dead_letter": DEAD_LETTER_FIELDS}}


def _golden() -> Dict[str, object]:
    with open(GOLDEN, encoding="utf-8") as f:
        return json.load(f)


def test_every_step_label_of_the_streaming_graph_is_unchanged():
    golden = _golden()["labels"]
    for name, extra in VARIANTS.items():
        now = set(graph_labels(extra, VARIANT_CONFIGS.get(name, DEFAULT_CONFIG),
                               name in VARIANT_RANKED))
        pinned = set(golden[name])
        assert now == pinned, (f"{name}: steps added {sorted(now - pinned)}, "
                               f"steps gone {sorted(pinned - now)}")


# The local runner's graph has no per-cell SumPerPeriod (`statekeys.sums_per_cell_for`): its
# period cells go straight into CellsPerPeriod. Nothing else differs, and nothing is added.
LOCAL_ONLY_GONE = {"RollingPopularity/SumPerPeriod", "RollingPopularity/SumPerPeriod/GroupByKey",
                   "RollingPopularity/SumPerPeriod/Combine",
                   "RollingPopularity/SumPerPeriod/Combine/ParDo(CombineValuesDoFn)"}


def test_the_local_graph_is_the_pinned_graph_without_the_per_cell_sums():
    golden = _golden()["labels"]
    for name, extra in VARIANTS.items():
        local = set(graph_labels(extra, VARIANT_CONFIGS.get(name, DEFAULT_CONFIG),
                                 name in VARIANT_RANKED, runner=None))
        pinned = set(golden[name])
        assert LOCAL_ONLY_GONE <= pinned, name
        assert local == pinned - LOCAL_ONLY_GONE, (f"{name}: local adds {sorted(local - pinned)}"
                                                   f", lacks {sorted(pinned - local)}")


def test_every_local_runner_name_builds_the_local_graph_and_others_the_pinned_one():
    extra = VARIANTS["ranking_off"]
    pinned = set(_golden()["labels"]["ranking_off"])
    for runner in ("BundleBasedDirectRunner",):
        assert set(graph_labels(extra, runner=runner)) == pinned - LOCAL_ONLY_GONE, runner
    for runner in ("PortableRunner",):
        assert set(graph_labels(extra, runner=runner)) == pinned, runner


def test_the_graph_has_the_steps_update_in_place_matches_on():
    # Guards the golden file itself: it holds the real graph, not an empty list.
    labels = set(_golden()["labels"]["ranking_on_with_topic"])
    for step in ("ParseEvents/ParseAndValidate", "DedupeEvents/FirstCopyOnly",
                 "RollingPopularity/FirstOrderLine", "RollingPopularity/SumPerPeriod",
                 "RollingPopularity/CellsPerWindow", "RankingChanges/PicksChanged",
                 "RefreshRecommendations/GatherPeriod", "CountersPerPeriod/GatherPeriod",
                 "TouchedUsers/UserSignals", "RefreshRecommendations/GatherShard",
                 "CheckTreatmentFunnel/FirstOfEachStage", "AuditOrderLateness/ReconcilePerWindow",
                 "WriteRecommendationUpdates/StreamingInsert", "PublishDeadLetters"):
        assert step in labels


def test_bigquery_field_lists_of_the_streaming_tables_are_unchanged():
    assert current()["fields"] == _golden()["fields"]


def _names(fields) -> list:
    return [f["name"] for f in fields]


def test_streaming_tables_extend_the_batch_schemas_they_share():
    # One schema per concept: the stream's tables are the batch ones plus its own columns.
    batch_recs = _names(schemas.bigquery_fields(schemas.recommendations(4)))
    assert [n for n in _names(recommendation_fields(4)) if n in batch_recs] == batch_recs
    assert _names(BANDIT_FIELDS)[:len(BANDIT_STATE)] == BANDIT_STATE.names
    assert _names(DEAD_LETTER_FIELDS)[:len(schemas.DEAD_LETTER)] == schemas.DEAD_LETTER.names


def test_a_stamped_dead_letter_row_has_exactly_the_dead_letter_table_columns():
    row = stamp(dead_letter("events", "ParseMessages", "bad json", b"{", {"k": "v"}),
                "run", "received_at")
    assert sorted(row) == sorted(_names(DEAD_LETTER_FIELDS))


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        with open(GOLDEN, "w", encoding="utf-8") as f:
            json.dump(current(), f, indent=1, sort_keys=True)
            f.write("\n")
        print(f"wrote {GOLDEN}")
