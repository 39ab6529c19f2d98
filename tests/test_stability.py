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


# --------------------------------------------------------------------------- changes explained

from models import stability  # noqa: E402


def _full(rows):
    """rows: (user_id, email, make, model, year, [skus], [scores])."""
    out = []
    for user, email, make, model, year, skus, scores in rows:
        row = {"user_id": user, "email_lower": email, "make": make, "model": model,
               "year": year}
        for i, (sku, score) in enumerate(zip(skus, scores), start=1):
            row.update({f"rec_part_{i}": sku, f"rec{i}_price": 100.0, f"rec{i}_score": score})
        out.append(row)
    return pd.DataFrame(out)


BEFORE = _full([
    ("u1", "a@x", "BMW", "M3", 2020, ["550-849K", "P2"], [2.0, 1.0]),
    ("u2", "b@x", "BMW", "M3", 2020, ["550-849K", "P2"], [2.0, 1.0]),
    ("u3", "c@x", "BMW", "M3", 2020, ["P2", "550-849K"], [2.0, 1.0]),
    ("u4", "d@x", "VW", "Golf", 2019, ["P5", "P6"], [1.0, 1.0]),     # changes e-mail
    ("u5", "e@x", "VW", "Golf", 2019, ["P5", "P6"], [1.0, 1.0]),     # changes vehicle
    ("u6", "f@x", "VW", "Golf", 2019, ["P5", "P6"], [1.0, 1.0]),     # too few parts
    ("u7", "g@x", "VW", "Golf", 2019, ["P5", "P6"], [1.0, 1.0]),     # bad row now
    ("u8", "h@x", "VW", "Golf", 2019, ["P5", "P6"], [1.0, 1.0]),     # gone from users
])
AFTER = _full([
    ("u1", "a@x", "BMW", "M3", 2020, ["0-4412S", "P2"], [2.5, 1.0]),
    ("u2", "b@x", "BMW", "M3", 2020, ["0-4412S", "P2"], [2.5, 1.0]),
    ("u3", "c@x", "BMW", "M3", 2020, ["550-849K", "P2"], [2.0, 1.0]),  # reordered: no swap
    ("u4", "new-d@x", "VW", "Golf", 2019, ["P5", "P6"], [0.5, 0.5]),
])
DEAD = pd.DataFrame([
    {"table": "users", "step": "Recommend", "reason": stability.UNSERVED_REASON,
     "record": '{"user_id": "u5", "make": "Fiat", "model": "Uno", "year": 1990}'},
    {"table": "users", "step": "Recommend", "reason": stability.UNSERVED_REASON,
     "record": '{"user_id": "u6", "make": "VW", "model": "Golf", "year": 2019}'},
    {"table": "users", "step": "Validate", "reason": "missing email",
     "record": '{"user_id": "u7", "make": "VW"}'},
    {"table": "events", "step": "Validate", "reason": "unknown sku",
     "record": '{"user_id": "u8"}'},
])
POP_BEFORE = pd.DataFrame({"level": ["global", "global"], "segment": ["", ""],
                           "sku": ["550-849K", "0-4412S"], "weight": [288.0, 284.0],
                           "orders": [300, 290]})
POP_NOW = POP_BEFORE.assign(weight=[284.0, 288.0])


def test_sku_swaps_name_the_replaced_sku_the_users_and_the_evidence():
    swaps = stability.sku_swaps(BEFORE, AFTER, 2, POP_BEFORE, POP_NOW)
    assert swaps.to_dict("records") == [{
        "old_sku": "550-849K", "new_sku": "0-4412S", "users": 2, "old_orders_before": 288.0,
        "old_orders_now": 284.0, "new_orders_before": 284.0, "new_orders_now": 288.0}]


