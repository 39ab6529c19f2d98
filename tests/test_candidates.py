"""Hand-computed checks of the candidate sources in models/candidates.py (issue #14)."""
import math

import numpy as np
import pandas as pd
import pytest

from models import candidates

T0 = pd.Timestamp("2026-03-01T00:00:00Z")
NO_DECAY = 1e12  # a half-life so long every weight is 1.0


def day(d: float) -> pd.Timestamp:
    return T0 + pd.Timedelta(days=d)


def lines_of(rows):
    """Order lines from (user, order, sku, day) tuples."""
    return pd.DataFrame({
        "user_id": [r[0] for r in rows], "order_id": [r[1] for r in rows],
        "sku": [r[2] for r in rows],
        "event_time": pd.to_datetime([day(r[3]) for r in rows], utc=True),
        "quantity": 1, "price": 1.0})


# --- also-bought: the five-basket table ---------------------------------------------------
#   b1: A B C   b2: A B   b3: A C   b4: B C D   b5: A D
# occurrences A=4 B=3 C=3 D=2; co-occurrence AB=2 AC=2 AD=1 BC=2 BD=1 CD=1
BASKETS = {"b1": "ABC", "b2": "AB", "b3": "AC", "b4": "BCD", "b5": "AD"}
FIVE = lines_of([(f"u{b}", b, sku, i) for i, (b, skus) in enumerate(BASKETS.items())
                 for sku in skus])
AS_OF = day(30)
EXPECTED = {  # pair: (count, jaccard, lift, cosine)
    "AB": (2, 2 / 5, 2 / 12, 2 / math.sqrt(12)),
    "AC": (2, 2 / 5, 2 / 12, 2 / math.sqrt(12)),
    "AD": (1, 1 / 5, 1 / 8, 1 / math.sqrt(8)),
    "BC": (2, 2 / 4, 2 / 9, 2 / 3),
    "BD": (1, 1 / 4, 1 / 6, 1 / math.sqrt(6)),
    "CD": (1, 1 / 4, 1 / 6, 1 / math.sqrt(6)),
}


@pytest.mark.parametrize("position,measure", list(enumerate(candidates.SIMILARITIES)))
@pytest.mark.parametrize("mode", candidates.MODES)
def test_five_basket_similarity_table(position, measure, mode):
    built = candidates.item_similarity(FIVE, AS_OF, measure, top_n=None, max_history=None,
                                       mode=mode)
    got = {(r.sku, r.neighbour): (r.cooccurrence, r.similarity)
           for r in built.table.itertuples()}
    assert len(got) == 12  # 6 pairs, both directions, no diagonal
    for pair, values in EXPECTED.items():
        for i, j in (pair, pair[::-1]):
            assert got[(i, j)][0] == values[0]
            assert got[(i, j)][1] == pytest.approx(values[position])
    assert built.rows == 5
    assert built.pairs_generated == 6 + 2 + 2 + 6 + 2  # Σ n(n−1): 3, 2, 2, 3, 2 items
    assert built.pairs_distinct == built.pairs_kept == 12
    assert built.lines_capped == 0


def test_user_mode_joins_a_users_baskets_and_basket_mode_does_not():
    # One user owns b1 and b2: user rows are {A,B,C} (b1+b2), {A,C}, {B,C,D}, {A,D}, so A and
    # B share one row; as baskets they still share two (b1, b2).
    merged = FIVE.assign(user_id=FIVE["user_id"].replace({"ub2": "ub1"}))
    by_user = candidates.item_similarity(merged, AS_OF, "count", top_n=None, max_history=None)
    by_basket = candidates.item_similarity(merged, AS_OF, "count", top_n=None, max_history=None,
                                           mode="basket")
    count = lambda b, i, j: int(b.table.loc[(b.table["sku"] == i) & (b.table["neighbour"] == j),
                                            "cooccurrence"].iloc[0])
    assert count(by_basket, "A", "B") == 2
    assert count(by_user, "A", "B") == 1
    assert by_user.rows == 4 and by_basket.rows == 5


def test_top_n_keeps_the_best_neighbours_ties_by_cooccurrence_then_sku():
    built = candidates.item_similarity(FIVE, AS_OF, "jaccard", top_n=1, max_history=None,
                                       mode="basket")
    best = dict(zip(built.table["sku"], built.table["neighbour"]))
    # A: B and C tie at 0.4 with 2 co-occurrences each -> B; B: C 0.5; C: B 0.5; D: B/C 0.25 -> B
    assert best == {"A": "B", "B": "C", "C": "B", "D": "B"}
    assert built.pairs_kept == 4 and built.pairs_distinct == 12


