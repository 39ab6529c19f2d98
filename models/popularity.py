"""Time-decayed segment popularity and its shrinkage toward coarser levels (SPEC §3).

Popularity of a SKU in a segment is the half-life-decayed count of distinct
orders that contain it. A thin segment borrows strength from its parent level
(year → make+model → make → global) in proportion to how little data it has,
so a segment with three orders does not rank parts on noise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from models.config import RecsConfig
from models.contracts import ORDER_EVENT_NAMES

POPULARITY_COLUMNS = ("level", "segment", "sku", "weight", "orders")
KEY_SEPARATOR = "|"


def order_lines(events: pd.DataFrame) -> pd.DataFrame:
    """Distinct (order_id, sku) purchases, each at its earliest event time.

    One order is reported under three event names (SPEC §2); counting each
    name would triple it, so the three collapse into one line.
    """
    orders = events.loc[events["event_name"].isin(ORDER_EVENT_NAMES),
                        ["order_id", "sku", "user_id", "event_time"]]
    orders = orders.sort_values(["order_id", "sku", "event_time"], kind="stable")
    return orders.drop_duplicates(["order_id", "sku"], keep="first").reset_index(drop=True)


def decay_weights(event_times: pd.Series, as_of: pd.Timestamp, half_life_days: float) -> np.ndarray:
    """0.5 ** (age in days / half-life); events after ``as_of`` weigh nothing.

    >>> t = pd.Series(pd.to_datetime(["2026-01-31", "2026-01-01"], utc=True))
    >>> decay_weights(t, pd.Timestamp("2026-01-31", tz="UTC"), 30.0).round(3).tolist()
    [1.0, 0.5]
    """
    age_days = (as_of - event_times).dt.total_seconds().to_numpy(float) / 86_400.0
    weights = np.power(0.5, age_days / half_life_days)
    return np.where(age_days >= 0, weights, 0.0)


def segment_keys(frame: pd.DataFrame, level: Sequence[str]) -> pd.Series:
    """The segment of each row at one level, e.g. ``Ford|Mustang|2015``; None if incomplete."""
    if not level:
        return pd.Series([""] * len(frame), index=frame.index, dtype=object)
    parts = [frame[a].astype(object) for a in level]
    complete = np.logical_and.reduce([p.notna().to_numpy(bool) for p in parts])
    text = parts[0].astype(str)
    for part in parts[1:]:
        text = text + KEY_SEPARATOR + part.astype(str)
    return pd.Series(np.where(complete, text.to_numpy(object), None), index=frame.index,
                     dtype=object)


def segment_key(values: Sequence) -> Optional[str]:
    """One row's segment key from its attribute values; None if any is missing.

    >>> segment_key(["Ford", "Mustang", 2015]), segment_key(["Ford", None])
    ('Ford|Mustang|2015', None)
    """
    if any(v is None or v is pd.NA or (isinstance(v, float) and np.isnan(v)) for v in values):
        return None
    return KEY_SEPARATOR.join(str(v) for v in values)


def partial_popularity(lines: pd.DataFrame, as_of: pd.Timestamp,
                       config: RecsConfig) -> pd.DataFrame:
    """Decayed order counts per (level, segment, sku) for one batch of order lines.

    ``lines`` carry the buyer's segment attributes. The result is additive, so
    batches combine by summing (see :func:`merge_popularity`).
    """
    weights = decay_weights(lines["event_time"], as_of, config.scoring.half_life_days)
    live = weights > 0
    frames = []
    for level in config.levels:
        keys = segment_keys(lines, level)
        mask = live & keys.notna().to_numpy(bool)
        frames.append(pd.DataFrame({
            "level": config.level_name(level),
            "segment": keys.to_numpy(object)[mask],
            "sku": lines["sku"].to_numpy(object)[mask],
            "weight": weights[mask],
            "orders": np.ones(mask.sum(), dtype=np.int64),
        }))
    return merge_popularity(frames)


def merge_popularity(frames: Iterable[pd.DataFrame]) -> pd.DataFrame:
    """Sum partial popularity frames: associative and commutative, as a combiner needs."""
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=t) for c, t in zip(
            POPULARITY_COLUMNS, (object, object, object, float, np.int64))})
    merged = pd.concat(frames, ignore_index=True)
    return (merged.groupby(["level", "segment", "sku"], sort=True, as_index=False)
            .agg(weight=("weight", "sum"), orders=("orders", "sum")))


@dataclass
class LevelTable:
    """One level's popularity as sparse rows per segment over catalogue positions."""

    sku_idx: Dict[str, np.ndarray]
    weight: Dict[str, np.ndarray]
    total: Dict[str, float]


