"""End to end: both report jobs on a small fixture directory, read back from DuckDB and HTML."""
import json

import duckdb
import numpy as np
import pandas as pd
import pytest

from models.campaign import complete_windows
from pipelines import bandit_report, campaign_report

START = pd.Timestamp("2026-05-01T08:00:00Z")
TREATMENT_RATES = {"T_hero": 0.30, "T_list": 0.15, "T_plain": 0.08}  # P(click | opened)
FAILURE_REASONS = ("mailbox full", "hard bounce", "spam block")


def _iso(t):
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def make_world(seed=5, users=400, days=10):
    """Treatment and order events of one campaign: a send per user on a random day.

    Delivery 75%, opens 40% of delivered, clicks at each treatment's rate of
    opens, orders from 20% of clickers and 4% of the others within a week;
    plus non-recipient orders and the bad input the jobs must refuse.
    """
    rng = np.random.default_rng(seed)
    treatments, orders = [], []
    names = list(TREATMENT_RATES)

    def emit(user, treatment, kind, at, **extra):
        treatments.append({"event_id": f"te{len(treatments)}", "event_time": _iso(at),
                           "user_id": user, "treatment_id": treatment, "campaign_id": "SPRING",
                           "kind": kind, **extra})

    def order(user, at, value):
        order_id = f"O{len(orders)}"
        for name in ("Placed Order", "Ordered Product"):  # one order, two names
            orders.append({"event_id": f"ev{len(orders)}", "event_time": _iso(at),
                           "user_id": user, "event_name": name, "sku": "SKU1",
                           "quantity": 1, "price": value, "order_id": order_id})

    for u in range(users):
        user, treatment = f"u{u}", names[u % len(names)]
        sent = START + pd.Timedelta(days=int(rng.integers(days)), minutes=int(rng.integers(600)))
        emit(user, treatment, "SENT", sent, propensity=1 / 3, allocation_version="rr")
        clicked = False
        if rng.random() < 0.75:
            emit(user, treatment, "DELIVERED", sent + pd.Timedelta(minutes=1))
            if rng.random() < 0.4:
                opened = sent + pd.Timedelta(hours=float(rng.exponential(6)))
                emit(user, treatment, "VIEWED", opened)
                if rng.random() < TREATMENT_RATES[treatment]:
                    clicked = True
                    emit(user, treatment, "CLICKED", opened + pd.Timedelta(minutes=3))
        else:
            emit(user, treatment, "DELIVERY_FAILED", sent + pd.Timedelta(minutes=2),
                 reason=FAILURE_REASONS[u % 3])
        if rng.random() < (0.2 if clicked else 0.04):
            order(user, sent + pd.Timedelta(hours=float(rng.uniform(1, 150))),
                  float(rng.integers(100, 600)))
    for u in range(60):  # people who were never e-mailed still buy
        order(f"n{u}", START + pd.Timedelta(days=float(rng.uniform(0, days))),
              float(rng.integers(100, 600)))
    bad = [
        treatments[0],                                               # redelivered event id
        {**treatments[0], "event_id": "x1", "kind": "BOUNCED"},      # unknown kind
        {**treatments[0], "event_id": "x2", "user_id": "ghost", "kind": "CLICKED"},  # no send
        {**treatments[0], "event_id": "x3", "treatment_id": "<script>alert('tid')</script>"},
    ]
    return treatments + bad, orders + [orders[0]]  # and one redelivered order event


def write_world(directory, seed=5, users=400, days=10):
    treatments, orders = make_world(seed, users, days)
    for name, rows in (("treatment_events", treatments), ("events", orders)):
        with open(directory / f"{name}.jsonl", "w") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
            if name == "treatment_events":
                handle.write("{not json\n")
    return treatments, orders


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("reports")
    world = base / "world"
    world.mkdir()
    treatments, orders = write_world(world)
    warehouse, html = str(base / "wh.duckdb"), base / "report.html"
    common = ["--input_dir", str(world), "--warehouse", warehouse, "--num_shards", "4",
              "--bandit_draws", "4000"]
    status_bandit = bandit_report.run(common + ["--run_id", "bandit1"])
    status_campaign = campaign_report.run(common + ["--run_id", "campaign1",
                                                    "--report_html", str(html)])
    return {"treatments": treatments, "orders": orders, "warehouse": warehouse, "html": html,
            "status": (status_bandit, status_campaign)}


