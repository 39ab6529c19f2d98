"""``python -m pipelines.status`` through each alarm state, on warehouses made by the real batch job.

One published run of the tiny world (seed 11) is the clean state; copies of
its DuckDB file get a gated run, a zero-row run (both by the real job, with a
configuration that trips a gate or leaves nothing eligible), or a streaming
health row, and ``status`` must name the alarm and exit with its code.
"""
import json
import os
import re
import shutil

import duckdb
import pandas as pd
import pytest

from models import status as model
from pipelines import batch_recommendations
from pipelines import status
from pipelines.jobs import run_with_status

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _batch(world_dir, warehouse, as_of, run_id, *extra, commit=COMMIT, version="v-test"):
    saved = {k: os.environ.get(k) for k in ("SOURCE_COMMIT", "TEMPLATE_VERSION")}
    os.environ.update(SOURCE_COMMIT=commit, TEMPLATE_VERSION=version)
    try:
        return batch_recommendations.run(["--input_dir", world_dir, "--warehouse", warehouse,
                                          "--as_of", as_of, "--run_id", run_id,
                                          "--num_shards", "2", *extra])
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def clean(clean_world, tmp_path_factory):
    """A warehouse after one published run: (world dir, as_of, warehouse, generated_at)."""
    world_dir, manifest = clean_world
    warehouse = str(tmp_path_factory.mktemp("status") / "clean.duckdb")
    assert _batch(world_dir, warehouse, manifest["as_of"], "first") == 0
    with duckdb.connect(warehouse, read_only=True) as con:
        generated = con.execute("SELECT max(generated_at) FROM recommendations").fetchone()[0]
    return world_dir, manifest["as_of"], warehouse, pd.Timestamp(generated).tz_convert("UTC")


def _copy(clean, tmp_path, name):
    path = str(tmp_path / f"{name}.duckdb")
    shutil.copy(clean[2], path)
    return path


def _status(capsys, warehouse, now, *extra):
    code = run_with_status(status.run, ["--warehouse", warehouse, "--now",
                                        now.isoformat(), *extra], job="status")
    out = capsys.readouterr()
    return code, out.out, out.err


def test_clean_state_exits_0_and_reports_the_run(clean, capsys):
    code, out, _ = _status(capsys, clean[2], clean[3] + pd.Timedelta(hours=1))
    assert code == 0, out
    assert ": OK" in out.splitlines()[0]
    assert "first" in out and "published" in out
    assert "rules 0 violations; no gate tripped" in out
    assert f"commit {COMMIT}" in out and "template v-test" in out
    assert "model segment-popularity-v1" in out


def test_published_output_older_than_the_limit_is_stale(clean, capsys, tmp_path):
    code, out, _ = _status(capsys, clean[2], clean[3] + pd.Timedelta(hours=30))
    assert code == model.EXIT_CODES[model.STALE_OUTPUT] == 5
    assert "ALARM stale_output" in out and "30.0 h old (limit 26 h)" in out
    config = tmp_path / "lenient.yaml"
    config.write_text("status:\n  max_published_age_hours: 48.0\n")
    code, out, _ = _status(capsys, clean[2], clean[3] + pd.Timedelta(hours=30),
                           "--config", str(config))
    assert code == 0, out


def test_a_gated_last_run_exits_1_and_old_rows_stay_readable(clean, capsys, tmp_path):
    warehouse = _copy(clean, tmp_path, "gated")
    # A warehouse from before #19: pipeline_runs without the provenance columns.
    with duckdb.connect(warehouse) as con:
        for column in ("source_commit", "template_version", "config_digest", "model_version"):
            con.execute(f"ALTER TABLE pipeline_runs DROP COLUMN {column}")
    config = tmp_path / "strict.yaml"
    # A gate trips; and a much larger bonus for vehicle-specific parts changes the lists.
    config.write_text("gates:\n  min_eligible_skus: 100000\n"
                      "scoring:\n  specific_bonus: 5.0\n")
    assert _batch(clean[0], warehouse, clean[1], "second", "--config", str(config)) == 1
    summary = capsys.readouterr().out
    assert "changes explained:" in summary and " replaced " in summary  # the run summary
    with duckdb.connect(warehouse, read_only=True) as con:
        rows = dict(con.execute("SELECT run_id, source_commit FROM pipeline_runs").fetchall())
    assert rows == {"first": None, "second": COMMIT}  # the migration added the columns
    code, out, _ = _status(capsys, warehouse, clean[3] + pd.Timedelta(hours=1))
    assert code == model.EXIT_CODES[model.GATED] == 1
    assert "ALARM gated" in out and "second" in out and "eligible_skus" in out
    assert "ALARM zero_rows" not in out
    # Changes explained (#19): what the gated run would have changed, and why.
    explained = out[out.index("changes explained (last batch run"):].splitlines()
    assert re.match(r"  \S+ replaced \S+ for [\d,]+ users: [\d,.]+ vs [\d,.]+ decayed orders",
                    explained[1]), explained[:3]
    assert any(re.match(r"  Placed Order: [\d,]+ events read vs [\d,]+ last run \(\+0\.0%\)",
                        line) for line in explained), explained
    with duckdb.connect(warehouse, read_only=True) as con:
        kinds = dict(con.execute("SELECT kind, count(*) FROM stability_changes WHERE "
                                 "run_id = 'second' GROUP BY kind").fetchall())
    assert kinds["sku_swap"] >= 1 and kinds["scores"] == 1 and kinds["event_volume"] >= 3


