"""Tests for models.recommend (selection) and models.profiles (the signals it consumes).

The property tests compare ``Recommender.recommend`` with a naive reference
written from SPEC §3 in plain Python: score every candidate, sort everything,
pick greedily, fall back level by level.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from models.catalog import CatalogArrays
from models.config import RecsConfig, RulesConfig, ScoringConfig
from models.popularity import PopularityIndex, partial_popularity
from models.profiles import (attach_signals, dedupe_events, mark_duplicate_users,
                             orders_with_segments)
from models.recommend import (UNSERVED_REASON, Recommender, greedy_pick, picks_frame,
                              rec_columns, vehicle_groups)

AS_OF = pd.Timestamp("2026-03-31", tz="UTC")
CONFIG = RecsConfig()
VEHICLE = ("Ford", "Mustang", 2015)


def ts(text):
    return pd.Timestamp(text, tz="UTC")


def cat_row(sku, part_type="Header", price=100.0, universal=False, group=None,
            url="https://img/x.jpg", tags=()):
    return {"sku": sku, "title": sku, "part_type": part_type, "brand": "Acme", "price": price,
            "image_url": url, "tags": tuple(tags), "is_universal": universal,
            "variant_group": group}


class World:
    """A hand-built catalogue, popularity and recommender."""

    def __init__(self, catalog_rows, orders, config=CONFIG):
        """``orders``: (sku, (make, model, year), count[, age_days])."""
        self.config = config
        self.catalog = CatalogArrays.build(pd.DataFrame(catalog_rows), config.rules)
        lines = []
        for entry in orders:
            sku, (make, model, year), count = entry[:3]
            age = entry[3] if len(entry) > 3 else 0
            lines += [{"sku": sku, "make": make, "model": model, "year": year,
                       "event_time": AS_OF - pd.Timedelta(days=age)}] * count
        frame = pd.DataFrame(lines, columns=["sku", "make", "model", "year", "event_time"])
        frame["year"] = frame["year"].astype("Int64")
        frame["event_time"] = pd.to_datetime(frame["event_time"], utc=True)
        self.popularity = PopularityIndex(partial_popularity(frame, AS_OF, config),
                                          self.catalog.sku, config)
        self.recommender = Recommender(self.catalog, self.popularity, config)

    def users(self, signals: Sequence[dict], vehicle=VEHICLE):
        make, model, year = vehicle
        rows = []
        for i, s in enumerate(signals):
            rows.append({"user_id": f"u{i}", "email_lower": f"u{i}@example.com",
                         "make": make, "model": model, "year": year,
                         "bought": tuple(s.get("bought", ())),
                         "carted": tuple(s.get("carted", ())),
                         "viewed": tuple(s.get("viewed", ()))})
        frame = pd.DataFrame(rows)
        frame["year"] = frame["year"].astype("Int64")
        return frame

    def run(self, signals, fits, vehicle=VEHICLE):
        users = self.users(signals, vehicle)
        picks = self.recommender.recommend(users, self.catalog.index_of(sorted(fits)))
        return users, picks

    def skus(self, picks, u=0) -> List[str]:
        return [self.catalog.sku[i] for i in picks.items[u]] if picks.served[u] else []


# --- greedy_pick ------------------------------------------------------------------------

def test_greedy_pick_caps_part_types():
    types = np.array(["H", "H", "H", "I", "H", "E"])
    keys = np.array(["1", "2", "3", "4", "5", "6"])
    assert greedy_pick(np.arange(6), types, keys, 4, 2) == [0, 1, 3, 5]
    assert greedy_pick(np.arange(6), types, keys, 3, 1) == [0, 3, 5]
    assert greedy_pick(np.array([5, 4, 3, 2, 1, 0]), types, keys, 4, 2) == [5, 4, 3, 2]


def test_greedy_pick_one_per_variant_group():
    types = np.array(["M", "M", "I", "T"])
    keys = np.array(["group:RA003", "group:RA003", "I1", "T1"])
    assert greedy_pick(np.arange(4), types, keys, 3, 2) == [0, 2, 3]


def test_greedy_pick_specialised_variant_is_not_merged_with_base():
    # IGN-COIL-100HO has no variant_group: its key is its own SKU, never its base's
    rows = [cat_row("IGN-COIL-100", "Ignition Coil"), cat_row("IGN-COIL-100HO", "Ignition Coil")]
    arrays = CatalogArrays.build(pd.DataFrame(rows), RulesConfig())
    order = arrays.index_of(["IGN-COIL-100HO", "IGN-COIL-100"])
    picked = greedy_pick(order, arrays.part_type, arrays.variant_key, 2, 2)
    assert [arrays.sku[i] for i in picked] == ["IGN-COIL-100HO", "IGN-COIL-100"]


def test_greedy_pick_returns_short_list_when_rules_block():
    types = np.array(["H", "H", "H"])
    assert greedy_pick(np.arange(3), types, np.array(["a", "b", "c"]), 4, 2) == [0, 1]
    assert greedy_pick(np.array([], dtype=int), types, types, 4, 2) == []


# --- Recommender on a hand-built world -----------------------------------------------------

def base_world(config=CONFIG, extra_rows=(), extra_orders=()):
    rows = [
        cat_row("H1", "Header"), cat_row("H2", "Header"), cat_row("H3", "Header"),
        cat_row("I1", "Intake"), cat_row("E1", "Exhaust"), cat_row("T1", "Turbo"),
        cat_row("U1", "Floor Mat", universal=True),
        cat_row("CHEAP", "Spoiler", price=10.0),
        cat_row("NOFIT", "Radiator"),
        cat_row("RA003B", "Mirror", group="RA003"), cat_row("RA003R", "Mirror", group="RA003"),
        cat_row("IGN-COIL-100", "Ignition Coil"), cat_row("IGN-COIL-100HO", "Ignition Coil"),
        *extra_rows,
    ]
    orders = [
        ("H1", VEHICLE, 90), ("H2", VEHICLE, 80), ("H3", VEHICLE, 70), ("I1", VEHICLE, 40),
        ("E1", VEHICLE, 30), ("T1", VEHICLE, 20), ("U1", VEHICLE, 10),
        ("CHEAP", VEHICLE, 500), ("NOFIT", VEHICLE, 400),
        ("RA003B", VEHICLE, 60), ("RA003R", VEHICLE, 55),
        ("IGN-COIL-100HO", VEHICLE, 50), ("IGN-COIL-100", VEHICLE, 45),
        *extra_orders,
    ]
    return World(rows, orders, config)


FITS = {"H1", "H2", "H3", "I1", "E1", "T1", "CHEAP", "RA003B", "RA003R", "IGN-COIL-100",
        "IGN-COIL-100HO"}


def test_default_recommendations_follow_the_rules():
    world = base_world()
    _, picks = world.run([{}], FITS)
    assert picks.served.tolist() == [True]
    assert picks.source.tolist() == ["make+model+year"]
    # two headers (cap), then mirrors (one per group), then the HO coil
    assert world.skus(picks) == ["H1", "H2", "RA003B", "IGN-COIL-100HO"]
    assert (np.diff(picks.scores[0]) <= 0).all()
    assert np.isfinite(picks.scores).all() and (picks.scores >= 0).all()
    assert (picks.scores <= CONFIG.scoring.max_score).all()


def test_ineligible_and_non_fitting_parts_never_recommended():
    world = base_world()
    _, picks = world.run([{}] * 3, FITS)
    recommended = {world.catalog.sku[i] for i in picks.items.ravel()}
    assert "CHEAP" not in recommended and "NOFIT" not in recommended


def test_exactly_n_recommendations_for_other_n():
    config = RecsConfig(rules=RulesConfig(recs_per_user=6, max_per_part_type=1))
    world = base_world(config)
    _, picks = world.run([{}], FITS)
    skus = world.skus(picks)
    assert len(skus) == 6 and len(set(skus)) == 6
    types = world.catalog.part_type[picks.items[0]]
    assert len(set(types)) == 6  # cap of one per part type


def test_bought_skus_are_excluded():
    world = base_world()
    _, picks = world.run([{"bought": ("H1", "RA003B")}, {}], FITS)
    mine, other = world.skus(picks, 0), world.skus(picks, 1)
    assert "H1" not in mine and "RA003B" not in mine
    assert mine == ["H2", "H3", "RA003R", "IGN-COIL-100HO"]
    assert other == ["H1", "H2", "RA003B", "IGN-COIL-100HO"]


def test_bought_sku_is_excluded_even_when_carted_or_viewed():
    world = base_world()
    _, picks = world.run([{"bought": ("T1", "H1"), "carted": ("T1",), "viewed": ("H1",)}], FITS)
    skus = world.skus(picks)
    assert "T1" not in skus and "H1" not in skus
    assert skus == ["H2", "H3", "RA003B", "IGN-COIL-100HO"]


def test_specialised_variant_not_replaced_by_base_sku():
    world = base_world()
    _, picks = world.run([{"bought": ("H1", "H2", "H3", "RA003B", "RA003R")}], FITS)
    skus = world.skus(picks)
    # both coils may be recommended: the HO is a product of its own
    assert skus[:2] == ["IGN-COIL-100HO", "IGN-COIL-100"]


def test_cart_boost_beats_view_boost():
    # X and Y are equally popular (X first on the SKU tie-break); intent decides
    rows = [cat_row("A", "Intake"), cat_row("B", "Exhaust"), cat_row("X", "Turbo"),
            cat_row("Y", "Seat"), cat_row("Z", "Wheel")]
    orders = [("A", VEHICLE, 40), ("B", VEHICLE, 30), ("Z", VEHICLE, 12), ("X", VEHICLE, 10),
              ("Y", VEHICLE, 10)]
    world = World(rows, orders)
    _, picks = world.run([{}, {"carted": ("Y",), "viewed": ("X",)},
                          {"carted": ("X",), "viewed": ("Y",)}, {"viewed": ("Y",)}], set("ABXYZ"))
    plain, cart_y, cart_x, view_y = (world.skus(picks, u) for u in range(4))
    assert plain == ["A", "B", "Z", "X"]
    assert cart_y.index("Y") < cart_y.index("X")
    assert cart_x.index("X") < cart_x.index("Y")
    assert view_y == ["A", "B", "Y", "Z"]        # a view lifts Y above Z, not above B
    s = CONFIG.scoring
    y_score = picks.scores[1, cart_y.index("Y")]
    x_score = picks.scores[1, cart_y.index("X")]
    assert y_score - x_score == pytest.approx(s.cart_weight - s.view_weight)
    assert picks.scores[3, 2] == pytest.approx(picks.scores[0, 3] + s.view_weight)


def test_carted_and_viewed_same_sku_gets_cart_weight_once():
    world = base_world()
    _, both = world.run([{"carted": ("T1",), "viewed": ("T1",)}], FITS)
    _, cart = world.run([{"carted": ("T1",)}], FITS)
    assert both.scores[0, 0] == pytest.approx(cart.scores[0, 0])


def test_vehicle_specific_part_ranks_above_similar_universal_part():
    rows = [cat_row("SPEC", "Console Latch"), cat_row("UNIV", "Headlight", universal=True),
            cat_row("A", "Intake"), cat_row("B", "Exhaust"), cat_row("C", "Turbo")]
    orders = [("A", VEHICLE, 60), ("B", VEHICLE, 55), ("C", VEHICLE, 50),
              ("SPEC", VEHICLE, 19), ("UNIV", VEHICLE, 20)]
    world = World(rows, orders)
    _, picks = world.run([{}], {"SPEC", "A", "B", "C"})
    skus = world.skus(picks)
    assert skus == ["A", "B", "C", "SPEC"]
    no_bonus = RecsConfig(scoring=ScoringConfig(specific_bonus=0.0))
    world0 = World(rows, orders, no_bonus)
    _, picks0 = world0.run([{}], {"SPEC", "A", "B", "C"})
    assert world0.skus(picks0) == ["A", "B", "C", "UNIV"]


def test_thin_segment_falls_back_to_next_level():
    year16 = ("Ford", "Mustang", 2016)
    world = base_world(extra_orders=[("T1", year16, 5), ("E1", year16, 3), ("I1", year16, 1)])
    # three ordered eligible parts in Ford|Mustang|2016 (< 4): served from make+model
    _, picks = world.run([{}], FITS, vehicle=year16)
    assert picks.source.tolist() == ["make+model"]
    assert picks.served.tolist() == [True]
    _, other = world.run([{}], FITS, vehicle=("Ford", "Focus", 2016))
    assert other.source.tolist() == ["make"]
    _, stranger = world.run([{}], FITS, vehicle=("Kia", "Rio", 2016))
    assert stranger.source.tolist() == ["global"]


def test_purchases_count_against_a_levels_support():
    year16 = ("Ford", "Mustang", 2016)
    world = base_world(extra_orders=[("T1", year16, 5), ("E1", year16, 3), ("I1", year16, 1),
                                     ("H1", year16, 1)])
    _, picks = world.run([{}, {"bought": ("H1",)}, {"bought": ("NOFIT",)}], FITS,
                         vehicle=year16)
    # four supported parts serve from the year; buying one of them leaves three
    assert picks.source.tolist() == ["make+model+year", "make+model", "make+model+year"]


def test_support_counts_only_eligible_fitting_parts():
    # four parts ordered in the segment, but one is cheap and one does not fit
    rows = [cat_row(s, t) for s, t in (("A", "Intake"), ("B", "Exhaust"), ("C", "Turbo"),
                                       ("D", "Seat"), ("E", "Wheel"))] + [
        cat_row("CHEAP", "Spoiler", price=5.0)]
    year16 = ("Ford", "Mustang", 2016)
    orders = [("A", year16, 9), ("B", year16, 8), ("CHEAP", year16, 7), ("D", year16, 6),
              ("A", VEHICLE, 3), ("B", VEHICLE, 3), ("C", VEHICLE, 3), ("E", VEHICLE, 3)]
    world = World(rows, orders)
    _, picks = world.run([{}], {"A", "B", "C", "CHEAP", "E"}, vehicle=year16)
    assert picks.source.tolist() == ["make+model"]
    _, picks_all = world.run([{}], {"A", "B", "C", "D", "E"}, vehicle=year16)
    # D fits now but CHEAP is still ineligible: A, B, D = 3 < 4, falls back again
    assert picks_all.source.tolist() == ["make+model"]


def test_missing_year_is_served_from_make_model():
    world = base_world()
    users, picks = world.run([{}], FITS, vehicle=("Ford", "Mustang", None))
    assert picks.source.tolist() == ["make+model"]


def test_unserved_when_too_few_eligible_parts_anywhere():
    rows = [cat_row("A", "Intake"), cat_row("B", "Exhaust"), cat_row("C", "Turbo"),
            cat_row("X", "Seat", price=10.0), cat_row("Y", "Wheel")]
    orders = [(s, VEHICLE, 5) for s in "ABCXY"]
    world = World(rows, orders)
    _, picks = world.run([{}, {}], {"A", "B", "C", "X"})  # Y does not fit: 3 eligible
    assert picks.served.tolist() == [False, False]
    assert picks.source.tolist() == [None, None]
    assert (picks.items == -1).all()
    assert "fewer eligible parts" in UNSERVED_REASON
    # a fourth eligible part makes it servable (from global at worst)
    _, ok = world.run([{}], {"A", "B", "C", "Y"})
    assert ok.served.tolist() == [True]


def test_unserved_when_purchases_leave_too_few():
    rows = [cat_row(s, t) for s, t in (("A", "Intake"), ("B", "Exhaust"), ("C", "Turbo"),
                                       ("D", "Seat"))]
    world = World(rows, [(s, VEHICLE, 5) for s in "ABCD"])
    _, picks = world.run([{"bought": ("A",)}, {}], set("ABCD"))
    assert picks.served.tolist() == [False, True]


def test_unserved_when_part_type_cap_leaves_too_few():
    rows = [cat_row(s, "Header") for s in ("A", "B", "C", "D", "E")]
    world = World(rows, [(s, VEHICLE, 5) for s in "ABCDE"])
    _, picks = world.run([{}], set("ABCDE"))
    assert picks.served.tolist() == [False]


def test_users_without_signal_columns_get_default_picks():
    world = base_world()
    users = world.users([{}, {}]).drop(columns=["bought", "carted", "viewed"])
    picks = world.recommender.recommend(users, world.catalog.index_of(sorted(FITS)))
    assert picks.served.tolist() == [True, True]
    assert world.skus(picks) == ["H1", "H2", "RA003B", "IGN-COIL-100HO"]


def test_fast_path_with_crowded_prefix_and_weak_boosted_item():
    config = RecsConfig(rules=RulesConfig(recs_per_user=2, max_per_part_type=1))
    rows = [cat_row(f"H{i:02d}", "Header", universal=True) for i in range(16)]
    rows += [cat_row("X", "Intake", universal=True), cat_row("B", "Exhaust", universal=True)]
    orders = [(f"H{i:02d}", VEHICLE, 100) for i in range(16)]
    orders += [("X", VEHICLE, 50), ("B", VEHICLE, 1)]
    world = World(rows, orders, config)
    _, picks = world.run([{"viewed": ("B",)}], set())
    # X scores about 5.7, the viewed B about 1.9 + 0.5: a full sort picks X
    assert world.skus(picks) == ["H00", "X"]


# --- picks_frame / rec_columns / vehicle_groups --------------------------------------------

def test_rec_columns():
    cols = rec_columns(2)
    assert cols == ["user_id", "email_lower", "make", "model", "year", "segment",
                    "rec_part_1", "rec_part_2", "rec1_price", "rec2_price", "rec1_score",
                    "rec2_score", "rec1_image_url", "rec2_image_url", "rec1_part_type",
                    "rec2_part_type", "source"]
    assert len(rec_columns(4)) == 6 + 4 * 5 + 1


def test_picks_frame_aligns_catalogue_fields_and_drops_unserved():
    world = base_world()
    users, picks = world.run([{}, {"bought": ("H1",)}], FITS)
    picks.served[1] = False  # pretend the second user could not be served
    frame = picks_frame(users, picks, world.catalog, CONFIG)
    assert list(frame.columns) == rec_columns(4)
    assert len(frame) == 1 and frame.loc[0, "user_id"] == "u0"
    assert frame.loc[0, "email_lower"] == "u0@example.com"
    assert frame.loc[0, "segment"] == "Ford|Mustang|2015"
    assert frame.loc[0, "source"] == "make+model+year"
    for i in range(1, 5):
        pos = int(world.catalog.index_of([frame.loc[0, f"rec_part_{i}"]])[0])
        assert frame.loc[0, f"rec{i}_price"] == world.catalog.price[pos]
        assert frame.loc[0, f"rec{i}_part_type"] == world.catalog.part_type[pos]
        assert frame.loc[0, f"rec{i}_image_url"] == world.catalog.image_url[pos]
        assert frame.loc[0, f"rec{i}_score"] == picks.scores[0, i - 1]


def test_vehicle_groups_separate_missing_values():
    users = pd.DataFrame({"user_id": ["a", "b", "c", "d"],
                          "make": ["Ford", "Ford", "Ford", "Honda"],
                          "model": ["M", "M", "M", "C"],
                          "year": pd.array([2015, 2015, None, 2015], dtype="Int64")})
    groups = {tuple(g["user_id"]) for _, g in vehicle_groups(users, ("make", "model", "year"))}
    assert groups == {("a", "b"), ("c",), ("d",)}


# --- property: Recommender == naive full-sort reference ------------------------------------

VEHICLES = [("Ford", "M", 2015), ("Ford", "M", 2016), ("Ford", "N", 2015),
            ("Honda", "C", 2010), ("Ford", "M", None)]
PART_TYPES = ["Header", "Intake", "Exhaust", "Turbo"]


def reference(scn: dict, config: RecsConfig) -> List[Tuple[Optional[List[str]],
                                                           Optional[List[float]],
                                                           Optional[str]]]:
    """SPEC §3 by brute force: score all candidates, sort all, pick, fall back."""
    rules, scoring = config.rules, config.scoring
    n, cap, k = rules.recs_per_user, rules.max_per_part_type, scoring.shrinkage_orders
    cat = sorted(scn["catalog"], key=lambda r: r["sku"])
    skus = [r["sku"] for r in cat]
    m = len(cat)
    cand = [i for i, r in enumerate(cat) if r["price"] >= rules.min_price
            and (r["sku"] in scn["fits"] or r["is_universal"])]
    counts: Dict[str, Dict[str, Dict[str, float]]] = {}
    for sku, vehicle, count, age in scn["orders"]:
        weight = 0.5 ** (age / scoring.half_life_days)
        for level in config.levels:
            values = dict(zip(("make", "model", "year"), vehicle))
            parts = [values[a] for a in level]
            if any(p is None for p in parts):
                continue
            seg = "|".join(str(p) for p in parts)
            bucket = counts.setdefault(config.level_name(level), {}).setdefault(seg, {})
            bucket[sku] = bucket.get(sku, 0.0) + weight * count
    vehicle = dict(zip(("make", "model", "year"), scn["vehicle"]))
    rate = np.full(m, 1.0 / m)
    levels = []
    for level in reversed(config.levels):
        name = config.level_name(level)
        parts = [vehicle[a] for a in level]
        seg = None if any(p is None for p in parts) else "|".join(str(p) for p in parts)
        bucket = counts.get(name, {}).get(seg, {}) if seg is not None else {}
        w = np.array([bucket.get(s, 0.0) for s in skus])
        total = float(sum(bucket.values()))
        if total + k > 0:
            rate = (w + k * rate) / (total + k)
        levels.append((name, seg, rate.copy(), w > 0))
    levels.reverse()
    specific = np.array([not r["is_universal"] for r in cat])
    out = []
    for user in scn["users"]:
        bought = set(user["bought"])
        boost = np.zeros(m)
        for i, s in enumerate(skus):
            if s in user["viewed"]:
                boost[i] = max(boost[i], scoring.view_weight)
            if s in user["carted"]:
                boost[i] = max(boost[i], scoring.cart_weight)
        result = (None, None, None)
        for name, seg, level_rate, observed in levels:
            if seg is None:
                continue
            pool = [i for i in cand if skus[i] not in bought]
            support = sum(1 for i in pool if observed[i])
            if name != "global" and support < n:
                continue
            base = np.log1p(np.clip(level_rate, 0.0, 1.0) * scoring.popularity_scale) + (
                scoring.specific_bonus * specific)
            score = base + boost
            ranked = sorted(pool, key=lambda i: (-score[i], skus[i]))
            picks, per_type, groups = [], {}, set()
            for i in ranked:
                group = cat[i]["variant_group"] or ("sku:" + skus[i])
                if group in groups or per_type.get(cat[i]["part_type"], 0) >= cap:
                    continue
                picks.append(i)
                groups.add(group)
                per_type[cat[i]["part_type"]] = per_type.get(cat[i]["part_type"], 0) + 1
                if len(picks) == n:
                    break
            if len(picks) == n:
                result = ([skus[i] for i in picks], [float(score[i]) for i in picks], name)
                break
        out.append(result)
    return out


def run_scenario(scn: dict):
    config = RecsConfig(
        scoring=ScoringConfig(shrinkage_orders=scn["k"]),
        rules=RulesConfig(recs_per_user=scn["n"], max_per_part_type=scn["cap"]))
    rows = [cat_row(r["sku"], r["part_type"], r["price"], r["is_universal"], r["variant_group"])
            for r in scn["catalog"]]
    world = World(rows, scn["orders"], config)
    users, picks = world.run(scn["users"], scn["fits"], vehicle=scn["vehicle"])
    got = []
    for u in range(len(users)):
        if picks.served[u]:
            got.append((world.skus(picks, u), picks.scores[u].tolist(), picks.source[u]))
        else:
            got.append((None, None, None))
    return got, reference(scn, config)


def assert_same(got, want):
    assert len(got) == len(want)
    for (g_skus, g_scores, g_source), (w_skus, w_scores, w_source) in zip(got, want):
        assert g_source == w_source
        assert g_skus == w_skus
        if w_scores is not None:
            np.testing.assert_allclose(g_scores, w_scores, rtol=1e-9, atol=1e-12)
            assert all(a >= b for a, b in zip(g_scores, g_scores[1:]))


@st.composite
def scenarios(draw, crowded: bool):
    """Random small worlds.

    ``crowded``: any part-type cap and variant groups with catalogues of any size.
    Otherwise either the catalogue is small (at most 8·n candidates, so every pass
    sees all of them) or nothing crowds the ranking (cap ≥ n, no variant groups)
    while users still carry purchases, carts and views.
    """
    n = draw(st.integers(1, 4))
    if crowded:
        m = draw(st.integers(n, 40))
        cap = draw(st.integers(1, 3))
        grouped = True
    elif draw(st.booleans()):
        m = draw(st.integers(n, 8 * n))
        cap = draw(st.integers(1, 3))
        grouped = True
    else:
        m = draw(st.integers(n, 45))
        cap = n
        grouped = False
    catalog = []
    for i in range(m):
        catalog.append({
            "sku": f"S{i:02d}",
            # crowded worlds are dominated by one part type, as a Header-heavy segment is
            "part_type": draw(st.sampled_from(PART_TYPES + ["Header"] * (6 if crowded else 0))),
            "price": draw(st.sampled_from([100.0, 100.0, 100.0, 10.0])),
            "is_universal": draw(st.booleans()) and draw(st.booleans()),
            "variant_group": draw(st.sampled_from([None, None, "G1", "G2"])) if grouped else None,
        })
    skus = [c["sku"] for c in catalog]
    fits = set(draw(st.lists(st.sampled_from(skus), max_size=m)))
    orders = draw(st.lists(st.tuples(st.sampled_from(skus), st.sampled_from(VEHICLES[:4]),
                                     st.integers(1, 6), st.sampled_from([0, 30, 60])),
                           max_size=50))
    vehicle = draw(st.sampled_from(VEHICLES))
    sku_sets = st.lists(st.sampled_from(skus), max_size=4, unique=True).map(tuple)
    users = draw(st.lists(st.fixed_dictionaries(
        {"bought": sku_sets, "carted": sku_sets, "viewed": sku_sets}), min_size=1, max_size=3))
    return {"n": n, "cap": cap, "k": draw(st.sampled_from([0.0, 5.0, 20.0])),
            "catalog": catalog, "fits": fits, "orders": orders, "vehicle": vehicle,
            "users": users}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scn=scenarios(crowded=False))
def test_recommend_equals_bruteforce_reference(scn):
    got, want = run_scenario(scn)
    assert_same(got, want)


def _crowded_prefix_example():
    """16 headers fill the fast path's prefix (8·n with n=2); only one may be picked."""
    catalog = [{"sku": f"S{i:02d}", "part_type": "Header", "price": 100.0,
                "is_universal": True, "variant_group": None} for i in range(16)]
    catalog += [{"sku": "S16", "part_type": "Intake", "price": 100.0, "is_universal": True,
                 "variant_group": None},
                {"sku": "S17", "part_type": "Exhaust", "price": 100.0, "is_universal": True,
                 "variant_group": None}]
    orders = [(f"S{i:02d}", VEHICLES[0], 6, 0) for i in range(16)]
    orders += [("S16", VEHICLES[0], 3, 0), ("S17", VEHICLES[0], 1, 60)]
    return {"n": 2, "cap": 1, "k": 20.0, "catalog": catalog, "fits": set(), "orders": orders,
            "vehicle": VEHICLES[0], "users": [{"bought": (), "carted": (), "viewed": ("S17",)}]}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(scn=_crowded_prefix_example())
