"""Faults, on the real emulators: the jobs survive them, or fail safe, and nothing is lost silently.

1. The Pub/Sub emulator is stopped and restarted on the same port while the
   streaming job runs: the job keeps running and refreshes orders published
   after the restart. The emulator is in memory: topics and subscriptions are
   re-created after the restart, and messages it held are gone with it (the
   real service is durable; see docs/streaming.md on acks).
2. BigQuery (bqemulator, persistent) goes away while ``WriteRows`` inserts: back
   within the retry budget, every row lands exactly once; never back, the rows
   not written come out as dead letters with the error, and written +
   dead-lettered == sent.
3. The batch job's process dies (``os._exit(137)``) right before and in the
   middle of the swap: production is unchanged, no table is half swapped, and
   a rerun with a new run id publishes (and reports what a dead run left).
4. The batch job run twice on the same input and ``--as_of``: the same
   recommendations, one row per user, and the second run reconciles.

Figures (recovery time, retries, counts) are printed: ``pytest -rP``.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional

import apache_beam as beam
import duckdb
import pandas as pd
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.runner import PipelineState

from models.config import DEFAULT_CONFIG
from models.health import reconcile
from pipelines import batch_recommendations
from tests.emulators import (EmulatorProcess, create_streams, restartable_bigquery_emulator,
                             restartable_pubsub_emulator, wait_for)
from transforms import bigquery as bq_switch
from transforms.health import NAMESPACE
from transforms.streaming import FileReference, WriteRows
from transforms.warehouse import BigQueryWarehouse, LocalWarehouse

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_COLUMNS = ("run_id", "generated_at")   # differ between runs by design


def _report(test: str, **figures) -> None:
    print(f"FAULT {test}: " + json.dumps(figures, default=str))


@pytest.fixture
def saved_environment():
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


# --------------------------------------------------------------------------- 1. Pub/Sub restart

STREAMS = ("events", "treatments")


def _create_streams(project: str, names=STREAMS) -> Dict[str, tuple]:
    """Topics and subscriptions (again, after a restart of the in-memory emulator)."""
    from google.cloud import pubsub_v1
    publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    with subscriber:
        return create_streams(publisher, subscriber, project, names)


def _iso(stamp: pd.Timestamp) -> str:
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _event(event_id, user, name, sku, order_id=None):
    return {"event_id": event_id, "event_time": _iso(pd.Timestamp.now(tz="UTC")),
            "user_id": user, "event_name": name, "sku": sku, "quantity": 1, "price": 150.0,
            "order_id": order_id}


class _BundleErrors(logging.Handler):
    """Counts the DirectRunner's failed bundle attempts (it retries a bundle 4 times)."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.failed_attempts, self.gave_up = 0, 0

    def emit(self, record):
        message = record.getMessage()
        self.failed_attempts += message.startswith("Exception at bundle")
        self.gave_up += message.startswith("Giving up")


