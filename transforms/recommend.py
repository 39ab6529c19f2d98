"""Composites of the batch recommendations job; each adapts pure logic from models/.

Reading order of the graph: clean the catalogue → drop rows with unknown SKUs →
deduplicate events and users → join users with their events → segment
popularity → recommend per vehicle (with QA checks on what was produced).
"""
from __future__ import annotations

import json
from typing import Dict, Iterable, Iterator, List, NamedTuple, Optional, Tuple

import apache_beam as beam
import numpy as np
import pandas as pd
from apache_beam import typehints
from apache_beam.utils import shared

from models import candidates, contracts, popularity, profiles, recommend, rules
from models.catalog import CatalogArrays, resolve_conflicts
from models.config import RecsConfig
from transforms.frames import (DEFAULT_SHARDS, CoGroupFrames, ConcatFramesFn, GroupFrames,
                              owned)
from transforms.health import Tag, count, dead_letters

Shard = int


class Cleaned(NamedTuple):
    """Output of a cleaning step: rows, dead letters, counters."""

    rows: beam.PCollection
    dead_letters: beam.PCollection
    counts: beam.PCollection


def _outputs(result, main: str = Tag.ROWS.value) -> Cleaned:
    return Cleaned(result[main], result[Tag.DEAD_LETTER.value], result[Tag.COUNTS.value])


@typehints.with_input_types(pd.DataFrame)
@typehints.with_output_types(pd.DataFrame)
class ResolveCatalogFn(beam.DoFn):
    """One canonical row per SKU; conflicting rows are dead-lettered with the kept part type."""

    def process(self, catalog: pd.DataFrame) -> Iterator:
        resolved = resolve_conflicts(catalog)
        yield count("catalog.deduplicated", resolved.duplicates)
        if len(resolved.conflicts):
            conflicts = resolved.conflicts
            yield beam.pvalue.TaggedOutput(Tag.DEAD_LETTER.value, dead_letters(
                "catalog", "ResolveCatalogConflicts", conflicts["reason"].tolist(),
                contracts.to_record_json(conflicts.drop(columns="reason"),
                                         np.arange(len(conflicts)))))
        yield count("catalog.processed", len(resolved.catalog))
        yield resolved.catalog


class CleanCatalog(beam.PTransform):
    """Validated catalogue batches → one resolved catalogue frame (a singleton)."""

    def expand(self, rows: beam.PCollection) -> Cleaned:
        return _outputs(rows
                        | "GatherCatalog" >> beam.CombineGlobally(ConcatFramesFn())
                        | "ResolveConflicts" >> beam.ParDo(ResolveCatalogFn()).with_outputs(
                            Tag.DEAD_LETTER.value, Tag.COUNTS.value, main=Tag.ROWS.value))


@typehints.with_input_types(pd.DataFrame, pd.DataFrame)
@typehints.with_output_types(pd.DataFrame)
class DropUnknownSkusFn(beam.DoFn):
    """Dead-letters rows whose SKU is not in the resolved catalogue."""

    def __init__(self, table: str):
        self._table = table

    def process(self, frame: pd.DataFrame, catalog: pd.DataFrame) -> Iterator:
        unknown = contracts.unknown_sku_mask(frame["sku"], catalog["sku"])
        if unknown.any():
            positions = np.flatnonzero(unknown)
            yield beam.pvalue.TaggedOutput(Tag.DEAD_LETTER.value, dead_letters(
                self._table, "CheckSkus", ["unknown sku"] * len(positions),
                contracts.to_record_json(frame, positions)))
        if (~unknown).any():
            yield frame.loc[~unknown].reset_index(drop=True)


