"""End to end: the backtest job on the demo world (segment must beat global, as in the field)."""
import json
import os

import duckdb
import pytest

from pipelines import backtest, generate_world


@pytest.fixture(scope="module")
def demo_backtest(tmp_path_factory):
    world = str(tmp_path_factory.mktemp("demo_world"))
    generate_world.main(["--preset", "demo", "--seed", "7", "--out", world, "--bad_rows", "2"])
    with open(os.path.join(world, "world.json")) as handle:
        as_of = json.load(handle)["as_of"]
    warehouse = str(tmp_path_factory.mktemp("wh") / "warehouse.duckdb")
    assert backtest.main(["--input_dir", world, "--as_of", as_of,
                          "--warehouse", warehouse]) == 0
    with duckdb.connect(warehouse, read_only=True) as con:
        table = con.execute("SELECT * FROM backtest").df().set_index("strategy")
    return table


def test_backtest_writes_one_row_per_strategy(demo_backtest):
    assert sorted(demo_backtest.index) == ["global", "segment"]
    for column in ("match_rate", "precision@4", "recall@4", "ndcg@4", "coverage"):
        assert ((demo_backtest[column] >= 0) & (demo_backtest[column] <= 1)).all(), column
    assert demo_backtest.loc["global", "share_global"] == 1.0
    assert demo_backtest.loc["segment", "share_make+model+year"] > 0.5


def test_segment_popularity_beats_global_popularity(demo_backtest):
    segment, global_ = demo_backtest.loc["segment"], demo_backtest.loc["global"]
    assert segment["ndcg@4"] > 1.3 * global_["ndcg@4"]
    assert segment["precision@4"] > 1.2 * global_["precision@4"]
    assert segment["recall@4"] > global_["recall@4"]
    assert segment["coverage"] > 3 * global_["coverage"]  # not one list for everyone