def test_streaming_job_survives_a_pubsub_emulator_restart(clean_world, bigquery, monkeypatch):
    """The job's pulls fail for ~10 s, then find Pub/Sub again on the same port.

    The real service keeps subscriptions through an outage; the in-memory
    emulator comes back empty. While the test re-creates them, the runner's
    next pulls are held back (a pull already retrying may still meet the
    empty emulator once: a failed bundle attempt, retried). Unheld, a pull in
    that gap fails with NotFound, and the DirectRunner retries a bundle 4 times
    at once, gives up and the read is dead: an artefact of the emulator
    restart, which the runner's own give-up counter here would catch.
    """
    from google.api_core.exceptions import NotFound
    from google.cloud import pubsub_v1

    from apache_beam.runners.direct import transform_evaluator
    from pipelines import streaming_refresh as job

    world_dir, _ = clean_world
    servable = FileReference(world_dir, DEFAULT_CONFIG, 3600, "").current().servable
    ids = sorted(servable.dropna(subset=["make", "model", "year"])["user_id"])
    before, after, browsers = ids[:3], ids[3:6], ids[10:200]
    catalog = pd.read_json(os.path.join(world_dir, "catalog.jsonl"), lines=True)
    skus = catalog.loc[catalog["price"] >= 50, "sku"].dropna().tolist()
    project, dataset = bigquery.project, "faults_stream"
    client = bq_switch.client(project, f"http://{bigquery.host}")
    errors = _BundleErrors()
    logging.getLogger("apache_beam.runners.direct.executor").addHandler(errors)
    subscriptions_ready, pulled = threading.Event(), []
    subscriptions_ready.set()
    read = transform_evaluator._PubSubReadEvaluator._read_from_pubsub

    def held_back_read(self, timestamp_attribute):
        assert subscriptions_ready.wait(timeout=60)
        messages = read(self, timestamp_attribute)
        if messages:
            pulled.append(time.monotonic())
        return messages

    monkeypatch.setattr(transform_evaluator._PubSubReadEvaluator, "_read_from_pubsub",
                        held_back_read)

    with restartable_pubsub_emulator() as pubsub:
        monkeypatch.setenv("PUBSUB_EMULATOR_HOST", pubsub.emulator.host)
        paths = _create_streams(project)
        held = _create_streams(project, ["held"])["held"]   # a subscription nobody reads
        publisher = pubsub_v1.PublisherClient()
        launched = job.launch([
            f"--events_subscription={paths['events'][1]}",
            f"--treatments_subscription={paths['treatments'][1]}",
            f"--streaming_dataset={project}.{dataset}", f"--project={project}",
            f"--bigquery_endpoint=http://{bigquery.host}", f"--input_dir={world_dir}",
            "--window_seconds=4", "--period_seconds=2", "--allowed_lateness_seconds=2",
            "--dedupe_ttl_seconds=60", "--reference_refresh_seconds=60",
            "--insert_batch_size=50", "--num_shards=2"])
        failures: List[BaseException] = []

        def watch():   # the runner reports a failed job only to wait_until_finish
            try:
                launched.result.wait_until_finish()
            except BaseException as err:  # noqa: BLE001 (asserted below)
                failures.append(err)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        traffic_on, stop = threading.Event(), threading.Event()

        def background():   # an idle subscription stalls the DirectRunner's watermark 30 s
            k = 0
            while not stop.is_set():
                if traffic_on.wait(0.2):
                    k += 1
                    view = _event(f"BG-V{k}", browsers[k % len(browsers)], "Viewed Product",
                                  skus[k % len(skus)])
                    send = {"event_id": f"BG-T{k}", "event_time": _iso(pd.Timestamp.now(
                        tz="UTC")), "user_id": browsers[k % len(browsers)],
                        "treatment_id": "T02", "campaign_id": "C", "kind": "SENT"}
                    for topic, record in (("events", view), ("treatments", send)):
                        publisher.publish(paths[topic][0], json.dumps(record).encode(),
                                          event_time=record["event_time"])
                    time.sleep(0.2)

        def order_all(users, tag):
            for i, user in enumerate(users):
                order = _event(f"E-{tag}-{i}", user, "Placed Order", skus[i], f"O-{tag}-{i}")
                publisher.publish(paths["events"][0], json.dumps(order).encode(),
                                  event_time=order["event_time"]).result(timeout=30)

        def refreshed(users):
            rows = [dict(r) for r in client.query(
                f"SELECT user_id, reason FROM `{project}.{dataset}.recommendation_updates`"
            ).result()]
            return {r["user_id"] for r in rows if "order" in r["reason"]} & set(users)

        traffic = threading.Thread(target=background, daemon=True)
        traffic.start()
        traffic_on.set()
        try:
            published = time.monotonic()
            order_all(before, "BEFORE")
            wait_for("rows of the orders published before the fault",
                     lambda: refreshed(before), lambda got: got == set(before))
            fresh_before = time.monotonic() - published

            traffic_on.clear()
            publisher.publish(held[0], b"unacknowledged").result(timeout=30)
            time.sleep(0.5)
            pubsub.stop()
            stopped = time.monotonic()
            time.sleep(10)                       # the job pulls from a dead emulator
            running_while_down = watcher.is_alive() and not failures
            subscriptions_ready.clear()
            restart_seconds = pubsub.start()     # same port, empty: nothing survived
            recreating = time.monotonic()
            _create_streams(project)
            subscriptions_ready.set()
            back = time.monotonic()
            with pubsub_v1.SubscriberClient() as subscriber, pytest.raises(NotFound):
                subscriber.get_subscription(subscription=held[1])   # and its message
            traffic_on.set()
            order_all(after, "AFTER")
            wait_for("rows of the orders published after the restart",
                     lambda: refreshed(after), lambda got: got == set(after))
            recovered = time.monotonic() - back
            running = watcher.is_alive() and not failures
            state = launched.result.state
        finally:
            stop.set()
            launched.result.cancel()
            logging.getLogger("apache_beam.runners.direct.executor").removeHandler(errors)

    assert running_while_down, failures
    assert running and state == PipelineState.RUNNING, failures   # the job did not crash
    assert errors.gave_up == 0
    first_pull = min(t for t in pulled if t > back)
    _report("pubsub_restart", fresh_before_s=round(fresh_before, 1),
            outage_s=round(back - stopped, 1), emulator_restart_s=round(restart_seconds, 1),
            recreate_subscriptions_s=round(back - recreating, 1),
            first_pull_after_s=round(first_pull - back, 1), recovery_s=round(recovered, 1),
            failed_bundle_attempts=errors.failed_attempts)


