"""Tests for models.sanity: each sanity gate (SPEC §10) on hand-computed inputs that trip it
and inputs just inside its threshold."""
import math
from collections import Counter

import pandas as pd
import pytest

from models import sanity
from models.config import GatesConfig
from models.stability import stability_report

AS_OF = pd.Timestamp("2026-03-01T00:00:00Z")


def recs(parts, scores):
    """Recommendation rows from per-user SKU lists and score lists."""
    n = len(parts[0])
    frame = {}
    for i in range(n):
        frame[f"rec_part_{i + 1}"] = [p[i] for p in parts]
        frame[f"rec{i + 1}_score"] = [s[i] for s in scores]
        frame[f"rec{i + 1}_price"] = [100.0] * len(parts)
    frame["email_lower"] = [f"u{k}@x.com" for k in range(len(parts))]
    return pd.DataFrame(frame)


# ---- stale history

def test_newest_order_ignores_views_and_carts():
    events = pd.DataFrame({
        "event_name": ["Placed Order", "Ordered Product", "Consumer Website Order",
                       "Viewed Product", "Cart Update"],
        "event_time": pd.to_datetime(["2026-01-01", "2026-01-03", "2026-01-02",
                                      "2026-02-20", "2026-02-21"], utc=True)})
    assert sanity.newest_order_time(events) == pd.Timestamp("2026-01-03", tz="UTC")
    assert sanity.newest_order_time(events[events["event_name"] == "Viewed Product"]) is None
    assert sanity.newest_order_time(events.iloc[:0]) is None


def test_history_400_days_before_as_of_trips_with_the_hint():
    newest = pd.Timestamp("2025-01-25T00:00:00Z")  # 400 days before AS_OF
    gate = sanity.stale_history(newest, AS_OF, 30)
    assert gate.tripped and gate.value == pytest.approx(400.0)
    assert "history ends 2025-01-25" in gate.detail and "400 days before --as_of" in gate.detail
    assert "pass --as_of 2025-01-25T00:00:00Z" in gate.detail


def test_history_at_the_limit_passes_and_a_day_more_trips():
    assert not sanity.stale_history(AS_OF - pd.Timedelta(days=30), AS_OF, 30).tripped
    assert sanity.stale_history(AS_OF - pd.Timedelta(days=31), AS_OF, 30).tripped


def test_no_orders_at_all_trips():
    gate = sanity.stale_history(None, AS_OF, 30)
    assert gate.tripped and gate.value is None and "no orders" in gate.detail


# ---- degenerate scores

def test_tied_rows_counts_rows_whose_scores_all_tie():
    frame = recs([["A", "B", "C", "D"]] * 3,
                 [[2.0, 2.0, 2.0, 2.0], [2.0, 2.0, 2.0, 1.9], [3.0, 3.0 + 1e-12, 3.0, 3.0]])
    assert sanity.tied_rows(frame, 4) == 2  # the third differs by far less than a tolerance
    assert sanity.tied_rows(frame, 1) == 0  # one score cannot tie


def test_tied_share_over_the_limit_trips():
    assert sanity.tied_scores(3, 4, 0.5).tripped          # 75% > 50%
    assert not sanity.tied_scores(2, 4, 0.5).tripped      # 50% is the limit
    assert sanity.tied_scores(3, 4, 0.5).value == 0.75
    assert not sanity.tied_scores(0, 0, 0.5).tripped      # no users: the zero-rows alarm says it


# ---- concentration

def test_sku_user_counts_and_concentration():
    frame = recs([["A", "B"], ["A", "C"], ["A", "B"], ["D", "C"]], [[2, 1]] * 4)
    counts = sanity.sku_user_counts(frame, 2)
    assert counts == Counter({"A": 3, "B": 2, "C": 2, "D": 1})
    gate = sanity.sku_concentration(counts, 4, 0.5)
    assert gate.tripped and gate.value == 0.75 and "SKU A goes to 3 of 4 users" in gate.detail
    assert not sanity.sku_concentration(counts, 4, 0.75).tripped
    assert not sanity.sku_concentration(Counter(), 0, 0.5).tripped


def test_eligible_catalogue_of_eleven_products_trips_both_gates():
    by_count, by_share = sanity.eligible_catalog(11, 3665, 20, 0.01)
    assert by_count.tripped and by_count.value == 11
    assert by_share.tripped and by_share.value == pytest.approx(11 / 3665)
    assert "11 of 3,665" in by_count.detail and "rules" in by_count.detail


def test_eligible_catalogue_at_the_limits_passes():
    by_count, by_share = sanity.eligible_catalog(20, 2000, 20, 0.01)
    assert not by_count.tripped and not by_share.tripped
    by_count, by_share = sanity.eligible_catalog(25, 5000, 20, 0.01)  # 0.5% of the catalogue
    assert not by_count.tripped and by_share.tripped


# ---- input far smaller than last time

def test_input_a_tenth_of_the_last_published_run_trips_and_names_the_table():
    last = {"users.read": 1000, "events.read": 5000, "catalog.read": 10, "fitment.read": 0}
    now = {"users.read": 100, "events.read": 5100, "catalog.read": 10, "fitment.read": 7}
    gate = sanity.input_shrinkage(now, last, ("catalog", "users", "events", "fitment"), 0.5)
    assert gate.tripped and gate.value == pytest.approx(0.1)
    assert gate.detail.startswith("users: 100 rows read, 10.0% of the last published run's 1,000")


