"""Choosing the settings by backtest: a grid of configurations scored on earlier periods (#14).

Pure pandas/numpy (and DuckDB for the SQL baselines); ``pipelines.tune`` reads
the files and writes the results. Every variant is scored by the same handler
the batch job applies (:func:`models.recommend_handler.recommend_history`), on
one loaded dataset: each period's history is prepared once, and the pieces a
variant shares with an earlier one (popularity, similarity, per-user
candidates) are reused. Each variant is compared with the SQL baselines and
with the base configuration by a paired 95% interval of per-user precision@k,
pooled over the periods and cluster-robust by user
(:func:`models.mix.paired_interval`).
"""
from __future__ import annotations

import itertools
import time
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence

import numpy as np
import pandas as pd

from models import baselines, metrics
from models.catalog import CatalogArrays
from models.config import RecsConfig
from models.config_file import ConfigError, config_from_dict, config_to_dict
from models.mix import paired_interval
from models.popularity import order_lines
from models.recommend_handler import History, prepare_history, recommend_history

BASE = "base"
BASELINE = baselines.OWN_THEN_POPULAR

DEFAULT_GRID: Dict[str, List[Any]] = {
    "candidates.mix": [
        [["segment_popularity", 4]],
        [["buy_again", 3], ["segment_popularity", 1]],
        [["buy_again", 2], ["also_bought", 1], ["segment_popularity", 1]],
        [["buy_again", 2], ["segment_popularity", 1], ["also_bought", 1]],
    ],
    "candidates.buy_again.half_life_days": [30.0, 365.0],
    "candidates.buy_again.due": [True, False],
    "candidates.also_bought.similarity": ["count", "jaccard"],
    "scoring.half_life_days": [30.0, 90.0],
}
"""The grid ``pipelines.tune`` runs without ``--grid``: 4 mixes × 2 × 2 × 2 × 2 = 64 variants,
fewer once variants that cannot differ (settings of a source the mix does not use) are
merged. Mixes assume k = 4."""


class Variant(NamedTuple):
    """One configuration of the grid: its name, the settings it changes, the whole config."""

    name: str
    settings: Dict[str, Any]
    config: RecsConfig


def _nested(settings: Mapping[str, Any]) -> dict:
    out: dict = {}
    for dotted, value in settings.items():
        node = out
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def _used(settings: Mapping[str, Any], config: RecsConfig) -> Dict[str, Any]:
    """The settings that can change this variant's lists (a source's settings only when the
    mix uses it, or it is boosted), so equivalent variants are scored once."""
    sources = set(config.candidates.sources)
    if config.candidates.trending.boost_sources:
        sources.add("trending")
    kept = {}
    for key, value in settings.items():
        parts = key.split(".")
        if parts[0] == "candidates" and len(parts) > 2 and parts[1] in (
                "buy_again", "also_bought", "trending") and parts[1] not in sources:
            continue
        kept[key] = value
    return kept


def _fingerprint(config: RecsConfig) -> str:
    """The configuration without the settings of sources it does not use."""
    plain = config_to_dict(config)
    used = set(config.candidates.sources) | (
        {"trending"} if config.candidates.trending.boost_sources else set())
    for source in ("buy_again", "also_bought", "trending"):
        if source not in used:
            plain["candidates"].pop(source, None)
    return repr(plain)


def expand_grid(axes: Mapping[str, Sequence[Any]], base: RecsConfig) -> List[Variant]:
    """Every combination of ``axes`` (dotted config keys → values) over ``base``, validated.

    Combinations that differ only in settings of sources their mix does not use
    are one variant. The base configuration itself is always the first variant
    (:data:`BASE`). A key or value the configuration refuses raises
    :class:`models.config_file.ConfigError` naming the variant, before any data
    is read.

    >>> vs = expand_grid({"candidates.mix": [[["segment_popularity", 4]], [["buy_again", 4]]],
    ...                   "candidates.buy_again.due": [True, False]}, RecsConfig())
    >>> [v.name for v in vs]  # popularity with either due-ness is the base itself
    ['base', 'v1', 'v2']
    >>> vs[2].settings
    {'candidates.mix': [['buy_again', 4]], 'candidates.buy_again.due': False}
    """
    keys = list(axes)
    for key in keys:
        if not isinstance(axes[key], (list, tuple)) or not axes[key]:
            raise ConfigError(f"grid: {key!r} needs a non-empty list of values")
    out = [Variant(BASE, {}, base)]
    seen = {_fingerprint(base)}
    for values in itertools.product(*(axes[k] for k in keys)):
        settings = dict(zip(keys, values))
        try:
            config = config_from_dict(_nested(settings), base, f"grid variant {settings}")
        except ConfigError:
            raise
        except ValueError as err:  # a cross-section check (e.g. mix slots against k)
            raise ConfigError(f"grid variant {settings}: {err}") from None
        fingerprint = _fingerprint(config)
        if fingerprint in seen:
            continue
        seen.add(fingerprint)
        out.append(Variant(f"v{len(out)}", _used(settings, config), config))
    return out


