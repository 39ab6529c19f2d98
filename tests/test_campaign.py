"""Unit tests of models/campaign.py on hand-made events whose answers are worked out by hand."""
import doctest
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from models import bandit, campaign
from models.bandit import BanditConfig

T0 = pd.Timestamp("2026-05-01T10:00:00Z")
WEEK = pd.Timedelta(days=7)


def _t(**delta):
    return T0 + pd.Timedelta(**delta)


def treatment_frame(rows):
    """(event_id, user, campaign, treatment, kind, time[, reason]) tuples → a typed frame."""
    frame = pd.DataFrame([r if len(r) == 7 else (*r, None) for r in rows],
                         columns=["event_id", "user_id", "campaign_id", "treatment_id", "kind",
                                  "event_time", "reason"])
    return frame.astype({"event_time": campaign.TIME})


def order_frame(rows):
    """(event_id, user, order, sku, name, time, price, quantity) tuples → a typed frame."""
    frame = pd.DataFrame(rows, columns=["event_id", "user_id", "order_id", "sku", "event_name",
                                        "event_time", "price", "quantity"])
    return frame.astype({"event_time": campaign.TIME})


# One campaign, two treatments; see each user's comment for what the report must say.
TREATMENT_ROWS = [
    # u1 (TA): delivered, opened twice, clicked, ordered 5 h after the send → opened→ordered.
    ("e1", "u1", "C1", "TA", "SENT", T0), ("e2", "u1", "C1", "TA", "DELIVERED", _t(minutes=1)),
    ("e3", "u1", "C1", "TA", "VIEWED", _t(hours=1)),
    ("e4", "u1", "C1", "TA", "VIEWED", _t(hours=2)),
    ("e5", "u1", "C1", "TA", "CLICKED", _t(hours=1, minutes=5)),
    # u2 (TA): delivered, a VIEWED stamped before the send (refused), ordered after 48 h.
    ("e6", "u2", "C1", "TA", "SENT", T0), ("e7", "u2", "C1", "TA", "DELIVERED", _t(minutes=1)),
    ("e8", "u2", "C1", "TA", "VIEWED", _t(hours=-1)),
    # u3 (TB): delivery failed (mailbox full), still ordered after 72 h → sent→ordered.
    ("e9", "u3", "C1", "TB", "SENT", T0),
    ("e10", "u3", "C1", "TB", "DELIVERY_FAILED", _t(minutes=2), "mailbox full"),
    # u4 (TB): delivered, ordered after 8 days: outside the window, inside the report span.
    ("e11", "u4", "C1", "TB", "SENT", T0), ("e12", "u4", "C1", "TB", "DELIVERED", _t(minutes=1)),
    # u5 (TB): sent two days later, failed for no stated reason.
    ("e13", "u5", "C1", "TB", "SENT", _t(days=2)),
    ("e14", "u5", "C1", "TB", "DELIVERY_FAILED", _t(days=2, minutes=1)),
    # u7: a click for a treatment never sent to them (refused).
    ("e15", "u7", "C1", "TA", "CLICKED", _t(hours=3)),
]
ORDER_ROWS = [
    # O1 reported twice (two event names): one order of 2 x $150.
    ("o1", "u1", "O1", "S1", "Placed Order", _t(hours=5), 150.0, 2),
    ("o2", "u1", "O1", "S1", "Ordered Product", _t(hours=5, minutes=1), 150.0, 2),
    ("o3", "u2", "O2", "S2", "Consumer Website Order", _t(hours=48), 100.0, 1),
    ("o4", "u3", "O3", "S3", "Ordered Product", _t(hours=72), 200.0, 1),
    ("o5", "u4", "O4", "S4", "Ordered Product", _t(days=8), 400.0, 1),
    ("o6", "u6", "O6", "S5", "Ordered Product", _t(days=1), 500.0, 1),   # never sent anything
    ("o7", "u6", "O7", "S5", "Ordered Product", _t(days=20), 900.0, 1),  # after the report span
    ("v1", "u6", None, "S5", "Viewed Product", _t(days=1), 500.0, 1),    # not an order
]


