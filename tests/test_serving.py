"""The serving store and the API against a real Redis server (tests/redis_server.py).

Covers each status code, a publish switch under concurrent reads, rollback and
prune in step with the warehouse, a rebuild after the store was lost, the
fallback lists, the batch job's own publish and a streaming row served.
"""
import threading

import apache_beam as beam
import orjson
import pandas as pd
import pyarrow as pa
import pytest
from apache_beam.testing import test_pipeline
from starlette.testclient import TestClient

from models import serving
from models.serving import ServingStore
from pipelines import batch_recommendations, generate_world, publish as publish_cli
from pipelines import serve
from tests.redis_server import RedisServer
from transforms import schemas
from transforms import serving as serving_transforms
from transforms.serving import WriteServingUpdates, follow_warehouse, load_from_warehouse
from transforms.warehouse import LocalWarehouse

N = 4
SCHEMA = schemas.recommendations(N)


@pytest.fixture(scope="module")
def redis_server():
    with RedisServer() as server:
        yield server


@pytest.fixture
def store(redis_server):
    found = ServingStore(redis_server.url)
    found.client.flushdb()
    return found


def frame(run_id, users, prefix, source="make+model", segment="FORD|F-150|2020",
          generated_at="2026-03-01T06:00:00Z"):
    """Recommendation rows whose SKUs all start with ``prefix`` (so a mix is visible)."""
    rows = []
    for u in users:
        row = {"user_id": u, "email_lower": f"{u.lower()}@x.example", "make": "FORD",
               "model": "F-150", "year": 2020, "segment": segment, "source": source,
               "generated_at": pd.Timestamp(generated_at), "run_id": run_id,
               "model_version": "test-v1"}
        for i in range(1, N + 1):
            row.update({f"rec_part_{i}": f"{prefix}-{i}", f"rec{i}_price": 100.0 * i,
                        f"rec{i}_score": float(N + 1 - i), f"rec{i}_image_url": "https://x/y",
                        f"rec{i}_part_type": f"T{i}"})
        rows.append(row)
    return pd.DataFrame(rows)


def publish(warehouse, run_id, data):
    """A published batch output in the warehouse, as PublishRunFn leaves it."""
    now = pd.Timestamp.now(tz="UTC")
    runs = pa.Table.from_pylist([{"run_id": run_id, "job": "batch_recommendations",
                                  "started_at": now, "finished_at": now,
                                  "status": "published",
                                  "recommendations_written": len(data)}],
                                schema=schemas.PIPELINE_RUNS)
    table = pa.Table.from_pandas(data, schema=SCHEMA, preserve_index=False)
    return warehouse.publish(run_id, {"recommendations": table}, {"pipeline_runs": runs},
                             swap=True)


# --------------------------------------------------------------------------- encoding

def test_payloads_round_trip_into_the_answer():
    data = frame("r1", ["U1", "U2"], "A")
    data.loc[1, "rec_part_4"] = None  # fewer eligible SKUs than slots
    payloads = serving.encode_rows(data)
    meta = serving.version_meta("r1", "test-v1", data["generated_at"].iloc[0], 2)
    body = serving.answer("U2", 10, b"r1", meta, payloads[1], None, None)
    assert body["items"] == [{"sku": "A-1", "score": 4.0}, {"sku": "A-2", "score": 3.0},
                             {"sku": "A-3", "score": 2.0}]
    assert (body["source"], body["run_id"], body["model_version"], body["generated_at"]) == (
        "make+model", "r1", "test-v1", "2026-03-01T06:00:00.000000Z")
    assert len(serving.answer("U1", 2, b"r1", meta, payloads[0], None, None)["items"]) == 2


def test_per_slot_sources_are_kept():
    data = frame("r1", ["U1"], "A")
    for i in range(1, N + 1):
        data[f"rec{i}_source"] = "buy_again" if i == 1 else "segment"
    body = serving.answer("U1", N, b"r1", None, serving.encode_rows(data)[0], None, None)
    assert [it["source"] for it in body["items"]] == ["buy_again"] + ["segment"] * (N - 1)


def test_fallbacks_are_the_most_common_list_of_each_segment_and_of_global_users():
    data = pd.concat([frame("r", ["U1", "U2"], "A", segment="S1"),
                      frame("r", ["U3"], "B", segment="S1"),
                      frame("r", ["U4"], "C", segment="S2"),
                      frame("r", ["U5", "U6"], "G", source="global", segment=None),
                      frame("r", ["U7"], "H", source="global", segment=None)],
                     ignore_index=True)
    segments, global_list = serving.fallback_lists(data)
    assert sorted(segments) == ["S1", "S2"]
    assert orjson.loads(segments["S1"])["i"][0][0] == "A-1"
    assert orjson.loads(segments["S2"])["i"][0][0] == "C-1"
    assert orjson.loads(global_list) == {"s": "fallback", "f": "global",
                                         "i": [[f"G-{i}", float(N + 1 - i)]
                                               for i in range(1, N + 1)]}
    assert serving.fallback_lists(frame("r", ["U1"], "A"))[1] is None  # no global user


