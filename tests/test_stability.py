"""Stability report on hand-made pairs of outputs."""
import pandas as pd
import pytest

from models.stability import format_report, stability_report


def _recs(rows):
    """rows: email -> (sku1, sku2, price1, price2)."""
    return pd.DataFrame([{"email_lower": e, "rec_part_1": a, "rec_part_2": b,
                          "rec1_price": p1, "rec2_price": p2}
                         for e, (a, b, p1, p2) in rows.items()])


OLD = _recs({"a@x": ("S1", "S2", 100.0, 200.0), "b@x": ("S1", "S2", 100.0, 200.0),
             "c@x": ("S3", "S4", 300.0, 400.0), "gone@x": ("S5", "S6", 50.0, 50.0)})
NEW = _recs({"a@x": ("S1", "S2", 100.0, 200.0),      # unchanged
             "b@x": ("S2", "S1", 200.0, 100.0),      # swap: both positions change
             "c@x": ("S3", "S9", 300.0, 900.0),      # position 2 changes
             "new@x": ("S7", "S8", 70.0, 80.0)})


def test_users_common_gained_lost():
    r = stability_report(OLD, NEW, 2)
    assert (r["users_common"], r["users_gained"], r["users_lost"]) == (3, 1, 1)
    assert (r["users_previous"], r["users_current"]) == (4, 4)


def test_users_by_number_of_changed_positions():
    r = stability_report(OLD, NEW, 2)
    assert r["changed_0_share"] == pytest.approx(1 / 3)
    assert r["changed_1_share"] == pytest.approx(1 / 3)
    assert r["changed_2_share"] == pytest.approx(1 / 3)


def test_change_rate_per_position_adds_up_to_mean_changes():
    r = stability_report(OLD, NEW, 2)
    assert r["position_1_change_rate"] == pytest.approx(1 / 3)
    assert r["position_2_change_rate"] == pytest.approx(2 / 3)
    mean_changes = sum(k * r[f"changed_{k}_share"] for k in range(3))
    assert mean_changes == pytest.approx(r["position_1_change_rate"]
                                         + r["position_2_change_rate"])


def test_average_price_before_and_after():
    r = stability_report(OLD, NEW, 2)
    assert r["avg_price_before"] == pytest.approx((300 + 300 + 700 + 100) / 8)
    assert r["avg_price_after"] == pytest.approx((300 + 300 + 1200 + 150) / 8)


def test_identical_outputs_are_fully_stable_and_empty_previous_is_all_gained():
    same = stability_report(OLD, OLD, 2)
    assert same["changed_0_share"] == 1.0 and same["users_gained"] == same["users_lost"] == 0
    first = stability_report(OLD.iloc[:0], NEW, 2)
    assert first["users_gained"] == 4 and first["users_common"] == 0
    assert "users common 0" in format_report(first, 2)