@pytest.fixture(scope="module")
def report():
    check = campaign.check_funnel(treatment_frame(TREATMENT_ROWS))
    parts = campaign.campaign_partials(check.rows, order_frame(ORDER_ROWS), WEEK)
    return check, parts, campaign.campaign_tables(parts, WEEK)


def test_docstring_examples_hold():
    result = doctest.testmod(campaign)
    assert result.attempted > 0 and result.failed == 0


def test_model_layer_does_not_import_beam():
    code = "import sys, models.campaign, models.report_html; sys.exit('apache_beam' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# --- funnel consistency -----------------------------------------------------------------

def test_check_funnel_refuses_events_without_a_prior_send_and_reconciles_repeats(report):
    check, _, _ = report
    assert sorted(zip(check.rejected["event_id"], check.rejected["refusal"])) == [
        ("e15", "click without send"), ("e8", "view before send")]
    assert check.repeats["event_id"].tolist() == ["e4"]
    assert len(check.rows) + len(check.rejected) + len(check.repeats) == len(TREATMENT_ROWS)
    per_kind = check.rows.groupby(list(campaign.RECIPIENT_KEY) + ["kind"]).size()
    assert per_kind.max() == 1


def test_check_funnel_names_each_kind_in_its_reason():
    rows = [(f"x{i}", "u", "C", "T", kind, T0) for i, kind in
            enumerate(["DELIVERED", "DELIVERY_FAILED", "VIEWED", "CLICKED"])]
    rows.append(("s", "u", "C", "OTHER", "SENT", T0))  # a send of another treatment does not count
    check = campaign.check_funnel(treatment_frame(rows))
    assert sorted(check.rejected["refusal"]) == [
        "click without send", "delivery failure without send", "delivery without send",
        "view without send"]
    assert check.rows["event_id"].tolist() == ["s"]


def test_attach_segments_uses_latest_user_row_and_marks_unknown_users():
    events = treatment_frame([("a", "u1", "C", "T", "SENT", T0), ("b", "u2", "C", "T", "SENT", T0),
                              ("c", "u9", "C", "T", "SENT", T0)])
    users = pd.DataFrame({"user_id": ["u1", "u1", "u2"], "make": ["Ford", "Honda", None],
                          "model": ["Focus", "Civic", "Golf"],
                          "updated_at": pd.to_datetime(["2026-01-01", "2026-03-01", "2026-01-01"],
                                                       utc=True)})
    out = campaign.attach_segments(events, users, ["make", "model"])
    assert out["segment"].tolist() == ["Honda|Civic", campaign.NO_SEGMENT, campaign.NO_SEGMENT]


def test_bucket_counts_align_to_the_epoch_and_count_each_kind():
    events = treatment_frame([("a", "u", "C", "T", "SENT", pd.Timestamp("2026-05-01T23:59Z")),
                              ("b", "u", "C", "T", "VIEWED", pd.Timestamp("2026-05-02T00:00Z")),
                              ("c", "v", "C", "T", "SENT", pd.Timestamp("2026-05-02T12:00Z")),
                              ("d", "v", "C", "U", "CLICKED", pd.Timestamp("2026-05-02T13:00Z"))])
    out = campaign.bucket_counts(events, pd.Timedelta(days=1))
    assert out[["treatment_id", "bucket_start", *campaign.COUNT_FIELDS]].values.tolist() == [
        ["T", pd.Timestamp("2026-05-01", tz="UTC"), 1, 0, 0, 0, 0],
        ["T", pd.Timestamp("2026-05-02", tz="UTC"), 1, 0, 0, 1, 0],
        ["U", pd.Timestamp("2026-05-02", tz="UTC"), 0, 0, 0, 0, 1]]
    assert set(out["segment"]) == {campaign.ALL}


# --- orders and attribution ------------------------------------------------------------------

