"""Tests for models.rules: each QA check counts exactly the violation planted for it."""
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.catalog import CatalogArrays
from models.config import CandidatesConfig, RecsConfig, RulesConfig
from models.popularity import PopularityIndex, partial_popularity
from models.recommend import Recommender, picks_frame
from models.rules import RULES, QAContext, check, duplicate_emails, qa_table

CONFIG = RecsConfig()
AS_OF = pd.Timestamp("2026-03-31", tz="UTC")
Y15, Y16 = "Ford|Mustang|2015", "Ford|Mustang|2016"


def cat_row(sku, part_type, price=100.0, universal=False, group=None, tags=()):
    return {"sku": sku, "title": sku, "part_type": part_type, "brand": "Acme", "price": price,
            "image_url": f"https://img/{sku}.jpg", "tags": tuple(tags),
            "is_universal": universal, "variant_group": group}


CATALOG = pd.DataFrame([
    cat_row("A1", "Header"), cat_row("H2", "Header"), cat_row("H3", "Header"),
    cat_row("I1", "Intake"), cat_row("E1", "Exhaust"), cat_row("T1", "Turbo"),
    cat_row("U1", "Floor Mat", universal=True),
    cat_row("VA", "Mirror", group="RA003"), cat_row("VB", "Mirror", group="RA003"),
    cat_row("CHEAP", "Spoiler", price=40.0),
    cat_row("REF", "Wheel", tags=("refurbished",)),
    cat_row("SVC-9", "Service Plan"),
    cat_row("NOFIT", "Radiator"),
    cat_row("LOW", "Exhaust Gasket"),
])
FITTING_SKUS = frozenset({"A1", "H2", "H3", "I1", "E1", "T1", "VA", "VB", "CHEAP", "REF",
                          "SVC-9", "LOW"})


def _context(bought=None):
    arrays = CatalogArrays.build(CATALOG, CONFIG.rules)
    ordered = {Y15: ["A1", "H2", "I1", "E1", "T1", "U1", "VA"], Y16: ["T1"]}
    lines = []
    for segment, skus in ordered.items():
        make, model, year = segment.split("|")
        lines += [{"sku": s, "make": make, "model": model, "year": int(year),
                   "event_time": AS_OF} for s in skus]
    pop = PopularityIndex(partial_popularity(pd.DataFrame(lines), AS_OF, CONFIG),
                          arrays.sku, CONFIG)
    return QAContext(
        catalog=CATALOG.set_index("sku"),
        fitting={Y15: FITTING_SKUS, Y16: FITTING_SKUS},
        bought=dict(bought or {"u1": ("T1",)}),
        popularity=pop, catalog_skus=arrays.sku,
        eligible_skus=frozenset(arrays.sku[arrays.eligible]))


def _rec(user, email, year, skus, scores, source):
    by_sku = CATALOG.set_index("sku")
    row = {"user_id": user, "email_lower": email, "make": "Ford", "model": "Mustang",
           "year": year, "segment": f"Ford|Mustang|{year}"}
    for i, sku in enumerate(skus, 1):
        row[f"rec_part_{i}"] = sku
    for i, sku in enumerate(skus, 1):
        row[f"rec{i}_price"] = by_sku.loc[sku, "price"]
    for i, score in enumerate(scores, 1):
        row[f"rec{i}_score"] = float(score)
    for i, sku in enumerate(skus, 1):
        row[f"rec{i}_image_url"] = by_sku.loc[sku, "image_url"]
    for i, sku in enumerate(skus, 1):
        row[f"rec{i}_part_type"] = by_sku.loc[sku, "part_type"]
    row["source"] = source
    return row


def clean_recs():
    return pd.DataFrame([
        # two headers (the cap, allowed) and a universal part outside the fitment
        _rec("u1", "a@x.com", 2015, ["A1", "H2", "I1", "U1"], [4, 3, 2, 1], "make+model+year"),
        # equal scores and a zero score are allowed
        # (H3 fits but was never ordered in the segment: it adds no support)
        _rec("u2", "b@x.com", 2015, ["I1", "E1", "H3", "VA"], [5, 5, 2, 0], "make+model+year"),
        # a thin year served from make+model
        _rec("u3", "c@x.com", 2016, ["A1", "E1", "T1", "VB"], [3, 2, 1, 0.5], "make+model"),
        _rec("u4", "d@x.com", 2015, ["A1", "I1", "E1", "T1"], [3, 2, 1, 0.5], "global"),
    ])


