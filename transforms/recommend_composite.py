"""``Recommend``: the one composite every job applies to turn history into checked lists (#14).

The batch job, the backtest (through the batch job) and ``evaluate_ranker`` apply
it; ``pipelines.tune`` and the streaming refresh can call the same handler
objects (``models.recommend_handler``) directly, without Beam. The logic lives
in those handlers; :class:`_ScoreShardFn` only adapts one to Beam, as
RunInference adapts a ``ModelHandler``.
"""
from __future__ import annotations

import functools
import json
from typing import Dict, Iterator, NamedTuple, Optional, Tuple

import apache_beam as beam
import pandas as pd
from apache_beam import typehints
from apache_beam.utils import shared

from models import features
from models.config import RecsConfig
from models.recommend_handler import (MixHandler, PopularityHandler, RerankHandler,
                                      UnionRerankHandler, handler_for)
from transforms.frames import DEFAULT_SHARDS, CoGroupFrames
from transforms.health import Tag, count, dead_letters
from transforms.ranker import DRIFT, AttachRankerSignals, RankerItemCounts, load_model
from transforms.recommend import SegmentPopularity, SourceCandidates


class _Loaded:
    """Weak-referenceable holder of a handler's loaded tables, as ``shared.Shared`` requires."""

    def __init__(self, value):
        self.value = value


@typehints.with_input_types(Tuple[int, Dict[str, pd.DataFrame]])
@typehints.with_output_types(pd.DataFrame)
class _ScoreShardFn(beam.DoFn):
    """Adapts a handler: loads its tables once per worker, scores each shard, emits outputs.

    Side inputs arrive positionally in ``handler.side_inputs`` order. The loaded
    tables are shared per worker process under ``cache_tag`` (``shared.Shared``),
    not rebuilt per bundle; nothing else is kept between calls.
    """

    def __init__(self, handler: PopularityHandler, cache_tag: str):
        self._handler = handler
        self._cache_tag = cache_tag
        self._shared = shared.Shared()

    def process(self, element, *side) -> Iterator:
        _, groups = element
        handler = self._handler
        named = dict(zip(handler.side_inputs, side))
        loaded = self._shared.acquire(lambda: _Loaded(handler.load(named)),
                                      tag=self._cache_tag).value
        scored = handler.score(loaded, groups)
        for name, n in scored.counters:
            yield count(name, n)
        if len(scored.unserved):
            missed = scored.unserved[["user_id", *handler.config.group_attributes]]
            yield beam.pvalue.TaggedOutput(Tag.DEAD_LETTER.value, dead_letters(
                "users", "Recommend", [scored.reason] * len(missed),
                [json.dumps(r, default=str) for r in missed.to_dict("records")]))
        if scored.drift is not None:
            yield beam.pvalue.TaggedOutput(DRIFT, scored.drift)
        if len(scored.rows):
            yield beam.pvalue.TaggedOutput(Tag.QA.value, scored.violations)
            yield scored.rows


class RankerSpec(NamedTuple):
    """The ranker a ``Recommend`` re-ranks with: its artifact path and feature config."""

    path: str
    fconfig: features.FeatureConfig
    drift_every: int = 20


class RecommendOut(NamedTuple):
    """Everything ``Recommend`` produces; ``drift`` is empty without a ranker."""

    rows: beam.PCollection          # recommendation frames (SPEC §3 columns, + recK_source)
    dead_letters: beam.PCollection  # users no source could fill
    qa: beam.PCollection            # per-shard violation partials {rule id: n}
    counts: beam.PCollection        # (counter, n)
    popularity: beam.PCollection    # the segment popularity singleton (published by the job)
    drift: beam.PCollection         # ranker drift partials


