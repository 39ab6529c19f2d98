"""``python -m pipelines.tune`` on the tiny world (#14): the grid, the evidence, the chosen file.

The tune's figure for the given config is checked against an independent path: the batch
job run at the period's cutoff, its published lists scored by ``models.metrics`` on the
purchases after the cutoff read from the raw events file.
"""
import json

import duckdb
import pandas as pd
import pytest

from models import metrics
from models.config_file import load_config
from models.popularity import ORDER_EVENT_NAMES
from pipelines import batch_recommendations, tune
from pipelines.jobs import UsageError
from transforms.io import read_frame

GRID = {"grid": {
    "candidates.mix": [[["segment_popularity", 4]],
                       [["buy_again", 2], ["also_bought", 1], ["segment_popularity", 1]]],
    "candidates.also_bought.similarity": ["count", "jaccard"],
}}


@pytest.fixture(scope="module")
def tuned(clean_world, tmp_path_factory):
    world_dir, manifest = clean_world
    tmp = tmp_path_factory.mktemp("tune")
    grid = tmp / "grid.json"
    grid.write_text(json.dumps(GRID))
    out = tmp / "tuned.yaml"
    code = tune.main(["--input_dir", world_dir, "--as_of", manifest["as_of"], "--periods", "2",
                      "--period_days", "14", "--grid", str(grid), "--out", str(out),
                      "--confirm_on_holdout"])
    assert code == 0
    evidence = json.loads((tmp / "tuned.evidence.json").read_text())
    return world_dir, manifest, out, evidence, tmp


def test_grid_is_expanded_without_equivalent_variants(tuned):
    *_, evidence, _ = tuned
    variants = [r for r in evidence["table"] if r["kind"] == "variant"]
    # base + the mix × 2 similarities; popularity × 2 similarities is the base itself (the
    # similarity is a setting of a source it does not use)
    assert len(variants) == 1 + 2
    assert {r["strategy"] for r in evidence["table"]} >= {"sql_own_then_popular",
                                                          "sql_global_popularity", "base"}


def test_best_config_file_is_the_best_row_and_loads(tuned):
    _, _, out, evidence, _ = tuned
    table = [r for r in evidence["table"] if r["kind"] == "variant"]
    best = max(table, key=lambda r: r["precision@4"])
    assert evidence["best"] == best["strategy"]
    chosen = load_config(str(out))
    assert best["strategy"] == "base" or best["settings"]
    for key, value in best["settings"].items():  # the file holds every setting of the row
        got = chosen
        for part in key.split("."):
            got = getattr(got, part)
        assert json.loads(json.dumps(got)) == value, key
    assert chosen != load_config(None) or best["strategy"] == "base"
    for row in evidence["table"]:  # every row has its paired interval against (b) and (a)
        if row["strategy"] != "sql_own_then_popular":
            assert row["vs_own_then_popular_low"] <= row["vs_own_then_popular"] \
                <= row["vs_own_then_popular_high"]
    held = {r["strategy"] for r in evidence["holdout"]}  # best and base, and the 2 SQL
    assert held == {best["strategy"], "base", "sql_own_then_popular", "sql_global_popularity"}
    assert (out.parent / "tuned.evidence.md").read_text().count("| base |") == 2


def test_base_figure_equals_the_batch_job_scored_independently(tuned):
    world_dir, manifest, _, evidence, tmp = tuned
    cutoff = pd.Timestamp(evidence["periods"][1]["cutoff"])
    warehouse = str(tmp / "batch.duckdb")
    assert batch_recommendations.run([
        "--input_dir", world_dir, "--warehouse", warehouse, "--as_of", cutoff.isoformat(),
        "--num_shards", "2", "--run_id", "tune_check"]) == 0
    with duckdb.connect(warehouse, read_only=True) as con:
        recs = con.execute("SELECT * FROM recommendations").df()
    lists = pd.concat([pd.DataFrame({"user_id": recs["user_id"], "slot": i,
                                     "sku": recs[f"rec_part_{i}"]}) for i in range(1, 5)])
    events, _ = read_frame(world_dir, "events")
    times = pd.to_datetime(events["event_time"], utc=True, format="ISO8601")
    after = events.loc[events["event_name"].isin(ORDER_EVENT_NAMES).to_numpy(bool)
                       & (times > cutoff).to_numpy(bool)
                       & (times <= cutoff + pd.Timedelta(days=14)).to_numpy(bool)]
    future = after.groupby("user_id")["sku"].agg(frozenset).to_dict()
    want = metrics.evaluate_lists(lists, future, 4, 1, {})["precision_at_k"]
    base = next(r for r in evidence["table"] if r["strategy"] == "base")
    assert want > 0
    assert base["precision@4 period 2"] == pytest.approx(want, abs=1e-12)


def test_progress_is_printed(clean_world, tmp_path, capsys):
    world_dir, manifest = clean_world
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"grid": {"scoring.half_life_days": [30.0, 60.0]}}))
    assert tune.main(["--input_dir", world_dir, "--as_of", manifest["as_of"], "--periods", "1",
                      "--period_days", "14", "--grid", str(grid),
                      "--out", str(tmp_path / "t.yaml")]) == 0
    err = capsys.readouterr().err
    assert "[1/2] base period 1" in err and "[2/2] v1 period 1" in err


def test_a_bad_grid_is_one_line_at_start_up(clean_world, tmp_path):
    world_dir, manifest = clean_world
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"grid": {"candidates.mix": [[["buy_agian", 4]]]}}))
    with pytest.raises(UsageError, match="unknown source 'buy_agian'"):
        tune.main(["--input_dir", world_dir, "--as_of", manifest["as_of"],
                   "--grid", str(grid), "--out", str(tmp_path / "t.yaml")])
