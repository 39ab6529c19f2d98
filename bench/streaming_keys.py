"""Keys the local DirectRunner holds, and the CPU it spends, in a fixed TestStream run.

    python bench/streaming_keys.py                       # this checkout, 2 runs per graph
    python bench/streaming_keys.py --before ../base      # alternate with another checkout
    python bench/streaming_keys.py --orders 500 --runs 1 # quick look

The bundle-based DirectRunner (the local streaming runner) never forgets a
key: every key a GroupByKey or stateful step has seen stays in
``EvaluationContext._transform_keyed_states`` and is scanned for timers after
every bundle (docs/streaming-directrunner.md). This bench runs one fixed
stream on that runner and reads, at the end, how many keys each step holds,
with the run's wall and process CPU seconds and the load average
(``os.getloadavg()``) before and after: the machine is shared, so CPU seconds
are the steadier number.

Graphs (``--graphs``):

- ``popularity``: `WindowedPopularity` alone, as the job builds it for the
  runner (the seam in ``transforms/streaming/statekeys.py`` decides);
- ``popularity_per_cell`` (a checkout whose `WindowedPopularity` takes
  ``sums_per_cell``): the same with Dataflow's per-cell ``SumPerPeriod``
  forced, so both period sums run on one code base;
- ``job``: the whole streaming graph of ``pipelines.streaming_refresh.build``
  for the local runner, with its two Pub/Sub reads replaced by one TestStream
  of the same messages and its BigQuery writes by a step that refuses nothing
  (the reads and writes hold no keyed state; everything between is the job's).

The stream: ``--orders`` orders (``--job_orders`` for the job graph, whose
refreshes cost far more per order) of servable users of the tiny world (seed 7),
one order a second of event time, each an order line of a random SKU; every
20th is reported again under another event name 3 s earlier (a restated line);
``--views`` product views and e-mail sends per order for the job graph. Pulled
in batches of 10 messages (as a Pub/Sub pull on this runner), the watermark
following 2 s behind the batch's latest event; windows of
``--window_seconds`` every ``--period_seconds``. Each run is a fresh
subprocess (imports not timed); with ``--before`` the runs alternate
after / before so both see the same load.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results", "streaming_keys.json")
BASE = 1_800_000_000      # seconds: the stream's first event time
US = 1_000_000


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--orders", type=int, default=2000)
    parser.add_argument("--job_orders", type=int, default=150,
                        help="orders for the job graph (it refreshes users: ~0.8 s CPU an order)")
    parser.add_argument("--views", type=int, default=4,
                        help="product views and e-mail sends per order (job graph)")
    parser.add_argument("--window_seconds", type=int, default=60)
    parser.add_argument("--period_seconds", type=int, default=10)
    parser.add_argument("--runs", type=int, default=2, help="runs per graph and checkout")
    parser.add_argument("--graphs", default="popularity,job")
    parser.add_argument("--before", default="",
                        help="another checkout (e.g. the base commit's worktree) to alternate with")
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--one", default="", help=argparse.SUPPRESS)   # one run, in a child
    parser.add_argument("--code", default=ROOT, help=argparse.SUPPRESS)
    return parser


# --- one run (in a child process, importing the checkout under test) ---------------------------

def _world(directory: str) -> str:
    from models.world import WorldSpec, generate, write_world
    if not os.path.exists(os.path.join(directory, "world.json")):
        write_world(generate(WorldSpec.preset("tiny"), 7), directory, "jsonl", 0)
    return directory


def _records(world: str, args) -> List[Dict]:
    """The stream as event records (orders, views; sends for the job graph), by arrival."""
    import numpy as np
    import pandas as pd

    from models.config import DEFAULT_CONFIG
    from transforms.streaming import FileReference

    servable = FileReference(world, DEFAULT_CONFIG, 3600, "").current().servable
    users = servable.dropna(subset=["make", "model", "year"])["user_id"].tolist()
    catalog = pd.read_json(os.path.join(world, "catalog.jsonl"), lines=True)
    skus = catalog.loc[catalog["price"] >= 50, "sku"].tolist()
    rng = np.random.default_rng(7)
    out = []
    for i in range(args.orders):
        at = BASE + i
        user, sku = users[int(rng.integers(len(users)))], skus[int(rng.integers(len(skus)))]
        order = {"event_id": f"O{i}", "event_time_us": at * US, "user_id": user,
                 "event_name": "Placed Order", "sku": sku, "quantity": 1, "price": 100.0,
                 "order_id": f"ORD{i}"}
        out.append(("events", order))
        if i % 20 == 19:    # the same line under another name, earlier: restated
            out.append(("events", {**order, "event_id": f"R{i}", "event_name": "Ordered Product",
                                   "event_time_us": (at - 3) * US}))
        for k in range(args.views):
            browser = users[int(rng.integers(len(users)))]
            out.append(("events", {"event_id": f"V{i}_{k}", "event_time_us": at * US,
                                   "user_id": browser, "event_name": "Viewed Product",
                                   "sku": skus[int(rng.integers(len(skus)))], "quantity": 1,
                                   "price": 100.0, "order_id": None}))
            out.append(("treatments", {"event_id": f"T{i}_{k}", "event_time_us": at * US,
                                       "user_id": browser, "treatment_id": f"T{k % 24:02d}",
                                       "campaign_id": "BENCH", "kind": "SENT"}))
    return out


def _test_stream(items, stamp):
    """Batches of 10 (a pull on this runner), the watermark 2 s behind each batch's latest."""
    from apache_beam.testing.test_stream import TestStream
    from apache_beam.transforms.window import TimestampedValue

    stream = TestStream().advance_watermark_to(BASE - 10)
    watermark = BASE - 10
    for start in range(0, len(items), 10):
        batch = items[start:start + 10]
        stream = stream.add_elements([TimestampedValue(stamp(r), r[1]["event_time_us"] / US)
                                      for r in batch])
        latest = max(r[1]["event_time_us"] for r in batch) / US - 2
        if latest > watermark:
            stream, watermark = stream.advance_watermark_to(latest), latest
    return stream.advance_watermark_to(watermark + 100_000).advance_watermark_to_infinity()


