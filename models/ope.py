"""Off-policy evaluation of e-mail allocation policies from logged sends (SPEC §4), in numpy.

A logged send is (arm, propensity, reward): the treatment sent, the
probability the logging policy gave it, and whether the recipient clicked
within the attribution window. From such logs this module estimates what a
*candidate* policy π would have earned per send, without sending anything:

* IPS (inverse propensity scoring): mean of π(a)/p · r; unbiased when every
  arm π may pick had p > 0, but its variance grows with the weights;
* SNIPS (self-normalised IPS): Σ w·r / Σ w, slightly biased, much steadier;
* DR (doubly robust): a reward model's prediction under π, corrected by
  the weighted residual of the logged arm; unbiased if either the
  propensities or the reward model are right.

Intervals are percentile bootstrap intervals over sends. The log may be
*compact*: one row per distinct (arm, propensity, reward) with a ``count``,
which is exact for context-free policies (the estimators only see those three
values) and lets a job ship per-cell counts instead of one row per send;
resampling then draws multinomial counts over the cells, so a bootstrap costs
O(resamples × cells), not O(resamples × sends).

Candidate policies here are context-free probability vectors over arms:
`uniform_policy`, `greedy_policy` and `thompson_policy` (the allocation
`models.bandit.prob_best` gives). Nothing here imports Beam or pandas.
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional

import numpy as np
from numpy.typing import ArrayLike, NDArray

from models import bandit

METHODS = ("ips", "snips", "dr")


class Log(NamedTuple):
    """Logged sends as parallel arrays (a row may stand for ``count`` identical sends)."""

    arm: NDArray[np.intp]
    propensity: NDArray[np.float64]
    reward: NDArray[np.float64]
    count: NDArray[np.float64]

    @property
    def sends(self) -> int:
        return int(self.count.sum())


class Estimate(NamedTuple):
    """A point estimate of a policy's reward per send and its bootstrap interval."""

    value: float
    ci_low: float
    ci_high: float


def make_log(arm: ArrayLike, propensity: ArrayLike, reward: ArrayLike,
             count: Optional[ArrayLike] = None, n_arms: Optional[int] = None) -> Log:
    """Checks and packs a log; raises ValueError on anything an estimator cannot use.

    >>> make_log([0, 1], [0.5, 0.5], [1, 0]).sends
    2
    >>> make_log([0], [0.0], [1])
    Traceback (most recent call last):
    ...
    ValueError: propensities must lie in (0, 1]
    """
    a = np.asarray(arm, dtype=np.intp)
    p = np.asarray(propensity, dtype=np.float64)
    r = np.asarray(reward, dtype=np.float64)
    c = np.ones(a.shape, np.float64) if count is None else np.asarray(count, dtype=np.float64)
    if not (a.ndim == 1 and a.shape == p.shape == r.shape == c.shape):
        raise ValueError("arm, propensity, reward and count must be equal-length 1-D arrays")
    if not np.all(np.isfinite(p) & (p > 0) & (p <= 1)):
        raise ValueError("propensities must lie in (0, 1]")
    if not np.all(np.isfinite(r)):
        raise ValueError("rewards must be finite")
    if np.any(c < 0) or np.any(c != np.floor(c)):
        raise ValueError("counts must be non-negative integers")
    if np.any(a < 0) or (n_arms is not None and a.size and a.max() >= n_arms):
        raise ValueError("arm indices must lie in [0, n_arms)")
    return Log(a, p, r, c)


def _policy(target: ArrayLike, n_arms: Optional[int] = None) -> NDArray[np.float64]:
    pi = np.asarray(target, dtype=np.float64)
    if pi.ndim != 1 or (n_arms is not None and pi.size != n_arms):
        raise ValueError(f"target policy must be a 1-D vector over {n_arms} arms")
    if np.any(pi < 0) or not np.isclose(pi.sum(), 1.0, atol=1e-9):
        raise ValueError("target policy must be a probability vector")
    return pi


