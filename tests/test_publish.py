"""Safe publishing on both warehouses (DuckDB, and BigQuery through the emulator).

Staged outputs are hand-made here; the end-to-end runs are in
test_bigquery_e2e.py (BigQuery) and test_batch_e2e.py (DuckDB).
"""
import json
import os
import uuid

import apache_beam as beam
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing import test_pipeline

from models.config import DEFAULT_CONFIG
from pipelines import publish as publish_cli
from transforms import schemas
from transforms.bigquery import client as bigquery_client
from models.sanity import GateSignals
from transforms.publish import PublishRunFn
from transforms.warehouse import BigQueryWarehouse, LocalWarehouse, identifier, parse_table

N = DEFAULT_CONFIG.rules.recs_per_user
SCHEMA = schemas.recommendations(N)
INJECTION = "x`; DROP TABLE y"


def recs(rows, run_id):
    """Recommendation rows from {email: ([sku] * N, [price] * N)}."""
    out = []
    for email, (skus, prices) in rows.items():
        row = {"user_id": email.split("@")[0], "email_lower": email, "make": "Ford",
               "model": "F-150", "year": 2020, "segment": "Ford|F-150|2020", "source": "global",
               "generated_at": pd.Timestamp("2026-03-01", tz="UTC"), "run_id": run_id,
               "model_version": "test"}
        for i in range(N):
            row.update({f"rec_part_{i + 1}": skus[i], f"rec{i + 1}_price": prices[i],
                        f"rec{i + 1}_score": float(N - i), f"rec{i + 1}_image_url": "https://x",
                        f"rec{i + 1}_part_type": f"P{i}"})
        out.append(row)
    return pd.DataFrame(out)


P = [100.0, 200.0, 300.0, 400.0]
OLD = {"a@x": (["S1", "S2", "S3", "S4"], P), "b@x": (["S1", "S2", "S3", "S4"], P),
       "c@x": (["S5", "S6", "S7", "S8"], P), "gone@x": (["S1", "S2", "S3", "S4"], P)}
NEW = {"a@x": (["S1", "S2", "S3", "S4"], P),                          # unchanged
       "b@x": (["S2", "S1", "S3", "S4"], [200.0, 100.0, 300.0, 400.0]),  # ranks 1 and 2 swap
       "c@x": (["S5", "S6", "S7", "S9"], [100.0, 200.0, 300.0, 800.0]),  # rank 4 changes
       "new@x": (["S1", "S2", "S3", "S4"], P)}


@pytest.fixture(params=["local", "bigquery"])
def warehouse(request, tmp_path):
    if request.param == "local":
        return LocalWarehouse(str(tmp_path / "warehouse.duckdb"))
    emulator = request.getfixturevalue("bigquery")
    endpoint = f"http://{emulator.host}"
    dataset = f"publish_{uuid.uuid4().hex[:8]}"
    bigquery_client(emulator.project, endpoint).create_dataset(dataset)
    return BigQueryWarehouse(emulator.project, dataset, endpoint)


def stage(warehouse, run_id, frame, tmp_path):
    """What the pipeline's staging sink leaves for ``warehouse``, and the side input it sends."""
    table = pa.Table.from_pandas(frame, schema=SCHEMA, preserve_index=False)
    if isinstance(warehouse, LocalWarehouse):
        path = str(tmp_path / f"{run_id}.parquet")
        pq.write_table(table, path)
        return [path]
    # Streaming inserts into the run's staging table, as WriteToBigQuery does.
    warehouse.append(warehouse.sink_table(run_id, "recommendations"), table)
    return []


def run_row(run_id):
    now = pd.Timestamp.now(tz="UTC")
    return pa.Table.from_pylist([{"run_id": run_id, "job": "batch_recommendations",
                                  "started_at": now, "finished_at": now,
                                  "status": "published", "recommendations_written": 4}],
                                schema=schemas.PIPELINE_RUNS)