def test_orders_count_one_order_once_whatever_names_report_it():
    orders = campaign.orders_from_events(order_frame(ORDER_ROWS))
    assert orders["order_id"].tolist() == ["O1", "O2", "O3", "O4", "O6", "O7"]
    assert orders.set_index("order_id").loc["O1", "revenue"] == 300.0
    assert orders.set_index("order_id").loc["O1", "order_time"] == _t(hours=5)


def test_attribution_paths_and_hours(report):
    _, parts, _ = report
    attributed = parts.attributed.set_index("order_id")
    assert sorted(attributed.index) == ["O1", "O2", "O3"]
    assert attributed.loc["O1", "path"] == campaign.OPENED_PATH
    assert attributed.loc["O2", "path"] == campaign.DELIVERED_PATH  # its open predates the send
    assert attributed.loc["O3", "path"] == campaign.SENT_PATH
    assert attributed["hours_to_order"].to_dict() == {"O1": 5.0, "O2": 48.0, "O3": 72.0}


def test_an_open_after_the_order_does_not_make_the_open_path():
    recips = campaign.recipients(treatment_frame([
        ("a", "u", "C", "T", "SENT", T0), ("b", "u", "C", "T", "DELIVERED", _t(minutes=1)),
        ("c", "u", "C", "T", "VIEWED", _t(hours=10))]))
    orders = campaign.orders_from_events(order_frame([
        ("o", "u", "O", "S", "Placed Order", _t(hours=2), 80.0, 1)]))
    paths = campaign.attribute_orders(recips, orders, WEEK)["path"].tolist()
    assert paths == [campaign.DELIVERED_PATH]


def test_last_touch_counts_an_order_once_but_both_recipients_ordered():
    events = treatment_frame([("a", "u", "C1", "T1", "SENT", T0),
                              ("b", "u", "C2", "T2", "SENT", _t(days=1))])
    orders = order_frame([("o", "u", "O", "S", "Placed Order", _t(days=1, hours=1), 120.0, 1)])
    parts = campaign.campaign_partials(events, orders, WEEK)
    assert parts.attributed[["campaign_id", "order_id"]].values.tolist() == [["C2", "O"]]
    assert parts.funnel.set_index("campaign_id")["ordered"].to_dict() == {"C1": 1, "C2": 1}
    tables = campaign.campaign_tables(parts, WEEK)
    revenue = tables["campaign_revenue_by_path"].set_index(["campaign_id", "path"])["revenue"]
    assert revenue[(campaign.ALL, campaign.SENT_PATH)] == 120.0
    assert revenue[("C1", campaign.SENT_PATH)] == 0.0


def test_orders_outside_the_window_or_before_the_send_are_not_attributed():
    recips = campaign.recipients(treatment_frame([("a", "u", "C", "T", "SENT", T0)]))
    orders = campaign.orders_from_events(order_frame([
        ("o1", "u", "O1", "S", "Placed Order", _t(hours=-1), 80.0, 1),
        ("o2", "u", "O2", "S", "Placed Order", T0 + WEEK + pd.Timedelta(seconds=1), 80.0, 1)]))
    assert campaign.attribute_orders(recips, orders, WEEK).empty
    assert campaign.ordered_after_send(recips, orders, WEEK).tolist() == [False]
    longer = WEEK + pd.Timedelta(seconds=1)
    assert campaign.ordered_after_send(recips, orders, longer).tolist() == [True]


# --- report tables --------------------------------------------------------------------------

def test_funnel_counts_and_rates(report):
    _, _, tables = report
    funnel = tables["campaign_funnel"]
    total = funnel.loc[(funnel["campaign_id"] == "C1") & (funnel["treatment_id"] == campaign.ALL)]
    assert total["stage"].tolist() == list(campaign.STAGES)
    assert total["recipients"].tolist() == [5, 3, 1, 1, 3]
    np.testing.assert_allclose(total["rate_of_sent"], [1.0, 0.6, 0.2, 0.2, 0.6])
    np.testing.assert_allclose(total["rate_of_previous"], [1.0, 0.6, 1 / 3, 1.0, 3.0])
    per_treatment = funnel.pivot_table(index="treatment_id", columns="stage", values="recipients")
    assert per_treatment.loc["TA", list(campaign.STAGES)].tolist() == [2, 2, 1, 1, 2]
    assert per_treatment.loc["TB", list(campaign.STAGES)].tolist() == [3, 1, 0, 0, 1]
    grand = funnel.loc[funnel["campaign_id"] == campaign.ALL]
    assert grand["recipients"].tolist() == [5, 3, 1, 1, 3]


