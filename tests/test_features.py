"""Ranker features and labels: every feature function, point-in-time leakage, labels, sampling."""
import math

import apache_beam as beam
import numpy as np
import pandas as pd
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from models import contracts, features, popularity, profiles, recommend
from models.catalog import CatalogArrays
from models.config import DEFAULT_CONFIG as CONFIG
from transforms.features import BuildExamples, fitting_by_vehicle

CUT = pd.Timestamp("2026-03-01T00:00:00Z")
FC = features.FeatureConfig()


def _catalog():
    rows = [
        # sku, part_type, price, universal
        ("A", "Intake", 300.0, False), ("B", "Exhaust", 900.0, False),
        ("C", "Intake", 120.0, False), ("D", "Coilover", 1400.0, False),
        ("E", "Headlight", 60.0, False), ("F", "Turbo", 2000.0, False),
        ("U", "Tool Kit", 140.0, True), ("V", "Gauge", 80.0, True),
    ]
    return pd.DataFrame({
        "sku": [r[0] for r in rows], "title": [f"part {r[0]}" for r in rows],
        "part_type": [r[1] for r in rows], "brand": "RaceAxis",
        "price": [r[2] for r in rows], "image_url": [f"https://img/{r[0]}.jpg" for r in rows],
        "tags": [()] * len(rows), "is_universal": [r[3] for r in rows],
        "variant_group": [None] * len(rows)})


def _events(rows):
    """Rows of (user, name, sku, days before CUT, order_id, price) → typed events."""
    records = []
    for i, (user, name, sku, days, order, price) in enumerate(rows):
        records.append({"event_id": f"E{i}", "user_id": user, "event_name": name, "sku": sku,
                        "event_time": (CUT - pd.Timedelta(days=days)).strftime(
                            "%Y-%m-%dT%H:%M:%S.%fZ"),
                        "order_id": order, "price": price, "quantity": 1})
    checked = contracts.validate("events", contracts.records_frame("events", records))
    assert not len(checked.bad_positions), checked.bad_reasons
    return checked.rows


def _order(user, sku, days, order, price=None):
    """The three event names one order is reported under (SPEC §2)."""
    return [(user, name, sku, days, order, price) for name in contracts.ORDER_EVENT_NAMES]


VIEW, CART = contracts.VIEW, contracts.CART


@pytest.fixture
def catalog():
    return _catalog()


@pytest.fixture
def history_rows():
    return (
        _order("u1", "A", 10, "O1", 300.0) + _order("u1", "B", 10, "O1", 900.0)
        + _order("u1", "C", 200, "O2", 110.0) + _order("u1", "E", 40, "O3")
        + [("u1", VIEW, "D", 2, None, None), ("u1", VIEW, "D", 5, None, None),
           ("u1", CART, "D", 1, None, None), ("u1", VIEW, "F", 100, None, None),
           ("u2", VIEW, "B", 3, None, None), ("u2", VIEW, "F", 20, None, None)])


def _keys(users=("u1", "u2", "u3"), cutoff=CUT):
    return pd.DataFrame({"user_id": list(users), "cutoff": [cutoff] * len(users)})


def test_build_history_collapses_an_order_reported_three_times(catalog, history_rows):
    hist = features.build_history(_events(history_rows), catalog)
    assert len(hist.lines) == 4  # (O1, A), (O1, B), (O2, C), (O3, E)
    assert sorted(hist.lines["order_id"]) == ["O1", "O1", "O2", "O3"]
    line = hist.lines.set_index("sku")
    assert line.loc["E", "price"] == 60.0  # no event price: the catalogue's
    assert line.loc["C", "price"] == 110.0  # the price paid wins over the list price
    assert line.loc["A", "part_type"] == "Intake"
    assert len(hist.views) == 5 and len(hist.carts) == 1


