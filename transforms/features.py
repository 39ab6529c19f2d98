"""Ranker features and labels as Beam composites over the batch job's inputs (SPEC §6).

Reading order: users meet their events per ``user_id`` shard and become one
state row per (user, cutoff) (:class:`UserStates`); order lines give segment
popularity at every cutoff and events give item counts (two singletons,
:class:`PopularityAtCutoffs` and :class:`ItemCountsAtCutoffs`); states meet
the fitment of their vehicle per vehicle shard and become labelled, downsampled
feature rows (:class:`BuildExamples`). The pure logic is ``models.features``.
"""
from __future__ import annotations

from typing import Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import apache_beam as beam
import numpy as np
import pandas as pd
import pyarrow as pa
from apache_beam import typehints
from apache_beam.utils import shared

from models import features, popularity, profiles, recommend
from models.catalog import CatalogArrays
from models.config import RecsConfig
from transforms.frames import DEFAULT_SHARDS, CoGroupFrames
from transforms.health import Tag, count
from transforms.io import ReadTable, find_table
from transforms.recommend import (CleanCatalog, DedupeEvents, DropUnknownSkus,
                                  MarkDuplicateEmails)

Shard = int
ORDERS = "orders"
ITEM_COUNTS = "item_counts"


def _iso(cutoff) -> str:
    return pd.Timestamp(cutoff).tz_convert("UTC").isoformat()


def empty_events() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object) for c in (
        "user_id", "event_name", "sku", "order_id", "event_id")}).assign(
        event_time=pd.Series(dtype="datetime64[us, UTC]"), price=pd.Series(dtype=float),
        quantity=pd.Series(dtype=float))


@typehints.with_input_types(Tuple[Shard, Dict[str, pd.DataFrame]], pd.DataFrame)
@typehints.with_output_types(pd.DataFrame)
class UserStatesFn(beam.DoFn):
    """Per user shard: state rows per (user, cutoff); order lines and item counts tagged.

    Users are deduplicated by ``user_id`` as the batch job does (the newest
    record wins); a duplicate's orders still count toward popularity.
    """

    def __init__(self, cutoffs: Sequence[pd.Timestamp], config: RecsConfig,
                 fconfig: features.FeatureConfig, labels: bool):
        self._cutoffs = [pd.Timestamp(c) for c in cutoffs]
        self._config = config
        self._fconfig = fconfig
        self._labels = labels

    def process(self, element: Tuple[Shard, Dict[str, pd.DataFrame]],
                catalog: pd.DataFrame) -> Iterator:
        _, groups = element
        users, events = groups["users"], groups["events"]
        attrs = list(self._config.segment_attributes)
        events = events if len(events) else empty_events()
        if len(users) and "is_duplicate" not in users.columns:
            users = users.assign(is_duplicate=False)
        hist = features.build_history(events, catalog)
        if len(events):
            users_for_join = users if len(users) else pd.DataFrame(
                columns=["user_id", "is_duplicate"] + attrs)
            lines = profiles.orders_with_segments(events, users_for_join, attrs)
            if len(lines):
                yield beam.pvalue.TaggedOutput(ORDERS, lines)
            counts = features.item_counts(hist, self._cutoffs, self._fconfig)
            if len(counts):
                yield beam.pvalue.TaggedOutput(ITEM_COUNTS, counts)
        if not len(users):
            return
        users = profiles.mark_duplicate_users(users, "user_id")
        kept = users.loc[~users["is_duplicate"].to_numpy(bool)].reset_index(drop=True)
        if not len(kept):
            return
        states = features.user_states(kept, hist, self._cutoffs, self._fconfig, self._config,
                                      self._labels)
        yield count("ranker.user_states", len(states))
        yield states


class UserStatesOut(NamedTuple):
    states: beam.PCollection
    order_lines: beam.PCollection
    item_counts: beam.PCollection
    counts: beam.PCollection


class UserStates(beam.PTransform):
    """``{"users", "events"}`` → state rows per (user, cutoff), order lines, item counts."""

    def __init__(self, catalog: beam.PCollection, cutoffs: Sequence[pd.Timestamp],
                 config: RecsConfig, fconfig: features.FeatureConfig, labels: bool,
                 num_shards: int = DEFAULT_SHARDS):
        super().__init__()
        self._catalog = catalog
        self._cutoffs = list(cutoffs)
        self._config = config
        self._fconfig = fconfig
        self._labels = labels
        self._num_shards = num_shards

    def expand(self, inputs: Dict[str, beam.PCollection]) -> UserStatesOut:
        result = (inputs
                  | "ShardByUserId" >> CoGroupFrames(
                      {"users": ["user_id"], "events": ["user_id"]}, self._num_shards)
                  | "StatesPerCutoff" >> beam.ParDo(
                      UserStatesFn(self._cutoffs, self._config, self._fconfig, self._labels),
                      beam.pvalue.AsSingleton(self._catalog)).with_outputs(
                      ORDERS, ITEM_COUNTS, Tag.COUNTS.value, main=Tag.ROWS.value))
        return UserStatesOut(result[Tag.ROWS.value], result[ORDERS], result[ITEM_COUNTS],
                             result[Tag.COUNTS.value])