@given(scn=scenarios(crowded=True))
def test_recommend_equals_bruteforce_reference_crowded(scn):
    got, want = run_scenario(scn)
    assert_same(got, want)


# --- profiles: the signals the recommender consumes ----------------------------------------

def test_dedupe_events_keeps_earliest_copy():
    events = pd.DataFrame({
        "event_id": ["e1", "e1", "e2", "e1", "e3", "e3"],
        "event_time": [ts("2026-01-05"), ts("2026-01-01"), ts("2026-01-02"), ts("2026-01-03"),
                       ts("2026-01-04"), ts("2026-01-04")],
        "payload": [1, 2, 3, 4, 5, 6],
    })
    deduped = dedupe_events(events)
    assert deduped.duplicates == 3
    kept = dict(zip(deduped.rows["event_id"], deduped.rows["payload"]))
    assert kept == {"e1": 2, "e2": 3, "e3": 5}
    assert dedupe_events(events.iloc[::-1]).rows["payload"].tolist()[0] == 2


def test_mark_duplicate_users_latest_update_then_lowest_id():
    users = pd.DataFrame({
        "user_id": ["u2", "u1", "u0", "u9", "u5", "u4", "u7"],
        "email_lower": ["a@x", "a@x", "a@x", "a@x", "b@x", "b@x", "c@x"],
        "updated_at": [ts("2026-01-01"), ts("2026-01-01"), ts("2025-01-01"), pd.NaT,
                       pd.NaT, ts("2020-01-01"), ts("2026-01-01")],
    })
    marked = mark_duplicate_users(users, "email_lower")
    winners = set(marked.loc[~marked["is_duplicate"], "user_id"])
    assert winners == {"u1", "u4", "u7"}  # tie on a@x → lowest user_id; NaT loses
    assert len(marked) == len(users)       # duplicates are flagged, not dropped
    assert marked.groupby("email_lower")["is_duplicate"].apply(lambda s: (~s).sum()).eq(1).all()


