"""Beta-Binomial Thompson sampling over email treatments (SPEC §4), in numpy.

Each treatment (arm) is summarised by two additive counts, views and clicks,
so a window's state is a sum of per-element counts and maps straight onto a
CombineFn accumulator. From those counts this module derives the posterior
Beta(alpha0 + clicks, beta0 + views - clicks), its equal-tailed credible
interval, the Monte Carlo probability that each arm is best and the allocation
weight with an exploration floor. Beam adapters live in transforms/; nothing
here imports Beam.
"""
from __future__ import annotations

import dataclasses
import enum
import math
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import special


class CountError(str, enum.Enum):
    """Why a (views, clicks) row is impossible; the dead-letter reason."""

    NON_INTEGER = "non-integer count"
    NEGATIVE = "negative count"
    CLICKS_EXCEED_VIEWS = "clicks exceed views"


def _check_floor(floor: float, n_arms: int) -> None:
    """Raises ValueError unless every one of n_arms arms can get `floor`."""
    if n_arms < 1:
        raise ValueError(f"need at least one arm, got {n_arms}")
    # A small tolerance so that e.g. floor=0.02 with 50 arms is accepted.
    if floor * n_arms > 1.0 + 1e-12:
        raise ValueError(
            f"exploration_floor={floor} times {n_arms} arms is {floor * n_arms:.4g} > 1: "
            f"the floor cannot exceed 1/{n_arms} = {1.0 / n_arms:.4g}")


