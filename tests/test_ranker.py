"""The ranker's model layer: metrics, PSI, training and selection, artifacts, re-ranked picks."""
import json
import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from models import contracts, features, metrics, popularity, profiles, ranker, recommend, rules
from models.catalog import CatalogArrays, resolve_conflicts
from models.config import DEFAULT_CONFIG as CONFIG
from models.world import WorldSpec, generate
from transforms.features import fitting_by_vehicle
from transforms.ranker import load_model, resolve_model_path, save_model

NAMES = features.feature_names(CONFIG)
VIEW_AGE = NAMES.index("p_days_since_view")


def synthetic(groups=300, per_group=20, seed=0):
    """Rows whose label depends on a recent view, grouped like (user, cutoff) pools."""
    rng = np.random.default_rng(seed)
    n = groups * per_group
    x = rng.normal(size=(n, len(NAMES))).astype(np.float32)
    x[:, VIEW_AGE] = rng.exponential(20, n)
    logit = -3.0 - 0.4 * x[:, VIEW_AGE] + 0.8 * x[:, 0]
    y = (rng.random(n) < 1 / (1 + np.exp(-np.clip(logit, -30, 30)))).astype(np.int8)
    return ranker.Split(x, y, np.ones(n), np.repeat(np.arange(groups), per_group))


@pytest.fixture(scope="module")
def trained():
    config = ranker.TrainConfig(objective="auto", max_rounds=60, early_stopping_rounds=20)
    return ranker.train_and_select(synthetic(seed=0), synthetic(seed=1), NAMES, config)


# ----------------------------------------------------------------------------- metrics

def test_pool_ndcg_follows_the_backtest_formula():
    groups = np.array([0, 0, 0, 1, 1, 1, 2, 2])
    labels = np.array([0, 1, 0, 1, 1, 0, 0, 0])
    scores = np.array([0.9, 0.5, 0.1, 0.2, 0.8, 0.9, 0.3, 0.1])
    hits = np.array([[0, 1], [0, 1], [0, 0]], bool)
    expected = metrics.ndcg_at_k(hits, np.array([1, 2, 0]))
    assert ranker.pool_ndcg(groups, labels, scores, k=2) == pytest.approx(expected)


def test_roc_auc_agrees_with_scikit_learn_including_ties():
    rng = np.random.default_rng(3)
    y = rng.random(500) < 0.2
    s = np.round(rng.random(500) + y * 0.3, 1)
    assert ranker.roc_auc(y, s) == pytest.approx(roc_auc_score(y, s))
    assert math.isnan(ranker.roc_auc(np.zeros(4), np.arange(4)))


# ----------------------------------------------------------------------------- PSI

def test_psi_is_zero_for_the_same_population_and_large_for_a_shift():
    rng = np.random.default_rng(0)
    reference = ranker.reference_distribution(rng.normal(0, 1, 50_000))
    assert len(reference["shares"]) == 10
    same = ranker.bin_counts(rng.normal(0, 1, 50_000), reference["edges"])
    shifted = ranker.bin_counts(rng.normal(1, 1, 50_000), reference["edges"])
    assert ranker.psi(reference["shares"], same) < 0.01
    assert ranker.psi(reference["shares"], shifted) > ranker.DEFAULT_PSI_THRESHOLD


def test_reference_distribution_collapses_repeated_quantiles():
    binary = np.r_[np.zeros(900), np.ones(100)]
    reference = ranker.reference_distribution(binary)
    assert reference["edges"] == [0.0]
    assert reference["shares"] == pytest.approx([0.9, 0.1])
    # An empty bin in the scored rows is floored, not infinite.
    assert math.isfinite(ranker.psi(reference["shares"], [10, 0]))


def test_drift_counts_are_additive_and_weighted():
    distributions = {"a": {"edges": [0.0], "shares": [0.5, 0.5]}}
    one = ranker.DriftCounts(distributions)
    one.add(np.array([[-1.0], [1.0]]), ["a"])
    two = ranker.DriftCounts(distributions)
    two.add(np.array([[1.0]]), ["a"], weights=np.array([3.0]))
    merged = one.merge(two)
    assert merged.counts["a"].tolist() == [1.0, 4.0] and merged.rows == 5
    restored = ranker.DriftCounts.from_dict(distributions, json.loads(json.dumps(
        merged.to_dict())))
    table = ranker.drift_table(distributions, restored, threshold=0.1)
    assert table.loc[0, "psi"] == pytest.approx(ranker.psi([0.5, 0.5], [1, 4]))
    assert bool(table.loc[0, "flagged"])


# ----------------------------------------------------------------------------- training

def test_train_and_select_keeps_the_best_by_validation_ndcg(trained):
    report = trained.report
    assert set(report["candidates"]) == {"logistic", "lightgbm_lambdarank", "lightgbm_binary"}
    best = max(report["candidates"], key=lambda k: report["candidates"][k]["ndcg@4"])
    assert report["selected"] == best
    assert trained.model.kind != trained.challenger.kind
    for figures in report["candidates"].values():
        assert figures["roc_auc"] > 0.75  # the planted signal is learnt by every model