class PopularityIndex:
    """Popularity looked up by (level, segment) as dense vectors over candidate SKUs.

    Built once per worker from the merged popularity frame and the catalogue's
    sorted SKU array; rows for SKUs outside the catalogue are ignored.
    """

    def __init__(self, popularity: pd.DataFrame, catalog_skus: np.ndarray, config: RecsConfig):
        self.config = config
        self.n_skus = len(catalog_skus)
        self.tables: Dict[str, LevelTable] = {}
        pos = np.searchsorted(catalog_skus, popularity["sku"].to_numpy(str)) if len(
            popularity) else np.array([], dtype=int)
        pos = np.clip(pos, 0, max(self.n_skus - 1, 0))
        known = (catalog_skus[pos] == popularity["sku"].to_numpy(str)) if self.n_skus else pos < 0
        frame = popularity.assign(_idx=pos).loc[known]
        for level in config.levels:
            name = config.level_name(level)
            rows = frame.loc[frame["level"] == name]
            table = LevelTable({}, {}, {})
            for segment, group in rows.groupby("segment", sort=False):
                table.sku_idx[segment] = group["_idx"].to_numpy(np.int64)
                table.weight[segment] = group["weight"].to_numpy(float)
                table.total[segment] = float(group["weight"].sum())
            self.tables[name] = table

    def dense(self, level_name: str, segment: Optional[str], candidates: np.ndarray
              ) -> Tuple[np.ndarray, float]:
        """Decayed weights of ``candidates`` (catalogue positions) in a segment, and its total."""
        table = self.tables[level_name]
        out = np.zeros(len(candidates))
        if segment is None or segment not in table.sku_idx:
            return out, 0.0
        idx, weight = table.sku_idx[segment], table.weight[segment]
        where = np.searchsorted(candidates, idx)
        where = np.clip(where, 0, max(len(candidates) - 1, 0))
        hit = (candidates[where] == idx) if len(candidates) else where < 0
        out[where[hit]] = weight[hit]
        return out, table.total[segment]

    def observed(self, level_name: str, segment: Optional[str]) -> np.ndarray:
        """Catalogue positions of SKUs ordered at least once in a segment."""
        table = self.tables[level_name]
        if segment is None:
            return np.array([], dtype=np.int64)
        return table.sku_idx.get(segment, np.array([], dtype=np.int64))


@dataclass(frozen=True)
class LevelScores:
    """Blended popularity of the candidates at one level (the level it would serve from)."""

    name: str
    segment: Optional[str]
    rate: np.ndarray       # shrunk order share, in [0, 1]
    observed: np.ndarray   # bool: ordered in this very segment


def blended_levels(index: PopularityIndex, segments: List[Optional[str]],
                   candidates: np.ndarray) -> List[LevelScores]:
    """Shrunk popularity of each candidate at every level, most specific first.

    Global share starts from a uniform prior over the catalogue; each finer
    level is (own weight + k · parent share) / (own total + k), with k the
    configured pseudo-orders. A level with far more data than k stands on its
    own; one with little data mostly repeats its parent.
    """
    config = index.config
    k = config.scoring.shrinkage_orders
    rate = np.full(len(candidates), 1.0 / max(index.n_skus, 1))
    out: List[LevelScores] = []
    for level, segment in zip(reversed(config.levels), reversed(segments)):
        name = config.level_name(level)
        weight, total = index.dense(name, segment, candidates)
        rate = (weight + k * rate) / (total + k) if (total + k) > 0 else rate
        out.append(LevelScores(name, segment, rate, weight > 0))
    return out[::-1]


def popularity_score(rate: np.ndarray, config: RecsConfig) -> np.ndarray:
    """Log-scale popularity: log(1 + share · scale), finite and non-negative."""
    return np.log1p(np.clip(rate, 0.0, 1.0) * config.scoring.popularity_scale)
