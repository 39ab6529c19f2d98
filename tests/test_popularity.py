"""Tests for models.popularity: order lines, decay, segment keys, the combiner, shrinkage."""
import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.config import RecsConfig, ScoringConfig
from models.popularity import (PopularityIndex, blended_levels, decay_weights, merge_popularity,
                               order_lines, partial_popularity, popularity_score, segment_keys)

CONFIG = RecsConfig()
AS_OF = pd.Timestamp("2026-03-31", tz="UTC")


def ts(text):
    return pd.Timestamp(text, tz="UTC")


def ev(event_id, time, name, sku, order_id=None, user="u1"):
    return {"event_id": event_id, "event_time": ts(time), "user_id": user, "event_name": name,
            "sku": sku, "order_id": order_id}


# --- order_lines ------------------------------------------------------------------------

def test_three_order_event_names_collapse_to_one_line():
    events = pd.DataFrame([
        ev("1", "2026-01-02", "Placed Order", "A", "o1"),
        ev("2", "2026-01-01", "Ordered Product", "A", "o1"),
        ev("3", "2026-01-03", "Consumer Website Order", "A", "o1"),
        ev("4", "2026-01-03", "Consumer Website Order", "B", "o1"),
        ev("5", "2026-01-04", "Placed Order", "A", "o2"),
        ev("6", "2026-01-04", "Viewed Product", "C"),
        ev("7", "2026-01-04", "Cart Update", "A"),
    ])
    lines = order_lines(events)
    assert sorted(zip(lines["order_id"], lines["sku"])) == [("o1", "A"), ("o1", "B"),
                                                            ("o2", "A")]
    a1 = lines.loc[(lines["order_id"] == "o1") & (lines["sku"] == "A"), "event_time"].item()
    assert a1 == ts("2026-01-01")  # earliest of the three
    assert set(lines.columns) >= {"order_id", "sku", "user_id", "event_time"}


def test_order_lines_of_no_orders_is_empty():
    events = pd.DataFrame([ev("1", "2026-01-01", "Viewed Product", "A")])
    assert len(order_lines(events)) == 0


def test_one_order_counts_once_in_popularity():
    events = pd.DataFrame([ev(str(i), "2026-03-31", name, "A", "o1") for i, name in enumerate(
        ("Placed Order", "Ordered Product", "Consumer Website Order"))])
    lines = order_lines(events).assign(make="Ford", model="M", year=2015)
    pop = partial_popularity(lines, AS_OF, CONFIG)
    assert pop["orders"].tolist() == [1, 1, 1, 1]
    assert pop["weight"].tolist() == [1.0, 1.0, 1.0, 1.0]


# --- decay_weights --------------------------------------------------------------------------

def test_decay_half_life():
    times = pd.Series([AS_OF, AS_OF - pd.Timedelta(days=30), AS_OF - pd.Timedelta(days=60),
                       AS_OF - pd.Timedelta(days=15)])
    w = decay_weights(times, AS_OF, 30.0)
    assert w == pytest.approx([1.0, 0.5, 0.25, 2 ** -0.5])
    assert decay_weights(times[1:2], AS_OF, 10.0) == pytest.approx([0.125])


def test_future_events_weigh_nothing():
    times = pd.Series([AS_OF + pd.Timedelta(seconds=1), AS_OF + pd.Timedelta(days=3), AS_OF])
    assert decay_weights(times, AS_OF, 30.0).tolist() == [0.0, 0.0, 1.0]


def test_future_orders_excluded_from_popularity():
    lines = pd.DataFrame({"sku": ["A", "B"], "event_time": [AS_OF, AS_OF + pd.Timedelta(days=1)],
                          "make": "Ford", "model": "M", "year": 2015})
    pop = partial_popularity(lines, AS_OF, CONFIG)
    assert set(pop["sku"]) == {"A"}


# --- segment_keys ----------------------------------------------------------------------------

def test_segment_keys_per_level():
    users = pd.DataFrame({"make": ["Ford", "Ford", None], "model": ["Mustang", "F-150", "Civic"],
                          "year": pd.array([2015, None, 2010], dtype="Int64")})
    assert segment_keys(users, ("make", "model", "year")).tolist()[:1] == ["Ford|Mustang|2015"]
    full = segment_keys(users, ("make", "model", "year"))
    assert pd.isna(full.iloc[1]) and pd.isna(full.iloc[2])  # incomplete: no segment
    assert segment_keys(users, ("make", "model")).tolist()[:2] == ["Ford|Mustang", "Ford|F-150"]
    assert pd.isna(segment_keys(users, ("make",)).iloc[2])
    assert segment_keys(users, ()).tolist() == ["", "", ""]


