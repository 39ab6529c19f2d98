"""Batched shuffles: pandas frames routed so that all rows with one key meet in one frame.

The batch job moves millions of rows; shuffling them one element at a time
costs more than the scoring. These composites hash a key to a shard, group
whole sub-frames per shard, and hand each shard to pure pandas/numpy logic in
models/.

Elements stay bounded at any scale (docs/scaling.md):

- the number of shards is derived from the data: every input's rows are
  counted first (a singleton side input) and ``SplitByShard`` uses
  ``max(min_shards, ceil(rows / target))`` shards, ``target = max_rows // 2``,
  the same count for every input of a ``CoGroupFrames`` so they still meet.
  Below ``min_shards * target`` rows this is exactly the old fixed count, so
  small runs shard as before;
- a hot key (more than ``max_rows // 4`` rows of the salted inputs, e.g. the
  users of one vehicle when most users share a segment) is split over
  ``ceil(rows / (max_rows // 4))`` salted sub-keys placed on consecutive shards;
  rows of the inputs named in ``salt`` go to one sub-key by the hash of their
  salt columns, rows of the other inputs (the fitment of that vehicle) are
  copied to every sub-key. The consumer sees whole copies; ``owned`` gives the
  rows a shard owns (the first copy), so counters count each row once.

Each shuffle records Beam distributions (namespace ``frames``): rows and
in-memory bytes of every element it emits, so a run shows its largest element.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import apache_beam as beam
import numpy as np
import pandas as pd
from apache_beam import typehints
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindows

from models.shards import COPIES, owned  # noqa: F401 (owned: re-exported for consumers)

Shard = int
DEFAULT_SHARDS = 16
# Rows (summed over the inputs of a co-group) one shuffled element may hold. Shards are
# sized for half of it, hot keys are cut into pieces of a quarter of it.
DEFAULT_MAX_ROWS = 200_000
METRICS_NAMESPACE = "frames"


@dataclass(frozen=True)
class Sharding:
    """How a shuffle sizes its shards: at least ``min_shards``, at most ~``max_rows`` a shard.

    Every composite here accepts a plain ``int`` too (``min_shards``, default bound).
    """

    min_shards: int = DEFAULT_SHARDS
    max_rows: int = DEFAULT_MAX_ROWS

    def __post_init__(self):
        if int(self.min_shards) < 1:
            raise ValueError("min_shards must be >= 1")
        if int(self.max_rows) < 8:
            raise ValueError("max_rows must be >= 8")

    @property
    def target_rows(self) -> int:
        """Rows a shard is sized for: half the bound, so hashing noise stays under it."""
        return max(1, self.max_rows // 2)

    @property
    def hot_rows(self) -> int:
        """A key with more salted rows than this is split into sub-keys of at most this."""
        return max(1, self.max_rows // 4)

    def shards_for(self, rows: Optional[int]) -> int:
        """Shards for a shuffle of ``rows`` rows (``None``: the fixed minimum)."""
        if rows is None:
            return int(self.min_shards)
        return max(int(self.min_shards), math.ceil(int(rows) / self.target_rows))


def as_sharding(num_shards: Union[int, Sharding, None]) -> Sharding:
    """``Sharding`` from the ``num_shards`` argument composites have always taken."""
    if isinstance(num_shards, Sharding):
        return num_shards
    return Sharding(DEFAULT_SHARDS if num_shards is None else int(num_shards))


def key_text(frame: pd.DataFrame, columns: Sequence[str]) -> pd.Series:
    """The key of every row as one string (nulls as empty), the same in every process."""
    key = pd.Series([""] * len(frame), index=frame.index, dtype=object)
    for column in columns:
        values = frame[column].astype(object)
        key = key + "\x1f" + values.where(values.notna(), "").astype(str)
    return key


def _hash(text: pd.Series) -> np.ndarray:
    return pd.util.hash_pandas_object(text, index=False).to_numpy(np.uint64)


def shard_of(frame: pd.DataFrame, columns: Sequence[str], num_shards: int) -> np.ndarray:
    """Stable shard per row from the key columns' text (same answer in every process)."""
    return (_hash(key_text(frame, columns)) % np.uint64(num_shards)).astype(np.int64)