def _options():
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
    options = PipelineOptions(["--runner", "BundleBasedDirectRunner"])
    options.view_as(StandardOptions).streaming = True
    return options


def _popularity_pipeline(world: str, args, per_cell: bool):
    import apache_beam as beam
    import pandas as pd

    from models.config import DEFAULT_CONFIG
    from models.streaming import WindowSpec
    from transforms.streaming import FileReference, WindowedPopularity

    spec = WindowSpec(pd.Timedelta(seconds=args.window_seconds),
                      pd.Timedelta(seconds=args.period_seconds), pd.Timedelta(seconds=10))
    reference = FileReference(world, DEFAULT_CONFIG, 3600, "")
    orders = [item for item in _records(world, args)
              if item[1].get("event_name") in ("Placed Order", "Ordered Product")]
    pipeline = beam.Pipeline(options=_options())
    kwargs = {"sums_per_cell": True} if per_cell else {}
    out = (pipeline | _test_stream(orders, lambda r: r[1])
           | "RollingPopularity" >> WindowedPopularity(spec, reference, DEFAULT_CONFIG, **kwargs))
    _ = out.first_panes | "Panes" >> beam.Map(lambda p: p.cells)
    return pipeline, len(orders)


def _job_pipeline(world: str, args):
    """`streaming_refresh.build` with one TestStream for both reads and sinks refusing nothing."""
    import apache_beam as beam
    import pandas as pd
    from apache_beam.io.gcp.pubsub import PubsubMessage

    from models import streaming as model
    from models.bandit import BanditConfig
    from models.config import DEFAULT_CONFIG
    from pipelines import streaming_refresh as job
    from transforms.streaming import FileReference, delivery_for

    items = _records(world, args)

    def message(item):
        topic, record = item
        payload = {k: v for k, v in record.items() if k != "event_time_us"}
        payload["event_time"] = pd.Timestamp(record["event_time_us"], unit="us",
                                             tz="UTC").isoformat().replace("+00:00", "Z")
        return (topic, PubsubMessage(json.dumps(payload).encode(),
                                     {"event_time": payload["event_time"]}))

    pipeline = beam.Pipeline(options=_options())
    messages = pipeline | "Messages" >> _test_stream(items, message)

    class Read(beam.PTransform):
        def __init__(self, subscription, with_attributes):
            super().__init__()
            self._topic = subscription.rsplit("/", 1)[-1]

        def expand(self, _):
            return (messages | beam.Filter(lambda m, t: m[0] == t, self._topic)
                    | beam.Map(lambda m: m[1]))

    class Sink(beam.PTransform):     # BigQuery is not what is measured: nothing is refused
        def __init__(self, *args, **kwargs):
            super().__init__()

        def expand(self, rows):
            return rows | beam.FlatMap(lambda row: ())

    job.ReadFromPubSub, job.WriteRows = Read, Sink
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
    options = PipelineOptions(["--runner", "BundleBasedDirectRunner",
                               "--events_subscription", "projects/p/subscriptions/events",
                               "--treatments_subscription", "projects/p/subscriptions/treatments",
                               "--streaming_dataset", "p.bench", "--input_dir", world])
    options.view_as(StandardOptions).streaming = True
    ctx = job.StreamingContext(
        "bench", pd.Timestamp("2026-01-01", tz="UTC"), "p", "p.bench",
        model.WindowSpec.of_seconds(args.window_seconds, args.period_seconds, 10),
        DEFAULT_CONFIG, BanditConfig(), pd.Timedelta(seconds=120))
    reference = FileReference(world, DEFAULT_CONFIG, 3600, "")
    reference.delivery = delivery_for(None, "auto")
    job.build(pipeline, options, ctx, reference)
    return pipeline, len(items)


