"""Hand-checked slot mixes (models/mix.py, #14): fallback, no duplicates, diversity, rule 4."""
import numpy as np
import pandas as pd
import pytest

from models.mix import fill_slots, hits_per_user, list_metrics, paired_interval


def per_user(rows):
    """Candidate frame from (user, sku, score) tuples."""
    return pd.DataFrame(rows, columns=["user_id", "sku", "score"])


def shared(rows):
    """A list offered to every user, from (sku, score) tuples."""
    return pd.DataFrame(rows, columns=["sku", "score"])


def picks(frame, user):
    rows = frame.loc[frame["user_id"] == user].sort_values("slot")
    return list(zip(rows["sku"], rows["source"]))


AGAIN = per_user([("u", "milk", 5.0), ("v", "milk", 4.0), ("v", "eggs", 3.0),
                  ("v", "jam", 2.0)])
ALSO = per_user([("u", "bread", 0.9), ("u", "butter", 0.8), ("u", "jam", 0.7),
                 ("v", "milk", 0.9), ("v", "tea", 0.5)])
POPULAR = shared([("milk", 9.0), ("bananas", 8.0), ("bread", 7.0), ("apples", 6.0)])
SOURCES = {"buy_again": AGAIN, "also_bought": ALSO, "popularity": POPULAR}
MIX = [("buy_again", 2), ("also_bought", 1), ("popularity", 1)]


def test_a_source_that_runs_dry_hands_its_slots_to_the_next():
    out = fill_slots(SOURCES, MIX, k=4)
    # u has one buy-again item: its second slot goes to also-bought (which then fills 2).
    assert picks(out, "u") == [("milk", "buy_again"), ("bread", "also_bought"),
                               ("butter", "also_bought"), ("bananas", "popularity")]
    # v fills both buy-again slots; also-bought's best (milk) is a duplicate, so tea;
    # popularity's milk is a duplicate too, so bananas.
    assert picks(out, "v") == [("milk", "buy_again"), ("eggs", "buy_again"),
                               ("tea", "also_bought"), ("bananas", "popularity")]
    assert out.groupby("user_id")["slot"].apply(list).to_dict() == {"u": [1, 2, 3, 4],
                                                                    "v": [1, 2, 3, 4]}
    assert out.loc[out.sku == "milk", "score"].tolist() == [5.0, 4.0]


def test_slots_left_after_the_last_source_are_topped_up_in_mix_order():
    mix = [("also_bought", 1), ("buy_again", 2)]
    out = fill_slots({"also_bought": ALSO, "buy_again": AGAIN}, mix, k=4)
    # u: also-bought 1 (bread), buy-again has one (milk) then runs dry; the top-up pass
    # resumes also-bought where it stopped (butter, jam).
    assert picks(out, "u") == [("bread", "also_bought"), ("milk", "buy_again"),
                               ("butter", "also_bought"), ("jam", "also_bought")]
    # v: also-bought milk, buy-again eggs, jam (milk is taken); then also-bought tea
    assert picks(out, "v") == [("milk", "also_bought"), ("eggs", "buy_again"),
                               ("jam", "buy_again"), ("tea", "also_bought")]


def test_every_source_exhausted_leaves_a_short_list():
    out = fill_slots({"buy_again": AGAIN}, [("buy_again", 4)], k=4)
    assert picks(out, "u") == [("milk", "buy_again")]
    assert len(picks(out, "v")) == 3


def test_diversity_cap_per_group_over_the_whole_list():
    group = {"milk": "dairy", "eggs": "dairy", "butter": "dairy", "jam": "spreads",
             "bread": "bakery", "tea": "drinks", "bananas": "fruit", "apples": "fruit"}
    out = fill_slots(SOURCES, MIX, k=4, max_per_group=1, group_of_sku=group)
    # v: milk (dairy), eggs is dairy -> skipped, jam; also-bought milk dup, tea; popularity
    # milk dup, bananas.
    assert picks(out, "v") == [("milk", "buy_again"), ("jam", "buy_again"),
                               ("tea", "also_bought"), ("bananas", "popularity")]
    # u: milk, bread, butter (dairy, capped) -> jam; bananas
    assert picks(out, "u") == [("milk", "buy_again"), ("bread", "also_bought"),
                               ("jam", "also_bought"), ("bananas", "popularity")]
    two = fill_slots(SOURCES, MIX, k=4, max_per_group=2, group_of_sku=group)
    assert picks(two, "v")[:2] == [("milk", "buy_again"), ("eggs", "buy_again")]
    per_list = (two.assign(g=two.sku.map(group)).groupby(["user_id", "g"]).size())
    assert per_list.max() <= 2


def test_skus_without_a_group_are_not_capped():
    out = fill_slots(SOURCES, MIX, k=4, max_per_group=1, group_of_sku={"bananas": "fruit"})
    assert picks(out, "u") == picks(fill_slots(SOURCES, MIX, k=4), "u")