def test_user_features_rfm_basket_entropy_tiers(catalog, history_rows):
    hist = features.build_history(_events(history_rows), catalog)
    f = features.user_features(hist, _keys(), FC)
    u1, u2, u3 = f.iloc[0], f.iloc[1], f.iloc[2]
    assert u1["u_recency_days"] == pytest.approx(10.0)
    assert u1["u_frequency_90d"] == 2  # O1 and O3; O2 is 200 days old
    assert u1["u_monetary_90d"] == pytest.approx(300 + 900 + 60)
    assert u1["u_basket_size"] == pytest.approx(4 / 3)  # 4 lines in 3 orders
    shares = np.array([2, 1, 1]) / 4  # Intake ×2, Exhaust, Headlight
    assert u1["u_type_entropy"] == pytest.approx(-(shares * np.log(shares)).sum())
    # Tiers (<100, 100-500, >=500): E=60 | A=300, C=110 | B=900.
    assert (u1["u_tier_low"], u1["u_tier_mid"], u1["u_tier_high"]) == pytest.approx(
        (0.25, 0.5, 0.25))
    assert u1["u_views_90d"] == 2  # the view of F is 100 days old
    assert u1["u_usual_price"] == pytest.approx(np.median([300, 900, 110, 60]))
    assert u1["u_touches_90d"] == 3 + 2 + 1  # lines, views, carts in 90 days
    # u2 only looked: no purchase features, usual price from the viewed SKUs' list prices.
    assert u2["u_recency_days"] == 365 and u2["u_frequency_90d"] == 0
    assert u2["u_usual_price"] == pytest.approx(np.median([900.0, 2000.0]))
    # u3 has no events at all.
    assert u3["u_recency_days"] == 365 and u3["u_monetary_90d"] == 0
    assert math.isnan(u3["u_usual_price"])


def test_sku_signals_count_views_and_carts_in_the_intent_window(catalog, history_rows):
    hist = features.build_history(_events(history_rows), catalog)
    sig = features.sku_signals(hist, _keys(), intent_days=93).set_index(["_k", "sku"])
    d = sig.loc[(0, "D")]
    assert (d["views"], d["view_age"], d["carts"], d["cart_age"]) == pytest.approx(
        (2, 2.0, 1, 1.0))
    assert (0, "F") not in sig.index  # viewed 100 days ago: outside the window
    assert sig.loc[(1, "B"), "carts"] == 0
    assert sig.loc[(1, "B"), "cart_age"] == features.NEVER_DAYS


def test_type_signals_bought_and_touched(catalog, history_rows):
    hist = features.build_history(_events(history_rows), catalog)
    typ = features.type_signals(hist, _keys(), window_days=90).set_index(["_k", "part_type"])
    intake = typ.loc[(0, "Intake")]
    assert intake["bought"] == 2 and intake["bought_age"] == pytest.approx(10.0)
    assert intake["touches"] == 1  # C was bought 200 days ago: outside the window
    coil = typ.loc[(0, "Coilover")]
    assert coil["bought"] == 0 and coil["bought_age"] == features.NEVER_DAYS
    assert coil["touches"] == 3  # two views and a cart of D


def test_labels_are_purchases_in_the_seven_days_after_the_cutoff(catalog):
    rows = (_order("u1", "A", 0, "O1") + _order("u1", "B", -3, "O2")
            + _order("u1", "C", -7, "O3") + _order("u1", "D", -7.001, "O4"))
    hist = features.build_history(_events(rows), catalog)
    labels = features.skus_in_window(hist.lines, _keys(["u1"]), 7, 0)
    # A at the cutoff is history (a feature), C at exactly +7 days counts, D after does not.
    assert labels[0] == ("B", "C")
    bought = features.skus_in_window(hist.lines, _keys(["u1"]), 0, 365)
    assert bought[0] == ("A",)


def _user_frame():
    return pd.DataFrame({"user_id": ["u1", "u2", "u3"], "email_lower": ["a@x", "b@x", "c@x"],
                         "make": "Ford", "model": "Mustang", "year": [2015, 2015, 2015],
                         "updated_at": pd.Timestamp("2026-01-01", tz="UTC")})