@typehints.with_input_types(pd.DataFrame)
@typehints.with_output_types(Dict[str, pd.DataFrame])
class PopularityAtCutoffsFn(beam.CombineFn):
    """Decayed order counts per (level, segment, sku) at every cutoff.

    Accumulator: ``{cutoff ISO time: [partial popularity frames]}``, each list
    merged (grouped and summed) when it grows past ``compact_at`` frames.
    Decay gives events after a cutoff zero weight, so each cutoff's table is
    point-in-time by construction.
    """

    compact_at = 16

    def __init__(self, cutoffs: Sequence[pd.Timestamp], config: RecsConfig):
        self._cutoffs = [pd.Timestamp(c) for c in cutoffs]
        self._config = config

    def create_accumulator(self) -> Dict[str, List[pd.DataFrame]]:
        return {_iso(c): [] for c in self._cutoffs}

    def add_input(self, acc, lines: pd.DataFrame):
        for cutoff in self._cutoffs:
            frames = acc[_iso(cutoff)]
            frames.append(popularity.partial_popularity(lines, cutoff, self._config))
            if len(frames) > self.compact_at:
                acc[_iso(cutoff)] = [popularity.merge_popularity(frames)]
        return acc

    def merge_accumulators(self, accs: Iterable[Dict[str, List[pd.DataFrame]]]):
        merged = self.create_accumulator()
        for acc in accs:
            for key, frames in acc.items():
                merged[key].extend(frames)
        return {key: [popularity.merge_popularity(frames)] for key, frames in merged.items()}

    def extract_output(self, acc) -> Dict[str, pd.DataFrame]:
        return {key: popularity.merge_popularity(frames) for key, frames in acc.items()}

    def default_label(self) -> str:
        return "PopularityAtCutoffs"


@typehints.with_input_types(pd.DataFrame)
@typehints.with_output_types(pd.DataFrame)
class ItemCountsFn(beam.CombineFn):
    """Order lines and views per (cutoff, sku) in the feature window, summed over shards.

    Accumulator: a list of partial count frames, summed when it grows past
    ``compact_at`` frames.
    """

    compact_at = 16

    def create_accumulator(self) -> List[pd.DataFrame]:
        return []

    def add_input(self, acc: List[pd.DataFrame], frame: pd.DataFrame) -> List[pd.DataFrame]:
        acc.append(frame)
        return [features.merge_item_counts(acc)] if len(acc) > self.compact_at else acc

    def merge_accumulators(self, accs: Iterable[List[pd.DataFrame]]) -> List[pd.DataFrame]:
        return [features.merge_item_counts(f for acc in accs for f in acc)]

    def extract_output(self, acc: List[pd.DataFrame]) -> pd.DataFrame:
        return features.merge_item_counts(acc)

    def default_label(self) -> str:
        return "SumItemCounts"


class _CutoffModels(NamedTuple):
    catalog: features.CatalogArrays
    recommender: recommend.Recommender      # for its candidate rule only
    builder: features.PoolBuilder
    index: Dict[str, popularity.PopularityIndex]
    items: Dict[str, features.ItemTable]


class _Holder:
    """Weak-referenceable holder, as ``shared.Shared`` requires."""

    def __init__(self, value):
        self.value = value


def cutoff_models(catalog: pd.DataFrame, pop: Dict[str, pd.DataFrame], counts: pd.DataFrame,
                  config: RecsConfig, fconfig: features.FeatureConfig) -> _CutoffModels:
    """Catalogue arrays, then popularity index and item table of every cutoff."""
    arrays = CatalogArrays.build(catalog, config.rules)
    index, items = {}, {}
    iso_counts = counts.assign(_c=counts["cutoff"].map(_iso)) if len(counts) else counts
    for key, frame in pop.items():
        index[key] = popularity.PopularityIndex(frame, arrays.sku, config)
        part = iso_counts.loc[iso_counts["_c"] == key] if len(iso_counts) else counts
        items[key] = features.ItemTable.build(arrays, part, index[key], fconfig)
    any_index = next(iter(index.values()))
    return _CutoffModels(arrays, recommend.Recommender(arrays, any_index, config),
                         features.PoolBuilder(arrays, config, fconfig), index, items)