@dataclasses.dataclass(frozen=True)
class BanditConfig:
    """Immutable bandit settings, checked on construction so bad config fails at start-up.

    Attributes:
        alpha0: Prior pseudo-clicks of Beta(alpha0, beta0); 1.0 with beta0=1.0 is uniform.
        beta0: Prior pseudo-non-clicks.
        draws: Monte Carlo draws used to estimate P(best).
        seed: Seed of the P(best) draws, so a window's published state is reproducible.
        exploration_floor: Minimum allocation weight per arm; floor * n_arms <= 1
            (checked against the arm count by `check_arms`).
        interval: Mass of the equal-tailed credible interval.
        segment_strength: Pseudo-views of the parent-rate prior used to shrink
            segment posteriors (see `shrink_to_parent`).

    >>> BanditConfig(interval=1.5)
    Traceback (most recent call last):
    ...
    ValueError: interval must lie in (0, 1), got 1.5
    """

    alpha0: float = 1.0
    beta0: float = 1.0
    draws: int = 10_000
    seed: int = 2026
    exploration_floor: float = 0.02
    interval: float = 0.95
    segment_strength: float = 50.0

    def __post_init__(self) -> None:
        for name in ("alpha0", "beta0", "segment_strength"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        for name in ("draws", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if self.draws < 1:
            raise ValueError(f"draws must be >= 1, got {self.draws}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if not 0.0 <= self.exploration_floor <= 1.0:
            raise ValueError(
                f"exploration_floor must lie in [0, 1], got {self.exploration_floor!r}")
        if not 0.0 < self.interval < 1.0:
            raise ValueError(f"interval must lie in (0, 1), got {self.interval!r}")

    def check_arms(self, n_arms: int) -> None:
        """Raises ValueError if the exploration floor cannot be met for `n_arms` arms.

        Call it at start-up once the treatment list is known.

        >>> BanditConfig(exploration_floor=0.05).check_arms(24)
        Traceback (most recent call last):
        ...
        ValueError: exploration_floor=0.05 times 24 arms is 1.2 > 1: the floor cannot exceed 1/24 = 0.04167
        """
        _check_floor(self.exploration_floor, n_arms)


class Posterior(NamedTuple):
    """Beta posterior per arm with its equal-tailed credible interval (all arrays)."""

    alpha: NDArray[np.float64]
    beta: NDArray[np.float64]
    mean: NDArray[np.float64]
    ci_low: NDArray[np.float64]
    ci_high: NDArray[np.float64]


def validate_counts(views: ArrayLike, clicks: ArrayLike) -> tuple[NDArray[np.bool_], NDArray[np.str_]]:
    """Flags rows whose counts are impossible, so callers can dead-letter them.

    Counts must be finite non-negative integers (integral floats are accepted)
    with clicks <= views. The first failing check names the reason.

    Args:
        views: Views per row.
        clicks: Clicks per row, same shape as `views`.

    Returns:
        (valid, reason): a boolean mask and a string array holding '' for valid
        rows and a `CountError` value otherwise.

    Raises:
        ValueError: If the shapes differ (a caller bug, not a bad element).

    >>> valid, reason = validate_counts([10, 5, 3, 4], [2, 6, -1, 1.5])
    >>> valid.tolist(), reason.tolist()
    ([True, False, False, False], ['', 'clicks exceed views', 'negative count', 'non-integer count'])
    """
    v = np.asarray(views, dtype=np.float64)
    c = np.asarray(clicks, dtype=np.float64)
    if v.shape != c.shape:
        raise ValueError(f"views shape {v.shape} != clicks shape {c.shape}")
    with np.errstate(invalid="ignore"):
        non_integer = ~(np.isfinite(v) & np.isfinite(c) & (v == np.floor(v)) & (c == np.floor(c)))
        negative = ~non_integer & ((v < 0) | (c < 0))
        exceed = ~non_integer & ~negative & (c > v)
    reason = np.full(v.shape, "", dtype="<U19")
    reason[non_integer] = CountError.NON_INTEGER.value
    reason[negative] = CountError.NEGATIVE.value
    reason[exceed] = CountError.CLICKS_EXCEED_VIEWS.value
    return reason == "", reason


def _checked_counts(views: ArrayLike, clicks: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Returns counts as float arrays, raising ValueError if any row is impossible."""
    valid, reason = validate_counts(views, clicks)
    if not valid.all():
        bad = np.flatnonzero(~valid.ravel())
        raise ValueError(
            f"impossible counts in {bad.size} row(s), first at index {bad[0]}: "
            f"{reason.ravel()[bad[0]]}; dead-letter them with validate_counts first")
    return np.asarray(views, dtype=np.float64), np.asarray(clicks, dtype=np.float64)


def _beta_summary(alpha: NDArray[np.float64], beta: NDArray[np.float64], interval: float) -> Posterior:
    """Mean and equal-tailed `interval` of Beta(alpha, beta)."""
    tail = (1.0 - interval) / 2.0
    return Posterior(
        alpha=alpha,
        beta=beta,
        mean=alpha / (alpha + beta),
        ci_low=special.betaincinv(alpha, beta, tail),
        ci_high=special.betaincinv(alpha, beta, 1.0 - tail),
    )


def posterior(views: ArrayLike, clicks: ArrayLike, config: BanditConfig = BanditConfig()) -> Posterior:
    """Conjugate posterior Beta(alpha0 + clicks, beta0 + views - clicks) per arm.

    Args:
        views: Views per arm.
        clicks: Clicks per arm.
        config: Prior and interval mass.

    Raises:
        ValueError: On impossible counts (see `validate_counts`).

    >>> post = posterior([10], [3])
    >>> post.alpha.tolist(), post.beta.tolist(), post.mean.tolist()
    ([4.0], [8.0], [0.3333333333333333])
    """
    v, c = _checked_counts(views, clicks)
    return _beta_summary(config.alpha0 + c, config.beta0 + v - c, config.interval)


def shrink_to_parent(views: ArrayLike, clicks: ArrayLike, parent_rate: ArrayLike, strength: float,
                     interval: float = 0.95) -> Posterior:
    """Segment posterior under the empirical-Bayes prior Beta(strength*rate, strength*(1-rate)).

    A segment with few views stays near its treatment's overall rate instead of
    swinging on a handful of clicks; with many views its own data dominate.

    Args:
        views: Views per segment.
        clicks: Clicks per segment.
        parent_rate: The treatment's overall click rate, broadcastable to the
            counts; must lie strictly in (0, 1), so pass e.g. the treatment's
            posterior mean rather than a raw rate that may be 0.
        strength: Prior weight in pseudo-views (BanditConfig.segment_strength).
        interval: Mass of the equal-tailed credible interval.

    Raises:
        ValueError: On impossible counts or out-of-range parameters.

    >>> shrink_to_parent([4], [2], 0.1, 50.0).mean.round(4).tolist()
    [0.1296]
    """
    v, c = _checked_counts(views, clicks)
    rate = np.asarray(parent_rate, dtype=np.float64)
    if not np.all((rate > 0) & (rate < 1)):
        raise ValueError(f"parent_rate must lie strictly in (0, 1), got {rate}")
    if not (math.isfinite(strength) and strength > 0):
        raise ValueError(f"strength must be a finite number > 0, got {strength!r}")
    if not 0.0 < interval < 1.0:
        raise ValueError(f"interval must lie in (0, 1), got {interval!r}")
    return _beta_summary(strength * rate + c, strength * (1.0 - rate) + v - c, interval)


def _check_beta_params(alpha: ArrayLike, beta: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Returns 1-D alpha, beta arrays of one arm each, all finite and > 0."""
    a = np.asarray(alpha, dtype=np.float64)
    b = np.asarray(beta, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape or a.size == 0:
        raise ValueError(f"alpha and beta must be equal-length non-empty 1-D arrays, "
                         f"got shapes {a.shape} and {b.shape}")
    if not (np.all(np.isfinite(a) & (a > 0)) and np.all(np.isfinite(b) & (b > 0))):
        raise ValueError("alpha and beta must be finite and > 0")
    return a, b


def prob_best(alpha: ArrayLike, beta: ArrayLike, draws: int = 10_000, seed: int = 2026) -> NDArray[np.float64]:
    """Monte Carlo P(arm has the highest click rate) under independent Beta posteriors.

    Draws a (draws x arms) matrix of Beta samples, takes the argmax of each
    row and counts wins. Continuous draws make ties a probability-zero event.
    The fixed seed makes a window's published value reproducible; the standard
    error of each entry is sqrt(p * (1 - p) / draws).

    >>> prob_best([1.0, 1.0], [1.0, 1.0], draws=100_000).round(2).tolist()
    [0.5, 0.5]
    """
    a, b = _check_beta_params(alpha, beta)
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    samples = np.random.default_rng(seed).beta(a, b, size=(draws, a.size))
    wins = np.bincount(samples.argmax(axis=1), minlength=a.size)
    return wins / draws


def allocation_weights(p_best: ArrayLike, floor: float) -> NDArray[np.float64]:
    """Thompson allocation: floor + (1 - n_arms * floor) * p_best.

    Every arm keeps at least `floor` of the traffic so a treatment that looks
    bad early can still recover; the weights sum to 1 because p_best does.

    Raises:
        ValueError: If p_best is not a distribution or floor * n_arms > 1.

    >>> allocation_weights([0.9, 0.1, 0.0], 0.1).round(4).tolist()
    [0.73, 0.17, 0.1]
    """
    p = np.asarray(p_best, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"p_best must be 1-D, got shape {p.shape}")
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"floor must lie in [0, 1], got {floor!r}")
    _check_floor(floor, p.size)
    if np.any(p < 0) or not math.isclose(p.sum(), 1.0, abs_tol=1e-9):
        raise ValueError(f"p_best must be non-negative and sum to 1, got sum {p.sum()}")
    return floor + (1.0 - p.size * floor) * p


def thompson_choose(alpha: ArrayLike, beta: ArrayLike, n: int,
                    rng: np.random.Generator) -> NDArray[np.intp]:
    """Arm index for each of n sends, each from its own posterior draw (Thompson sampling).

    For simulation and offline evaluation; production allocates by `allocation_weights`.

    >>> thompson_choose([50.0, 1.0], [50.0, 99.0], 5, np.random.default_rng(0)).tolist()
    [0, 0, 0, 0, 0]
    """
    a, b = _check_beta_params(alpha, beta)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return rng.beta(a, b, size=(n, a.size)).argmax(axis=1)


def bandit_state(views: ArrayLike, clicks: ArrayLike,
                 config: BanditConfig = BanditConfig()) -> dict[str, NDArray]:
    """One window's `bandit_state` rows, as columns; the caller adds window and treatment ids.

    Returns:
        Arrays keyed treatment_index, views, clicks, alpha, beta, mean, ci_low,
        ci_high, p_best, weight, one entry per arm (`pandas.DataFrame(state)`
        gives the table).

    Raises:
        ValueError: On impossible counts or a floor the arm count cannot meet.

    >>> state = bandit_state([100, 100], [10, 1])
    >>> state["p_best"].tolist(), state["weight"].round(4).tolist()
    ([0.9975, 0.0025], [0.9776, 0.0224])
    """
    v, c = _checked_counts(views, clicks)
    if v.ndim != 1:
        raise ValueError(f"views and clicks must be 1-D, got shape {v.shape}")
    config.check_arms(v.size)
    post = posterior(v, c, config)
    p_best = prob_best(post.alpha, post.beta, config.draws, config.seed)
    return {
        "treatment_index": np.arange(v.size),
        "views": v.astype(np.int64),
        "clicks": c.astype(np.int64),
        **post._asdict(),
        "p_best": p_best,
        "weight": allocation_weights(p_best, config.exploration_floor),
    }
