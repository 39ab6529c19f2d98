"""Streaming refresh benchmark: freshness on the emulators, throughput of the windowed core.

    python bench/streaming.py                      # both parts, results in bench/results/streaming.json
    python bench/streaming.py --orders 300 --scenarios steady:2:1:on
    python bench/streaming.py --skip_throughput --preset demo \
        --scenarios sustained:2:2:on:1200          # 10 minutes of load: rate, memory, freshness
    python bench/streaming.py --skip_freshness     # throughput only (no emulators needed)

Freshness: the Pub/Sub emulator and bqemulator start, `pipelines.streaming_refresh`
runs on the DirectRunner in its own process, started as a user starts it
(60-second windows every 2 s; its CPU and memory are that process's, read from
/proc; the orders wait until it has written its first health counters),
background traffic (product
views and e-mail sends, as a live shop has) keeps both subscriptions busy (an
idle subscription's pull waits 30 s on the DirectRunner), and ``--orders``
order events, each for a different user, are published at a scenario's rate
with their ``event_time`` attribute. Scenarios: ``steady`` (2 orders/s, 2
background events/s), the same with ranking-change refreshes off (only the
order path), and ``busy`` (4 orders/s, 10 background events/s: the field's
0.8-1.3 million raw events a day), which shows where the DirectRunner
saturates. Each order also changes its vehicle's ranking more often than in
production (a 2-second period compresses an hour), so ranking-change
refreshes weigh far more here than they would live. The freshness of one order is
the wall time from its publish call returning to the first
``recommendation_updates`` row of its user with reason ``order`` being
returned by a query (polled every 0.25 s); p50, p95 and max are reported, and
the same less each order's wait for the end of its refresh period in event time
(``seconds_after_period_end_*``): the part processing can shorten, where the
wait itself (half a period on average) only a shorter period can.

Throughput: the same windowed composites the job runs (rolling popularity, the
bandit state, both late-data audits) over bounded, timestamped input with one
SDK worker (FnApiRunner), so the DirectRunner's Pub/Sub source (ten messages a
pull) is not what is measured; reported as marginal input events per second
(the same event-time span run with N and 2N events separates the per-event
cost from the per-window one), with the production windows (7 days every
hour: each element in 168 windows) and with one-day windows (24). Each is run
with the SDK worker in a subprocess started as Dataflow starts its Python
harness (``sdk_worker_main``; state cache off, Beam's default), whose CPU is
reported apart from the runner's, with the same and a 100 MB state cache, and
in-process as before (``--throughput_modes``).
Parsing and deduplication ("ingest") run on the bundle-based DirectRunner.

Reference delivery (``--reference_delivery_cost``): the production-window core
run with the reference version polled by each worker (the local seam) and
delivered as Dataflow's windowed side input (a bounded PeriodicImpulse every
``--reference_delivery_refresh_seconds`` over the run's event-time span, read
by ``SegmentWeights`` per order line and ``PopularityAtWindowEnd`` per window),
N and 2N events each, the two deliveries alternating.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from typing import Dict, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import apache_beam as beam  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from apache_beam.io.gcp.pubsub import PubsubMessage  # noqa: E402
from apache_beam.coders import PickleCoder  # noqa: E402
from apache_beam.options.pipeline_options import PipelineOptions  # noqa: E402
from apache_beam.transforms.timeutil import TimeDomain  # noqa: E402
from apache_beam.transforms.userstate import (ReadModifyWriteStateSpec, TimerSpec,  # noqa: E402
                                              on_timer)

from models import streaming as model  # noqa: E402
from models.bandit import BanditConfig  # noqa: E402
from models.config import DEFAULT_CONFIG  # noqa: E402
from models.world import WorldSpec, generate, write_world  # noqa: E402
from transforms.streaming import (DropDuplicates, FileReference, LateDataAudit,  # noqa: E402
                                  ParseMessages, StreamingBandit, WindowedPopularity,
                                  treatment_counts)

RESULTS = os.path.join(ROOT, "bench", "results", "streaming.json")


def _now_iso() -> str:
    return pd.Timestamp.now(tz="UTC").strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _world(directory: str, preset: str) -> str:
    if not os.path.exists(os.path.join(directory, "world.json")):
        write_world(generate(WorldSpec.preset(preset), 7), directory, "jsonl", 0)
    return directory


# --- freshness ------------------------------------------------------------------------------------

def _proc_rss_mib(pid: int) -> float:
    """Resident memory of one process (the job's), from /proc."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:      # the job has stopped
        pass
    return float("nan")


def _proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process and its reaped children, from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    # Fields after the command: state is [0], utime [11], stime [12], cutime [13], cstime [14].
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def _start_job(argv, job_root: str, log_path: str) -> subprocess.Popen:
    """The streaming job as its own process, started as a user starts it (``python -m``).

    The harness (publishers, the BigQuery poller, the samplers) runs in this
    process; with the job in-process they shared its interpreter lock, and a
    py-spy profile put about a fifth of the process's samples in the harness.
    ``job_root`` is the checkout whose job runs (another worktree, to compare
    two versions of the job under the same harness in the same hour).
    """
    env = {**os.environ, "PYTHONPATH": job_root}
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "pipelines.streaming_refresh", *argv],
                                cwd=job_root, env=env, stdout=log, stderr=subprocess.STDOUT)


def _stop_job(job: subprocess.Popen) -> None:
    job.terminate()
    try:
        job.wait(timeout=20)
    except subprocess.TimeoutExpired:
        job.kill()
        job.wait()


def _wait_until_live(client, project: str, job: subprocess.Popen, timeout: float) -> float:
    """Seconds until the job writes its first health counters (it is reading both streams)."""
    started = time.monotonic()
    sql = f"SELECT COUNT(*) AS n FROM `{project}.bench.streaming_health`"
    while time.monotonic() - started < timeout:
        if job.poll() is not None:
            raise SystemExit(f"the streaming job exited with {job.returncode} before it was live")
        try:
            if next(iter(client.query(sql).result()))["n"]:
                return time.monotonic() - started
        except Exception:  # noqa: BLE001 (tables not created yet, or the emulator busy)
            pass
        time.sleep(0.5)
    raise SystemExit(f"the streaming job wrote no health counters in {timeout:.0f} s")