def test_history_cap_keeps_the_most_recent_items_and_counts_what_it_cut():
    lines = lines_of([("u", "1", "A", 0), ("u", "2", "B", 1), ("u", "3", "C", 2),
                      ("u", "4", "D", 3), ("v", "5", "A", 0), ("v", "5", "D", 0)])
    built = candidates.item_similarity(lines, AS_OF, "count", top_n=None, max_history=2)
    pairs = set(zip(built.table["sku"], built.table["neighbour"]))
    assert pairs == {("C", "D"), ("D", "C"), ("A", "D"), ("D", "A")}
    assert built.lines_capped == 2
    assert built.pairs_generated == 2 + 2  # each user keeps 2 items: 2 ordered pairs
    assert built.pairs_generated <= built.rows * 2 * 2


def test_lines_after_as_of_are_not_seen():
    late = pd.concat([FIVE, lines_of([("ub5", "b6", "B", 40)])], ignore_index=True)
    built = candidates.item_similarity(late, AS_OF, "count", top_n=None, max_history=None)
    assert len(built.table) == 12
    assert candidates.buy_again(late, AS_OF).query("user_id == 'ub5'")["sku"].tolist() \
        == ["A", "D"]


def test_unknown_similarity_or_mode_is_a_clear_error():
    with pytest.raises(ValueError, match="similarity must be one of"):
        candidates.item_similarity(FIVE, AS_OF, "pearson")
    with pytest.raises(ValueError, match="mode must be one of"):
        candidates.item_similarity(FIVE, AS_OF, mode="session")


def test_user_scores_sum_affinity_times_similarity_and_drop_seen():
    table = candidates.item_similarity(FIVE, AS_OF, "jaccard", top_n=None, max_history=None,
                                       mode="basket").table
    y = lines_of([("y", "o1", "A", 10), ("y", "o2", "B", 11), ("y", "o3", "B", 12)])
    scores = candidates.also_bought_scores(y, table, AS_OF, half_life_days=NO_DECAY)
    got = dict(zip(scores["sku"], scores["score"]))
    # affinity A=1, B=2: C = 1·0.4 + 2·0.5 = 1.4; D = 1·0.2 + 2·0.25 = 0.7; A and B seen
    assert got == pytest.approx({"C": 1.4, "D": 0.7})
    assert scores["sku"].tolist() == ["C", "D"]
    kept = candidates.also_bought_scores(y, table, AS_OF, half_life_days=NO_DECAY,
                                         exclude_seen=False)
    # A = 2·s(B→A) = 0.8; B = 1·s(A→B) = 0.4
    assert dict(zip(kept["sku"], kept["score"])) == pytest.approx(
        {"A": 0.8, "B": 0.4, "C": 1.4, "D": 0.7})


def test_user_scores_use_decayed_affinity():
    table = candidates.item_similarity(FIVE, AS_OF, "count", top_n=None, max_history=None,
                                       mode="basket").table
    y = lines_of([("y", "o1", "D", 20)])  # 10 days before as_of, half-life 10 -> affinity 0.5
    scores = candidates.also_bought_scores(y, table, AS_OF, half_life_days=10.0)
    assert dict(zip(scores["sku"], scores["score"])) == pytest.approx(
        {"A": 0.5, "B": 0.5, "C": 0.5})


def test_also_bought_wrapper_returns_build_and_scores():
    out = candidates.also_bought(FIVE, AS_OF, "lift", top_n=2, mode="basket")
    assert out.similarity.pairs_kept == len(out.similarity.table) == 8
    # ub1 holds A, B, C and their two best lift neighbours are among A, B, C: all seen, nothing
    # to suggest; every other basket's owner gets a suggestion.
    assert set(out.scores["user_id"]) == {"ub2", "ub3", "ub4", "ub5"}


