"""End to end: the backtest job beside the two SQL baselines, at k=4 and k=10 (#14)."""
import json
import os

import duckdb
import numpy as np
import pandas as pd
import pytest

from models import baselines, metrics
from models.mix import paired_interval
from pipelines import backtest, generate_world

STRATEGIES = ["global", "segment", "sql_global_popularity", "sql_own_then_popular"]


def _world(tmp_path_factory, preset: str, seed: int):
    world = str(tmp_path_factory.mktemp(f"{preset}_world"))
    generate_world.main(["--preset", preset, "--seed", str(seed), "--out", world,
                         "--bad_rows", "2"])
    with open(os.path.join(world, "world.json")) as handle:
        return world, json.load(handle)["as_of"]


def _table(warehouse: str) -> pd.DataFrame:
    with duckdb.connect(warehouse, read_only=True) as con:
        return con.execute("SELECT * FROM backtest").df()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny world backtested at the default k (4) and at k=10 into one warehouse."""
    world, as_of = _world(tmp_path_factory, "tiny", 11)
    work = tmp_path_factory.mktemp("tiny_backtest")
    warehouse = str(work / "warehouse.duckdb")
    # At k=10 one seat cover reaches 98% of the tiny world's lists: over the publishing
    # concentration gate (0.9, #13), which is about publishing, not this comparison.
    config = work / "gates.yaml"
    config.write_text("gates:\n  max_sku_user_share: 1.0\n")
    common = ["--input_dir", world, "--as_of", as_of, "--warehouse", warehouse,
              "--num_shards", "2", "--config", str(config)]
    assert backtest.main(common) == 0
    assert backtest.main(common + ["--k", "10"]) == 0
    return dict(world=world, as_of=as_of, table=_table(warehouse))


@pytest.mark.parametrize("k", [4, 10])
def test_one_row_per_strategy_and_baseline_at_each_k(tiny, k):
    table = tiny["table"].loc[tiny["table"]["k"] == k].set_index("strategy")
    assert sorted(table.index) == sorted(STRATEGIES)
    for column in ("precision_at_k", "recall_at_k", "ndcg_at_k", "map_at_k", "hit_rate",
                   "coverage"):
        assert ((table[column] >= 0) & (table[column] <= 1)).all(), column
    assert (table["avg_price"] > 0).all()
    assert table["buyers_in_holdout"].nunique() == 1      # the same people for everyone
    assert table.loc["global", "share_global"] == 1.0
    assert table.loc[["sql_global_popularity", "sql_own_then_popular"], "kind"].eq(
        "sql baseline").all()
    assert table.loc[["global", "segment"], "mix"].eq(f"segment_popularity:{k}").all()
    # global popularity is one list: k distinct SKUs for everyone
    assert table.loc["sql_global_popularity", "coverage"] * 1500 == pytest.approx(k, abs=0.5)
    # the baseline against itself: a zero difference
    base = table.loc["sql_own_then_popular"]
    assert base["precision_vs_baseline"] == 0.0
    for name in STRATEGIES:
        row = table.loc[name]
        assert row["precision_vs_baseline"] == pytest.approx(
            row["precision_at_k"] - base["precision_at_k"])
        assert row["precision_vs_baseline_low"] <= row["precision_vs_baseline"] \
            <= row["precision_vs_baseline_high"]


def test_longer_lists_find_more_of_what_was_bought(tiny):
    table = tiny["table"].set_index(["k", "strategy"])
    for name in STRATEGIES:
        assert table.loc[(10, name), "recall_at_k"] > table.loc[(4, name), "recall_at_k"], name
        assert table.loc[(10, name), "hit_rate"] >= table.loc[(4, name), "hit_rate"], name


def test_baseline_rows_are_the_sql_lists_scored_by_the_metric_code(tiny):
    """Recomputed outside the job: the SQL baseline's lists, the holdout, the same metrics."""
    world, as_of = tiny["world"], pd.Timestamp(tiny["as_of"])
    from models.catalog import CatalogArrays, resolve_conflicts
    from models.config import DEFAULT_CONFIG
    from transforms.io import read_frame
    catalog = resolve_conflicts(read_frame(world, "catalog")[0]).catalog
    arrays = CatalogArrays.build(catalog, DEFAULT_CONFIG.rules)
    lists = baselines.baseline_lists(world, as_of, 10, arrays.sku[arrays.eligible])
    future = backtest.holdout_purchases(world)
    prices = dict(zip(arrays.sku, arrays.price))
    own = metrics.evaluate_lists(lists["sql_own_then_popular"], future, 10, len(arrays.sku),
                                 prices)
    popular = metrics.evaluate_lists(lists["sql_global_popularity"], future, 10,
                                     len(arrays.sku), prices)
    row = tiny["table"].set_index(["k", "strategy"]).loc[(10, "sql_global_popularity")]
    assert row["precision_at_k"] == pytest.approx(popular["precision_at_k"])
    assert row["map_at_k"] == pytest.approx(popular["map_at_k"])
    vs = paired_interval(popular["per_user_precision"], own["per_user_precision"])
    assert row["precision_vs_baseline_low"] == pytest.approx(vs["low"])
    assert row["precision_vs_baseline_high"] == pytest.approx(vs["high"])
    # own purchases come first: a user's slot 1 is something they bought before as_of
    first = lists["sql_own_then_popular"].query("slot == 1 and score > 0")
    assert len(first) > 100
    assert np.isfinite(own["per_user_precision"]).all()


def test_a_bad_k_is_a_one_line_usage_error(tiny, tmp_path):
    from pipelines.jobs import UsageError
    common = ["--input_dir", tiny["world"], "--as_of", tiny["as_of"],
              "--warehouse", str(tmp_path / "w.duckdb")]
    with pytest.raises(UsageError, match="--k must be >= 1"):
        backtest.main(common + ["--k", "0"])
    # a mix of several sources fixes its slot count: another k needs another mix
    mix = tmp_path / "mix.yaml"
    mix.write_text("candidates:\n  mix: [[buy_again, 2], [segment_popularity, 2]]\n")
    with pytest.raises(UsageError, match="--k 10: .*slots add up to 4"):
        backtest.main(common + ["--config", str(mix), "--k", "10"])
    assert not os.path.exists(tmp_path / "w.duckdb")   # refused before anything ran


@pytest.fixture(scope="module")
def demo_backtest(tmp_path_factory):
    world, as_of = _world(tmp_path_factory, "demo", 7)
    warehouse = str(tmp_path_factory.mktemp("wh") / "warehouse.duckdb")
    assert backtest.main(["--input_dir", world, "--as_of", as_of,
                          "--warehouse", warehouse]) == 0
    return _table(warehouse).set_index("strategy")


def test_segment_popularity_beats_global_popularity(demo_backtest):
    segment, global_ = demo_backtest.loc["segment"], demo_backtest.loc["global"]
    assert (demo_backtest["k"] == 4).all()
    assert demo_backtest.loc["segment", "share_make+model+year"] > 0.5
    assert segment["ndcg_at_k"] > 1.3 * global_["ndcg_at_k"]
    assert segment["precision_at_k"] > 1.2 * global_["precision_at_k"]
    assert segment["recall_at_k"] > global_["recall_at_k"]
    assert segment["coverage"] > 3 * global_["coverage"]  # not one list for everyone