def test_lost_users_each_get_their_reason():
    lost = stability.lost_users(BEFORE, AFTER, DEAD).set_index("user_id")
    assert lost["reason"].to_dict() == {
        "u4": stability.EMAIL_CHANGED, "u5": stability.VEHICLE_CHANGED,
        "u6": stability.TOO_FEW_PARTS, "u7": stability.DEAD_LETTERED,
        "u8": stability.REMOVED}
    assert lost.loc["u5", "detail"] == "VW Golf 2019 -> Fiat Uno 1990"
    assert lost.loc["u7", "detail"] == "missing email"
    assert lost.loc["u4", "detail"] == "now new-d@x"


def test_scores_rise_and_fall_for_common_users():
    report = stability.stability_report(BEFORE, AFTER, 2)
    assert (report["users_score_up"], report["users_score_down"]) == (2, 0)
    assert report["mean_score_change"] == pytest.approx((0.25 + 0.25 + 0) / 3)
    assert "scores rose for 2 users, fell for 0" in format_report(report, 2)


def test_explain_changes_reads_like_the_fields_hand_written_notes():
    counters = {"events.name.Placed Order": 90, "events.name.Viewed Product": 1000}
    last = {"events.name.Placed Order": 100, "events.name.Ordered Product": 40,
            "events.name.Viewed Product": 1000}
    changes = stability.explain_changes(BEFORE, AFTER, 2, DEAD, POP_BEFORE, POP_NOW,
                                        counters, last)
    assert list(changes["rank"]) == list(range(1, len(changes) + 1))
    details = list(changes["detail"])
    assert details[0] == ("0-4412S replaced 550-849K for 2 users: 288.0 vs 284.0 decayed "
                          "orders now (before 284.0 vs 288.0)")
    lost = changes[changes["kind"] == "users_lost"].set_index("subject")["users"].to_dict()
    assert lost == {stability.EMAIL_CHANGED: 1, stability.VEHICLE_CHANGED: 1,
                    stability.TOO_FEW_PARTS: 1, stability.DEAD_LETTERED: 1,
                    stability.REMOVED: 1}
    events = changes[changes["kind"] == "event_volume"].set_index("subject")["detail"]
    assert events["Ordered Product"] == ("Ordered Product: 0 events read vs 40 last run "
                                         "(MISSING NOW)")
    assert events["Placed Order"].endswith("vs 100 last run (-10.0%)")
    assert events["Consumer Website Order"] == "Consumer Website Order: 0 events read (no earlier count)"
    assert any("scores rose for 2 users and fell for 0" in d for d in details)
    assert stability.format_changes(changes, swaps=0) == [
        "  " + d for d in changes.loc[changes["kind"] != "sku_swap", "detail"]]


def test_nothing_to_explain_between_identical_outputs():
    changes = stability.explain_changes(BEFORE, BEFORE, 2)
    assert list(changes["kind"]) == ["scores"]
    assert "rose for 0 users and fell for 0" in changes["detail"].iloc[0]


def test_an_unknown_vehicle_that_stays_unknown_is_not_a_vehicle_change():
    before = _full([("u9", "z@x", None, None, float("nan"), ["P1", "P2"], [1.0, 1.0])])
    dead = pd.DataFrame([{"table": "users", "step": "Recommend",
                          "reason": stability.UNSERVED_REASON,
                          "record": '{"user_id": "u9", "make": null, "model": null, '
                                    '"year": null}'}])
    lost = stability.lost_users(before, before.iloc[:0], dead)
    assert list(lost["reason"]) == [stability.TOO_FEW_PARTS]


def test_a_changed_configuration_or_model_is_named_first():
    changes = stability.explain_changes(
        BEFORE, AFTER, 2, made_by={"config_digest": "new", "model_version": "m1",
                                   "source_commit": "abc"},
        made_before={"config_digest": "old", "model_version": "m1", "source_commit": None})
    assert changes["detail"].iloc[0] == ("configuration changed since the last published run: "
                                         "config_digest old -> new")
    assert list(changes["kind"]).count("provenance") == 1
    assert stability.format_changes(changes)[0].startswith("  configuration changed")
