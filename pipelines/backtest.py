"""Backtest at any k: the batch job's strategies beside two plain-SQL baselines on the holdout.

    python -m pipelines.backtest --input_dir out/demo_world --as_of 2026-06-30T00:00:00Z
    python -m pipelines.backtest --input_dir out/cj --as_of 2017-12-04T04:52:28Z \\
        --config configs/completejourney.yaml --k 10

Runs the batch job once per strategy (global and segment popularity) into a
scratch warehouse (production is never touched), with the retailer's config
and ``recs_per_user`` set to ``--k``. Beside them, the two baselines of
:mod:`models.baselines` run as plain DuckDB SQL over the same input files, on
the history before ``--as_of``, drawing from the same eligible catalogue.
Every strategy is scored by :func:`models.metrics.evaluate_lists` on the same
people (every user who bought in ``holdout_events``; an unserved user counts as
all misses): precision, recall, NDCG, MAP and hit rate at k, coverage and
average price, plus each strategy's paired 95% interval of per-user
precision@k against ``sql_own_then_popular`` (:func:`models.mix.paired_interval`).
Rows (one per strategy, with ``k`` and ``as_of``) are appended to the
``backtest`` table of ``--warehouse`` and printed.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import sys
import tempfile
from typing import Dict, List, Optional

import pandas as pd
import pyarrow as pa

from models import baselines, contracts, metrics
from models.catalog import CatalogArrays, resolve_conflicts
from models.config import InputConfig, RecsConfig
from models.config_file import ConfigError, dump_yaml, load_config
from models.mix import paired_interval
from models.popularity import order_lines
from pipelines import batch_recommendations
from pipelines.jobs import OneLineParser, UsageError, locked_warehouse, run_with_status
from pipelines.options import as_of_of, require_input_dir
from pipelines.train_ranker import check_inputs
from transforms.io import read_frame
from transforms.warehouse import LocalWarehouse

STRATEGIES = ("global", "segment")
BASELINE = baselines.OWN_THEN_POPULAR


def holdout_purchases(input_dir: str, limits: InputConfig = contracts.DEFAULT_LIMITS
                      ) -> Dict[str, frozenset]:
    """Each user's distinct SKUs ordered in the held-out period (validated like the job)."""
    events, _ = read_frame(input_dir, "holdout_events", limits)
    return order_lines(events).groupby("user_id")["sku"].agg(frozenset).to_dict()


def config_at_k(config: RecsConfig, k: int) -> RecsConfig:
    """The retailer's config with ``recs_per_user = k`` (every other setting kept)."""
    return dataclasses.replace(config, rules=dataclasses.replace(config.rules, recs_per_user=k))


def mix_text(config: RecsConfig) -> str:
    """The config's slot mix as ``source:slots+…`` (one source fills all k slots)."""
    mix = config.candidates.mix
    if len(mix) == 1:
        return f"{mix[0][0]}:{config.rules.recs_per_user}"
    return "+".join(f"{source}:{slots}" for source, slots in mix)


def long_lists(recs: pd.DataFrame, k: int) -> pd.DataFrame:
    """The batch job's wide rows (``rec_part_1..k``) as ``user_id, slot, sku`` lists."""
    parts = [pd.DataFrame({"user_id": recs["user_id"].astype(str), "slot": i,
                           "sku": recs[f"rec_part_{i}"]}) for i in range(1, k + 1)]
    out = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(
        columns=["user_id", "slot", "sku"])
    return out.loc[out["sku"].notna()].reset_index(drop=True)


def batch_lists(input_dir: str, as_of: str, num_shards: int, scratch: str, config_path: str,
                k: int) -> Dict[str, tuple]:
    """Each strategy's lists from a real batch-job run, with its fallback shares."""
    out = {}
    for strategy in STRATEGIES:
        warehouse = os.path.join(scratch, f"{strategy}.duckdb")
        code = batch_recommendations.run([
            "--input_dir", input_dir, "--warehouse", warehouse, "--as_of", as_of,
            "--strategy", strategy, "--num_shards", str(num_shards),
            "--run_id", f"backtest_{strategy}", "--config", config_path])
        if code != 0:
            print(f"the {strategy} run was gated; see its summary above", file=sys.stderr)
            raise SystemExit(1)  # gated, like the batch job
        recs = LocalWarehouse(warehouse).query("SELECT * FROM recommendations")
        shares = recs["source"].value_counts(normalize=True)
        out[strategy] = (long_lists(recs, k),
                         {f"share_{level}": float(v) for level, v in shares.items()})
    return out


