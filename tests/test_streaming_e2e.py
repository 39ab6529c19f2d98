"""End to end: the streaming job on the DirectRunner between the Pub/Sub emulator and bqemulator.

Topics and subscriptions are created on the official Pub/Sub emulator, the
job runs in this process (streaming, bundle-based DirectRunner) with
2-second periods, messages are published with their ``event_time``
attribute, and everything is read back from BigQuery (the emulator).

Background traffic (views and sends by other users) runs throughout: on the
DirectRunner an idle subscription's pull waits 30 s before the watermark can
move (docs/streaming.md), and a live shop is never idle anyway.
"""
import json
import os
import threading
import time

import pandas as pd
import pytest

from models.config import DEFAULT_CONFIG
from models.world import WorldSpec, generate, write_world
from tests.emulators import bigquery_emulator, create_streams, pubsub_emulator, wait_for
from transforms.streaming import FileReference

DATASET = "streaming"


@pytest.fixture(scope="module")
def emulators():
    saved = dict(os.environ)
    with pubsub_emulator() as pubsub, bigquery_emulator() as bigquery:
        os.environ["PUBSUB_EMULATOR_HOST"] = pubsub.host
        try:
            yield pubsub, bigquery
        finally:
            os.environ.clear()
            os.environ.update(saved)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("streaming_world"))
    write_world(generate(WorldSpec.preset("tiny"), 7), directory, "jsonl", 0)
    return directory


@pytest.fixture(scope="module")
def topics(emulators):
    from google.cloud import pubsub_v1
    pubsub, _ = emulators
    publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    paths = create_streams(publisher, subscriber, pubsub.project,
                           ("events", "treatments", "dead-letters"))
    return publisher, subscriber, paths


def _now():
    return pd.Timestamp.now(tz="UTC")


def _iso(stamp):
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _event(event_id, user, name, sku, at=None, order_id=None):
    at = at or _now()
    return {"event_id": event_id, "event_time": _iso(at), "user_id": user, "event_name": name,
            "sku": sku, "quantity": 1, "price": 150.0, "order_id": order_id}


