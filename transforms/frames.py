"""Batched shuffles: pandas frames routed so that all rows with one key meet in one frame.

The batch job moves millions of rows; shuffling them one element at a time
costs more than the scoring. These composites hash a key to one of a fixed
number of shards, group whole sub-frames per shard, and hand each shard to
pure pandas/numpy logic in models/.
"""
from __future__ import annotations

from typing import Dict, Iterable, Iterator, List, Sequence, Tuple

import apache_beam as beam
import numpy as np
import pandas as pd
from apache_beam import typehints

Shard = int
DEFAULT_SHARDS = 16


def shard_of(frame: pd.DataFrame, columns: Sequence[str], num_shards: int) -> np.ndarray:
    """Stable shard per row from the key columns' text (same answer in every process)."""
    key = pd.Series([""] * len(frame), index=frame.index, dtype=object)
    for column in columns:
        values = frame[column].astype(object)
        key = key + "\x1f" + values.where(values.notna(), "").astype(str)
    hashed = pd.util.hash_pandas_object(key, index=False).to_numpy(np.uint64)
    return (hashed % np.uint64(num_shards)).astype(np.int64)


def concat(frames: Iterable[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate frames; no frames gives an empty frame."""
    frames = [f for f in frames if f is not None and len(f.columns)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


@typehints.with_input_types(pd.DataFrame)
@typehints.with_output_types(Tuple[Shard, pd.DataFrame])
class SplitByShard(beam.DoFn):
    """Cuts one frame into per-shard sub-frames keyed by shard number."""

    def __init__(self, columns: Sequence[str], num_shards: int):
        self._columns = list(columns)
        self._num_shards = num_shards

    def process(self, frame: pd.DataFrame) -> Iterator[Tuple[Shard, pd.DataFrame]]:
        if frame.empty:
            return
        shards = shard_of(frame, self._columns, self._num_shards)
        for shard, part in frame.groupby(shards, sort=False):
            yield int(shard), part.reset_index(drop=True)


class CoGroupFrames(beam.PTransform):
    """Joins several frame collections on one key: ``(shard, {name: frame})`` per shard.

    Each input names its own key columns, so users keyed by ``user_id`` meet
    events keyed by ``user_id`` even when the frames differ otherwise. A name
    with no rows in a shard maps to an empty frame with no columns.
    """

    def __init__(self, keys: Dict[str, Sequence[str]], num_shards: int = DEFAULT_SHARDS):
        super().__init__()
        self._keys = keys
        self._num_shards = num_shards

    def expand(self, inputs: Dict[str, beam.PCollection]) -> beam.PCollection:
        split = {
            name: pcoll | f"Shard{_camel(name)}" >> beam.ParDo(
                SplitByShard(self._keys[name], self._num_shards))
            for name, pcoll in inputs.items()
        }
        return (split
                | "CoGroupByShard" >> beam.CoGroupByKey()
                | "ConcatPerShard" >> beam.MapTuple(
                    lambda shard, groups: (shard, {n: concat(f) for n, f in groups.items()})))


class GroupFrames(beam.PTransform):
    """One collection shuffled so each key's rows are in one frame: ``(shard, frame)``."""

    def __init__(self, columns: Sequence[str], num_shards: int = DEFAULT_SHARDS):
        super().__init__()
        self._columns = list(columns)
        self._num_shards = num_shards

    def expand(self, frames: beam.PCollection) -> beam.PCollection:
        return (frames
                | "SplitByShard" >> beam.ParDo(SplitByShard(self._columns, self._num_shards))
                | "GroupByShard" >> beam.GroupByKey()
                | "ConcatShard" >> beam.MapTuple(lambda shard, parts: (shard, concat(parts))))


@typehints.with_input_types(pd.DataFrame)
@typehints.with_output_types(pd.DataFrame)
class ConcatFramesFn(beam.CombineFn):
    """Gathers small frames into one (catalogue, counters, QA partials).

    Accumulator: a list of frames, concatenated only in ``extract_output``.
    """

    def create_accumulator(self) -> List[pd.DataFrame]:
        return []

    def add_input(self, acc: List[pd.DataFrame], frame: pd.DataFrame) -> List[pd.DataFrame]:
        acc.append(frame)
        return acc

    def merge_accumulators(self, accs: Iterable[List[pd.DataFrame]]) -> List[pd.DataFrame]:
        return [frame for acc in accs for frame in acc]

    def extract_output(self, acc: List[pd.DataFrame]) -> pd.DataFrame:
        return concat(acc)

    def default_label(self) -> str:
        return "ConcatFrames"


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))
