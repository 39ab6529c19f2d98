"""The allocation a sender uses: published weights per segment and `choose` (issue #18).

The bandit job publishes, for its latest window, one weight per (segment,
treatment) in the ``bandit_allocation`` table (`allocation_table`), stamped
with an ``allocation_version`` (the run id). A send job then calls
`choose(user_id, allocation, seed)` per recipient: a deterministic draw from
the user's segment's weights (the overall ``*`` weights when the segment has
none), returning the treatment and the probability it had, which the SENT
event records as ``propensity`` together with the ``allocation_version``.
Determinism per (user, seed, version) makes a re-run of a send job send the
same e-mails, and the recorded probability is what lets off-policy
evaluation (`models.ope`) say what another policy would have earned.

Per-segment weights come from segment posteriors shrunk toward the
treatment's overall posterior (`bandit.shrink_to_parent`); a treatment a
segment has not seen yet competes there with its overall rate as its prior,
so every registered arm keeps at least the exploration floor in every segment.

Nothing here imports Beam.
"""
from __future__ import annotations

import hashlib
from typing import Iterable, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from models import bandit
from models.bandit import BanditConfig
from models.campaign import complete_windows, overall_rows

ALL = "*"
ALLOCATION_COLUMNS = ("allocation_version", "window_start", "window_end", "segment",
                      "treatment_id", "weight")


def _uniform(seed: int, version: str, user_ids: Iterable[str]) -> np.ndarray:
    """A stable uniform in [0, 1) per user: blake2b of (seed, version, user), not Python's hash."""
    prefix = f"{int(seed)}\x1f{version}\x1f".encode()
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(prefix + str(u).encode(), digest_size=8).digest(),
                        "big") / 2.0 ** 64 for u in user_ids), dtype=np.float64)


def _weights_of(allocation: pd.DataFrame, segment: str) -> pd.DataFrame:
    rows = allocation.loc[allocation["segment"] == segment]
    if not len(rows):
        rows = allocation.loc[allocation["segment"] == ALL]
    if not len(rows):
        raise ValueError(f"allocation has no weights for segment {segment!r} nor {ALL!r}")
    return rows.sort_values("treatment_id", kind="stable")


def _pick(weights: pd.DataFrame, u: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    w = weights["weight"].to_numpy(np.float64)
    if np.any(w < 0) or w.sum() <= 0:
        raise ValueError("allocation weights must be non-negative with a positive sum")
    p = w / w.sum()
    index = np.minimum(np.searchsorted(np.cumsum(p), u, side="right"), len(p) - 1)
    # A zero-weight arm can never be drawn: searchsorted skips it for any u in [0, 1).
    return weights["treatment_id"].to_numpy(object)[index], p[index]


def choose(user_id: str, allocation: pd.DataFrame, seed: int,
           segment: str = ALL) -> Tuple[str, float]:
    """The treatment to send `user_id` and the probability it had (its propensity).

    Args:
        user_id: The recipient.
        allocation: Rows of one ``allocation_version`` of ``bandit_allocation``
            (columns segment, treatment_id, weight, allocation_version).
        seed: The send job's seed; the same (user, seed, version) always
            gives the same treatment.
        segment: The user's segment; a segment without weights uses ``*``.

    >>> alloc = pd.DataFrame({"allocation_version": "v1", "segment": "*",
    ...                       "treatment_id": ["A", "B"], "weight": [0.75, 0.25]})
    >>> choose("U1", alloc, 7) == choose("U1", alloc, 7)
    True
    >>> choose("U1", alloc, 7)[1] in (0.75, 0.25)
    True
    """
    treatments, propensities = choose_many([user_id], allocation, seed, [segment])
    return str(treatments[0]), float(propensities[0])


def choose_many(user_ids: Sequence[str], allocation: pd.DataFrame, seed: int,
                segments: Optional[Sequence[str]] = None) -> Tuple[np.ndarray, np.ndarray]:
    """`choose` for many users at once (vectorised per segment)."""
    versions = allocation["allocation_version"].unique() if len(allocation) else []
    if len(versions) != 1:
        raise ValueError(
            f"allocation must hold exactly one allocation_version, got {len(versions)}")
    u = _uniform(seed, str(versions[0]), user_ids)
    segs = np.asarray(list(segments) if segments is not None else [ALL] * len(u), dtype=object)
    treatments = np.empty(len(u), dtype=object)
    propensities = np.empty(len(u), dtype=np.float64)
    for seg in pd.unique(segs):
        mask = segs == seg
        treatments[mask], propensities[mask] = _pick(_weights_of(allocation, seg), u[mask])
    return treatments, propensities


def allocation_table(state: pd.DataFrame, version: str,
                     config: BanditConfig = BanditConfig()) -> pd.DataFrame:
    """``bandit_allocation`` rows from the latest window of ``bandit_state`` rows.

    The latest window lying within the data (`campaign.complete_windows`) is
    the evidence; when the data are shorter than one window, the overall rows.
    The overall (``*``) weights are the window's own. For each segment, every
    treatment of the window competes: the segment's counts (zero where it has
    none) under the prior Beta(strength·rate, strength·(1−rate)) with `rate`
    the treatment's overall posterior mean, then P(best) and the floor.

    >>> state = pd.DataFrame({"scope": "overall", "window_start": pd.Timestamp(0, tz="UTC"),
    ...     "window_end": pd.Timestamp(86400e9, tz="UTC"), "segment": ["*", "*", "F"],
    ...     "treatment_id": ["A", "B", "A"], "views": [100, 100, 10], "clicks": [10, 1, 1],
    ...     "mean": [0.11, 0.02, 0.1], "weight": [0.97, 0.03, 1.0]})
    >>> t = allocation_table(state, "run1", BanditConfig(draws=1000))
    >>> t[["segment", "treatment_id"]].values.tolist()
    [['*', 'A'], ['*', 'B'], ['F', 'A'], ['F', 'B']]
    >>> t.groupby("segment")["weight"].sum().round(6).tolist()
    [1.0, 1.0]
    """
    columns = list(ALLOCATION_COLUMNS)
    if not len(state):
        return pd.DataFrame({c: pd.Series(dtype=object) for c in columns})
    windows = complete_windows(state)
    if not len(windows):   # data shorter than one window: all of it is the evidence
        windows = overall_rows(state)
    if not len(windows):
        windows = state
    latest = windows.loc[windows["window_end"] == windows["window_end"].max()]
    overall = latest.loc[latest["segment"] == ALL].sort_values("treatment_id")
    frames = [overall[["segment", "treatment_id", "weight"]]]
    rate = overall.set_index("treatment_id")["mean"]
    for segment, rows in latest.loc[latest["segment"] != ALL].groupby("segment", sort=True):
        counts = rows.set_index("treatment_id")[["views", "clicks"]].reindex(
            rate.index, fill_value=0)
        post = bandit.shrink_to_parent(counts["views"], counts["clicks"],
                                       rate.clip(1e-9, 1 - 1e-9).to_numpy(float),
                                       config.segment_strength, config.interval)
        p_best = bandit.prob_best(post.alpha, post.beta, config.draws, config.seed)
        frames.append(pd.DataFrame({
            "segment": segment, "treatment_id": rate.index,
            "weight": bandit.allocation_weights(p_best, config.exploration_floor)}))
    table = pd.concat(frames, ignore_index=True)
    table["allocation_version"] = version
    table["window_start"] = latest["window_start"].iloc[0]
    table["window_end"] = latest["window_end"].iloc[0]
    return table[columns].reset_index(drop=True)
