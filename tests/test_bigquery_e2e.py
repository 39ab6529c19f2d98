"""End to end through a real BigQuery emulator: the batch job reads and writes BigQuery.

The tiny world is loaded into bqemulator with the google-cloud-bigquery client,
the job runs on the DirectRunner with ``--source bigquery --sink bigquery`` and
``--bigquery_endpoint`` (nothing else differs from a cloud run), and the results
are queried back. No BigQuery client is mocked.
"""
import json

import apache_beam as beam
import pandas as pd
import pytest
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to

from models import recommend
from models.config import DEFAULT_CONFIG
from pipelines import batch_recommendations
from pipelines import publish as publish_cli
from transforms import schemas
from transforms.bigquery_io import ReadBigQueryTable, TimeWindow, load_inputs
from transforms.io import read_frame
from transforms.warehouse import BigQueryWarehouse, LocalWarehouse, parse_table

N = DEFAULT_CONFIG.rules.recs_per_user
REC_COLUMNS = [f"rec_part_{i}" for i in range(1, N + 1)]
DATASET = "shop"


def _endpoint(bigquery) -> str:
    return f"http://{bigquery.host}"


@pytest.fixture(scope="module")
def shop(bigquery, clean_world):
    """The world's inputs as BigQuery tables of dataset ``shop``; outputs go there too."""
    loaded = load_inputs(clean_world[0], bigquery.project, DATASET, _endpoint(bigquery))
    assert loaded["events"] == clean_world[1]["row_counts"]["events"]
    return BigQueryWarehouse(bigquery.project, DATASET, _endpoint(bigquery))


def _run(bigquery, as_of: str, run_id: str, *extra: str) -> int:
    return batch_recommendations.run([
        "--source", "bigquery", "--sink", "bigquery", "--bigquery_dataset", DATASET,
        "--bigquery_endpoint", _endpoint(bigquery),
        "--bigquery_storage_endpoint", bigquery.extra, "--project", bigquery.project,
        "--as_of", as_of, "--num_shards", "4", "--run_id", run_id, *extra])


def _sorted(frame: pd.DataFrame, keys) -> pd.DataFrame:
    return frame.sort_values(keys).reset_index(drop=True)


@pytest.fixture(scope="module")
def first(bigquery, clean_world, shop):
    """The first published BigQuery run, and its production output as read back."""
    assert _run(bigquery, clean_world[1]["as_of"], "first") == 0
    return _sorted(shop.read("recommendations"), ["user_id"])


def test_output_equals_the_local_file_run(first, shop, clean_world, tmp_path):
    warehouse = str(tmp_path / "local.duckdb")
    assert batch_recommendations.run([
        "--input_dir", clean_world[0], "--warehouse", warehouse, "--as_of", clean_world[1]["as_of"],
        "--num_shards", "4", "--run_id", "local"]) == 0
    local = LocalWarehouse(warehouse)
    expected = _sorted(local.read("recommendations"), ["user_id"])
    assert len(first) == len(expected) > 1000
    # Same user -> same four SKUs and the same serving level; every other column too.
    pd.testing.assert_frame_equal(first[["user_id"] + REC_COLUMNS + ["source"]],
                                  expected[["user_id"] + REC_COLUMNS + ["source"]])
    same = [c for c in expected.columns if c not in ("generated_at", "run_id")]
    pd.testing.assert_frame_equal(first[same], expected[same])
    keys = ["level", "segment", "sku"]
    pd.testing.assert_frame_equal(_sorted(shop.read("segment_popularity"), keys),
                                  _sorted(local.read("segment_popularity"), keys))
    # The same counters: every input row read, reconciled and dead-lettered alike.
    runs = {name: json.loads(w.query("SELECT counters FROM pipeline_runs WHERE run_id = ?",
                                     [name])["counters"].iloc[0])
            for name, w in (("first", shop), ("local", local))}
    assert runs["first"] == runs["local"]
    dead = shop.query("SELECT `table`, step, reason FROM dead_letter WHERE run_id = ?",
                      ["first"])
    assert len(dead) == clean_world[1]["conflicting_catalog_skus"]
    qa = shop.query("SELECT rule_id, violations FROM qa_checks WHERE run_id = ?", ["first"])
    assert len(qa) == 15 + 7 and qa["violations"].sum() == 0  # the rules and the sanity gates
    assert len(shop.query("SELECT * FROM stability_report WHERE run_id = ?", ["first"])) == 1


def test_outputs_have_explicit_schemas_and_partitioning(first, shop):
    table = shop.client.get_table(shop.ref("recommendations").id)
    assert table.time_partitioning.field == "generated_at"
    assert table.clustering_fields == ["email_lower"]
    legacy = {"INTEGER": "INT64", "FLOAT": "FLOAT64", "BOOLEAN": "BOOL"}  # the API's aliases
    assert [(f.name, legacy.get(f.field_type, f.field_type), f.mode) for f in table.schema] == [
        (f["name"], f["type"], f["mode"]) for f in schemas.bigquery_fields(
            schemas.recommendations(N))]
    assert shop.client.get_table(shop.ref("pipeline_runs").id).time_partitioning.field == (
        "started_at")
    dead = shop.client.get_table(shop.ref("dead_letter").id)
    assert dead.time_partitioning.type_ == "DAY" and dead.time_partitioning.field is None
    names = {t.table_id for t in shop.client.list_tables(f"{shop.project}.{DATASET}")}
    assert not [n for n in names if "_staging_" in n or "_candidate_" in n]


