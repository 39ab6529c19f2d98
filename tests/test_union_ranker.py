"""The ranker over the union of the mix's candidate sources (#14 item 4).

Hand-built cases check the features and what the ranker can learn from a source's
rank; the tiny world checks that training and serving see the same rows and
columns, that a trained union ranker runs in the batch job with every QA check at
zero, and that a model trained on other sources is refused at start-up.
"""
import dataclasses
import json

import duckdb
import numpy as np
import pandas as pd
import pytest

from models import union_ranker
from models.config import CandidatesConfig, RecsConfig
from models.ranker import TrainConfig, refusal
from models.recommend_handler import (UnionRerankHandler, prepare_history,
                                      recommend_history)
from pipelines import batch_recommendations, train_ranker
from pipelines.jobs import UsageError
from pipelines.tune import load_data
from transforms.ranker import load_model, save_model

MIX = [["buy_again", 2], ["also_bought", 1], ["segment_popularity", 1]]


def _config(mix):
    return dataclasses.replace(RecsConfig(), candidates=CandidatesConfig(
        mix=tuple(tuple(p) for p in mix)))


# --- hand-built -------------------------------------------------------------------------------

def test_union_features_by_hand():
    again = pd.DataFrame({"user_id": ["u", "u", "v"], "sku": ["x", "y", "x"],
                          "score": [1.0, 2.0, 3.0]})
    popular = pd.DataFrame({"user_id": ["u", "u"], "sku": ["z", "x"], "score": [5.0, 4.0]})
    got = union_ranker.union_features({"buy_again": again, "segment_popularity": popular},
                                      ["segment_popularity", "buy_again"])
    assert list(got.columns) == ["user_id", "sku", "source", "segment_popularity.score",
                                 "segment_popularity.rank", "buy_again.score",
                                 "buy_again.rank", "n_sources"]
    rows = {(u, s): r for u, s, r in zip(got["user_id"], got["sku"], got.to_dict("records"))}
    assert set(rows) == {("u", "x"), ("u", "y"), ("u", "z"), ("v", "x")}  # no cross product
    ux = rows[("u", "x")]
    # offered by both: popularity rank 2 (4.0 < 5.0), buy-again rank 2 (1.0 < 2.0);
    # labelled buy-again although popularity comes first in the mix (rule 4's exemption)
    assert (ux["segment_popularity.rank"], ux["buy_again.rank"], ux["n_sources"]) == (2, 2, 2)
    assert ux["source"] == "buy_again"
    uz = rows[("u", "z")]
    assert uz["source"] == "segment_popularity" and np.isnan(uz["buy_again.score"])
    assert uz["buy_again.rank"] == union_ranker.MISSING_RANK
    assert rows[("v", "x")]["buy_again.rank"] == 1


def _rank_world(seed: int, users: int = 60):
    """Popularity offers 8 SKUs per user with scores that say nothing; also-bought offers 5,
    and the user buys exactly also-bought's rank-3 SKU. The blend (popularity first) lists
    popularity's top SKUs; only the also-bought rank feature finds the purchase."""
    rng = np.random.default_rng(seed)
    pop_rows, ab_rows, future, blend = [], [], {}, []
    for u in range(users):
        user = f"s{seed}u{u}"
        skus = [f"P{j}" for j in rng.permutation(20)[:8]]
        for sku in skus:
            pop_rows.append((user, sku, float(rng.random())))
        ab = [f"A{j}" for j in rng.permutation(20)[:5]]
        ab_scores = np.sort(rng.random(5))[::-1]
        for sku, score in zip(ab, ab_scores):
            ab_rows.append((user, sku, float(score)))
        future[user] = frozenset({ab[2]})
        top = sorted(((s, k) for uu, k, s in pop_rows if uu == user), reverse=True)[:1]
        blend += [(user, 1, top[0][1])]
    by_source = {"segment_popularity": pd.DataFrame(pop_rows, columns=["user_id", "sku", "score"]),
                 "also_bought": pd.DataFrame(ab_rows, columns=["user_id", "sku", "score"])}
    frame = union_ranker.union_features(by_source, ["segment_popularity", "also_bought"])
    frame = frame.assign(y=union_ranker.label(frame, future))
    blend = pd.DataFrame(blend, columns=["user_id", "slot", "sku"])
    return union_ranker.Examples(frame, blend), future