def test_mark_duplicate_users_respects_existing_flags():
    users = pd.DataFrame({"user_id": ["u1", "u2"], "email_lower": ["a@x", "a@x"],
                          "updated_at": [ts("2026-02-01"), ts("2026-01-01")],
                          "is_duplicate": [True, False]})
    marked = mark_duplicate_users(users, "email_lower")
    assert dict(zip(marked["user_id"], marked["is_duplicate"])) == {"u1": True, "u2": False}


def _signal_events():
    d = pd.Timedelta

    def e(offset, name, sku, user="u1", order=None):
        return {"event_id": f"{name}-{sku}-{user}-{offset}", "event_time": AS_OF + offset,
                "user_id": user, "event_name": name, "sku": sku, "order_id": order}
    return pd.DataFrame([
        e(-d(days=365), "Placed Order", "B_EDGE", order="o1"),
        e(-d(days=365, seconds=1), "Placed Order", "B_OLD", order="o2"),
        e(d(seconds=1), "Placed Order", "B_FUTURE", order="o3"),
        e(d(0), "Ordered Product", "B_NOW", order="o4"),
        e(-d(days=10), "Consumer Website Order", "B_NOW", order="o4"),
        e(-d(days=93), "Cart Update", "C_EDGE"),
        e(-d(days=93, seconds=1), "Cart Update", "C_OLD"),
        e(d(days=1), "Cart Update", "C_FUTURE"),
        e(-d(days=1), "Viewed Product", "V_IN"),
        e(-d(days=2), "Viewed Product", "V_IN"),
        e(-d(days=94), "Viewed Product", "V_OLD"),
        e(d(hours=1), "Viewed Product", "V_FUTURE"),
        e(-d(days=1), "Viewed Product", "V_IN", user="u2"),
        e(-d(days=1), "Viewed Product", "V_GHOST", user="ghost"),
    ])


