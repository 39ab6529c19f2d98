"""Behaviour: the e-mail campaign funnel, orders (gamma-Poisson, tuned to the repeat rate),
the views and carts around them, and the events table with redelivered duplicates."""
from __future__ import annotations

from typing import Tuple

import numpy as np
import pandas as pd
import pyarrow as pa

from models.world.arrays import _arrow, _ids, _rfc3339, _take
from models.world.catalogue import _Catalogue
from models.world.contract import DAY, EVENT_NAMES, FAILURE_REASON_P, FAILURE_REASONS
from models.world.propensity import _Propensity
from models.world.spec import WorldSpec
from models.world.users import _solve_gamma_shape
from models.world.vocabulary import PART_TYPES


def _campaign(spec: WorldSpec, user_ok: np.ndarray, t_send0: int, rng: np.random.Generator):
    """Email campaign: who got which treatment and what happened (times in epoch seconds)."""
    cand = np.flatnonzero(user_ok)
    n_sent = int(round(spec.campaign_share * len(cand)))
    user = np.sort(rng.choice(cand, n_sent, replace=False))
    weights = rng.dirichlet(np.full(spec.n_treatments, 4.0))
    treatment = rng.choice(spec.n_treatments, n_sent, p=weights)
    z = rng.standard_normal(spec.n_treatments)
    z_mean = float(weights @ z)
    ctr = np.clip(spec.ctr_mean + (spec.ctr_best - spec.ctr_mean) * (z - z_mean) /
                  (z.max() - z_mean), 0.01, None)
    sent_t = t_send0 + rng.integers(0, 2 * DAY, n_sent)
    delivered = rng.random(n_sent) < spec.delivered_rate
    deliver_t = sent_t + rng.integers(5, 600, n_sent)
    reason = rng.choice(len(FAILURE_REASONS), n_sent, p=FAILURE_REASON_P)
    viewed = delivered & (rng.random(n_sent) < spec.open_rate / spec.delivered_rate)
    view_t = deliver_t + 60 + rng.exponential(8 * 3600, n_sent).astype(np.int64)
    clicked_view = viewed & (rng.random(n_sent) < ctr[treatment])
    expected_view_clicks = spec.open_rate * float(weights @ ctr)
    unopened_rate = max(0.0, (spec.click_rate - expected_view_clicks)
                        / (spec.delivered_rate - spec.open_rate))
    clicked_blind = delivered & ~viewed & (rng.random(n_sent) < unopened_rate)
    clicked = clicked_view | clicked_blind
    click_t = np.where(viewed, view_t, deliver_t + rng.exponential(8 * 3600, n_sent)
                       .astype(np.int64)) + 10 + rng.exponential(1200, n_sent).astype(np.int64)
    ordered = clicked & (rng.random(n_sent) < spec.order_after_click)
    order_t = click_t + rng.integers(600, 7 * DAY, n_sent)

    parts = [(np.ones(n_sent, bool), sent_t, 0), (delivered, deliver_t, 1),
             (~delivered, deliver_t, 2), (viewed, view_t, 3), (clicked, click_t, 4)]
    ev_user = np.concatenate([user[m] for m, _, _ in parts])
    ev_treat = np.concatenate([treatment[m] for m, _, _ in parts])
    ev_t = np.concatenate([t[m] for m, t, _ in parts])
    ev_kind = np.concatenate([np.full(int(m.sum()), kind) for m, _, kind in parts])
    ev_reason = np.concatenate([np.where(kind == 2, reason[m], -1) for m, _, kind in parts])
    order = np.lexsort((ev_kind, ev_t))
    # The sender's logging policy is the fixed allocation `weights`: each SENT records the
    # probability its treatment had (for off-policy evaluation, models/ope.py).
    ev_prop = np.where(ev_kind == 0, weights[ev_treat], np.nan)
    events = dict(user=ev_user[order], treatment=ev_treat[order], t=ev_t[order],
                  kind=ev_kind[order], reason=ev_reason[order], propensity=ev_prop[order])
    names = [f"T{i + 1:02d}" for i in range(spec.n_treatments)]
    truth = dict(ctr=dict(zip(names, ctr.round(6).tolist())),
                 weights=dict(zip(names, weights.round(6).tolist())),
                 unopened_rate=unopened_rate)
    stats = dict(sent=n_sent, delivered=int(delivered.sum()), viewed=int(viewed.sum()),
                 clicked=int(clicked.sum()), delivery_failed=int((~delivered).sum()))
    return events, user[ordered], order_t[ordered], truth, stats


def _orders(spec: WorldSpec, seg_of_user: np.ndarray, prop: _Propensity, t0: int, t2: int,
            extra_user: np.ndarray, extra_t: np.ndarray, rng: np.random.Generator):
    """Order lines: gamma-Poisson order counts per user (tuned to the repeat rate), 1-3
    distinct SKUs per order from the user's segment propensities, plus campaign orders."""
    n_users = len(seg_of_user)
    days = (t2 - t0) / DAY
    mean = spec.orders_per_user
    shape = _solve_gamma_shape(mean, spec.repeat_rate)
    rate = rng.gamma(shape, mean / shape / spec.history_days, n_users)  # orders per day
    n_orders = rng.poisson(rate * days)
    o_user = np.r_[np.repeat(np.arange(n_users), n_orders), extra_user]
    o_t = np.r_[rng.integers(t0, t2, int(n_orders.sum())), extra_t]
    keep = o_t < t2
    o_user, o_t = o_user[keep], o_t[keep]
    n_lines = 1 + (rng.random(len(o_user)) < 0.35) + (rng.random(len(o_user)) < 0.10)
    order_no = np.repeat(np.arange(len(o_user)), n_lines)
    l_user = o_user[order_no]
    l_item = prop.purchase(rng, seg_of_user[l_user])
    _, first = np.unique(order_no * (len(prop.browse.value) + 1) + l_item, return_index=True)
    first = np.sort(first)
    return order_no[first], l_user[first], o_t[order_no[first]], l_item[first], rate