def _set_rec(recs, user, pos, sku):
    """Replace one recommendation keeping the row's catalogue fields consistent."""
    by_sku = CATALOG.set_index("sku")
    i = recs.index[recs["user_id"] == user][0]
    recs.loc[i, f"rec_part_{pos}"] = sku
    recs.loc[i, f"rec{pos}_price"] = by_sku.loc[sku, "price"]
    recs.loc[i, f"rec{pos}_image_url"] = by_sku.loc[sku, "image_url"]
    recs.loc[i, f"rec{pos}_part_type"] = by_sku.loc[sku, "part_type"]


def _set(recs, user, column, value):
    recs.loc[recs.index[recs["user_id"] == user][0], column] = value


def _violations(recs, ctx=None):
    counts = check(recs, ctx or _context(), CONFIG)
    assert set(counts) == {r.id for r in RULES}
    return {rule: n for rule, n in counts.items() if n}


def test_clean_rows_have_no_violations():
    assert _violations(clean_recs()) == {}


def test_empty_batch_has_no_violations():
    counts = check(clean_recs().iloc[:0], _context(), CONFIG)
    assert counts == {r.id: 0 for r in RULES}


PLANTS = {
    "1 price below floor": (1, lambda r, b: _set_rec(r, "u1", 4, "CHEAP")),
    "3 three of one part type": (3, lambda r, b: _set_rec(r, "u1", 4, "H3")),
    "3 part type disagrees with catalogue": (
        3, lambda r, b: _set(r, "u1", "rec3_part_type", "Header")),
    "4 bought in window": (4, lambda r, b: b.__setitem__("u1", ("T1", "I1"))),
    "5 refurbished": (5, lambda r, b: _set_rec(r, "u1", 4, "REF")),
    "6 service SKU": (6, lambda r, b: _set_rec(r, "u1", 4, "SVC-9")),
    "7 http image": (7, lambda r, b: _set(r, "u1", "rec2_image_url", "http://img/H2.jpg")),
    "7 missing image": (7, lambda r, b: _set(r, "u2", "rec1_image_url", None)),
    "7 image without host": (7, lambda r, b: _set(r, "u2", "rec1_image_url", "https:///x")),
    "7 image leaves its attribute": (7, lambda r, b: _set(
        r, "u1", "rec3_image_url", 'https://img/I1.jpg" onerror="alert(1)')),
    "7 space in image": (7, lambda r, b: _set(r, "u1", "rec4_image_url", "https://img/a b.jpg")),
    "8 does not fit": (8, lambda r, b: _set_rec(r, "u1", 4, "NOFIT")),
    "9 two of one variant group": (9, lambda r, b: _set_rec(r, "u2", 3, "VB")),
    "9 duplicate SKU": (9, lambda r, b: _set_rec(r, "u2", 3, "VA")),
    "10 increasing scores": (10, lambda r, b: _set(r, "u1", "rec3_score", 3.5)),
    "11 above max score": (11, lambda r, b: _set(r, "u1", "rec1_score",
                                                 CONFIG.scoring.max_score + 1.0)),
    "11 negative score": (11, lambda r, b: _set(r, "u1", "rec4_score", -0.1)),
    "11 NaN score": (11, lambda r, b: _set(r, "u1", "rec4_score", float("nan"))),
    "12 thin year served": (12, lambda r, b: _set(r, "u3", "source", "make+model+year")),
    "12 unknown source": (12, lambda r, b: _set(r, "u1", "source", "bogus")),
    "12 purchases leave the year thin": (
        12, lambda r, b: b.__setitem__("u2", ("A1", "H2", "T1", "U1"))),
    "13 upper-case email": (13, lambda r, b: _set(r, "u1", "email_lower", "A@x.com")),
    "13 padded email": (13, lambda r, b: _set(r, "u1", "email_lower", " a@x.com")),
    "13 not an email": (13, lambda r, b: _set(r, "u1", "email_lower", "ax.com")),
    "13 header injection": (13, lambda r, b: _set(r, "u1", "email_lower",
                                                  "a@x.com\r\nbcc: all@x.com")),
    "13 two at signs": (13, lambda r, b: _set(r, "u1", "email_lower", "a@b@c.com")),
    "14 same email twice": (14, lambda r, b: _set(r, "u2", "email_lower", "a@x.com")),
    "15 low-value part type": (15, lambda r, b: _set_rec(r, "u1", 4, "LOW")),
}


@pytest.mark.parametrize("plant", sorted(PLANTS), ids=sorted(PLANTS))
def test_one_planted_violation_counts_once_under_its_rule(plant):
    rule, apply = PLANTS[plant]
    recs = clean_recs()
    bought = {"u1": ("T1",)}
    apply(recs, bought)
    assert _violations(recs, _context(bought)) == {rule: 1}