def publish(warehouse, run_id, rows, tmp_path, swap=True):
    frame = recs(rows, run_id)
    outputs = stage(warehouse, run_id, frame, tmp_path)
    staged = warehouse.staged(run_id, "recommendations", SCHEMA, outputs)
    return warehouse.publish(run_id, {"recommendations": staged},
                             {"pipeline_runs": run_row(run_id)}, swap=swap)


def production(warehouse):
    return warehouse.read("recommendations").sort_values("email_lower").reset_index(drop=True)


def expected(rows, run_id):
    frame = recs(rows, run_id).sort_values("email_lower").reset_index(drop=True)
    return pa.Table.from_pandas(frame, schema=SCHEMA, preserve_index=False).to_pandas()


def test_publish_keeps_a_backup_and_rollback_restores_it(warehouse, tmp_path):
    assert publish(warehouse, "a", OLD, tmp_path) is None  # nothing to back up yet
    assert publish(warehouse, "b", NEW, tmp_path) == "b"
    assert production(warehouse)["run_id"].unique().tolist() == ["b"]
    backups = warehouse.list_backups()
    assert backups[["backup_id", "run_id", "recommendations"]].values.tolist() == [["b", "a", 4]]

    kept = warehouse.rollback("b")
    pd.testing.assert_frame_equal(production(warehouse), expected(OLD, "a"),
                                  check_dtype=False)
    backups = warehouse.list_backups()
    assert backups["backup_id"].tolist() == [kept, "b"]  # newest first
    assert backups["run_id"].tolist() == ["b", "a"]
    runs = warehouse.query("SELECT status FROM pipeline_runs WHERE run_id = ?", [kept])
    assert runs["status"].tolist() == ["rolled_back"]
    warehouse.rollback(kept)  # and the rollback can be undone
    assert production(warehouse)["run_id"].unique().tolist() == ["b"]


def test_a_gated_publish_leaves_production_untouched(warehouse, tmp_path):
    publish(warehouse, "a", OLD, tmp_path)
    before = production(warehouse)
    assert publish(warehouse, "gated", NEW, tmp_path, swap=False) is None
    pd.testing.assert_frame_equal(production(warehouse), before)
    assert warehouse.list_backups().empty
    assert warehouse.query("SELECT count(*) AS n FROM pipeline_runs WHERE run_id = ?",
                           ["gated"])["n"].iloc[0] == 1  # the logs are still written
    if isinstance(warehouse, BigQueryWarehouse):  # the staging table is dropped
        assert not warehouse.exists(warehouse.sink_table("gated", "recommendations"))


def test_prune_keeps_the_newest_backups(warehouse, tmp_path):
    for run_id in ("r1", "r2", "r3", "r4"):
        publish(warehouse, run_id, OLD, tmp_path)
    assert warehouse.list_backups()["backup_id"].tolist() == ["r4", "r3", "r2"]
    assert warehouse.prune_backups(1) == ["r3", "r2"]
    assert warehouse.list_backups()["backup_id"].tolist() == ["r4"]
    assert warehouse.prune_backups(1) == []


def _publish_run(warehouse, run_id, rows, tmp_path, refused=(), accept_changes=False):
    """The pipeline's gate and publish step (PublishRunFn) on a hand-made staged output.

    Its gate signals are those of a healthy run (orders up to ``as_of``, a large
    eligible catalogue, no ties, no concentration), so only what the warehouse
    sees (refused rows, churn against the last output) can gate it.
    """
    outputs = stage(warehouse, run_id, recs(rows, run_id), tmp_path)
    counters = {"recommendations.written": len(rows), "users.read": len(rows),
                "users.processed": len(rows)}
    run = {"run_id": run_id, "job": "batch_recommendations",
           "as_of": pd.Timestamp("2026-03-01", tz="UTC"), "started_at": pd.Timestamp.now(tz="UTC")}
    signals = GateSignals(newest_order=run["as_of"], users=len(rows), catalog_skus=100,
                          eligible_skus=100)
    with test_pipeline.TestPipeline() as pipeline:
        def side(label, values):
            return beam.pvalue.AsList(pipeline | label >> beam.Create(values))
        (pipeline
         | "Counters" >> beam.Create([counters])
         | "Publish" >> beam.ParDo(
             PublishRunFn(warehouse, run, DEFAULT_CONFIG, 0.5, keep_backups=2,
                          accept_changes=accept_changes),
             beam.pvalue.AsSingleton(pipeline | "Violations" >> beam.Create([{}])),
             side("Recs", outputs + list(refused)), side("Popularity", []),
             side("DeadLetters", []),
             beam.pvalue.AsSingleton(pipeline | "Signals" >> beam.Create([signals]))))


