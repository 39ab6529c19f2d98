"""Scoring one vehicle shard: the handler objects behind the ``Recommend`` composite (#14).

This is the ``ModelHandler`` half of Beam's RunInference split: a plain object
that holds the logic (load what is expensive once, then score shard after
shard), while a private DoFn in ``transforms/recommend_composite.py`` only
adapts it (shared loading per worker, tagged outputs, counters). No Beam
import here, so a job that is not a batch graph (the streaming refresh, a
notebook, ``pipelines.tune``) can call the same object:

    handler = handler_for(config)                  # or MixHandler / RerankHandler
    loaded = handler.load({"catalog": catalog, "popularity": pop})
    scored = handler.score(loaded, {"users": users, "fitment": fitment})
    scored.rows, scored.unserved, scored.violations, scored.counters

Three handlers share one ``score`` path and differ only in the recommender
they build and the extra tables they need:

- :class:`PopularityHandler`: segment popularity with fallbacks (the default);
- :class:`MixHandler`: the configured slot mix over every source, fed by the
  per-user candidates (``groups["candidates"]``) and the run's
  :class:`models.candidates.SharedTables` (side input ``tables``);
- :class:`RerankHandler`: the LightGBM ranker re-ranking popularity's pools
  (side input ``item_counts``; profiles must carry the ranker's state columns).
"""
from __future__ import annotations

from typing import (Callable, Dict, List, Mapping, MutableMapping, NamedTuple, Optional,
                    Sequence, Tuple)

import pandas as pd

from models import candidates, popularity, profiles, recommend, rules
from models.catalog import CatalogArrays
from models.config import RecsConfig
from models.shards import owned

Counter = Tuple[str, int]


class Loaded(NamedTuple):
    """What a handler builds once per worker from its side inputs."""

    catalog: CatalogArrays
    catalog_frame: pd.DataFrame
    popularity: popularity.PopularityIndex
    eligible_skus: frozenset
    extra: Mapping[str, object]


class Scored(NamedTuple):
    """One shard's outcome: rows, the users left unserved (and why), QA partials, counters."""

    rows: pd.DataFrame
    unserved: pd.DataFrame
    reason: str
    violations: Dict[int, int]
    counters: List[Counter]
    drift: Optional[dict] = None


def fitting_by_vehicle(fitment: pd.DataFrame, attrs: Sequence[str]) -> Dict[str, frozenset]:
    """Vehicle segment key → SKUs that fit it."""
    if not len(fitment):
        return {}
    keys = popularity.segment_keys(fitment, list(attrs))
    return {k: frozenset(g) for k, g in fitment["sku"].groupby(keys.to_numpy(object))}