def test_streaming_refresh_end_to_end(emulators, world, topics):
    from google.cloud import bigquery as bq

    from pipelines import streaming_refresh as job
    from transforms import bigquery

    pubsub, emulator = emulators
    publisher, subscriber, paths = topics
    # Users who may receive a row: a vehicle, and the newest of their e-mail (rule 14).
    servable = FileReference(world, DEFAULT_CONFIG, 3600, "").current().servable
    ids = sorted(servable.dropna(subset=["make", "model", "year"])["user_id"])
    buyer_a, buyer_b, buyer_c, late_buyer = ids[:4]
    browsers = ids[10:200]
    catalog = pd.read_json(os.path.join(world, "catalog.jsonl"), lines=True)
    skus = catalog.loc[catalog["price"] >= 50, "sku"].tolist()
    project = emulator.project
    argv = [f"--events_subscription={paths['events'][1]}",
            f"--treatments_subscription={paths['treatments'][1]}",
            f"--streaming_dataset={project}.{DATASET}", f"--project={project}",
            f"--bigquery_endpoint=http://{emulator.host}", f"--input_dir={world}",
            "--window_seconds=4", "--period_seconds=2", "--allowed_lateness_seconds=2",
            "--dedupe_ttl_seconds=60", "--reference_refresh_seconds=1",
            f"--dead_letter_topic={paths['dead-letters'][0]}", "--insert_batch_size=50",
            "--num_shards=2"]
    launched = job.launch(argv)
    client = bigquery.client(project)
    stop = threading.Event()

    def publish(topic, record, **attributes):
        data = record if isinstance(record, bytes) else json.dumps(record).encode()
        return publisher.publish(paths[topic][0], data, **attributes)

    def background():
        k = 0
        while not stop.is_set():
            k += 1
            view = _event(f"BG-V{k}", browsers[k % len(browsers)], "Viewed Product",
                          skus[k % len(skus)])
            publish("events", view, event_time=view["event_time"])
            send = {"event_id": f"BG-T{k}", "event_time": _iso(_now()),
                    "user_id": browsers[k % len(browsers)], "treatment_id": "T02",
                    "campaign_id": "C", "kind": "SENT"}
            publish("treatments", send, event_time=send["event_time"])
            time.sleep(0.2)

    traffic = threading.Thread(target=background, daemon=True)
    traffic.start()

    def query(sql, **params):
        config = bq.QueryJobConfig(query_parameters=[
            bq.ArrayQueryParameter(k, "STRING", v) if isinstance(v, list)
            else bq.ScalarQueryParameter(k, "STRING", v) for k, v in params.items()])
        return [dict(r) for r in client.query(sql, job_config=config).result()]

    table = f"`{project}.{DATASET}"
    try:
        ordered = {buyer_a: skus[0], buyer_b: skus[1], buyer_c: skus[2], late_buyer: skus[3]}
        # A poisoned message first (#13): a lone surrogate escape in the user id once
        # failed its bundle four times and stopped the job; everything after it must flow.
        poison = json.dumps(_event("E-POISON", "U-POISON", "Placed Order", skus[0],
                                   order_id="O-POISON")).replace('"U-POISON"', '"\\ud800"')
        publish("events", poison.encode()).result()
        publish("treatments", json.dumps({
            "event_id": "T-POISON", "event_time": _iso(_now()), "user_id": buyer_a,
            "treatment_id": "T01", "campaign_id": "C", "kind": "SENT"}).replace(
            '"T01"', '"\\udfff"').encode()).result()
        publish("events", _event("E-UNKNOWN-SKU", buyer_b, "Placed Order", "NO-SUCH-SKU",
                                 order_id="O-UNKNOWN")).result()
        publish("treatments", {"event_id": "T-LONE-CLICK", "event_time": _iso(_now()),
                               "user_id": buyer_b, "treatment_id": "T01", "campaign_id": "C",
                               "kind": "CLICKED"}).result()
        first = _event("E-A", buyer_a, "Placed Order", ordered[buyer_a], order_id="O-A")
        publish("events", first, event_time=first["event_time"]).result()
        publish("events", first, event_time=first["event_time"]).result()   # redelivery
        second = _event("E-B", buyer_b, "Ordered Product", ordered[buyer_b], order_id="O-B")
        publish("events", second).result()                                  # no attribute
        third = _event("E-C", buyer_c, "Consumer Website Order", ordered[buyer_c],
                       order_id="O-C")
        publish("events", third, event_time="not a time").result()
        late = _event("E-LATE", late_buyer, "Placed Order", ordered[late_buyer],
                      at=_now() - pd.Timedelta(seconds=30), order_id="O-LATE")
        publish("events", late, event_time=late["event_time"]).result()     # past every window
        publish("events", b'{"event_id": "E-BAD", "event_time": ', event_time="x").result()
        publish("events", _event("E-GHOST", "U-NOBODY", "Placed Order", skus[0],
                                 order_id="O-GHOST")).result()
        for i, kind in enumerate(("SENT", "VIEWED", "CLICKED")):
            publish("treatments", {"event_id": f"T-{i}", "event_time": _iso(_now()),
                                   "user_id": buyer_a, "treatment_id": "T01",
                                   "campaign_id": "C", "kind": kind}).result()

        buyers = list(ordered)
        latest = wait_for(
            "a refreshed row for every buyer",
            lambda: query(f"SELECT * FROM {table}.recommendations_latest` "
                          f"WHERE user_id IN UNNEST(@users)", users=buyers),
            lambda rows: {r["user_id"] for r in rows if "order" in r["reason"]} == set(buyers))
        assert len(latest) == len(buyers)   # the view: one (the latest) row per user
        for row in latest:
            recs = [row[f"rec_part_{i}"] for i in range(1, 5)]
            assert all(recs) and len(set(recs)) == 4
            assert ordered[row["user_id"]] not in recs             # rule 4: just bought
            assert row["generated_at"] >= row["popularity_as_of"] - pd.Timedelta(seconds=1)
            assert row["model_version"] == job.MODEL_VERSION

        dead = wait_for("the malformed message in the dead-letter table",
                        lambda: query(f"SELECT * FROM {table}.streaming_dead_letter`"),
                        lambda rows: any(r["record"].startswith('{"event_id": "E-BAD"')
                                         for r in rows))
        bad = next(r for r in dead if r["record"].startswith('{"event_id": "E-BAD"'))
        assert bad["table"] == "events" and bad["step"] == "ParseMessages"
        assert json.loads(bad["attributes"]) == {"event_time": "x"} and bad["reason"]
        refused = {"E-POISON": ("events", "ParseMessages"),
                   "T-POISON": ("treatment_events", "ParseMessages"),
                   "E-UNKNOWN-SKU": ("events", "CheckSkus"),
                   "T-LONE-CLICK": ("treatment_events", "CheckFunnel")}

        def refused_rows(rows):
            return {i: r for r in rows for i in refused if f'"{i}"' in r["record"]}
        dead = wait_for("the poisoned, unknown-SKU and lone-click messages as dead letters",
                        lambda: query(f"SELECT * FROM {table}.streaming_dead_letter`"),
                        lambda rows: set(refused_rows(rows)) == set(refused))
        found = refused_rows(dead)
        assert {i: (r["table"], r["step"]) for i, r in found.items()} == refused
        assert found["E-UNKNOWN-SKU"]["reason"] == "unknown sku"
        assert found["T-LONE-CLICK"]["reason"] == "click without send"
        assert "\\ud800" in found["E-POISON"]["record"] and found["E-POISON"]["reason"]
        published = []   # the dead-letter topic gets every refused message, in any order
        for _ in range(5):
            response = subscriber.pull(subscription=paths["dead-letters"][1], max_messages=50,
                                       timeout=30)
            published += [m.message for m in response.received_messages]
            if any(m.data.startswith(b'{"event_id": "E-BAD"') for m in published):
                break
        assert any(m.data.startswith(b'{"event_id": "E-BAD"') and m.attributes["table"] == "events"
                   for m in published)

        bandit = wait_for(
            "bandit state with T01's view and click",
            lambda: query(f"SELECT * FROM {table}.bandit_state_latest` "
                          f"WHERE treatment_id = 'T01'"),
            lambda rows: any(r["views"] >= 1 and r["clicks"] >= 1 for r in rows))
        assert all(0 < r["mean"] < 1 and r["ci_low"] <= r["mean"] <= r["ci_high"]
                   for r in bandit)

        def counters():
            rows = query(f"SELECT counters FROM {table}.streaming_health` "
                         f"WHERE kind = 'counters'")
            totals = {}
            for row in rows:
                for name, n in json.loads(row["counters"]).items():
                    totals[name] = totals.get(name, 0) + n
            return totals
        expected = ("late.orders.too_late", "events.deduplicated", "events.dead_lettered",
                    "events.event_time_attribute.missing",
                    "events.event_time_attribute.unparseable", "refresh.unknown_users",
                    "treatment_events.dead_lettered", "dead_letter.unknown sku",
                    "dead_letter.click without send")
        wait_for("counters of the duplicate, the attributes, the too-late order and the "
                 "unknown buyer", counters, lambda c: all(c.get(n, 0) >= 1 for n in expected))
        audit = query(f"SELECT * FROM {table}.streaming_health` WHERE kind = 'late_data' "
                      f"AND stream = 'orders'")
        assert sum(r["too_late"] for r in audit) >= 1
        assert all(r["seen"] == r["on_time"] + r["late"] + r["too_late"] for r in audit)

        # A catalogue change is picked up without a restart.
        row_a = next(r for r in latest if r["user_id"] == buyer_a)
        withdrawn = row_a["rec_part_1"]
        changed_at = _now()
        lines = open(os.path.join(world, "catalog.jsonl")).read().splitlines()
        with open(os.path.join(world, "catalog.jsonl"), "w") as handle:
            for line in lines:
                record = json.loads(line)
                if record["sku"] == withdrawn:
                    record["tags"] = list(record.get("tags") or []) + ["refurbished"]
                handle.write(json.dumps(record) + "\n")
        time.sleep(1.5)   # one --reference_refresh_seconds
        view = _event("E-A-AGAIN", buyer_a, "Viewed Product", skus[5])
        publish("events", view, event_time=view["event_time"]).result()
        fresh = wait_for(
            "buyer A refreshed after the catalogue change",
            lambda: query(f"SELECT * FROM {table}.recommendation_updates` "
                          f"WHERE user_id = @user AND generated_at > TIMESTAMP(@at)",
                          user=buyer_a, at=changed_at.isoformat()),
            lambda rows: len(rows) > 0)
        newest = max(fresh, key=lambda r: r["generated_at"])
        assert withdrawn not in [newest[f"rec_part_{i}"] for i in range(1, 5)]
    finally:
        stop.set()
        launched.result.cancel()