def test_revenue_by_path(report):
    _, _, tables = report
    table = tables["campaign_revenue_by_path"]
    c1 = table.loc[table["campaign_id"] == "C1"].set_index("path")
    assert c1["revenue"].to_dict() == {campaign.OPENED_PATH: 300.0, campaign.DELIVERED_PATH: 100.0,
                                       campaign.SENT_PATH: 200.0}
    assert c1["orders"].sum() == 3
    np.testing.assert_allclose(c1["share_of_revenue"], [0.5, 100 / 600, 200 / 600])
    assert c1.loc[campaign.OPENED_PATH, "aov"] == 300.0


def test_aov_of_recipients_versus_non_recipients_over_one_span(report):
    _, _, tables = report
    aov = tables["campaign_aov"].set_index("group")
    assert aov["orders"].to_dict() == {"recipients": 3, "recipients_outside_window": 1,
                                       "non_recipients": 1}  # O7 falls after the span
    assert aov.loc["recipients", "aov"] == 200.0
    assert aov.loc["recipients_outside_window", "aov"] == 400.0
    assert aov.loc["non_recipients", "aov"] == 500.0
    assert aov.loc["recipients", "span_start"] == T0
    assert aov.loc["recipients", "span_end"] == _t(days=2) + WEEK


def test_time_to_order_quantiles_and_histogram(report):
    _, _, tables = report
    table = tables["campaign_time_to_order"]
    total = table.loc[table["campaign_id"] == campaign.ALL]
    quantiles = total.loc[total["kind"] == "quantile"].set_index("label")
    assert quantiles.loc["p50", "hours_low"] == 48.0
    assert quantiles.loc["p10", "hours_low"] == pytest.approx(np.quantile([5, 48, 72], 0.1))
    assert set(quantiles["orders"]) == {3}
    histogram = total.loc[total["kind"] == "histogram"]
    assert histogram["hours_low"].iloc[0] == 0.0 and histogram["hours_high"].iloc[-1] == 168.0
    counts = dict(zip(histogram["hours_low"], histogram["orders"]))
    assert counts[3.0] == 1 and counts[48.0] == 1 and counts[72.0] == 1
    assert histogram["orders"].sum() == 3


def test_delivery_failures_by_reason(report):
    _, _, tables = report
    failures = tables["campaign_delivery_failures"]
    c1 = failures.loc[failures["campaign_id"] == "C1"].set_index("reason")
    assert c1["failures"].to_dict() == {"mailbox full": 1, "unknown": 1}
    np.testing.assert_allclose(c1["share_of_sent"], [0.2, 0.2])
    np.testing.assert_allclose(c1["share_of_failures"], [0.5, 0.5])


def test_tables_of_an_empty_campaign_have_their_columns():
    empty = campaign.campaign_partials(treatment_frame([]), order_frame([]), WEEK)
    tables = campaign.campaign_tables(campaign.merge_partials([empty]), WEEK)
    assert tables["campaign_funnel"]["recipients"].tolist() == [0] * 5
    assert tables["campaign_revenue_by_path"]["revenue"].sum() == 0.0
    assert tables["campaign_aov"]["orders"].tolist() == [0, 0, 0]
    assert tables["campaign_delivery_failures"].empty
    assert list(tables["campaign_delivery_failures"].columns) == [
        "campaign_id", "reason", "failures", "share_of_failures", "share_of_sent"]


