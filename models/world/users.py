"""Vehicles, the segments users hold (Zipf over a popularity order), order-rate shapes and
e-mail addresses with their planted repeats and mixed case."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from models.world.arrays import _arrow
from models.world.spec import WorldSpec
from models.world.vocabulary import (CURRENT_MODEL_YEAR, EMAIL_DOMAIN_P, EMAIL_DOMAINS,
                                     FIRST_NAMES, LAST_NAMES, MAKES)


@dataclass
class _Vehicles:
    """The vehicle universe: every (make, model, year) that parts can fit."""

    make_names: pa.Array
    model_names: pa.Array
    model_make: np.ndarray
    model_first: np.ndarray   # first vehicle of each model (sorted by make, model, year)
    model_len: np.ndarray
    model_start: np.ndarray   # first model year
    model_pop: np.ndarray
    make_pop: np.ndarray
    veh_make: np.ndarray
    veh_model: np.ndarray
    veh_year: np.ndarray


def _vehicles(spec: WorldSpec, rng: np.random.Generator) -> _Vehicles:
    """Makes (popularity-ordered), their models and production years."""
    makes = MAKES[:spec.n_makes]
    make_pop = (np.arange(len(makes)) + 1.0) ** -1.0
    names, model_make, start, length, pop = [], [], [], [], []
    lo, hi = spec.years_per_model
    for mi, (_, models) in enumerate(makes):
        n_models = int(np.clip(round(spec.max_models_per_make * (mi + 1) ** -0.35), 1,
                               len(models)))
        for j in range(n_models):
            span = int(rng.integers(lo, hi + 1))
            end = CURRENT_MODEL_YEAR - (0 if rng.random() < 0.5 else int(rng.integers(1, 20)))
            first = max(1970, end - span + 1)
            names.append(models[j])
            model_make.append(mi)
            start.append(first)
            length.append(end - first + 1)
            pop.append(make_pop[mi] * (j + 1.0) ** -0.8)
    model_make, length = np.array(model_make), np.array(length)
    start = np.array(start)
    veh_model = np.repeat(np.arange(len(names)), length)
    first = np.r_[0, np.cumsum(length)][:-1]
    return _Vehicles(
        make_names=_arrow(m for m, _ in makes), model_names=_arrow(names),
        model_make=model_make, model_first=first, model_len=length, model_start=start,
        model_pop=np.array(pop), make_pop=make_pop, veh_make=model_make[veh_model],
        veh_model=veh_model,
        veh_year=start[veh_model] + np.arange(len(veh_model)) - first[veh_model])


def _segments(spec: WorldSpec, veh: _Vehicles,
              rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """Vehicles users may hold and each one's share of users: Zipf over a popularity order."""
    age = CURRENT_MODEL_YEAR - veh.veh_year
    weight = veh.model_pop[veh.veh_model] * np.exp(-age / 12.0) * rng.lognormal(0, 0.5, len(age))
    k = min(spec.n_segments, len(age))
    chosen = rng.choice(len(age), k, replace=False, p=weight / weight.sum())
    chosen = chosen[np.argsort(-weight[chosen] * rng.lognormal(0, 0.5, k))]
    share = (np.arange(k) + 1.0) ** -spec.segment_zipf
    return chosen, share / share.sum()


def _solve_gamma_shape(mean: float, repeat: float) -> float:
    """Gamma shape k of per-user order rates so that, with Poisson orders of mean `mean`,
    the share of purchasers with two or more orders is `repeat` (negative binomial)."""
    def repeat_share(k: float) -> float:
        q = k / (k + mean)
        p0 = q ** k
        return 1.0 - k * q ** k * (1 - q) / (1.0 - p0)

    lo, hi = math.log(1e-4), math.log(1e4)
    for _ in range(80):
        mid = (lo + hi) / 2
        if repeat_share(math.exp(mid)) > repeat:
            lo = mid
        else:
            hi = mid
    return math.exp((lo + hi) / 2)


def _emails(spec: WorldSpec, n: int, rng: np.random.Generator) -> Tuple[pa.Array, dict]:
    """Unique addresses, some in mixed case, plus ~1% repeats of another user's address in
    a different case; returns the emails and which users repeat whom."""
    first = np.array(FIRST_NAMES)
    last = np.array(LAST_NAMES)
    mixed = rng.random(n) < spec.mixed_case_email_share
    fi = rng.integers(0, len(first), n) + len(first) * mixed
    li = rng.integers(0, len(last), n) + len(last) * mixed
    di = rng.choice(len(EMAIL_DOMAINS), n, p=EMAIL_DOMAIN_P) + len(EMAIL_DOMAINS) * mixed
    firsts = _arrow(np.r_[first, np.strings.capitalize(first)])
    lasts = _arrow(np.r_[last, np.strings.capitalize(last)])
    domains = _arrow(np.r_[EMAIL_DOMAINS, np.strings.capitalize(np.array(EMAIL_DOMAINS))])
    seps = _arrow([".", "_", ""]).take(pa.array(rng.choice(3, n, p=[0.6, 0.2, 0.2])))
    number = pa.array((np.arange(n) + 1).astype(str))  # unique, so addresses are unique
    email = pc.binary_join_element_wise(
        firsts.take(pa.array(fi)), seps, lasts.take(pa.array(li)), number, pa.scalar("@"),
        domains.take(pa.array(di)), "")
    n_dup = int(round(spec.duplicate_email_share * n))
    perm = rng.permutation(n)
    dup, src = np.sort(perm[:n_dup]), perm[n_dup:2 * n_dup]
    source = email.take(pa.array(src))
    lower = pc.utf8_lower(source)
    variant = pc.if_else(pc.equal(source, lower), pc.utf8_upper(source), lower)
    index = np.arange(n)
    index[dup] = n + np.arange(n_dup)
    email = pa.concat_arrays([email, variant]).take(pa.array(index))
    return email, {"duplicate": dup, "source": src, "mixed": int(mixed.sum())}