def test_churn_over_the_limit_gates_and_accept_changes_publishes(warehouse, tmp_path):
    """OLD -> NEW changes 2 of the 3 common users' lists (67% > the default 50%)."""
    _publish_run(warehouse, "old", OLD, tmp_path)
    _publish_run(warehouse, "churn", NEW, tmp_path)
    run = warehouse.query("SELECT status, message, counters FROM pipeline_runs "
                          "WHERE run_id = ?", ["churn"]).iloc[0]
    assert run["status"] == "gated" and "churn" in run["message"]
    assert json.loads(run["counters"])["gate.churn"] == pytest.approx(2 / 3, abs=1e-6)
    assert sorted(warehouse.read("recommendations")["email_lower"]) == sorted(OLD)  # untouched
    gate = warehouse.query("SELECT violations, value, threshold, detail FROM qa_checks "
                           "WHERE run_id = ? AND name = 'gate: churn'", ["churn"]).iloc[0]
    assert (gate["violations"], gate["threshold"]) == (1, 0.5)
    assert gate["value"] == pytest.approx(2 / 3) and "--accept_changes" in gate["detail"]
    rules = warehouse.query("SELECT count(*) AS n FROM qa_checks WHERE run_id = ? AND "
                            "rule_id <= 15", ["churn"]).iloc[0, 0]
    assert rules == 15
    _publish_run(warehouse, "accepted", NEW, tmp_path, accept_changes=True)
    run = warehouse.query("SELECT status FROM pipeline_runs WHERE run_id = ?",
                          ["accepted"]).iloc[0]
    assert run["status"] == "published"
    assert sorted(warehouse.read("recommendations")["email_lower"]) == sorted(NEW)


def test_stability_report_is_written_through_the_warehouse(warehouse, tmp_path):
    _publish_run(warehouse, "old", OLD, tmp_path)
    _publish_run(warehouse, "new", NEW, tmp_path, accept_changes=True)
    report = warehouse.query("SELECT * FROM stability_report WHERE run_id = ?", ["new"]).iloc[0]
    assert (report["users_common"], report["users_gained"], report["users_lost"]) == (3, 1, 1)
    assert (report["users_previous"], report["users_current"]) == (4, 4)
    # a: 0 changed, b: 2 changed (swap), c: 1 changed.
    assert [report[f"changed_{k}_share"] for k in range(N + 1)] == pytest.approx(
        [1 / 3, 1 / 3, 1 / 3, 0, 0])
    assert [report[f"position_{i}_change_rate"] for i in range(1, N + 1)] == pytest.approx(
        [1 / 3, 1 / 3, 0, 1 / 3])
    assert report["avg_price_before"] == pytest.approx(250.0)
    assert report["avg_price_after"] == pytest.approx((250 * 3 + 1400 / 4) / 4)
    first = warehouse.query("SELECT * FROM stability_report WHERE run_id = ?", ["old"]).iloc[0]
    assert first["users_gained"] == 4 and first["users_common"] == 0