class DropUnknownSkus(beam.PTransform):
    """Keeps rows whose SKU is in the catalogue (side input); the rest are dead letters."""

    def __init__(self, table: str, catalog: beam.PCollection):
        super().__init__()
        self._table = table
        self._catalog = catalog

    def expand(self, rows: beam.PCollection) -> Cleaned:
        result = rows | "CheckSkus" >> beam.ParDo(
            DropUnknownSkusFn(self._table), beam.pvalue.AsSingleton(self._catalog)
        ).with_outputs(Tag.DEAD_LETTER.value, main=Tag.ROWS.value)
        no_counts = rows.pipeline | "NoCounts" >> beam.Create([])
        return Cleaned(result[Tag.ROWS.value], result[Tag.DEAD_LETTER.value], no_counts)


@typehints.with_input_types(Tuple[Shard, pd.DataFrame])
@typehints.with_output_types(pd.DataFrame)
class DedupeEventsFn(beam.DoFn):
    """Drops redelivered events: one row per ``event_id`` within its shard."""

    def __init__(self, table: str):
        self._table = table

    def process(self, element: Tuple[Shard, pd.DataFrame]) -> Iterator:
        _, frame = element
        deduped = profiles.dedupe_events(frame)
        yield count(f"{self._table}.deduplicated", deduped.duplicates)
        yield deduped.rows


class DedupeEvents(beam.PTransform):
    """Events sharded by ``event_id`` and deduplicated."""

    def __init__(self, table: str = "events", num_shards: int = DEFAULT_SHARDS):
        super().__init__()
        self._table = table
        self._num_shards = num_shards

    def expand(self, rows: beam.PCollection) -> Cleaned:
        result = (rows
                  | "ShardByEventId" >> GroupFrames(["event_id"], self._num_shards)
                  | "DropDuplicateIds" >> beam.ParDo(DedupeEventsFn(self._table)).with_outputs(
                      Tag.COUNTS.value, main=Tag.ROWS.value))
        none = rows.pipeline | "NoDeadLetters" >> beam.Create([])
        return Cleaned(result[Tag.ROWS.value], none, result[Tag.COUNTS.value])


class MarkDuplicateEmails(beam.PTransform):
    """Users sharded by lower-case e-mail; all but the newest per e-mail flagged duplicate."""

    def __init__(self, num_shards: int = DEFAULT_SHARDS):
        super().__init__()
        self._num_shards = num_shards

    def expand(self, users: beam.PCollection) -> beam.PCollection:
        return (users
                | "ShardByEmail" >> GroupFrames(["email_lower"], self._num_shards)
                | "FlagDuplicates" >> beam.MapTuple(
                    lambda _, frame: profiles.mark_duplicate_users(frame, "email_lower")))


@typehints.with_input_types(Tuple[Shard, Dict[str, pd.DataFrame]])
@typehints.with_output_types(pd.DataFrame)
class JoinUserEventsFn(beam.DoFn):
    """Per user shard: users with their signals, and order lines with the buyer's segment."""

    ORDERS = "orders"

    def __init__(self, as_of: pd.Timestamp, config: RecsConfig):
        self._as_of = as_of
        self._config = config

    def process(self, element: Tuple[Shard, Dict[str, pd.DataFrame]]) -> Iterator:
        _, groups = element
        users, events = groups["users"], groups["events"]
        attrs = list(self._config.segment_attributes)
        if len(events):
            yield count("events.processed", len(events))
            users_for_join = users if len(users) else pd.DataFrame(
                columns=["user_id", "is_duplicate"] + attrs)
            lines = profiles.orders_with_segments(events, users_for_join, attrs)
            if len(lines):
                yield beam.pvalue.TaggedOutput(self.ORDERS, lines)
        if not len(users):
            return
        users = profiles.mark_duplicate_users(users, "user_id")
        duplicates = users["is_duplicate"].to_numpy(bool)
        yield count("users.deduplicated", int(duplicates.sum()))
        kept = users.loc[~duplicates].reset_index(drop=True)
        if len(kept):
            empty = pd.DataFrame({c: pd.Series(dtype=object) for c in (
                "user_id", "event_name", "sku", "order_id")}).assign(
                event_time=pd.Series(dtype="datetime64[us, UTC]"))
            yield profiles.attach_signals(kept, events if len(events) else empty,
                                          self._as_of, self._config)