def test_the_source_rank_is_what_the_ranker_learns():
    config = _config([["segment_popularity", 2], ["also_bought", 2]])
    train, _ = _rank_world(1)
    valid, future = _rank_world(2)
    tconfig = TrainConfig(k=1, objective="binary", min_data_in_leaf=5, max_rounds=50)
    model, report = union_ranker.train_union(train, valid, future, config, tconfig, k=1)
    assert report["baseline"]["precision@1"] == 0.0
    assert report["metrics"][report["selected"]]["precision@1"] == 1.0
    assert report["beats_baseline"] is True and refusal(model) is None
    assert model.metadata["union_sources"] == ["segment_popularity", "also_bought"]
    assert report["paired_interval"]["low"] > 0


def test_a_ranker_that_does_not_beat_the_blend_is_not_served():
    config = _config([["segment_popularity", 2], ["also_bought", 2]])
    train, _ = _rank_world(1)
    valid, future = _rank_world(2)
    # The blend lists exactly what each validation user bought: nothing can beat it.
    perfect = pd.DataFrame([(u, 1, next(iter(b))) for u, b in future.items()],
                           columns=["user_id", "slot", "sku"])
    model, report = union_ranker.train_union(
        train, valid._replace(blend=perfect), future, config,
        TrainConfig(k=1, objective="binary", min_data_in_leaf=5, max_rounds=50), k=1)
    assert report["beats_baseline"] is False
    assert "does not beat the blended mix order" in refusal(model)
    assert "serving the blend" in refusal(model)


def test_fill_keeps_rule_4_for_discovery_rows_only():
    ranked = pd.DataFrame({"user_id": ["u"] * 3, "sku": ["a", "b", "c"],
                           "source": ["also_bought", "buy_again", "segment_popularity"],
                           "score": [0.9, 0.8, 0.7]})
    excluded = pd.DataFrame({"user_id": ["u", "u"], "sku": ["a", "b"]})
    from models.mix import fill_slots

    def fill(by_source, mix, repurchase):
        return fill_slots(by_source, mix, 2, repurchase_sources=repurchase, users=["u"])

    got = union_ranker.fill_ranked(ranked, excluded, 2, fill)
    assert got[["sku", "source"]].values.tolist() == [["b", "buy_again"],
                                                      ["c", "segment_popularity"]]


# --- the tiny world ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(clean_world, tmp_path_factory):
    world_dir, manifest = clean_world
    tmp = tmp_path_factory.mktemp("union")
    config = tmp / "mix.yaml"
    config.write_text(json.dumps({"candidates": {"mix": MIX}}))
    path = train_ranker.run([
        "--input_dir", world_dir, "--as_of", manifest["as_of"], "--config", str(config),
        "--warehouse", str(tmp / "w.duckdb"), "--ranker_model_dir", str(tmp / "models"),
        "--ranker_cutoffs", "3", "--ranker_valid_cutoffs", "1", "--run_id", "union_train"])
    return dict(path=path, tmp=tmp, config=config, world=world_dir, as_of=manifest["as_of"])


def test_training_records_the_sources_and_the_blend_it_was_held_against(trained):
    model = load_model(trained["path"])
    meta = model.metadata
    assert meta["union_sources"] == [s for s, _ in MIX]
    assert model.features == union_ranker.feature_columns([s for s, _ in MIX])
    assert meta["selection_metric"] == "precision@4" and "precision@4" in meta["baseline"]
    assert meta["beats_baseline"] == (
        meta["metrics"][meta["selected"]]["precision@4"] > meta["baseline"]["precision@4"])
    assert meta["row_counts"]["train_positives"] > 0
    assert len(meta["training_window"]["train_cutoffs"]) == 2


def test_training_and_serving_build_the_same_rows(trained, monkeypatch):
    """The served hook and the training capture call one function on the same candidates."""
    config = _config(MIX)
    data = load_data(trained["world"], config, False)
    cutoff = pd.Timestamp(trained["as_of"]) - pd.Timedelta(days=7)
    seen = []
    real = union_ranker.union_features

    def spy(by_source, sources):
        out = real(by_source, sources)
        seen.append(out)
        return out

    monkeypatch.setattr(union_ranker, "union_features", spy)
    union_ranker.examples_at(data.users, data.events, data.catalog, data.fitment, cutoff, 7,
                             config)
    times = pd.to_datetime(data.events["event_time"], utc=True)
    history = prepare_history(data.users, data.events.loc[(times <= cutoff).to_numpy(bool)],
                              cutoff, config)
    model = load_model(trained["path"])
    scored = recommend_history(history, data.catalog, data.fitment, cutoff, config,
                               handler=UnionRerankHandler(config, lambda: model))
    assert len(seen) == 2
    train_rows, served_rows = seen
    assert list(train_rows.columns) == list(served_rows.columns)
    assert list(served_rows.columns[3:]) == list(model.features)
    pd.testing.assert_frame_equal(train_rows, served_rows)
    assert len(scored.rows) and sum(scored.violations.values()) == 0
    assert dict(scored.counters)["ranker.rows_scored"] == len(served_rows)