# --- buy-again due-ness -------------------------------------------------------------------
# milk gaps: p 10 (days 0 -> 10), q 4 and 6 (days -9, -5, 1): pooled median of [4, 6, 10] = 6
# bread: r twice on day 5 (6 hours apart, one trip): no repurchase gap -> neutral
DUE_LINES = lines_of([("p", "1", "milk", 0), ("p", "2", "milk", 10), ("p", "3", "tv", 12),
                      ("q", "4", "milk", -9), ("q", "5", "milk", -5), ("q", "6", "milk", 1),
                      ("r", "7", "bread", 5), ("r", "8", "bread", 5.25),
                      ("p", "9", "milk", 14)])  # after as_of: ignored
DUE_AS_OF = day(13)


def test_repurchase_interval_is_the_median_gap_across_users():
    intervals = candidates.repurchase_intervals(DUE_LINES, DUE_AS_OF)
    assert intervals.to_dict("records") == [{"sku": "milk", "interval_days": 6.0, "gaps": 3}]
    strict = candidates.repurchase_intervals(DUE_LINES, DUE_AS_OF, min_gaps=4)
    assert strict.empty


def test_buy_again_due_ness_hand_computed():
    out = candidates.buy_again(DUE_LINES, DUE_AS_OF, half_life_days=NO_DECAY).set_index(
        ["user_id", "sku"])
    p_milk, q_milk = out.loc[("p", "milk")], out.loc[("q", "milk")]
    assert p_milk["days_since"] == pytest.approx(3.0)
    assert p_milk["due"] == pytest.approx(0.5)       # 3 days of a 6-day cycle
    assert p_milk["score"] == pytest.approx(2 * 0.5)  # two orders (the day-14 one is future)
    assert q_milk["due"] == pytest.approx(1.0)       # 12 days: overdue, capped at max_due 1
    assert q_milk["score"] == pytest.approx(3.0)
    assert out.loc[("p", "tv"), "due"] == 1.0        # never repurchased: neutral
    assert np.isnan(out.loc[("p", "tv"), "interval_days"])
    assert out.loc[("r", "bread"), "due"] == 1.0     # same-trip baskets are not a cycle
    assert out.loc[("r", "bread"), "score"] == pytest.approx(2.0)
    overdue = candidates.buy_again(DUE_LINES, DUE_AS_OF, half_life_days=NO_DECAY, max_due=3.0)
    assert overdue.set_index(["user_id", "sku"]).loc[("q", "milk"), "due"] == pytest.approx(2.0)


def test_buy_again_frequency_is_decayed_and_ranked_per_user():
    out = candidates.buy_again(DUE_LINES, DUE_AS_OF, half_life_days=10.0)
    p = out.loc[out["user_id"] == "p"]
    freq = 0.5 ** 1.3 + 0.5 ** 0.3  # milk on days 0 and 10, as_of day 13
    assert p.set_index("sku").loc["milk", "frequency"] == pytest.approx(freq)
    assert p.set_index("sku").loc["milk", "score"] == pytest.approx(freq * 0.5)
    assert p["sku"].tolist() == ["tv", "milk"]  # tv: 0.5 ** 0.1 = 0.93 > 0.66
    top = candidates.buy_again(DUE_LINES, DUE_AS_OF, half_life_days=10.0, max_per_user=1)
    assert top.groupby("user_id").size().max() == 1
    assert top.loc[top.user_id == "p", "sku"].item() == "tv"


# --- trending -----------------------------------------------------------------------------

def trend_lines(recent: int, previous: int, offset_days: float = 1.0, period: float = 14.0,
                sku: str = "A"):
    """``recent`` orders ``offset_days`` before as_of; ``previous`` the same, one period earlier."""
    rows = [(f"r{i}", f"r{i}", sku, 28 - offset_days) for i in range(recent)]
    rows += [(f"p{i}", f"p{i}", sku, 28 - period - offset_days) for i in range(previous)]
    return lines_of(rows)


TREND_AS_OF = day(28)


@pytest.mark.parametrize("half_life", [None, 30.0])
def test_exactly_fifty_percent_growth_is_boosted(half_life):
    out = candidates.trending(trend_lines(3, 2), TREND_AS_OF, 14, min_count=3,
                              half_life_days=half_life).iloc[0]
    assert out["growth"] == pytest.approx(0.5)
    assert out["multiplier"] == pytest.approx(1.2)