def test_selection_reports_the_popularity_order_it_must_beat(trained):
    report = trained.report
    assert report["baseline_name"] == "popularity_order"
    assert set(report["baseline"]) == {"ndcg@4", "roc_auc"}
    # the planted signal (a recent view) is not in the popularity order: the model wins
    assert report["candidates"][report["selected"]]["ndcg@4"] > report["baseline"]["ndcg@4"]
    assert report["beats_baseline"] is True


def test_popularity_order_is_base_score_plus_the_intent_boost():
    from models.config import ScoringConfig
    scoring = ScoringConfig()
    x = np.zeros((3, len(NAMES)))
    x[:, NAMES.index("s_base")] = [1.0, 2.0, 0.5]
    x[1, NAMES.index("p_views_sku")] = 2     # viewed: + view weight
    x[2, NAMES.index("p_views_sku")] = 1     # viewed and carted: + cart weight
    x[2, NAMES.index("p_carted_sku")] = 1
    assert ranker.popularity_order(x, NAMES, scoring) == pytest.approx(
        [1.0, 2.0 + scoring.view_weight, 0.5 + scoring.cart_weight])


def test_a_model_that_learnt_nothing_does_not_beat_the_popularity_order():
    """Noise in training, the popularity order right in validation: refused (#14)."""
    rng = np.random.default_rng(5)
    noise = synthetic(seed=6)
    noise = ranker.Split(noise.x, (rng.random(len(noise.y)) < 0.05).astype(np.int8),
                         noise.weight, noise.group)
    valid = synthetic(seed=7)
    valid.x[:, [NAMES.index("p_views_sku"), NAMES.index("p_carted_sku")]] = 0.0  # no intent
    base = NAMES.index("s_base")
    best_in_group = pd.Series(valid.x[:, base]).groupby(valid.group).transform("max")
    valid = ranker.Split(valid.x, (valid.x[:, base] == best_in_group.to_numpy()).astype(np.int8),
                         valid.weight, valid.group)
    config = ranker.TrainConfig(objective="auto", max_rounds=30, early_stopping_rounds=10)
    got = ranker.train_and_select(noise, valid, NAMES, config)
    assert got.report["baseline"]["ndcg@4"] == pytest.approx(1.0)
    assert got.report["beats_baseline"] is False
    got.model.metadata.update({"version": "ranker-test", "beats_baseline": False,
                               "selected": got.report["selected"],
                               "selection_metric": "ndcg@4",
                               "metrics": got.report["candidates"],
                               "baseline": got.report["baseline"]})
    line = ranker.refusal(got.model)
    assert "ranker-test does not beat the popularity order" in line
    assert "against 1.0000" in line and "\n" not in line


def test_refusal_serves_models_that_beat_or_predate_the_check(trained):
    model = trained.model
    model.metadata.pop("beats_baseline", None)
    assert ranker.refusal(model) is None      # an artifact from before the check
    model.metadata["beats_baseline"] = True
    assert ranker.refusal(model) is None


def test_probability_models_undo_negative_downsampling():
    split = synthetic(seed=4)
    model, _ = ranker.train_logistic(split, NAMES, ranker.TrainConfig())
    model.keep_rate = 0.1
    z = model.raw(split.x[:5])
    assert model.predict(split.x[:5]) == pytest.approx(1 / (1 + np.exp(-(z + np.log(0.1)))))


def test_contributions_add_up_to_the_raw_score(trained):
    x = synthetic(groups=5, seed=5).x
    for model in (trained.model, trained.challenger):
        contrib = model.contributions(x)
        assert contrib.shape == (len(x), len(NAMES) + 1)
        assert contrib.sum(axis=1) == pytest.approx(model.raw(x), rel=1e-4, abs=1e-4)
        reasons = ranker.explain(model, x, top=2)
        assert len(reasons[0]) == 2 and reasons[0][0][0] in NAMES


@pytest.mark.parametrize("which", ["model", "challenger"])
def test_artifact_round_trip_gives_the_same_predictions(trained, tmp_path, which):
    model = getattr(trained, which)
    model.metadata.update({"features": list(NAMES), "feature_distributions": {}})
    model.metadata["version"] = ranker.model_version(model, pd.Timestamp("2026-03-01", tz="UTC"))
    path = save_model(model, str(tmp_path / "models"))
    assert path.endswith(f"{model.version}.json")
    x = synthetic(groups=10, seed=6).x
    for source in (path, str(tmp_path / "models")):  # the file, or the directory's LATEST
        loaded = load_model(source)
        assert loaded.version == model.version and loaded.kind == model.kind
        assert loaded.features == model.features
        np.testing.assert_array_equal(loaded.predict(x), model.predict(x))
        np.testing.assert_allclose(loaded.contributions(x), model.contributions(x))
    assert resolve_model_path(str(tmp_path / "models")) == path


def test_artifact_refuses_foreign_files_and_other_features(trained, tmp_path):
    with pytest.raises(ValueError, match="not a ranker artifact"):
        ranker.RankerModel.from_bytes(b'{"format": "something else"}')
    with pytest.raises(FileNotFoundError):
        load_model(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="different features"):
        trained.model.check_features(CONFIG.replace(segment_attributes=("make",)))