def test_a_gated_run_leaves_production_byte_for_byte_unchanged(first, shop, bigquery, clean_world,
                                                              monkeypatch):
    """A selection bug repeating one SKU is caught by QA rule 9; production is not touched."""
    def table_state():
        table = shop.client.get_table(shop.ref("recommendations").id)
        return table.etag, table.modified, table.num_rows, _sorted(
            shop.read("recommendations"), ["user_id"])

    etag, modified, rows, before = table_state()

    def repeat_best(order, part_type, variant_key, n, max_per_type):
        return [int(order[0])] * n

    monkeypatch.setattr(recommend, "greedy_pick", repeat_best)
    assert _run(bigquery, clean_world[1]["as_of"], "buggy") == 1
    after = table_state()
    assert after[:3] == (etag, modified, rows)
    pd.testing.assert_frame_equal(after[3], before)
    status = shop.query("SELECT status, message FROM pipeline_runs WHERE run_id = ?", ["buggy"])
    assert status["status"].iloc[0] == "gated" and "QA failed" in status["message"].iloc[0]
    qa = shop.query("SELECT rule_id, violations FROM qa_checks WHERE run_id = ?", ["buggy"])
    assert qa.set_index("rule_id")["violations"][9] > 0
    names = {t.table_id for t in shop.client.list_tables(f"{shop.project}.{DATASET}")}
    assert not [n for n in names if n.endswith("_buggy")]  # no backup, staging or candidate


def test_publish_again_then_rollback_restores_the_first_output(first, shop, bigquery, clean_world,
                                                               capsys):
    earlier = (pd.Timestamp(clean_world[1]["as_of"]) - pd.Timedelta(days=10)).isoformat()
    # 10 days less history changes most lists (63% on this world): accepted, as an operator would
    assert _run(bigquery, earlier, "second", "--accept_changes") == 0
    second = _sorted(shop.read("recommendations"), ["user_id"])
    assert (second[REC_COLUMNS].to_numpy() != first[REC_COLUMNS].to_numpy()).any()
    report = shop.query("SELECT * FROM stability_report WHERE run_id = ?", ["second"]).iloc[0]
    assert report["users_common"] == len(first) and 0 < report["changed_0_share"] < 1

    backups = shop.list_backups().set_index("backup_id")
    assert backups.loc["second", "run_id"] == "first"  # the output it replaced
    where = ["--bigquery_dataset", DATASET, "--bigquery_project", bigquery.project,
             "--bigquery_endpoint", _endpoint(bigquery)]
    assert publish_cli.main(["rollback", "--to", "second", *where]) == 0
    restored = _sorted(shop.read("recommendations"), ["user_id"])
    pd.testing.assert_frame_equal(restored, first)  # every column, run_id "first" included
    backups = shop.list_backups()
    assert backups["backup_id"].iloc[0].startswith("rollback_")
    assert backups["run_id"].iloc[0] == "second"  # the rollback can itself be undone
    assert publish_cli.main(["list", *where]) == 0
    assert "rollback_" in capsys.readouterr().out
    assert shop.query("SELECT count(*) AS n FROM pipeline_runs WHERE status = 'rolled_back'"
                      )["n"].iloc[0] == 1


def test_events_window_is_a_parameterised_read(shop, bigquery, clean_world):
    events, _ = read_frame(clean_world[0], "events")
    since = pd.Timestamp(clean_world[1]["as_of"]) - pd.Timedelta(days=30)
    until = pd.Timestamp(clean_world[1]["as_of"]) - pd.Timedelta(days=3)
    inside = events[(events["event_time"] >= since) & (events["event_time"] < until)]
    assert 0 < len(inside) < len(events)
    ref = parse_table("events", bigquery.project, DATASET)
    with test_pipeline.TestPipeline() as pipeline:
        read = pipeline | ReadBigQueryTable("events", ref, TimeWindow("event_time", since, until),
                                            _endpoint(bigquery), batch_rows=1000)
        ids = read.rows | beam.FlatMap(lambda frame: frame["event_id"].tolist())
        assert_that(ids, equal_to(inside["event_id"].tolist()))
        assert_that(read.dead_letters, equal_to([]), label="NoDeadLetters")


def test_bad_names_and_windows_are_refused_at_start_up(bigquery, shop, clean_world):
    tables_before = {t.table_id for t in shop.client.list_tables(f"{shop.project}.{DATASET}")}
    base = ["--source", "bigquery", "--sink", "bigquery", "--bigquery_dataset", DATASET,
            "--bigquery_endpoint", _endpoint(bigquery), "--as_of", clean_world[1]["as_of"]]
    cases = {
        ("--catalog_table", "x`; DROP TABLE y"): "refusing BigQuery table",
        ("--bigquery_dataset", "shop`; DROP TABLE shop.catalog; --"): "refusing BigQuery dataset",
        ("--bigquery_project", "Robert'); DROP"): "refusing BigQuery project",
        ("--events_since", "yesterday`;"): "is not an RFC 3339 time",
        ("--events_table", "no_such_table"): "does not exist",
    }
    for flag, message in cases.items():
        with pytest.raises(SystemExit, match=message):
            batch_recommendations.run(base + list(flag))
    with pytest.raises(SystemExit, match="need --source bigquery"):
        batch_recommendations.run(["--events_since", "2026-01-01T00:00:00Z",
                                   "--input_dir", clean_world[0]])
    assert {t.table_id for t in shop.client.list_tables(
        f"{shop.project}.{DATASET}")} == tables_before