class Period(NamedTuple):
    """One backtest period: lists from history up to ``cutoff``, scored on what came after."""

    cutoff: pd.Timestamp
    future: Dict[str, frozenset]   # user → distinct SKUs bought in the test window
    users: List[str]               # buyers in the test window (the evaluated people)
    baselines: Dict[str, pd.DataFrame]


class Data(NamedTuple):
    """The loaded, validated inputs (SKUs not in the catalogue already dropped)."""

    catalog: pd.DataFrame          # resolved
    users: pd.DataFrame
    events: pd.DataFrame           # history
    fitment: pd.DataFrame
    holdout: Optional[pd.DataFrame] = None


def periods_of(data: Data, input_dir: str, as_of: pd.Timestamp, n: int, period_days: float,
               k: int, config: RecsConfig, holdout: bool = False) -> List[Period]:
    """``n`` periods of ``period_days`` ending at ``as_of`` (the latest last), each scored on
    the history events after its cutoff; with ``holdout`` the official holdout after
    ``as_of`` instead (one period). Baselines are the SQL of :mod:`models.baselines`."""
    arrays = CatalogArrays.build(data.catalog, config.rules)
    eligible = arrays.sku[arrays.eligible]
    if holdout:
        spans = [(as_of, order_lines(data.holdout))]
    else:
        lines = order_lines(data.events)
        step = pd.Timedelta(days=period_days)
        spans = []
        for i in range(n, 0, -1):
            cutoff = as_of - i * step
            window = lines.loc[(lines["event_time"] > cutoff)
                               & (lines["event_time"] <= cutoff + step)]
            spans.append((cutoff, window))
    out = []
    for cutoff, window in spans:
        future = window.groupby("user_id")["sku"].agg(frozenset).to_dict()
        users = sorted((str(u) for u, b in future.items() if b))
        future = {str(u): b for u, b in future.items()}
        out.append(Period(cutoff, future, users,
                          baselines.baseline_lists(input_dir, cutoff, k, eligible)))
    return out


class Scores(NamedTuple):
    """One strategy on one period: its metrics and per-user precision (``users`` order)."""

    metrics: Dict[str, float]
    per_user: np.ndarray


def long_lists(recs: pd.DataFrame, k: int) -> pd.DataFrame:
    """Wide recommendation rows (``rec_part_1..k``) as ``user_id, slot, sku``."""
    parts = [pd.DataFrame({"user_id": recs["user_id"].astype(str), "slot": i,
                           "sku": recs[f"rec_part_{i}"]}) for i in range(1, k + 1)]
    out = pd.concat(parts, ignore_index=True)
    return out.loc[out["sku"].notna()].reset_index(drop=True)


class Tuner:
    """Scores variants on periods, preparing each period's history once.

    ``progress`` receives one line per (variant, period) scored.
    """

    def __init__(self, data: Data, periods: Sequence[Period], k: int,
                 progress: Callable[[str], None] = lambda line: None):
        self.data = data
        self.periods = list(periods)
        self.k = k
        self.progress = progress
        self._histories: Dict[tuple, History] = {}
        self._caches: Dict[tuple, dict] = {}
        arrays = CatalogArrays.build(data.catalog, RecsConfig().rules)
        self.catalogue_size = len(arrays.sku)
        self.price_of = dict(zip(arrays.sku, arrays.price))

    def _history(self, p: int, config: RecsConfig) -> tuple:
        period = self.periods[p]
        key = (p, config.rules.exclusion_days, config.scoring.intent_window_days,
               config.segment_attributes)
        if key not in self._histories:
            events = self.data.events
            events = events.loc[pd.to_datetime(events["event_time"], utc=True)
                                <= period.cutoff]
            self._histories[key] = prepare_history(self.data.users, events, period.cutoff,
                                                   config)
            self._caches[key] = {}
        return self._histories[key], self._caches[key]

    def evaluate(self, lists: pd.DataFrame, p: int) -> Scores:
        period = self.periods[p]
        got = metrics.evaluate_lists(lists, period.future, self.k, self.catalogue_size,
                                     self.price_of, period.users)
        per_user = got.pop("per_user_precision")
        return Scores(got, per_user)

    def score(self, variant: Variant, p: int) -> Scores:
        history, cache = self._history(p, variant.config)
        scored = recommend_history(history, self.data.catalog, self.data.fitment,
                                   self.periods[p].cutoff, variant.config, cache)
        return self.evaluate(long_lists(scored.rows, self.k), p)

    def run(self, variants: Sequence[Variant]) -> Dict[str, List[Scores]]:
        """Every variant on every period (and the baselines), with progress lines."""
        out: Dict[str, List[Scores]] = {
            name: [self.evaluate(period.baselines[name], p)
                   for p, period in enumerate(self.periods)]
            for name in baselines.BASELINES}
        total, done, start = len(variants) * len(self.periods), 0, time.monotonic()
        for variant in variants:
            out[variant.name] = []
            for p in range(len(self.periods)):
                scores = self.score(variant, p)
                out[variant.name].append(scores)
                done += 1
                elapsed = time.monotonic() - start
                self.progress(
                    f"[{done}/{total}] {variant.name} period {p + 1} "
                    f"(cutoff {self.periods[p].cutoff.date()}): precision@{self.k} "
                    f"{scores.metrics['precision_at_k']:.4f}; {elapsed:.0f} s, about "
                    f"{elapsed / done * (total - done):.0f} s left")
        return out