def freshness(args, rate: float, traffic: float, ranking: str, orders: int,
              period_seconds: int) -> Dict:
    from google.cloud import pubsub_v1

    from tests.emulators import bigquery_emulator, create_streams, pubsub_emulator
    from transforms import bigquery

    world = _world(os.path.join(ROOT, "bench", "work", f"streaming_{args.preset}_world"),
                   args.preset)
    servable = FileReference(world, DEFAULT_CONFIG, 3600, "events").current().servable
    ids = servable.dropna(subset=["make", "model", "year"])["user_id"].tolist()
    if len(ids) < orders + 300:
        raise SystemExit(f"--preset {args.preset} has {len(ids)} servable users; "
                         f"{orders} orders need {orders + 300} (use --preset demo)")
    buyers, browsers = ids[:orders], ids[orders:orders + 300]
    catalog = pd.read_json(os.path.join(world, "catalog.jsonl"), lines=True)
    skus = catalog.loc[catalog["price"] >= 50, "sku"].tolist()
    rng = np.random.default_rng(7)
    with pubsub_emulator() as ps, bigquery_emulator() as bqe:
        os.environ["PUBSUB_EMULATOR_HOST"] = ps.host
        publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
        paths = create_streams(publisher, subscriber, ps.project, ("events", "treatments"),
                               prefix="bench-")
        argv = [f"--events_subscription={paths['events'][1]}",
                f"--treatments_subscription={paths['treatments'][1]}",
                f"--streaming_dataset={bqe.project}.bench", f"--project={bqe.project}",
                f"--bigquery_endpoint=http://{bqe.host}", f"--input_dir={world}",
                f"--window_seconds={args.window_seconds}",
                f"--period_seconds={period_seconds}",
                "--allowed_lateness_seconds=2", "--dedupe_ttl_seconds=120",
                "--reference_refresh_seconds=30", "--insert_batch_size=100",
                f"--ranking_refresh={ranking}",
                f"--num_shards={args.num_shards}"]
        load_before = list(os.getloadavg())
        log_path = os.path.join(ROOT, "bench", "work", "streaming_job.log")
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        started = time.monotonic()
        launched = _start_job(argv, args.job_root, log_path)
        client = bigquery.client(bqe.project, f"http://{bqe.host}")
        stop = threading.Event()

        background_sent = [0]

        def background():
            """Views and sends at --traffic per second each: a live shop never idles.

            Paced by a schedule (not a fixed sleep after each publish), so the
            rate published is the rate asked for, also at 10x the field's.
            """
            k, due = 0, time.monotonic()
            while not stop.is_set():
                k += 1
                user = browsers[k % len(browsers)]
                view = {"event_id": f"BV{k}", "event_time": _now_iso(), "user_id": user,
                        "event_name": "Viewed Product", "sku": skus[k % len(skus)],
                        "quantity": 1, "price": 100.0}
                send = {"event_id": f"BT{k}", "event_time": _now_iso(), "user_id": user,
                        "treatment_id": f"T{k % 24:02d}", "campaign_id": "BENCH",
                        "kind": "SENT"}
                for topic, record in ((paths["events"][0], view),
                                      (paths["treatments"][0], send)):
                    publisher.publish(topic, json.dumps(record).encode(),
                                      event_time=record["event_time"])
                background_sent[0] += 2
                due += 1.0 / traffic
                time.sleep(max(0.0, due - time.monotonic()))

        memory = []     # (seconds since launch, RSS MiB)

        def sample_memory():
            while not stop.is_set():
                memory.append((round(time.monotonic() - started, 1),
                               round(_proc_rss_mib(launched.pid), 1)))
                stop.wait(5.0)

        threading.Thread(target=background, name="background-traffic", daemon=True).start()
        threading.Thread(target=sample_memory, name="memory", daemon=True).start()
        live_after = _wait_until_live(client, bqe.project, launched, args.live_timeout)
        time.sleep(args.warmup)             # first windows closed
        published: Dict[str, float] = {}
        seen: Dict[str, float] = {}
        period_wait: Dict[str, float] = {}   # seconds from the order's time to its period's end

        def poll():
            sql = (f"SELECT DISTINCT user_id FROM `{bqe.project}.bench.recommendation_updates` "
                   f"WHERE reason LIKE '%order%'")
            while not stop.is_set():
                try:
                    rows = client.query(sql).result()
                    at = time.monotonic()
                    for row in rows:
                        seen.setdefault(row["user_id"], at)
                except Exception as err:  # noqa: BLE001 (the emulator may be busy; poll again)
                    print(f"poll failed: {err}", file=sys.stderr)
                time.sleep(0.25)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        publishing_started = due = time.monotonic()
        background_before = background_sent[0]
        for i, user in enumerate(buyers):
            event_time = _now_iso()
            record = {"event_id": f"BO{i}", "event_time": event_time, "user_id": user,
                      "event_name": "Placed Order", "sku": skus[int(rng.integers(len(skus)))],
                      "quantity": 1, "price": 120.0, "order_id": f"BO-{i}"}
            publisher.publish(paths["events"][0], json.dumps(record).encode(),
                              event_time=event_time).result()
            published[user] = time.monotonic()
            # The order's refresh period ends at the next multiple of the period (event time).
            at = pd.Timestamp(event_time).value / 1e9
            period_wait[user] = (at // period_seconds + 1) * period_seconds - at
            due += 1.0 / rate
            time.sleep(max(0.0, due - time.monotonic()))
        publishing_seconds = time.monotonic() - publishing_started
        background_published = background_sent[0] - background_before
        deadline = time.monotonic() + args.drain_seconds
        while time.monotonic() < deadline and not set(buyers) <= set(seen):
            time.sleep(0.5)
        stop.set()
        job_cpu = _proc_cpu_seconds(launched.pid)
        wall_seconds = time.monotonic() - started
        _stop_job(launched)
        latencies = sorted(seen[u] - published[u] for u in buyers if u in seen)
        # What the job took once the order's refresh period had ended in event time: the
        # latency less the wait for the period's end, which no processing can shorten.
        after_end = sorted(seen[u] - published[u] - period_wait[u] for u in buyers if u in seen)
        per_minute = {}
        for user in buyers:
            if user in seen:
                minute = int((published[user] - publishing_started) // 60)
                per_minute.setdefault(minute, []).append(seen[user] - published[user])
        health = [dict(r) for r in client.query(
            f"SELECT counters FROM `{bqe.project}.bench.streaming_health` "
            f"WHERE kind = 'counters'").result()]
    totals: Dict[str, int] = {}
    for row in health:
        for name, n in json.loads(row["counters"]).items():
            totals[name] = totals.get(name, 0) + n
    return {
        "orders_published": len(buyers), "orders_refreshed": len(latencies),
        "orders_per_second": rate, "background_events_per_second": 2 * traffic,
        "num_shards": args.num_shards, "ranking_refresh": ranking,
        "window_seconds": args.window_seconds, "period_seconds": period_seconds,
        "seconds_p50": round(float(np.percentile(latencies, 50)), 2) if latencies else None,
        "seconds_p95": round(float(np.percentile(latencies, 95)), 2) if latencies else None,
        "seconds_max": round(max(latencies), 2) if latencies else None,
        "seconds_mean": round(statistics.fmean(latencies), 2) if latencies else None,
        "target_p50_seconds": 5, "target_p95_seconds": 8, "run_seconds": round(wall_seconds, 1),
        "seconds_after_period_end_p50": round(float(np.percentile(after_end, 50)), 2)
        if after_end else None,
        "seconds_after_period_end_p95": round(float(np.percentile(after_end, 95)), 2)
        if after_end else None,
        # The job's own process (not the harness, not the emulators): its CPU beside the
        # wall time from its start, and the machine's load around the run (shared, noisy).
        "cpu_seconds": round(job_cpu, 1),
        "job": "own process (python -m pipelines.streaming_refresh)",
        "job_commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=args.job_root,
                                     capture_output=True, text=True).stdout.strip(),
        "live_after_seconds": round(live_after, 1),
        "loadavg_before_after": [load_before, list(os.getloadavg())],
        "publishing_seconds": round(publishing_seconds, 1),
        "events_published_per_second_measured": round(
            (len(buyers) + background_published) / max(publishing_seconds, 1e-9), 1),
        "stream_events_read_per_second": round(
            (totals.get("events.read", 0) + totals.get("treatment_events.read", 0))
            / max(time.monotonic() - started, 1e-9), 2),
        "seconds_p50_per_minute": [round(float(np.percentile(v, 50)), 2)
                                   for _, v in sorted(per_minute.items())],
        "rss_mib_samples": memory,
        "rss_mib_first_last_max": [memory[0][1], memory[-1][1], max(m for _, m in memory)]
        if memory else None,
        "counters_sum": dict(sorted(totals.items())),
    }


# --- throughput -------------------------------------------------------------------------------------

def _records(n_orders: int, n_treatments: int, days: float, world: str,
             pool: Optional[Tuple[int, int]] = None):
    """Timestamped order and treatment records over `days`, users and SKUs from the world.

    ``pool = (users, skus)`` draws orders from that many of the world's users
    and SKUs only, so the window's cells (level x segment x SKU) are all
    present already at N events and 2N adds none (see `throughput`).
    """
    rng = np.random.default_rng(11)
    users = pd.read_json(os.path.join(world, "users.jsonl"), lines=True)["user_id"].to_numpy()
    skus = pd.read_json(os.path.join(world, "catalog.jsonl"), lines=True)["sku"].to_numpy()
    if pool is not None:
        users, skus = users[:pool[0]], skus[:pool[1]]
    start = pd.Timestamp("2026-03-01", tz="UTC").value // 1000
    span = int(days * 86_400 * 1_000_000)
    orders = []
    for i, at in enumerate(np.sort(rng.integers(start, start + span, n_orders))):
        orders.append({"event_id": f"O{i}", "user_id": str(users[i % len(users)]),
                       "event_name": ("Placed Order", "Ordered Product")[i % 2],
                       "sku": str(skus[rng.integers(len(skus))]), "order_id": f"ORD{i // 2}",
                       "quantity": 1, "price": 99.0, "event_time_us": int(at)})
    kinds = ("SENT", "DELIVERED", "VIEWED", "CLICKED", "DELIVERY_FAILED")
    treatments = [{"event_id": f"T{i}", "user_id": str(users[i % len(users)]),
                   "treatment_id": f"T{i % 24:02d}", "campaign_id": "C",
                   "kind": kinds[int(rng.integers(5))], "reason": None, "event_time_us": int(at)}
                  for i, at in enumerate(np.sort(rng.integers(start, start + span,
                                                              n_treatments)))]
    return orders, treatments


# How the windowed core's SDK worker runs (``--direct_running_mode`` of the FnApiRunner).
# ``subprocess_sdk`` starts the worker through ``sdk_worker_main``, the entry point Dataflow's
# Python SDK harness uses, which sizes its state cache from ``--max_cache_memory_usage_mb``
# (Beam 2.77's default 0: no cache, as on Dataflow unless a job sets it); its CPU is the
# reaped child's rusage, the runner's (bundles, the GroupByKey's windowing and triggers, which
# Dataflow runs in its backend) this process's. ``in_memory`` runs the worker in this process
# with the runner's hard-coded 100 MB cache (``worker_handlers.STATE_CACHE_SIZE_MB``), which
# sizes every state value it caches (objsize walking the loaded modules): the figure before.
THROUGHPUT_MODES = {
    "subprocess_sdk": (["--direct_running_mode=multi_processing"],
                       "SDK worker in a subprocess via sdk_worker_main, state cache 0 MB "
                       "(--max_cache_memory_usage_mb default, as Dataflow's harness)"),
    "subprocess_sdk_cache_100mb": (["--direct_running_mode=multi_processing",
                                    "--max_cache_memory_usage_mb=100"],
                                   "the same with a 100 MB state cache (the in-process "
                                   "runner's size): what caching state costs per event"),
    "in_memory": (["--direct_running_mode=in_memory"],
                  "SDK worker inside the runner's process, 100 MB state cache hard-coded "
                  "(the figure reported before)"),
}


def _cpu(usage) -> float:
    return usage.ru_utime + usage.ru_stime


def _timed(build, runner: str = "FnApiRunner", mode: str = "in_memory") -> Dict[str, float]:
    """Wall and CPU seconds of one run; with a subprocess worker, its CPU and the runner's apart."""
    flags, _ = THROUGHPUT_MODES[mode]
    options = PipelineOptions([f"--runner={runner}", "--direct_num_workers=1", *flags])
    before = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with beam.Pipeline(options=options) as p:
        build(p)
    wall = time.perf_counter() - started
    runner_cpu = _cpu(resource.getrusage(resource.RUSAGE_SELF)) - _cpu(before)
    # The worker subprocess is reaped when the pipeline finishes (the runner joins it).
    sdk_cpu = _cpu(resource.getrusage(resource.RUSAGE_CHILDREN)) - _cpu(children)
    out = {"wall_seconds": round(wall, 2), "cpu_seconds": round(runner_cpu + sdk_cpu, 2)}
    if mode != "in_memory":
        out.update(sdk_cpu_seconds=round(sdk_cpu, 2), runner_cpu_seconds=round(runner_cpu, 2))
    return out


def _marginal(first: Dict[str, float], second: Dict[str, float], n: int) -> Dict[str, float]:
    """Events/s of one more event and the fixed seconds, per measure (N and 2N events)."""
    row = {}
    for kind in ("cpu_seconds", "sdk_cpu_seconds", "runner_cpu_seconds", "wall_seconds"):
        if kind not in first:
            continue
        per_event = max(second[kind] - first[kind], 1e-9) / n
        name = kind[:-len("_seconds")]
        row[f"events_per_second_marginal_{name}"] = round(1 / per_event, 1)
        row[f"fixed_{kind}"] = round(first[kind] - n * per_event, 2)
    return row


def _core(orders, treatments, spec, reference, versions=None):
    """The windowed composites of the job over bounded, timestamped records.

    ``versions``: p → the reference's versions PCollection (side-input delivery), or None.
    """
    def build(p):
        stamped_orders = p | "Orders" >> beam.Create(
            [beam.window.TimestampedValue(r, r["event_time_us"] / 1e6) for r in orders]
        ).with_output_types(dict)
        stamped_treatments = p | "Treatments" >> beam.Create(
            [beam.window.TimestampedValue(r, r["event_time_us"] / 1e6) for r in treatments]
        ).with_output_types(dict)
        stamped_orders | "Popularity" >> WindowedPopularity(
            spec, reference, DEFAULT_CONFIG, versions(p) if versions is not None else None)
        stamped_orders | "AuditOrders" >> LateDataAudit("orders", spec)
        stamped_treatments | "Bandit" >> StreamingBandit(BanditConfig(draws=2_000), spec)
        (stamped_treatments | beam.Map(treatment_counts)
         | "AuditTreatments" >> LateDataAudit("treatment_events", spec))
    return build


def _windows_with_data(records, spec) -> int:
    return len({w for r in records for w in spec.windows_of(r["event_time_us"])})


class _KeptFlagFn(beam.DoFn):
    """Per element: one keyed state read, one write and one event-time timer set (what
    `FirstOrderLineFn` and `DropDuplicates` do per event), and nothing else."""

    def __init__(self, timer: bool = True):
        self._timer = timer

    FLAG = ReadModifyWriteStateSpec("flag", PickleCoder())
    EXPIRY = TimerSpec("expiry", TimeDomain.WATERMARK)

    def process(self, element, timestamp=beam.DoFn.TimestampParam,
                flag=beam.DoFn.StateParam(FLAG), expiry=beam.DoFn.TimerParam(EXPIRY)):
        if flag.read() is None:
            flag.write(1)
            if self._timer:
                expiry.set(timestamp + 60)
        return ()

    @on_timer(EXPIRY)
    def expire(self, flag=beam.DoFn.StateParam(FLAG)):
        flag.clear()


def sdk_per_element(n: int, modes) -> Dict:
    """SDK CPU per element of Beam's own machinery, measured in isolation (N and 2N elements).

    ``plain``: a keyed element through one ParDo that does nothing (the
    per-element floor of a fused step); ``keyed_state``: the same through a
    stateful ParDo reading and writing one value and setting one timer per
    element (every key new, as every order line and event id is), and without
    the timer (``keyed_state_no_timer``). With the
    state cache off (Dataflow's default) each read is a Fn API state request
    to the runner; the difference is what keyed state costs per element.
    """
    def build(kind: str, count: int):
        def pipeline(p):
            keyed = (p | beam.Create([(f"k{i}", i) for i in range(count)])
                     | beam.Map(lambda kv: beam.window.TimestampedValue(kv, kv[1])
                                ).with_output_types(Tuple[str, int]))
            if kind != "plain":
                keyed | beam.ParDo(_KeptFlagFn(timer=kind == "keyed_state"))
            else:
                keyed | beam.ParDo(lambda kv: ())
        return pipeline

    out = {"elements_n": n}
    for mode in modes:
        if mode == "in_memory":
            continue
        for kind in ("plain", "keyed_state_no_timer", "keyed_state"):
            first = _timed(build(kind, n), mode=mode)
            second = _timed(build(kind, 2 * n), mode=mode)
            per = {k: round((second[k] - first[k]) / n * 1e6, 1)
                   for k in ("sdk_cpu_seconds", "runner_cpu_seconds")}
            out[f"{mode}/{kind}"] = {
                "run_n": first, "run_2n": second,
                "sdk_cpu_us_per_element": per["sdk_cpu_seconds"],
                "runner_cpu_us_per_element": per["runner_cpu_seconds"],
                "loadavg": list(os.getloadavg())}
            print("sdk_per_element", mode, kind, json.dumps(out[f"{mode}/{kind}"]), flush=True)
    return out


def _cells_of(orders, reference, config=DEFAULT_CONFIG) -> int:
    """Distinct (level, segment, sku) cells the orders' lines make (`SegmentWeights`' keys)."""
    from models import stream_popularity as cells
    segments = cells.segments_by_user(reference.current().users, config)
    return len({key for r in orders for key, _ in cells.line_cells(
        segments.get(r["user_id"]), r["sku"], r["event_time_us"], 1, config)})


def saturated_cells(args, world: str, reference, spec) -> Dict:
    """The production-window core when N events already fill every cell 2N events fill.

    In the default runs the 2N events bring new (level, segment, sku) cells,
    so the marginal cost holds each window's per-cell work, fired in every
    one of the 168 windows an element lies in, on top of the per-event work.
    In a shop's stream a window's cells are bounded by catalogue x segments
    and fill within hours; past that, more events only add to existing cells.
    Here orders come from ``--saturated_pool`` users and SKUs, so both runs
    have the same cells and the marginal is the per-event work alone (the
    SDK worker in its own process, as Dataflow runs it).
    """
    n_users, n_skus = (int(x) for x in args.saturated_pool.split(":"))
    n_orders, n_treatments = args.throughput_orders, args.throughput_treatments
    small = _records(n_orders, n_treatments, args.throughput_days, world, (n_users, n_skus))
    large = _records(2 * n_orders, 2 * n_treatments, args.throughput_days, world,
                     (n_users, n_skus))
    n = n_orders + n_treatments
    load = list(os.getloadavg())
    first = _timed(_core(*small, spec, reference), mode="subprocess_sdk")
    second = _timed(_core(*large, spec, reference), mode="subprocess_sdk")
    row = {"pool_users_skus": [n_users, n_skus],
           "cells_n_2n": [_cells_of(small[0], reference), _cells_of(large[0], reference)],
           "mode": "subprocess_sdk", "run_n": first, "run_2n": second,
           **_marginal(first, second, n),
           "loadavg_before": load, "loadavg_after": list(os.getloadavg())}
    print("saturated_cells", json.dumps(row), flush=True)
    return row


def throughput(args) -> Dict:
    """Marginal events/s per core: the same span run with N and 2N events.

    Bounded input fires every window holding data at the end (each element's
    168 with the production windows), where a live stream fires one per
    period; so the fixed cost (graph, one popularity and one bandit state per
    window) is separated from the per-event cost by running the same event-time
    span twice, with twice the events the second time:
    per-event seconds = (T(2N) - T(N)) / N; fixed = T(N) - N * per-event.
    """
    world = _world(os.path.join(ROOT, "bench", "work", f"streaming_{args.preset}_world"),
                   args.preset)
    # A subprocess worker imports the job's modules from here, whatever the caller's cwd.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    reference = FileReference(world, DEFAULT_CONFIG, 3600, "events")
    reference.current()   # loaded once, outside the timing (a subprocess worker loads its own)
    n_orders, n_treatments = args.throughput_orders, args.throughput_treatments
    small = _records(n_orders, n_treatments, args.throughput_days, world)
    large = _records(2 * n_orders, 2 * n_treatments, args.throughput_days, world)
    n = n_orders + n_treatments
    modes = [m for m in args.throughput_modes.split(",") if m]
    out = {"events_n": n, "order_share": round(n_orders / n, 3),
           "event_time_span_days": args.throughput_days,
           "runner": "FnApiRunner, one SDK worker (one core)",
           "modes": {m: THROUGHPUT_MODES[m][1] for m in modes},
           "measures": {
               "cpu": "runner + SDK worker CPU seconds (the whole local job)",
               "sdk_cpu": "the SDK worker subprocess alone: what a Dataflow Python worker "
                          "runs (the job's DoFns and CombineFns, coders, state and timer calls)",
               "runner_cpu": "the FnApiRunner's process: bundle scheduling and the "
                             "GroupByKeys' windowing and triggers (Dataflow's backend)",
               "wall": "wall seconds (the two processes overlap)"},
           "windows": {}}
    specs = (("production_7d_every_1h", model.WindowSpec.of_seconds(
        7 * 86_400, 3_600, 6 * 3_600)), ("one_day_every_1h", model.WindowSpec.of_seconds(
            86_400, 3_600, 6 * 3_600)))
    for name, spec in specs:
        out["windows"][name] = {"windows_per_element": spec.overlap,
                                "windows_fired": _windows_with_data(small[0] + small[1], spec)}
        for mode in modes:
            load = list(os.getloadavg())
            first = _timed(_core(*small, spec, reference), mode=mode)
            second = _timed(_core(*large, spec, reference), mode=mode)
            row = {"run_n": first, "run_2n": second, **_marginal(first, second, n),
                   "events_per_second_whole_run_n": round(n / first["wall_seconds"], 1),
                   "loadavg_before": load, "loadavg_after": list(os.getloadavg())}
            out["windows"][name][mode] = row
            print(name, mode, json.dumps(row), flush=True)
    out["windows"]["production_7d_every_1h"]["saturated_cells"] = saturated_cells(
        args, world, reference, specs[0][1])
    orders = small[0]
    messages = [PubsubMessage(json.dumps({
        "event_id": r["event_id"] if i % 20 else f"O{i - 1}",   # 5% redelivered copies
        "event_time": pd.Timestamp(r["event_time_us"], unit="us", tz="UTC").isoformat(),
        "user_id": r["user_id"], "event_name": r["event_name"], "sku": r["sku"],
        "order_id": r["order_id"], "quantity": 1, "price": 99.0}).encode(),
        {"event_time": "x"}) for i, r in enumerate(orders)]

    def ingest(p):
        parsed = p | beam.Create(messages) | ParseMessages("events")
        parsed.rows | DropDuplicates("events", pd.Timedelta(days=1))
    timing = _timed(ingest, "BundleBasedDirectRunner")
    timing["runner"] = "BundleBasedDirectRunner (the local streaming runner), bounded input"
    timing["messages"] = len(messages)
    timing["messages_per_second"] = round(len(messages) / timing["wall_seconds"], 1)
    out["ingest_parse_and_dedupe"] = timing
    out["sdk_per_element_isolated"] = sdk_per_element(args.isolated_elements, modes)
    return out


def reference_delivery(args) -> Dict:
    """The production-window core with the reference version polled vs as a side input.

    Same records, same mode; the side-input run adds the impulses (one per
    refresh interval over the span the windows cover, each a fingerprint check
    of the reference files) and the windowed side-input reads of the two
    popularity steps. Runs alternate (poll N, side N, poll 2N, side 2N, twice)
    so the machine's noise falls on both alike; the best of each pair is kept.
    """
    from apache_beam.utils.timestamp import Timestamp
    from transforms.streaming import ReferenceVersions
    from transforms.streaming.reference import SIDE_INPUT
    world = _world(os.path.join(ROOT, "bench", "work", f"streaming_{args.preset}_world"),
                   args.preset)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    refresh = args.reference_delivery_refresh_seconds
    polled = FileReference(world, DEFAULT_CONFIG, 3600, "events")
    side = FileReference(world, DEFAULT_CONFIG, refresh, "events")
    side.delivery = SIDE_INPUT
    polled.current(), side.current()
    spec = model.WindowSpec.of_seconds(7 * 86_400, 3_600, 6 * 3_600)
    n_orders, n_treatments = args.throughput_orders, args.throughput_treatments
    small = _records(n_orders, n_treatments, args.throughput_days, world)
    large = _records(2 * n_orders, 2 * n_treatments, args.throughput_days, world)
    n = n_orders + n_treatments
    times = [r["event_time_us"] for r in large[0] + large[1]]
    first = Timestamp(micros=min(times)) - refresh
    last = Timestamp(micros=max(times)) + spec.size.total_seconds() + refresh
    impulses = int((last - first).micros // (refresh * 1_000_000))

    def versions(p):
        return p | "ReferenceVersions" >> ReferenceVersions(side, first, last)
    mode = args.reference_delivery_mode
    runs = {"poll": {"n": [], "2n": []}, "side_input": {"n": [], "2n": []}}
    load = list(os.getloadavg())
    for _ in range(args.reference_delivery_repeats):
        for size, records in (("n", small), ("2n", large)):
            for name, build in (("poll", _core(*records, spec, polled)),
                                ("side_input", _core(*records, spec, side, versions))):
                timing = _timed(build, mode=mode)
                timing["loadavg_after"] = list(os.getloadavg())
                runs[name][size].append(timing)
                print("reference_delivery", name, size, json.dumps(timing), flush=True)
    out = {"measured_at": _now_iso(), "mode": mode, "mode_means": THROUGHPUT_MODES[mode][1],
           "windows": "production: 7 days every hour, 6 h lateness",
           "events_n": n, "event_time_span_days": args.throughput_days,
           "side_input_refresh_seconds": refresh, "impulses_per_run": impulses,
           "readers_measured": ["RollingPopularity/SegmentWeights (per order line)",
                                "RollingPopularity/PopularityAtWindowEnd (per window)"],
           "loadavg_before": load, "runs": runs}
    for name in runs:
        best = {size: min(runs[name][size], key=lambda t: t["cpu_seconds"]) for size in runs[name]}
        row = _marginal(best["n"], best["2n"], n)
        for kind in ("cpu", "sdk_cpu", "runner_cpu", "wall"):   # 2N no slower than N: noise
            if kind + "_seconds" in best["n"] and (
                    best["2n"][kind + "_seconds"] <= best["n"][kind + "_seconds"]):
                row[f"events_per_second_marginal_{kind}"] = None
                row[f"fixed_{kind}_seconds"] = None
        out[name] = {**row, "best_run_n": best["n"], "best_run_2n": best["2n"]}
    for kind in ("cpu_seconds", "wall_seconds", "sdk_cpu_seconds"):
        if kind in out["poll"]["best_run_n"]:
            out[f"side_input_minus_poll_{kind}_run_n"] = round(
                out["side_input"]["best_run_n"][kind] - out["poll"]["best_run_n"][kind], 2)
            out[f"side_input_minus_poll_{kind}_run_2n"] = round(
                out["side_input"]["best_run_2n"][kind] - out["poll"]["best_run_2n"][kind], 2)
    out["loadavg_after"] = list(os.getloadavg())
    return out


def bundle_overhead(args) -> Dict:
    """CPU milliseconds per bundle and step on the bundle-based DirectRunner, per kind of step.

    A TestStream releases ``--bundle_keys`` elements one bundle each (each with
    its own key and watermark step, as a live stream's pulls and keyed steps
    produce them) into a stateful step and then five steps of one kind; the CPU
    of a run without those five steps is subtracted
    (`bench.streaming_bundles.cpu_per_bundle_step`, which times the run
    without the runner-API round trip, as the job runs locally). Kinds: Beam's ``Map``, the
    same function as `transforms.signatures.MapFn` (signatures read once per
    class), Beam's ``WindowInto``, and the stateful step itself with and without
    `CachedSignatures`.
    """
    from apache_beam.coders import PickleCoder
    from apache_beam.transforms.userstate import ReadModifyWriteStateSpec

    from bench.streaming_bundles import cpu_per_bundle_step
    from transforms.signatures import CachedSignatures, MapFn

    class PerKeyFn(beam.DoFn):
        SEEN = ReadModifyWriteStateSpec("seen", PickleCoder())

        def process(self, element, seen=beam.DoFn.StateParam(SEEN)):
            seen.write(1)
            yield element

    class CachedPerKeyFn(CachedSignatures, PerKeyFn):
        pass

    def same(x):
        return x

    steps = {"none": lambda pc, i: pc,
             "beam_map": lambda pc, i: pc | f"S{i}" >> beam.Map(same),
             "map_fn_cached": lambda pc, i: pc | f"S{i}" >> beam.ParDo(MapFn(same)),
             "beam_window_into": lambda pc, i: pc | f"S{i}" >> beam.WindowInto(
                 beam.window.GlobalWindows()),
             "stateful_plain": lambda pc, i: pc | f"S{i}" >> beam.ParDo(PerKeyFn()),
             "stateful_cached": lambda pc, i: pc | f"S{i}" >> beam.ParDo(CachedPerKeyFn())}
    return cpu_per_bundle_step(steps, CachedPerKeyFn, args.bundle_keys)


def state_sizes(args) -> Dict:
    """Largest accumulator and state cell of the windowed popularity at 1x and 10x the orders.

    One production window (7 days) of orders over the same users and
    catalogue, fed through the job's own pure functions: the per-window
    accumulator as a map (`WindowCellsFn`: one cell per (level, segment, sku)),
    what ``CellsPerWindow`` holds instead (`MergeCellsFn` fed the hourly
    periods' `CellBlock`s, compacting as it goes) and emits (one block), one
    per-key accumulator (`DecayedCountFn`: a `Decayed`), one order-line state
    cell (`FirstOrderLineFn`: a `LineState`), and for comparison the map of
    every distinct order line the earlier `OrderLinesCombineFn` carried.
    Sizes are pickled bytes (what Beam's PickleCoder stores).
    """
    import pickle
    from models import stream_popularity as cells
    from transforms.streaming.popularity import MergeCellsFn, WindowCellsFn
    world = _world(os.path.join(ROOT, "bench", "work", f"streaming_{args.preset}_world"),
                   args.preset)
    reference = FileReference(world, DEFAULT_CONFIG, 3600, "events").current()
    segments = cells.segments_by_user(reference.users, DEFAULT_CONFIG)
    half_life = DEFAULT_CONFIG.scoring.half_life_days
    distinct_segments = len({seg for levels in segments.values() for seg in levels})
    out = {"measured_at": _now_iso(), "commit": subprocess.run(
               ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
           "key_bound": len(reference.arrays.sku) * distinct_segments,
           "key_bound_is": "catalogue SKUs x (level, segment) pairs of the users"}
    for factor in (1, 10, 100):
        orders, _ = _records(args.state_orders * factor, 0, 7.0, world)
        combine = WindowCellsFn(half_life)
        acc = combine.create_accumulator()
        lines = {}
        for r in orders:
            model.add_order(lines, r)
        periods: Dict[int, dict] = {}
        for (order_id, sku), (at, event_id, user, _) in lines.items():
            for cell in cells.line_cells(segments.get(user), sku, at, 1, DEFAULT_CONFIG):
                acc = combine.add_input(acc, cell)
                hour = at // 3_600_000_000
                periods[hour] = combine.add_input(periods.get(hour, {}), cell)
        # What CellsPerWindow holds for this window: its hourly periods' blocks, and its output.
        blocks = [combine.extract_output(p) for _, p in sorted(periods.items())]
        merge = MergeCellsFn(half_life)
        held = merge.create_accumulator()
        for block in blocks:
            held = merge.add_input(held, block)
        window_block = merge.extract_output(held)
        largest_key = max(acc, key=lambda k: acc[k].orders)
        out[f"{factor}x"] = {
            "order_events": len(orders), "order_lines": len(lines),
            "window_accumulator_cells": len(acc),
            "window_accumulator_bytes": len(pickle.dumps(acc)),
            "window_periods": len(blocks),
            "window_period_blocks_rows_uncompacted": sum(len(b.keys) for b in blocks),
            "window_accumulator_blocks_held": len(held),
            "window_accumulator_rows_held": sum(len(b.keys) for b in held),
            "window_accumulator_blocks_bytes": len(pickle.dumps(held)),
            "window_block_cells": len(window_block.keys),
            "window_block_bytes": len(pickle.dumps(window_block)),
            "per_key_accumulator_bytes": len(pickle.dumps(acc[largest_key])),
            "per_key_accumulator_orders": acc[largest_key].orders,
            "order_line_state_cell_bytes": len(pickle.dumps(cells.LineState(
                orders[0]["event_time_us"], orders[0]["event_id"], orders[0]["user_id"]))),
            "earlier_order_lines_accumulator_bytes": len(pickle.dumps(lines)),
        }
    out["note"] = ("one 7-day window of generated orders over the world's users and catalogue "
                   f"({args.preset} preset); the window accumulator is bounded by the keys "
                   "(catalogue x segments), so it stops growing once every key has an order; "
                   "CellsPerWindow holds its periods' blocks, compacted to about twice the keys")
    return out


def previous_results(path: str = RESULTS) -> Dict:
    """The results file as it is (a run of some scenarios keeps the others' figures)."""
    if not os.path.exists(path):
        return {}
    with open(path) as handle:
        return json.load(handle)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=("tiny", "demo"))
    parser.add_argument("--orders", type=int, default=200)
    parser.add_argument("--scenarios",
                        default="steady:2:1:on,steady_orders_only:2:1:off,busy:4:5:on",
                        help="name:orders per second:background views and sends per second "
                             "(each):ranking refresh on|off[:orders (default --orders)"
                             "[:period seconds (default --period_seconds)]], comma-separated.")
    parser.add_argument("--window_seconds", type=int, default=60)
    parser.add_argument("--period_seconds", type=int, default=2)
    parser.add_argument("--warmup", type=float, default=8.0,
                        help="Seconds between the job's first health counters and the orders.")
    parser.add_argument("--live_timeout", type=float, default=180.0,
                        help="Seconds the job may take to write its first health counters.")
    parser.add_argument("--job_root", default=ROOT,
                        help="Checkout whose streaming job runs (default: this one); another "
                             "worktree compares two versions of the job under one harness.")
    parser.add_argument("--num_shards", type=int, default=2,
                        help="Refresh shards (the DirectRunner runs them one after another).")
    parser.add_argument("--drain_seconds", type=float, default=60.0)
    parser.add_argument("--throughput_orders", type=int, default=1_000)
    parser.add_argument("--throughput_treatments", type=int, default=4_000)
    parser.add_argument("--throughput_days", type=float, default=0.25)
    parser.add_argument("--saturated_pool", default="10:10",
                        help="users:SKUs the orders of the saturated-cells run come from.")
    parser.add_argument("--saturated_cells_only", action="store_true",
                        help="Measure only the saturated-cells core (with --skip_throughput), "
                             "into the results' top-level `saturated_cells`.")
    parser.add_argument("--isolated_elements", type=int, default=20_000,
                        help="Elements of the isolated per-element cost runs (N and 2N).")
    parser.add_argument("--throughput_modes", default=",".join(THROUGHPUT_MODES),
                        help="How the SDK worker runs, comma-separated: "
                             + ", ".join(f"{k} ({v})" for k, v in THROUGHPUT_MODES.items()))
    parser.add_argument("--state_orders", type=int, default=4_000,
                        help="Orders in one 7-day window for the state-size figures (x1, x10).")
    parser.add_argument("--bundle_overhead", action="store_true",
                        help="Also measure the DirectRunner's CPU per bundle and step.")
    parser.add_argument("--bundle_keys", type=int, default=300)
    parser.add_argument("--skip_freshness", action="store_true")
    parser.add_argument("--reference_delivery_cost", action="store_true",
                        help="Also measure the core with the reference version polled vs "
                             "delivered as a windowed side input (FnApiRunner).")
    parser.add_argument("--reference_delivery_refresh_seconds", type=int, default=600,
                        help="The side input's refresh interval in that measure (the job's "
                             "--reference_refresh_seconds default).")
    parser.add_argument("--reference_delivery_mode", default="subprocess_sdk",
                        choices=tuple(THROUGHPUT_MODES))
    parser.add_argument("--reference_delivery_repeats", type=int, default=2)
    parser.add_argument("--freshness_key", default="freshness",
                        help="Top-level key of the results file the freshness scenarios are "
                             "merged into (e.g. one per same-hour comparison); earlier "
                             "scenarios under it are kept.")
    parser.add_argument("--results", default=RESULTS,
                        help="Results file to merge into (another worktree's, to run one "
                             "code's bench into the file of the comparison).")
    parser.add_argument("--skip_throughput", action="store_true")
    args = parser.parse_args(argv)
    previous = previous_results(args.results)
    result = {
        "measured_at": _now_iso(),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "apache_beam": beam.__version__, "loadavg": list(os.getloadavg())},
        "code": {"commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT,
                                          capture_output=True, text=True).stdout.strip()},
    }
    if not args.skip_throughput:
        result["state_sizes"] = state_sizes(args)
        print(json.dumps(result["state_sizes"], indent=1), flush=True)
        result["throughput"] = throughput(args)
        if "throughput" in previous:   # the run before, for continuity (one level deep)
            earlier = {k: v for k, v in previous["throughput"].items() if k != "previous_run"}
            result["throughput"]["previous_run"] = {
                "measured_at": previous.get("measured_at"),
                "commit": previous.get("code", {}).get("commit"), **earlier}
        print(json.dumps(result["throughput"], indent=1), flush=True)
    if args.saturated_cells_only:
        world = _world(os.path.join(ROOT, "bench", "work", f"streaming_{args.preset}_world"),
                       args.preset)
        os.environ["PYTHONPATH"] = os.pathsep.join(
            [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
        reference = FileReference(world, DEFAULT_CONFIG, 3600, "events")
        reference.current()
        result["saturated_cells"] = {
            "commit": result["code"]["commit"], "measured_at": _now_iso(),
            **saturated_cells(args, world, reference, model.WindowSpec.of_seconds(
                7 * 86_400, 3_600, 6 * 3_600))}
    if args.reference_delivery_cost:
        result["reference_delivery"] = {"commit": result["code"]["commit"],
                                        **reference_delivery(args)}
        print(json.dumps({k: v for k, v in result["reference_delivery"].items() if k != "runs"},
                         indent=1), flush=True)
    if args.bundle_overhead:
        result["bundle_overhead"] = {"measured_at": _now_iso(), "commit": result["code"]["commit"],
                                     "loadavg_before": list(os.getloadavg()),
                                     **bundle_overhead(args)}
        print(json.dumps(result["bundle_overhead"], indent=1), flush=True)
    if not args.skip_freshness:
        fresh = result[args.freshness_key] = dict(previous.get(args.freshness_key, {}))
        for scenario in args.scenarios.split(","):
            name, rate, traffic, ranking, *rest = scenario.split(":")
            orders = int(rest[0]) if rest else args.orders
            period = int(rest[1]) if len(rest) > 1 else args.period_seconds
            # Scenarios of earlier runs stay in the file: each says when and at what commit.
            fresh[name] = {
                "measured_at": _now_iso(), "commit": result["code"]["commit"],
                **freshness(args, float(rate), float(traffic), ranking, orders, period)}
            print(json.dumps(fresh[name], indent=1), flush=True)
    result["machine"]["loadavg_after"] = list(os.getloadavg())
    os.makedirs(os.path.dirname(args.results), exist_ok=True)
    previous = previous_results(args.results)   # as it is now: another run may have merged
    if args.freshness_key in result:
        result[args.freshness_key] = {**previous.get(args.freshness_key, {}),
                                      **result[args.freshness_key]}
    merged = {**previous, **result}
    if args.freshness_key != "freshness":
        # A same-hour comparison keeps the file's headline (measured_at, code, machine).
        for key in ("measured_at", "code", "machine"):
            if key in previous:
                merged[key] = previous[key]
    with open(args.results, "w") as handle:
        json.dump(merged, handle, indent=1)
        handle.write("\n")
    print(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
