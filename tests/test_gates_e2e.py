"""Job level: each sanity gate (SPEC §10) tripped by the input that trips it in a real batch run.

Every gated run exits 1, leaves ``recommendations`` as it was, names the gate in
``pipeline_runs.message``, in its ``qa_checks`` row and in the printed summary,
and records the gate values in the run's counters.
"""
import json
import os
import shutil

import duckdb
import pandas as pd
import pytest

from models import sanity
from pipelines import batch_recommendations


def _run(world_dir, warehouse, *extra):
    return batch_recommendations.run([
        "--input_dir", world_dir, "--warehouse", warehouse, "--num_shards", "2", *extra])


def _copy(world_dir, tmp_path, name="world"):
    out = str(tmp_path / name)
    shutil.copytree(world_dir, out)
    return out


def _tables(warehouse):
    con = duckdb.connect(warehouse, read_only=True)
    try:
        names = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables")
                 .fetchall()}
        return {t: con.execute(f"SELECT * FROM {t}").df() for t in names}
    finally:
        con.close()


def _gate(tables, run_id, name):
    qa = tables["qa_checks"]
    return qa[(qa["run_id"] == run_id) & (qa["name"] == f"gate: {name}")].iloc[0]


def _run_row(tables, run_id):
    runs = tables["pipeline_runs"]
    return runs[runs["run_id"] == run_id].iloc[0]


def _assert_gated_by(tables, run_id, name, out):
    """Gated, by ``name``, visible in message, qa_checks, counters and the printed summary."""
    row = _run_row(tables, run_id)
    assert row["status"] == "gated", row["message"]
    assert name in row["message"]
    gate = _gate(tables, run_id, name)
    assert gate["violations"] == 1 and gate["rule_id"] == sanity.GATE_IDS[name]
    assert json.loads(row["counters"])[f"gate.{name}.tripped"] == 1
    assert f"TRIPPED {name}:" in out
    return row, gate


@pytest.fixture(scope="module")
def as_of(clean_world):
    return clean_world[1]["as_of"]


def test_empty_events_file_is_gated(clean_world, as_of, tmp_path, capsys):
    world = _copy(clean_world[0], tmp_path)
    open(os.path.join(world, "events.jsonl"), "w").close()
    warehouse = str(tmp_path / "wh.duckdb")
    assert _run(world, warehouse, "--as_of", as_of, "--run_id", "empty") == 1
    tables = _tables(warehouse)
    _, gate = _assert_gated_by(tables, "empty", sanity.STALE_HISTORY, capsys.readouterr().out)
    assert "no orders" in gate["detail"] and pd.isna(gate["value"])
    assert "recommendations" not in tables
    # all 15 rules held: before the gates this run published (global 100%)
    rules = tables["qa_checks"][tables["qa_checks"]["rule_id"] <= 15]
    assert len(rules) == 15 and rules["violations"].sum() == 0


def test_old_history_without_as_of_is_gated_with_the_hint(clean_world, as_of, tmp_path, capsys):
    warehouse = str(tmp_path / "wh.duckdb")
    end = pd.Timestamp(as_of)
    assert pd.Timestamp.now(tz="UTC") - end > pd.Timedelta(days=30), "the world is not old"
    assert _run(clean_world[0], warehouse, "--run_id", "stale") == 1  # --as_of defaults to now
    tables = _tables(warehouse)
    row, gate = _assert_gated_by(tables, "stale", sanity.STALE_HISTORY,
                                 capsys.readouterr().out)
    newest = pd.Timestamp(gate["detail"].split("history ends ", 1)[1][:16] + "Z")
    assert end - pd.Timedelta(days=2) <= newest <= end  # the world's last order, near its as_of
    assert f"pass --as_of {newest:%Y-%m-%dT%H:%M}" in gate["detail"]
    assert json.loads(row["counters"])["gate.stale_history"] == pytest.approx(gate["value"])
    assert gate["value"] > 30 and gate["threshold"] == 30
    assert "pass --as_of " in gate["detail"] and "or refresh the history" in gate["detail"]
    assert "recommendations" not in tables