def test_a_newer_streaming_row_wins_over_the_batch_row():
    batch = serving.encode_rows(frame("r1", ["U1"], "A"))[0]
    live = serving.encode_rows(frame("s1", ["U1"], "L", generated_at="2026-03-02T00:00:00Z"),
                               with_run=True)[0]
    older = serving.encode_rows(frame("s0", ["U1"], "O", generated_at="2026-02-01T00:00:00Z"),
                                with_run=True)[0]
    meta = serving.version_meta("r1", "test-v1", "2026-03-01T06:00:00Z", 1)
    assert serving.answer("U1", N, b"r1", meta, batch, live, None)["run_id"] == "s1"
    assert serving.answer("U1", N, b"r1", meta, batch, older, None)["run_id"] == "r1"


# --------------------------------------------------------------------------- the API

def test_status_codes_of_the_api(store, redis_server, tmp_path):
    warehouse = LocalWarehouse(str(tmp_path / "wh.duckdb"))
    client = TestClient(serve.create_app(ServingStore(redis_server.url)))
    assert client.get("/v1/users/U1/recommendations").status_code == 503  # nothing published
    assert client.get("/healthz").status_code == 503
    publish(warehouse, "r1", pd.concat([frame("r1", ["U1", "U2"], "A"),
                                        frame("r1", ["U9"], "G", source="global",
                                              segment=None)], ignore_index=True))
    follow_warehouse(store, warehouse)

    ok = client.get("/v1/users/U1/recommendations", params={"k": 2})
    assert ok.status_code == 200
    assert ok.json() == {"user_id": "U1", "source": "make+model", "version": "r1",
                         "items": [{"sku": "A-1", "score": 4.0}, {"sku": "A-2", "score": 3.0}],
                         "generated_at": "2026-03-01T06:00:00.000000Z", "run_id": "r1",
                         "model_version": "test-v1"}
    unknown = client.get("/v1/users/NEW1/recommendations")
    assert unknown.status_code == 200
    assert (unknown.json()["source"], unknown.json()["fallback"]) == ("fallback", "global")
    assert unknown.json()["items"][0]["sku"] == "G-1"
    by_segment = client.get("/v1/users/NEW1/recommendations",
                            params={"segment": "FORD|F-150|2020"}).json()
    assert (by_segment["fallback"], by_segment["items"][0]["sku"]) == ("segment", "A-1")
    for path in ("/v1/users/%20U1/recommendations", "/v1/users/U%E2%80%8B1/recommendations",
                 "/v1/users/" + "x" * 129 + "/recommendations",
                 "/v1/users/U1/recommendations?k=0", "/v1/users/U1/recommendations?k=abc",
                 "/v1/users/U1/recommendations?k=101"):
        bad = client.get(path)
        assert bad.status_code == 400, path
        assert set(bad.json()) == {"error", "detail"}
    assert client.get("/healthz").json() == {"status": "ok", "version": "r1"}
    assert client.get("/nowhere").status_code == 404

    metrics = client.get("/metrics").text
    assert 'serving_requests_total{route="recommendations",status="200"} 3' in metrics
    assert 'serving_requests_total{route="recommendations",status="400"} 6' in metrics
    assert 'serving_request_seconds_bucket{route="recommendations",le="+Inf"} 10' in metrics
    assert 'serving_answers_total{source="fallback"} 2' in metrics
    assert 'serving_version_info{version="r1",run_id="r1",model_version="test-v1"} 1' in metrics
    assert "serving_data_age_seconds " in metrics and "serving_store_up 1" in metrics

    redis_server.stop()  # the store goes away: 503 with a short reason, never a traceback
    try:
        down = client.get("/v1/users/U1/recommendations")
        assert down.status_code == 503
        assert down.json()["error"] == "store unavailable"
        assert "Traceback" not in down.text and len(down.text) < 400
        assert client.get("/healthz").status_code == 503
        assert "serving_store_up 0" in client.get("/metrics").text
    finally:
        redis_server.start()