# --------------------------------------------------------------------------- 2. BigQuery outage

SINK_FIELDS = [{"name": "id", "type": "STRING", "mode": "REQUIRED"},
               {"name": "n", "type": "INTEGER", "mode": "NULLABLE"}]
SENT, BATCH, FAULT_AT = 60, 10, 25
_FAULT: Dict[str, object] = {}          # read by the DoFns below (same process)
_DEAD_LETTERS: List[dict] = []


class _OutageAtRow(beam.DoFn):
    """Passes rows on; before the FAULT_AT-th row it stops the BigQuery emulator and,
    when ``_FAULT["down_seconds"]`` is set, starts it again that much later."""

    def process(self, row):
        with _FAULT["lock"]:
            _FAULT["seen"] += 1
            if _FAULT["seen"] < FAULT_AT:
                _FAULT["ids_before"].append(row["id"])
            if _FAULT["seen"] == FAULT_AT:
                emulator: EmulatorProcess = _FAULT["emulator"]
                emulator.stop()
                _FAULT["stopped_at"] = time.monotonic()
                if _FAULT.get("down_seconds") is not None:
                    def restart():
                        time.sleep(_FAULT["down_seconds"])
                        emulator.start()
                        _FAULT["back_at"] = time.monotonic()
                    _FAULT["restarter"] = threading.Thread(target=restart, daemon=True)
                    _FAULT["restarter"].start()
        yield row


def _keep_dead_letter(row: dict) -> None:
    _DEAD_LETTERS.append(row)


@pytest.fixture(scope="module")
def durable_bigquery():
    """bqemulator on fixed ports with its tables in a file: it can go away and come back."""
    with restartable_bigquery_emulator(persistent=True) as emulator:
        yield emulator