def fitting_by_vehicle(fitment: pd.DataFrame, attrs: Sequence[str]) -> Dict[str, np.ndarray]:
    """Vehicle segment key → sorted SKUs that fit it."""
    if not len(fitment):
        return {}
    keys = popularity.segment_keys(fitment, list(attrs))
    return {k: np.array(sorted(set(g)), dtype=str)
            for k, g in fitment["sku"].groupby(keys.to_numpy(object))}


@typehints.with_input_types(Tuple[Shard, Dict[str, pd.DataFrame]], pd.DataFrame,
                            Dict[str, pd.DataFrame], pd.DataFrame)
@typehints.with_output_types(pd.DataFrame)
class ExamplesFn(beam.DoFn):
    """Per vehicle shard: pools, labels, shard-wide negative sampling, feature rows.

    Cutoffs in ``train_cutoffs`` are downsampled; the others (validation and
    test) keep every pool row so their metrics see the serving distribution.
    The sampling seed is derived from the shard number, so reruns agree.
    """

    def __init__(self, config: RecsConfig, fconfig: features.FeatureConfig,
                 train_cutoffs: Sequence[pd.Timestamp], cache_tag: str):
        self._config = config
        self._fconfig = fconfig
        self._train = frozenset(_iso(c) for c in train_cutoffs)
        self._cache_tag = cache_tag
        self._shared = shared.Shared()

    def _models(self, catalog, pop, counts) -> _CutoffModels:
        return self._shared.acquire(lambda: _Holder(cutoff_models(
            catalog, pop, counts, self._config, self._fconfig)), tag=self._cache_tag).value

    def process(self, element, catalog: pd.DataFrame, pop: Dict[str, pd.DataFrame],
                counts: pd.DataFrame) -> Iterator:
        shard, groups = element
        states, fitment = groups["users"], groups["fitment"]
        if not len(states):
            return
        models = self._models(catalog, pop, counts)
        attrs = list(self._config.fitment_attributes)
        fitting = fitting_by_vehicle(fitment, attrs) if attrs else {}
        labelled, train, tables = [], [], []
        no_fit = np.array([], dtype=str)
        for _, group in recommend.vehicle_groups(
                states, list(self._config.group_attributes) + ["cutoff"]):
            group = group.reset_index(drop=True)
            key = _iso(group["cutoff"].iloc[0])
            first = group.iloc[0]
            vehicle = popularity.segment_key([first[a] for a in attrs])
            cand = models.recommender.candidates(
                models.catalog.index_of(fitting.get(vehicle, no_fit)))
            if not len(cand):
                continue
            labelled.append(models.builder.labelled(group, cand, models.index[key]))
            train.append(key in self._train)
            tables.append(models.items[key])
        if not labelled:
            return
        rng = np.random.default_rng([self._fconfig.seed, int(shard)])
        masks, _, weights = features.sample_shard(
            labelled, train, self._fconfig.negative_ratio, rng, self._fconfig.eval_user_share)
        positives = sum(int(g.labels.sum()) for g in labelled)
        yield count("ranker.pool_rows", sum(len(g.labels) for g in labelled))
        yield count("ranker.pool_positives", positives)
        for group, mask, table, weight in zip(labelled, masks, tables, weights):
            frame = models.builder.examples(group, table, mask, weight)
            if len(frame):
                yield count("ranker.examples", len(frame))
                yield frame


class ExamplesOut(NamedTuple):
    rows: beam.PCollection
    counts: beam.PCollection