def test_attach_signals_windows():
    users = pd.DataFrame({"user_id": ["u1", "u2", "u3"], "email_lower": ["a", "b", "c"]})
    out = attach_signals(users, _signal_events(), AS_OF, CONFIG)
    row = out.set_index("user_id")
    assert row.loc["u1", "bought"] == ("B_EDGE", "B_NOW")   # 365-day window, not after as_of
    assert row.loc["u1", "carted"] == ("C_EDGE",)            # 93-day intent window
    assert row.loc["u1", "viewed"] == ("V_IN",)              # deduplicated, no future views
    assert row.loc["u2", "viewed"] == ("V_IN",) and row.loc["u2", "bought"] == ()
    assert row.loc["u3", "bought"] == () and row.loc["u3", "carted"] == ()
    assert out["user_id"].tolist() == ["u1", "u2", "u3"] and "email_lower" in out


def test_attach_signals_windows_follow_config():
    config = RecsConfig(scoring=ScoringConfig(intent_window_days=1),
                        rules=RulesConfig(exclusion_days=30))
    users = pd.DataFrame({"user_id": ["u1"]})
    row = attach_signals(users, _signal_events(), AS_OF, config).iloc[0]
    assert row["bought"] == ("B_NOW",)
    assert row["carted"] == () and row["viewed"] == ("V_IN",)