def _world(catalog, events):
    arrays = CatalogArrays.build(catalog, CONFIG.rules)
    users = _user_frame()
    lines = profiles.orders_with_segments(events, users.assign(is_duplicate=False),
                                          list(CONFIG.segment_attributes))
    index = popularity.PopularityIndex(popularity.partial_popularity(lines, CUT, CONFIG),
                                       arrays.sku, CONFIG)
    hist = features.build_history(events, catalog)
    items = features.ItemTable.build(arrays, features.item_counts(hist, [CUT], FC), index, FC)
    states = features.user_states(users, hist, [CUT], FC, CONFIG, labels=True)
    return arrays, index, items, states


def _matrix(catalog, events):
    arrays, index, items, states = _world(catalog, events)
    cand = np.flatnonzero(arrays.eligible)
    builder = features.PoolBuilder(arrays, CONFIG, FC)
    group = builder.labelled(states, cand, index)
    return builder.examples(group, items), states


def test_point_in_time_features_ignore_events_after_the_cutoff(catalog, history_rows):
    """The leakage test: adding events after t changes no feature computed at t."""
    before, states_before = _matrix(catalog, _events(history_rows))
    later = (_order("u1", "D", -1, "O9", 1400.0) + _order("u2", "A", -0.5, "O8")
             + _order("u3", "B", -6, "O7") + _order("u1", "A", -30, "O6")
             + [("u1", VIEW, "F", -0.1, None, None), ("u2", CART, "E", -2, None, None),
                ("u3", VIEW, "U", -0.0001, None, None)])
    after, states_after = _matrix(catalog, _events(history_rows + later))
    names = list(features.feature_names(CONFIG))
    pd.testing.assert_frame_equal(before[["user_id", "sku"] + names],
                                  after[["user_id", "sku"] + names])
    state_columns = [c for c in states_before.columns if c != "label_skus"]
    pd.testing.assert_frame_equal(states_before[state_columns], states_after[state_columns])
    # Only the labels see the future: D (u1), A (u2) and B (u3) within 7 days; A at +30 not.
    positives = set(after.loc[after["label"] == 1, ["user_id", "sku"]].itertuples(
        index=False, name=None))
    assert positives == {("u1", "D"), ("u2", "A"), ("u3", "B")}
    assert before["label"].sum() == 0


def test_feature_matrix_pair_features(catalog, history_rows):
    frame, _ = _matrix(catalog, _events(history_rows))
    row = frame.set_index(["user_id", "sku"])
    d = row.loc[("u1", "D")]
    assert d["p_views_sku"] == 2 and d["p_days_since_view"] == pytest.approx(2.0)
    assert d["p_carted_sku"] == 1 and d["p_days_since_cart"] == pytest.approx(1.0)
    assert d["p_type_affinity"] == pytest.approx(3 / 6)  # 3 of u1's 6 touches are coilovers
    assert d["p_price_vs_usual"] == pytest.approx(math.log(1400 / np.median([300, 900, 110,
                                                                              60])), rel=1e-5)
    c = row.loc[("u1", "F")]  # intake C was bought: u1 cannot get it; F is a turbo
    assert c["p_type_bought"] == 0 and c["p_days_since_type"] == features.NEVER_DAYS
    assert ("u1", "A") not in row.index  # bought within 365 days: never a candidate
    assert ("u1", "C") not in row.index
    u3 = row.loc[("u3", "U")]
    assert u3["p_views_sku"] == 0 and u3["p_price_vs_usual"] == 0.0
    assert u3["i_is_universal"] == 1.0
    assert list(frame.columns[5:]) == list(features.feature_names(CONFIG))


def test_item_table_smooths_conversion_toward_the_mean(catalog):
    arrays = CatalogArrays.build(catalog, CONFIG.rules)
    counts = pd.DataFrame({"cutoff": CUT, "sku": ["A", "B"], "orders": [2.0, 0.0],
                           "views": [10.0, 30.0]})
    index = popularity.PopularityIndex(popularity.merge_popularity([]), arrays.sku, CONFIG)
    table = features.ItemTable.build(arrays, counts, index, FC)
    col = features.ITEM_FEATURES.index("i_conversion")
    mean, k = 2 / 40, FC.conversion_prior
    a = table.values[arrays.index_of(["A"])[0], col]
    assert a == pytest.approx((2 + k * mean) / (10 + k), rel=1e-6)
    unseen = table.values[arrays.index_of(["F"])[0], col]
    assert unseen == pytest.approx(mean, rel=1e-6)