def test_train_config_fails_fast():
    with pytest.raises(ValueError):
        ranker.TrainConfig(objective="regression")


# ----------------------------------------------------------------------------- serving

def _validated(table, frame):
    checked = contracts.validate(table, frame.astype(object).where(frame.notna(), None))
    return checked.rows


@pytest.fixture(scope="module")
def tiny():
    """An in-memory tiny world, cleaned the batch job's way, with ranker states at as_of."""
    world = generate(WorldSpec.preset("tiny"), 5)
    as_of = pd.Timestamp(world.manifest["as_of"])
    catalog = resolve_conflicts(_validated("catalog", world.catalog)).catalog
    fitment = _validated("fitment", world.fitment)
    fitment = fitment.loc[fitment["sku"].isin(catalog["sku"])]
    events = _validated("events", world.events)
    events = profiles.dedupe_events(events.loc[events["sku"].isin(catalog["sku"])]).rows
    users = profiles.mark_duplicate_users(_validated("users", world.users), "email_lower")
    arrays = CatalogArrays.build(catalog, CONFIG.rules)
    lines = profiles.orders_with_segments(events, users, list(CONFIG.segment_attributes))
    index = popularity.PopularityIndex(popularity.partial_popularity(lines, as_of, CONFIG),
                                       arrays.sku, CONFIG)
    fconfig = features.FeatureConfig()
    hist = features.build_history(events, catalog)
    items = features.ItemTable.build(arrays, features.item_counts(hist, [as_of], fconfig),
                                     index, fconfig)
    kept = profiles.mark_duplicate_users(users, "user_id")
    kept = kept.loc[~kept["is_duplicate"]].reset_index(drop=True)
    states = features.user_states(kept, hist, [as_of], fconfig, CONFIG, labels=False)
    fitting = {k: frozenset(v) for k, v in fitting_by_vehicle(
        fitment, CONFIG.fitment_attributes).items()}
    return dict(catalog=catalog, arrays=arrays, index=index, items=items, states=states,
                fitting=fitting, fconfig=fconfig)


def _reranker(tiny, model):
    distributions = ranker.feature_distributions(synthetic(seed=8).x, NAMES)
    model.metadata["feature_distributions"] = distributions
    return ranker.RerankingRecommender(tiny["arrays"], tiny["index"], CONFIG, model,
                                       tiny["items"], tiny["fconfig"],
                                       drift=ranker.DriftCounts(distributions))


def test_reranked_recommendations_keep_every_business_rule(tiny, trained):
    reranker = _reranker(tiny, trained.model)
    recs, unserved = recommend.recommend_all(reranker, tiny["states"], tiny["fitting"])
    baseline, _ = recommend.recommend_all(
        recommend.Recommender(tiny["arrays"], tiny["index"], CONFIG), tiny["states"],
        tiny["fitting"])
    assert len(recs) == len(baseline) > 1000 and len(unserved) == len(tiny["states"]) - len(recs)
    context = rules.QAContext(
        catalog=tiny["catalog"].set_index("sku"), fitting=tiny["fitting"],
        bought=dict(zip(tiny["states"]["user_id"], tiny["states"]["bought"])),
        popularity=tiny["index"], catalog_skus=tiny["arrays"].sku,
        eligible_skus=frozenset(tiny["arrays"].sku[tiny["arrays"].eligible]))
    assert rules.check(recs, context, CONFIG) == {r.id: 0 for r in rules.RULES}
    scores = recs[[f"rec{i}_score" for i in range(1, 5)]].to_numpy()
    assert ((scores >= 0) & (scores <= 1)).all()
    assert (np.diff(scores, axis=1) <= 0).all()
    # Same serving levels as the Recommender: re-ranking never changes rule 12's choice.
    assert (recs.set_index("user_id")["source"]
            == baseline.set_index("user_id")["source"]).all()
    assert reranker.rows_scored > 0 and reranker.drift.rows > 0


def test_cold_users_share_one_pass_with_the_same_result(tiny, trained):
    states = tiny["states"]
    cold = ranker._cold(states)
    assert cold.any() and (~cold).any()
    reranker = _reranker(tiny, trained.model)
    vehicle = states.loc[cold].groupby(["make", "model", "year"]).size().idxmax()
    group = states.loc[(states[["make", "model", "year"]] == pd.Series(
        vehicle, index=["make", "model", "year"])).all(axis=1)].reset_index(drop=True)
    fits = tiny["arrays"].index_of(sorted(tiny["fitting"][popularity.segment_key(vehicle)]))
    together = reranker.recommend(group, fits)
    for u in np.flatnonzero(ranker._cold(group))[:3]:
        alone = reranker.recommend(group.iloc[[u]], fits)
        assert alone.items[0].tolist() == together.items[u].tolist()
        assert alone.scores[0] == pytest.approx(together.scores[u])


def test_reranker_refuses_a_model_with_other_features(tiny, trained):
    model = ranker.RankerModel("logistic", "binary", NAMES[:-1], trained.challenger.model)
    with pytest.raises(ValueError, match="different features"):
        _reranker(tiny, model)
