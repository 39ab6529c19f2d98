"""The bandit in the loop (issue #18): OPE, choose(), attribution by send, treatment registry."""
import json

import numpy as np
import pandas as pd
import pytest

from models import allocation, campaign, contracts, ope, sends
from models import streaming as stream_model
from models.bandit import BanditConfig
from models.config import InputConfig
from models.config_file import config_from_dict

DAY = pd.Timedelta(days=1)


# --- off-policy evaluation ----------------------------------------------------------------

# Two arms; the logger sent arm 0 with p = 0.6 and arm 1 with p = 0.4; target pi = (0.2, 0.8).
ARMS, PROPS, REWARDS, TARGET = [0, 1, 0, 1], [0.6, 0.4, 0.6, 0.4], [1, 1, 0, 0], [0.2, 0.8]


def test_ips_snips_and_dr_match_the_hand_computation():
    log = ope.make_log(ARMS, PROPS, REWARDS)
    est = ope.estimate(log, TARGET, 2, q_hat=[0.3, 0.6], resamples=0)
    # weights pi(a)/p = 1/3, 2, 1/3, 2; w*r = 1/3, 2, 0, 0.
    assert est["ips"].value == pytest.approx((1 / 3 + 2) / 4)               # 7/12
    assert est["snips"].value == pytest.approx((1 / 3 + 2) / (14 / 3))      # 1/2
    # DR: pi . q = 0.54; residuals 0.7, 0.4, -0.3, -0.6 weighted: 0.7/3 + 0.8 - 0.1 - 1.2.
    assert est["dr"].value == pytest.approx(0.54 + (0.7 / 3 + 0.8 - 0.1 - 1.2) / 4)


def test_a_compact_log_gives_the_same_estimates_and_intervals_as_one_row_per_send():
    rng = np.random.default_rng(3)
    arm = rng.integers(0, 3, 500)
    prop = np.array([0.5, 0.3, 0.2])[arm]
    reward = (rng.random(500) < np.array([0.1, 0.2, 0.3])[arm]).astype(float)
    full = ope.make_log(arm, prop, reward)
    cells = pd.DataFrame({"a": arm, "p": prop, "r": reward}).value_counts().reset_index()
    compact = ope.make_log(cells["a"], cells["p"], cells["r"], cells["count"])
    a = ope.estimate(full, [0.2, 0.3, 0.5], 3, resamples=0)
    b = ope.estimate(compact, [0.2, 0.3, 0.5], 3, resamples=0)
    for m in ope.METHODS:
        assert a[m].value == pytest.approx(b[m].value)
    again = ope.estimate(compact, [0.2, 0.3, 0.5], 3, resamples=300, seed=9)
    assert again == ope.estimate(compact, [0.2, 0.3, 0.5], 3, resamples=300, seed=9)
    for m in ope.METHODS:
        assert again[m].ci_low < again[m].value < again[m].ci_high


def test_ope_intervals_cover_the_true_value_of_three_policies():
    """Known truth: 3 arms, a skewed logging policy; over 40 seeded logs the SNIPS and DR
    95% intervals of uniform, greedy and Thompson policies cover the true value in most."""
    ctr = np.array([0.02, 0.05, 0.08])
    logging = np.array([0.6, 0.3, 0.1])
    policies = {"uniform": ope.uniform_policy(3), "greedy": np.array([0.0, 0.0, 1.0]),
                "thompson": np.array([0.05, 0.25, 0.70])}
    hits = {(p, m): 0 for p in policies for m in ("snips", "dr")}
    errors = {p: [] for p in policies}
    seeds = 40
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        arm = rng.choice(3, 4000, p=logging)
        reward = (rng.random(4000) < ctr[arm]).astype(float)
        cells = pd.DataFrame({"a": arm, "r": reward}).value_counts().reset_index()
        log = ope.make_log(cells["a"], logging[cells["a"]], cells["r"], cells["count"])
        for name, pi in policies.items():
            est = ope.estimate(log, pi, 3, resamples=300, seed=seed)
            truth = float(pi @ ctr)
            errors[name].append(est["dr"].value - truth)
            for m in ("snips", "dr"):
                hits[(name, m)] += est[m].ci_low <= truth <= est[m].ci_high
    for key, n in hits.items():
        assert n / seeds >= 0.85, (key, n)
    for name, err in errors.items():
        assert abs(np.mean(err)) < 0.004, (name, np.mean(err))