def query(runs, sql):
    with duckdb.connect(runs["warehouse"], read_only=True) as con:
        return con.execute(sql).df()


def test_both_jobs_publish(runs):
    assert runs["status"] == (0, 0)
    logged = query(runs, "SELECT run_id, job, status FROM pipeline_runs ORDER BY run_id")
    assert logged.values.tolist() == [["bandit1", "bandit_report", "published"],
                                      ["campaign1", "campaign_report", "published"]]


def test_bad_input_is_dead_lettered_with_reasons(runs):
    dead = query(runs, "SELECT run_id, reason, count(*) AS n FROM dead_letter "
                       "GROUP BY ALL ORDER BY ALL")
    bandit = dict(dead.loc[dead["run_id"] == "bandit1", ["reason", "n"]].values.tolist())
    assert bandit == {"click without send": 1, "malformed JSON": 1, "unknown kind": 1,
                      "malformed treatment_id": 1}
    counters = json.loads(query(runs, "SELECT counters FROM pipeline_runs "
                                      "WHERE run_id = 'bandit1'")["counters"].iloc[0])
    assert counters["treatment_events.deduplicated"] == 1
    read = counters["treatment_events.read"]
    assert read == len(runs["treatments"]) + 1  # + the malformed line
    assert read == (counters["treatment_events.processed"]
                    + counters["treatment_events.dead_lettered"]
                    + counters["treatment_events.deduplicated"])


def _recipients(runs):
    """One row per fixture recipient: treatment, send time, opened or clicked, clicked."""
    events = pd.DataFrame(runs["treatments"][:-4])  # the refused rows excluded
    events["event_time"] = pd.to_datetime(events["event_time"], utc=True)
    sent = events.loc[events["kind"] == "SENT"].set_index("user_id")
    kinds = events.groupby("user_id")["kind"].agg(set)
    return pd.DataFrame({"treatment_id": sent["treatment_id"], "sent_at": sent["event_time"],
                         "viewed": kinds.reindex(sent.index).map(
                             lambda k: bool(k & {"VIEWED", "CLICKED"})),
                         "clicked": kinds.reindex(sent.index).map(lambda k: "CLICKED" in k)})


def test_bandit_state_counts_each_window_by_its_sends(runs):
    """Views and clicks count in the windows of the send they follow (issue #18), so no click
    is capped at a window's edge; every window holds sends; an overall row spans all data."""
    state = query(runs, "SELECT * FROM bandit_state WHERE segment = '*'")
    assert set(state["treatment_id"]) == set(TREATMENT_RATES)
    assert set(state["scope"]) == {"window", "overall"}
    windows = state.loc[state["scope"] == "window"]
    assert (windows["window_end"] - windows["window_start"] == pd.Timedelta(days=7)).all()
    assert (windows.groupby("window_end")["sent"].sum() > 0).all()
    assert (state["clicks_capped"] == 0).all()
    recips = _recipients(runs)
    for row in windows.sort_values("views", ascending=False).head(3).itertuples():
        start, end = (pd.Timestamp(row.window_start).tz_convert("UTC"),
                      pd.Timestamp(row.window_end).tz_convert("UTC"))
        inside = recips.loc[(recips["treatment_id"] == row.treatment_id)
                            & (recips["sent_at"] >= start) & (recips["sent_at"] < end)]
        assert (row.sent, row.views, row.clicks) == (
            len(inside), inside["viewed"].sum(), inside["clicked"].sum())
    overall = state.loc[state["scope"] == "overall"].set_index("treatment_id")
    per_treatment = recips.groupby("treatment_id")
    assert overall["sent"].to_dict() == per_treatment.size().to_dict()
    assert overall["clicks"].to_dict() == per_treatment["clicked"].sum().to_dict()
    assert overall["window_start"].min() <= recips["sent_at"].min()
    assert overall["window_end"].max() > recips["sent_at"].max()
    assert (state["clicks"] <= state["views"]).all()
    per_window = windows.groupby("window_end")
    np.testing.assert_allclose(per_window["p_best"].sum(), 1.0)
    np.testing.assert_allclose(per_window["weight"].sum(), 1.0)
    np.testing.assert_allclose(state["alpha"], 1 + state["clicks"])


