"""Tests for models.health: counter reconciliation and the publish verdict (SPEC §7)."""
import pytest

from models.health import GATED, PUBLISHED, RECONCILED_TABLES, reconcile, verdict

CLEAN_QA = {rule: 0 for rule in range(1, 16)}


def balanced_counters():
    counters = {}
    for table in RECONCILED_TABLES:
        counters.update({f"{table}.read": 100, f"{table}.processed": 90,
                         f"{table}.dead_lettered": 6, f"{table}.deduplicated": 4})
    return counters


def test_reconcile_balanced():
    out = reconcile(balanced_counters())
    assert set(out) == set(RECONCILED_TABLES)
    assert out["events"] == {"read": 100, "processed": 90, "dead_lettered": 6,
                             "deduplicated": 4, "unexplained": 0}


def test_reconcile_reports_the_gap_per_table():
    counters = balanced_counters()
    counters["events.processed"] = 80          # 10 events vanished
    counters["users.dead_lettered"] = 9        # 3 more accounted for than read
    out = reconcile(counters)
    assert out["events"]["unexplained"] == 10
    assert out["users"]["unexplained"] == -3
    assert out["catalog"]["unexplained"] == 0


def test_reconcile_missing_counters_are_zero():
    out = reconcile({"catalog.read": 5}, tables=("catalog", "fitment"))
    assert out["catalog"]["unexplained"] == 5
    assert out["fitment"] == {"read": 0, "processed": 0, "dead_lettered": 0,
                              "deduplicated": 0, "unexplained": 0}


def test_clean_run_publishes():
    v = verdict(CLEAN_QA, 458_859, 458_665, 0.5, balanced_counters())
    assert v.status == PUBLISHED
    assert "458859" in v.message


def test_first_run_without_history_publishes():
    assert verdict(CLEAN_QA, 10, None, 0.5, balanced_counters()).status == PUBLISHED


def test_qa_failure_gates_and_names_rules():
    qa = {**CLEAN_QA, 3: 538, 9: 2}
    v = verdict(qa, 458_859, 458_665, 0.5, balanced_counters())
    assert v.status == GATED
    assert v.message == "QA failed: rule 3 (538 violations), rule 9 (2 violations)"


def test_zero_rows_is_an_alarm():
    v = verdict(CLEAN_QA, 0, None, 0.5, balanced_counters())
    assert v.status == GATED and "zero recommendations" in v.message
    assert verdict(CLEAN_QA, 0, 1000, 0.5, balanced_counters()).status == GATED


def test_far_fewer_than_last_run_is_an_alarm():
    v = verdict(CLEAN_QA, 499, 1000, 0.5, balanced_counters())
    assert v.status == GATED
    assert "499" in v.message and "1000" in v.message and "50%" in v.message
    # at the ratio exactly, and above it, the run publishes
    assert verdict(CLEAN_QA, 500, 1000, 0.5, balanced_counters()).status == PUBLISHED
    assert verdict(CLEAN_QA, 900, 1000, 0.5, balanced_counters()).status == PUBLISHED


def test_unreconciled_counts_gate():
    counters = balanced_counters()
    counters["fitment.read"] = 101
    v = verdict(CLEAN_QA, 100, 100, 0.5, counters)
    assert v.status == GATED
    assert "reconcile" in v.message and "fitment" in v.message


@pytest.mark.parametrize("qa, written, last, counters, expected", [
    ({3: 1}, 0, 1000, {"events.read": 1}, "QA failed"),
    ({}, 0, 1000, {"events.read": 1}, "zero recommendations"),
    ({}, 10, 1000, {"events.read": 1}, "under 50%"),
])
def test_first_failing_gate_is_reported(qa, written, last, counters, expected):
    v = verdict(qa, written, last, 0.5, counters)
    assert v.status == GATED and expected in v.message