def test_refused_staging_rows_gate_the_run(bigquery, tmp_path):
    endpoint = f"http://{bigquery.host}"
    dataset = f"refused_{uuid.uuid4().hex[:8]}"
    bigquery_client(bigquery.project, endpoint).create_dataset(dataset)
    warehouse = BigQueryWarehouse(bigquery.project, dataset, endpoint)
    _publish_run(warehouse, "incomplete", OLD, tmp_path,
                 refused=[("t", {"user_id": "z"}, [{"reason": "invalid"}])])
    run = warehouse.query("SELECT status, message, counters FROM pipeline_runs").iloc[0]
    assert run["status"] == "gated" and "refused" in run["message"]
    assert '"recommendations.refused": 1' in run["counters"]
    assert not warehouse.exists("recommendations")


def test_injected_names_are_refused(tmp_path, bigquery):
    with pytest.raises(ValueError, match="refusing table name"):
        identifier(INJECTION)
    with pytest.raises(ValueError, match="refusing BigQuery table"):
        parse_table(INJECTION, "test-project", "shop")
    with pytest.raises(ValueError, match="refusing BigQuery dataset"):
        BigQueryWarehouse(bigquery.project, INJECTION, f"http://{bigquery.host}")
    local = LocalWarehouse(str(tmp_path / "warehouse.duckdb"))
    publish(local, "a", OLD, tmp_path)
    with pytest.raises(ValueError, match="refusing table name"):
        local.read(INJECTION)
    with pytest.raises(ValueError, match="refusing backup id"):
        local.rollback(INJECTION)
    assert publish_cli.main(["rollback", "--to", INJECTION, "--warehouse", local.path]) == 2
    assert publish_cli.main(["list", "--bigquery_dataset", INJECTION,
                             "--bigquery_endpoint", f"http://{bigquery.host}"]) == 2
    assert len(local.read("recommendations")) == len(OLD)


def test_cli_lists_prunes_and_rolls_back_the_local_warehouse(tmp_path, capsys):
    path = str(tmp_path / "warehouse.duckdb")
    local = LocalWarehouse(path)
    for run_id, rows in (("a", OLD), ("b", NEW), ("c", NEW)):
        publish(local, run_id, rows, tmp_path)
    assert publish_cli.main(["list", "--warehouse", path]) == 0
    listing = capsys.readouterr().out
    assert "c" in listing and "b" in listing
    assert publish_cli.main(["rollback", "--to", "b", "--warehouse", path]) == 0
    assert production(local)["run_id"].unique().tolist() == ["a"]
    assert publish_cli.main(["prune", "--keep", "1", "--warehouse", path]) == 0
    assert len(local.list_backups()) == 1
    assert publish_cli.main(["rollback", "--to", "nope", "--warehouse", path]) == 2
    assert os.path.exists(path)


def test_a_warehouse_made_before_the_gates_gains_their_columns(tmp_path):
    """qa_checks made by an earlier version (four columns) still takes this version's rows.

    DuckDB only: BigQueryWarehouse.ensure_table patches the new NULLABLE columns in, but the
    emulator answers the next insertAll with a 500 (its storage keeps the old columns), so
    that path is not exercised here.
    """
    warehouse = LocalWarehouse(str(tmp_path / "warehouse.duckdb"))
    old = pa.table({"run_id": ["before"], "rule_id": [1], "name": ["rule one"],
                    "violations": [0]},
                   schema=pa.schema([("run_id", pa.string()), ("rule_id", pa.int64()),
                                     ("name", pa.string()), ("violations", pa.int64())]))
    with warehouse.connect() as con:
        con.register("old", old)
        con.execute("CREATE TABLE qa_checks AS SELECT * FROM old")
    _publish_run(warehouse, "after", OLD, tmp_path)
    qa = warehouse.query("SELECT run_id, rule_id, value, threshold, detail FROM qa_checks")
    assert len(qa) == 1 + 15 + 7
    earlier = qa[qa["run_id"] == "before"].iloc[0]
    assert pd.isna(earlier["value"]) and pd.isna(earlier["detail"])
    gates = qa[(qa["run_id"] == "after") & (qa["rule_id"] > 100)]
    assert len(gates) == 7 and gates["threshold"].notna().all()