def test_the_bandit_publishes_the_allocation_a_sender_uses(runs):
    alloc = query(runs, "SELECT * FROM bandit_allocation")
    assert set(alloc["allocation_version"]) == {"bandit1"}
    assert set(alloc["treatment_id"]) == set(TREATMENT_RATES)
    np.testing.assert_allclose(alloc.groupby("segment")["weight"].sum(), 1.0)
    # The weights of the latest window lying within the data (not one holding only its end).
    within = complete_windows(query(runs, "SELECT * FROM bandit_state WHERE segment = '*'"))
    latest = within.loc[within["window_end"] == within["window_end"].max()]
    assert len(latest) == len(TREATMENT_RATES)
    assert (alloc["window_end"] == latest["window_end"].iloc[0]).all()
    assert (alloc.set_index("treatment_id")["weight"].to_dict()
            == pytest.approx(latest.set_index("treatment_id")["weight"].to_dict()))


def test_the_report_estimates_policies_off_policy_from_logged_propensities(runs):
    policy = query(runs, "SELECT * FROM campaign_policy_value").set_index(["policy", "method"])
    recips = _recipients(runs)
    assert (policy["sends"] == len(recips)).all()
    assert (policy["sends_without_propensity"] == 0).all()
    realised = policy.loc[("logged", "realised")]
    assert realised["value"] == pytest.approx(recips["clicked"].mean())
    assert realised["ci_low"] < realised["value"] < realised["ci_high"]
    # The fixture's sends are uniform (propensity 1/3), so the uniform policy's IPS is the
    # plain mean and the lift over it is zero.
    assert policy.loc[("uniform", "ips"), "value"] == pytest.approx(realised["value"])
    assert policy.loc[("lift_vs_uniform", "snips"), "value"] == pytest.approx(0.0, abs=1e-12)
    greedy = policy.loc[("greedy", "snips"), "value"]
    best = recips.groupby("treatment_id")["clicked"].mean().max()
    assert greedy == pytest.approx(best)
    assert set(policy.index.get_level_values("policy")) == {
        "logged", "uniform", "greedy", "thompson", "lift_vs_uniform"}


def test_campaign_tables_agree_with_the_fixture(runs):
    funnel = query(runs, "SELECT stage, recipients, rate_of_sent FROM campaign_funnel "
                         "WHERE campaign_id = '*' AND treatment_id = '*' ORDER BY stage_order")
    sent, delivered, opened, clicked, ordered = funnel["recipients"].tolist()
    kinds = pd.Series([t["kind"] for t in runs["treatments"][:-4]]).value_counts()
    assert (sent, delivered, opened, clicked) == (kinds["SENT"], kinds["DELIVERED"],
                                                  kinds["VIEWED"], kinds["CLICKED"])
    assert 0 < ordered < sent
    revenue = query(runs, "SELECT path, orders, revenue FROM campaign_revenue_by_path "
                          "WHERE campaign_id = '*'")
    assert set(revenue["path"]) == {"opened→ordered", "delivered→ordered", "sent→ordered"}
    assert revenue["orders"].sum() <= ordered
    failures = query(runs, "SELECT reason, failures FROM campaign_delivery_failures "
                           "WHERE campaign_id = '*'")
    assert set(failures["reason"]) == set(FAILURE_REASONS)
    assert failures["failures"].sum() == kinds["DELIVERY_FAILED"]
    aov = query(runs, "SELECT \"group\", orders FROM campaign_aov")
    assert aov.set_index("group")["orders"]["non_recipients"] == 60
    time_to_order = query(runs, "SELECT * FROM campaign_time_to_order WHERE campaign_id = '*'")
    assert time_to_order.loc[time_to_order["kind"] == "histogram", "orders"].sum() == \
        revenue["orders"].sum()


