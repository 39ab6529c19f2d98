"""Backtest of the #14 candidate sources and slot mixes on the real grocer, beside SQL baselines.

    python bench/candidates.py                       # imports the data into bench/work if missing
    python bench/candidates.py --data out/completejourney --periods 3 --ks 4,10
    python bench/candidates.py --world wholesale     # the generated repeat-buyer world, k=4,25

Data: dunnhumby "The Complete Journey" (``../shared/data/completejourney``) imported
with ``pipelines.import_dataset completejourney``; the grocer's retailer file
(``configs/completejourney.yaml``) decides which products may be recommended
(price ≥ $2, no fuel or coupons), the same eligible set for every strategy.

Backtest: for each cutoff (the official holdout start and 28, 56 … days before it)
every strategy sees only the order lines before the cutoff and is scored on the
distinct SKUs each household bought in the 28 days after it, over the households
that bought anything then (the population :func:`models.metrics.evaluate`
averages precision over). A short list counts its empty slots as misses.

Strategies:
  (a) ``sql_global_popularity``: one DuckDB SQL string: 30-day-decayed distinct orders.
  (b) ``sql_own_then_popular``: one DuckDB SQL string: each household's own
      most-bought eligible products (distinct orders, ties by recency), topped up
      with (a). **Every other strategy is compared with this one.**
  (c) each source alone: the job's segment popularity (``models.recommend``, the
      grocer config, exactly the batch job's ranking), buy-again (and two
      variants), also-bought per similarity measure (user rows and baskets),
      trending;
  (d) slot mixes (``models.mix.fill_slots``).

Paired intervals: per household, precision@k of a strategy minus that of (b);
pooled over household-periods with a cluster-robust (by household) 95% normal
interval (:func:`models.mix.paired_interval`).

Timing: the also-bought build (user rows, Jaccard, top 50, history cap 100) on the
official cutoff's history, in a fresh subprocess per side (so peak RSS is the
build's own process): :func:`models.candidates.item_similarity` against the same
similarity as one DuckDB SQL query, each repeated; the SQL table is compared
row by row with the Python one.

Generated worlds (``--world``): the same backtest on a world written by
``pipelines.generate_world`` (the ``wholesale`` preset is generated into bench/work when
missing; a directory of JSON Lines is used as it is), with that world's retailer file
(``configs/wholesale.yaml`` by default), at k=4 and k=25, plus the origin's mix (SPEC §8:
4/5 buy-again, 1/5 also-bought, popularity topping up, at most 3 per product group) and
intervals against (a) as well. Kept under ``worlds`` in the results, beside the grocer's.

Results: bench/results/candidates.json (docs/recommenders.md summarises them).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import duckdb  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from models import candidates as cand  # noqa: E402
from models.baselines import (GLOBAL_POPULARITY_SQL,  # noqa: E402
                              OWN_THEN_POPULAR_SQL, lines_sql)
from models.mix import fill_slots, list_metrics, paired_interval  # noqa: E402

RESULTS = os.path.join(HERE, "results", "candidates.json")
DEFAULT_DATA = os.path.join(HERE, "work", "completejourney")
DEFAULT_SOURCE = os.path.join(ROOT, "..", "shared", "data", "completejourney")
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "completejourney.yaml")
PERIOD_DAYS = 28
HALF_LIFE = 30.0
BASELINE = "sql_own_then_popular"
SIMILARITY_ARGS = {"similarity": "jaccard", "top_n": 50, "max_history": 100, "mode": "user"}
# name -> (half-life days, due-ness on): the SPEC default and what the grocer's data asks for
BUY_AGAIN_VARIANTS = {"buy_again": (HALF_LIFE, True), "buy_again_no_due": (HALF_LIFE, False),
                      "buy_again_hl365": (365.0, True), "buy_again_hl365_no_due": (365.0, False)}
# name -> (similarity, rows, minimum co-occurrence)
ALSO_BOUGHT_VARIANTS = {f"also_bought_{m}": (m, "user", 1) for m in cand.SIMILARITIES}
ALSO_BOUGHT_VARIANTS.update({"also_bought_jaccard_min3": ("jaccard", "user", 3),
                             "also_bought_jaccard_basket": ("jaccard", "basket", 1)})
# family -> (buy-again variant, also-bought variant). "defaults": the functions' defaults
# (30-day half-life with due-ness, SAR Jaccard). "grocer": chosen by looking at the official
# holdout (in-sample; the earlier periods are the fairer check of it).
MIX_FAMILIES = {"defaults": ("buy_again", "also_bought_jaccard"),
                "grocer": ("buy_again_hl365_no_due", "also_bought_count")}
# The two baselines (plain DuckDB SQL over the imported files) live in models/baselines.py,
# shared with pipelines.backtest; the similarity below is only this benchmark's.

SIMILARITY_SQL = """
WITH last AS (SELECT user_id, sku, max(event_time) AS t FROM history GROUP BY user_id, sku),
capped AS (SELECT * FROM last
           QUALIFY row_number() OVER (PARTITION BY user_id ORDER BY t DESC, sku) <= $max_history),
