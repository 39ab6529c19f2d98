"""Tests for models.metrics against hand-computed backtest figures."""
import math

import numpy as np
import pandas as pd
import pytest

from models.metrics import (average_precision_at_k, coverage, diversity, evaluate,
                            evaluate_lists, hits_matrix, lists_matrix, match_rate, ndcg_at_k,
                            precision_at_k, recall_at_k)

L2_3 = 1.0 / math.log2(3)  # discount at rank 2

RECOMMENDED = np.array([["A", "B", "C"],
                        ["D", "E", "F"],
                        ["G", "H", "I"]], dtype=object)
PURCHASED = [frozenset({"B", "X"}), frozenset(), frozenset({"G", "H", "I", "J"})]
N_RELEVANT = np.array([2, 0, 4])


def test_hits_matrix():
    hits = hits_matrix(RECOMMENDED, PURCHASED)
    assert hits.dtype == bool
    assert hits.tolist() == [[False, True, False], [False, False, False], [True, True, True]]
    assert hits_matrix(np.empty((0, 3), dtype=object), []).shape == (0, 3)


def test_precision_at_k():
    hits = hits_matrix(RECOMMENDED, PURCHASED)
    assert precision_at_k(hits) == pytest.approx(4 / 9)
    assert precision_at_k(hits[[0, 2]]) == pytest.approx(4 / 6)
    assert precision_at_k(np.empty((0, 3), dtype=bool)) == 0.0


def test_recall_at_k_over_buyers_only():
    hits = hits_matrix(RECOMMENDED, PURCHASED)
    assert recall_at_k(hits, N_RELEVANT) == pytest.approx((1 / 2 + 3 / 4) / 2)
    assert recall_at_k(hits, np.array([0, 0, 0])) == 0.0


def test_ndcg_at_k():
    hits = hits_matrix(RECOMMENDED, PURCHASED)
    u1 = L2_3 / (1 + L2_3)           # hit at rank 2 of 2 relevant
    u3 = 1.0                          # 3 hits in 3 slots, 4 relevant: ideal is also 3
    assert ndcg_at_k(hits, N_RELEVANT) == pytest.approx((u1 + u3) / 2)
    assert ndcg_at_k(hits, np.zeros(3)) == 0.0


def test_ndcg_rewards_earlier_hits():
    early = np.array([[True, False, False, False]])
    late = np.array([[False, False, False, True]])
    one = np.array([1])
    assert ndcg_at_k(early, one) == pytest.approx(1.0)
    assert ndcg_at_k(late, one) == pytest.approx(1 / math.log2(5))
    # two relevant items, one hit at rank 1: DCG 1, ideal 1 + 1/log2(3)
    assert ndcg_at_k(early, np.array([2])) == pytest.approx(1 / (1 + L2_3))


def test_match_rate_over_all_users():
    hits = hits_matrix(RECOMMENDED, PURCHASED)
    assert match_rate(hits) == pytest.approx(2 / 3)
    assert match_rate(np.zeros((5, 4), dtype=bool)) == 0.0
    assert match_rate(np.empty((0, 4), dtype=bool)) == 0.0


def test_coverage_and_diversity():
    assert coverage(RECOMMENDED, 20) == pytest.approx(9 / 20)
    repeated = np.array([["A", "B"], ["A", "C"]], dtype=object)
    assert coverage(repeated, 6) == pytest.approx(3 / 6)
    assert coverage(repeated, 0) == 0.0
    types = np.array([["H", "H", "I"], ["H", "I", "E"]], dtype=object)
    assert diversity(types) == pytest.approx(2.5)
    assert diversity(np.empty((0, 3), dtype=object)) == 0.0


def _recs():
    rows = []
    for user, skus, prices, types, source in (
            ("u1", ["A", "B", "C"], [100, 200, 300], ["H", "H", "I"], "make+model+year"),
            ("u2", ["D", "E", "F"], [50, 50, 50], ["E", "E", "E"], "make+model+year"),
            ("u3", ["G", "H", "I"], [60, 70, 80], ["T", "S", "W"], "global")):
        row = {"user_id": user, "source": source}
        for i in range(3):
            row[f"rec_part_{i + 1}"] = skus[i]
            row[f"rec{i + 1}_price"] = float(prices[i])
            row[f"rec{i + 1}_part_type"] = types[i]
        rows.append(row)
    return pd.DataFrame(rows)


def test_evaluate():
    future = {"u1": PURCHASED[0], "u3": PURCHASED[2], "someone-else": frozenset({"A"})}
    out = evaluate(_recs(), future, 3, 20)
    assert out["users"] == 3
    assert out["buyers_in_holdout"] == 2
    assert out["match_rate"] == pytest.approx(2 / 3)
    assert out["precision@3"] == pytest.approx(4 / 6)       # over buyers only
    assert out["recall@3"] == pytest.approx(0.625)
    assert out["ndcg@3"] == pytest.approx((L2_3 / (1 + L2_3) + 1.0) / 2)
    assert out["coverage"] == pytest.approx(9 / 20)
    assert out["diversity"] == pytest.approx((2 + 1 + 3) / 3)
    assert out["avg_price"] == pytest.approx(960 / 9)
    assert out["fallback_shares"] == pytest.approx({"make+model+year": 2 / 3, "global": 1 / 3})