def one_run(args) -> Dict:
    """Build, run and measure one graph in this process: keys held per step at the end."""
    import apache_beam as beam  # noqa: F401  (imported before the clock starts)

    world = _world(os.path.join(ROOT, "bench", "work", "streaming_keys_tiny_world"))
    if args.one == "job":
        pipeline, events = _job_pipeline(world, args)
    else:
        pipeline, events = _popularity_pipeline(world, args, args.one == "popularity_per_cell")
    load_before = list(os.getloadavg())
    cpu, wall = time.process_time(), time.perf_counter()
    result = pipeline.run()
    result.wait_until_finish()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    states = result._evaluation_context._transform_keyed_states   # the runner's, never pruned
    keys = {applied.full_label: len(held) for applied, held in states.items() if held}
    return {"graph": args.one, "events": events, "wall_seconds": round(wall, 2),
            "cpu_seconds": round(cpu, 2), "events_per_cpu_second": round(events / cpu, 1),
            "load_before": [round(x, 2) for x in load_before],
            "load_after": [round(x, 2) for x in os.getloadavg()],
            "keys_total": sum(keys.values()), "keyed_steps": len(keys),
            "keys_per_step": dict(sorted(keys.items(), key=lambda kv: -kv[1]))}


# --- the runs, alternating ---------------------------------------------------------------------

def _child(args, graph: str, code: str) -> Dict:
    argv = [sys.executable, os.path.abspath(__file__), "--one", graph, "--code", code,
            "--orders", str(args.job_orders if graph == "job" else args.orders),
            "--views", str(args.views),
            "--window_seconds", str(args.window_seconds),
            "--period_seconds", str(args.period_seconds)]
    done = subprocess.run(argv, cwd=code, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{graph} in {code} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _commit(code: str) -> str:
    return subprocess.run(["git", "-C", code, "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True, check=False).stdout.strip()


def main(argv=None) -> None:
    args = _parser().parse_args(argv)
    if args.one:
        sys.path.insert(0, os.path.abspath(args.code))
        print(json.dumps(one_run(args)))
        return
    checkouts = {"after": ROOT} if not args.before else {"after": ROOT, "before": args.before}
    runs = []
    for _ in range(args.runs):
        for graph in args.graphs.split(","):
            for name, code in checkouts.items():
                if graph == "popularity_per_cell" and name == "before":
                    continue        # the base's popularity graph is per cell already
                run = {"checkout": name, "commit": _commit(code), **_child(args, graph, code)}
                print(json.dumps({k: v for k, v in run.items() if k != "keys_per_step"}))
                runs.append(run)
    summary = {}
    for run in runs:
        entry = summary.setdefault(f"{run['graph']}:{run['checkout']}", {
            "commit": run["commit"], "cpu_seconds": [], "wall_seconds": [], "keys_total": []})
        for field in ("cpu_seconds", "wall_seconds", "keys_total"):
            entry[field].append(run[field])
    for entry in summary.values():
        entry["cpu_median"] = statistics.median(entry["cpu_seconds"])
    result = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
              "settings": {k: getattr(args, k) for k in ("orders", "job_orders", "views",
                                                        "window_seconds",
                                                        "period_seconds", "runs", "graphs")},
              "summary": summary, "runs": runs}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=1)
        handle.write("\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