def test_a_real_uvicorn_service_answers(store, redis_server, tmp_path):
    """The service as deployed: its own process, over HTTP."""
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request
    from tests.emulators import free_port
    warehouse = LocalWarehouse(str(tmp_path / "wh.duckdb"))
    publish(warehouse, "r1", frame("r1", ["U1"], "A"))
    follow_warehouse(store, warehouse)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.serve", "run", "--serving_store",
                             redis_server.url, "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/v1/users/U1/recommendations"
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(url, timeout=5) as answer:
                    assert orjson.loads(answer.read())["items"][0]["sku"] == "A-1"
                    break
            except (urllib.error.URLError, ConnectionError):
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.2)
        with pytest.raises(urllib.error.HTTPError) as bad:
            urllib.request.urlopen(url.replace("U1", "U%201"), timeout=5)
        assert bad.value.code == 400
    finally:
        proc.terminate()
        proc.wait(timeout=20)


# --------------------------------------------------------------------------- versions

def test_no_reader_sees_a_mix_of_two_versions(store, tmp_path, monkeypatch):
    """Publishes (each loaded in many small MSETs) and rollbacks while readers read."""
    monkeypatch.setattr(serving_transforms, "LOAD_ROWS", 25)
    warehouse = LocalWarehouse(str(tmp_path / "wh.duckdb"))
    users = [f"U{i}" for i in range(300)]
    prefixes = {f"r{k}": prefix for k, prefix in enumerate("ABCD", start=1)}
    publish(warehouse, "r1", frame("r1", users, "A"))
    follow_warehouse(store, warehouse)
    seen, mixed, stop = set(), [], threading.Event()

    def reader(offset):
        reader_store = ServingStore(store.url)
        i = offset
        while not stop.is_set():
            body = reader_store.read(users[i % len(users)], N)
            found = {item["sku"].split("-")[0] for item in body["items"]}
            if found != {prefixes[body["run_id"]]} or body["run_id"] != body["version"]:
                mixed.append(body)
            seen.add(body["version"])
            i += 7

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    try:
        for run_id in ("r2", "r3", "r4"):
            publish(warehouse, run_id, frame(run_id, users, prefixes[run_id]))
            follow_warehouse(store, warehouse)  # 12 MSETs, then the switch
        for backup in warehouse.list_backups()["backup_id"].tolist()[:2]:
            warehouse.rollback(backup)
            follow_warehouse(store, warehouse)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not mixed, mixed[:3]
    assert len(seen) >= 3


def test_rollback_and_prune_follow_the_warehouse(store, redis_server, tmp_path, capsys):
    path = str(tmp_path / "wh.duckdb")
    warehouse = LocalWarehouse(path)
    users = ["U1", "U2"]
    publish(warehouse, "r1", frame("r1", users, "A"))
    follow_warehouse(store, warehouse)
    publish(warehouse, "r2", frame("r2", users, "B"))
    follow_warehouse(store, warehouse)
    assert store.current() == "r2" and set(store.versions()) == {"r1", "r2"}

    assert publish_cli.main(["rollback", "--to", "r2", "--warehouse", path,
                             "--serving_store", redis_server.url]) == 0
    assert "serves run r1" in capsys.readouterr().out
    assert store.current() == "r1"
    assert store.read("U1", N)["items"][0]["sku"] == "A-1"

    publish(warehouse, "r3", frame("r3", users, "C"))
    follow_warehouse(store, warehouse)
    assert publish_cli.main(["prune", "--keep", "0", "--warehouse", path,
                             "--serving_store", redis_server.url]) == 0
    assert set(store.versions()) == {"r3"}  # the backups' versions went with the backups
    assert not list(store.client.scan_iter(match="recs:u:r1:*"))

    # An unreachable store refuses before the warehouse changes (they stay in step).
    assert publish_cli.main(["rollback", "--to", "r3", "--warehouse", path,
                             "--serving_store", "redis://127.0.0.1:1/0"]) == 2
    assert warehouse.read("recommendations")["run_id"].unique().tolist() == ["r3"]


def test_rebuild_restores_a_lost_store_from_the_warehouse(store, redis_server, tmp_path,
                                                          capsys):
    path = str(tmp_path / "wh.duckdb")
    warehouse = LocalWarehouse(path)
    publish(warehouse, "r1", frame("r1", [f"U{i}" for i in range(300)], "A"))
    store.client.flushdb()  # the origin's failure: the cache lost on restart
    assert store.read("U7", N) is None
    assert serve.main(["rebuild", "--serving_store", redis_server.url,
                       "--warehouse", path]) == 0
    assert "300 users" in capsys.readouterr().out
    assert store.read("U7", N)["items"][0]["sku"] == "A-1"
    assert store.meta("r1")["users"] == 300
    assert serve.main(["rebuild", "--serving_store", "redis://127.0.0.1:1/0",
                       "--warehouse", path]) == 2
    assert serve.main(["rebuild", "--serving_store", "not-a-url", "--warehouse", path]) == 2