def test_candidate_pools_exclude_bought_and_keep_intent():
    n_cand = 10
    levels = features.VehicleLevels(
        names=["global"], usable=np.array([True]), pop=np.zeros((1, n_cand)),
        own=np.zeros((1, n_cand)), observed=np.ones((1, n_cand), bool),
        base=-np.arange(n_cand, dtype=float)[None, :],
        order=np.arange(n_cand)[None, :], rank=np.arange(n_cand)[None, :])
    pools = features.candidate_pools(levels, np.array([0, 0]), 3,
                                     bought=(np.array([0]), np.array([1])),
                                     intent=(np.array([1, 1]), np.array([9, 2])))
    by_user = {u: pools.item[pools.row == u].tolist() for u in (0, 1)}
    assert by_user[0] == [0, 2, 3]          # 1 was bought; the pool still holds 3
    assert by_user[1] == [0, 1, 2, 9]       # top 3 plus the viewed item 9


def test_serving_levels_fall_back_when_too_few_ordered_parts_remain():
    observed = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
    levels = features.VehicleLevels(
        names=["make+model+year", "global"], usable=np.array([True, True]),
        pop=np.zeros((2, 6)), own=np.zeros((2, 6)), observed=observed, base=np.zeros((2, 6)),
        order=np.tile(np.arange(6), (2, 1)), rank=np.tile(np.arange(6), (2, 1)))
    chosen = features.serving_levels(levels, 2, np.array([1]), np.array([0]), 4)
    assert chosen.tolist() == [0, 1]  # user 1 bought one of the 4 observed parts


def test_downsample_negatives_keeps_positives_and_the_ratio():
    rng = np.random.default_rng(0)
    labels = (rng.random(200_000) < 0.01).astype(np.int8)
    mask, rate = features.downsample_negatives(labels, 5.0, rng)
    positives = int(labels.sum())
    assert mask[labels == 1].all()
    kept_negatives = int((mask & (labels == 0)).sum())
    assert kept_negatives == pytest.approx(5 * positives, rel=0.05)
    assert rate == pytest.approx(5 * positives / (len(labels) - positives))
    everything, rate = features.downsample_negatives(labels, 0.0, rng)
    assert everything.all() and rate == 1.0


def _labelled(labels_per_user):
    rows = np.repeat(np.arange(len(labels_per_user)), [len(x) for x in labels_per_user])
    labels = np.concatenate(labels_per_user).astype(np.int8)
    users = pd.DataFrame({"user_id": [f"u{i}" for i in range(len(labels_per_user))]})
    pools = features.Pools(rows, np.arange(len(rows)), np.zeros(len(rows), np.int64))
    return features.Labelled(users, np.arange(len(rows)), None, pools, labels)


def test_sample_shard_uses_one_rate_so_groups_without_positives_keep_negatives():
    rng = np.random.default_rng(1)
    with_positive = _labelled([np.r_[1, np.zeros(999)]] * 20)
    without = _labelled([np.zeros(1000)] * 20)
    masks, rate, weights = features.sample_shard([with_positive, without], [True, True],
                                                 10.0, rng)
    assert rate == pytest.approx(10 * 20 / (40_000 - 20))
    assert masks[1].sum() > 0  # not dropped for lack of a positive
    assert masks[0].sum() == pytest.approx(20 + 200 * 0.5, rel=0.35)
    assert weights == [1 / rate, 1 / rate]