def test_growth_just_below_the_threshold_is_not_boosted():
    out = candidates.trending(trend_lines(5, 4), TREND_AS_OF, 14, min_count=3).iloc[0]
    assert out["growth"] == pytest.approx(0.25)
    assert out["multiplier"] == 1.0
    # one day older in the recent period: decayed growth 0.5 · 2^(−1/30) − ... < 50%
    older = lines_of([(f"r{i}", f"r{i}", "A", 26) for i in range(3)]
                     + [(f"p{i}", f"p{i}", "A", 13) for i in range(2)])
    row = candidates.trending(older, TREND_AS_OF, 14, min_count=3).iloc[0]
    assert row["growth"] == pytest.approx(1.5 * 0.5 ** (1 / 30) - 1)
    assert row["multiplier"] == 1.0


def test_min_count_edge():
    at = candidates.trending(trend_lines(3, 2), TREND_AS_OF, 14, min_count=3).iloc[0]
    above = candidates.trending(trend_lines(3, 2), TREND_AS_OF, 14, min_count=4).iloc[0]
    assert at["recent_orders"] == 3 and at["multiplier"] == pytest.approx(1.2)
    assert above["growth"] == pytest.approx(0.5) and above["multiplier"] == 1.0


def test_new_and_vanished_skus():
    lines = pd.concat([trend_lines(3, 0, sku="new"), trend_lines(0, 4, sku="gone")])
    out = candidates.trending(lines, TREND_AS_OF, 14, min_count=3).set_index("sku")
    assert out.loc["new", "growth"] == np.inf and out.loc["new", "multiplier"] == pytest.approx(1.2)
    assert out.loc["gone", "growth"] == -1.0 and out.loc["gone", "multiplier"] == 1.0
    assert candidates.trending_candidates(out.reset_index())["sku"].tolist() == ["new"]


def test_custom_boost_and_threshold_and_boost_application():
    out = candidates.trending(trend_lines(4, 2), TREND_AS_OF, 14, min_count=1,
                              growth_threshold=1.0, boost=0.5)
    assert out["multiplier"].tolist() == [1.5]
    boosted = candidates.apply_boost(pd.DataFrame({"sku": ["A", "Z"], "score": [2.0, 2.0]}), out)
    assert boosted["score"].tolist() == [3.0, 2.0]


def test_recently_bought_window():
    lines = lines_of([("u", "1", "A", 0), ("u", "2", "B", 27), ("v", "3", "A", 27.5)])
    got = candidates.recently_bought(lines, TREND_AS_OF, 7)
    assert sorted(map(tuple, got.values.tolist())) == [("u", "B"), ("v", "A")]
    assert candidates.recently_bought(lines, TREND_AS_OF, 0).empty


def test_no_order_lines_gives_empty_results_not_errors():
    empty = FIVE.iloc[:0]
    assert candidates.buy_again(empty, AS_OF).empty
    built = candidates.item_similarity(empty, AS_OF)
    assert built.table.empty and built.pairs_generated == built.pairs_kept == 0
    assert candidates.also_bought(empty, AS_OF).scores.empty
    assert candidates.trending(empty, AS_OF).empty
    assert candidates.recently_bought(empty, AS_OF, 365).empty


def test_exclude_seen_covers_items_beyond_the_history_cap():
    table = candidates.item_similarity(FIVE, AS_OF, "count", top_n=None, max_history=None,
                                       mode="basket").table
    # y bought D long ago and A, B recently; with a cap of 2 only A and B carry affinity,
    # and D (a neighbour of A and B) must still not come back as "also bought".
    y = lines_of([("y", "o0", "D", 1), ("y", "o1", "A", 10), ("y", "o2", "B", 11)])
    scores = candidates.also_bought_scores(y, table, AS_OF, half_life_days=NO_DECAY,
                                           max_history=2)
    assert scores["sku"].tolist() == ["C"]
    assert scores["score"].tolist() == pytest.approx([2 + 2])  # c_AC + c_BC


def test_buy_again_without_due_ness_is_decayed_frequency():
    out = candidates.buy_again(DUE_LINES, DUE_AS_OF, half_life_days=NO_DECAY, due=False)
    assert (out["due"] == 1.0).all()
    assert out.set_index(["user_id", "sku"]).loc[("p", "milk"), "score"] == pytest.approx(2.0)


# --- as the batch job calls them: global tables, one shard of users at a time ------------