def test_rules_that_leave_a_handful_of_products_are_gated(clean_world, as_of, tmp_path, capsys):
    config = tmp_path / "other_shop.yaml"
    config.write_text("rules:\n  min_price: 3000.0\n")  # 16 of the tiny world's 1,509 SKUs
    warehouse = str(tmp_path / "wh.duckdb")
    assert _run(clean_world[0], warehouse, "--as_of", as_of, "--config", str(config),
                "--run_id", "handful") == 1
    tables = _tables(warehouse)
    _, gate = _assert_gated_by(tables, "handful", sanity.ELIGIBLE_SKUS,
                               capsys.readouterr().out)
    assert 0 < gate["value"] < 20 and gate["threshold"] == 20
    assert "revisit the rules" in gate["detail"]
    assert "recommendations" not in tables


@pytest.fixture(scope="module")
def published(clean_world, as_of, tmp_path_factory):
    """One published run on the clean tiny world; tests copy its warehouse and rerun."""
    warehouse = str(tmp_path_factory.mktemp("gates") / "wh.duckdb")
    assert _run(clean_world[0], warehouse, "--as_of", as_of, "--run_id", "base") == 0
    return warehouse


def _copy_warehouse(published, tmp_path):
    warehouse = str(tmp_path / "wh.duckdb")
    shutil.copy(published, warehouse)
    return warehouse


def test_the_published_run_records_every_gate_value(published):
    tables = _tables(published)
    row = _run_row(tables, "base")
    counters = json.loads(row["counters"])
    gates = tables["qa_checks"][tables["qa_checks"]["rule_id"] > 100]
    assert gates["name"].tolist() == [f"gate: {g}" for g in sanity.GATE_IDS]
    assert gates["violations"].sum() == 0
    for name in (sanity.STALE_HISTORY, sanity.TIED_SCORES, sanity.SKU_CONCENTRATION,
                 sanity.ELIGIBLE_SKUS, sanity.ELIGIBLE_SHARE):
        assert f"gate.{name}" in counters and counters[f"gate.{name}.tripped"] == 0
    assert counters["gate.eligible_skus"] > 100


def test_much_smaller_users_file_is_gated(clean_world, as_of, published, tmp_path, capsys):
    world = _copy(clean_world[0], tmp_path)
    path = os.path.join(world, "users.jsonl")
    with open(path) as handle:
        lines = handle.readlines()
    with open(path, "w") as handle:
        handle.writelines(lines[: len(lines) // 5])
    warehouse = _copy_warehouse(published, tmp_path)
    before = _tables(warehouse)["recommendations"]
    assert _run(world, warehouse, "--as_of", as_of, "--run_id", "small") == 1
    tables = _tables(warehouse)
    _, gate = _assert_gated_by(tables, "small", sanity.INPUT_SHRINKAGE, capsys.readouterr().out)
    assert gate["value"] == pytest.approx((len(lines) // 5) / len(lines), abs=0.01)
    assert gate["detail"].startswith("users:")
    pd.testing.assert_frame_equal(tables["recommendations"], before)


def test_churning_rerun_is_gated_then_published_with_accept_changes(clean_world, as_of,
                                                                   published, tmp_path, capsys):
    config = tmp_path / "pricier.yaml"
    config.write_text("rules:\n  min_price: 400.0\n")  # most lists change, plenty stay eligible
    warehouse = _copy_warehouse(published, tmp_path)
    before = _tables(warehouse)["recommendations"]
    args = ["--as_of", as_of, "--config", str(config)]
    assert _run(clean_world[0], warehouse, *args, "--run_id", "churn") == 1
    tables = _tables(warehouse)
    _, gate = _assert_gated_by(tables, "churn", sanity.CHURN, capsys.readouterr().out)
    assert gate["value"] > 0.5 and "--accept_changes" in gate["detail"]
    pd.testing.assert_frame_equal(tables["recommendations"], before)
    assert _run(clean_world[0], warehouse, *args, "--run_id", "accepted",
                "--accept_changes") == 0
    tables = _tables(warehouse)
    row = _run_row(tables, "accepted")
    assert row["status"] == "published"
    assert "accepted with --accept_changes" in _gate(tables, "accepted", sanity.CHURN)["detail"]
    assert set(tables["recommendations"]["run_id"]) == {"accepted"}