def test_sample_shard_keeps_whole_users_in_validation():
    rng = np.random.default_rng(2)
    group = _labelled([np.r_[1, 0, 0]] + [np.zeros(3)] * 999)
    masks, _, weights = features.sample_shard([group], [False], 10.0, rng, 0.1)
    kept_rows = group.pools.row[masks[0]]
    assert 0 in kept_rows  # the buyer is always kept, with all three rows
    assert (np.bincount(kept_rows) % 3 == 0).all()
    assert len(np.unique(kept_rows)) == pytest.approx(100, abs=35)
    assert weights == [10.0]


def test_cutoff_grid_is_weekly_and_oldest_first():
    grid = features.cutoff_grid(CUT, features.FeatureConfig(n_cutoffs=3))
    assert grid == [CUT - pd.Timedelta(days=d) for d in (21, 14, 7)]


@pytest.mark.parametrize("bad", [dict(cutoff_step_days=3), dict(n_cutoffs=1),
                                 dict(valid_cutoffs=0), dict(negative_ratio=-1.0),
                                 dict(price_tiers=(500.0, 100.0)), dict(eval_user_share=0.0),
                                 dict(window_days=2.5)])
def test_feature_config_fails_fast(bad):
    with pytest.raises(ValueError, match="invalid ranker feature configuration"):
        features.FeatureConfig(**bad)


def test_feature_config_round_trips_through_a_dict():
    config = features.FeatureConfig(n_cutoffs=5, price_tiers=(80.0, 400.0))
    assert features.FeatureConfig.from_dict(config.to_dict()) == config


def _fitment():
    skus = ["A", "B", "C", "D", "E", "F"]
    return pd.DataFrame({"sku": skus, "make": "Ford", "model": "Mustang", "year": 2015})


def test_build_examples_transform_matches_the_pure_functions(catalog, history_rows):
    """TestPipeline: the Beam transform yields exactly the rows the pure functions make."""
    later = _order("u1", "D", -1, "O9", 1400.0) + _order("u2", "A", -0.5, "O8")
    events = _events(history_rows + later)
    users = _user_frame()
    fitment = _fitment()
    # The pure path for the same inputs: one vehicle, one cutoff, no sampling.
    arrays, index, items, states = _world(catalog, events)
    cand = recommend.Recommender(arrays, index, CONFIG).candidates(
        arrays.index_of(sorted(fitting_by_vehicle(fitment, CONFIG.fitment_attributes)[
            "Ford|Mustang|2015"])))
    builder = features.PoolBuilder(arrays, CONFIG, FC)
    expected = builder.examples(builder.labelled(states, cand, index), items)
    names = list(features.feature_names(CONFIG))

    def rows(frame):
        return [(r[0], r[1], int(r[2])) + tuple(round(float(v), 4) for v in r[3:])
                for r in frame[["user_id", "sku", "label"] + names].itertuples(index=False)]

    with TestPipeline() as p:
        catalog_pc = p | "Catalog" >> beam.Create([catalog])
        out = ({"users": p | "Users" >> beam.Create([users.iloc[:2], users.iloc[2:]]),
                "events": p | "Events" >> beam.Create([events]),
                "fitment": p | "Fitment" >> beam.Create([fitment])}
               | BuildExamples(catalog_pc, [CUT], [], CONFIG, FC, cache_tag="test",
                               num_shards=3))
        assert_that(out.rows | beam.FlatMap(rows), equal_to(rows(expected)))
        assert_that(out.counts | "Positives" >> beam.Filter(
            lambda kv: kv[0] == "ranker.pool_positives") | beam.Map(lambda kv: kv[1])
            | beam.CombineGlobally(sum), equal_to([2]), label="CountsPositives")


def test_sample_shard_without_any_positive_drops_its_training_negatives_without_crashing():
    """A shard with no purchase in its training groups: keep rate 0, not 1 / 0 (#14)."""
    rng = np.random.default_rng(3)
    without = _labelled([np.zeros(50)] * 4)
    masks, rate, weights = features.sample_shard([without, without], [True, False], 10.0, rng)
    assert rate == 0.0
    assert masks[0].sum() == 0       # no negatives per no positive
    assert masks[1] is None          # validation groups keep every user
    assert weights == [1.0, 1.0] and all(np.isfinite(weights))
