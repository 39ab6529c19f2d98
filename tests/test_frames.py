"""Bounded shuffles (transforms/frames.py): shard counts follow the data, hot keys are salted.

Small generated inputs and a small bound, so the bound is crossed in a second.
"""
import json
import os

import apache_beam as beam
import duckdb
import numpy as np
import pandas as pd
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipelines import batch_recommendations, generate_world
from transforms.io import read_frame
from transforms.frames import (COPIES, METRICS_NAMESPACE, CoGroupFrames, GroupFrames, Sharding,
                               owned)


def _frames(n_rows: int, n_keys: int, batch: int = 250, seed: int = 0):
    rng = np.random.default_rng(seed)
    keys = rng.integers(0, n_keys, n_rows)
    rows = pd.DataFrame({"user_id": [f"u{k}" for k in keys], "value": np.arange(n_rows)})
    return [rows.iloc[i:i + batch].reset_index(drop=True) for i in range(0, n_rows, batch)]


def _element_rows(n_rows: int, sharding) -> list:
    """Rows of every element ``GroupFrames`` emits, read back from its distribution metric."""
    p = TestPipeline()
    grouped = (p | beam.Create(_frames(n_rows, n_keys=n_rows // 3))
               | GroupFrames(["user_id"], sharding))
    assert_that(grouped | beam.MapTuple(lambda shard, frame: len(frame))
                | beam.CombineGlobally(sum), equal_to([n_rows]))
    assert_that(grouped | "KeysWhole" >> beam.FlatMapTuple(
        lambda shard, frame: frame["user_id"].unique().tolist())
        | beam.combiners.Count.PerElement() | beam.Values() | beam.Distinct(),
        equal_to([1]), label="EachKeyInOneElement")
    result = p.run()
    result.wait_until_finish()
    found = result.metrics().query(MetricsFilter().with_namespace(METRICS_NAMESPACE))
    rows = [d.committed for d in found["distributions"] if d.key.metric.name == "element_rows"]
    assert len(rows) == 1
    return rows[0]


def test_largest_element_stays_under_the_bound_as_input_grows():
    bound = 400
    for n_rows in (1_000, 4_000, 16_000):
        rows = _element_rows(n_rows, Sharding(min_shards=2, max_rows=bound))
        assert rows.sum == n_rows
        assert rows.max <= bound, (n_rows, rows)
        # shards follow the data: ceil(rows / (bound / 2)), never fewer than the minimum
        assert rows.count >= 0.9 * n_rows / (bound // 2)
    # An int is the minimum shard count with the default bound: small runs shard as before.
    fixed = _element_rows(4_000, 2)
    assert fixed.count == 2 and fixed.max > bound


def test_each_key_meets_in_one_element_with_the_same_shard_count_for_every_input():
    users = pd.DataFrame({"user_id": [f"u{i}" for i in range(3_000)], "name": "x"})
    events = pd.DataFrame({"uid": [f"u{i % 3_000}" for i in range(9_000)], "n": 1})
    with TestPipeline() as p:
        grouped = ({"users": p | "U" >> beam.Create([users.iloc[:1500], users.iloc[1500:]]),
                    "events": p | "E" >> beam.Create([events.iloc[i:i + 1000]
                                                       for i in range(0, 9_000, 1000)])}
                   | CoGroupFrames({"users": ["user_id"], "events": ["uid"]},
                                   Sharding(2, max_rows=1_000)))
        per_key = grouped | beam.FlatMapTuple(lambda shard, g: [
            (u, len(g["events"][g["events"]["uid"] == u]) if len(g["events"].columns) else 0)
            for u in g["users"]["user_id"]] if len(g["users"].columns) else [])
        assert_that(per_key, equal_to([(f"u{i}", 3) for i in range(3_000)]))
        assert_that(grouped | beam.MapTuple(
            lambda shard, g: sum(len(f) for f in g.values()) <= 1_000)
            | beam.combiners.Count.PerElement(), equal_to([(True, 24)]), label="Bounded")


def _vehicle_world():
    """2,000 users of vehicle A (hot), 60 of B and C, 40 users of no vehicle; fitment 5 each."""
    vehicles = ["A"] * 2_000 + ["B"] * 60 + ["C"] * 60 + [None] * 40
    users = pd.DataFrame({"user_id": [f"u{i}" for i in range(len(vehicles))],
                          "vehicle": vehicles})
    fitment = pd.DataFrame({"vehicle": np.repeat(["A", "B", "C"], 5),
                            "sku": [f"{v}{i}" for v in "ABC" for i in range(5)]})
    return users, fitment


class _ScoreFn(beam.DoFn):
    """A consumer like RecommendShardFn: each user's fitting SKUs; owned fitment counted."""

    def process(self, element):
        shard, groups = element
        users, fitment = groups["users"], groups["fitment"]
        own = owned(groups, "fitment")
        yield beam.pvalue.TaggedOutput("owned", len(own))
        yield beam.pvalue.TaggedOutput("rows", len(users) + len(fitment))
        yield beam.pvalue.TaggedOutput("keys", sorted(set(users["vehicle"].dropna()))
                                       if len(users.columns) else [])
        assert not any(name.endswith(COPIES) and name[:-len(COPIES)] not in groups
                       for name in groups)
        if not len(users.columns):
            return
        fits = ({} if not len(fitment.columns) else
                {v: tuple(sorted(g)) for v, g in fitment.groupby("vehicle")["sku"]})
        for user, vehicle in zip(users["user_id"], users["vehicle"]):
            yield user, fits.get(vehicle, ())


def test_a_hot_key_is_split_over_salted_sub_keys_and_recombined_exactly():
    users, fitment = _vehicle_world()
    expected = [(u, tuple(sorted(fitment.loc[fitment["vehicle"] == v, "sku"]))
                 if v is not None else ()) for u, v in zip(users["user_id"], users["vehicle"])]
    bound = 800     # hot above 200 users: vehicle A (2,000) is cut into 10 slices
    p = TestPipeline()
    out = ({"users": p | "U" >> beam.Create([users.iloc[i:i + 300]
                                             for i in range(0, len(users), 300)]),
            "fitment": p | "F" >> beam.Create([fitment])}
           | CoGroupFrames({"users": ["vehicle"], "fitment": ["vehicle"]},
                           Sharding(min_shards=2, max_rows=bound), salt={"users": ["user_id"]})
           | beam.ParDo(_ScoreFn()).with_outputs("owned", "rows", "keys", main="scored"))
    assert_that(out.scored, equal_to(expected))
    assert_that(out.owned | "SumOwned" >> beam.CombineGlobally(sum), equal_to([len(fitment)]),
                label="FitmentCountedOnce")
    assert_that(out.rows | "MaxRows" >> beam.CombineGlobally(max),
                lambda got: _check(got[0] <= bound, got), label="UnderBound")
    assert_that(out.keys | "SlicesOfA" >> beam.Map(lambda ks: int("A" in ks))
                | "CountA" >> beam.CombineGlobally(sum),
                lambda got: _check(got[0] >= 5, got), label="HotKeySplit")
    result = p.run()
    result.wait_until_finish()
    dists = result.metrics().query(MetricsFilter().with_namespace(METRICS_NAMESPACE))
    rows = [d.committed for d in dists["distributions"] if d.key.metric.name == "element_rows"]
    assert rows and max(d.max for d in rows) <= bound
    assert sum(d.sum for d in rows) >= len(users) + len(fitment)


def _check(ok: bool, got) -> None:
    if not ok:
        raise AssertionError(got)


def test_without_salt_the_hot_key_stays_whole():
    """The control: the same input unsalted puts all 2,000 users of A in one element."""
    users, fitment = _vehicle_world()
    with TestPipeline() as p:
        largest = ({"users": p | "U" >> beam.Create([users]),
                    "fitment": p | "F" >> beam.Create([fitment])}
                   | CoGroupFrames({"users": ["vehicle"], "fitment": ["vehicle"]},
                                   Sharding(min_shards=2, max_rows=800))
                   | beam.MapTuple(lambda s, g: len(g["users"]))
                   | beam.CombineGlobally(max))
        assert_that(largest, equal_to([2_000]))


def test_sharding_rejects_nonsense():
    with pytest.raises(ValueError):
        Sharding(0)
    with pytest.raises(ValueError):
        Sharding(4, max_rows=2)
    assert Sharding(16, 200_000).shards_for(None) == 16
    assert Sharding(16, 200_000).shards_for(10_000_000) == 100


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("world"))
    generate_world.main(["--preset", "tiny", "--seed", "5", "--out", out, "--bad_rows", "2"])
    with open(os.path.join(out, "world.json")) as handle:
        return out, json.load(handle)["as_of"]


def _published(world, tmp_path, name, *extra):
    world_dir, as_of = world
    warehouse = str(tmp_path / f"{name}.duckdb")
    code = batch_recommendations.run([
        "--input_dir", world_dir, "--warehouse", warehouse, "--as_of", as_of,
        "--num_shards", "4", "--run_id", "same", *extra])
    with duckdb.connect(warehouse, read_only=True) as con:
        recs = con.execute("SELECT * EXCLUDE (generated_at) FROM recommendations "
                           "ORDER BY user_id").df()
        dead = con.execute("SELECT \"table\", reason, count(*) AS n FROM dead_letter "
                           "GROUP BY ALL ORDER BY ALL").df()
        qa = con.execute("SELECT rule_id, violations, value FROM qa_checks ORDER BY rule_id").df()
        runs = con.execute("SELECT status, users_read, eligible_users, recommendations_written, "
                           "dead_lettered, deduplicated, qa_violations, counters "
                           "FROM pipeline_runs").df()
    return code, recs, dead, qa, runs


def test_a_tiny_bound_salts_and_reshards_without_changing_the_output(world, tmp_path):
    """Hundreds of shards and salted vehicles give the same published rows and counts."""
    users, _ = read_frame(world[0], "users")
    per_vehicle = users.groupby(["make", "model", "year"]).size()
    assert per_vehicle.max() > Sharding(4, 400).hot_rows   # so salting is exercised
    base = _published(world, tmp_path, "base")
    tight = _published(world, tmp_path, "tight", "--max_rows_per_element", "400")
    assert base[0] == tight[0] == 0
    pd.testing.assert_frame_equal(base[1], tight[1])
    pd.testing.assert_frame_equal(base[2], tight[2])
    pd.testing.assert_frame_equal(base[3], tight[3])
    base_runs, tight_runs = base[4].iloc[0].to_dict(), tight[4].iloc[0].to_dict()
    assert json.loads(base_runs.pop("counters")) == json.loads(tight_runs.pop("counters"))
    assert base_runs == tight_runs
    assert len(base[1]) > 1_000