def test_rule_12_planted_purchases_really_thin_the_segment():
    # control for the plant above: four purchases of non-supported parts change nothing
    ctx = _context({"u1": ("T1",), "u2": ("CHEAP", "REF", "NOFIT", "LOW")})
    assert _violations(clean_recs(), ctx) == {}


def test_rule_2_counts_a_missing_recommendation():
    recs = clean_recs()
    _set(recs, "u1", "rec_part_4", None)
    assert _violations(recs).get(2) == 1


def test_rule_2_counts_an_unknown_sku():
    recs = clean_recs()
    _set(recs, "u1", "rec_part_4", "GHOST-SKU")
    assert _violations(recs).get(2) == 1


@pytest.mark.parametrize("sku", [None, "GHOST-SKU"])
def test_rule_2_violation_counts_only_under_rule_2(sku):
    recs = clean_recs()
    _set(recs, "u1", "rec_part_4", sku)
    assert _violations(recs) == {2: 1}


def test_violations_count_rows_not_positions():
    recs = clean_recs()
    _set_rec(recs, "u1", 3, "CHEAP")
    _set_rec(recs, "u1", 4, "CHEAP")   # two cheap SKUs in one row: one violating row
    _set_rec(recs, "u2", 4, "CHEAP")
    counts = _violations(recs)
    assert counts[1] == 2


def test_rules_use_configured_thresholds():
    recs = clean_recs()
    _set_rec(recs, "u1", 4, "CHEAP")
    loose = RecsConfig(rules=RulesConfig(min_price=30.0))
    assert check(recs, _context(), loose)[1] == 0
    strict = RecsConfig(rules=RulesConfig(max_per_part_type=1))
    assert check(clean_recs(), _context(), strict)[3] == 1  # u1 has two headers


def test_qa_on_recommender_output_is_clean():
    """End to end on the model layer: what the Recommender picks passes every check."""
    ctx = _context({"u1": ("T1",), "u2": ("A1",)})
    arrays = CatalogArrays.build(CATALOG, CONFIG.rules)
    recommender = Recommender(arrays, ctx.popularity, CONFIG)
    frames = []
    for year, users in ((2015, ["u1", "u2"]), (2016, ["u3"])):
        group = pd.DataFrame({
            "user_id": users, "email_lower": [f"{u}@x.com" for u in users], "make": "Ford",
            "model": "Mustang", "year": pd.array([year] * len(users), dtype="Int64"),
            "bought": [tuple(ctx.bought.get(u, ())) for u in users],
            "carted": [("VB",)] * len(users), "viewed": [("E1",)] * len(users)})
        fits = arrays.index_of(sorted(ctx.fitting[f"Ford|Mustang|{year}"]))
        picks = recommender.recommend(group, fits)
        assert picks.served.all()
        frames.append(picks_frame(group, picks, arrays, CONFIG))
    recs = pd.concat(frames, ignore_index=True)
    assert recs["source"].tolist() == ["make+model+year", "make+model+year", "make+model"]
    assert _violations(recs, ctx) == {}


def test_duplicate_emails():
    assert duplicate_emails(pd.Series(["a@x", "b@x", "a@x", "a@x", None])) == 2
    assert duplicate_emails(pd.Series([], dtype=object)) == 0


def test_qa_table_shape():
    counts = {r.id: 0 for r in RULES}
    counts[3] = 538
    table = qa_table(counts, CONFIG)
    assert list(table.columns) == ["rule_id", "name", "violations"]
    assert table["rule_id"].tolist() == list(range(1, 16))
    assert table.loc[table["rule_id"] == 3, "violations"].item() == 538
    assert table["violations"].sum() == 538
    names = dict(zip(table["rule_id"], table["name"]))
    assert names[2] == "exactly 4 recommendations per user"
    assert names[3] == "at most 2 SKUs of one part type"
    assert not any("{" in name for name in table["name"])
    other = qa_table({}, RecsConfig(rules=RulesConfig(recs_per_user=6, max_per_part_type=1)))
    assert other["violations"].tolist() == [0] * 15
    assert dict(zip(other["rule_id"], other["name"]))[2] == "exactly 6 recommendations per user"


HOSTILE = (None, float("nan"), float("inf"), -1.0, 1e308, "", "  ", "NOT-A-SKU", "A1",
           "http://x", "ÅÉ@X.COM", 0)


@settings(max_examples=80, deadline=None)
@given(edits=st.lists(st.tuples(st.integers(0, len(clean_recs()) - 1),
                                st.sampled_from(list(clean_recs().columns)),
                                st.sampled_from(HOSTILE)), min_size=1, max_size=6))