class BuildExamples(beam.PTransform):
    """``{"users", "events", "fitment"}`` → labelled feature rows at every cutoff.

    ``users`` are validated users (e-mail duplicates flagged), ``events``
    deduplicated events with known SKUs, ``fitment`` rows with known SKUs:
    the batch job's cleaned inputs. Events after a cutoff never reach its
    features; they only label it.
    """

    def __init__(self, catalog: beam.PCollection, cutoffs: Sequence[pd.Timestamp],
                 train_cutoffs: Sequence[pd.Timestamp], config: RecsConfig,
                 fconfig: features.FeatureConfig, cache_tag: str,
                 num_shards: int = DEFAULT_SHARDS):
        super().__init__()
        self._catalog = catalog
        self._cutoffs = list(cutoffs)
        self._train = list(train_cutoffs)
        self._config = config
        self._fconfig = fconfig
        self._cache_tag = cache_tag
        self._num_shards = num_shards

    def expand(self, inputs: Dict[str, beam.PCollection]) -> ExamplesOut:
        states = ({"users": inputs["users"], "events": inputs["events"]}
                  | "UserStates" >> UserStates(self._catalog, self._cutoffs, self._config,
                                               self._fconfig, labels=True,
                                               num_shards=self._num_shards))
        pop = states.order_lines | "PopularityAtCutoffs" >> beam.CombineGlobally(
            PopularityAtCutoffsFn(self._cutoffs, self._config))
        counts = states.item_counts | "ItemCountsAtCutoffs" >> beam.CombineGlobally(
            ItemCountsFn())
        key = list(self._config.shard_attributes)
        examples = ({"users": states.states, "fitment": inputs["fitment"]}
                    | "ShardByVehicle" >> CoGroupFrames(
                        {"users": key, "fitment": key}, self._num_shards,
                        salt={"users": ["user_id"]})
                    | "PoolsLabelsFeatures" >> beam.ParDo(
                        ExamplesFn(self._config, self._fconfig, self._train, self._cache_tag),
                        beam.pvalue.AsSingleton(self._catalog), beam.pvalue.AsSingleton(pop),
                        beam.pvalue.AsSingleton(counts)).with_outputs(
                        Tag.COUNTS.value, main=Tag.ROWS.value))
        all_counts = ((states.counts, examples[Tag.COUNTS.value])
                      | "FlattenExampleCounts" >> beam.Flatten())
        return ExamplesOut(examples[Tag.ROWS.value], all_counts)


def examples_schema(config: RecsConfig) -> pa.Schema:
    """Parquet schema of example rows: keys, label, weight, then float32 features."""
    return pa.schema([("user_id", pa.string()), ("cutoff", pa.timestamp("us", tz="UTC")),
                      ("sku", pa.string()), ("label", pa.int8()), ("weight", pa.float64())]
                     + [(name, pa.float32()) for name in features.feature_names(config)])


class CleanInputs(NamedTuple):
    """The batch job's cleaned inputs (each a collection of frames; catalogue a singleton)."""

    catalog: beam.PCollection
    users: beam.PCollection
    events: beam.PCollection
    fitment: beam.PCollection
    holdout: Optional[beam.PCollection]
    dead_letters: beam.PCollection
    counts: beam.PCollection


class ReadCleanInputs(beam.PTransform):
    """Reads and cleans the SPEC §2 inputs exactly as the batch job does.

    Validation with dead letters, one canonical catalogue row per SKU, rows
    with unknown SKUs dropped, events deduplicated by ``event_id``, users
    flagged as e-mail duplicates. With ``holdout`` the ``holdout_events`` table
    is read and cleaned the same way (evaluation only). Fitment is read only
    when the configuration has fitment attributes.
    """

    def __init__(self, input_dir: str, config: RecsConfig, num_shards: int = DEFAULT_SHARDS,
                 holdout: bool = False):
        super().__init__()
        self._input_dir = input_dir
        self._config = config
        self._num_shards = num_shards
        self._holdout = holdout

    def expand(self, pbegin: beam.pvalue.PBegin) -> CleanInputs:
        tables = ("catalog", "users", "events")
        tables += ("fitment",) if self._config.fitment_attributes else ()
        tables += ("holdout_events",) if self._holdout else ()
        read = {table: pbegin | f"Read{table.title().replace('_', '')}" >> ReadTable(
            table, find_table(self._input_dir, table), limits=self._config.inputs)
            for table in tables}
        catalog = read["catalog"].rows | "CleanCatalog" >> CleanCatalog()
        fitment_rows = (read["fitment"].rows if "fitment" in read
                        else pbegin | "NoFitment" >> beam.Create([]))
        fitment = fitment_rows | "FitmentSkus" >> DropUnknownSkus("fitment", catalog.rows)
        events = read["events"].rows | "EventSkus" >> DropUnknownSkus("events", catalog.rows)
        unique = events.rows | "DedupeEvents" >> DedupeEvents("events", self._num_shards)
        users = read["users"].rows | "DedupeEmails" >> MarkDuplicateEmails(self._num_shards)
        dead = [r.dead_letters for r in read.values()] + [
            catalog.dead_letters, fitment.dead_letters, events.dead_letters]
        counts = [r.counts for r in read.values()] + [catalog.counts, unique.counts]
        holdout = None
        if self._holdout:
            known = read["holdout_events"].rows | "HoldoutSkus" >> DropUnknownSkus(
                "holdout_events", catalog.rows)
            deduped = known.rows | "DedupeHoldout" >> DedupeEvents(
                "holdout_events", self._num_shards)
            holdout = deduped.rows
            dead.append(known.dead_letters)
            counts.append(deduped.counts)
        return CleanInputs(catalog.rows, users, unique.rows, fitment.rows, holdout,
                           dead | "FlattenDeadLetters" >> beam.Flatten(),
                           counts | "FlattenCounts" >> beam.Flatten())