class JoinUsersWithEvents(beam.PTransform):
    """Users and events meet per ``user_id`` shard → (profiles, order lines, counts)."""

    def __init__(self, as_of: pd.Timestamp, config: RecsConfig,
                 num_shards: int = DEFAULT_SHARDS):
        super().__init__()
        self._as_of = as_of
        self._config = config
        self._num_shards = num_shards

    def expand(self, inputs: Dict[str, beam.PCollection]):
        result = (inputs
                  | "ShardByUserId" >> CoGroupFrames(
                      {"users": ["user_id"], "events": ["user_id"]}, self._num_shards)
                  | "AttachSignals" >> beam.ParDo(
                      JoinUserEventsFn(self._as_of, self._config)).with_outputs(
                      JoinUserEventsFn.ORDERS, Tag.COUNTS.value, main=Tag.ROWS.value))
        return (result[Tag.ROWS.value], result[JoinUserEventsFn.ORDERS],
                result[Tag.COUNTS.value])


@typehints.with_input_types(pd.DataFrame)
@typehints.with_output_types(pd.DataFrame)
class PopularityCombineFn(beam.CombineFn):
    """Sums decayed order counts per (level, segment, sku).

    Accumulator: a list of partial popularity frames, merged (grouped and
    summed) whenever it holds more than ``compact_at`` of them so memory stays
    bounded by the number of distinct keys.
    """

    compact_at = 16

    def create_accumulator(self) -> List[pd.DataFrame]:
        return []

    def add_input(self, acc: List[pd.DataFrame], partial: pd.DataFrame) -> List[pd.DataFrame]:
        acc.append(partial)
        return [popularity.merge_popularity(acc)] if len(acc) > self.compact_at else acc

    def merge_accumulators(self, accs: Iterable[List[pd.DataFrame]]) -> List[pd.DataFrame]:
        return [popularity.merge_popularity(f for acc in accs for f in acc)]

    def extract_output(self, acc: List[pd.DataFrame]) -> pd.DataFrame:
        return popularity.merge_popularity(acc)

    def default_label(self) -> str:
        return "SumPopularity"


class SegmentPopularity(beam.PTransform):
    """Order lines → one popularity frame over all levels (a singleton)."""

    def __init__(self, as_of: pd.Timestamp, config: RecsConfig):
        super().__init__()
        self._as_of = as_of
        self._config = config

    def expand(self, lines: beam.PCollection) -> beam.PCollection:
        return (lines
                | "DecayedOrderCounts" >> beam.Map(
                    popularity.partial_popularity, self._as_of, self._config)
                | "SumPopularity" >> beam.CombineGlobally(PopularityCombineFn()))


@typehints.with_input_types(Tuple[Shard, Dict[str, pd.DataFrame]], candidates.SharedTables)
@typehints.with_output_types(pd.DataFrame)
class PersonalCandidatesFn(beam.DoFn):
    """Per user shard: the mix's per-user sources (buy-again, also-bought) from the users'
    own order lines, with the shard key of the user's vehicle so they can meet the user's
    fitment shard."""

    def __init__(self, as_of: pd.Timestamp, config: RecsConfig):
        self._as_of = as_of
        self._config = config

    def process(self, element, tables: candidates.SharedTables) -> Iterator[pd.DataFrame]:
        _, groups = element
        users, lines = groups["users"], groups["lines"]
        if not len(users) or not len(lines):
            return
        key = list(self._config.shard_attributes)
        profile = users.drop_duplicates("user_id")[["user_id", *key]]
        depth = 8 * self._config.rules.recs_per_user
        found = candidates.personal_candidates(lines, profile["user_id"].tolist(), self._as_of,
                                               self._config.candidates, tables, depth)
        for name, n in found["source"].value_counts().items():
            yield count(f"candidates.{name}.rows", int(n))
        if len(found):
            yield found.merge(profile, on="user_id", how="left")


