"""Composites of the batch recommendations job; each adapts pure logic from models/.

Reading order of the graph: clean the catalogue → drop rows with unknown SKUs →
deduplicate events and users → join users with their events → segment
popularity and the mix's other sources; the ``Recommend`` composite that
scores and checks each vehicle shard is in transforms/recommend_composite.py.
"""
from __future__ import annotations

from typing import Dict, Iterable, Iterator, List, NamedTuple, Optional, Tuple

import apache_beam as beam
import numpy as np
import pandas as pd
from apache_beam import typehints

from models import candidates, contracts, popularity, profiles, rules
from models.catalog import CatalogArrays, resolve_conflicts
from models.config import RecsConfig
from transforms.frames import DEFAULT_SHARDS, CoGroupFrames, ConcatFramesFn, GroupFrames
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
        if not len(users):
            return
        key = list(self._config.shard_attributes)
        profile = users.drop_duplicates("user_id")
        ab = self._config.candidates.also_bought
        carts = None
        if "also_bought" in self._config.candidates.sources:
            carts = candidates.cart_affinity(profile, ab.cart_weight, ab.max_carts)
            yield count("candidates.also_bought.cart_skus", len(carts))
        if not len(lines) and (carts is None or not len(carts)):
            return
        profile = profile[["user_id", *key]]
        depth = 8 * self._config.rules.recs_per_user
        found = candidates.personal_candidates(lines, profile["user_id"].tolist(), self._as_of,
                                               self._config.candidates, tables, depth, carts)
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



