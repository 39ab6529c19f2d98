"""Vectorised building blocks shared by the generators: grouped ranks and sums, string
columns built in Arrow buffers (ids, RFC 3339 times) and packed categorical samplers."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import pandas as pd
import pyarrow as pa

from models.world.contract import _STRING, DAY


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of the integer ranges [start, start + length), vectorised."""
    lengths = np.asarray(lengths, np.int64)
    total = int(lengths.sum())
    ends = np.cumsum(lengths)
    return np.repeat(np.asarray(starts, np.int64) - (ends - lengths), lengths) + np.arange(total)


def _group_rank(group: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Rank (0 = largest key) of every element within its group."""
    order = np.lexsort((-key, group))
    g = group[order]
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    pos = np.arange(len(g)) - np.repeat(starts, np.diff(np.r_[starts, len(g)]))
    rank = np.empty(len(g), np.int64)
    rank[order] = pos
    return rank


def _group_sum(group: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """Sum of values per group id in [0, n)."""
    return np.bincount(group, weights=values, minlength=n)


def _arrow(values) -> pa.Array:
    """A small Python/numpy sequence of strings as an Arrow string array."""
    return pa.array(list(values), _STRING)


def _take(dictionary: pa.Array, idx: np.ndarray, null: Optional[np.ndarray] = None) -> pd.Series:
    """String column dictionary[idx] (null where `null`), built in Arrow, not per row."""
    indices = pa.array(np.asarray(idx, np.int64), mask=null)
    return pd.Series(dictionary.take(indices), dtype="str")


def _digits(m: np.ndarray, col: int, values: np.ndarray, width: int) -> None:
    """Write `values` as zero-padded decimal ASCII into columns [col, col + width) of m."""
    v = values.astype(np.int64, copy=True)
    for j in range(col + width - 1, col - 1, -1):
        m[:, j] = v % 10 + 48
        v //= 10


def _fixed_strings(m: np.ndarray, null: Optional[np.ndarray] = None) -> pd.Series:
    """Rows of an ASCII byte matrix as a string column (Arrow buffers, no per-row work)."""
    n, width = m.shape
    offsets = np.arange(0, (n + 1) * width, width, dtype=np.int32)
    validity = None
    if null is not None:
        validity = pa.py_buffer(np.packbits(~null, bitorder="little"))
    arr = pa.Array.from_buffers(_STRING, n, [validity, pa.py_buffer(offsets),
                                             pa.py_buffer(np.ascontiguousarray(m).ravel())])
    return pd.Series(arr, dtype="str")


def _ids(prefix: str, numbers: np.ndarray, width: int,
         null: Optional[np.ndarray] = None) -> pd.Series:
    """Identifiers like U0000001: prefix plus zero-padded number."""
    p = prefix.encode()
    m = np.empty((len(numbers), len(p) + width), np.uint8)
    m[:, :len(p)] = np.frombuffer(p, np.uint8)
    _digits(m, len(p), numbers, width)
    return _fixed_strings(m, null)


def _rfc3339(seconds: np.ndarray) -> pd.Series:
    """Epoch seconds as RFC 3339 UTC strings (2026-03-01T12:00:00Z)."""
    seconds = np.asarray(seconds, np.int64)
    days = seconds // DAY
    uniq, inv = np.unique(days, return_inverse=True)
    dates = np.datetime_as_string(uniq.astype("datetime64[D]")).astype("S10")
    m = np.empty((len(seconds), 20), np.uint8)
    m[:, :10] = np.frombuffer(dates.tobytes(), np.uint8).reshape(-1, 10)[inv]
    sod = seconds - days * DAY
    for col, value in ((11, sod // 3600), (14, sod // 60 % 60), (17, sod % 60)):
        _digits(m, col, value, 2)
    m[:, 10], m[:, 13], m[:, 16], m[:, 19] = ord("T"), ord(":"), ord(":"), ord("Z")
    return _fixed_strings(m)


def _epoch(rfc3339: str) -> int:
    """Epoch seconds of an RFC 3339 UTC timestamp."""
    return int(pd.Timestamp(rfc3339).timestamp())


def _iso(seconds: int) -> str:
    """RFC 3339 UTC string of epoch seconds."""
    return _rfc3339(np.array([seconds]))[0]


@dataclass
class _Categorical:
    """Many categorical distributions packed in one array, sampled with one searchsorted."""

    key: np.ndarray    # group + cumulative probability within the group (last = group + 1)
    value: np.ndarray  # the outcome of each entry
    size: np.ndarray   # entries per group

    @classmethod
    def build(cls, group: np.ndarray, value: np.ndarray, prob: np.ndarray,
              n_groups: int) -> "_Categorical":
        """Pack (group, value, prob) entries; probabilities are normalised per group."""
        order = np.argsort(group, kind="stable")
        group, value, prob = group[order], value[order], prob[order].astype(np.float64)
        size = np.bincount(group, minlength=n_groups)
        total = _group_sum(group, prob, n_groups)
        cum = np.cumsum(prob)
        before = np.r_[0.0, cum][np.r_[0, np.cumsum(size)][:-1]]
        key = group + (cum - before[group]) / total[group]
        last = np.cumsum(size)[size > 0] - 1
        key[last] = group[last] + 1.0
        return cls(key, value, size)

    def sample(self, rng: np.random.Generator, group: np.ndarray) -> np.ndarray:
        """One outcome per element of `group` (every group must have entries)."""
        u = np.minimum(rng.random(len(group)), 1.0 - 1e-9)
        return self.value[np.searchsorted(self.key, group + u, side="right")]