class PopularityHandler:
    """Segment popularity with fallback levels, the SPEC §3 rules and the QA checks.

    ``side_inputs`` names the singletons :meth:`load` reads, in the order the
    Beam adapter passes them.
    """

    side_inputs: Tuple[str, ...] = ("catalog", "popularity")
    model_version = "segment-popularity-v1"

    def __init__(self, config: RecsConfig):
        self.config = config

    def load(self, side: Mapping[str, object]) -> Loaded:
        """The catalogue arrays and the popularity index (expensive: once per worker)."""
        catalog = side["catalog"]
        arrays = CatalogArrays.build(catalog, self.config.rules)
        index = popularity.PopularityIndex(side["popularity"], arrays.sku, self.config)
        return Loaded(arrays, catalog.set_index("sku"), index,
                      frozenset(arrays.sku[arrays.eligible]), self._extra(arrays, index, side))

    def _extra(self, arrays: CatalogArrays, index: popularity.PopularityIndex,
               side: Mapping[str, object]) -> Mapping[str, object]:
        return {}

    def recommender(self, loaded: Loaded) -> recommend.Recommender:
        """A recommender for one call (cheap: it only wraps the loaded tables)."""
        return recommend.Recommender(loaded.catalog, loaded.popularity, self.config)

    def _recommend(self, recommender, loaded: Loaded, users: pd.DataFrame,
                   fitting: Mapping[str, frozenset], groups: Mapping[str, pd.DataFrame]):
        """``(rows, unserved, reason, purchased, counters)`` for the shard's users."""
        recs, unserved = recommend.recommend_all(recommender, users, fitting)
        return recs, unserved, recommend.UNSERVED_REASON, None, []

    def score(self, loaded: Loaded, groups: Mapping[str, pd.DataFrame]) -> Scored:
        """Every user of one vehicle shard scored and checked.

        Args:
          groups: ``users`` (profiles) and ``fitment`` of the shard, plus
            ``candidates`` for the mix.
        """
        config = self.config
        users, fitment = groups["users"], groups["fitment"]
        attrs = list(config.fitment_attributes)
        counters: List[Counter] = []
        if len(fitment):
            own = owned(groups, "fitment")  # a hot vehicle's fitment is copied to each slice
            kept = len(own.drop_duplicates(["sku"] + attrs)) if len(own) else 0
            counters += [("fitment.deduplicated", len(own) - kept),
                         ("fitment.processed", kept)]
            fitment = fitment.drop_duplicates(["sku"] + attrs)
        empty = pd.DataFrame(columns=recommend.rec_columns(config.rules.recs_per_user))
        if not len(users):
            return Scored(empty, users, recommend.UNSERVED_REASON, {}, counters)
        fitting = fitting_by_vehicle(fitment, attrs)
        if attrs:
            # A vehicle no fitment row names (a typo, a model the shop has no data for) is
            # served universal parts and global popularity: counted, so it is seen.
            vehicles = popularity.segment_keys(users, attrs)
            unknown = (vehicles.notna().to_numpy(bool)
                       & ~vehicles.isin(list(fitting)).to_numpy(bool))
            counters.append(("users.vehicle_unknown", int(unknown.sum())))
        recommender = self.recommender(loaded)
        recs, unserved, reason, purchased, more = self._recommend(
            recommender, loaded, users, fitting, groups)
        counters += more
        if len(unserved):
            counters.append(("users.unserved", len(unserved)))
        violations: Dict[int, int] = {}
        if len(recs):
            context = rules.QAContext(
                catalog=loaded.catalog_frame, fitting=fitting,
                bought=dict(zip(users["user_id"], users["bought"])),
                popularity=loaded.popularity, catalog_skus=loaded.catalog.sku,
                eligible_skus=loaded.eligible_skus, purchased=purchased)
            violations = rules.check(recs, context, config)
            violations.pop(14)  # one row per e-mail is checked over e-mail shards
            counters.append(("candidates.users", len(recs)))
            counters += [(f"users.source.{s}", int(n))
                         for s, n in recs["source"].value_counts().items()]
            counters += self._slot_counters(recs)
        return Scored(recs, unserved, reason, violations, counters,
                      self._drift(recommender))

    def _slot_counters(self, recs: pd.DataFrame) -> List[Counter]:
        return []

    def _drift(self, recommender) -> Optional[dict]:
        return None


class MixHandler(PopularityHandler):
    """The configured slot mix (``candidates.mix``) over every source, per vehicle shard.

    Needs the side input ``tables`` (the run's :class:`models.candidates.SharedTables`,
    for the trending list) and ``groups["candidates"]``: the shard's per-user candidates
    (:func:`models.candidates.personal_candidates`, with its ``purchased`` rows).
    """

    side_inputs = ("catalog", "popularity", "tables")
    model_version = "slot-mix-v1"

    def _extra(self, arrays, index, side) -> Mapping[str, object]:
        return {"tables": side.get("tables")}

    def _recommend(self, recommender, loaded, users, fitting, groups):
        found = groups.get("candidates")
        if found is None or not len(found):
            found = pd.DataFrame(columns=["user_id", "sku", "score", "source"])
        kept = (found["source"] != candidates.PURCHASED).to_numpy(bool)
        tables = loaded.extra.get("tables")
        shared_lists = {} if tables is None or tables.trending is None else {
            "trending": tables.trending}
        hook = self._rerank_hook(loaded, recommender)
        recs, unserved = recommend.mix_all(recommender, users, fitting, found.loc[kept],
                                           shared_lists, None if tables is None else tables.boost,
                                           hook)
        bought_ever = found.loc[~kept]
        purchased = {u: tuple(g) for u, g in bought_ever["sku"].groupby(
            bought_ever["user_id"].to_numpy(object))}
        more = [] if hook is None else [("ranker.rows_scored", int(hook.rows_scored))]
        return recs, unserved, recommend.MIX_UNSERVED_REASON, purchased, more

    def _rerank_hook(self, loaded: Loaded, recommender):
        """What ``mix_all`` calls instead of the plain fill (None: the blend)."""
        return None

    def _slot_counters(self, recs: pd.DataFrame) -> List[Counter]:
        """Which source filled how many slots."""
        kinds = recs[recommend.slot_source_columns(self.config.rules.recs_per_user)]
        return [(f"slots.source.{s}", int(n)) for s, n in pd.Series(
            kinds.to_numpy(object).ravel()).value_counts().items()]