def _mix_config(mix):
    from models.config import AlsoBoughtConfig, BuyAgainConfig, CandidatesConfig
    return CandidatesConfig(mix=mix, buy_again=BuyAgainConfig(half_life_days=NO_DECAY),
                            also_bought=AlsoBoughtConfig(similarity="count",
                                                         half_life_days=NO_DECAY))


def test_a_shard_uses_the_global_repurchase_interval():
    """Milk is re-bought every 10 days by u1 (another shard); u2 bought it once, 5 days ago.
    Scored alone, u2's shard knows no interval (due 1); with the global table due = 0.5."""
    lines = lines_of([("u1", "1", "milk", 0), ("u1", "2", "milk", 10), ("u1", "3", "milk", 20),
                      ("u2", "4", "milk", 25)])
    config = _mix_config((("buy_again", 2), ("segment_popularity", 2)))
    tables = candidates.shared_tables(lines, AS_OF, config)
    assert tables.intervals.set_index("sku")["interval_days"].to_dict() == {"milk": 10.0}
    assert tables.similarity is None and tables.trending is None
    shard = lines.loc[lines["user_id"] == "u2"]
    out = candidates.personal_candidates(shard, ["u2"], AS_OF, config, tables, 10)
    again = out.loc[out["source"] == "buy_again"]
    assert again[["user_id", "sku"]].values.tolist() == [["u2", "milk"]]
    assert again["score"].item() == pytest.approx(0.5)
    alone = candidates.buy_again(shard, AS_OF, NO_DECAY)
    assert alone["score"].item() == pytest.approx(1.0)  # what a per-shard interval would give
    bought = out.loc[out["source"] == candidates.PURCHASED]
    assert bought[["user_id", "sku"]].values.tolist() == [["u2", "milk"]]


def test_personal_also_bought_uses_the_global_similarity():
    """u5 (basket b5: A D) gets B and C from the five-basket counts: B = AB + DB = 2 + 1,
    C = AC + DC = 2 + 1; what u5 bought is never offered."""
    config = _mix_config((("also_bought", 2), ("segment_popularity", 2)))
    tables = candidates.shared_tables(FIVE, AS_OF, config)
    assert tables.similarity.pairs_kept == 12
    shard = FIVE.loc[FIVE["user_id"] == "ub5"]
    out = candidates.personal_candidates(shard, ["ub5"], AS_OF, config, tables, 10)
    scores = out.loc[out["source"] == "also_bought"].set_index("sku")["score"].to_dict()
    assert scores == {"B": pytest.approx(3.0), "C": pytest.approx(3.0)}
    # A user of the shard without lines, and lines after as_of, give nothing.
    late = lines_of([("ub5", "9", "B", 40)])
    out = candidates.personal_candidates(pd.concat([shard, late]), ["ub5", "nobody"],
                                         AS_OF, config, tables, 10)
    assert set(out["user_id"]) == {"ub5"}
    assert "B" not in set(out.loc[out["source"] == candidates.PURCHASED, "sku"])


def test_shared_tables_on_no_lines():
    config = _mix_config((("buy_again", 1), ("also_bought", 1), ("trending", 2)))
    tables = candidates.shared_tables(pd.DataFrame(), AS_OF, config)
    assert len(tables.intervals) == 0 and tables.similarity.pairs_kept == 0
    assert len(tables.trending) == 0


def test_ineligible_favourites_do_not_crowd_out_an_eligible_sku():
    """u bought five cheap staples 3 times each and a battery once; with 2 rows per user,
    knowing the eligible set keeps the battery, which the plain cut would lose."""
    rows = [("u", f"o{s}{i}", s, i) for s in ("s1", "s2", "s3", "s4", "s5") for i in range(3)]
    lines = lines_of(rows + [("u", "ob", "battery", 5)])
    config = _mix_config((("buy_again", 2), ("segment_popularity", 2)))
    blind = candidates.shared_tables(lines, AS_OF, config)
    out = candidates.personal_candidates(lines, ["u"], AS_OF, config, blind, 2)
    assert "battery" not in set(out.loc[out["source"] == "buy_again", "sku"])
    known = candidates.shared_tables(lines, AS_OF, config, frozenset({"battery", "s1"}))
    out = candidates.personal_candidates(lines, ["u"], AS_OF, config, known, 2)
    assert sorted(out.loc[out["source"] == "buy_again", "sku"]) == ["battery", "s1"]
    assert len(out.loc[out["source"] == candidates.PURCHASED]) == 6  # QA still sees all