def test_html_report_is_self_contained_with_svg_plots(runs):
    page = runs["html"].read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert page.count("<svg") >= 5 + len(TREATMENT_RATES)
    for title in ("Campaign funnel", "Posterior click-through densities", "CTR of T_hero",
                  "Attributed revenue by conversion path", "Time from e-mail to order",
                  "Delivery failures by reason", "Click-through per send"):
        assert title in page
    for external in ("<script", "src=", "href=", "http://", "https://", "@import"):
        assert external not in page


@pytest.mark.parametrize("job, flags, message", [
    (bandit_report, ["--period_days", "8"], "period_days"),
    (bandit_report, ["--exploration_floor", "2"], "exploration_floor"),
    (campaign_report, ["--segment_by", "make"], "segment_by"),
    (campaign_report, ["--attribution_days", "0"], "attribution_days"),
])
def test_bad_options_fail_before_any_data_is_read(tmp_path, job, flags, message):
    with pytest.raises(SystemExit, match=message):
        job.run(["--input_dir", str(tmp_path), "--warehouse", str(tmp_path / "wh.duckdb")]
                + flags)
    assert not (tmp_path / "wh.duckdb").exists()


def test_reports_take_the_input_limits_of_the_config(tmp_path):
    """A wholesaler's 50,000-unit line is refused under the default cap and counted once the
    shop's --config raises ``inputs.max_quantity``: the reports validate like the batch job."""
    world = tmp_path / "world"
    world.mkdir()
    treatments, orders = make_world(seed=2, users=40, days=5)
    bulk = {**orders[-1], "event_id": "bulk1", "order_id": "BULK", "user_id": "wholesaler",
            "quantity": 50_000, "price": 0.4}
    for name, rows in (("treatment_events", treatments), ("events", orders + [bulk])):
        with open(world / f"{name}.jsonl", "w") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)
    config = tmp_path / "wholesale.yaml"
    config.write_text("inputs:\n  max_quantity: 100000\n")
    common = ["--input_dir", str(world), "--warehouse", str(tmp_path / "wh.duckdb"),
              "--num_shards", "2", "--bandit_draws", "1000"]
    assert campaign_report.run(common + ["--run_id", "default_cap"]) == 0
    assert campaign_report.run(common + ["--run_id", "raised_cap", "--config", str(config)]) == 0
    with duckdb.connect(str(tmp_path / "wh.duckdb"), read_only=True) as con:
        refused = con.execute("SELECT run_id, reason FROM dead_letter WHERE record LIKE "
                              "'%BULK%'").fetchall()
        counters = dict(con.execute("SELECT run_id, counters FROM pipeline_runs").fetchall())
    assert [run for run, _ in refused] == ["default_cap"]
    assert "quantity" in refused[0][1]
    assert json.loads(counters["default_cap"]).get("events.dead_lettered") == 1
    assert json.loads(counters["raised_cap"]).get("events.dead_lettered", 0) == 0


def test_a_registry_of_treatments_refuses_the_others_and_they_never_become_arms(tmp_path):
    """With ``inputs.treatment_ids`` configured, a treatment outside it is dead-lettered
    (``unknown treatment_id``) and has no bandit row nor allocation weight (issue #18)."""
    world = tmp_path / "world"
    world.mkdir()
    treatments, _ = write_world(world, seed=3, users=60, days=3)
    config = tmp_path / "registry.yaml"
    config.write_text("inputs:\n  treatment_ids: [T_hero, T_list]\n")
    warehouse = str(tmp_path / "wh.duckdb")
    assert bandit_report.run(["--input_dir", str(world), "--warehouse", warehouse,
                              "--num_shards", "2", "--bandit_draws", "1000",
                              "--run_id", "registry", "--config", str(config)]) == 0
    with duckdb.connect(warehouse, read_only=True) as con:
        reasons = dict(con.execute("SELECT reason, count(*) FROM dead_letter "
                                   "GROUP BY reason").fetchall())
        arms = {r[0] for r in con.execute("SELECT treatment_id FROM bandit_state").fetchall()}
        weighted = {r[0] for r in con.execute(
            "SELECT treatment_id FROM bandit_allocation").fetchall()}
    plain = sum(t["treatment_id"] == "T_plain" for t in treatments)
    assert reasons["unknown treatment_id"] == plain > 0
    assert arms == weighted == {"T_hero", "T_list"}