def evidence(results: Mapping[str, List[Scores]], variants: Sequence[Variant],
             periods: Sequence[Period], k: int) -> pd.DataFrame:
    """One row per strategy: pooled metrics, per-period precision, and paired intervals
    against each SQL baseline and the base configuration (pooled, cluster-robust by user),
    best pooled precision first."""
    clusters = [u for period in periods for u in period.users]
    pooled = {name: np.concatenate([s.per_user for s in scores])
              for name, scores in results.items()}
    described = {v.name: v.settings for v in variants}
    rows = []
    for name, scores in results.items():
        n = np.array([len(p.users) for p in periods], dtype=float)
        row: Dict[str, Any] = {
            "strategy": name,
            "kind": "sql baseline" if name in baselines.BASELINES else "variant",
            "settings": described.get(name, {}),
            f"precision@{k}": float(pooled[name].mean()) if len(pooled[name]) else 0.0,
        }
        for metric in ("recall_at_k", "ndcg_at_k", "map_at_k", "hit_rate", "coverage"):
            values = [s.metrics.get(metric, float("nan")) for s in scores]
            row[metric.replace("_at_k", f"@{k}")] = float(np.average(values, weights=n))
        for i, s in enumerate(scores):
            row[f"precision@{k} period {i + 1}"] = s.metrics["precision_at_k"]
        for other, label in ((BASELINE, "vs_own_then_popular"),
                             (baselines.GLOBAL_POPULARITY, "vs_global_popularity"),
                             (BASE, "vs_base")):
            if other in pooled and other != name:
                vs = paired_interval(pooled[name], pooled[other], clusters=clusters)
                row[label] = vs["mean"]
                row[f"{label}_low"] = vs["low"]
                row[f"{label}_high"] = vs["high"]
        rows.append(row)
    table = pd.DataFrame(rows)
    return table.sort_values(f"precision@{k}", ascending=False, kind="stable").reset_index(
        drop=True)


def best_variant(table: pd.DataFrame, variants: Sequence[Variant], k: int) -> Variant:
    """The variant with the highest pooled precision@k (the base wins ties)."""
    by_name = {v.name: v for v in variants}
    ranked = table.loc[table["kind"] == "variant"].copy()
    ranked["_base"] = ranked["strategy"] != BASE
    ranked = ranked.sort_values([f"precision@{k}", "_base"], ascending=[False, True],
                                kind="stable")
    return by_name[ranked["strategy"].iloc[0]]


def markdown(table: pd.DataFrame, k: int) -> str:
    """The evidence table as markdown: precision and the intervals in points (pp)."""
    def pp(row, label):
        if label not in row or pd.isna(row.get(label)):
            return "—"
        return (f"{100 * row[label]:+.2f} [{100 * row[label + '_low']:+.2f}, "
                f"{100 * row[label + '_high']:+.2f}]")
    periods = [c for c in table.columns if c.startswith(f"precision@{k} period ")]
    head = (["strategy", "settings", f"precision@{k}"] + [c.split(" ", 1)[1] for c in periods]
            + ["vs own-then-popular (pp)", "vs global popularity (pp)", "vs base (pp)"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table.to_dict("records"):
        settings = ", ".join(f"{key}={value}" for key, value in row["settings"].items())
        cells = ([row["strategy"], settings or ("(SQL)" if row["kind"] == "sql baseline"
                                                 else "(the given config)"),
                  f"{100 * row[f'precision@{k}']:.2f}%"]
                 + [f"{100 * row[c]:.2f}%" for c in periods]
                 + [pp(row, "vs_own_then_popular"), pp(row, "vs_global_popularity"),
                    pp(row, "vs_base")])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
