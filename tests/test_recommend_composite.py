"""The ``Recommend`` composite and its handlers (#14): one scoring path for every job.

- The handler called in one process (``recommend_history``, what ``pipelines.tune`` and the
  streaming refresh can call) gives the batch job's output, user for user.
- The composite under ``TestPipeline`` gives the in-process handler's output with a mix,
  the trending boost and carts switched on.
- Hand-computed: the trending boost at its edge, and carts feeding also-bought.
"""
import json

import apache_beam as beam
import duckdb
import numpy as np
import pandas as pd
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from models import candidates, contracts
from models.catalog import resolve_conflicts
from models.config import (AlsoBoughtConfig, CandidatesConfig, RecsConfig, TrendingConfig)
from models.config_file import load_config
from models.recommend import rec_columns, slot_source_columns
from models.recommend_handler import prepare_history, recommend_history
from pipelines import batch_recommendations
from transforms.io import read_frame

AS_OF = pd.Timestamp("2026-03-01", tz="UTC")


def _inputs(world_dir):
    catalog = resolve_conflicts(read_frame(world_dir, "catalog")[0]).catalog
    known = lambda f: f.loc[~contracts.unknown_sku_mask(f["sku"], catalog["sku"])]
    events = known(read_frame(world_dir, "events")[0]).reset_index(drop=True)
    fitment = known(read_frame(world_dir, "fitment")[0]).reset_index(drop=True)
    users = read_frame(world_dir, "users")[0]
    return catalog, users, events, fitment


def _sorted(frame, columns):
    return frame[columns].sort_values("user_id").reset_index(drop=True)


def test_handler_in_one_process_equals_the_batch_job(clean_world, tmp_path):
    world_dir, manifest = clean_world
    as_of = pd.Timestamp(manifest["as_of"])
    warehouse = str(tmp_path / "w.duckdb")
    assert batch_recommendations.run([
        "--input_dir", world_dir, "--warehouse", warehouse, "--as_of", manifest["as_of"],
        "--num_shards", "4", "--run_id", "batch"]) == 0
    with duckdb.connect(warehouse, read_only=True) as con:
        job = con.execute("SELECT * FROM recommendations").df()
    catalog, users, events, fitment = _inputs(world_dir)
    config = load_config(None)
    scored = recommend_history(prepare_history(users, events, as_of, config), catalog,
                               fitment, as_of, config)
    assert len(job) > 100 and set(scored.violations.values()) == {0}
    columns = [c for c in rec_columns(config.rules.recs_per_user) if "score" not in c]
    got, want = _sorted(scored.rows, columns), _sorted(job, columns)
    pd.testing.assert_frame_equal(got.astype(str), want.astype(str))
    scores = [f"rec{i}_score" for i in range(1, config.rules.recs_per_user + 1)]
    np.testing.assert_allclose(_sorted(scored.rows, ["user_id", *scores])[scores].to_numpy(float),
                               _sorted(job, ["user_id", *scores])[scores].to_numpy(float),
                               rtol=1e-9)


def test_composite_equals_the_handler_with_mix_boost_and_carts(clean_world):
    from transforms.recommend_composite import Recommend

    world_dir, manifest = clean_world
    as_of = pd.Timestamp(manifest["as_of"])
    catalog, users, events, fitment = _inputs(world_dir)
    config = RecsConfig(candidates=CandidatesConfig(
        mix=(("buy_again", 1), ("also_bought", 2), ("segment_popularity", 1)),
        also_bought=AlsoBoughtConfig(similarity="count"),
        trending=TrendingConfig(min_count=1, boost_sources=("also_bought",
                                                            "segment_popularity"))))
    history = prepare_history(users, events, as_of, config)
    expected = recommend_history(history, catalog, fitment, as_of, config)
    assert set(expected.violations.values()) == {0}
    counters = dict(expected.counters)
    assert counters["slots.source.also_bought"] > 0 and counters["slots.source.buy_again"] > 0
    n = config.rules.recs_per_user
    columns = ["user_id"] + [f"rec_part_{i}" for i in range(1, n + 1)] + slot_source_columns(n)
    key = lambda f: sorted(map(tuple, f[columns].astype(str).to_numpy().tolist()))
    half = len(history.lines) // 2
    with TestPipeline() as p:
        out = ({"users": p | "Users" >> beam.Create([history.profiles]),
                "lines": p | "Lines" >> beam.Create([history.lines.iloc[:half],
                                                     history.lines.iloc[half:]]),
                "fitment": p | "Fitment" >> beam.Create([fitment]),
                "events": p | "Events" >> beam.Create([events])}
               | "Recommend" >> Recommend(p | "Catalog" >> beam.Create([catalog]), as_of,
                                          config, "composite-test", 3))
        got = (out.rows | beam.combiners.ToList()
               | beam.Map(lambda fs: key(pd.concat(fs, ignore_index=True))))
        assert_that(got, equal_to([key(expected.rows)]))
        carts = (out.counts | beam.Filter(lambda kv: kv[0] == "candidates.also_bought.cart_skus")
                 | beam.Map(lambda kv: kv[1]) | "SumCarts" >> beam.CombineGlobally(sum))
        assert_that(carts, lambda got: _positive(got), label="CartsCounted")


def _positive(values):
    assert len(values) == 1 and values[0] > 0, values


def _lines(rows):
    frame = pd.DataFrame(rows, columns=["user_id", "order_id", "sku", "days_ago"])
    frame["event_time"] = AS_OF - pd.to_timedelta(frame.pop("days_ago"), unit="D")
    return frame