def _events(spec: WorldSpec, seg_of_user: np.ndarray, prop: _Propensity, cat: _Catalogue,
            t0: int, t2: int, campaign_orders, rng: np.random.Generator):
    """All behavioural events of history and holdout, sorted by time, as index arrays.

    Intent precedes purchases: 60% of order lines follow 1+ views of the same SKU in the
    previous weeks and 35% follow a cart update; browsing adds views (and a few abandoned
    carts) drawn from the same propensities."""
    order_no, l_user, l_t, l_item, rate = _orders(spec, seg_of_user, prop, t0, t2,
                                                  *campaign_orders, rng)
    n_lines = len(l_item)
    price = cat.price[l_item]
    wheel = cat.ptype[l_item] == [t[0] for t in PART_TYPES].index("Wheel")
    qty = np.where(price < 30, 1 + np.minimum(rng.poisson(1.0, n_lines), 5),
                   np.where(rng.random(n_lines) < 0.04, 2, 1))
    qty = np.where(wheel & (rng.random(n_lines) < 0.5), 4, qty)

    n_views = np.where(rng.random(n_lines) < 0.6, 1 + rng.poisson(0.7, n_lines), 0)
    v_line = np.repeat(np.arange(n_lines), n_views)
    v_t = l_t[v_line] - 60 - rng.exponential(3 * DAY, len(v_line)).astype(np.int64)
    c_line = np.flatnonzero(rng.random(n_lines) < 0.35)
    c_t = l_t[c_line] - 30 - rng.exponential(3 * 3600, len(c_line)).astype(np.int64)

    mean_rate = max(float(rate.mean()), 1e-12)
    browse_rate = (spec.views_per_user / spec.history_days
                   * (0.5 * rate / mean_rate + 0.5 * rng.gamma(0.6, 1 / 0.6, len(rate))))
    n_browse = rng.poisson(browse_rate * (t2 - t0) / DAY)
    b_user = np.repeat(np.arange(len(rate)), n_browse)
    b_t = rng.integers(t0, t2, len(b_user))
    b_item = prop.view(rng, seg_of_user[b_user])
    a_idx = np.flatnonzero(rng.random(len(b_user)) < 0.04)
    a_t = b_t[a_idx] + rng.integers(30, 1800, len(a_idx))

    user = np.concatenate([np.repeat(l_user, 3), l_user[v_line], l_user[c_line], b_user,
                           b_user[a_idx]])
    item = np.concatenate([np.repeat(l_item, 3), l_item[v_line], l_item[c_line], b_item,
                           b_item[a_idx]])
    t = np.concatenate([np.repeat(l_t, 3), v_t, c_t, b_t, a_t])
    name = np.concatenate([np.tile([2, 3, 4], n_lines), np.zeros(len(v_line), np.int64),
                           np.ones(len(c_line), np.int64), np.zeros(len(b_user), np.int64),
                           np.ones(len(a_idx), np.int64)])
    quantity = np.concatenate([np.repeat(qty, 3), np.ones(len(v_line), np.int64), qty[c_line],
                               np.ones(len(b_user) + len(a_idx), np.int64)])
    order = np.concatenate([np.repeat(order_no, 3),
                            np.full(len(v_line) + len(c_line) + len(b_user) + len(a_idx), -1)])
    keep = (t >= t0) & (t < t2)
    sort = np.flatnonzero(keep)[np.lexsort((name[keep], t[keep]))]
    # Order numbers follow time, as a shop's would.
    order_sorted = order[sort]
    placed, first_pos = np.unique(order_sorted[name[sort] == 2], return_index=True)
    o_rank = np.full(int(order_no.max(initial=-1)) + 1, -1)
    o_rank[placed[np.argsort(first_pos)]] = np.arange(len(placed))
    return dict(user=user[sort], item=item[sort], t=t[sort], name=name[sort],
                quantity=quantity[sort],
                order=np.where(order_sorted >= 0, o_rank[np.maximum(order_sorted, 0)], -1))


def _event_frame(ev: dict, idx: np.ndarray, event_no: np.ndarray, user_ids: pa.Array,
                 cat: _Catalogue) -> pd.DataFrame:
    """Events table for the given rows of the sorted event arrays."""
    order = ev["order"][idx]
    return pd.DataFrame({
        "event_id": _ids("E", event_no[idx], 10),
        "event_time": _rfc3339(ev["t"][idx]),
        "user_id": _take(user_ids, ev["user"][idx]),
        "event_name": _take(_arrow(EVENT_NAMES), ev["name"][idx]),
        "sku": _take(cat.sku, ev["item"][idx]),
        "quantity": ev["quantity"][idx].astype(np.int64),
        "price": cat.price[ev["item"][idx]],
        "order_id": _ids("O", np.maximum(order, 0) + 1, 9, null=order < 0),
    })


def _with_duplicates(n: int, share: float, rng: np.random.Generator) -> Tuple[np.ndarray, int]:
    """Row order with ~share of rows redelivered right after themselves."""
    n_dup = int(round(share * n))
    rows = np.sort(np.r_[np.arange(n), rng.choice(n, n_dup, replace=False)], kind="stable")
    return rows, n_dup