def concat(frames: Iterable[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate frames; no frames gives an empty frame."""
    frames = [f for f in frames if f is not None and len(f.columns)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _record(frame_rows: int, frame_bytes: int) -> None:
    Metrics.distribution(METRICS_NAMESPACE, "element_rows").update(int(frame_rows))
    Metrics.distribution(METRICS_NAMESPACE, "element_bytes").update(int(frame_bytes))


def _bytes(frame: pd.DataFrame) -> int:
    return int(frame.memory_usage(index=False, deep=True).sum()) if len(frame.columns) else 0


@typehints.with_input_types(pd.DataFrame)
@typehints.with_output_types(Tuple[Shard, pd.DataFrame])
class SplitByShard(beam.DoFn):
    """Cuts one frame into per-shard sub-frames keyed by shard number.

    Side inputs (``process(frame, *sides)``): first ``row_counts`` singletons,
    the row counts of every input of the shuffle, whose sum sets the shard
    count (``Sharding.shards_for``; without them it is the fixed minimum); then
    ``key_counts`` dicts ``{key text: rows}`` of the salted inputs' large keys,
    whose sum marks the hot keys. A hot key's rows go to ``salt`` sub-keys by
    the hash of the salt columns or, with ``copy``, to all of them (the copies
    tagged for ``owned``).
    """

    def __init__(self, columns: Sequence[str], num_shards: Union[int, Sharding],
                 salt: Optional[Sequence[str]] = None, copy: bool = False,
                 row_counts: int = 0, key_counts: int = 0):
        self._columns = list(columns)
        self._sharding = as_sharding(num_shards)
        self._salt = list(salt) if salt else None
        self._copy = copy
        self._row_counts = row_counts
        self._key_counts = key_counts

    def process(self, frame: pd.DataFrame, *sides) -> Iterator[Tuple[Shard, pd.DataFrame]]:
        if frame.empty:
            return
        totals = sides[:self._row_counts]
        n = self._sharding.shards_for(sum(totals) if totals else None)
        key = key_text(frame, self._columns)
        base = (_hash(key) % np.uint64(n)).astype(np.int64)
        hot = _sub_keys(sides[self._row_counts:self._row_counts + self._key_counts],
                        self._sharding.hot_rows)
        if not hot:
            yield from _parts(frame, base)
            return
        subkeys = key.map(hot).fillna(1).to_numpy(np.int64)
        if self._copy:
            yield from _parts(frame, base)
            for salt in range(1, int(subkeys.max())):
                rows = subkeys > salt
                if rows.any():
                    for shard, part in _parts(frame.loc[rows], (base[rows] + salt) % n):
                        yield shard, part.assign(**{COPIES: salt})
            return
        salted = _hash(key_text(frame, self._salt)) % subkeys.astype(np.uint64)
        yield from _parts(frame, (base + salted.astype(np.int64)) % n)


def _sub_keys(key_counts: Sequence[Dict[str, int]], hot_rows: int) -> Dict[str, int]:
    """``{hot key: sub-keys}`` from per-input large-key counts (the same in every worker)."""
    summed: Dict[str, int] = {}
    for counts in key_counts:
        for key, rows in counts.items():
            summed[key] = summed.get(key, 0) + int(rows)
    return {key: math.ceil(rows / hot_rows) for key, rows in summed.items() if rows > hot_rows}


def _parts(frame: pd.DataFrame, shards: np.ndarray) -> Iterator[Tuple[Shard, pd.DataFrame]]:
    for shard, part in frame.groupby(shards, sort=False):
        yield int(shard), part.reset_index(drop=True)


@typehints.with_input_types(pd.DataFrame)
@typehints.with_output_types(Tuple[str, int])
class _KeyCountsFn(beam.DoFn):
    """``(key text, rows)`` per distinct key of a frame, for hot-key detection."""

    def __init__(self, columns: Sequence[str]):
        self._columns = list(columns)

    def process(self, frame: pd.DataFrame) -> Iterator[Tuple[str, int]]:
        if len(frame):
            yield from key_text(frame, self._columns).value_counts(sort=False).items()


def _concat_shard(shard: Shard, parts: Iterable[pd.DataFrame]) -> Tuple[Shard, pd.DataFrame]:
    frame = concat(parts)
    _record(len(frame), _bytes(frame))
    return shard, frame


class _ConcatGroups:
    """``(shard, {name: parts})`` → ``(shard, {name: frame})``, one copy of each hot key.

    Copied parts carry their sub-key in a ``COPIES`` column; several sub-keys
    of one key may hash to the same shard, so a key's copies are kept once
    per shard (none when the key's own rows are there) and listed again under
    ``name + COPIES`` for :func:`owned`.
    """

    def __init__(self, keys: Dict[str, Sequence[str]]):
        self._keys = keys

    def __call__(self, shard: Shard, groups: Dict[str, Iterable[pd.DataFrame]]
                 ) -> Tuple[Shard, Dict[str, pd.DataFrame]]:
        out: Dict[str, pd.DataFrame] = {}
        for name, parts in groups.items():
            own, copies = [], []
            for part in parts:
                (copies if COPIES in part.columns else own).append(part)
            out[name] = concat(own)
            if copies:
                copied = self._one_copy(concat(copies), out[name], self._keys[name])
                if len(copied):
                    out[name] = concat([out[name], copied])
                    out[name + COPIES] = copied
        _record(sum(len(f) for n, f in out.items() if not n.endswith(COPIES)),
                sum(_bytes(f) for n, f in out.items() if not n.endswith(COPIES)))
        return shard, out

    @staticmethod
    def _one_copy(copied: pd.DataFrame, own: pd.DataFrame, columns: Sequence[str]
                  ) -> pd.DataFrame:
        key = key_text(copied, columns)
        first = copied[COPIES] == copied[COPIES].groupby(key.to_numpy(object)).transform("min")
        keep = first.to_numpy(bool)
        if len(own.columns):
            keep = keep & ~key.isin(set(key_text(own, columns))).to_numpy(bool)
        return copied.loc[keep].drop(columns=[COPIES]).reset_index(drop=True)


def _row_counts(pcolls: Dict[str, beam.PCollection]) -> List[beam.pvalue.AsSingleton]:
    """Rows of each frame collection, one singleton side input each (0 when empty).

    One side input per collection rather than one over a Flatten of their
    sizes: the FnApiRunner's fusion does not see a side input's dependence
    through a Flatten and then fuses the consumer into a stage the side input
    waits for (it stops with "watermark-pending bundles did not execute").
    """
    return [beam.pvalue.AsSingleton(
        pcoll | f"Rows{_camel(name)}" >> beam.Map(len)
        | f"GlobalRows{_camel(name)}" >> beam.WindowInto(GlobalWindows())
        | f"SumRows{_camel(name)}" >> beam.CombineGlobally(sum))
        for name, pcoll in pcolls.items()]


def _own_copy(pcoll: beam.PCollection, name: str) -> beam.PCollection:
    """``pcoll`` through a fused identity step, so this shuffle's split reads its own copy.

    When one collection feeds two shuffles and the second one's row counts
    depend on the first one's output (profiles → candidates → per-vehicle
    shuffle), the FnApiRunner stalls if both splits read the same collection
    with side inputs ("watermark-pending bundles did not execute"). An
    identity step fuses into the producer on every runner; it costs nothing.
    """
    return pcoll | f"Take{_camel(name)}" >> beam.Map(_identity)


def _identity(frame: pd.DataFrame) -> pd.DataFrame:
    return frame


def _key_counts(name: str, pcoll: beam.PCollection, columns: Sequence[str],
                floor: int) -> beam.pvalue.AsDict:
    """``{key text: rows}`` of one input's keys with more than ``floor`` rows."""
    return beam.pvalue.AsDict(
        pcoll | f"KeyRows{_camel(name)}" >> beam.ParDo(_KeyCountsFn(columns))
        | f"GlobalKeyRows{_camel(name)}" >> beam.WindowInto(GlobalWindows())
        | f"SumKeyRows{_camel(name)}" >> beam.CombinePerKey(sum)
        | f"LargeKeys{_camel(name)}" >> beam.Filter(lambda kv: kv[1] > floor))


class CoGroupFrames(beam.PTransform):
    """Joins several frame collections on one key: ``(shard, {name: frame})`` per shard.

    Each input names its own key columns, so users keyed by ``user_id`` meet
    events keyed by ``user_id`` even when the frames differ otherwise. A name
    with no rows in a shard maps to an empty frame with no columns.

    ``salt`` (``{name: columns}``) allows hot keys to be split: the named inputs'
    rows of a hot key are spread over sub-keys by those columns, the other
    inputs' rows of that key copied to each sub-key. Only correct when the
    consumer's result for a row of a salted input depends on that row (and rows
    with the same salt columns) plus the copied inputs, e.g. scoring a user
    against the fitment of their vehicle. Consumers count copied inputs with
    :func:`owned`.
    """

    def __init__(self, keys: Dict[str, Sequence[str]],
                 num_shards: Union[int, Sharding] = DEFAULT_SHARDS,
                 salt: Optional[Dict[str, Sequence[str]]] = None):
        super().__init__()
        self._keys = keys
        self._sharding = as_sharding(num_shards)
        self._salt = dict(salt or {})

    def expand(self, inputs: Dict[str, beam.PCollection]) -> beam.PCollection:
        totals = _row_counts(inputs)
        salted = [n for n in inputs if n in self._salt]
        # A key hot in the sum is above hot_rows / len(salted) in at least one input.
        floor = self._sharding.hot_rows // max(1, len(salted))
        large = [_key_counts(n, inputs[n], self._keys[n], floor) for n in salted]
        split = {}
        for name, pcoll in inputs.items():
            fn = SplitByShard(self._keys[name], self._sharding, self._salt.get(name),
                              copy=bool(salted) and name not in self._salt,
                              row_counts=len(totals), key_counts=len(large))
            split[name] = (_own_copy(pcoll, name)
                           | f"Shard{_camel(name)}" >> beam.ParDo(fn, *totals, *large))
        return (split
                | "CoGroupByShard" >> beam.CoGroupByKey()
                | "ConcatPerShard" >> beam.MapTuple(_ConcatGroups(self._keys)))


class GroupFrames(beam.PTransform):
    """One collection shuffled so each key's rows are in one frame: ``(shard, frame)``."""

    def __init__(self, columns: Sequence[str], num_shards: Union[int, Sharding] = DEFAULT_SHARDS):
        super().__init__()
        self._columns = list(columns)
        self._sharding = as_sharding(num_shards)

    def expand(self, frames: beam.PCollection) -> beam.PCollection:
        return (_own_copy(frames, "")
                | "SplitByShard" >> beam.ParDo(
                    SplitByShard(self._columns, self._sharding, row_counts=1),
                    *_row_counts({"": frames}))
                | "GroupByShard" >> beam.GroupByKey()
                | "ConcatShard" >> beam.MapTuple(_concat_shard))


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