def _write_with_outage(emulator: EmulatorProcess, table: str, retry_seconds: float,
                       down_seconds: Optional[float]):
    """SENT rows (and one invalid row) through WriteRows while BigQuery goes away at row
    FAULT_AT; returns the dead letters, the metrics and the seconds the pipeline took."""
    endpoint = f"http://{emulator.emulator.host}"
    options = PipelineOptions([f"--bigquery_endpoint={endpoint}", "--project=test-project",
                               "--runner=FnApiRunner"])
    bq_switch.apply_options(options)
    client = bq_switch.client("test-project", endpoint)
    client.create_dataset("test-project.faults", exists_ok=True)
    from google.cloud import bigquery as bq
    client.create_table(bq.Table(f"test-project.faults.{table}", schema=[
        bq.SchemaField.from_api_repr(f) for f in SINK_FIELDS]))
    _FAULT.clear()
    _FAULT.update(lock=threading.Lock(), seen=0, ids_before=[], emulator=emulator,
                  down_seconds=down_seconds)
    _DEAD_LETTERS.clear()
    rows = [{"id": f"r{i:03d}", "n": i} for i in range(SENT)]
    started = time.monotonic()
    pipeline = beam.Pipeline(options=options)
    (pipeline
     | beam.Create(rows + [{"id": "bad", "n": "not a number"}])
     | beam.ParDo(_OutageAtRow())
     | WriteRows(f"test-project:faults.{table}", SINK_FIELDS, batch_size=BATCH,
                 retry_seconds=retry_seconds)
     | beam.Map(_keep_dead_letter))
    outcome: Dict[str, object] = {}

    def run():   # in a thread: a write that blocks on the dead endpoint fails the test
        try:
            outcome["result"] = pipeline.run()
            outcome["result"].wait_until_finish()
        except BaseException as err:  # noqa: BLE001 (re-raised below)
            outcome["error"] = err

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    runner.join(timeout=retry_seconds + 60)
    assert not runner.is_alive(), "the write is still blocked on the unreachable BigQuery"
    if "error" in outcome:
        raise outcome["error"]
    result = outcome["result"]
    took = time.monotonic() - started
    if _FAULT.get("restarter"):
        _FAULT["restarter"].join(timeout=60)
    counters = {c.key.metric.name: c.committed for c in result.metrics().query(
        MetricsFilter().with_namespace(NAMESPACE))["counters"]}
    return list(_DEAD_LETTERS), counters, took


def _landed(emulator: EmulatorProcess, table: str) -> List[str]:
    client = bq_switch.client("test-project", f"http://{emulator.emulator.host}")
    return [r["id"] for r in client.query(f"SELECT id FROM `test-project.faults.{table}`")
            .result()]


def test_bigquery_back_within_the_retry_budget_every_row_lands_once(durable_bigquery,
                                                                     saved_environment):
    dead, counters, took = _write_with_outage(durable_bigquery, "back_in_time",
                                              retry_seconds=60, down_seconds=3)
    assert _FAULT["seen"] == SENT + 1 and "back_at" in _FAULT
    landed = _landed(durable_bigquery, "back_in_time")
    assert sorted(landed) == [f"r{i:03d}" for i in range(SENT)]   # each exactly once
    # Only the invalid row is refused (for good: no retry of a bad value).
    assert [json.loads(d["record"])["id"] for d in dead] == ["bad"]
    assert "'reason': 'invalid'" in dead[0]["reason"]
    assert counters["bigquery.insert_retries"] >= 1
    assert counters["bigquery.rows_written"] == SENT
    _report("bigquery_back_in_time", sent=SENT, landed=len(landed), dead_lettered=len(dead),
            outage_s=round(_FAULT["back_at"] - _FAULT["stopped_at"], 1),
            retries=counters["bigquery.insert_retries"], pipeline_s=round(took, 1))