def test_exclusion_hits_discovery_slots_only():
    excluded = per_user([("u", "milk", 0), ("u", "bread", 0), ("u", "bananas", 0),
                         ("v", "tea", 0)])[["user_id", "sku"]]
    out = fill_slots(SOURCES, MIX, k=4, excluded_for_discovery=excluded)
    # buy-again keeps milk (exempt); also-bought's bread and popularity's bananas are out for u
    assert picks(out, "u") == [("milk", "buy_again"), ("butter", "also_bought"),
                               ("jam", "also_bought"), ("apples", "popularity")]
    # v: tea is excluded from also-bought, which runs dry; popularity fills two slots
    assert picks(out, "v") == [("milk", "buy_again"), ("eggs", "buy_again"),
                               ("bananas", "popularity"), ("bread", "popularity")]
    # the exemption is by name: make nothing exempt and u loses milk too
    strict = fill_slots(SOURCES, MIX, k=4, excluded_for_discovery=excluded,
                        repurchase_sources=())
    assert ("milk", "buy_again") not in picks(strict, "u")


def test_shared_only_sources_need_the_users_and_serve_each():
    with pytest.raises(ValueError, match="pass the users"):
        fill_slots({"popularity": POPULAR}, [("popularity", 4)], k=2)
    out = fill_slots({"popularity": POPULAR}, [("popularity", 4)], k=2, users=["a", "b"])
    assert picks(out, "a") == picks(out, "b") == [("milk", "popularity"),
                                                  ("bananas", "popularity")]
    with pytest.raises(ValueError, match="without candidates: trending"):
        fill_slots({"popularity": POPULAR}, [("trending", 1)], k=2, users=["a"])


def test_automotive_mix_is_plain_discovery_with_rule_4():
    excluded = per_user([("x", "milk", 0)])[["user_id", "sku"]]
    out = fill_slots({"popularity": POPULAR}, [("popularity", 4)], k=4, users=["x"],
                     excluded_for_discovery=excluded)
    assert [s for s, _ in picks(out, "x")] == ["bananas", "bread", "apples"]


def test_list_metrics_and_paired_interval_by_hand():
    slots = pd.DataFrame({"user_id": ["a", "a", "b", "b"], "slot": [1, 2, 1, 2],
                          "sku": ["x", "y", "x", "z"], "source": "s", "score": 1.0})
    bought = {"a": frozenset({"y"}), "b": frozenset({"x", "z", "w"}), "c": frozenset({"x"})}
    hits = hits_per_user(slots, bought, ["a", "b", "c"], 2)
    assert hits.tolist() == [[False, True], [True, True], [False, False]]
    got = list_metrics(slots, bought, 2, catalogue_size=10)
    assert got["users"] == 3  # c bought but got no list: a miss, not left out
    assert got["precision@2"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert got["recall@2"] == pytest.approx((1.0 + 2 / 3 + 0.0) / 3)
    assert got["hit_rate"] == pytest.approx(2 / 3)
    assert got["coverage"] == pytest.approx(0.3)
    ndcg_a = (1 / np.log2(3)) / 1.0
    assert got["ndcg@2"] == pytest.approx((ndcg_a + 1.0 + 0.0) / 3)
    diff = paired_interval(got["per_user_precision"], np.zeros(3))
    assert diff["mean"] == pytest.approx(0.5) and diff["low"] < 0.5 < diff["high"]


# --- the candidates section of the configuration (#14) ----------------------------------

def test_mix_config_from_a_file_and_its_one_line_errors(tmp_path):
    from models.config import DEFAULT_CONFIG
    from models.config_file import ConfigError, load_config

    def load(text):
        path = tmp_path / "mix.yaml"
        path.write_text(text, encoding="utf-8")
        return load_config(str(path))

    assert DEFAULT_CONFIG.candidates.popularity_only
    config = load("candidates:\n  mix: [[buy_again, 2], [also_bought, 1], "
                  "[segment_popularity, 1]]\n  also_bought: {similarity: count}\n")
    assert config.candidates.mix == (("buy_again", 2), ("also_bought", 1),
                                     ("segment_popularity", 1))
    assert not config.candidates.popularity_only
    assert config.candidates.also_bought.similarity == "count"
    # One source fills every slot, so recs_per_user can change alone.
    assert load("rules: {recs_per_user: 6}\n").rules.recs_per_user == 6
    for text, needle in (
            ("candidates:\n  mix: [[buy_agian, 4]]\n", "unknown source 'buy_agian'"),
            ("candidates:\n  mix: [[buy_again, 2], [trending, 1]]\n", "add up to 3"),
            ("candidates:\n  mix: [[buy_again, 2], [buy_again, 2]]\n", "twice"),
            ("candidates:\n  mix: [[buy_again, 0], [trending, 4]]\n", "integer >= 1"),
            ("candidates:\n  also_bought: {similarity: pearson}\n", "similarity must be")):
        with pytest.raises(ConfigError) as caught:
            load(text)
        message = str(caught.value)
        assert needle in message and "\n" not in message, message


def test_one_sku_per_variant_group_across_sources():
    again = per_user([("u", "RA003", 5.0)])
    popular = shared([("RA003B", 9.0), ("X", 8.0), ("Y", 7.0)])
    out = fill_slots({"buy_again": again, "popularity": popular},
                     [("buy_again", 1), ("popularity", 2)], k=3, users=["u"],
                     unique_of_sku={"RA003": "RA003", "RA003B": "RA003"})
    assert out["sku"].tolist() == ["RA003", "X", "Y"]  # the variant RA003B is skipped