def reward_model(log: Log, n_arms: int, prior: float = 1.0) -> NDArray[np.float64]:
    """Per-arm mean reward from the log, shrunk toward the overall mean by `prior` pseudo-sends.

    The DR estimator's q̂(a); an arm never logged gets the overall mean.

    >>> log = make_log([0, 0, 1], [0.5, 0.5, 0.5], [1, 0, 0])
    >>> reward_model(log, 3, prior=0.0).tolist()
    [0.5, 0.0, 0.3333333333333333]
    """
    total = float(log.count.sum())
    overall = float((log.count * log.reward).sum()) / total if total else 0.0
    n = np.bincount(log.arm, weights=log.count, minlength=n_arms)
    s = np.bincount(log.arm, weights=log.count * log.reward, minlength=n_arms)
    return np.divide(s + prior * overall, n + prior, out=np.full(n_arms, overall),
                     where=(n + prior) > 0)


def _terms(log: Log, pi: NDArray[np.float64], q_hat: NDArray[np.float64]
           ) -> Dict[str, NDArray[np.float64]]:
    """Per-row pieces whose count-weighted sums give every estimator."""
    w = pi[log.arm] / log.propensity
    return {"w": w, "wr": w * log.reward,
            "dr": float(pi @ q_hat) + w * (log.reward - q_hat[log.arm])}


def _from_sums(sums: Dict[str, NDArray[np.float64]], n: NDArray[np.float64]
               ) -> Dict[str, NDArray[np.float64]]:
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"ips": sums["wr"] / n, "snips": sums["wr"] / sums["w"], "dr": sums["dr"] / n}


def estimate(log: Log, target: ArrayLike, n_arms: int, q_hat: Optional[ArrayLike] = None,
             resamples: int = 1000, level: float = 0.95, seed: int = 2026
             ) -> Dict[str, Estimate]:
    """IPS, SNIPS and DR estimates of `target`'s reward per send, with bootstrap intervals.

    Args:
        log: Logged sends (`make_log`).
        target: The candidate policy's probability per arm.
        n_arms: Number of arms (the log's arm indices lie below it).
        q_hat: Reward model per arm for DR; default `reward_model` of the log.
        resamples: Bootstrap resamples (0: the interval is the point).
        level: Interval mass.
        seed: Seed of the resampling, so a published interval is reproducible.

    Returns:
        ``{"ips": Estimate, "snips": Estimate, "dr": Estimate}``.

    >>> log = make_log([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5], [1, 0, 0, 0])
    >>> {m: round(e.value, 3) for m, e in estimate(log, [1.0, 0.0], 2, resamples=0).items()}
    {'ips': 0.5, 'snips': 0.5, 'dr': 0.5}
    """
    pi = _policy(target, n_arms)
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    q = reward_model(log, n_arms) if q_hat is None else np.asarray(q_hat, np.float64)
    terms = _terms(log, pi, q)
    n = log.count.sum()
    point = _from_sums({k: np.atleast_1d(v @ log.count) for k, v in terms.items()},
                       np.atleast_1d(n))
    if resamples <= 0 or n == 0:
        return {m: Estimate(float(point[m][0]), float(point[m][0]), float(point[m][0]))
                for m in METHODS}
    rng = np.random.default_rng(seed)
    # Multinomial counts over the rows: one bootstrap resample of the n sends each.
    draws = rng.multinomial(int(n), log.count / n, size=resamples).astype(np.float64)
    boot = _from_sums({k: draws @ v for k, v in terms.items()}, draws.sum(axis=1))
    tail = (1 - level) / 2 * 100
    out = {}
    for m in METHODS:
        low, high = np.nanpercentile(boot[m], [tail, 100 - tail])
        out[m] = Estimate(float(point[m][0]), float(low), float(high))
    return out


def on_policy(log: Log, resamples: int = 1000, level: float = 0.95, seed: int = 2026
              ) -> Estimate:
    """The logging policy's realised reward per send (the plain mean), with its interval.

    >>> on_policy(make_log([0, 1], [0.5, 0.5], [1, 0]), resamples=0).value
    0.5
    """
    n = log.count.sum()
    value = float((log.count * log.reward).sum() / n) if n else float("nan")
    if resamples <= 0 or n == 0:
        return Estimate(value, value, value)
    draws = np.random.default_rng(seed).multinomial(int(n), log.count / n, size=resamples)
    boot = draws @ log.reward / n
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(boot, [tail, 100 - tail])
    return Estimate(value, float(low), float(high))