def test_orders_with_segments_counts_unknown_buyers_globally():
    events = pd.DataFrame([
        {"event_id": "1", "event_time": AS_OF, "user_id": "u1", "event_name": "Placed Order",
         "sku": "A", "order_id": "o1"},
        {"event_id": "2", "event_time": AS_OF, "user_id": "u1", "event_name": "Ordered Product",
         "sku": "A", "order_id": "o1"},
        {"event_id": "3", "event_time": AS_OF, "user_id": "ghost",
         "event_name": "Placed Order", "sku": "B", "order_id": "o2"},
    ])
    users = pd.DataFrame({"user_id": ["u1", "u1"], "make": ["Ford", "Honda"],
                          "model": ["M", "C"], "year": [2015, 2010],
                          "is_duplicate": [True, False]})
    lines = orders_with_segments(events, users, ("make", "model", "year"))
    assert len(lines) == 2
    by_sku = lines.set_index("sku")
    assert by_sku.loc["A", "make"] == "Honda"     # the non-duplicate profile wins
    assert pd.isna(by_sku.loc["B", "make"])
    pop = partial_popularity(lines, AS_OF, CONFIG)
    assert set(pop.loc[pop["level"] == "global", "sku"]) == {"A", "B"}
    assert set(pop.loc[pop["level"] == "make", "sku"]) == {"A"}


