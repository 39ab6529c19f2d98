"""Ground-truth purchase and browsing propensities of every segment, and the truth tables
(segments, favourites, global top) tests and backtests check results against."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from models.world.arrays import _Categorical, _group_rank, _group_sum
from models.world.catalogue import _Catalogue
from models.world.spec import WorldSpec
from models.world.users import _Vehicles
from models.world.vocabulary import FIT_MISSING, SERVICE


@dataclass
class _Propensity:
    """Purchase and browsing distributions of every segment (K = users without vehicle)."""

    fit: _Categorical      # per segment: parts with fitment rows that fit it
    nofit: _Categorical    # one group: products without fitment rows
    browse: _Categorical   # one group: what people look at regardless of vehicle
    p_nofit: float

    def purchase(self, rng: np.random.Generator, seg: np.ndarray) -> np.ndarray:
        """Item bought by owners of `seg`: a no-fitment product or a part fitting the vehicle."""
        fit = (rng.random(len(seg)) >= self.p_nofit) & (self.fit.size[seg] > 0)
        out = np.empty(len(seg), np.int64)
        out[fit] = self.fit.sample(rng, seg[fit])
        out[~fit] = self.nofit.sample(rng, np.zeros(int((~fit).sum()), np.int64))
        return out

    def view(self, rng: np.random.Generator, seg: np.ndarray) -> np.ndarray:
        """Item viewed while browsing: mostly what the segment buys, partly anything popular."""
        out = self.purchase(rng, seg)
        other = rng.random(len(seg)) < 0.4
        out[other] = self.browse.sample(rng, np.zeros(int(other.sum()), np.int64))
        return out


def _propensity(spec: WorldSpec, cat: _Catalogue, veh: _Vehicles, seg_veh: np.ndarray,
                seg_users: np.ndarray, rng: np.random.Generator):
    """Ground-truth purchase propensities of every segment (index k: users without vehicle).

    A segment's fitting purchases mix its own favourites (Zipf over a ranking keyed by
    make+model, so neighbouring years agree, that puts vehicle-specific parts first) with
    global popularity restricted to parts that fit (broad parts like the generic headlight
    win there). The mixing weight is solved so that owners' median lift (own top 4 versus
    the global top 4 fitting parts) equals `spec.segment_lift` at every scale. Products
    without fitment rows follow one global distribution, a share `no_fitment_share`."""
    k = len(seg_veh)
    n_items = len(cat.price)
    seg_of_veh = np.full(len(veh.veh_make), -1)
    seg_of_veh[seg_veh] = np.arange(k)
    held = seg_of_veh[cat.fit_veh] >= 0
    order = np.argsort(seg_of_veh[cat.fit_veh[held]], kind="stable")
    seg = seg_of_veh[cat.fit_veh[held]][order]
    item = cat.fit_item[held][order]

    n_fit = cat.n_fit_veh.astype(float)
    g = rng.lognormal(0.0, 1.0, n_items) * np.maximum(n_fit, 1) ** 0.6
    model = veh.veh_model[seg_veh[seg]]
    _, pair = np.unique(model * n_items + item, return_inverse=True)
    gumbel = -np.log(-np.log(rng.uniform(1e-12, 1, int(pair.max(initial=-1)) + 1)))
    key = (gumbel[pair] - 0.8 * np.log(np.maximum(n_fit[item], 1))
           + 0.35 * -np.log(-np.log(rng.uniform(1e-12, 1, len(seg)))))
    own = (_group_rank(seg, key) + 1.0) ** -spec.segment_rank_exponent
    own /= _group_sum(seg, own, k)[seg]
    glob = g[item] / _group_sum(seg, g[item], k)[seg]

    p = spec.no_fitment_share
    fitting = np.flatnonzero(n_fit > 0)
    pseudo_prob = g[fitting] / g[fitting].sum()
    n_entries = np.bincount(seg, minlength=k)
    user_share = seg_users / seg_users.sum()
    fit_mass = np.where(np.r_[n_entries, len(fitting)] > 0, 1 - p, 0.0)
    pseudo_mean = np.bincount(fitting, weights=user_share[k] * fit_mass[k] * pseudo_prob,
                              minlength=n_items)
    entry_weight = user_share[seg] * fit_mass[seg]

    def evaluate(w: float):
        """Fitting-purchase probabilities for weight w and the owners' lift they give."""
        prob = w * own + (1 - w) * glob
        mean_fit = pseudo_mean + np.bincount(item, weights=entry_weight * prob,
                                             minlength=n_items)
        top = np.argsort(-np.where(n_fit > 0, mean_fit, -1.0), kind="stable")[:20]
        rank = _group_rank(seg, prob)
        is_top4 = np.zeros(n_items, bool)
        is_top4[top[:4]] = True
        fav4 = _group_sum(seg, prob * (rank < 4), k)
        glob4 = _group_sum(seg, prob * is_top4[item], k)
        ok = (seg_users[:k] > 0) & (n_entries >= 4) & (glob4 > 0)
        lift = pd.Series(fav4[ok] / glob4[ok], index=np.flatnonzero(ok), name="segment_lift")
        return prob, mean_fit, top, rank, lift

    # Secant search on logit(w): log-lift is close to linear in it.
    target = math.log(spec.segment_lift)
    xs = [math.log(0.6 / 0.4), math.log(0.8 / 0.2)]
    fs = [math.log(evaluate(1 / (1 + math.exp(-x)))[4].median()) - target for x in xs]
    for _ in range(8):
        if abs(fs[-1]) < 0.01 or fs[-1] == fs[-2]:
            break
        x = xs[-1] - fs[-1] * (xs[-1] - xs[-2]) / (fs[-1] - fs[-2])
        xs.append(min(max(x, -4.0), 4.0))
        fs.append(math.log(evaluate(1 / (1 + math.exp(-xs[-1])))[4].median()) - target)
    weight = 1 / (1 + math.exp(-xs[int(np.argmin(np.abs(fs)))]))
    prob, mean_fit, top, rank, lift = evaluate(weight)
    fit = _Categorical.build(np.r_[seg, np.full(len(fitting), k)], np.r_[item, fitting],
                             np.r_[prob, pseudo_prob], k + 1)

    nofit_items = np.flatnonzero(n_fit == 0)
    factor = np.select([cat.cls[nofit_items] == FIT_MISSING, cat.cls[nofit_items] == SERVICE],
                       [0.35, 0.25], 1.0)
    w_nofit = rng.lognormal(0.0, 1.1, len(nofit_items)) * factor
    nofit_prob = np.zeros(n_items)
    nofit_prob[nofit_items] = w_nofit / w_nofit.sum()
    nofit = _Categorical.build(np.zeros(len(nofit_items), np.int64), nofit_items, w_nofit, 1)
    mean_prob = nofit_prob * float((user_share * (1 - fit_mass)).sum()) + mean_fit
    browse = _Categorical.build(np.zeros(n_items, np.int64), np.arange(n_items),
                                mean_prob ** 0.6 + 1e-6, 1)
    prop = _Propensity(fit=fit, nofit=nofit, browse=browse, p_nofit=p)
    return prop, dict(seg=seg, item=item, prob=prob, rank=rank, fit_mass=fit_mass, top=top,
                      lift=lift, mean_prob=mean_prob, weight=weight)