def test_the_lift_over_uniform_has_a_paired_interval():
    rng = np.random.default_rng(1)
    ctr, logging = np.array([0.01, 0.06]), np.array([0.2, 0.8])
    arm = rng.choice(2, 20_000, p=logging)
    log = ope.make_log(arm, logging[arm], (rng.random(20_000) < ctr[arm]).astype(float))
    lift = ope.lift(log, ope.uniform_policy(2), 2, resamples=400)
    assert lift.value == pytest.approx(float(logging @ ctr - ctr.mean()), abs=0.006)
    assert 0 < lift.ci_low < lift.value < lift.ci_high


def test_bad_logs_and_policies_are_refused():
    with pytest.raises(ValueError, match="propensities"):
        ope.make_log([0], [1.5], [1])
    with pytest.raises(ValueError, match="probability vector"):
        ope.estimate(ope.make_log([0], [1.0], [1]), [0.7, 0.7], 2)


def test_the_policy_table_counts_sends_without_a_propensity_and_leaves_them_out():
    logs = pd.DataFrame({"treatment_id": ["A", "A", "B", "B", "A"],
                         "propensity": [0.5, 0.5, 0.5, 0.5, np.nan],
                         "clicked": [True, False, True, False, True],
                         "sends": [30, 70, 10, 90, 5]})
    table = sends.policy_value_table(logs, resamples=200).set_index(["policy", "method"])
    assert (table["sends"] == 200).all() and (table["sends_without_propensity"] == 5).all()
    assert table.loc[("logged", "realised"), "value"] == pytest.approx(40 / 200)
    assert table.loc[("greedy", "snips"), "value"] == pytest.approx(0.3)
    assert table.loc[("uniform", "ips"), "value"] == pytest.approx(0.2)


# --- the allocation a sender uses ---------------------------------------------------------

ALLOC = pd.DataFrame({"allocation_version": "v7", "segment": ["*", "*", "*", "FORD", "FORD"],
                      "treatment_id": ["A", "B", "C", "A", "B"],
                      "weight": [0.5, 0.3, 0.2, 0.1, 0.9]})


def test_choose_is_deterministic_and_its_propensities_match_empirical_frequencies():
    users = [f"U{i:06d}" for i in range(40_000)]
    treatments, props = allocation.choose_many(users, ALLOC, seed=11)
    weights = {"A": 0.5, "B": 0.3, "C": 0.2}
    assert sum(weights.values()) == pytest.approx(1.0)
    assert all(props[i] == weights[t] for i, t in enumerate(treatments[:1000]))
    freq = pd.Series(treatments).value_counts(normalize=True)
    for t, w in weights.items():
        assert freq[t] == pytest.approx(w, abs=0.01)
    assert allocation.choose("U000001", ALLOC, 11) == (treatments[1], props[1])
    assert allocation.choose("U000001", ALLOC, 11) == allocation.choose("U000001", ALLOC, 11)
    other = allocation.choose_many(users[:2000], ALLOC, seed=12)[0]
    assert (other != treatments[:2000]).mean() > 0.3   # another seed, another draw


def test_choose_uses_the_users_segment_and_falls_back_to_the_overall_weights():
    t, p = allocation.choose_many([f"U{i}" for i in range(5000)], ALLOC, 1,
                                  ["FORD"] * 2500 + ["KIA"] * 2500)
    assert set(t[:2500]) == {"A", "B"} and set(p[:2500]) == {0.1, 0.9}
    assert set(t[2500:]) == {"A", "B", "C"}
    with pytest.raises(ValueError, match="exactly one allocation_version"):
        allocation.choose("U1", ALLOC.assign(allocation_version=["v1", "v2"] * 2 + ["v1"]), 1)


def test_segment_allocations_shrink_toward_the_overall_posterior():
    state = pd.DataFrame({
        "scope": "overall", "window_start": campaign.EPOCH, "window_end": campaign.EPOCH + DAY,
        "segment": ["*", "*", "FORD", "KIA"], "treatment_id": ["A", "B", "B", "A"],
        "views": [1000, 1000, 3, 2000], "clicks": [100, 20, 3, 20],
        "mean": [0.1, 0.02, 0.8, 0.01], "weight": [0.98, 0.02, 1.0, 1.0]})
    table = allocation.allocation_table(state, "run9", BanditConfig(draws=4000))
    w = table.set_index(["segment", "treatment_id"])["weight"]
    # 3 lucky clicks of 3 views do not overturn B's overall 2%: A still leads in FORD.
    assert w[("FORD", "A")] > w[("FORD", "B")]
    # 2,000 KIA views at 1% do: B (no KIA data, overall 2%) leads there.
    assert w[("KIA", "B")] > w[("KIA", "A")]
    assert (table["allocation_version"] == "run9").all()
    np.testing.assert_allclose(table.groupby("segment")["weight"].sum(), 1.0)
    assert (table["weight"] >= BanditConfig().exploration_floor - 1e-12).all()