def evaluate_strategies(input_dir: str, as_of: str, num_shards: int, scratch: str,
                        config_path: Optional[str] = None, k: Optional[int] = None
                        ) -> pd.DataFrame:
    """Every strategy and baseline scored on the holdout at k; one row each.

    Args:
      k: list length (default: the config's ``recs_per_user``).
    """
    config = load_config(config_path)
    k = int(k or config.rules.recs_per_user)
    config = config_at_k(config, k)
    path = os.path.join(scratch, "config.yaml")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(dump_yaml(config))
    future = holdout_purchases(input_dir, config.inputs)
    catalog = resolve_conflicts(read_frame(input_dir, "catalog", config.inputs)[0]).catalog
    arrays = CatalogArrays.build(catalog, config.rules)
    price_of = dict(zip(arrays.sku, arrays.price))
    catalogue_size = len(arrays.sku)

    lists: Dict[str, tuple] = {}
    for name, frame in baselines.baseline_lists(
            input_dir, pd.Timestamp(as_of), k, arrays.sku[arrays.eligible]).items():
        lists[name] = (frame, {})
    lists.update(batch_lists(input_dir, as_of, num_shards, scratch, path, k))

    users = sorted((u for u, b in future.items() if b), key=str)
    figures = {name: metrics.evaluate_lists(frame, future, k, catalogue_size, price_of, users)
               for name, (frame, _) in lists.items()}
    base = figures[BASELINE]["per_user_precision"]
    rows = []
    for name, (_, shares) in lists.items():
        got = dict(figures[name])
        per_user = got.pop("per_user_precision")
        vs = paired_interval(per_user, base)
        sql = name in baselines.BASELINES
        rows.append({"strategy": name, "k": k,
                     "kind": "sql baseline" if sql else "batch job",
                     # what filled the batch job's slots (with a mix, global = segment)
                     "mix": "" if sql else mix_text(config),
                     **got,
                     "precision_vs_baseline": vs["mean"],
                     "precision_vs_baseline_low": vs["low"],
                     "precision_vs_baseline_high": vs["high"],
                     **shares})
    table = pd.DataFrame(rows)
    share_columns = [c for c in table.columns if c.startswith("share_")]
    table[share_columns] = table[share_columns].fillna(0.0)
    return table


def format_table(table: pd.DataFrame) -> str:
    """The comparison as aligned text, metrics down, strategies across (``_at_k`` as ``@k``)."""
    k = int(table["k"].iloc[0])
    shown = table.drop(columns=[c for c in ("k", "kind", "mix", "as_of") if c in table.columns])
    shown = shown.rename(columns=lambda c: c.replace("_at_k", f"@{k}"))
    return shown.set_index("strategy").T.to_string(float_format=lambda v: f"{v:.4f}")


def main(argv: Optional[List[str]] = None) -> int:
    parser = OneLineParser(description=__doc__.splitlines()[0],
                           epilog="Exit status: 0 done, 1 a strategy's run was gated, 2 usage "
                                  "or configuration error, 3 failure.")
    parser.add_argument("--input_dir", default="out/demo_world")
    parser.add_argument("--as_of", required=True,
                        help="End of training history (RFC 3339); holdout starts after it.")
    parser.add_argument("--warehouse", default="out/warehouse.duckdb",
                        help="Receives the `backtest` table.")
    parser.add_argument("--num_shards", type=int, default=8)
    parser.add_argument("--config", default=None, help="Retailer config (YAML/JSON).")
    parser.add_argument("--k", type=int, default=None,
                        help="List length scored (default: the config's recs_per_user).")
    args = parser.parse_args(argv)
    as_of = as_of_of(args.as_of, pd.Timestamp.now(tz="UTC"))  # strict, before anything runs
    if args.num_shards < 1:
        raise UsageError("--num_shards must be >= 1")
    if args.k is not None and args.k < 1:
        raise UsageError("--k must be >= 1")
    try:
        config = load_config(args.config)
    except ConfigError as err:
        raise UsageError(f"--config: {err}")
    if args.k is not None:
        try:  # e.g. a mix of several sources whose slots add up to another k
            config = config_at_k(config, args.k)
        except ValueError as err:
            raise UsageError(f"--k {args.k}: {err}")
    require_input_dir(args.input_dir)
    check_inputs(args.input_dir, config, holdout=True)
    with locked_warehouse(args.warehouse, "backtest"):
        with tempfile.TemporaryDirectory(prefix="backtest_") as scratch:
            table = evaluate_strategies(args.input_dir, args.as_of, args.num_shards, scratch,
                                        args.config, config.rules.recs_per_user)
        table.insert(0, "as_of", as_of)
        LocalWarehouse(args.warehouse).publish(
            "backtest", {}, {"backtest": pa.Table.from_pandas(table, preserve_index=False)},
            swap=False)
    k = config.rules.recs_per_user
    print(f"\nBacktest at k={k} on the held-out period ({int(table['buyers_in_holdout'].iloc[0])}"
          f" buyers; precision_vs_baseline: paired difference of per-user precision@{k} "
          f"against {BASELINE}, with its 95% interval low/high):")
    print(format_table(table))
    return 0


if __name__ == "__main__":
    logging.getLogger().setLevel(logging.WARNING)
    sys.exit(run_with_status(main, sys.argv[1:], job="backtest"))
