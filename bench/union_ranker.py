"""The union ranker (#14 item 4) on the real grocer: trained, then held against the blend and SQL.

    python bench/union_ranker.py --data bench/work/completejourney \\
        --config bench/results/tune_completejourney.yaml --cutoffs 8 --valid_cutoffs 2

``--data`` is the grocer imported by ``pipelines.import_dataset completejourney``
(docs/real-data.md). The script runs the two CLIs in this process:
``pipelines.train_ranker`` with the tuned mix config (union examples at weekly
cutoffs before the official holdout start, 7-day labels, the newest
``--valid_cutoffs`` validating), then ``pipelines.evaluate_ranker`` on the official
holdout at the config's k: the union ranker, the blend (the mix's own lists) and
the two SQL baselines, each with the ranker's paired 95% interval. Wall and CPU
seconds of each step and the load average go beside the figures, in
``bench/results/union_ranker_<name>.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _timed(step):
    wall, cpu = time.perf_counter(), time.process_time()
    out = step()
    return out, {"wall_seconds": round(time.perf_counter() - wall, 1),
                 "cpu_seconds": round(time.process_time() - cpu, 1),
                 "load_average_after": [round(v, 2) for v in os.getloadavg()]}


def main(argv=None) -> int:
    from pipelines import evaluate_ranker, train_ranker
    from transforms.ranker import load_model
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.path.join(ROOT, "bench", "work", "completejourney"))
    parser.add_argument("--config", default=os.path.join(ROOT, "bench", "results",
                                                         "tune_completejourney.yaml"))
    parser.add_argument("--cutoffs", type=int, default=8)
    parser.add_argument("--valid_cutoffs", type=int, default=2)
    parser.add_argument("--objective", default="binary")
    parser.add_argument("--name", default="completejourney")
    args = parser.parse_args(argv)
    with open(os.path.join(args.data, "world.json")) as handle:
        as_of = json.load(handle)["as_of"]
    work = tempfile.mkdtemp(prefix="union_ranker_")
    common = ["--input_dir", args.data, "--as_of", as_of, "--config", args.config,
              "--warehouse", os.path.join(work, "w.duckdb")]
    load_before = [round(v, 2) for v in os.getloadavg()]
    path, train_cost = _timed(lambda: train_ranker.run(common + [
        "--ranker_model_dir", os.path.join(work, "models"), "--ranker_cutoffs",
        str(args.cutoffs), "--ranker_valid_cutoffs", str(args.valid_cutoffs),
        "--ranker_objective", args.objective]))
    result, eval_cost = _timed(lambda: evaluate_ranker.run(common + [
        "--ranker_artifact", path, "--ranker_eval_dir", os.path.join(work, "eval")]))
    meta = load_model(path).metadata
    doc = {"as_of": as_of, "config": os.path.relpath(args.config, ROOT),
           "cutoffs": args.cutoffs, "valid_cutoffs": args.valid_cutoffs,
           "objective": args.objective, "load_average_before": load_before,
           "train": {**train_cost, "selected": meta["selected"],
                     "validation": {"ranker": meta["metrics"], "blend": meta["baseline"],
                                    "paired_interval": meta["paired_interval"],
                                    "beats_baseline": meta["beats_baseline"]},
                     "row_counts": meta["row_counts"]},
           "holdout": {**eval_cost, "k": result["k"], "table": result["table"]}}
    out = os.path.join(ROOT, "bench", "results", f"union_ranker_{args.name}.json")
    with open(out, "w") as handle:
        json.dump(doc, handle, indent=2, default=str)
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