def _trend_world(recent_x: int):
    """Similarity u bought A → X 1.0, → Y 1.1 (by hand). X: ``recent_x`` orders in the
    last 28 days against 2 before; Y: flat."""
    rows = [("u", "ou", "A", 1)]
    rows += [(f"p{i}", f"px{i}", "X", 40) for i in range(2)]  # previous period
    rows += [(f"r{i}", f"rx{i}", "X", 10) for i in range(recent_x)]  # recent period
    rows += [(f"y{i}", f"y{i}{d}", "Y", d) for i in range(2) for d in (10, 40)]
    lines = _lines(rows)
    table = pd.DataFrame({"sku": ["A", "A"], "neighbour": ["X", "Y"], "similarity": [1.0, 1.1]})
    return lines, table


@pytest.mark.parametrize("recent_x, first", [(3, "X"), (2, "Y")])
def test_trending_boost_edge_reorders_also_bought(recent_x, first):
    """3 recent orders against 2 is exactly +50% (boosted: 1.0 × 1.2 = 1.2 > 1.1); 2 against 2
    is 0% (not boosted: 1.0 < 1.1). Undecayed (half_life None) so the counts are exact."""
    lines, table = _trend_world(recent_x)
    trend = candidates.trending(lines, AS_OF, 28, 3, 0.5, 0.2, half_life_days=None)
    boost = trend.loc[trend["multiplier"] > 1, ["sku", "multiplier"]]
    assert boost["sku"].tolist() == (["X"] if recent_x == 3 else [])
    config = CandidatesConfig(mix=(("also_bought", 4),), trending=TrendingConfig(
        min_count=3, boost_sources=("also_bought",)))
    tables = candidates.SharedTables(pd.DataFrame({"sku": [], "interval_days": [], "gaps": []}),
                                     candidates.ItemSimilarity(table, 1, 0, 2, 2, 2), None,
                                     None, boost)
    found = candidates.personal_candidates(lines, ["u"], AS_OF, config, tables, 10)
    got = found.loc[found["source"] == "also_bought"]
    decayed = 0.5 ** (1 / 30)  # u's affinity to A, bought a day ago (30-day half-life)
    assert got["sku"].tolist()[0] == first
    score_x = got.set_index("sku")["score"]["X"]
    assert score_x == pytest.approx(decayed * (1.2 if recent_x == 3 else 1.0))


def test_shared_tables_boost_uses_min_count_and_growth():
    lines, _ = _trend_world(3)
    config = CandidatesConfig(mix=(("segment_popularity", 4),), trending=TrendingConfig(
        min_count=3, boost_sources=("segment_popularity",)))
    assert not config.popularity_only  # a boost takes the mix path
    boost = candidates.shared_tables(lines, AS_OF, config).boost
    assert boost["sku"].tolist() == ["X"] and boost["multiplier"].tolist() == [1.2]
    strict = CandidatesConfig(mix=config.mix, trending=TrendingConfig(
        min_count=4, boost_sources=("segment_popularity",)))
    assert candidates.shared_tables(lines, AS_OF, strict).boost.empty


def test_carts_feed_also_bought_with_a_cap():
    """v bought nothing and carted A and B: score(C) = 1·0.4 + 1·0.5; capped at one cart: A."""
    lines = _lines([("u", "o1", "A", 1)])
    table = pd.DataFrame({"sku": ["A", "B"], "neighbour": ["C", "C"], "similarity": [0.4, 0.5]})
    profiles = pd.DataFrame({"user_id": ["u", "v"], "carted": [(), ("A", "B")]})
    tables = candidates.SharedTables(pd.DataFrame({"sku": [], "interval_days": [], "gaps": []}),
                                     candidates.ItemSimilarity(table, 1, 0, 2, 2, 2), None)
    config = CandidatesConfig(mix=(("also_bought", 4),))
    for cap, want in ((2, 0.9), (1, 0.4)):
        carts = candidates.cart_affinity(profiles, 1.0, cap)
        assert len(carts) == cap
        found = candidates.personal_candidates(lines, ["u", "v"], AS_OF, config, tables, 10,
                                               carts)
        v = found.loc[(found["user_id"] == "v") & (found["source"] == "also_bought")]
        assert v["sku"].tolist() == ["C"] and v["score"].iloc[0] == pytest.approx(want)
    assert candidates.cart_affinity(profiles, 0.0, 5).empty  # weight 0: carts ignored


def test_boost_sources_are_discovery_sources_only():
    with pytest.raises(ValueError, match="discovery sources only"):
        TrendingConfig(boost_sources=("buy_again",))


def test_also_bought_with_carts_excludes_purchases_beyond_the_history_cap():
    """u bought A, B, C, E (E oldest); the cap keeps A and B for affinity, but C (a neighbour)
    and E (in no similarity row) are still 'seen'."""
    lines = _lines([("u", "o1", "A", 1), ("u", "o2", "B", 2), ("u", "o3", "C", 3),
                    ("u", "o4", "E", 4)])
    table = pd.DataFrame({"sku": ["A", "A"], "neighbour": ["C", "D"], "similarity": [1.0, 0.5]})
    carts = pd.DataFrame({"user_id": ["u"], "sku": ["A"], "weight": [1.0]})
    got = candidates.also_bought_scores(lines, table, AS_OF, max_history=2, carts=carts)
    assert got["sku"].tolist() == ["D"]
