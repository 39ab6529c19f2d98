"""Pick each user's recommendations from segment popularity, intent and the rules (SPEC §3).

Work is done per vehicle: candidates, blended popularity and the default
top-N are computed once and shared by every owner of that vehicle; only users
with their own signals (recent purchases to exclude, views or carts to boost)
get a personal pass over a short prefix of the ranking.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from models import mix as slot_mix
from models.candidates import apply_boost
from models.catalog import CatalogArrays
from models.config import REPURCHASE_SOURCES, RecsConfig, ScoringConfig
from models.popularity import (KEY_SEPARATOR, LevelScores, PopularityIndex, blended_levels,
                               popularity_score, segment_key, segment_keys)

SIGNAL_COLUMNS = ("bought", "carted", "viewed")
_NONE = np.array([], dtype=np.int64)
UNSERVED_REASON = "fewer eligible parts than recommendations at every level"
MIX_UNSERVED_REASON = "fewer eligible candidates than recommendations in every mix source"
POPULARITY = "segment_popularity"
# ``source`` of a mix row whose user no popularity level could serve (the other sources did).
NO_LEVEL = "none"


def rec_columns(n: int) -> List[str]:
    """The SPEC §3 recommendation columns for ``n`` recommendations, in table order."""
    cols = ["user_id", "email_lower", "make", "model", "year", "segment"]
    cols += [f"rec_part_{i}" for i in range(1, n + 1)]
    for field in ("price", "score", "image_url", "part_type"):
        cols += [f"rec{i}_{field}" for i in range(1, n + 1)]
    return cols + ["source"]


def slot_source_columns(n: int) -> List[str]:
    """Which mix source filled each slot: ``rec1_source`` .. ``recN_source`` (#14).

    Written only when the configuration's mix is more than segment popularity,
    so the default output keeps exactly the SPEC §3 columns.
    """
    return [f"rec{i}_source" for i in range(1, n + 1)]


def greedy_pick(order: np.ndarray, part_type: np.ndarray, variant_key: np.ndarray,
                n: int, max_per_type: int) -> List[int]:
    """First ``n`` items of ``order`` that keep rules 3 and 9.

    At most ``max_per_type`` per part type and one per variant group (a SKU
    without a group is its own group, so a specialised variant is never
    merged with its base SKU).

    >>> greedy_pick(np.arange(4), np.array(["a", "a", "a", "b"]),
    ...             np.array(["1", "2", "3", "4"]), 3, 2)
    [0, 1, 3]
    """
    picks: List[int] = []
    per_type: Dict[str, int] = {}
    seen_variants = set()
    for i in order:
        kind, variant = part_type[i], variant_key[i]
        if variant in seen_variants or per_type.get(kind, 0) >= max_per_type:
            continue
        picks.append(int(i))
        seen_variants.add(variant)
        per_type[kind] = per_type.get(kind, 0) + 1
        if len(picks) == n:
            break
    return picks


class Picks(NamedTuple):
    """Recommendations of a group of users: candidate-catalogue positions and scores."""

    served: np.ndarray   # bool per user
    items: np.ndarray    # (users, n) catalogue positions, -1 where unserved
    scores: np.ndarray   # (users, n)
    source: np.ndarray   # level name per user, None where unserved


@dataclass
class _Level:
    """One level's ranking for a vehicle, shared by all its users."""

    scores: LevelScores
    base: np.ndarray        # popularity + specificity score per candidate
    order: np.ndarray       # candidates sorted best first (ties by SKU)
    support: int            # candidates ordered in this very segment
    default: Optional[List[int]] = None


class Recommender:
    """Ranks candidates for users of one vehicle at a time; pure numpy, no Beam."""

    def __init__(self, catalog: CatalogArrays, popularity: PopularityIndex, config: RecsConfig):
        self.catalog = catalog
        self.popularity = popularity
        self.config = config
        self.universal = np.flatnonzero(catalog.eligible & catalog.is_universal)
        # One level's ranking for one candidate set is the same for every vehicle group that
        # shares the segment (the global level for all): computed once per recommender.
        self._ranked: Dict[tuple, _Level] = {}

    def candidates(self, fitting: np.ndarray) -> np.ndarray:
        """Eligible catalogue positions that fit the vehicle or are universal (rule 8).

        Without fitment attributes (a retailer with no fitment data) every
        eligible item is a candidate for every user.
        """
        if not self.config.fitment_attributes:
            return np.flatnonzero(self.catalog.eligible)
        fitting = np.asarray(fitting, dtype=np.int64)
        fitting = fitting[(fitting >= 0)]
        fitting = fitting[self.catalog.eligible[fitting]]
        return np.union1d(fitting, self.universal)

    def _levels(self, vehicle: pd.DataFrame, cand: np.ndarray) -> List[_Level]:
        first = vehicle.iloc[0]
        segments = [segment_key([first[a] for a in level]) for level in self.config.levels]
        specific = ~self.catalog.is_universal[cand]
        levels = []
        candidates = hash(cand.tobytes())
        for scores in blended_levels(self.popularity, segments, cand):
            if scores.segment is None:
                continue
            key = (scores.name, scores.segment, len(cand), candidates)
            if key not in self._ranked:
                base = popularity_score(scores.rate, self.config) + (
                    self.config.scoring.specific_bonus * specific)
                order = np.argsort(-base, kind="stable")  # cand is SKU-sorted: ties by SKU
                self._ranked[key] = _Level(scores, base, order, int(scores.observed.sum()))
            levels.append(self._ranked[key])
        return levels

    def recommend(self, users: pd.DataFrame, fitting: np.ndarray) -> Picks:
        """Recommendations for users who share one vehicle.

        ``users`` has the segment attributes and, per user, tuples of SKUs
        bought (to exclude), carted and viewed (to boost), already restricted
        to the configured windows.
        """
        n = self.config.rules.recs_per_user
        cap = self.config.rules.max_per_part_type
        cand = self.candidates(fitting)
        part_type = self.catalog.part_type[cand]
        variant = self.catalog.variant_key[cand]
        levels = self._levels(users, cand)
        count = len(users)
        items = np.full((count, n), -1, dtype=np.int64)
        scores = np.zeros((count, n))
        source = np.full(count, None, dtype=object)
        signals = {c: self._signal_positions(cand, users[c].to_numpy(object))
                   if c in users.columns else [_NONE] * count for c in SIGNAL_COLUMNS}
        weights = self.config.scoring
        for u in range(count):
            bought = signals["bought"][u]
            boost = _intent_boost(signals, u, weights)
            for level in levels:
                excluded_observed = int(level.scores.observed[bought].sum()) if len(bought) else 0
                if level.scores.name != levels[-1].scores.name and (
                        level.support - excluded_observed < n):
                    continue  # rule 12: too thin here, fall back to the next level
                if not len(bought) and not boost:
                    if level.default is None:
                        level.default = greedy_pick(level.order, part_type, variant, n, cap)
                    picked, picked_scores = level.default, level.base[level.default]
                else:
                    picked, picked_scores = self._personal(level, part_type, variant,
                                                           bought, boost, n, cap)
                if len(picked) == n:
                    items[u] = cand[picked]
                    scores[u] = picked_scores
                    source[u] = level.scores.name
                    break
        return Picks(source != None, items, scores, source)  # noqa: E711

    def popularity_lists(self, users: pd.DataFrame, fitting: np.ndarray, depth: int
                         ) -> Tuple[np.ndarray, pd.DataFrame]:
        """Segment popularity as a mix source: each user's level and ranked list.

        The level is the one :meth:`recommend` serves the user from (rule 12's
        fallback unchanged); the list is that level's ranking with the user's
        intent boosts, without what they bought, best first, ``depth`` long and
        before the caps (the mix applies them over the whole list).

        Returns:
          the level name per user (:data:`NO_LEVEL` where none could serve), and
          a frame ``user_id, sku, score``.
        """
        picks = self.recommend(users, fitting)
        cand = self.candidates(fitting)
        levels = {level.scores.name: level for level in self._levels(users, cand)}
        signals = {c: self._signal_positions(cand, users[c].to_numpy(object))
                   if c in users.columns else [_NONE] * len(users) for c in SIGNAL_COLUMNS}
        weights = self.config.scoring
        out_user, out_pos, out_score = [], [], []
        for u, (user, name) in enumerate(zip(users["user_id"].to_numpy(object), picks.source)):
            level = levels.get(name)
            if level is None:
                continue
            bought = signals["bought"][u]
            boost = _intent_boost(signals, u, weights)
            boosted = np.fromiter(boost.keys(), dtype=np.int64, count=len(boost))
            pool = np.union1d(level.order[:depth + len(bought)], boosted)
            pool = pool[~np.isin(pool, bought)]
            score = level.base[pool] + np.array([boost.get(int(p), 0.0) for p in pool])
            ranked = np.lexsort((pool, -score))[:depth]
            out_user += [user] * len(ranked)
            out_pos.append(cand[pool[ranked]])
            out_score.append(score[ranked])
        source = np.where(picks.served, picks.source, NO_LEVEL).astype(object)
        positions = np.concatenate(out_pos) if out_pos else _NONE
        return source, pd.DataFrame({
            "user_id": pd.Series(out_user, dtype=object),
            "sku": pd.Series(self.catalog.sku[positions], dtype=object),
            "score": np.concatenate(out_score) if out_score else np.zeros(0)})

    def _signal_positions(self, cand: np.ndarray, signal: np.ndarray) -> List[np.ndarray]:
        """Per user, positions within ``cand`` of the SKUs in one signal column.

        One catalogue lookup for the whole vehicle group, not one per user;
        SKUs that are not candidates are dropped.
        """
        lengths = np.fromiter((len(t) if t is not None else 0 for t in signal),
                              dtype=np.int64, count=len(signal))
        if not lengths.any() or not len(cand):
            return [_NONE] * len(signal)
        idx = self.catalog.index_of([sku for t in signal if t is not None for sku in t])
        where = np.clip(np.searchsorted(cand, idx), 0, len(cand) - 1)
        found = np.where((idx >= 0) & (cand[where] == idx), where, -1)
        return [part[part >= 0] for part in np.split(found, np.cumsum(lengths)[:-1])]

    @staticmethod
    def _personal(level: _Level, part_type, variant, bought: np.ndarray,
                  boost: Dict[int, float], n: int, cap: int) -> Tuple[List[int], np.ndarray]:
        """Greedy pick over a prefix of the shared ranking plus the user's boosted items.

        Every candidate outside the pool scores no more than the prefix's last
        item, so when every pick scores strictly above that, the greedy walk
        never reached an item it could not see and equals a walk over all
        candidates; otherwise the prefix grows to everything.
        """
        prefix = 8 * n + len(bought)
        boosted = np.fromiter(boost.keys(), dtype=np.int64, count=len(boost))
        while True:
            complete = prefix >= len(level.order)
            pool = np.union1d(level.order[:prefix], boosted)
            pool = pool[~np.isin(pool, bought)]
            score = level.base[pool] + np.array([boost.get(int(p), 0.0) for p in pool])
            ranked = np.lexsort((pool, -score))
            picked = greedy_pick(pool[ranked], part_type, variant, n, cap)
            picked_scores = level.base[picked] + np.array([boost.get(p, 0.0) for p in picked])
            if complete or (len(picked) == n and picked_scores[-1]
                            > level.base[level.order[prefix - 1]]):
                return picked, picked_scores
            prefix = len(level.order)


def recommend_all(recommender: Recommender, users: pd.DataFrame,
                  fitting: Mapping[str, Iterable[str]]) -> Tuple[pd.DataFrame, pd.DataFrame]:
    """Recommendation rows for many users, vehicle by vehicle, and the users left unserved.

    ``fitting`` maps a vehicle's fitment key to the SKUs that fit it.
    """
    config = recommender.config
    groups, all_picks = [], []
    for _, group in vehicle_groups(users, config.group_attributes):
        first = group.iloc[0]
        vehicle = segment_key([first[a] for a in config.fitment_attributes])
        fits = recommender.catalog.index_of(sorted(fitting.get(vehicle, ())))
        groups.append(group)
        all_picks.append(recommender.recommend(group, fits))
    if not groups:
        return picks_frame(users, Picks(*(np.empty((0,) + s, dtype=t) for s, t in (
            ((), bool), ((config.rules.recs_per_user,), np.int64),
            ((config.rules.recs_per_user,), float), ((), object)))),
            recommender.catalog, config), users
    ordered = pd.concat(groups, ignore_index=True)
    picks = Picks(*(np.concatenate(parts) for parts in zip(*all_picks)))
    frame = picks_frame(ordered, picks, recommender.catalog, config)
    return frame, ordered.loc[~picks.served].reset_index(drop=True)


def mix_all(recommender: Recommender, users: pd.DataFrame, fitting: Mapping[str, Iterable[str]],
            personal: pd.DataFrame, shared: Mapping[str, pd.DataFrame],
            boost: Optional[pd.DataFrame] = None,
            rerank=None) -> Tuple[pd.DataFrame, pd.DataFrame]:
    """Recommendation rows filled by the configured slot mix, vehicle by vehicle (#14).

    Every source is restricted to the vehicle's candidates (eligible and fitting
    or universal, as segment popularity's), and :func:`models.mix.fill_slots`
    fills each list: sources in mix order, a dry source's slots to the next, no
    SKU twice, one SKU per variant group, at most ``max_per_part_type`` per part
    type over the whole list, and rule 4's exclusion (the user's ``bought``
    tuples) on discovery sources only; buy-again is exempt by design.

    Args:
      personal: ``user_id, sku, score, source`` of the per-user sources
        (:func:`models.candidates.personal_candidates`).
      shared: source name → ``sku, score``, one list for every user (trending).
      boost: ``sku, multiplier`` of the trending SKUs; with ``segment_popularity`` in
        ``trending.boost_sources`` popularity's scores are multiplied by it (capped at
        ``scoring.max_score``, the formula's range that rule 11 checks) before the fill.
      rerank: optional ``rerank(by_source, excluded, k, fill) -> slots`` called instead
        of the plain fill (the union ranker, :mod:`models.union_ranker`): it gets the
        restricted per-source frames and rule 4's pairs, and ``fill(by_source, mix,
        repurchase_sources)`` is ``fill_slots`` with this run's caps.

    Returns:
      the rows (SPEC §3 columns, ``source`` = the popularity level or
      :data:`NO_LEVEL`, then :func:`slot_source_columns`) and the users left
      with fewer than N candidates.
    """
    config = recommender.config
    n, catalog = config.rules.recs_per_user, recommender.catalog
    mix = config.candidates.mix
    depth = 8 * n
    # Per vehicle: the candidate set and segment popularity's lists. Everything after is one
    # vectorised pass and one fill_slots call over all users of the shard.
    groups, levels, popular, allowed = [], [], [], []
    for v, (_, group) in enumerate(vehicle_groups(users, config.group_attributes)):
        first = group.iloc[0]
        vehicle = segment_key([first[a] for a in config.fitment_attributes])
        fits = catalog.index_of(sorted(fitting.get(vehicle, ())))
        level, ranked = recommender.popularity_lists(group, fits, depth)
        groups.append(group.assign(_vehicle=v))
        levels.append(level)
        popular.append(ranked)
        allowed.append(pd.DataFrame({"_vehicle": v, "sku": pd.Series(  # object: no re-encoding
            catalog.sku[recommender.candidates(fits)], dtype=object)}))
    columns = rec_columns(n) + slot_source_columns(n)
    if not groups:
        return pd.DataFrame(columns=columns), users.iloc[:0]
    ordered = pd.concat(groups, ignore_index=True)
    ids = ordered["user_id"].to_numpy(object)
    allowed_pairs = pd.concat(allowed, ignore_index=True)
    allowed_index = pd.MultiIndex.from_frame(allowed_pairs[["_vehicle", "sku"]])
    vehicle_of = pd.Series(ordered["_vehicle"].to_numpy(), index=pd.Index(ids))

    def restrict(frame: pd.DataFrame) -> pd.DataFrame:
        """Rows whose SKU is a candidate of the user's vehicle (eligible, fitting)."""
        frame = frame.loc[frame["user_id"].isin(ids)]
        probe = pd.MultiIndex.from_arrays([vehicle_of.reindex(frame["user_id"]).to_numpy(),
                                           frame["sku"].to_numpy(object)])
        return frame.loc[probe.isin(allowed_index), ["user_id", "sku", "score"]]

    sources = {}
    for name, _ in mix:
        if name == POPULARITY:
            sources[name] = pd.concat(popular, ignore_index=True)
            if boost is not None and POPULARITY in config.candidates.trending.boost_sources:
                boosted = apply_boost(sources[name], boost)
                sources[name] = boosted.assign(score=np.minimum(
                    boosted["score"].to_numpy(float), config.scoring.max_score))
        elif name in shared:  # one list for everyone, restricted per vehicle and cut to depth
            head = shared[name].sort_values(["score", "sku"], ascending=[False, True],
                                            kind="stable")
            per_vehicle = allowed_pairs.merge(head[["sku", "score"]], on="sku")
            per_vehicle = per_vehicle.sort_values(["_vehicle", "score", "sku"],
                                                  ascending=[True, False, True], kind="stable")
            per_vehicle = per_vehicle.loc[
                per_vehicle.groupby("_vehicle").cumcount().to_numpy() < depth]
            sources[name] = ordered[["user_id", "_vehicle"]].merge(
                per_vehicle, on="_vehicle")[["user_id", "sku", "score"]]
        else:
            sources[name] = restrict(personal.loc[personal["source"] == name])
    excluded = None
    if "bought" in ordered.columns:
        excluded = (ordered[["user_id", "bought"]].explode("bought").dropna()
                    .rename(columns={"bought": "sku"}))
    def fill(by_source, slot_mix_, repurchase=REPURCHASE_SOURCES):
        return slot_mix.fill_slots(
            by_source, slot_mix_, n, config.rules.max_per_part_type,
            dict(zip(catalog.sku, catalog.part_type)), excluded, repurchase, list(ids),
            dict(zip(catalog.sku, catalog.variant_key)))

    slots = fill(sources, mix) if rerank is None else rerank(sources, excluded, n, fill)
    full = slots.groupby("user_id", sort=False)["slot"].transform("size") == n
    slots = slots.loc[full.to_numpy(bool)]
    row = pd.Index(ids).get_indexer(slots["user_id"])
    served = np.zeros(len(ordered), dtype=bool)
    served[row] = True
    items = np.full((len(ordered), n), -1, dtype=np.int64)
    scores = np.zeros((len(ordered), n))
    kinds = np.full((len(ordered), n), None, dtype=object)
    col = slots["slot"].to_numpy(int) - 1
    items[row, col] = catalog.index_of(slots["sku"].tolist())
    scores[row, col] = slots["score"].to_numpy(float)
    kinds[row, col] = slots["source"].to_numpy(object)
    source = np.concatenate(levels).astype(object)
    ordered = ordered.drop(columns="_vehicle")
    frame = picks_frame(ordered, Picks(served, items, scores, source), catalog, config)
    for i, name in enumerate(slot_source_columns(n)):
        frame[name] = kinds[served, i]
    extra = [c for c in frame.columns if c not in columns]
    return frame[columns + extra], ordered.loc[~served].reset_index(drop=True)


def picks_frame(users: pd.DataFrame, picks: Picks, catalog: CatalogArrays,
                config: RecsConfig) -> pd.DataFrame:
    """The served users' recommendation rows with SPEC §3 columns (before run metadata)."""
    n = config.rules.recs_per_user
    served = users.loc[picks.served].reset_index(drop=True)
    items, scores = picks.items[picks.served], picks.scores[picks.served]
    out = {
        "user_id": served["user_id"].to_numpy(object),
        "email_lower": served["email_lower"].to_numpy(object),
    }
    for attr in ("make", "model", "year"):
        out[attr] = served[attr].to_numpy(object) if attr in served.columns else None
    out["segment"] = segment_keys(served, config.group_attributes).to_numpy(object)
    for i in range(n):
        out[f"rec_part_{i + 1}"] = catalog.sku[items[:, i]]
    for field, values in (("price", catalog.price), ("score", None),
                          ("image_url", catalog.image_url), ("part_type", catalog.part_type)):
        for i in range(n):
            column = scores[:, i] if values is None else values[items[:, i]]
            out[f"rec{i + 1}_{field}"] = column
    out["source"] = picks.source[picks.served]
    frame = pd.DataFrame(out)
    # Segment attributes beyond the vehicle (e.g. income) ride along for the QA
    # checks; the output schema keeps only the SPEC columns.
    extra = [a for a in config.group_attributes if a not in frame.columns]
    for attr in extra:
        frame[attr] = served[attr].to_numpy(object)
    return frame[rec_columns(n) + extra]


def vehicle_groups(users: pd.DataFrame, attributes: Sequence[str]):
    """Users grouped by their segment attributes; a missing value is a value of its own."""
    keys = pd.Series([""] * len(users), index=users.index, dtype=object)
    for attr in attributes:
        keys = keys + KEY_SEPARATOR + users[attr].astype(object).where(
            users[attr].notna(), "\x00").astype(str)
    return users.groupby(keys.to_numpy(object), sort=True)


def _intent_boost(signals: Mapping[str, Sequence[np.ndarray]], u: int,
                  weights: ScoringConfig) -> Dict[int, float]:
    """User ``u``'s intent: candidate position → the score added (a cart outranks a view;
    a SKU viewed and carted gets the larger boost once, so QA rule 11's range holds)."""
    boost: Dict[int, float] = {}
    for column, weight in (("viewed", weights.view_weight), ("carted", weights.cart_weight)):
        for p in signals[column][u]:
            boost[int(p)] = max(boost.get(int(p), 0.0), weight)
    return boost