occ AS (SELECT sku, count(*) AS n FROM capped GROUP BY sku),
pairs AS (SELECT a.sku AS sku, b.sku AS neighbour, count(*) AS c
          FROM capped a JOIN capped b ON a.user_id = b.user_id AND a.sku <> b.sku
          GROUP BY a.sku, b.sku)
SELECT p.sku, p.neighbour, p.c / (oa.n + ob.n - p.c) AS similarity, p.c AS cooccurrence
FROM pairs p JOIN occ oa ON oa.sku = p.sku JOIN occ ob ON ob.sku = p.neighbour
QUALIFY row_number() OVER (PARTITION BY p.sku
                           ORDER BY similarity DESC, cooccurrence DESC, p.neighbour) <= $top_n
"""


def loadavg():
    try:
        with open("/proc/loadavg", encoding="ascii") as handle:
            return [float(v) for v in handle.read().split()[:3]]
    except OSError:
        return None


def rss_mib() -> float:
    """Current resident set size of this process."""
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def reset_peak_rss() -> bool:
    """Resets this process's RSS high-water mark (Linux), so the peak is the build's own."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    """This process's RSS high-water mark (since :func:`reset_peak_rss`)."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def ensure_data(data: str, source: str) -> None:
    if os.path.exists(os.path.join(data, "world.json")):
        return
    subprocess.run([sys.executable, "-m", "pipelines.import_dataset", "completejourney",
                    "--source", source, "--out", data], cwd=ROOT, check=True)


def jsonl(data: str, table: str) -> str:
    return os.path.join(data, f"{table}.jsonl")


def load_lines(data: str) -> pd.DataFrame:
    """Distinct order lines of history and holdout (the sources' input), times in UTC."""
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.execute(lines_sql(data))
    lines = con.execute("SELECT * FROM lines").df()
    lines["event_time"] = pd.to_datetime(lines["event_time"], utc=True)
    for column in ("order_id", "sku", "user_id"):
        lines[column] = lines[column].astype(str)
    return lines