class SourceCandidates(beam.PTransform):
    """The mix's sources other than segment popularity, from the same deduplicated order lines.

    Returns ``(personal, shared)``: frames ``user_id, sku, score, source`` plus the shard
    key, and the singleton :class:`models.candidates.SharedTables` (the repurchase
    intervals, the also-bought similarity and the trending list, built once over all lines).
    """

    def __init__(self, as_of: pd.Timestamp, config: RecsConfig,
                 num_shards: int = DEFAULT_SHARDS, catalog: Optional[beam.PCollection] = None):
        super().__init__()
        self._as_of = as_of
        self._config = config
        self._num_shards = num_shards
        self._catalog = catalog

    def expand(self, inputs: Dict[str, beam.PCollection]):
        lines, users = inputs["lines"], inputs["users"]
        gathered = lines | "GatherOrderLines" >> beam.CombineGlobally(ConcatFramesFn())
        if self._catalog is None:
            tables = gathered | "BuildSharedTables" >> beam.Map(
                candidates.shared_tables, self._as_of, self._config.candidates)
        else:  # with the eligible SKUs, so per-user lists are cut after dropping the rest
            tables = gathered | "BuildSharedTables" >> beam.Map(
                _tables_with_eligible, self._as_of, self._config,
                beam.pvalue.AsSingleton(self._catalog))
        result = ({"users": users, "lines": lines}
                  | "ShardByUserId" >> CoGroupFrames(
                      {"users": ["user_id"], "lines": ["user_id"]}, self._num_shards)
                  | "ScorePerUser" >> beam.ParDo(
                      PersonalCandidatesFn(self._as_of, self._config),
                      beam.pvalue.AsSingleton(tables)).with_outputs(
                      Tag.COUNTS.value, main=Tag.ROWS.value))
        stats = tables | "SimilarityCounts" >> beam.FlatMap(_similarity_counts)
        return result[Tag.ROWS.value], tables, (result[Tag.COUNTS.value], stats)


def _tables_with_eligible(lines: pd.DataFrame, as_of: pd.Timestamp, config: RecsConfig,
                          catalog: pd.DataFrame) -> candidates.SharedTables:
    arrays = CatalogArrays.build(catalog, config.rules)
    return candidates.shared_tables(lines, as_of, config.candidates,
                                    frozenset(arrays.sku[arrays.eligible]))


def _similarity_counts(tables: candidates.SharedTables) -> Iterator[Tuple[str, int]]:
    """What the also-bought build cost, and how many SKUs trend, as ``(counter, n)``."""
    if tables.similarity is not None:
        built = tables.similarity
        for name in ("rows", "lines_capped", "pairs_generated", "pairs_distinct", "pairs_kept"):
            yield f"candidates.similarity.{name}", int(getattr(built, name))
    if tables.trending is not None:
        yield "candidates.trending.skus", len(tables.trending)


class _Models(NamedTuple):
    catalog: CatalogArrays
    catalog_frame: pd.DataFrame
    popularity: popularity.PopularityIndex
    recommender: recommend.Recommender
    eligible_skus: frozenset


class _SharedModels:
    """Weak-referenceable holder, as ``shared.Shared`` requires."""

    def __init__(self, models: _Models):
        self.models = models


