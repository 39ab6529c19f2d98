"""Import a public retail dataset as SPEC §2 contract files (JSON Lines + world.json).

    python -m pipelines.import_dataset completejourney \\
        --source ../shared/data/completejourney --out out/completejourney

Writes catalog, fitment (empty: a grocer has no fitment), users, events,
holdout_events and treatment_events as JSON Lines, and a `world.json`
manifest (as_of, holdout window, row counts, dropped rows by reason). Run the
jobs on it with the dataset's retailer config, e.g. `configs/completejourney.yaml`.
"""
from __future__ import annotations

import sys
import time
from typing import List, Optional

from models import completejourney
from pipelines.jobs import OneLineParser, run_with_status

DATASETS = {
    "completejourney": "dunnhumby The Complete Journey (grocer, 2,500 households, 2017)",
}
DEFAULT_CONFIGS = {"completejourney": "configs/completejourney.yaml"}


def main(argv: Optional[List[str]] = None) -> int:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", choices=sorted(DATASETS),
                        help="; ".join(f"{k}: {v}" for k, v in DATASETS.items()))
    parser.add_argument("--source", required=True,
                        help="Directory with the dataset's files (see its README).")
    parser.add_argument("--out", default=None, help="Output directory (default out/<dataset>).")
    parser.add_argument("--holdout_days", type=int, default=completejourney.HOLDOUT_DAYS,
                        help="The last this many days of transactions become holdout_events.")
    args = parser.parse_args(argv)
    if args.holdout_days < 1:
        parser.error("--holdout_days must be >= 1")
    out = args.out or f"out/{args.dataset}"
    started = time.perf_counter()
    try:
        manifest = completejourney.import_completejourney(args.source, out, args.holdout_days)
    except completejourney.SourceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2  # a missing or foreign source directory: the user's to fix
    print(f"{args.dataset} {args.source} -> {out} (jsonl) in "
          f"{time.perf_counter() - started:.1f}s")
    for line in completejourney.summary_lines(manifest):
        print(line)
    print(f"next: python -m pipelines.batch_recommendations --input_dir {out} "
          f"--config {DEFAULT_CONFIGS[args.dataset]} --as_of {manifest['as_of']}")
    return 0


if __name__ == "__main__":
    sys.exit(run_with_status(main, sys.argv[1:], job="import_dataset"))