def test_segment_keys_keep_index():
    users = pd.DataFrame({"make": ["Ford"]}, index=[42])
    assert segment_keys(users, ("make",)).index.tolist() == [42]


# --- partial_popularity / merge_popularity ---------------------------------------------------

def _lines(n, seed):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "sku": rng.choice(["A", "B", "C", "D"], n),
        "make": rng.choice(["Ford", "Honda"], n),
        "model": rng.choice(["M", "N"], n),
        "year": rng.choice([2015, 2016], n),
        "event_time": AS_OF - pd.to_timedelta(rng.integers(-5, 200, n), unit="D"),
    })


def test_partial_popularity_levels_and_counts():
    lines = pd.DataFrame({"sku": ["A", "A", "B", "A"],
                          "make": ["Ford", "Ford", "Ford", None],
                          "model": ["M", "M", "N", "M"],
                          "year": [2015, 2016, 2015, 2015],
                          "event_time": [AS_OF, AS_OF, AS_OF - pd.Timedelta(days=30), AS_OF]})
    pop = partial_popularity(lines, AS_OF, CONFIG)
    got = {(r.level, r.segment, r.sku): (r.weight, r.orders) for r in pop.itertuples()}
    assert got[("global", "", "A")] == (3.0, 3)  # unknown make still counts globally
    assert got[("global", "", "B")] == (0.5, 1)
    assert got[("make", "Ford", "A")] == (2.0, 2)
    assert got[("make+model", "Ford|M", "A")] == (2.0, 2)
    assert got[("make+model+year", "Ford|M|2015", "A")] == (1.0, 1)
    assert got[("make+model+year", "Ford|N|2015", "B")] == (0.5, 1)
    assert len(got) == 9


def _assert_same_popularity(a, b):
    a = a.sort_values(["level", "segment", "sku"]).reset_index(drop=True)
    b = b.sort_values(["level", "segment", "sku"]).reset_index(drop=True)
    assert a[["level", "segment", "sku"]].equals(b[["level", "segment", "sku"]])
    assert a["orders"].tolist() == b["orders"].tolist()
    np.testing.assert_allclose(a["weight"].to_numpy(), b["weight"].to_numpy(), rtol=1e-12)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(0, 60), cut1=st.floats(0, 1), cut2=st.floats(0, 1),
       seed=st.integers(0, 2 ** 16))
def test_merge_of_splits_equals_whole(n, cut1, cut2, seed):
    lines = _lines(n, seed)
    i, j = sorted((int(cut1 * n), int(cut2 * n)))
    whole = partial_popularity(lines, AS_OF, CONFIG)
    parts = [partial_popularity(lines.iloc[s], AS_OF, CONFIG)
             for s in (slice(0, i), slice(i, j), slice(j, n))]
    _assert_same_popularity(merge_popularity(parts), whole)
    # associative and commutative: any grouping and order of the partials gives the same
    left = merge_popularity([merge_popularity(parts[:2]), parts[2]])
    right = merge_popularity([parts[2], merge_popularity([parts[1], parts[0]])])
    _assert_same_popularity(left, whole)
    _assert_same_popularity(right, whole)


def test_merge_of_nothing_is_empty_with_columns():
    empty = merge_popularity([])
    assert list(empty.columns) == ["level", "segment", "sku", "weight", "orders"]
    assert len(merge_popularity([empty, empty])) == 0


# --- PopularityIndex / blended_levels -------------------------------------------------------

SKUS = np.array(["A", "B", "C", "D", "E"])


def _index(rows, config=CONFIG):
    lines = pd.DataFrame(rows, columns=["sku", "make", "model", "year"]).assign(
        event_time=AS_OF)
    return PopularityIndex(partial_popularity(lines, AS_OF, config), SKUS, config)


def _rich_and_thin():
    rows = [("A", "Ford", "M", 2015)] * 900 + [("B", "Ford", "M", 2015)] * 100
    rows += [("C", "Ford", "M", 2016)] * 2000
    rows += [("D", "Ford", "M", 2017)]          # a thin segment: one order
    rows += [("E", "Honda", "N", 2010)] * 50
    rows += [("ZZZ-NOT-IN-CATALOGUE", "Ford", "M", 2015)] * 7
    return _index(rows)


