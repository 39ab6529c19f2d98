"""Tune: choose the configuration by backtest on earlier periods, with the evidence (#14).

    python -m pipelines.tune --input_dir out/completejourney --as_of 2017-12-04T04:52:28Z \\
        --config configs/completejourney.yaml --periods 2 --out out/tuned.yaml
    python -m pipelines.tune ... --grid my_grid.yaml     # {"grid": {"dotted.key": [values]}}

Every variant of the grid (half-life, shrinkage, mix, exclusion days, similarity
measure, neighbours: any dotted key of the configuration) is scored on
``--periods`` periods of ``--period_days`` ending at ``--as_of``, each from the
history before its cutoff and on the purchases after it, by the same handler
the batch job applies (``models.recommend_handler``), in this process, on one
loaded dataset. Beside it: the two SQL baselines (global popularity; each
user's own most-bought, topped up with popularity) and the given config.
Writes the best variant's whole configuration to ``--out`` and its evidence
table beside it (``<out>.evidence.md`` and ``.json``), then, with
``--confirm_on_holdout``, scores the best and the given config once on the
held-out period after ``--as_of`` (never used to choose).
"""
from __future__ import annotations

import json
import logging
import os
import sys
from typing import List, Optional

import pandas as pd

from models import contracts, tuning
from models.catalog import resolve_conflicts
from models.config_file import ConfigError, dump_yaml, load_config, read_file
from pipelines.jobs import OneLineParser, UsageError, run_with_status
from pipelines.options import as_of_of, require_input_dir
from transforms.io import find_table, read_frame


def load_data(input_dir: str, config, holdout: bool) -> tuning.Data:
    """The inputs validated like the job, unknown SKUs dropped (the job dead-letters them)."""
    catalog = resolve_conflicts(read_frame(input_dir, "catalog", config.inputs)[0]).catalog
    known = lambda f: f.loc[~contracts.unknown_sku_mask(f["sku"], catalog["sku"])].reset_index(
        drop=True)
    events = known(read_frame(input_dir, "events", config.inputs)[0])
    users = read_frame(input_dir, "users", config.inputs)[0]
    fitment = (known(read_frame(input_dir, "fitment", config.inputs)[0])
               if config.fitment_attributes else pd.DataFrame(columns=["sku"]))
    held = known(read_frame(input_dir, "holdout_events", config.inputs)[0]) if holdout else None
    return tuning.Data(catalog, users, events, fitment, held)


def main(argv: Optional[List[str]] = None) -> int:
    parser = OneLineParser(description=__doc__.splitlines()[0],
                           epilog="Exit status: 0 done, 2 usage or configuration error, "
                                  "3 failure.")
    parser.add_argument("--input_dir", default="out/demo_world")
    parser.add_argument("--as_of", required=True,
                        help="End of the last tuning period (RFC 3339): the history after it "
                             "is never used to choose.")
    parser.add_argument("--config", default=None, help="The retailer config the grid varies.")
    parser.add_argument("--grid", default=None,
                        help="YAML/JSON file {grid: {dotted.key: [values, ...]}} (default: "
                             "models.tuning.DEFAULT_GRID: mixes, buy-again half-life and "
                             "due-ness, similarity, popularity half-life).")
    parser.add_argument("--periods", type=int, default=2,
                        help="Tuning periods, back to back, the last ending at --as_of.")
    parser.add_argument("--period_days", type=float, default=28.0)
    parser.add_argument("--out", default="out/tuned.yaml",
                        help="Best configuration (YAML); the evidence goes beside it.")
    parser.add_argument("--confirm_on_holdout", action="store_true",
                        help="Also score the best variant and the given config on "
                             "holdout_events (after --as_of), as a check never used to choose.")
    args = parser.parse_args(argv)
    as_of = as_of_of(args.as_of, pd.Timestamp.now(tz="UTC"))
    if args.periods < 1:
        raise UsageError("--periods must be >= 1")
    if args.period_days <= 0:
        raise UsageError("--period_days must be > 0")
    try:
        base = load_config(args.config)
        axes = tuning.DEFAULT_GRID
        if args.grid:
            doc = read_file(args.grid)
            if not isinstance(doc, dict) or not isinstance(doc.get("grid"), dict):
                raise ConfigError(f"{args.grid}: expected {{grid: {{dotted.key: [values]}}}}")
            axes = doc["grid"]
        variants = tuning.expand_grid(axes, base)
    except ConfigError as err:
        raise UsageError(f"--config/--grid: {err}")
    require_input_dir(args.input_dir)
    if args.confirm_on_holdout:
        try:
            find_table(args.input_dir, "holdout_events")
        except FileNotFoundError as err:
            raise UsageError(f"--confirm_on_holdout: {err}")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    k = base.rules.recs_per_user
    say = lambda line: print(line, file=sys.stderr, flush=True)
    say(f"tune: {len(variants)} variants × {args.periods} periods at k={k}; loading "
        f"{args.input_dir}")
    data = load_data(args.input_dir, base, args.confirm_on_holdout)
    periods = tuning.periods_of(data, args.input_dir, as_of, args.periods, args.period_days,
                                k, base)
    tuner = tuning.Tuner(data, periods, k, say)
    results = tuner.run(variants)
    table = tuning.evidence(results, variants, periods, k)
    best = tuning.best_variant(table, variants, k)
    document = {"as_of": as_of.isoformat(), "k": k, "periods": [
        {"cutoff": p.cutoff.isoformat(), "buyers": len(p.users)} for p in periods],
        "best": best.name, "best_settings": best.settings,
        "table": json.loads(table.to_json(orient="records", double_precision=15))}
    spans = ", ".join(f"{p.cutoff.date()} +{args.period_days:g} d, {len(p.users)} buyers"
                      for p in periods)
    text = ("# pipelines.tune evidence\n\n"
            f"{len(variants)} variants scored at precision@{k} on {len(periods)} periods "
            f"before {as_of.isoformat()} ({spans}). "
            "Intervals: paired per-user difference, 95%, pooled over the periods, "
            "cluster-robust by user, in percentage points.\n\n"
            f"Best: **{best.name}** {best.settings or '(the given config)'}\n\n"
            + tuning.markdown(table, k))
    if args.confirm_on_holdout:
        check = tuning.periods_of(data, args.input_dir, as_of, 1, args.period_days, k, base,
                                  holdout=True)
        chosen = [v for v in variants if v.name in (tuning.BASE, best.name)]
        confirm = tuning.Tuner(data, check, k, say)
        held = tuning.evidence(confirm.run(chosen), chosen, check, k)
        document["holdout"] = json.loads(held.to_json(orient="records", double_precision=15))
        text += ("\n## Held-out period after as_of (a check; not used to choose)\n\n"
                 + tuning.markdown(held, k))
    with open(args.out, "w", encoding="utf-8") as handle:
        handle.write(f"# chosen by pipelines.tune: {best.name} {json.dumps(best.settings)}\n")
        handle.write(dump_yaml(best.config))
    stem = os.path.splitext(args.out)[0]
    with open(f"{stem}.evidence.md", "w", encoding="utf-8") as handle:
        handle.write(text)
    with open(f"{stem}.evidence.json", "w", encoding="utf-8") as handle:
        json.dump(document, handle, indent=2, default=str)
    print(text)
    print(f"written: {args.out}, {stem}.evidence.md, {stem}.evidence.json")
    return 0


if __name__ == "__main__":
    logging.getLogger().setLevel(logging.WARNING)
    sys.exit(run_with_status(main, sys.argv[1:], job="tune"))