class Recommend(beam.PTransform):
    """Profiles, order lines and fitment → each user's checked list, by the configured strategy.

    Inputs (a dict of PCollections of frames):
      ``users``: profiles from ``JoinUsersWithEvents`` (``bought``/``carted``/``viewed``);
      ``lines``: the deduplicated order lines it emits (every source sums these);
      ``fitment``: fitment rows whose SKUs are in the catalogue;
      ``events``: deduplicated events (only with a ranker: its signals and item counts).

    The graph, by configuration:

    - default: ``SegmentPopularity`` → ``RecommendPerVehicle`` (segment popularity);
    - ``candidates.mix`` of other sources: ``SourceCandidates`` (per-user candidates and
      the shared tables) joins ``RecommendPerVehicle``, which fills the slot mix;
    - ``ranker``: ``AttachRankerSignals`` and ``RankerItemCounts`` feed
      ``RecommendPerVehicle``, which re-ranks popularity's pools;
    - ``ranker`` with a mix: ``SourceCandidates`` as for the mix, and
      ``RecommendPerVehicle`` re-ranks the union of the sources' candidates
      (:class:`models.recommend_handler.UnionRerankHandler`).

    ``RecommendPerVehicle`` co-groups its inputs per vehicle shard and applies one
    handler of :mod:`models.recommend_handler` (:func:`handler_for`, or
    :class:`RerankHandler`); outside Beam (the streaming refresh) call that handler's
    ``load`` and ``score`` directly.
    """

    def __init__(self, catalog: beam.PCollection, as_of: pd.Timestamp, config: RecsConfig,
                 cache_tag: str, num_shards: int = DEFAULT_SHARDS,
                 ranker: Optional[RankerSpec] = None):
        super().__init__()
        self._catalog = catalog
        self._as_of = as_of
        self._config = config
        self._cache_tag = cache_tag
        self._num_shards = num_shards
        self._ranker = ranker

    def model_version(self) -> str:
        """``model_version`` of the rows when no ranker is used."""
        return handler_for(self._config).model_version

    def expand(self, inputs: Dict[str, beam.PCollection]) -> RecommendOut:
        config, n = self._config, self._num_shards
        users, lines, fitment = inputs["users"], inputs["lines"], inputs["fitment"]
        pop = lines | "SegmentPopularity" >> SegmentPopularity(self._as_of, config)
        side = {"catalog": self._catalog, "popularity": pop}
        shard_inputs = {"users": users, "fitment": fitment}
        extra_counts = []
        if self._ranker is not None and not config.candidates.popularity_only:
            # The union ranker (#14): the mix's own candidates, re-ranked together.
            handler = UnionRerankHandler(config, functools.partial(load_model,
                                                                   self._ranker.path))
        elif self._ranker is not None:
            spec = self._ranker
            handler = RerankHandler(config, spec.fconfig,
                                    functools.partial(load_model, spec.path), spec.drift_every)
            shard_inputs["users"] = (
                {"users": users, "events": inputs["events"]}
                | "AttachRankerSignals" >> AttachRankerSignals(
                    self._catalog, self._as_of, config, spec.fconfig, n))
            side["item_counts"] = inputs["events"] | "RankerItemCounts" >> RankerItemCounts(
                self._catalog, self._as_of, spec.fconfig, n)
        else:
            handler = handler_for(config)
        if isinstance(handler, MixHandler):
            personal, tables, (source_counts, build_counts) = (
                {"users": users, "lines": lines}
                | "SourceCandidates" >> SourceCandidates(self._as_of, config, n,
                                                         self._catalog))
            shard_inputs["candidates"] = personal
            side["tables"] = tables
            extra_counts = [source_counts, build_counts]
        out = shard_inputs | "RecommendPerVehicle" >> _PerVehicle(
            handler, side, self._cache_tag, n)
        counts = out[Tag.COUNTS.value]
        if extra_counts:
            counts = [counts, *extra_counts] | "FlattenSourceCounts" >> beam.Flatten()
        return RecommendOut(out[Tag.ROWS.value], out[Tag.DEAD_LETTER.value],
                            out[Tag.QA.value], counts, pop, out[DRIFT])


class _PerVehicle(beam.PTransform):
    """Inputs co-grouped per vehicle shard, each shard scored and checked by the handler."""

    def __init__(self, handler: PopularityHandler, side: Dict[str, beam.PCollection],
                 cache_tag: str, num_shards: int):
        super().__init__()
        self._handler = handler
        self._side = side
        self._cache_tag = cache_tag
        self._num_shards = num_shards

    def expand(self, inputs: Dict[str, beam.PCollection]):
        key = list(self._handler.config.shard_attributes)
        side = [beam.pvalue.AsSingleton(self._side[name])
                for name in self._handler.side_inputs]
        return (inputs
                | "ShardByVehicle" >> CoGroupFrames(
                    {name: key for name in inputs}, self._num_shards,
                    salt={n: ["user_id"] for n in ("users", "candidates") if n in inputs})
                | "ScoreAndCheck" >> beam.ParDo(
                    _ScoreShardFn(self._handler, self._cache_tag), *side).with_outputs(
                    Tag.DEAD_LETTER.value, Tag.QA.value, Tag.COUNTS.value, DRIFT,
                    main=Tag.ROWS.value))
