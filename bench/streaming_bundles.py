"""Per-bundle cost of DoFns in the streaming job on the local DirectRunner, counted and timed.

Why: on the bundle-based DirectRunner most of the streaming job's CPU went to
starting bundles, and within that to Beam rebuilding DoFn signatures
(`userstate.get_dofn_specs`, `inspect.signature`) for DoFns that answer no
faster the thousandth time (docs/streaming-directrunner.md). This counts, for
one run of ``tests/test_streaming_e2e.py -k end_to_end`` (the job between the
Pub/Sub emulator and bqemulator, in the pytest process), the calls of
`get_dofn_specs` per DoFn class, split into DoFns with
`transforms.signatures.CachedSignatures` (cached) and without (uncached), the
bundles each ParDo step started, and the process's CPU seconds beside its
wall seconds and the load average (the machine is shared: wall time is noisy,
CPU less so). The e2e run waits for conditions rather than running a fixed
time, so its wall time and the counts vary from run to run; run each tree
several times, alternating.

``--tree`` runs another checkout of the project (e.g. the commit before a
change) with the same counting, so before and after are measured alike. The
counting wraps two Beam functions inside the child pytest process only (this
module is loaded there as a pytest plugin); the job itself patches nothing.

Usage::

    python bench/streaming_bundles.py --label after            # this tree
    python bench/streaming_bundles.py --tree ../base --label before
    python bench/streaming_bundles.py --per_step --runs 3 --label per_step
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results", "streaming_bundles.json")
OUT_ENV = "STREAMING_BUNDLES_OUT"
PLUGIN = "_streaming_bundles_plugin"

# ---- the pytest plugin (runs inside the child process) -------------------------------------

_SPECS: collections.Counter = collections.Counter()
_BUNDLES: collections.Counter = collections.Counter()
_STARTED: Dict[str, float] = {}


def _name(dofn) -> str:
    cls = type(dofn)
    fn = getattr(dofn, "_fn", None)
    inner = f"({getattr(fn, '__name__', type(fn).__name__)})" if fn is not None else ""
    return f"{cls.__module__}.{cls.__qualname__}{inner}"


def pytest_configure(config) -> None:
    """Wrap `get_dofn_specs` (counted per DoFn class) and ParDo bundle starts (per step)."""
    if not os.environ.get(OUT_ENV):
        return
    from apache_beam.runners.direct import transform_evaluator
    from apache_beam.transforms import userstate

    original = userstate.get_dofn_specs

    def counted(dofn, *args, **kwargs):
        _SPECS[_name(dofn)] += 1
        return original(dofn, *args, **kwargs)

    userstate.get_dofn_specs = counted
    transform_evaluator.get_dofn_specs = counted
    start = transform_evaluator._ParDoEvaluator.start_bundle

    def start_bundle(self):
        _BUNDLES[self._applied_ptransform.full_label] += 1
        return start(self)

    transform_evaluator._ParDoEvaluator.start_bundle = start_bundle
    _STARTED.update(wall=time.time(), load=os.getloadavg()[0])


def pytest_unconfigure(config) -> None:
    path = os.environ.get(OUT_ENV)
    if not path or not _STARTED:
        return
    from transforms.signatures import CachedSignatures   # the tree under test's
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cached = set()
    import gc
    for obj in gc.get_objects():   # the DoFn classes counted, to tell cached from uncached
        if isinstance(obj, type) and issubclass(obj, CachedSignatures):
            cached.add(f"{obj.__module__}.{obj.__qualname__}")
    split = {"cached": collections.Counter(), "uncached": collections.Counter()}
    for name, n in _SPECS.items():
        split["cached" if name.split("(")[0] in cached else "uncached"][name] += n
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
                   "wall_seconds": round(time.time() - _STARTED["wall"], 1),
                   "loadavg_1min_start": round(_STARTED["load"], 2),
                   "loadavg_1min_end": round(os.getloadavg()[0], 2),
                   "max_rss_mib": round(usage.ru_maxrss / 1024, 1),
                   "get_dofn_specs_calls": sum(_SPECS.values()),
                   "uncached_calls": sum(split["uncached"].values()),
                   "cached_calls": sum(split["cached"].values()),
                   "uncached_by_dofn": dict(split["uncached"].most_common(25)),
                   "pardo_bundles": sum(_BUNDLES.values()),
                   "pardo_bundles_top": dict(_BUNDLES.most_common(15))}, f, indent=1)


# ---- the bench (parent process) -------------------------------------------------------------

def run_once(tree: str, label: str, python: str) -> Dict:
    """One e2e run of ``tree`` in a child pytest process with the counting plugin."""
    plugin_dir = tempfile.mkdtemp()
    out = os.path.join(plugin_dir, "out.json")
    shutil.copy(os.path.abspath(__file__), os.path.join(plugin_dir, PLUGIN + ".py"))
    env = dict(os.environ, PYTHONPATH=plugin_dir, **{OUT_ENV: out})
    cmd = [python, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-p", PLUGIN,
           "tests/test_streaming_e2e.py", "-k", "end_to_end"]
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree,
                            capture_output=True, text=True).stdout.strip()
    result = {"label": label, "commit": commit, "passed": proc.returncode == 0,
              "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if os.path.exists(out):
        with open(out, encoding="utf-8") as f:
            result.update(json.load(f))
    if proc.returncode != 0:
        result["pytest_tail"] = proc.stdout[-1500:]
    shutil.rmtree(plugin_dir, ignore_errors=True)
    return result


def per_step(bundles: int, repeats: int) -> Dict:
    """CPU milliseconds per bundle and step, per kind of step, on a fixed TestStream pipeline.

    A TestStream releases ``bundles`` elements one bundle each (own key and
    watermark step, as a live stream's pulls produce them) through a stateful
    step and then five steps of one kind; the CPU of a run without the five
    steps is subtracted. Every run skips the runner-API round trip as the job
    does locally (``run(test_runner_api=False)``), except ``window_into_cached_round_trip``,
    which shows what the round trip does to the job's WindowInto. Kinds are
    run in turn, ``repeats`` times, and each figure is the median.
    """
    import apache_beam as beam
    from apache_beam.coders import PickleCoder
    from apache_beam.transforms.userstate import ReadModifyWriteStateSpec

    sys.path.insert(0, ROOT)
    from transforms.signatures import CachedSignatures, FilterFn, MapFn, WindowInto

    class PerKeyFn(CachedSignatures, beam.DoFn):
        SEEN = ReadModifyWriteStateSpec("seen", PickleCoder())

        def process(self, element, seen=beam.DoFn.StateParam(SEEN)):
            seen.write(1)
            yield element

    def same(x):
        return x

    def keep(x):
        return True

    glob = beam.window.GlobalWindows
    steps = {"none": lambda pc, i: pc,
             "beam_map": lambda pc, i: pc | f"S{i}" >> beam.Map(same),
             "map_fn": lambda pc, i: pc | f"S{i}" >> beam.ParDo(MapFn(same)),
             "beam_filter": lambda pc, i: pc | f"S{i}" >> beam.Filter(keep),
             "filter_fn": lambda pc, i: pc | f"S{i}" >> beam.ParDo(FilterFn(keep)),
             "beam_window_into": lambda pc, i: pc | f"S{i}" >> beam.WindowInto(glob()),
             "window_into_cached": lambda pc, i: pc | f"S{i}" >> WindowInto(glob()),
             "window_into_cached_round_trip": lambda pc, i: pc | f"S{i}" >> WindowInto(glob())}
    return cpu_per_bundle_step(steps, PerKeyFn, bundles, 5, repeats)


def cpu_per_bundle_step(steps, keyed_fn, bundles: int, depth: int = 5,
                        repeats: int = 1) -> Dict:
    """Median CPU (and wall) of each kind of step, and its CPU ms per bundle and step.

    ``steps``: kind → ``(pcollection, i) → pcollection`` applying one step
    labelled ``S{i}``, with a kind ``"none"`` (no step) as the baseline;
    ``keyed_fn``: the stateful DoFn class every element passes first. A
    TestStream releases ``bundles`` keyed elements one bundle each (own key
    and watermark step) on the bundle-based DirectRunner; each run times the
    pipeline's run only, without the runner-API round trip unless its kind
    ends in ``round_trip``. Shared by `per_step` and `bench/streaming.py
    --bundle_overhead`.
    """
    import statistics

    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.testing.test_stream import TestStream

    def stream() -> TestStream:
        events = TestStream()
        for i in range(bundles):
            events = events.add_elements([beam.window.TimestampedValue((i, i), i)]) \
                .advance_watermark_to(i + 0.5)
        return events.advance_watermark_to_infinity()

    cpu = collections.defaultdict(list)
    wall = collections.defaultdict(list)
    for _ in range(repeats):
        for kind, step in steps.items():
            options = PipelineOptions(["--runner=BundleBasedDirectRunner", "--streaming"])
            p = beam.Pipeline(options=options)
            pc = p | stream() | "Keyed" >> beam.ParDo(keyed_fn())
            for i in range(depth):
                pc = step(pc, i)
            before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            p.run(test_runner_api=kind.endswith("round_trip")).wait_until_finish()
            after = resource.getrusage(resource.RUSAGE_SELF)
            wall[kind].append(time.perf_counter() - started)
            cpu[kind].append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    out = {"runner": "BundleBasedDirectRunner, streaming, TestStream", "bundles": bundles,
           "steps": depth, "repeats": repeats,
           "loadavg_1min": round(os.getloadavg()[0], 2)}
    base = statistics.median(cpu["none"])
    for kind in steps:
        out[kind] = {"cpu_seconds": round(statistics.median(cpu[kind]), 2),
                     "wall_seconds": round(statistics.median(wall[kind]), 2)}
        if kind != "none":
            out[kind]["cpu_ms_per_bundle_step"] = round(
                1000 * (statistics.median(cpu[kind]) - base) / (bundles * depth), 2)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tree", default=ROOT, help="checkout to run (default: this one)")
    parser.add_argument("--label", required=True, help="name of the run in the results")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--results", default=RESULTS)
    parser.add_argument("--per_step", action="store_true",
                        help="Measure CPU per bundle and step of each kind of step instead "
                             "(a fixed TestStream pipeline; this tree only).")
    parser.add_argument("--bundles", type=int, default=300)
    args = parser.parse_args(argv)
    previous = {"runs": []}
    if os.path.exists(args.results):
        with open(args.results, encoding="utf-8") as f:
            previous = json.load(f)
    if args.per_step:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip()
        previous["per_step"] = {"commit": commit, "label": args.label,
                                "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                **per_step(args.bundles, max(args.runs, 1))}
        print(json.dumps(previous["per_step"], indent=1), flush=True)
        with open(args.results, "w", encoding="utf-8") as f:
            json.dump(previous, f, indent=1)
        return 0
    for _ in range(args.runs):
        result = run_once(os.path.abspath(args.tree), args.label, args.python)
        print(json.dumps({k: v for k, v in result.items() if not k.endswith("_top")
                          and k != "uncached_by_dofn"}), flush=True)
        previous["runs"].append(result)
        with open(args.results, "w", encoding="utf-8") as f:
            json.dump(previous, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