def test_a_half_loaded_version_is_reloaded_not_served(store, tmp_path):
    warehouse = LocalWarehouse(str(tmp_path / "wh.duckdb"))
    publish(warehouse, "r1", frame("r1", ["U1", "U2"], "A"))
    store.begin("r1", "r1", "test-v1", "2026-03-01T00:00:00Z")  # a crashed load: 1 of 2 rows
    store.write_users("r1", ["U1"], serving.encode_rows(frame("r1", ["U1"], "A")))
    done = load_from_warehouse(store, warehouse)
    assert done["users"] == 2
    store.switch("r1")
    assert store.read("U2", N)["source"] == "make+model"


# --------------------------------------------------------------------------- the jobs

@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("serving_world"))
    generate_world.main(["--preset", "tiny", "--seed", "11", "--out", out, "--bad_rows", "0"])
    with open(f"{out}/world.json") as handle:
        return out, orjson.loads(handle.read())["as_of"]


def test_the_batch_job_publishes_to_the_store(redis_server, store, tiny_world, tmp_path):
    world, as_of = tiny_world
    path = str(tmp_path / "wh.duckdb")
    args = ["--input_dir", world, "--warehouse", path, "--as_of", as_of, "--num_shards", "2",
            "--serving_store", redis_server.url]
    assert batch_recommendations.run(args + ["--run_id", "b1"]) == 0
    published = LocalWarehouse(path).read("recommendations")
    assert store.current() == "b1"
    assert store.meta("b1")["users"] == len(published) > 0
    row = published.iloc[0]
    body = store.read(row["user_id"], N)
    assert [it["sku"] for it in body["items"]] == [
        row[f"rec_part_{i}"] for i in range(1, N + 1) if isinstance(row[f"rec_part_{i}"], str)]
    assert (body["run_id"], body["source"]) == ("b1", row["source"])
    assert store.read("nobody-at-all", N)["source"] == "fallback"

    # A store that does not answer is a one-line refusal at start-up (exit 2).
    with pytest.raises(SystemExit) as refused:
        batch_recommendations.run(args[:-1] + ["redis://127.0.0.1:1/0", "--run_id", "b3"])
    assert "--serving_store" in str(refused.value)


def test_a_streaming_refresh_is_what_the_api_answers(store, redis_server, tmp_path):
    warehouse = LocalWarehouse(str(tmp_path / "wh.duckdb"))
    publish(warehouse, "r1", frame("r1", ["U1", "U2"], "A"))
    follow_warehouse(store, warehouse)
    fresh = frame("streaming_run", ["U1"], "L", generated_at="2026-03-05T00:00:00Z")
    with test_pipeline.TestPipeline() as pipeline:
        (pipeline | beam.Create([fresh]) | WriteServingUpdates(ServingStore(redis_server.url)))
    client = TestClient(serve.create_app(ServingStore(redis_server.url)))
    body = client.get("/v1/users/U1/recommendations").json()
    assert (body["run_id"], body["items"][0]["sku"]) == ("streaming_run", "L-1")
    assert client.get("/v1/users/U2/recommendations").json()["run_id"] == "r1"
    assert 0 < store.client.ttl("recs:live:U1") <= serving.LIVE_TTL_SECONDS


# --------------------------------------------------------------------------- command lines