def _truth_tables(cat: _Catalogue, veh: _Vehicles, seg_veh: np.ndarray, seg_users: np.ndarray,
                  detail: dict):
    """Segment table (thin = fewer than 4 fitting parts), each segment's favourite fitting
    parts and the global top fitting parts."""
    k = len(seg_veh)
    sku = np.array(cat.sku.to_pylist(), dtype=object)
    seg, rank = detail["seg"], detail["rank"]
    owner_prob = detail["fit_mass"][seg] * detail["prob"]
    top = rank < 10
    segment_top = pd.DataFrame({"segment_id": seg[top], "rank": rank[top] + 1,
                                "sku": sku[detail["item"][top]], "prob": owner_prob[top]}
                               ).sort_values(["segment_id", "rank"], ignore_index=True)
    g = detail["top"]
    global_top = pd.DataFrame({"rank": np.arange(1, len(g) + 1), "sku": sku[g],
                               "prob": detail["mean_prob"][g]})
    n_fitting = np.bincount(seg, minlength=k)
    segments = pd.DataFrame({
        "segment_id": np.arange(k),
        "make": pd.Series(veh.make_names.take(pa.array(veh.veh_make[seg_veh])), dtype="str"),
        "model": pd.Series(veh.model_names.take(pa.array(veh.veh_model[seg_veh])), dtype="str"),
        "year": veh.veh_year[seg_veh], "n_users": seg_users, "n_fitting": n_fitting,
        "is_thin": n_fitting < 4})
    return segments, segment_top, global_top, sku