class RerankHandler(PopularityHandler):
    """Popularity's candidate pools re-ranked by the LightGBM ranker.

    ``load_model`` is a zero-argument callable returning the
    :class:`models.ranker.RankerModel` (the Beam side passes one that reads the
    artifact through ``FileSystems``), called once per worker in :meth:`load`.
    Each :meth:`score` builds its own light recommender, so the drift counts it
    returns (``Scored.drift``) never mix between shards or threads.
    """

    side_inputs = ("catalog", "popularity", "item_counts")

    def __init__(self, config: RecsConfig, fconfig, load_model: Callable[[], object],
                 drift_every: int = 20):
        super().__init__(config)
        self.fconfig = fconfig
        self.load_model = load_model
        self.drift_every = drift_every

    def _extra(self, arrays, index, side) -> Mapping[str, object]:
        from models import features
        model = self.load_model()
        model.check_features(self.config)
        items = features.ItemTable.build(arrays, side["item_counts"], index, self.fconfig)
        return {"model": model, "items": items}

    def recommender(self, loaded: Loaded):
        from models import ranker
        model = loaded.extra["model"]
        return ranker.RerankingRecommender(
            loaded.catalog, loaded.popularity, self.config, model, loaded.extra["items"],
            self.fconfig, drift=ranker.DriftCounts(
                model.metadata.get("feature_distributions", {})),
            drift_every=self.drift_every)

    def _recommend(self, recommender, loaded, users, fitting, groups):
        recs, unserved, reason, purchased, _ = super()._recommend(
            recommender, loaded, users, fitting, groups)
        return recs, unserved, reason, purchased, [("ranker.rows_scored",
                                                    recommender.rows_scored)]

    def _drift(self, recommender) -> Optional[dict]:
        return recommender.drift.to_dict()


class UnionRerankHandler(MixHandler):
    """The slot mix's candidates, all sources together, re-ranked by a union ranker (#14).

    Same inputs as :class:`MixHandler`; ``load_model`` (zero-argument callable) returns a
    :class:`models.ranker.RankerModel` trained by :func:`models.union_ranker.train_union`
    on this configuration's mix sources (checked in :meth:`load`). The fill keeps the
    mix's rules (rule 4 on discovery rows only, diversity caps) over the ranked union
    (:func:`models.union_ranker.rerank_hook`).
    """

    model_version = "union-ranker-v1"

    def __init__(self, config: RecsConfig, load_model: Callable[[], object]):
        super().__init__(config)
        self.load_model = load_model

    def _extra(self, arrays, index, side) -> Mapping[str, object]:
        from models import union_ranker
        model = self.load_model()
        union_ranker.check_sources(model, self.config)
        return {**super()._extra(arrays, index, side), "model": model}

    def recommender(self, loaded: Loaded):
        """The mix's recommender carrying this call's hook (its drift counts never mix
        between shards or threads)."""
        from models import ranker, union_ranker
        recommender = super().recommender(loaded)
        model = loaded.extra["model"]
        recommender.union_hook = union_ranker.rerank_hook(
            model, self.config.candidates.sources,
            ranker.DriftCounts(model.metadata.get("feature_distributions", {})))
        return recommender

    def _rerank_hook(self, loaded: Loaded, recommender):
        return recommender.union_hook

    def _drift(self, recommender) -> Optional[dict]:
        return recommender.union_hook.drift.to_dict()


class CapturingMixHandler(MixHandler):
    """The slot mix, with a hook that sees the restricted sources (training the union ranker)."""

    def __init__(self, config: RecsConfig, capture):
        super().__init__(config)
        self.capture = capture

    def _rerank_hook(self, loaded: Loaded, recommender):
        return self.capture


def handler_for(config: RecsConfig) -> PopularityHandler:
    """The handler the configuration asks for without a ranker: the mix when it names more
    than segment popularity, else segment popularity."""
    return PopularityHandler(config) if config.candidates.popularity_only else MixHandler(config)


# --- the whole chain in one process (tune, notebooks, the streaming refresh) -----------------