def test_qa_never_raises_on_hostile_rows_and_counts_rows(edits):
    """Any value in any column: every rule returns a row count, and hostile values are caught."""
    recs = clean_recs().astype(object)
    for row, column, value in edits:
        recs.loc[row, column] = value
    counts = check(recs, _context(), CONFIG)
    assert set(counts) == {r.id for r in RULES}
    assert all(isinstance(n, int) and 0 <= n <= len(recs) for n in counts.values())
    clearly_bad = [(c, v) for _, c, v in edits
                   if (c.startswith("rec_part_") and v in (None, "", "  ", "NOT-A-SKU", 0))
                   or (c.endswith("_score") and v in (None, float("inf"), -1.0, 1e308))
                   or (c == "email_lower" and v in (None, "", "  ", "ÅÉ@X.COM", 0))]
    if clearly_bad:
        assert sum(counts.values()) > 0, clearly_bad


# --- slot kinds (#14): a mix names each slot's source in recN_source --------------------

MIX_CONFIG = RecsConfig(candidates=CandidatesConfig(mix=(("buy_again", 2),
                                                         ("segment_popularity", 2))))


def _mixed(sources_by_user, recs=None):
    recs = clean_recs() if recs is None else recs
    for i in range(1, 5):
        recs[f"rec{i}_source"] = [sources_by_user.get(u, ["segment_popularity"] * 4)[i - 1]
                                  for u in recs["user_id"]]
    return recs


def _mixed_violations(recs, purchased):
    ctx = _context()
    ctx.purchased = purchased
    counts = check(recs, ctx, MIX_CONFIG)
    assert set(counts) == {r.id for r in RULES} | {16}
    return {rule: n for rule, n in counts.items() if n}


def test_rule_4_exempts_buy_again_slots_only():
    recs = clean_recs()
    _set_rec(recs, "u1", 4, "T1")  # u1 bought T1 inside the exclusion window
    kinds = {"u1": ["segment_popularity"] * 3 + ["buy_again"]}
    assert _mixed_violations(_mixed(kinds, recs.copy()), {"u1": ("T1",)}) == {}
    kinds = {"u1": ["segment_popularity"] * 3 + ["also_bought"]}
    assert _mixed_violations(_mixed(kinds, recs.copy()), {"u1": ("T1",)}) == {4: 1}


def test_rule_16_a_buy_again_slot_must_hold_a_bought_sku():
    kinds = {"u2": ["buy_again", "buy_again", "segment_popularity", "segment_popularity"]}
    assert _mixed_violations(_mixed(kinds), {"u2": ("I1", "E1")}) == {}
    assert _mixed_violations(_mixed(kinds), {"u2": ("I1",)}) == {16: 1}
    assert _mixed_violations(_mixed(kinds), {}) == {16: 1}


def test_rules_10_and_11_hold_within_each_source():
    recs = clean_recs()
    _set(recs, "u1", "rec3_score", 50.0)  # buy-again scores are frequencies, not popularity
    _set(recs, "u1", "rec4_score", 40.0)
    kinds = {"u1": ["segment_popularity", "segment_popularity", "buy_again", "buy_again"]}
    assert _mixed_violations(_mixed(kinds, recs.copy()), {"u1": ("I1", "U1")}) == {}
    _set(recs, "u1", "rec4_score", 60.0)  # rises within buy-again
    assert _mixed_violations(_mixed(kinds, recs.copy()), {"u1": ("I1", "U1")}) == {10: 1}
    kinds = {"u1": ["segment_popularity"] * 4}  # the same scores as popularity: out of range
    assert _mixed_violations(_mixed(kinds, recs.copy()), {}) == {10: 1, 11: 1}


def test_rule_12_skips_a_row_no_level_served_without_popularity_slots():
    recs = clean_recs()
    _set(recs, "u1", "source", "none")
    kinds = {"u1": ["buy_again"] * 4}
    assert _mixed_violations(_mixed(kinds, recs.copy()), {"u1": ("A1", "H2", "I1", "U1")}) == {}
    kinds = {"u1": ["buy_again"] * 3 + ["segment_popularity"]}
    assert _mixed_violations(_mixed(kinds, recs.copy()), {"u1": ("A1", "H2", "I1")}) == {12: 1}


def test_qa_table_lists_rule_16_only_with_a_mix():
    assert qa_table({}, CONFIG)["rule_id"].tolist() == list(range(1, 16))
    assert qa_table({16: 2}, MIX_CONFIG)["rule_id"].tolist() == list(range(1, 17))
    assert qa_table({16: 2}, MIX_CONFIG)["violations"].sum() == 2