def test_serve_refuses_bad_usage_in_one_line(capsys, monkeypatch):
    monkeypatch.delenv("SERVING_STORE", raising=False)
    assert serve.main(["run"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    assert serve.main(["run", "--serving_store", "http://x"]) == 2
    assert serve.main(["status", "--serving_store", "redis://127.0.0.1:1/0"]) == 2
    with pytest.raises(SystemExit) as usage:
        serve.main(["rebuild", "--serving_store", "redis://h:1/0", "--bogus"])
    assert usage.value.code == 2


def test_a_store_outage_never_fails_the_job_and_keeps_the_served_version(
        store, tmp_path, monkeypatch):
    monkeypatch.setattr(serving_transforms, "RETRY_SECONDS", 0.0)
    warehouse = LocalWarehouse(str(tmp_path / "wh.duckdb"))
    publish(warehouse, "r1", frame("r1", ["U1"], "A"))
    follow_warehouse(store, warehouse)
    publish(warehouse, "r2", frame("r2", ["U1"], "B"))
    down = ServingStore("redis://127.0.0.1:1/0", timeout=0.2)
    writer = serving_transforms._WriteVersionFn(down, "r2", "test-v1", pd.Timestamp.now())
    assert list(writer.process(frame("r2", ["U1", "U2"], "B"))) == [(0, 2)]
    row = {"run_id": "r2", "status": "published"}
    # Rows the store missed: published in the warehouse, not switched in the store.
    switch = serving_transforms.SwitchServingFn(ServingStore(store.url), warehouse)
    assert list(switch.process(row, (1, 1))) == [row]
    assert store.current() == "r1"
    # The store down at switch time: the row passes, nothing raises.
    switch = serving_transforms.SwitchServingFn(down, warehouse)
    assert list(switch.process(row, (2, 0))) == [row]
    live = serving_transforms._WriteLiveFn(down)
    assert list(live.process(frame("s1", ["U1"], "L"))) == []
    # All rows written: the switch serves the run.
    writer = serving_transforms._WriteVersionFn(ServingStore(store.url), "r2", "test-v1",
                                                pd.Timestamp.now())
    assert list(writer.process(frame("r2", ["U1"], "B"))) == [(1, 0)]
    switch = serving_transforms.SwitchServingFn(ServingStore(store.url), warehouse)
    list(switch.process(row, (1, 0)))
    assert store.current() == "r2" and store.read("U1", N)["items"][0]["sku"] == "B-1"


def test_rebuild_and_rollback_from_a_bigquery_warehouse(store, redis_server, bigquery, capsys):
    """The production path: the warehouse is BigQuery (the emulator)."""
    import uuid
    from transforms.bigquery import client as bigquery_client
    from transforms.warehouse import BigQueryWarehouse
    endpoint = f"http://{bigquery.host}"
    dataset = f"serving_{uuid.uuid4().hex[:8]}"
    bigquery_client(bigquery.project, endpoint).create_dataset(dataset)
    warehouse = BigQueryWarehouse(bigquery.project, dataset, endpoint)
    now = pd.Timestamp.now(tz="UTC")
    for run_id, prefix in (("r1", "A"), ("r2", "B")):
        table = pa.Table.from_pandas(frame(run_id, ["U1", "U2"], prefix), schema=SCHEMA,
                                     preserve_index=False)
        warehouse.append(warehouse.sink_table(run_id, "recommendations"), table)
        staged = warehouse.staged(run_id, "recommendations", SCHEMA, [])
        runs = pa.Table.from_pylist([{"run_id": run_id, "job": "batch_recommendations",
                                      "started_at": now, "finished_at": now,
                                      "status": "published", "recommendations_written": 2}],
                                    schema=schemas.PIPELINE_RUNS)
        warehouse.publish(run_id, {"recommendations": staged}, {"pipeline_runs": runs},
                          swap=True)
    where = ["--bigquery_project", bigquery.project, "--bigquery_dataset", dataset,
             "--bigquery_endpoint", endpoint, "--serving_store", redis_server.url]
    assert serve.main(["rebuild", *where]) == 0
    assert store.current() == "r2" and store.read("U2", N)["items"][0]["sku"] == "B-1"
    assert publish_cli.main(["rollback", "--to", "r2", *where]) == 0
    assert "serves run r1" in capsys.readouterr().out
    assert store.current() == "r1" and store.read("U2", N)["items"][0]["sku"] == "A-1"


def test_the_store_keeps_few_versions_and_a_deeper_rollback_reloads(store, redis_server,
                                                                     tmp_path, capsys):
    path = str(tmp_path / "wh.duckdb")
    warehouse = LocalWarehouse(path)
    for run_id, prefix in (("r1", "A"), ("r2", "B"), ("r3", "C")):
        publish(warehouse, run_id, frame(run_id, ["U1"], prefix))
        follow_warehouse(store, warehouse)
    assert store.current() == "r3" and set(store.versions()) == {"r2", "r3"}  # 2 by default
    oldest = warehouse.list_backups()["backup_id"].tolist()[-1]  # holds r1's output
    assert publish_cli.main(["rollback", "--to", oldest, "--warehouse", path,
                             "--serving_store", redis_server.url]) == 0
    assert "serves run r1 (loaded 1 users" in capsys.readouterr().out
    assert store.current() == "r1" and store.read("U1", N)["items"][0]["sku"] == "A-1"
    assert set(store.versions()) == {"r1", "r3"}  # r3 was served just before
    assert publish_cli.main(["prune", "--keep", "5", "--warehouse", path, "--serving_store",
                             redis_server.url, "--serving_keep_versions", "1"]) == 0
    assert set(store.versions()) == {"r1"}