class History(NamedTuple):
    """What every strategy reads from one history at one ``as_of``.

    Attributes:
      profiles: one row per kept user with ``bought``/``carted``/``viewed``
        (what ``JoinUsersWithEvents`` emits as profiles);
      lines: the deduplicated order lines with the buyer's segment attributes
        (what it emits as order lines).
    """

    profiles: pd.DataFrame
    lines: pd.DataFrame


def prepare_history(users: pd.DataFrame, events: pd.DataFrame, as_of: pd.Timestamp,
                    config: RecsConfig) -> History:
    """The batch job's cleaning and join, in one process, for already validated frames.

    ``events`` must hold only SKUs of the catalogue (the job dead-letters the
    others first). Redelivered events are dropped, users are deduplicated by
    e-mail then ``user_id`` (duplicates' orders still count), as in the job.
    """
    events = profiles.dedupe_events(events).rows
    if "email_lower" in users.columns:
        users = profiles.mark_duplicate_users(users, "email_lower")
    lines = profiles.orders_with_segments(events, users, list(config.segment_attributes))
    users = profiles.mark_duplicate_users(users, "user_id")
    kept = users.loc[~users["is_duplicate"].to_numpy(bool)].reset_index(drop=True)
    return History(profiles.attach_signals(kept, events, as_of, config), lines)


def recommend_history(history: History, catalog: pd.DataFrame, fitment: pd.DataFrame,
                      as_of: pd.Timestamp, config: RecsConfig,
                      cache: Optional[MutableMapping] = None,
                      handler: Optional[PopularityHandler] = None) -> Scored:
    """Every user of ``history`` recommended as the batch job would, in one process.

    The same handler the ``Recommend`` composite applies per vehicle shard, here
    over one shard holding everyone (a user's list does not depend on the
    sharding). ``catalog`` is the resolved catalogue and ``fitment`` its fitment
    rows. Counters and QA partials are in the result as the job would count them
    (rule 14, checked over e-mail shards by the job, is not).

    ``cache`` (a dict the caller keeps per ``history``) reuses the popularity
    table, the loaded handler tables, the shared tables and the per-user candidates
    between calls whose configurations agree on what each depends on, so a grid of
    variants (``pipelines.tune``) pays for each piece once.

    ``handler`` replaces :func:`handler_for`'s choice (e.g. a
    :class:`UnionRerankHandler`, or a mix handler whose hook captures the union
    for training); it must be a :class:`MixHandler` when the config has a mix.
    """
    cache = {} if cache is None else cache

    def cached(key, build):
        if key not in cache:
            cache[key] = build()
        return cache[key]

    pop_key = ("popularity", repr(config.scoring), config.segment_attributes,
               config.fitment_attributes)
    pop = cached(pop_key, lambda: popularity.merge_popularity(
        [popularity.partial_popularity(history.lines, as_of, config)]))
    own = handler is None
    handler = handler_for(config) if own else handler
    side = {"catalog": catalog, "popularity": pop}
    groups = {"users": history.profiles, "fitment": fitment}
    tables_key = None
    if isinstance(handler, MixHandler):
        cands = config.candidates
        tables_key = ("tables", repr((cands.buy_again, cands.also_bought, cands.trending)),
                      tuple(sorted(cands.sources)), repr(config.rules))

        def tables_of():
            arrays = CatalogArrays.build(catalog, config.rules)
            return candidates.shared_tables(history.lines, as_of, cands,
                                            frozenset(arrays.sku[arrays.eligible]))

        tables = cached(tables_key, tables_of)

        def personal():
            ab = cands.also_bought
            carts = (candidates.cart_affinity(history.profiles, ab.cart_weight, ab.max_carts)
                     if "also_bought" in cands.sources else None)
            key = list(config.shard_attributes)
            found = candidates.personal_candidates(
                history.lines, history.profiles["user_id"].tolist(), as_of, cands, tables,
                8 * config.rules.recs_per_user, carts)
            return found.merge(history.profiles[["user_id", *key]], on="user_id", how="left")

        side["tables"] = tables
        groups["candidates"] = cached(
            ("personal", tables_key, config.rules.recs_per_user, config.shard_attributes),
            personal)
    loaded = cached(("loaded", type(handler).__name__, None if own else id(handler), pop_key,
                     repr(config.rules), config.fitment_attributes, tables_key),
                    lambda: handler.load(side))
    return handler.score(loaded, groups)