def test_evaluate_with_no_buyers():
    out = evaluate(_recs(), {}, 3, 20)
    assert out["buyers_in_holdout"] == 0
    assert out["match_rate"] == 0.0
    assert out["precision@3"] == 0.0 and out["recall@3"] == 0.0 and out["ndcg@3"] == 0.0


def test_evaluate_top_k_prefix():
    out = evaluate(_recs(), {"u1": frozenset({"C"})}, 2, 20)
    assert out["match_rate"] == 0.0          # C is at rank 3, outside the top 2
    assert out["coverage"] == pytest.approx(6 / 20)


def test_map_at_k_by_hand():
    hits = hits_matrix(RECOMMENDED, PURCHASED)
    # u1: one hit at rank 2, 2 relevant: AP = (1/2 · 1) / min(2, 3) = 0.25
    # u3: hits at ranks 1-3, 4 relevant: AP = (1 + 1 + 1) / min(4, 3) = 1
    assert average_precision_at_k(hits, N_RELEVANT) == pytest.approx((0.25 + 1.0) / 2)
    # hits at ranks 1 and 3 of 4, 2 relevant: (1/1 + 2/3) / 2
    assert average_precision_at_k(np.array([[True, False, True, False]]), np.array([2])) \
        == pytest.approx((1 + 2 / 3) / 2)
    # one relevant item at rank 3: AP = 1/3 (precision at the hit)
    assert average_precision_at_k(np.array([[False, False, True]]), np.array([1])) \
        == pytest.approx(1 / 3)
    assert average_precision_at_k(hits, np.zeros(3)) == 0.0


def _slots(rows):
    return pd.DataFrame(rows, columns=["user_id", "slot", "sku"])


def test_lists_matrix_leaves_missing_users_and_slots_empty():
    slots = _slots([("u1", 1, "A"), ("u1", 2, "B"), ("u3", 1, "G"), ("u3", 3, "I"),
                    ("u3", 4, "Z"), ("stranger", 1, "Q")])
    got = lists_matrix(slots, ["u1", "u2", "u3"], 3)
    assert got.tolist() == [["A", "B", None], [None, None, None], ["G", None, "I"]]


def test_evaluate_lists_by_hand():
    # u1 bought {B, X}; u3 bought {G, H, I, J}; u2 bought nothing, so is not scored;
    # u4 bought {A} but was not served: all misses, still in the population.
    future = {"u1": PURCHASED[0], "u2": frozenset(), "u3": PURCHASED[2], "u4": frozenset({"A"})}
    slots = _slots([("u1", 1, "A"), ("u1", 2, "B"), ("u1", 3, "C"),
                    ("u2", 1, "D"), ("u2", 2, "E"), ("u2", 3, "F"),
                    ("u3", 1, "G"), ("u3", 2, "H"), ("u3", 3, "I")])
    prices = {s: float(i + 1) for i, s in enumerate("ABCDEFGHI")}
    out = evaluate_lists(slots, future, 3, 20, prices)
    assert out["users_served"] == 3 and out["buyers_in_holdout"] == 3
    assert out["precision_at_k"] == pytest.approx((1 / 3 + 1 + 0) / 3)
    assert out["recall_at_k"] == pytest.approx((1 / 2 + 3 / 4 + 0) / 3)
    assert out["ndcg_at_k"] == pytest.approx((L2_3 / (1 + L2_3) + 1.0 + 0) / 3)
    assert out["map_at_k"] == pytest.approx((0.25 + 1.0 + 0) / 3)
    assert out["hit_rate"] == pytest.approx(2 / 3)
    assert out["coverage"] == pytest.approx(9 / 20)
    assert out["avg_price"] == pytest.approx(sum(range(1, 10)) / 9)
    np.testing.assert_allclose(out["per_user_precision"], [1 / 3, 1.0, 0.0])


def test_evaluate_lists_at_a_shorter_k_uses_the_prefix():
    future = {"u1": frozenset({"C"})}
    slots = _slots([("u1", 1, "A"), ("u1", 2, "B"), ("u1", 3, "C")])
    out = evaluate_lists(slots, future, 2, 10, {"A": 1.0, "B": 3.0, "C": 100.0})
    assert out["precision_at_k"] == 0.0 and out["hit_rate"] == 0.0   # C is at rank 3
    assert out["avg_price"] == pytest.approx(2.0) and out["coverage"] == pytest.approx(0.2)