def test_index_ignores_skus_outside_catalogue():
    index = _rich_and_thin()
    weight, total = index.dense("make+model+year", "Ford|M|2015", np.arange(5))
    assert weight.tolist() == [900.0, 100.0, 0.0, 0.0, 0.0]
    assert total == 1000.0
    assert index.observed("make+model+year", "Ford|M|2015").tolist() == [0, 1]
    assert index.observed("make+model+year", "Nope|X|1").tolist() == []
    assert index.observed("make+model+year", None).tolist() == []
    assert index.dense("make", None, np.arange(5))[1] == 0.0


def test_dense_over_a_subset_of_candidates():
    index = _rich_and_thin()
    weight, total = index.dense("make+model", "Ford|M", np.array([1, 3]))
    assert weight.tolist() == [100.0, 1.0] and total == 3001.0


def test_data_rich_segment_stands_on_its_own():
    index = _rich_and_thin()
    levels = blended_levels(index, ["Ford|M|2015", "Ford|M", "Ford", ""], np.arange(5))
    assert [lv.name for lv in levels] == ["make+model+year", "make+model", "make", "global"]
    own = np.array([0.9, 0.1, 0.0, 0.0, 0.0])
    assert np.abs(levels[0].rate - own).max() < 0.02         # k=20 pseudo-orders vs 1000
    assert levels[0].observed.tolist() == [True, True, False, False, False]
    # the parent says C is by far the most popular; the rich segment overrides it
    assert levels[1].rate[2] > levels[1].rate[0]
    assert levels[0].rate[0] > levels[0].rate[2]


def test_thin_segment_borrows_from_parent():
    index = _rich_and_thin()
    levels = blended_levels(index, ["Ford|M|2017", "Ford|M", "Ford", ""], np.arange(5))
    thin, parent = levels[0], levels[1]
    # own share would be 100% D; shrunk with k=20 it is 1/21 own + 20/21 parent
    assert np.abs(thin.rate - parent.rate).max() < 0.05
    assert thin.rate[3] == pytest.approx((1 + 20 * parent.rate[3]) / 21)
    assert np.argmax(thin.rate) == 2  # C, the parent's favourite, still leads


def test_unknown_segment_repeats_parent_and_rates_sum_to_one():
    index = _rich_and_thin()
    levels = blended_levels(index, ["Ford|M|1999", "Ford|M", "Ford", ""], np.arange(5))
    np.testing.assert_allclose(levels[0].rate, levels[1].rate)
    assert not levels[0].observed.any()
    for lv in levels:
        assert lv.rate.sum() == pytest.approx(1.0)
    # global with a uniform prior of 1/5 over 5 SKUs
    g = levels[-1].rate
    assert g[4] == pytest.approx((50 + 20 * 0.2) / (3051 + 20))


def test_zero_shrinkage_uses_raw_shares():
    config = RecsConfig(scoring=ScoringConfig(shrinkage_orders=0.0))
    index = _index([("A", "Ford", "M", 2015)] * 3 + [("B", "Ford", "M", 2015)], config)
    levels = blended_levels(index, ["Ford|M|2015", "Ford|M", "Ford", ""], np.arange(5))
    assert levels[0].rate.tolist() == [0.75, 0.25, 0.0, 0.0, 0.0]


# --- popularity_score ------------------------------------------------------------------------

def test_popularity_score_log_scale():
    scale = CONFIG.scoring.popularity_scale
    rate = np.array([0.0, 1.0 / scale, 1.0])
    assert popularity_score(rate, CONFIG) == pytest.approx(
        [0.0, math.log(2.0), math.log1p(scale)])


@given(st.lists(st.floats(allow_nan=False, allow_infinity=True, width=64), min_size=1,
                max_size=20))
@settings(max_examples=50, deadline=None)
def test_popularity_score_finite_non_negative_and_monotone(values):
    rate = np.array(values)
    score = popularity_score(rate, CONFIG)
    assert np.isfinite(score).all() and (score >= 0).all()
    assert (score <= math.log1p(CONFIG.scoring.popularity_scale) + 1e-12).all()
    order = np.argsort(rate, kind="stable")
    assert (np.diff(score[order]) >= 0).all()