# --- attribution by send ------------------------------------------------------------------

def _events(rows):
    return pd.DataFrame([{"event_id": f"e{i}", "campaign_id": "C", "user_id": u,
                          "treatment_id": t, "kind": k, "event_time": pd.Timestamp(at, tz="UTC")}
                         for i, (u, t, k, at) in enumerate(rows)])


def test_a_click_across_a_window_boundary_counts_in_its_sends_window():
    events = _events([("u", "A", "SENT", "2026-05-01T23:30"),
                      ("u", "A", "VIEWED", "2026-05-02T00:10"),
                      ("u", "A", "CLICKED", "2026-05-02T00:20"),
                      ("v", "A", "SENT", "2026-05-01T10:00"),
                      ("v", "A", "CLICKED", "2026-05-03T10:00"),    # no tracked open
                      ("w", "A", "SENT", "2026-05-01T10:00"),
                      ("w", "A", "CLICKED", "2026-05-20T10:00")])   # beyond 7 days
    checked = campaign.check_funnel(events)
    out = sends.attribute_to_sends(checked.rows, 7 * DAY)
    assert out.beyond == 1 and out.opens_inferred == 1
    counts = campaign.bucket_counts(out.rows.assign(segment="*"), DAY)
    assert counts[["sent", "views", "clicks"]].values.tolist() == [[3, 2, 2]]
    assert counts["bucket_start"].tolist() == [pd.Timestamp("2026-05-01", tz="UTC")]
    state = campaign.window_state(counts.drop(columns="bucket_start"),
                                  counts["bucket_start"].iloc[0],
                                  counts["bucket_start"].iloc[0] + DAY)
    assert state.clicks_capped == 0 and state.state["clicks"].tolist() == [2]
    # Timed by the event itself, the day-2 click would have had no view in its window.
    by_event = campaign.bucket_counts(checked.rows.assign(segment="*"), DAY)
    assert (by_event["clicks"] > by_event["views"]).any()


def test_the_send_log_credits_a_click_to_its_send_within_the_window():
    events = _events([("u", "A", "SENT", "2026-05-01T23:30"),
                      ("u", "A", "CLICKED", "2026-05-03T00:20"),
                      ("w", "B", "SENT", "2026-05-01T10:00"),
                      ("w", "B", "CLICKED", "2026-05-20T10:00")]).assign(
        propensity=[0.25, None, 0.75, None])
    log = sends.send_log(campaign.check_funnel(events).rows, 7 * DAY)
    assert log.values.tolist() == [["A", 0.25, True, 1], ["B", 0.75, False, 1]]


# --- the treatment registry, batch and streaming -------------------------------------------

REGISTRY = InputConfig(treatment_ids=("T01", "T02"))
HOSTILE = "<script>alert('tid')</script>"


def _treatment_frame(ids, propensity=None):
    n = len(ids)
    return pd.DataFrame({"event_id": [f"e{i}" for i in range(n)],
                         "event_time": ["2026-05-01T10:00:00Z"] * n,
                         "user_id": ["u"] * n, "treatment_id": ids, "campaign_id": ["C"] * n,
                         "kind": ["SENT"] * n,
                         **({"propensity": propensity} if propensity is not None else {})})


def test_the_contract_refuses_unknown_and_malformed_treatment_ids():
    frame = _treatment_frame(["T01", "T09", HOSTILE, "T02"])
    checked = contracts.validate("treatment_events", frame, REGISTRY)
    assert checked.rows["treatment_id"].tolist() == ["T01", "T02"]
    assert dict(zip(checked.bad_positions.tolist(), checked.bad_reasons.tolist())) == {
        1: "unknown treatment_id", 2: "malformed treatment_id"}
    # Without a registry (the default) any well-formed id passes; markup never does.
    default = contracts.validate("treatment_events", frame)
    assert default.bad_reasons.tolist() == ["malformed treatment_id"]


def test_a_campaign_type_with_one_space_is_an_id_but_padding_and_double_spaces_are_not():
    """The grocer's campaign types (``Type A``) are treatment ids; odd spacing is refused."""
    frame = _treatment_frame(["Type A", "Type  A", "Type A ", "TypeA"])
    checked = contracts.validate("treatment_events", frame)
    assert checked.rows["treatment_id"].tolist() == ["Type A", "TypeA"]
    assert sorted(checked.bad_positions.tolist()) == [1, 2]


def test_the_contract_checks_a_sends_propensity():
    frame = _treatment_frame(["T01"] * 5, [0.5, 1.0, 0.0, 1.5, None])
    checked = contracts.validate("treatment_events", frame)
    assert checked.rows["propensity"].tolist()[:2] == [0.5, 1.0]
    assert dict(zip(checked.bad_positions.tolist(), checked.bad_reasons.tolist())) == {
        2: "zero propensity", 3: "absurd propensity"}