def test_batch_job_serves_the_union_ranker_with_every_check_at_zero(trained):
    tmp = trained["tmp"]
    model = load_model(trained["path"])
    # Serve it whatever the tiny world's validation said: this test is about the serving path.
    model.metadata["beats_baseline"] = True
    model.metadata["version"] = "union-test"
    path = save_model(model, str(tmp / "served"))
    warehouse = str(tmp / "batch.duckdb")
    code = batch_recommendations.run([
        "--input_dir", trained["world"], "--warehouse", warehouse, "--as_of", trained["as_of"],
        "--num_shards", "2", "--run_id", "union_batch", "--config", str(trained["config"]),
        "--ranker_model", path])
    # 0 published or 1 gated: a model trained on the tiny world's few positives may send
    # one SKU to most users, which the sku_concentration gate stops (as it should).
    assert code in (0, 1)
    with duckdb.connect(warehouse, read_only=True) as con:
        tables = {t for (t,) in con.execute("SHOW TABLES").fetchall()}
        qa = con.execute("SELECT * FROM qa_checks").df()
        runs = con.execute("SELECT * FROM pipeline_runs").df()
        recs = (con.execute("SELECT * FROM recommendations").df()
                if "recommendations" in tables else None)
    rules = qa.loc[qa["rule_id"] < 100]  # the QA checks (gates are 101+)
    assert len(rules) == 16 and int(rules["violations"].sum()) == 0, rules
    run = runs.iloc[0]
    assert run["model_version"] == "union-test" and run["qa_violations"] == 0
    assert run["recommendations_written"] == run["eligible_users"] > 0
    assert json.loads(run["counters"])["ranker.rows_scored"] > 0
    if code == 0:
        assert len(recs) and set(recs["model_version"]) == {"union-test"}


def test_a_ranker_trained_on_other_sources_is_refused_at_start_up(trained):
    tmp = trained["tmp"]
    other = tmp / "other.yaml"
    other.write_text(json.dumps({"candidates": {"mix": [["buy_again", 3],
                                                        ["segment_popularity", 1]]}}))
    with pytest.raises(UsageError, match="trained on the sources buy_again, also_bought, "
                                         "segment_popularity; this configuration's mix has "
                                         "buy_again, segment_popularity"):
        batch_recommendations.run([
            "--input_dir", trained["world"], "--warehouse", str(tmp / "x.duckdb"),
            "--as_of", trained["as_of"], "--config", str(other),
            "--ranker_model", trained["path"]])


@pytest.mark.parametrize("k, mix", [(4, MIX),
                                    (10, [["buy_again", 5], ["also_bought", 3],
                                          ["segment_popularity", 2]])])
def test_evaluate_ranker_reports_union_blend_and_sql_baselines_at_any_k(trained, k, mix):
    from pipelines import evaluate_ranker
    tmp = trained["tmp"]
    config = tmp / f"eval{k}.yaml"
    config.write_text(json.dumps({"rules": {"recs_per_user": k}, "candidates": {"mix": mix}}))
    warehouse = str(tmp / f"eval{k}.duckdb")
    result = evaluate_ranker.run([
        "--input_dir", trained["world"], "--as_of", trained["as_of"], "--config", str(config),
        "--warehouse", warehouse, "--ranker_artifact", trained["path"],
        "--ranker_eval_dir", str(tmp / f"eval{k}"), "--run_id", f"union_eval{k}"])
    table = pd.DataFrame(result["table"]).set_index("strategy")
    assert result["k"] == k
    assert set(table.index) == {"union_ranker", "blend", "sql_global_popularity",
                                "sql_own_then_popular"}
    for column in (f"precision@{k}", f"recall@{k}", f"ndcg@{k}", "coverage",
                   f"ranker_minus_this_precision@{k}", "interval_low", "interval_high"):
        assert column in table.columns, column
    assert table.loc[["union_ranker", "blend"], "qa_violations"].tolist() == [0, 0]
    diff = table.loc["blend", f"ranker_minus_this_precision@{k}"]
    assert diff == pytest.approx(table.loc["union_ranker", f"precision@{k}"]
                                 - table.loc["blend", f"precision@{k}"])
    assert len(set(table["buyers_in_holdout"])) == 1  # the same people for every strategy
    with duckdb.connect(warehouse, read_only=True) as con:
        published = con.execute("SELECT * FROM union_ranker_backtest").df()
    assert set(published["strategy"]) == set(table.index) and set(published["k"]) == {k}
