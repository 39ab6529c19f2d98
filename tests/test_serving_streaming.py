"""An order on Pub/Sub reaches the API's answer: streaming refresh -> serving store -> service.

The streaming job runs on the DirectRunner between the Pub/Sub emulator and
bqemulator (as in test_streaming_e2e.py) with ``--serving_store`` pointing at a
real redis-server; the batch output of a warehouse is served first, and the
buyer's answer must switch to the streaming run's refreshed row.
"""
import json
import os
import threading
import time

import pandas as pd
import pytest
from starlette.testclient import TestClient

from models.config import DEFAULT_CONFIG
from models.serving import ServingStore
from models.world import WorldSpec, generate, write_world
from pipelines import serve
from tests.emulators import bigquery_emulator, create_streams, pubsub_emulator, wait_for
from tests.redis_server import RedisServer
from transforms.streaming import FileReference


@pytest.fixture(scope="module")
def emulators():
    saved = dict(os.environ)
    with pubsub_emulator() as pubsub, bigquery_emulator() as bigquery, RedisServer() as redis:
        os.environ["PUBSUB_EMULATOR_HOST"] = pubsub.host
        try:
            yield pubsub, bigquery, redis
        finally:
            os.environ.clear()
            os.environ.update(saved)


def _iso(stamp):
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def test_an_order_on_pubsub_reaches_the_api(emulators, tmp_path):
    from google.cloud import pubsub_v1

    from pipelines import streaming_refresh as job

    pubsub, emulator, redis = emulators
    world = str(tmp_path / "world")
    write_world(generate(WorldSpec.preset("tiny"), 7), world, "jsonl", 0)
    publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    subscriptions = create_streams(publisher, subscriber, pubsub.project,
                                   ("events", "treatments"))
    servable = FileReference(world, DEFAULT_CONFIG, 3600, "").current().servable
    ids = sorted(servable.dropna(subset=["make", "model", "year"])["user_id"])
    buyer, browsers = ids[0], ids[10:200]
    catalog = pd.read_json(os.path.join(world, "catalog.jsonl"), lines=True)
    skus = catalog.loc[catalog["price"] >= 50, "sku"].tolist()

    client = TestClient(serve.create_app(ServingStore(redis.url)))
    before = client.get(f"/v1/users/{buyer}/recommendations")
    assert before.status_code == 503  # nothing published, no streaming row yet

    launched = job.launch([
        f"--events_subscription={subscriptions['events'][1]}",
        f"--treatments_subscription={subscriptions['treatments'][1]}",
        f"--streaming_dataset={emulator.project}.streaming", f"--project={emulator.project}",
        f"--bigquery_endpoint=http://{emulator.host}", f"--input_dir={world}",
        "--window_seconds=4", "--period_seconds=2", "--allowed_lateness_seconds=2",
        "--dedupe_ttl_seconds=60", "--num_shards=2", f"--serving_store={redis.url}"])
    stop = threading.Event()

    def publish(name, record):
        data = json.dumps(record).encode()
        return publisher.publish(subscriptions[name][0], data, event_time=record["event_time"])

    def background():  # an idle subscription holds the DirectRunner's watermark for 30 s
        k = 0
        while not stop.is_set():
            k += 1
            publish("events", {"event_id": f"BG-V{k}", "event_time": _iso(pd.Timestamp.now(
                tz="UTC")), "user_id": browsers[k % len(browsers)],
                "event_name": "Viewed Product", "sku": skus[k % len(skus)], "quantity": 1,
                "price": 150.0, "order_id": None})
            publish("treatments", {"event_id": f"BG-T{k}", "event_time": _iso(pd.Timestamp.now(
                tz="UTC")), "user_id": browsers[k % len(browsers)], "treatment_id": "T02",
                "campaign_id": "C", "kind": "SENT"})
            time.sleep(0.2)

    traffic = threading.Thread(target=background, daemon=True)
    traffic.start()
    try:
        ordered_at = pd.Timestamp.now(tz="UTC")
        publish("events", {"event_id": "E-BUY", "event_time": _iso(ordered_at),
                           "user_id": buyer, "event_name": "Placed Order", "sku": skus[0],
                           "quantity": 1, "price": 150.0, "order_id": "O-BUY"}).result()
        body = wait_for("the buyer's refreshed list through the API",
                        lambda: client.get(f"/v1/users/{buyer}/recommendations"),
                        lambda r: r.status_code == 200
                        and r.json()["run_id"] == launched.context.run_id
                        and r.json()["generated_at"] >= _iso(ordered_at)).json()
        assert body["model_version"] == job.MODEL_VERSION
        assert len(body["items"]) == DEFAULT_CONFIG.rules.recs_per_user
        assert skus[0] not in [item["sku"] for item in body["items"]]  # rule 4: just bought
    finally:
        stop.set()
        launched.result.cancel()