@typehints.with_input_types(Tuple[Shard, Dict[str, pd.DataFrame]], pd.DataFrame, pd.DataFrame)
@typehints.with_output_types(pd.DataFrame)
class RecommendShardFn(beam.DoFn):
    """Scores every user of a vehicle shard and checks the rows it produced.

    The catalogue arrays and popularity index are built once per worker
    process through ``shared.Shared`` (as RunInference loads a model), not
    once per bundle.
    """

    def __init__(self, config: RecsConfig, cache_tag: str):
        self._config = config
        self._cache_tag = cache_tag
        self._shared = shared.Shared()

    def _models(self, catalog: pd.DataFrame, pop: pd.DataFrame) -> _Models:
        def build() -> _SharedModels:
            arrays = CatalogArrays.build(catalog, self._config.rules)
            index = popularity.PopularityIndex(pop, arrays.sku, self._config)
            return _SharedModels(_Models(
                arrays, catalog.set_index("sku"), index,
                recommend.Recommender(arrays, index, self._config),
                frozenset(arrays.sku[arrays.eligible])))
        return self._shared.acquire(build, tag=self._cache_tag).models

    def process(self, element, catalog: pd.DataFrame, pop: pd.DataFrame,
                tables: Optional[candidates.SharedTables] = None) -> Iterator:
        _, groups = element
        users, fitment = groups["users"], groups["fitment"]
        mixed = "candidates" in groups
        attrs = list(self._config.fitment_attributes)
        if len(fitment):
            own = owned(groups, "fitment")  # a hot vehicle's fitment is copied to each slice
            kept = len(own.drop_duplicates(["sku"] + attrs)) if len(own) else 0
            yield count("fitment.deduplicated", len(own) - kept)
            yield count("fitment.processed", kept)
            fitment = fitment.drop_duplicates(["sku"] + attrs)
        if not len(users):
            return
        models = self._models(catalog, pop)
        fitting = _fitting_by_vehicle(fitment, attrs)
        if attrs:
            # A vehicle no fitment row names (a typo, a model the shop has no data for) is
            # served universal parts and global popularity: counted, so it is seen.
            vehicles = popularity.segment_keys(users, attrs)
            unknown = (vehicles.notna().to_numpy(bool)
                       & ~vehicles.isin(list(fitting)).to_numpy(bool))
            yield count("users.vehicle_unknown", int(unknown.sum()))
        purchased = None
        if mixed:
            found = groups["candidates"]
            if not len(found):
                found = pd.DataFrame(columns=["user_id", "sku", "score", "source"])
            kept = found["source"] != candidates.PURCHASED
            shared_lists = {} if tables is None or tables.trending is None else {
                "trending": tables.trending}
            recs, unserved = recommend.mix_all(models.recommender, users, fitting,
                                               found.loc[kept], shared_lists)
            bought_ever = found.loc[~kept]
            purchased = {u: tuple(g) for u, g in bought_ever["sku"].groupby(
                bought_ever["user_id"].to_numpy(object))}
            reason = recommend.MIX_UNSERVED_REASON
        else:
            recs, unserved = recommend.recommend_all(models.recommender, users, fitting)
            reason = recommend.UNSERVED_REASON
        if len(unserved):
            missed = unserved[["user_id", *self._config.group_attributes]]
            yield count("users.unserved", len(missed))
            yield beam.pvalue.TaggedOutput(Tag.DEAD_LETTER.value, dead_letters(
                "users", "Recommend", [reason] * len(missed),
                [json.dumps(r, default=str) for r in missed.to_dict("records")]))
        if not len(recs):
            return
        context = rules.QAContext(
            catalog=models.catalog_frame, fitting=fitting,
            bought=dict(zip(users["user_id"], users["bought"])),
            popularity=models.popularity, catalog_skus=models.catalog.sku,
            eligible_skus=models.eligible_skus, purchased=purchased)
        violations = rules.check(recs, context, self._config)
        violations.pop(14)  # one row per e-mail is checked over e-mail shards
        yield beam.pvalue.TaggedOutput(Tag.QA.value, violations)
        yield count("candidates.users", len(recs))
        for source, n in recs["source"].value_counts().items():
            yield count(f"users.source.{source}", int(n))
        if mixed:  # which source filled how many slots
            kinds = recs[recommend.slot_source_columns(self._config.rules.recs_per_user)]
            for source, n in pd.Series(kinds.to_numpy(object).ravel()).value_counts().items():
                yield count(f"slots.source.{source}", int(n))
        yield recs


