"""Backtest: global vs segment popularity on the held-out future period (SPEC §1 field metrics).

    python -m pipelines.backtest --input_dir out/demo_world --as_of 2026-06-30T00:00:00Z

Runs the batch job once per strategy into a scratch warehouse (production is
never touched), then scores each strategy's recommendations against the
purchases in ``holdout_events``: match rate, precision/recall/NDCG@k,
coverage, diversity, average price and the share of users per fallback level.
The comparison lands in the ``backtest`` table of ``--warehouse``.
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile
from typing import Dict, List, Optional

import pandas as pd
import pyarrow as pa

from models import metrics
from models.config_file import ConfigError, load_config
from models.popularity import order_lines
from pipelines import batch_recommendations
from pipelines.jobs import OneLineParser, UsageError, locked_warehouse, run_with_status
from pipelines.options import as_of_of, require_input_dir
from pipelines.train_ranker import check_inputs
from transforms.io import read_frame
from transforms.warehouse import LocalWarehouse


def holdout_purchases(input_dir: str) -> Dict[str, frozenset]:
    """Each user's distinct SKUs ordered in the held-out period."""
    events, _ = read_frame(input_dir, "holdout_events")
    return order_lines(events).groupby("user_id")["sku"].agg(frozenset).to_dict()


def evaluate_strategies(input_dir: str, as_of: str, num_shards: int, scratch: str,
                        config_path: Optional[str] = None) -> pd.DataFrame:
    """Run each strategy and score it on the holdout; one row per strategy."""
    future = holdout_purchases(input_dir)
    catalogue_size = read_frame(input_dir, "catalog")[0]["sku"].nunique()
    k = load_config(config_path).rules.recs_per_user
    config_args = ["--config", config_path] if config_path else []
    rows = []
    for strategy in ("global", "segment"):
        warehouse = os.path.join(scratch, f"{strategy}.duckdb")
        code = batch_recommendations.run([
            "--input_dir", input_dir, "--warehouse", warehouse, "--as_of", as_of,
            "--strategy", strategy, "--num_shards", str(num_shards),
            "--run_id", f"backtest_{strategy}", *config_args])
        if code != 0:
            print(f"the {strategy} run was gated; see its summary above", file=sys.stderr)
            raise SystemExit(1)  # gated, like the batch job
        recs = LocalWarehouse(warehouse).query("SELECT * FROM recommendations")
        figures = metrics.evaluate(recs, future, k, catalogue_size)
        shares = figures.pop("fallback_shares")
        rows.append({"strategy": strategy, **figures,
                     **{f"share_{level}": share for level, share in shares.items()}})
    return pd.DataFrame(rows).fillna(0.0)


def format_table(table: pd.DataFrame) -> str:
    """The comparison as aligned text, metrics down, strategies across."""
    shown = table.set_index("strategy").T
    return shown.to_string(float_format=lambda v: f"{v:.4f}")


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
    args = parser.parse_args(argv)
    as_of = as_of_of(args.as_of, pd.Timestamp.now(tz="UTC"))  # strict, before anything runs
    if args.num_shards < 1:
        raise UsageError("--num_shards must be >= 1")
    try:
        config = load_config(args.config)
    except ConfigError as err:
        raise UsageError(f"--config: {err}")
    require_input_dir(args.input_dir)
    check_inputs(args.input_dir, config, holdout=True)
    with locked_warehouse(args.warehouse, "backtest"):
        with tempfile.TemporaryDirectory(prefix="backtest_") as scratch:
            table = evaluate_strategies(args.input_dir, args.as_of, args.num_shards, scratch,
                                        args.config)
        table.insert(0, "as_of", as_of)
        LocalWarehouse(args.warehouse).publish(
            "backtest", {}, {"backtest": pa.Table.from_pandas(table, preserve_index=False)},
            swap=False)
    print("\nBacktest on the held-out period (users recommended by each strategy):")
    print(format_table(table.drop(columns="as_of")))
    return 0


if __name__ == "__main__":
    logging.getLogger().setLevel(logging.WARNING)
    sys.exit(run_with_status(main, sys.argv[1:], job="backtest"))