def test_streaming_refuses_unknown_treatments_with_the_batch_words():
    def message(tid, event_id):
        return (b'{"event_id": "%s", "event_time": "2026-05-01T10:00:00Z", "user_id": "u",'
                b' "treatment_id": "%s", "campaign_id": "C", "kind": "SENT",'
                b' "propensity": 0.5, "allocation_version": "v1"}' % (event_id.encode(),
                                                                      tid.encode()))
    payloads = [message("T01", "a"), message("T09", "b"), message(HOSTILE, "c")]
    out = stream_model.parse_messages("treatment_events", payloads, [{}] * 3, REGISTRY)
    assert [r["treatment_id"] for r in out.records] == ["T01"]
    assert out.records[0]["propensity"] == 0.5
    assert out.records[0]["allocation_version"] == "v1"
    assert out.bad == [(1, "unknown treatment_id"), (2, "malformed treatment_id")]


def test_the_registry_is_configurable_and_checked_at_start_up():
    config = config_from_dict({"inputs": {"treatment_ids": ["T01", "T02"]}})
    assert config.inputs.treatment_ids == ("T01", "T02")
    with pytest.raises(ValueError, match="treatment_id_pattern"):
        config_from_dict({"inputs": {"treatment_ids": [HOSTILE]}})
    with pytest.raises(ValueError, match="treatment_id_pattern"):
        config_from_dict({"inputs": {"treatment_id_pattern": "(unclosed"}})


def test_the_streaming_parse_dead_letters_unknown_treatments():
    import apache_beam as beam
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that, equal_to

    from transforms.streaming import ParseMessages

    record = {"event_id": "a", "event_time": "2026-05-01T10:00:00Z", "user_id": "u",
              "treatment_id": "T01", "campaign_id": "C", "kind": "SENT"}
    messages = [json.dumps({**record, "event_id": str(i), "treatment_id": t}).encode()
                for i, t in enumerate(["T01", "T03", HOSTILE])]
    with TestPipeline() as p:
        parsed = p | beam.Create(messages) | ParseMessages("treatment_events", REGISTRY)
        assert_that(parsed.rows | beam.Map(lambda r: r["treatment_id"]), equal_to(["T01"]),
                    label="Kept")
        assert_that(parsed.dead_letters | beam.Map(lambda d: d["reason"]),
                    equal_to(["unknown treatment_id", "malformed treatment_id"]), label="Dead")


def test_streaming_keeps_per_segment_arms_shrunk_toward_the_overall_ones(tmp_path):
    """``--bandit_segment_by make``: each treatment event is keyed by its user's make from
    the reference users, and the window holds the overall arms plus each make's, as batch."""
    import apache_beam as beam
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that, equal_to
    from apache_beam.transforms.window import TimestampedValue

    from models.config import DEFAULT_CONFIG
    from tests.test_streaming_transforms import BASE, US, small_world
    from transforms.streaming import FileReference, StreamingBandit
    from transforms.streaming.refusals import Record

    reference = FileReference(small_world(tmp_path / "ref"), DEFAULT_CONFIG, 3600)
    spec = stream_model.WindowSpec.of_seconds(10, 10, 0)

    def record(i, user, treatment, kind):
        return {"event_id": f"T{i}", "user_id": user, "treatment_id": treatment,
                "campaign_id": "C", "kind": kind, "event_time_us": (BASE + 1) * US}

    # U1, U2 drive Fords, U3, U4 Hondas; "ghost" is not in the users file.
    events = [record(1, "U1", "A", "VIEWED"), record(2, "U1", "A", "CLICKED"),
              record(3, "U3", "A", "VIEWED"), record(4, "U4", "B", "VIEWED"),
              record(5, "ghost", "B", "VIEWED")]
    with TestPipeline() as p:
        state = (p | beam.Create(events)
                 | beam.Map(lambda r: TimestampedValue(r, BASE + 1)).with_output_types(Record)
                 | StreamingBandit(BanditConfig(draws=500), spec, reference, ("make",)))
        assert_that(state.rows | beam.FlatMap(lambda f: [
            (r.segment, r.treatment_id, r.views, r.clicks) for r in f.itertuples(index=False)]),
            equal_to([("*", "A", 2, 1), ("*", "B", 2, 0),
                      ("FORD", "A", 1, 1), ("HONDA", "A", 1, 0), ("HONDA", "B", 1, 0),
                      (campaign.NO_SEGMENT, "B", 1, 0)]))