def lift(log: Log, baseline: ArrayLike, n_arms: int, method: str = "snips",
         resamples: int = 1000, level: float = 0.95, seed: int = 2026) -> Estimate:
    """Realised reward per send minus `baseline`'s estimate from the same sends (paired bootstrap).

    With baseline = uniform this is "the bandit beat random by x per send",
    with an interval that says whether x is more than luck.

    >>> log = make_log([0, 1, 0, 1], [0.8, 0.2, 0.8, 0.8], [1, 0, 1, 0])
    >>> round(lift(log, [0.5, 0.5], 2, resamples=0).value, 4)   # 2/4 - 1.25/4.375
    0.2143
    """
    pi = _policy(baseline, n_arms)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    q = reward_model(log, n_arms)
    terms = _terms(log, pi, q)
    terms["r"] = log.reward

    def diff(sums, n):
        base = _from_sums(sums, n)[method]
        return sums["r"] / n - base

    n = log.count.sum()
    point = float(diff({k: np.atleast_1d(v @ log.count) for k, v in terms.items()},
                       np.atleast_1d(n))[0])
    if resamples <= 0 or n == 0:
        return Estimate(point, point, point)
    draws = np.random.default_rng(seed).multinomial(
        int(n), log.count / n, size=resamples).astype(np.float64)
    boot = diff({k: draws @ v for k, v in terms.items()}, draws.sum(axis=1))
    tail = (1 - level) / 2 * 100
    low, high = np.nanpercentile(boot, [tail, 100 - tail])
    return Estimate(point, float(low), float(high))


# --- candidate policies ----------------------------------------------------------------

def uniform_policy(n_arms: int) -> NDArray[np.float64]:
    """Every arm equally likely: the random baseline.

    >>> uniform_policy(4).tolist()
    [0.25, 0.25, 0.25, 0.25]
    """
    if n_arms < 1:
        raise ValueError("need at least one arm")
    return np.full(n_arms, 1.0 / n_arms)


def greedy_policy(alpha: ArrayLike, beta: ArrayLike) -> NDArray[np.float64]:
    """All sends to the arm of highest posterior mean (ties: the lowest index).

    >>> greedy_policy([2.0, 5.0, 1.0], [8.0, 5.0, 1.0]).tolist()
    [0.0, 1.0, 0.0]
    """
    a = np.asarray(alpha, np.float64)
    b = np.asarray(beta, np.float64)
    out = np.zeros(a.size)
    out[np.argmax(a / (a + b))] = 1.0
    return out


def thompson_policy(alpha: ArrayLike, beta: ArrayLike, draws: int = 10_000,
                    seed: int = 2026, floor: float = 0.0) -> NDArray[np.float64]:
    """Thompson sampling as a stochastic policy: P(arm is best), with an optional floor.

    >>> thompson_policy([50.0, 1.0], [50.0, 99.0]).tolist()
    [1.0, 0.0]
    """
    p = bandit.prob_best(alpha, beta, draws, seed)
    return bandit.allocation_weights(p, floor) if floor else p


def policy_posterior(log: Log, n_arms: int, alpha0: float = 1.0, beta0: float = 1.0
                     ) -> tuple:
    """Beta(alpha0 + clicks, beta0 + sends - clicks) per arm from a log: what policies learn.

    >>> policy_posterior(make_log([0, 0, 1], [0.5] * 3, [1, 0, 0]), 2)
    (array([2., 1.]), array([2., 2.]))
    """
    n = np.bincount(log.arm, weights=log.count, minlength=n_arms)
    s = np.bincount(log.arm, weights=log.count * log.reward, minlength=n_arms)
    return alpha0 + s, beta0 + n - s


def candidate_policies(alpha: ArrayLike, beta: ArrayLike, draws: int = 10_000,
                       seed: int = 2026) -> Dict[str, NDArray[np.float64]]:
    """The three policies the report compares: uniform, greedy and Thompson."""
    a = np.asarray(alpha, np.float64)
    return {"uniform": uniform_policy(a.size), "greedy": greedy_policy(a, beta),
            "thompson": thompson_policy(a, beta, draws, seed)}