def test_a_run_that_wrote_zero_rows_exits_4(clean, capsys, tmp_path):
    warehouse = _copy(clean, tmp_path, "zero")
    config = tmp_path / "nothing_eligible.yaml"
    config.write_text("rules:\n  min_price: 1000000.0\n")
    assert _batch(clean[0], warehouse, clean[1], "empty", "--config", str(config)) == 1
    capsys.readouterr()
    code, out, _ = _status(capsys, warehouse, clean[3] + pd.Timedelta(hours=1))
    assert code == model.EXIT_CODES[model.ZERO_ROWS] == 4
    assert "ALARM zero_rows" in out and "ALARM gated" in out  # both named, 4 wins
    # Every user of the output is lost, each with the reason the run refused them.
    assert "1,485 users lost: fewer eligible parts than recommendations" in out
    assert "configuration changed since the last published run: config_digest" in out


def _health_row(warehouse, emitted_at):
    row = pd.DataFrame([{"run_id": "stream", "kind": "counters", "stream": None,
                         "window_start": emitted_at - pd.Timedelta(minutes=5),
                         "window_end": emitted_at, "seen": None, "on_time": None,
                         "late": None, "too_late": None,
                         "counters": json.dumps({"events.read": 120}),
                         "emitted_at": emitted_at}])
    with duckdb.connect(warehouse) as con:
        con.register("row", row)
        con.execute("CREATE TABLE IF NOT EXISTS streaming_health AS SELECT * FROM row LIMIT 0")
        con.execute("INSERT INTO streaming_health SELECT * FROM row")


def test_stale_streaming_health_exits_6(clean, capsys, tmp_path):
    warehouse = _copy(clean, tmp_path, "stream")
    now = clean[3] + pd.Timedelta(hours=1)
    code, out, _ = _status(capsys, warehouse, now, "--expect_streaming")
    assert code == 6 and "no streaming_health row" in out
    _health_row(warehouse, now - pd.Timedelta(hours=2))
    code, out, _ = _status(capsys, warehouse, now)
    assert code == model.EXIT_CODES[model.STALE_STREAMING] == 6
    assert "ALARM stale_streaming" in out and "120 min old" in out
    _health_row(warehouse, now - pd.Timedelta(minutes=5))
    code, out, _ = _status(capsys, warehouse, now)
    assert code == 0, out
    assert "events.read 120" in out


def _spec(tmp_path, commit, version="v-test"):
    path = tmp_path / f"spec-{commit[:7]}.json"
    path.write_text(json.dumps({
        "image": f"europe-west1-docker.pkg.dev/p/r/segment-recs/batch_recommendations:{version}",
        "defaultEnvironment": {"additionalUserLabels": {"source_commit": commit,
                                                        "template_version": version}}}))
    return str(path)


def test_verify_agrees_when_template_run_and_rows_match(clean, capsys, tmp_path):
    code, out, _ = _status(capsys, clean[2], clean[3] + pd.Timedelta(hours=1), "--verify",
                           "--template_spec", _spec(tmp_path, COMMIT))
    assert code == 0, out
    assert "chain: template, last run and published rows agree" in out


def test_verify_reports_a_run_whose_commit_differs_from_the_template(clean, capsys, tmp_path):
    deployed = "fedcba9876543210fedcba9876543210fedcba98"
    code, out, _ = _status(capsys, clean[2], clean[3] + pd.Timedelta(hours=1), "--verify",
                           "--template_spec", _spec(tmp_path, deployed, "v-next"))
    assert code == model.EXIT_CODES[model.CHAIN] == 7
    assert "chain: DIVERGES" in out
    assert f"source_commit differs: the deployed template" in out
    assert f"has {deployed}, the last batch run first ran {COMMIT}" in out
    assert "template_version differs" in out and "v-next" in out