def test_input_at_half_passes_and_no_previous_run_is_not_compared():
    last = {"users.read": 1000}
    assert not sanity.input_shrinkage({"users.read": 500}, last, ("users",), 0.5).tripped
    gate = sanity.input_shrinkage({"users.read": 5}, None, ("users",), 0.5)
    assert not gate.tripped and gate.value is None


# ---- churn

def test_churn_reuses_the_stability_report():
    old = recs([["A", "B"], ["A", "B"], ["A", "B"], ["A", "B"]], [[2, 1]] * 4)
    new = old.copy()
    new.loc[[0, 1, 2], "rec_part_2"] = "C"  # 3 of 4 common users changed
    report = stability_report(old, new, 2)
    assert sanity.changed_user_share(report) == pytest.approx(0.75)
    gate = sanity.churn(0.75, 4, 0.5, accept_changes=False)
    assert gate.tripped and "--accept_changes" in gate.detail
    accepted = sanity.churn(0.75, 4, 0.5, accept_changes=True)
    assert not accepted.tripped and accepted.value == 0.75 and "accepted" in accepted.detail
    assert not sanity.churn(0.5, 4, 0.5, accept_changes=False).tripped


def test_churn_without_common_users_is_not_compared():
    assert sanity.changed_user_share({"users_common": 0, "changed_0_share": 0.0}) is None
    assert not sanity.churn(None, 0, 0.5, False).tripped


# ---- all together

def test_signals_merge_is_addition_and_the_newest_order_wins():
    a = sanity.GateSignals(newest_order=AS_OF, users=2, tied_users=1,
                           sku_users=Counter({"A": 2}), catalog_skus=5, eligible_skus=3)
    b = sanity.GateSignals(newest_order=AS_OF - pd.Timedelta(days=3), users=3,
                           sku_users=Counter({"A": 1, "B": 3}))
    total = sanity.GateSignals().merge(b).merge(a)
    assert total.newest_order == AS_OF
    assert (total.users, total.tied_users, total.catalog_skus, total.eligible_skus) == (5, 1, 5, 3)
    assert total.sku_users == Counter({"A": 3, "B": 3})


def test_evaluate_on_a_healthy_run_trips_nothing_and_rows_carry_values():
    signals = sanity.GateSignals(newest_order=AS_OF - pd.Timedelta(days=1), users=10,
                                 tied_users=1, sku_users=Counter({"A": 4, "B": 3}),
                                 catalog_skus=100, eligible_skus=60)
    report = {"users_common": 10, "changed_0_share": 0.9}
    results = sanity.evaluate(signals, AS_OF, {"users.read": 10}, {"users.read": 11}, report,
                              GatesConfig(), ("users",))
    assert [r.name for r in results] == list(sanity.GATE_IDS)
    assert not any(r.tripped for r in results)
    rows = sanity.gate_rows(results)
    assert rows["rule_id"].tolist() == list(range(101, 108))
    assert rows["violations"].tolist() == [0] * 7
    assert rows.loc[rows["name"] == "gate: churn", "value"].item() == pytest.approx(0.1)
    counters = sanity.gate_counters(results)
    assert counters["gate.sku_concentration"] == 0.4
    assert counters["gate.eligible_skus"] == 60 and counters["gate.churn.tripped"] == 0


def test_evaluate_on_an_empty_events_file_trips_stale_history():
    signals = sanity.GateSignals(users=10, tied_users=10, sku_users=Counter({"A": 10}),
                                 catalog_skus=100, eligible_skus=60)
    tripped = {r.name for r in sanity.evaluate(signals, AS_OF, {}, None, None, GatesConfig(),
                                               ("events",)) if r.tripped}
    assert tripped == {sanity.STALE_HISTORY, sanity.TIED_SCORES, sanity.SKU_CONCENTRATION}
    rows = sanity.gate_rows(sanity.evaluate(signals, AS_OF, {}, None, None, GatesConfig(),
                                            ("events",)))
    assert math.isnan(rows.loc[rows["name"] == "gate: stale_history", "value"].item())


def test_format_gates_names_the_tripped_gate():
    results = [sanity.stale_history(None, AS_OF, 30), sanity.tied_scores(0, 4, 0.5)]
    lines = sanity.format_gates(sanity.gate_rows(results))
    assert "stale_history n/a (limit 30) TRIPPED" in lines[0]
    assert "tied_scores 0 (limit 0.5)" in lines[0]
    assert lines[1].startswith("  TRIPPED stale_history: no orders")
    assert len(lines) == 2


def test_orders_after_as_of_do_not_count_as_history():
    events = pd.DataFrame({"event_name": ["Placed Order", "Placed Order"],
                           "event_time": pd.to_datetime(["2025-01-01", "2026-06-01"], utc=True)})
    assert sanity.newest_order_time(events, AS_OF) == pd.Timestamp("2025-01-01", tz="UTC")
    assert sanity.newest_order_time(events.iloc[1:], AS_OF) is None  # only a future order
    assert sanity.newest_order_time(events) == pd.Timestamp("2026-06-01", tz="UTC")


def test_the_global_baseline_is_not_gated_for_concentration_but_for_the_rest():
    gates = sanity.baseline_gates(GatesConfig())
    assert gates.max_sku_user_share == 1.0
    assert gates.max_history_age_days == GatesConfig().max_history_age_days
    assert not sanity.sku_concentration(Counter({"A": 10}), 10, gates.max_sku_user_share).tripped