class Grocer:
    """The imported data, the eligible catalogue and the job's segment popularity."""

    def __init__(self, data: str, config_path: str):
        from models.catalog import CatalogArrays, resolve_conflicts
        from models.config_file import load_config
        from models.profiles import mark_duplicate_users
        from transforms.io import read_frame

        self.data = data
        self.config = load_config(config_path)
        self.world = json.load(open(os.path.join(data, "world.json"), encoding="utf-8"))
        catalog = resolve_conflicts(read_frame(data, "catalog")[0]).catalog
        self.arrays = CatalogArrays.build(catalog, self.config.rules)
        self.eligible = pd.DataFrame({"sku": self.arrays.sku[self.arrays.eligible]})
        self.eligible_set = frozenset(self.eligible["sku"])
        self.part_type = dict(zip(self.arrays.sku, self.arrays.part_type))
        self.catalogue_size = len(self.arrays.sku)
        users = read_frame(data, "users")[0]
        self.users = mark_duplicate_users(users, "email_lower")
        self.user_ids = sorted(self.users.loc[~self.users["is_duplicate"], "user_id"].astype(str))
        events = pd.concat([read_frame(data, "events")[0], read_frame(data, "holdout_events")[0]],
                           ignore_index=True)
        self.events = events
        self.lines = load_lines(data)
        self.sql = duckdb.connect()
        self.sql.execute("SET TimeZone = 'UTC'")
        self.sql.execute(lines_sql(data))
        self.sql.register("eligible", self.eligible)
        self.sql.execute("CREATE TABLE users AS SELECT DISTINCT CAST(user_id AS VARCHAR) "
                         "AS user_id FROM read_json_auto(?, format = 'newline_delimited')",
                         [jsonl(data, "users")])

    def run_sql(self, query: str, cutoff: pd.Timestamp, k: int) -> pd.DataFrame:
        out = self.sql.execute(query, {"cutoff": cutoff.to_pydatetime(), "k": k}).df()
        out["user_id"] = out["user_id"].astype(str)
        out["sku"] = out["sku"].astype(str)
        return out.assign(source="sql").sort_values(["user_id", "slot"]).reset_index(drop=True)

    def segment_popularity(self, cutoff: pd.Timestamp, n: int) -> pd.DataFrame:
        """The batch job's recommendations (segment popularity, grocer rules), n per user, long."""
        import dataclasses

        from models.popularity import PopularityIndex, partial_popularity
        from models.profiles import attach_signals, orders_with_segments
        from models.recommend import Recommender, recommend_all

        # segment popularity alone, n slots (a retailer file's own mix is measured separately)
        config = dataclasses.replace(
            self.config, rules=dataclasses.replace(self.config.rules, recs_per_user=n),
            candidates=dataclasses.replace(self.config.candidates,
                                           mix=(("segment_popularity", n),)))
        train = self.events.loc[self.events["event_time"] < cutoff]
        lines = orders_with_segments(train, self.users, config.segment_attributes)
        popularity = PopularityIndex(partial_popularity(lines, cutoff, config), self.arrays.sku,
                                     config)
        servable = self.users.loc[~self.users["is_duplicate"]].reset_index(drop=True)
        users = attach_signals(servable, train, cutoff, config)
        recs, _ = recommend_all(Recommender(self.arrays, popularity, config), users, {})
        long = pd.DataFrame({
            "user_id": np.repeat(recs["user_id"].astype(str).to_numpy(object), n),
            "slot": np.tile(np.arange(1, n + 1), len(recs)),
            "sku": recs[[f"rec_part_{i}" for i in range(1, n + 1)]].to_numpy(object).ravel(),
            "score": recs[[f"rec{i}_score" for i in range(1, n + 1)]].to_numpy(float).ravel()})
        return long.assign(source="segment_popularity")


def ranked_slots(frame: pd.DataFrame, k: int, source: str) -> pd.DataFrame:
    """A source's per-user candidates as its first k slots (a source alone)."""
    return fill_slots({source: frame[["user_id", "sku", "score"]]}, [(source, k)], k)


def eligible_only(frame: pd.DataFrame, eligible: frozenset) -> pd.DataFrame:
    return frame.loc[frame["sku"].isin(eligible)].reset_index(drop=True)