def test_verify_reports_published_rows_that_are_not_the_last_runs(clean, capsys, tmp_path):
    warehouse = _copy(clean, tmp_path, "tampered")
    with duckdb.connect(warehouse) as con:
        con.execute("UPDATE recommendations SET model_version = 'hand-edited' "
                    "WHERE user_id IN (SELECT user_id FROM recommendations LIMIT 3)")
    code, out, _ = _status(capsys, warehouse, clean[3] + pd.Timedelta(hours=1), "--verify")
    assert code == 7
    assert "model version differs: the published rows carry hand-edited, " \
           "segment-popularity-v1" in out


def test_html_page_has_the_alarms_and_trend_plots(clean, capsys, tmp_path):
    page = tmp_path / "status.html"
    code, out, _ = _status(capsys, clean[2], clean[3] + pd.Timedelta(hours=30),
                           "--html", str(page))
    assert code == 5
    text = page.read_text()
    assert text.count("<svg") == 4 and "<polyline" in text
    assert "stale_output" in text and "<script" not in text


def test_usage_errors_are_one_line_exit_2(clean, capsys, tmp_path):
    code, _, err = _status(capsys, str(tmp_path / "missing.duckdb"), clean[3])
    assert code == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1
    code = run_with_status(status.run, ["--warehouse", clean[2], "--now", "yesterday"])
    assert code == 2 and "RFC 3339" in capsys.readouterr().err


def test_status_reads_a_bigquery_dataset(clean, bigquery, capsys):
    """The same status on the BigQuery emulator: the clean run's tables copied over."""
    import pyarrow as pa
    import uuid
    from transforms import schemas
    from transforms.warehouse import BigQueryWarehouse
    from transforms.bigquery import client

    endpoint = f"http://{bigquery.host}"
    dataset = f"status_{uuid.uuid4().hex[:8]}"
    client(bigquery.project, endpoint).create_dataset(dataset)
    shop = BigQueryWarehouse(bigquery.project, dataset, endpoint)
    with duckdb.connect(clean[2], read_only=True) as con:
        for name, schema in (("pipeline_runs", schemas.PIPELINE_RUNS),
                             ("qa_checks", schemas.QA_CHECKS),
                             ("recommendations", schemas.recommendations(4))):
            table = con.execute(f"SELECT * FROM {name}").arrow()
            if hasattr(table, "read_all"):
                table = table.read_all()
            shop.append(name, table.select(schema.names).cast(schema))
    argv = ["--bigquery_project", bigquery.project, "--bigquery_dataset", dataset,
            "--bigquery_endpoint", endpoint, "--verify"]
    code = run_with_status(status.run, argv + ["--now", (clean[3] + pd.Timedelta(hours=2))
                                               .isoformat()], job="status")
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"bigquery://{bigquery.project}.{dataset}" in out and "first" in out
    assert "chain: template, last run and published rows agree" in out
    code = run_with_status(status.run, argv + ["--now", (clean[3] + pd.Timedelta(days=3))
                                               .isoformat()], job="status")
    assert code == 5 and "ALARM stale_output" in capsys.readouterr().out
    # The streaming job's health rows live in their own dataset (--streaming_dataset).
    stream = f"{dataset}_stream"
    client(bigquery.project, endpoint).create_dataset(stream)
    argv += ["--streaming_dataset", stream, "--now",
             (clean[3] + pd.Timedelta(hours=2)).isoformat()]
    code = run_with_status(status.run, argv, job="status")
    assert code == 6 and "no streaming_health row" in capsys.readouterr().out
    emitted = clean[3] + pd.Timedelta(hours=1)
    BigQueryWarehouse(bigquery.project, stream, endpoint).append(
        "streaming_health", pa.Table.from_pylist(
            [{"run_id": "stream", "kind": "counters", "window_end": emitted,
              "counters": json.dumps({"events.read": 7}), "emitted_at": emitted}],
            schema=pa.schema([("run_id", pa.string()), ("kind", pa.string()),
                              ("window_end", schemas.TIMESTAMP), ("counters", pa.string()),
                              ("emitted_at", schemas.TIMESTAMP)])))
    code = run_with_status(status.run, argv, job="status")
    out = capsys.readouterr().out
    assert code == 6 and "the newest streaming_health row is 60 min old" in out
    code = run_with_status(status.run, argv[:-1] + [(emitted + pd.Timedelta(minutes=10))
                                                    .isoformat()], job="status")
    out = capsys.readouterr().out
    assert code == 0 and "events.read 7" in out, out