def _fitting_by_vehicle(fitment: pd.DataFrame, attrs: List[str]) -> Dict[str, frozenset]:
    """Vehicle segment key → SKUs that fit it."""
    if not len(fitment):
        return {}
    keys = popularity.segment_keys(fitment, attrs)
    return {k: frozenset(g) for k, g in fitment["sku"].groupby(keys.to_numpy(object))}


class RecommendationsOut(NamedTuple):
    rows: beam.PCollection
    dead_letters: beam.PCollection
    qa: beam.PCollection
    counts: beam.PCollection


class RecommendPerVehicle(beam.PTransform):
    """Users and fitment meet per vehicle shard; each shard is scored and checked."""

    def __init__(self, catalog: beam.PCollection, popularity_table: beam.PCollection,
                 config: RecsConfig, cache_tag: str, num_shards: int = DEFAULT_SHARDS,
                 shared_tables: Optional[beam.PCollection] = None):
        super().__init__()
        self._catalog = catalog
        self._popularity = popularity_table
        self._config = config
        self._cache_tag = cache_tag
        self._num_shards = num_shards
        self._shared_tables = shared_tables

    def expand(self, inputs: Dict[str, beam.PCollection]) -> RecommendationsOut:
        """``inputs``: users and fitment, plus ``candidates`` (the mix's per-user sources,
        with ``shared_tables``) when the configured mix is more than segment popularity."""
        key = list(self._config.shard_attributes)
        side = [beam.pvalue.AsSingleton(self._catalog), beam.pvalue.AsSingleton(self._popularity)]
        if "candidates" in inputs:
            side.append(beam.pvalue.AsSingleton(self._shared_tables))
        result = (inputs
                  | "ShardByVehicle" >> CoGroupFrames(
                      {name: key for name in inputs}, self._num_shards,
                      salt={n: ["user_id"] for n in ("users", "candidates") if n in inputs})
                  | "ScoreAndCheck" >> beam.ParDo(
                      RecommendShardFn(self._config, self._cache_tag), *side).with_outputs(
                      Tag.DEAD_LETTER.value, Tag.QA.value, Tag.COUNTS.value,
                      main=Tag.ROWS.value))
        return RecommendationsOut(result[Tag.ROWS.value], result[Tag.DEAD_LETTER.value],
                                  result[Tag.QA.value], result[Tag.COUNTS.value])


@typehints.with_input_types(Tuple[Shard, pd.DataFrame])
@typehints.with_output_types(Dict[int, int])
class _DuplicateEmailsFn(beam.DoFn):
    def process(self, element: Tuple[Shard, pd.DataFrame]) -> Iterator[Dict[int, int]]:
        _, frame = element
        yield {14: rules.duplicate_emails(frame["email_lower"])}


class CheckOneRowPerEmail(beam.PTransform):
    """Rule 14 over the whole output: rows sharded by e-mail, duplicates counted."""

    def __init__(self, num_shards: int = DEFAULT_SHARDS):
        super().__init__()
        self._num_shards = num_shards

    def expand(self, recs: beam.PCollection) -> beam.PCollection:
        return (recs
                | "ShardByEmail" >> GroupFrames(["email_lower"], self._num_shards)
                | "CountDuplicates" >> beam.ParDo(_DuplicateEmailsFn()))


def sum_violations(partials: Iterable[Dict[int, int]]) -> Dict[int, int]:
    """Adds per-batch violation counts rule by rule (every rule present, zero by default)."""
    total = {rule.id: 0 for rule in rules.RULES}
    for partial in partials:
        for rule_id, n in partial.items():
            total[rule_id] = total.get(rule_id, 0) + int(n)
    return total


class AddRunMetadata(beam.DoFn):
    """Stamps ``generated_at``, ``run_id`` and ``model_version`` on recommendation rows."""

    def __init__(self, generated_at: pd.Timestamp, run_id: str, model_version: str):
        self._stamp = dict(generated_at=generated_at, run_id=run_id,
                           model_version=model_version)

    def process(self, frame: pd.DataFrame) -> Iterator[pd.DataFrame]:
        yield frame.assign(**self._stamp)