# --- the slot mix (#14) ---------------------------------------------------------------------

def test_mix_all_restricts_every_source_and_fills_in_mix_order():
    """u0's buy-again candidates hold an ineligible, a cheap and a non-fitting SKU (dropped),
    and A1, bought inside the exclusion window (kept: buy-again is exempt). Popularity fills
    the rest without A1 (rule 4) or a third header (the cap). u1 has no purchases: the
    popularity slots take every slot, exactly as recommend() would."""
    from models.config import CandidatesConfig
    from models.popularity import segment_key
    from models.recommend import mix_all, recommend_all, slot_source_columns
    config = RecsConfig(candidates=CandidatesConfig(
        mix=(("buy_again", 2), ("segment_popularity", 2))))
    rows = [cat_row("A1"), cat_row("A2"), cat_row("A3"), cat_row("I1", "Intake"),
            cat_row("E1", "Exhaust"), cat_row("T1", "Tire"),
            cat_row("REF", "Intake", tags=("refurbished",)), cat_row("CHEAP", "Intake", price=10),
            cat_row("NF", "Intake")]
    world = World(rows, [("A3", VEHICLE, 6), ("A1", VEHICLE, 5), ("I1", VEHICLE, 4),
                         ("E1", VEHICLE, 3), ("T1", VEHICLE, 2)], config)
    users = world.users([{"bought": ("A1",)}, {}])
    fitting = {segment_key(list(VEHICLE)): frozenset(s["sku"] for s in rows if s["sku"] != "NF")}
    personal = pd.DataFrame({"user_id": "u0", "sku": ["REF", "CHEAP", "NF", "A1", "A2"],
                             "score": [9.0, 8.0, 7.0, 6.0, 5.0], "source": "buy_again"})
    recs, unserved = mix_all(world.recommender, users, fitting, personal, {})
    assert len(unserved) == 0
    recs = recs.set_index("user_id")
    parts = [f"rec_part_{i}" for i in range(1, 5)]
    assert recs.loc["u0", parts].tolist() == ["A1", "A2", "I1", "E1"]
    assert recs.loc["u0", slot_source_columns(4)].tolist() == [
        "buy_again", "buy_again", "segment_popularity", "segment_popularity"]
    assert recs.loc["u0", ["rec1_score", "rec2_score"]].tolist() == [6.0, 5.0]
    plain, _ = recommend_all(world.recommender, users, fitting)
    plain = plain.set_index("user_id")
    assert recs.loc["u1", parts].tolist() == plain.loc["u1", parts].tolist() == [
        "A3", "A1", "I1", "E1"]
    assert recs.loc["u1", "source"] == plain.loc["u1", "source"]
    assert recs.loc["u1", [f"rec{i}_score" for i in range(1, 5)]].tolist() == pytest.approx(
        plain.loc["u1", [f"rec{i}_score" for i in range(1, 5)]].tolist())