def period_strategies(g: Grocer, cutoff: pd.Timestamp, k: int, log: Dict,
                      origin_mix: bool = False) -> Dict[str, pd.DataFrame]:
    """Every strategy's slots for one cutoff at one k."""
    train = g.lines.loc[g.lines["event_time"] < cutoff].reset_index(drop=True)
    ok = g.eligible_set
    out: Dict[str, pd.DataFrame] = {
        "sql_global_popularity": g.run_sql(GLOBAL_POPULARITY_SQL, cutoff, k),
        BASELINE: g.run_sql(OWN_THEN_POPULAR_SQL, cutoff, k),
    }
    segment = g.segment_popularity(cutoff, k)
    out["segment_popularity"] = segment
    # the popularity source of the mixes: a longer segment ranking, so it can fill what the
    # other sources leave after duplicates are skipped
    segment_long = g.segment_popularity(cutoff, 3 * k)[["user_id", "sku", "score"]]

    def again(half_life: float, due: bool) -> pd.DataFrame:
        return eligible_only(cand.buy_again(train, cutoff, half_life, due=due), ok)

    buy = {name: again(*args) for name, args in BUY_AGAIN_VARIANTS.items()}
    for name, frame in buy.items():
        out[name] = ranked_slots(frame, k, "buy_again")

    also: Dict[str, pd.DataFrame] = {}
    for name, (measure, mode, min_co) in ALSO_BOUGHT_VARIANTS.items():
        built = cand.item_similarity(train, cutoff, measure, top_n=50, max_history=100,
                                     mode=mode, min_cooccurrence=min_co)
        scores = cand.also_bought_scores(train, built.table, cutoff, HALF_LIFE,
                                         max_history=100, max_per_user=None)
        also[name] = eligible_only(scores, ok)
        out[name] = ranked_slots(also[name], k, "also_bought")
        log.setdefault("similarity_builds", {})[name] = {
            "rows": built.rows, "pairs_generated": built.pairs_generated,
            "pairs_distinct": built.pairs_distinct, "pairs_kept": built.pairs_kept,
            "lines_capped": built.lines_capped}

    trend = cand.trending(train, cutoff, PERIOD_DAYS, min_count=5)
    hot = eligible_only(cand.trending_candidates(trend), ok)
    log["trending_skus_boosted"] = int(len(hot))
    out["trending"] = fill_slots({"trending": hot}, [("trending", k)], k, users=g.user_ids)

    half, quarter = max(1, k // 2), max(1, k // 4)
    mixes = {}
    for family, (again_name, also_name) in MIX_FAMILIES.items():
        sources = {"buy_again": buy[again_name], "also_bought": also[also_name],
                   "popularity": segment_long}
        for shape, mix in (
                ("buy_again_then_popularity", [("buy_again", k), ("popularity", k)]),
                ("again_also_popularity", [("buy_again", half), ("also_bought", quarter),
                                           ("popularity", k)]),
                ("again_popularity_also", [("buy_again", half),
                                           ("popularity", k - half - quarter),
                                           ("also_bought", k)])):
            name = f"mix_{family}_{shape}"
            mixes[name] = {"mix": [list(m) for m in mix], "buy_again": again_name,
                           "also_bought": also_name}
            out[name] = fill_slots(sources, mix, k, users=g.user_ids)
        if origin_mix:  # SPEC §8: 20 repurchase + 5 discovery of 25, 3 per product group
            discovery = max(1, k // 5)
            mix = [("buy_again", k - discovery), ("also_bought", discovery), ("popularity", k)]
            name = f"mix_{family}_origin_cap3"
            mixes[name] = {"mix": [list(m) for m in mix], "buy_again": again_name,
                           "also_bought": also_name, "max_per_part_type": 3}
            out[name] = fill_slots(sources, mix, k, max_per_group=3, group_of_sku=g.part_type,
                                   users=g.user_ids)
        name = f"mix_{family}_again_also_popularity_cap2"
        mixes[name] = {**mixes[f"mix_{family}_again_also_popularity"],
                       "max_per_part_type": 2}
        out[name] = fill_slots(sources, mixes[f"mix_{family}_again_also_popularity"]["mix"], k,
                               max_per_group=2, group_of_sku=g.part_type, users=g.user_ids)
    log["mixes"] = mixes
    return out


def backtest(g: Grocer, periods: int, ks: List[int], origin_mix: bool = False) -> dict:
    holdout_start = pd.Timestamp(g.world["holdout_start"])
    result: dict = {"periods": [], "by_k": {}}
    per_user: Dict[int, Dict[str, List[np.ndarray]]] = {k: {} for k in ks}
    clusters: Dict[int, List[np.ndarray]] = {k: [] for k in ks}
    for p in range(periods):
        cutoff = holdout_start - pd.Timedelta(days=PERIOD_DAYS * p)
        end = cutoff + pd.Timedelta(days=PERIOD_DAYS)
        test = g.lines.loc[(g.lines["event_time"] >= cutoff) & (g.lines["event_time"] < end)]
        purchases = test.groupby("user_id")["sku"].agg(frozenset).to_dict()
        buyers = sorted(u for u, b in purchases.items() if b)
        period = {"cutoff": cutoff.isoformat(), "test_end": end.isoformat(),
                  "train_lines": int((g.lines["event_time"] < cutoff).sum()),
                  "test_lines": int(len(test)), "buyers": len(buyers), "by_k": {}}
        for k in ks:
            started = time.perf_counter()
            log: dict = {}
            strategies = period_strategies(g, cutoff, k, log, origin_mix)
            figures = {}
            for name, slots in strategies.items():
                got = list_metrics(slots, purchases, k, g.catalogue_size, users=buyers)
                per_user[k].setdefault(name, []).append(got.pop("per_user_precision"))
                got["users_served"] = int(slots["user_id"].nunique())
                got["mean_list_length"] = float(slots.groupby("user_id").size().mean())
                if name.startswith("mix"):
                    shares = slots["source"].value_counts(normalize=True)
                    got["slot_sources"] = {s: float(v) for s, v in shares.items()}
                figures[name] = got
            clusters[k].append(np.asarray(buyers, dtype=object))
            period["by_k"][str(k)] = {"strategies": figures, **log,
                                      "seconds": round(time.perf_counter() - started, 1)}
            base = figures[BASELINE][f"precision@{k}"]
            print(f"cutoff {cutoff.date()} k={k}: baseline (b) precision {base:.4f}; "
                  + ", ".join(f"{n} {f[f'precision@{k}']:.4f}" for n, f in figures.items()),
                  flush=True)
        result["periods"].append(period)
    for k in ks:
        pooled = {}
        base = np.concatenate(per_user[k][BASELINE])
        popular = np.concatenate(per_user[k]["sql_global_popularity"])
        who = np.concatenate(clusters[k])
        official = per_user[k][BASELINE][0]
        for name, parts in per_user[k].items():
            values = np.concatenate(parts)
            pooled[name] = {
                f"precision@{k}_pooled": float(values.mean()),
                "vs_baseline_b_pooled": paired_interval(values, base, clusters=who),
                "vs_baseline_b_official_holdout": paired_interval(parts[0], official),
                "vs_baseline_b_earlier_periods": (paired_interval(
                    np.concatenate(parts[1:]), np.concatenate(per_user[k][BASELINE][1:]),
                    clusters=np.concatenate(clusters[k][1:])) if len(parts) > 1 else None),
                "relative_to_baseline_b_pooled": (float(values.mean() / base.mean() - 1)
                                                  if base.mean() else None),
                "vs_baseline_a_pooled": paired_interval(values, popular, clusters=who),
                "relative_to_baseline_a_pooled": (float(values.mean() / popular.mean() - 1)
                                                  if popular.mean() else None),
            }
        result["by_k"][str(k)] = {"household_periods": int(len(base)),
                                  "households": int(len(set(who))), "strategies": pooled}
    return result


# --- the also-bought build, timed in its own process ------------------------------------------

def build_side(side: str, data: str, repeats: int) -> dict:
    """One side of the timing, run in a fresh process: load, then time the build only."""
    g_lines = load_lines(data)
    world = json.load(open(os.path.join(data, "world.json"), encoding="utf-8"))
    cutoff = pd.Timestamp(world["holdout_start"])
    history = g_lines.loc[g_lines["event_time"] < cutoff].reset_index(drop=True)
    before = rss_mib()
    reset = reset_peak_rss()
    runs = []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        if side == "python":
            built = cand.item_similarity(history, cutoff, **SIMILARITY_ARGS)
            table, facts = built.table, {"pairs_generated": built.pairs_generated,
                                         "pairs_distinct": built.pairs_distinct,
                                         "pairs_kept": built.pairs_kept,
                                         "lines_capped": built.lines_capped}
        else:
            con = duckdb.connect()
            con.register("history_frame", history)
            con.execute("CREATE TABLE history AS SELECT * FROM history_frame")
            wall, cpu = time.perf_counter(), time.process_time()  # load excluded
            table = con.execute(SIMILARITY_SQL, {"max_history": SIMILARITY_ARGS["max_history"],
                                                 "top_n": SIMILARITY_ARGS["top_n"]}).df()
            facts = {"pairs_kept": int(len(table)), "duckdb_threads": int(con.execute(
                "SELECT current_setting('threads')").fetchone()[0])}
        runs.append({"wall_seconds": time.perf_counter() - wall,
                     "cpu_seconds": time.process_time() - cpu})
    walls = sorted(r["wall_seconds"] for r in runs)
    cpus = sorted(r["cpu_seconds"] for r in runs)
    table = table.sort_values(["sku", "neighbour"]).reset_index(drop=True)
    table.to_parquet(os.path.join(os.path.dirname(RESULTS), f".similarity_{side}.parquet"))
    return {"side": side, "history_lines": int(len(history)), "repeats": repeats,
            "wall_seconds_median": round(walls[len(walls) // 2], 4),
            "cpu_seconds_median": round(cpus[len(cpus) // 2], 4),
            "wall_seconds_min": round(walls[0], 4),
            "rss_before_build_mib": round(before, 1),
            "peak_rss_mib": round(peak_rss_mib(), 1),
            "peak_rss_is_build_only": reset,
            **facts}


def time_similarity(data: str, repeats: int) -> dict:
    sides = {}
    for side in ("python", "duckdb_sql"):
        before = loadavg()
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--part", side,
                               "--data", data, "--repeats", str(repeats)],
                              cwd=ROOT, check=True, capture_output=True, text=True)
        sides[side] = {**json.loads(proc.stdout.strip().splitlines()[-1]),
                       "loadavg_before": before, "loadavg_after": loadavg()}
        print(f"  similarity build {side}: {sides[side]}", flush=True)
    paths = {s: os.path.join(os.path.dirname(RESULTS), f".similarity_{s}.parquet") for s in sides}
    py, sql = (pd.read_parquet(paths["python"]), pd.read_parquet(paths["duckdb_sql"]))
    for path in paths.values():
        os.remove(path)
    joined = py.merge(sql, on=["sku", "neighbour"], how="outer", suffixes=("_py", "_sql"),
                      indicator=True)
    both = joined["_merge"] == "both"
    same = both & np.isclose(joined["similarity_py"].fillna(-1),
                             joined["similarity_sql"].fillna(-1))
    sides["agreement"] = {"python_rows": int(len(py)), "sql_rows": int(len(sql)),
                          "rows_in_both_with_equal_similarity": int(same.sum())}
    sides["cpu_ratio_python_over_sql"] = round(
        sides["python"]["cpu_seconds_median"] / sides["duckdb_sql"]["cpu_seconds_median"], 3)
    sides["wall_ratio_python_over_sql"] = round(
        sides["python"]["wall_seconds_median"] / sides["duckdb_sql"]["wall_seconds_median"], 3)
    sides["settings"] = SIMILARITY_ARGS
    return sides


# Generated worlds for the build at scale (seed 7, Parquet, no bad rows): the `full` preset
# (2.0M history events but only 86k order lines: the field's order rate) and the same
# 500,000 users ordering ~17x more often (9.8M history events, 1.45M order lines).
SCALE_WORLDS = {"full": {}, "orders10m": {"orders_per_user": 2.0, "views_per_user": 6.5}}


def ensure_scale_world(name: str) -> str:
    """A world directory: ``name`` itself, or a SCALE_WORLDS world generated when missing."""
    if name not in SCALE_WORLDS:
        return name
    out = os.path.join(HERE, "work", f"candidates_{name}_world")
    if not os.path.exists(os.path.join(out, "world.json")):
        import dataclasses

        from models.world import WorldSpec, generate, write_world
        spec = dataclasses.replace(WorldSpec.preset("full"), **SCALE_WORLDS[name])
        write_world(generate(spec, 7), out, "parquet", 0)
    return out


# Generated worlds for the backtest (seed 7, JSON Lines, no bad rows) and their retailer files.
BACKTEST_WORLDS = {"wholesale": os.path.join(ROOT, "configs", "wholesale.yaml")}


def ensure_backtest_world(name: str) -> str:
    """A world directory: ``name`` itself, or a BACKTEST_WORLDS preset generated when missing."""
    if name not in BACKTEST_WORLDS:
        return name
    out = os.path.join(HERE, "work", f"candidates_{name}_world")
    if not os.path.exists(os.path.join(out, "world.json")):
        from models.world import generate, preset, write_world
        write_world(generate(preset(name), 7), out, "jsonl", 0)
    return out


def world_backtest(name: str, config: Optional[str], periods: int, ks: List[int]) -> int:
    """Backtests a generated world and keeps it under ``worlds`` beside the grocer's results."""
    data = ensure_backtest_world(name)
    config = config or BACKTEST_WORLDS.get(name) or DEFAULT_CONFIG
    started = time.perf_counter()
    g = Grocer(data, config)
    print(f"{name}: {len(g.lines):,} order lines, {len(g.user_ids):,} users, "
          f"{len(g.eligible):,} of {g.catalogue_size:,} products eligible", flush=True)
    entry = {
        "world": g.world.get("preset", os.path.basename(os.path.normpath(data))),
        "seed": g.world.get("seed"), "config": os.path.relpath(config, ROOT),
        "commit": commit(), "python": platform.python_version(), "cpus": os.cpu_count(),
        "generated_at": pd.Timestamp.now(tz="UTC").isoformat(timespec="seconds"),
        "order_lines": int(len(g.lines)), "users": len(g.user_ids),
        "eligible_products": int(len(g.eligible)), "catalogue_size": g.catalogue_size,
        "world_stats": g.world.get("stats"),
        "baseline": BASELINE, "period_days": PERIOD_DAYS, "half_life_days": HALF_LIFE,
        "backtest": backtest(g, periods, ks, origin_mix=True),
    }
    entry["seconds"] = round(time.perf_counter() - started, 1)
    result = {}
    if os.path.exists(RESULTS):
        with open(RESULTS, encoding="utf-8") as handle:
            result = json.load(handle)
    result.setdefault("worlds", {})[name] = entry
    with open(RESULTS, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=1, default=str)
        handle.write("\n")
    print(f"added world {name} to {os.path.relpath(RESULTS, ROOT)} in {entry['seconds']} s",
          flush=True)
    return 0


def add_scale_timing(world: str, repeats: int) -> int:
    """Times the also-bought build on a bigger world; kept beside the grocer's in the results."""
    timing = time_similarity(world, repeats)
    timing.update({"world": os.path.basename(os.path.normpath(world)), "commit": commit(),
                   "generated_at": pd.Timestamp.now(tz="UTC").isoformat(timespec="seconds")})
    result = {}
    if os.path.exists(RESULTS):
        with open(RESULTS, encoding="utf-8") as handle:
            result = json.load(handle)
    result.setdefault("also_bought_build_at_scale", {})[timing["world"]] = timing
    with open(RESULTS, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=1, default=str)
        handle.write("\n")
    print(f"added {timing['world']} to {os.path.relpath(RESULTS, ROOT)}", flush=True)
    return 0


def commit() -> Optional[str]:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=True,
                              capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DEFAULT_DATA, help="imported Complete Journey directory")
    parser.add_argument("--source", default=DEFAULT_SOURCE, help="raw dataset, for the import")
    parser.add_argument("--config", default=None,
                        help="retailer file (default: the grocer's, or the --world's own)")
    parser.add_argument("--periods", type=int, default=3, help="cutoffs, 28 days apart")
    parser.add_argument("--ks", default=None,
                        help="list lengths, comma-separated (default 4,10; 4,25 with --world)")
    parser.add_argument("--repeats", type=int, default=5, help="timing repeats per side")
    parser.add_argument("--scale_world", default=None,
                        help="only time the also-bought build on a world and add it to the "
                             "results: a directory (Parquet or JSON Lines) or one of "
                             + ", ".join(SCALE_WORLDS) + " (generated into bench/work)")
    parser.add_argument("--world", default=None,
                        help="backtest a generated world instead of the grocer and add it to "
                             "the results: a JSON Lines directory or one of "
                             + ", ".join(BACKTEST_WORLDS) + " (generated into bench/work)")
    parser.add_argument("--part", choices=("all", "python", "duckdb_sql"), default="all",
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.part != "all":
        print(json.dumps(build_side(args.part, args.data, args.repeats)))
        return 0
    if args.scale_world:
        return add_scale_timing(ensure_scale_world(args.scale_world), args.repeats)
    if args.world:
        return world_backtest(args.world, args.config, args.periods,
                              [int(k) for k in (args.ks or "4,25").split(",")])
    args.config = args.config or DEFAULT_CONFIG
    args.ks = args.ks or "4,10"
    ensure_data(args.data, args.source)
    started = time.perf_counter()
    g = Grocer(args.data, args.config)
    print(f"{len(g.lines):,} order lines, {len(g.user_ids):,} households, "
          f"{len(g.eligible):,} of {g.catalogue_size:,} products eligible", flush=True)
    result = {
        "dataset": "completejourney", "config": os.path.relpath(args.config, ROOT),
        "commit": commit(), "python": platform.python_version(), "cpus": os.cpu_count(),
        "generated_at": pd.Timestamp.now(tz="UTC").isoformat(timespec="seconds"),
        "order_lines": int(len(g.lines)), "households": len(g.user_ids),
        "eligible_products": int(len(g.eligible)), "catalogue_size": g.catalogue_size,
        "baseline": BASELINE, "period_days": PERIOD_DAYS, "half_life_days": HALF_LIFE,
        "backtest": backtest(g, args.periods, [int(k) for k in args.ks.split(",")]),
        "also_bought_build": time_similarity(args.data, args.repeats),
    }
    result["seconds"] = round(time.perf_counter() - started, 1)
    if os.path.exists(RESULTS):  # at-scale timings and worlds come from their own runs: keep
        with open(RESULTS, encoding="utf-8") as handle:
            previous = json.load(handle)
        for key in ("also_bought_build_at_scale", "worlds"):
            if previous.get(key):
                result[key] = previous[key]
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=1, default=str)
        handle.write("\n")
    print(f"wrote {os.path.relpath(RESULTS, ROOT)} in {result['seconds']} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