def test_reference_tables_in_bigquery_replaced_mid_run(emulators, world, tmp_path):
    """The job reads catalogue, users, fitment and history from BigQuery (--source bigquery);
    the catalogue table is replaced by a load job while it runs, and the next events are
    checked against the new version without a restart: a SKU the new table adds is accepted,
    one it drops is refused (dead letter ``unknown sku``) where it was accepted before."""
    from google.cloud import pubsub_v1

    from pipelines import streaming_refresh as job
    from transforms import bigquery
    from transforms.bigquery_io import load_inputs

    pubsub, emulator = emulators
    project, endpoint = emulator.project, f"http://{emulator.host}"
    publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    paths = create_streams(publisher, subscriber, pubsub.project, ("events", "treatments"),
                           prefix="bqref-")
    load_inputs(world, project, "reference", endpoint,
                tables=("catalog", "users", "fitment", "events"))
    rows = [json.loads(line) for line in open(os.path.join(world, "catalog.jsonl"))]
    dropped = next(r for r in rows if r["price"] >= 50)
    added = {**dropped, "sku": "BQREF-NEW"}
    os.makedirs(tmp_path / "replaced")
    with open(tmp_path / "replaced" / "catalog.jsonl", "w") as handle:
        for record in [r for r in rows if r["sku"] != dropped["sku"]] + [added]:
            handle.write(json.dumps(record) + "\n")
    other_skus = [r["sku"] for r in rows if r["sku"] != dropped["sku"]][:50]
    users = sorted(FileReference(world, DEFAULT_CONFIG, 3600, "").current().servable["user_id"])
    argv = [f"--events_subscription={paths['events'][1]}",
            f"--treatments_subscription={paths['treatments'][1]}",
            f"--streaming_dataset={project}.streaming_bqref", f"--project={project}",
            f"--bigquery_endpoint={endpoint}", "--source=bigquery",
            "--bigquery_dataset=reference", "--window_seconds=4", "--period_seconds=2",
            "--allowed_lateness_seconds=2", "--dedupe_ttl_seconds=60",
            "--reference_refresh_seconds=1", "--ranking_refresh=off", "--num_shards=1"]
    launched = job.launch(argv)
    client = bigquery.client(project)
    stop = threading.Event()

    def publish(topic, record):
        return publisher.publish(paths[topic][0], json.dumps(record).encode(),
                                 event_time=record["event_time"])

    def background():   # keeps both subscriptions busy (an idle pull waits 30 s locally)
        k = 0
        while not stop.is_set():
            k += 1
            publish("events", _event(f"BQ-BG-V{k}", users[k % len(users)], "Viewed Product",
                                     other_skus[k % len(other_skus)]))
            publish("treatments", {"event_id": f"BQ-BG-T{k}", "event_time": _iso(_now()),
                                   "user_id": users[k % len(users)], "treatment_id": "T01",
                                   "campaign_id": "C", "kind": "SENT"})
            time.sleep(0.3)

    def refused():
        found = client.query(f"SELECT record FROM `{project}.streaming_bqref."
                             f"streaming_dead_letter` WHERE step = 'CheckSkus'").result()
        return {json.loads(r["record"])["event_id"] for r in found}

    traffic = threading.Thread(target=background, daemon=True)
    traffic.start()
    try:
        publish("events", _event("BQ-1", users[0], "Viewed Product", dropped["sku"])).result()
        publish("events", _event("BQ-2", users[0], "Viewed Product", added["sku"])).result()
        wait_for("the SKU the first catalogue lacks refused", refused,
                 lambda ids: "BQ-2" in ids, timeout=120)
        load_inputs(str(tmp_path / "replaced"), project, "reference", endpoint,
                    tables=("catalog",))
        time.sleep(2.5)   # one --reference_refresh_seconds, and a margin
        publish("events", _event("BQ-3", users[1], "Viewed Product", added["sku"])).result()
        publish("events", _event("BQ-4", users[1], "Viewed Product", dropped["sku"])).result()
        ids = wait_for("the SKU the replaced catalogue drops refused", refused,
                       lambda ids: "BQ-4" in ids, timeout=120)
        assert "BQ-1" not in ids and "BQ-3" not in ids   # each was known to its version
    finally:
        stop.set()
        launched.result.cancel()