def test_mix_all_shared_trending_list_is_restricted_per_vehicle():
    """A trending list is one list for everyone: a SKU that does not fit the user's vehicle,
    or is ineligible, never reaches a slot; trending slots come first, popularity tops up."""
    from models.config import CandidatesConfig
    from models.popularity import segment_key
    from models.recommend import mix_all, slot_source_columns
    config = RecsConfig(candidates=CandidatesConfig(
        mix=(("trending", 2), ("segment_popularity", 2))))
    rows = [cat_row("A1"), cat_row("I1", "Intake"), cat_row("E1", "Exhaust"),
            cat_row("T1", "Tire"), cat_row("NF", "Intake"), cat_row("CHEAP", "Tire", price=1)]
    world = World(rows, [("A1", VEHICLE, 6), ("I1", VEHICLE, 5), ("E1", VEHICLE, 4)], config)
    users = world.users([{}])
    fitting = {segment_key(list(VEHICLE)): frozenset({"A1", "I1", "E1", "T1", "CHEAP"})}
    trending = pd.DataFrame({"sku": ["NF", "CHEAP", "T1", "E1"], "score": [9., 8., 7., 6.]})
    none = pd.DataFrame(columns=["user_id", "sku", "score", "source"])
    recs, _ = mix_all(world.recommender, users, fitting, none, {"trending": trending})
    assert recs[[f"rec_part_{i}" for i in range(1, 5)]].iloc[0].tolist() == [
        "T1", "E1", "A1", "I1"]
    assert recs[slot_source_columns(4)].iloc[0].tolist() == ["trending"] * 2 + [
        "segment_popularity"] * 2