def test_bigquery_never_back_rows_become_dead_letters_none_lost(durable_bigquery,
                                                                saved_environment):
    retry_seconds = 6.0
    dead, counters, took = _write_with_outage(durable_bigquery, "never_back",
                                              retry_seconds=retry_seconds, down_seconds=None)
    waited = time.monotonic() - _FAULT["stopped_at"]
    durable_bigquery.start()   # only to count what landed before the outage
    landed = _landed(durable_bigquery, "never_back")
    dead_ids = [json.loads(d["record"])["id"] for d in dead]
    # Exactly the batches flushed before the fault landed (the invalid row never does).
    flushed = _FAULT["ids_before"][:(FAULT_AT - 1) // BATCH * BATCH]
    assert sorted(landed) == sorted(set(flushed) - {"bad"})
    assert len(set(dead_ids)) == len(dead_ids) and not set(dead_ids) & set(landed)
    assert sorted(landed + dead_ids) == sorted([f"r{i:03d}" for i in range(SENT)] + ["bad"])
    unreachable = [d for d in dead if json.loads(d["record"])["id"] != "bad"]
    assert all(d["table"] == "never_back" and d["step"] == "WriteToBigQuery"
               and "'reason': 'unreachable'" in d["reason"] and "ConnectionError" in d["reason"]
               for d in unreachable)
    assert retry_seconds <= waited < retry_seconds + 30   # bounded: no 10-minute client retry
    _report("bigquery_never_back", sent=SENT + 1, landed=len(landed),
            dead_lettered=len(dead), retries=counters["bigquery.insert_retries"],
            budget_s=retry_seconds, fault_to_pipeline_end_s=round(waited, 1),
            pipeline_s=round(took, 1))


# --------------------------------------------------------------------------- 3/4. batch job

# Runs the batch job with its entry point after arming one crash point: the
# process exits with os._exit(137) (a kill), nothing of the job's own code changed.
CRASHING_RUN = r"""
import os, sys
from transforms import warehouse

def crash(where):
    sys.stderr.write("simulated crash: " + where + "\n")
    sys.stderr.flush()
    os._exit(137)

point = os.environ["FAULT_CRASH_AT"]
if point == "before_swap":
    original_publish = warehouse.LocalWarehouse.publish
    def publish(self, run_id, published, logs, swap):
        if swap:
            crash("LocalWarehouse.publish, before its transaction")
        return original_publish(self, run_id, published, logs, swap)
    warehouse.LocalWarehouse.publish = publish
elif point.startswith("sql:"):
    statement = point[len("sql:"):]
    class Connection:
        def __init__(self, con):
            self._con = con
        def __enter__(self):
            self._con.__enter__()
            return self
        def __exit__(self, *exc):
            return self._con.__exit__(*exc)
        def execute(self, sql, *args):
            if sql.startswith(statement):
                crash("before " + sql)
            return self._con.execute(sql, *args)
        def __getattr__(self, name):
            return getattr(self._con, name)
    original_connect = warehouse.LocalWarehouse.connect
    warehouse.LocalWarehouse.connect = lambda self: Connection(original_connect(self))
elif point == "bigquery_swap":
    original_copy = warehouse.BigQueryWarehouse._copy
    def copy(self, source, destination, truncate=False):
        if truncate:
            crash("BigQueryWarehouse: copy " + source + " over " + destination)
        return original_copy(self, source, destination, truncate)
    warehouse.BigQueryWarehouse._copy = copy
else:
    raise SystemExit("unknown crash point " + point)

from pipelines.batch_recommendations import main
sys.argv[0] = "batch_recommendations"
main()
"""


def _batch_args(clean_world, warehouse: str, run_id: str, *extra: str) -> List[str]:
    world_dir, manifest = clean_world
    return ["--input_dir", world_dir, "--warehouse", warehouse, "--as_of", manifest["as_of"],
            "--num_shards", "4", "--run_id", run_id, *extra]


def _crash(args: List[str], point: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FAULT_CRASH_AT": point, "PYTHONPATH": REPO}
    return subprocess.run([sys.executable, "-c", CRASHING_RUN, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def _snapshot(path: str) -> Dict[str, pd.DataFrame]:
    """Every table of the DuckDB warehouse, every row and column, in a stable order."""
    with duckdb.connect(path, read_only=True) as con:
        names = sorted(r[0] for r in con.execute(
            "SELECT table_name FROM information_schema.tables").fetchall())
        return {name: con.execute(f'SELECT * FROM "{name}" ORDER BY ALL').df()
                for name in names}


def _assert_same(before: Dict[str, pd.DataFrame], after: Dict[str, pd.DataFrame]) -> None:
    assert list(after) == list(before)   # no new table (no backup, no half-swapped name)
    for name in before:
        pd.testing.assert_frame_equal(after[name], before[name], obj=name)


def _content(frame: pd.DataFrame) -> pd.DataFrame:
    """Recommendations without the per-run columns, in user order."""
    return (frame.drop(columns=[c for c in RUN_COLUMNS if c in frame])
            .sort_values("user_id").reset_index(drop=True))


@pytest.fixture(scope="module")
def first_warehouse(clean_world, tmp_path_factory):
    """A local warehouse after one published run ("first"); tests work on copies."""
    path = str(tmp_path_factory.mktemp("faults_wh") / "pristine.duckdb")
    assert batch_recommendations.run(_batch_args(clean_world, path, "first")) == 0
    return path


def _copy_of(pristine: str, directory) -> str:
    path = str(directory / "warehouse.duckdb")
    shutil.copy(pristine, path)
    return path


def test_batch_crash_at_the_swap_leaves_production_unchanged(clean_world, first_warehouse,
                                                            tmp_path):
    path = _copy_of(first_warehouse, tmp_path)
    before = _snapshot(path)
    first = before["recommendations"]
    assert len(first) > 1000 and set(first["run_id"]) == {"first"}
    crashes = {"crashed_before": "before_swap",
               # inside the publish transaction: recommendations already swapped, the
               # production segment_popularity renamed to its backup, its new copy not made
               "crashed_mid": 'sql:CREATE TABLE "segment_popularity"'}
    for run_id, point in crashes.items():
        done = _crash(_batch_args(clean_world, path, run_id), point)
        assert done.returncode == 137, done.stderr[-2000:]
        assert "simulated crash" in done.stderr, done.stderr[-2000:]
        if point.startswith("sql:"):
            assert f"simulated crash: before {point[4:]}" in done.stderr
        _assert_same(before, _snapshot(path))   # byte for byte: every table, every row
        assert os.listdir(os.path.join(tmp_path, "staging", run_id))   # what it staged

    assert batch_recommendations.run(_batch_args(clean_world, path, "rerun")) == 0
    after = _snapshot(path)
    recs = after["recommendations"]
    assert set(recs["run_id"]) == {"rerun"} and recs["user_id"].is_unique
    pd.testing.assert_frame_equal(_content(recs), _content(first))
    pd.testing.assert_frame_equal(after["recommendations_backup_rerun"], first)
    runs = after["pipeline_runs"].set_index("run_id")
    assert sorted(runs.index) == ["first", "rerun"]   # the dead runs recorded nothing
    assert runs.loc["rerun", "status"] == "published"
    assert not [t for t in after if "crashed" in t]
    assert list(LocalWarehouse(path).list_backups()["backup_id"]) == ["rerun"]
    _report("batch_crash_local", crash_points=list(crashes.values()),
            leftovers=[f"staging/{r}/ (Parquet, like every run's staging)" for r in crashes])


def test_batch_crash_before_the_bigquery_swap_leaves_production_unchanged(clean_world, bigquery,
                                                                         caplog, tmp_path,
                                                                         saved_environment):
    unused = str(tmp_path / "unused.duckdb")   # the local warehouse flag, not used here
    endpoint = f"http://{bigquery.host}"
    dataset = "faults_batch"
    bq_switch.client(bigquery.project, endpoint).create_dataset(
        f"{bigquery.project}.{dataset}", exists_ok=True)
    shop = BigQueryWarehouse(bigquery.project, dataset, endpoint)
    sink = ["--sink", "bigquery", "--bigquery_dataset", dataset, "--bigquery_endpoint",
            endpoint, "--project", bigquery.project]
    assert batch_recommendations.run(_batch_args(clean_world, unused, "first", *sink)) == 0

    def state():
        tables = sorted(t.table_id for t in shop.client.list_tables(
            f"{shop.project}.{dataset}"))
        published = {}
        for name in ("recommendations", "segment_popularity"):
            table = shop.client.get_table(shop.ref(name).id)
            frame = shop.read(name)
            published[name] = (table.etag, table.modified, table.num_rows,
                               frame.sort_values(list(frame.columns)).reset_index(drop=True))
        return tables, published

    tables, published = state()
    done = _crash(_batch_args(clean_world, unused, "crashed", *sink), "bigquery_swap")
    assert done.returncode == 137, done.stderr[-2000:]
    tables_after, published_after = state()
    for name, (etag, modified, rows, frame) in published.items():
        assert published_after[name][:3] == (etag, modified, rows), name
        pd.testing.assert_frame_equal(published_after[name][3], frame, obj=name)
    assert shop.query("SELECT count(*) AS n FROM pipeline_runs WHERE run_id = ?",
                      ["crashed"])["n"].iloc[0] == 0
    left = sorted(set(tables_after) - set(tables))
    # What the dead run left: its staging and candidate tables, and its backups (copies).
    assert left == sorted(f"{name}_{kind}_crashed" for name in ("recommendations",
                                                                "segment_popularity")
                          for kind in ("backup", "candidate", "staging"))

    with caplog.at_level(logging.WARNING):
        assert batch_recommendations.run(_batch_args(clean_world, unused, "rerun",
                                                     *sink)) == 0
    reported = [r.getMessage() for r in caplog.records
                if "tables left by runs that did not finish" in r.getMessage()]
    assert reported and all(t in reported[0] for t in left if "_backup_" not in t)
    first = published["recommendations"][3]
    rerun = shop.read("recommendations")
    assert set(rerun["run_id"]) == {"rerun"} and rerun["user_id"].is_unique
    pd.testing.assert_frame_equal(_content(rerun), _content(first))
    backups = shop.list_backups().set_index("backup_id")
    assert backups.loc["rerun", "run_id"] == "first"   # the output it replaced
    _report("batch_crash_bigquery", left_by_crashed_run=left,
            reported_by_rerun=bool(reported), backups=list(backups.index))


def test_rerun_on_the_same_input_is_idempotent(clean_world, first_warehouse, tmp_path):
    path = _copy_of(first_warehouse, tmp_path)
    first = _snapshot(path)
    assert batch_recommendations.run(_batch_args(clean_world, path, "again")) == 0
    again = _snapshot(path)
    recs = again["recommendations"]
    assert recs["user_id"].is_unique and recs["email_lower"].is_unique
    assert len(recs) == len(first["recommendations"])
    pd.testing.assert_frame_equal(_content(recs), _content(first["recommendations"]))
    pd.testing.assert_frame_equal(again["segment_popularity"], first["segment_popularity"])
    runs = again["pipeline_runs"].set_index("run_id")
    one, two = runs.loc["first"], runs.loc["again"]
    assert two["status"] == "published" and two["recommendations_written"] == len(recs)
    for column in ("users_read", "eligible_users", "recommendations_written", "dead_lettered",
                   "deduplicated", "qa_violations"):
        assert two[column] == one[column], column
    counters = json.loads(two["counters"])
    # Only the rerun has a published run to compare with: its churn 0, its inputs 100% (#13).
    assert (counters.pop("gate.churn"), counters.pop("gate.input_shrinkage")) == (0.0, 1.0)
    assert counters == json.loads(one["counters"])
    assert all(r["unexplained"] == 0 for r in reconcile(counters).values())
    stability = again["stability_report"].set_index("run_id").loc["again"]
    assert stability["users_common"] == len(recs) and stability["changed_0_share"] == 1.0
    assert stability["users_gained"] == 0 and stability["users_lost"] == 0
    _report("batch_rerun_idempotent", rows=len(recs), users_unchanged_share=1.0)