def test_partials_merge_to_the_same_tables_as_one_shard():
    check = campaign.check_funnel(treatment_frame(TREATMENT_ROWS))
    orders = order_frame(ORDER_ROWS)
    whole = campaign.campaign_tables(campaign.campaign_partials(check.rows, orders, WEEK), WEEK)
    shards = [campaign.campaign_partials(check.rows[check.rows["user_id"].isin(users)],
                                         orders[orders["user_id"].isin(users)], WEEK)
              for users in (["u1", "u4"], ["u2", "u3", "u5", "u6"])]
    merged = campaign.campaign_tables(campaign.merge_partials(shards), WEEK)
    for name, table in whole.items():
        pd.testing.assert_frame_equal(table, merged[name], check_dtype=False)


# --- bandit window state -------------------------------------------------------------------------

START, END = pd.Timestamp("2026-05-01", tz="UTC"), pd.Timestamp("2026-05-08", tz="UTC")


def counts(rows, segment=campaign.ALL):
    return pd.DataFrame([(t, segment, *c) for t, c in rows],
                        columns=["treatment_id", "segment", *campaign.COUNT_FIELDS])


def test_window_state_matches_the_model_and_caps_clicks_beyond_views():
    out = campaign.window_state(counts([("A", (100, 90, 10, 50, 5)), ("B", (100, 90, 10, 40, 44))]),
                                START, END)
    state = out.state.set_index("treatment_id")
    assert out.clicks_capped == 4 and state.loc["B", "clicks_capped"] == 4
    assert state.loc["B", "clicks"] == 40
    expected = bandit.bandit_state([50, 40], [5, 40])
    np.testing.assert_allclose(state["alpha"], expected["alpha"])
    np.testing.assert_allclose(state["p_best"], expected["p_best"])
    np.testing.assert_allclose(state["weight"], expected["weight"])
    assert list(out.state.columns) == list(campaign.STATE_COLUMNS)
    assert (out.state["window_start"] == START).all() and (out.state["window_end"] == END).all()
    assert out.rejected.empty


@pytest.mark.parametrize("bad, reason", [((10, 9, 1, -1, 0), "negative count"),
                                         ((-3, 0, 0, 5, 1), "negative count"),
                                         ((10, 9.5, 0, 5, 1), "non-integer count")])
def test_window_state_refuses_impossible_counts(bad, reason):
    out = campaign.window_state(counts([("A", (10, 9, 1, 5, 1)), ("B", bad)]), START, END)
    assert out.state["treatment_id"].tolist() == ["A"]
    assert out.rejected[["treatment_id", "refusal"]].values.tolist() == [["B", reason]]


def test_window_state_shrinks_segments_toward_their_treatment():
    rows = pd.concat([counts([("A", (500, 500, 0, 500, 50)), ("B", (500, 500, 0, 500, 25))], "big"),
                      counts([("A", (4, 4, 0, 4, 0)), ("B", (4, 4, 0, 4, 2))], "tiny")])
    out = campaign.window_state(rows, START, END, BanditConfig(draws=2_000))
    state = out.state.set_index(["segment", "treatment_id"])
    assert state.loc[(campaign.ALL, "A"), "views"] == 504
    assert state.loc[(campaign.ALL, "A"), "clicks"] == 50
    # 2 clicks in 4 views is 50%, but B's overall rate is about 5%: the tiny segment stays near it.
    assert state.loc[("tiny", "B"), "mean"] < 0.1
    for segment in (campaign.ALL, "big", "tiny"):
        assert state.loc[segment, "p_best"].sum() == pytest.approx(1.0)
        assert state.loc[segment, "weight"].sum() == pytest.approx(1.0)


def test_counts_frame_keeps_the_latest_pane_per_key():
    frame = campaign.counts_frame([(("A", "*"), (1, 1, 0, 1, 0)), (("A", "*"), (3, 2, 1, 2, 1)),
                                   (("B", "*"), (5, 5, 0, 0, 0))])
    assert frame.values.tolist() == [["A", "*", 3, 2, 1, 2, 1], ["B", "*", 5, 5, 0, 0, 0]]
