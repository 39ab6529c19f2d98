"""A seeded repeat-buyer world: a weekly B2B gift wholesaler (SPEC §8's origin).

The origin served 429 active clients 25 recommendations a week: 20 repurchase
and 5 discovery. This world gives that job something to find, with a known
answer (`WholesaleTruth`):

* every client orders on its own weekday from a **recurring basket**; each
  basket item comes back after the client's own interval, drawn around that
  SKU's typical repurchase interval (what buy-again's due-ness estimates);
* clients' tastes are a few **collections** (themes cutting across product
  groups); **discovery** draws new items from those collections, so clients
  sharing a collection co-buy its items and also-bought has signal; some
  discoveries are adopted into the basket, some basket items are dropped;
* a few new products are launched in the last weeks and picked up fast:
  **trending** (growth against the previous period);
* product groups are the catalogue's `part_type` (the origin's cap of 3 per
  group); there is no fitment, no vehicle and no e-mail campaign.

Tables follow the same contract as the automotive world (order lines are
"Ordered Product" events, one per line, like an imported grocer), with a
history year, a 28-day holdout after it and redelivered duplicate events.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np
import pandas as pd
import pyarrow as pa

from models.world.arrays import _arrow, _epoch, _ids, _iso, _rfc3339, _take
from models.world.behaviour import _with_duplicates
from models.world.contract import _STRING, ARROW_SCHEMAS, DAY, EVENT_NAMES
from models.world.spec import World

WEEK = 7 * DAY
BUSINESS_TYPES = ("gift shop", "garden centre", "museum shop", "department store", "cafe",
                  "pharmacy")
BUSINESS_TYPE_P = (0.38, 0.18, 0.12, 0.12, 0.12, 0.08)
REGIONS = ("north", "south", "east", "west", "central")
GROUPS = ("Candles", "Mugs", "Greeting Cards", "Tea Towels", "Notebooks", "Keyrings",
          "Tote Bags", "Coasters", "Photo Frames", "Diffusers", "Soaps", "Jigsaws",
          "Magnets", "Wrapping Paper", "Gift Bags", "Socks", "Umbrellas", "Calendars",
          "Pens", "Bookmarks", "Trinket Boxes", "Ornaments", "Cushions", "Aprons",
          "Lunch Boxes", "Water Bottles", "Plant Pots", "Bath Salts", "Lip Balms",
          "Fridge Lists", "Tins", "Doorstops", "Glassware", "Placemats", "Plush Toys",
          "Puzzles", "Mirrors", "Clocks", "Wind Chimes", "Stationery Sets")
THEMES = ("Lavender", "Botanical", "Seaside", "Vintage Rose", "Woodland", "Christmas",
          "Easter", "Retro Kitchen", "Cat Lovers", "Dog Lovers", "Bees", "Citrus",
          "Nautical", "Meadow", "Art Deco", "Scandi", "Pastel", "Alpine", "Tropical",
          "Moonlight", "Garden Birds", "Vegetable Patch", "Tartan", "Polka Dot", "Safari",
          "Cherry Blossom", "Coffee House", "Tea Time", "Cottage", "Wildflower", "Monochrome",
          "Fiesta", "Harvest", "Nordic Star", "Ocean Blue", "Terracotta", "Hedgerow",
          "Little Explorer", "Heritage", "Winter Berry")
BRANDS = ("Hartwell & Co", "Pip Studio", "Maple Lane", "Thistle Works", "Bramble House",
          "Copper Kettle", "Juniper Gifts", "Wren & Willow")
USERS_SCHEMA = pa.schema([("user_id", _STRING), ("email", _STRING), ("business_type", _STRING),
                          ("region", _STRING), ("updated_at", _STRING)])


@dataclass(frozen=True)
class WholesaleSpec:
    """Size and shape of a repeat-buyer world; defaults are the `wholesale` preset."""

    name: str = "wholesale"
    n_users: int = 429                 # active clients (the origin's 429)
    n_skus: int = 3_000
    n_collections: int = len(THEMES)
    history_days: int = 364
    holdout_days: int = 28
    history_end: str = "2026-03-01T00:00:00Z"
    basket_base: int = 6               # recurring items per client: base + Poisson(mean)
    basket_mean: float = 12.0
    interval_median_weeks: float = 4.0  # typical repurchase interval of a SKU (lognormal)
    interval_sigma: float = 0.5
    client_interval_sigma: float = 0.25  # a client's interval around the SKU's typical one
    gap_shape: float = 6.0             # gamma shape of successive gaps (higher: more regular)
    basket_drop_share: float = 0.3     # basket items dropped at some time in the period
    discoveries_per_week: float = 0.45  # new items a client tries per week
    discovery_in_taste: float = 0.8    # ... drawn from the client's collections
    adopt_share: float = 0.4           # tried items that join the recurring basket
    collections_per_client: Tuple[int, int] = (2, 4)
    n_trending: int = 25               # products launched in the last weeks of history
    trending_weight: float = 12.0      # their discovery weight against an average product
    order_week_share: Tuple[float, float] = (4.0, 2.0)  # Beta of a client's share of weeks
    #                                    with an order; lines due in a skipped week wait
    views_per_week: float = 1.0        # browsing views per client per week
    duplicate_event_share: float = 0.005

    @classmethod
    def preset(cls, name: str) -> "WholesaleSpec":
        """`wholesale`: the origin's 429 clients; `wholesale_tiny`: a fast one for tests."""
        presets = {"wholesale": {},
                   "wholesale_tiny": dict(n_users=80, n_skus=600, history_days=168)}
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(presets)}")
        return cls(name=name, **presets[name])


@dataclass
class WholesaleTruth:
    """The process behind a wholesale world, for tests and backtests (never written out)."""

    basket: pd.DataFrame          # user_id, sku, interval_days, start, end (epoch s): recurring
    sku_interval_days: pd.Series  # by SKU: its typical repurchase interval
    collection: pd.Series         # by SKU: its collection (theme)
    client_collections: Dict[str, List[str]]
    trending: pd.DataFrame        # sku, launch (RFC 3339)
    discoveries: int              # lines of items tried outside the basket
    adopted: int                  # of those, items that joined a basket


def _catalogue(spec: WholesaleSpec, rng: np.random.Generator):
    """SKUs with a product group, a collection, a popularity and a typical interval."""
    n = spec.n_skus
    n_col = min(spec.n_collections, len(THEMES))
    col_p = (np.arange(n_col) + 1.0) ** -0.6
    collection = rng.choice(n_col, n, p=col_p / col_p.sum())
    group = rng.integers(0, len(GROUPS), n)
    popularity = rng.lognormal(0.0, 1.0, n)
    interval = np.clip(rng.lognormal(np.log(spec.interval_median_weeks), spec.interval_sigma,
                                     n), 1.0, 13.0) * 7.0
    price = np.round(np.clip(rng.lognormal(np.log(4.5), 0.6, n), 0.6, 60.0), 2)
    pack = rng.choice([6, 12, 24, 36, 48], n, p=[0.35, 0.3, 0.2, 0.1, 0.05])
    sku = _ids("WG-", np.arange(1, n + 1), 5)
    title = [f"{THEMES[c]} {GROUPS[g]} No. {i % 97 + 1}"
             for i, (c, g) in enumerate(zip(collection, group))]
    brand = rng.integers(0, len(BRANDS), n)
    catalog = pd.DataFrame({
        "sku": sku,
        "title": pd.Series(title, dtype="str"),
        "part_type": _take(_arrow(GROUPS), group),
        "brand": _take(_arrow(BRANDS), brand),
        "price": price,
        "image_url": pd.Series([f"https://img.giftwholesale.example/p/{s}.jpg" for s in sku],
                               dtype="str"),
        "tags": pd.Series([[] for _ in range(n)], dtype=object),
        "is_universal": np.ones(n, bool),
        "variant_group": pd.Series([None] * n, dtype="str"),
    })
    return catalog, collection, popularity, interval, pack


def _renewals(start: float, end: float, interval: float, shape: float,
              rng: np.random.Generator) -> List[float]:
    """Purchase times of one recurring item: start, then gamma gaps around its interval."""
    out, t = [], start
    while t < end:
        out.append(t)
        t += interval * DAY * rng.gamma(shape, 1.0 / shape)
    return out


def generate_wholesale(spec: WholesaleSpec, seed: int) -> World:
    """Build a repeat-buyer world deterministically from (spec, seed)."""
    r_cat, r_users, r_basket, r_disc, r_events, r_frames = np.random.default_rng(seed).spawn(6)
    t1 = _epoch(spec.history_end)
    t0 = t1 - spec.history_days * DAY
    t2 = t1 + spec.holdout_days * DAY
    catalog, collection, popularity, interval, pack = _catalogue(spec, r_cat)
    n_sku, n = spec.n_skus, spec.n_users
    skus = catalog["sku"].to_numpy(object)

    # Trending: products launched in the last 10 to 3 weeks of history, before that unsold.
    trending = np.sort(r_cat.choice(n_sku, spec.n_trending, replace=False))
    launch = np.full(n_sku, float(t0 - DAY))
    launch[trending] = t1 - r_cat.integers(21, 71, spec.n_trending) * DAY

    # Clients: a business type, a region, an order weekday and hour, 2-4 favourite collections.
    n_col = int(collection.max()) + 1
    col_share = np.bincount(collection, minlength=n_col) / n_sku
    tastes, basket_rows = [], []
    order_offset = r_users.integers(0, 5, n) * DAY + r_users.integers(7, 17, n) * 3600
    for c in range(n):
        lo, hi = spec.collections_per_client
        cols = r_basket.choice(n_col, int(r_basket.integers(lo, hi + 1)), replace=False,
                               p=col_share / col_share.sum())
        tastes.append(cols)
        size = spec.basket_base + int(r_basket.poisson(spec.basket_mean))
        in_taste = np.isin(collection, cols)
        weight = popularity * np.where(in_taste, 1.0, 0.04) * (launch < t0)
        items = r_basket.choice(n_sku, min(size, int((weight > 0).sum())), replace=False,
                                p=weight / weight.sum())
        for item in items:
            own = interval[item] * r_basket.lognormal(0.0, spec.client_interval_sigma)
            start = t0 + r_basket.uniform(0.0, own * DAY)
            end = (t0 + r_basket.uniform(0.0, t2 - t0) if r_basket.random() <
                   spec.basket_drop_share else float(t2))
            basket_rows.append((c, item, own, start, end, 0))

    # Discovery week by week: items from the client's collections (or anywhere), weighted by
    # popularity and, once launched, the trending boost; some join the basket.
    tried = []
    boost = np.where(np.isin(np.arange(n_sku), trending), spec.trending_weight, 1.0)
    for week in range(int(np.ceil((t2 - t0) / WEEK))):
        now = t0 + week * WEEK
        available = (launch <= now + WEEK) * popularity * boost
        n_try = r_disc.poisson(spec.discoveries_per_week, n)
        for c in np.flatnonzero(n_try):
            taste = np.isin(collection, tastes[c]) if r_disc.random() < \
                spec.discovery_in_taste else np.ones(n_sku, bool)
            weight = available * taste
            if weight.sum() <= 0:
                continue
            for item in r_disc.choice(n_sku, int(n_try[c]), p=weight / weight.sum()):
                t = max(now + r_disc.uniform(0, WEEK), launch[item])
                tried.append((c, item, t))
                if r_disc.random() < spec.adopt_share:
                    own = interval[item] * r_disc.lognormal(0.0, spec.client_interval_sigma)
                    basket_rows.append((c, item, own, t + own * DAY * r_disc.gamma(
                        spec.gap_shape, 1.0 / spec.gap_shape), float(t2), 1))

    # Purchase times, snapped to the client's weekly order slot: one order per client-week.
    l_user, l_item, l_t, l_disc = [], [], [], []
    for c, item, own, start, end, _ in basket_rows:
        times = _renewals(start, min(end, t2), own, spec.gap_shape, r_events)
        l_user += [c] * len(times)
        l_item += [item] * len(times)
        l_t += times
        l_disc += [False] * len(times)
    for c, item, t in tried:
        l_user.append(c)
        l_item.append(item)
        l_t.append(t)
        l_disc.append(True)
    l_user, l_item = np.array(l_user, np.int64), np.array(l_item, np.int64)
    l_disc = np.array(l_disc, bool)
    week = np.ceil((np.array(l_t) - t0 - order_offset[l_user]) / WEEK).astype(np.int64)
    # Weeks without an order: what fell due waits for the client's next order week.
    n_weeks = int(np.ceil((t2 - t0) / WEEK)) + 2
    active = r_users.random((n, n_weeks)) < r_users.beta(*spec.order_week_share, n)[:, None]
    active[:, -1] = True
    idx = np.where(active, np.arange(n_weeks), n_weeks - 1)
    next_active = np.minimum.accumulate(idx[:, ::-1], axis=1)[:, ::-1]
    week = next_active[l_user, np.clip(week, 0, n_weeks - 1)]
    l_t = t0 + order_offset[l_user] + week * WEEK + r_events.integers(0, 1800, len(week))
    keep = (l_t >= t0) & (l_t < t2)
    key = (l_user * 1000 + week) * n_sku + l_item
    _, first = np.unique(np.where(keep, key, -1), return_index=True)
    first = np.sort(first[keep[first]])
    l_user, l_item, l_t, l_disc = l_user[first], l_item[first], l_t[first], l_disc[first]
    order_key = l_user * 1000 + week[first]
    # A client's order time is one time for all its lines.
    o_keys, o_inv = np.unique(order_key, return_inverse=True)
    o_time = np.full(len(o_keys), np.iinfo(np.int64).max)
    np.minimum.at(o_time, o_inv, l_t)
    l_t = o_time[o_inv]
    qty = pack[l_item] * np.where(r_events.random(len(l_item)) < 0.2, 2, 1)

    # Intent: views (and a cart update) before discovered lines; browsing in one's collections.
    d = np.flatnonzero(l_disc)
    n_views = np.where(r_events.random(len(d)) < 0.6, 1 + r_events.poisson(0.5, len(d)), 0)
    v_line = np.repeat(d, n_views)
    v_t = l_t[v_line] - 60 - r_events.exponential(3 * DAY, len(v_line)).astype(np.int64)
    c_line = d[r_events.random(len(d)) < 0.3]
    c_t = l_t[c_line] - 30 - r_events.exponential(3600, len(c_line)).astype(np.int64)
    n_browse = r_events.poisson(spec.views_per_week * (t2 - t0) / WEEK, n)
    b_user = np.repeat(np.arange(n), n_browse)
    b_t = r_events.integers(t0, t2, len(b_user))
    b_item = np.empty(len(b_user), np.int64)
    for c in range(n):
        rows = np.flatnonzero(b_user == c)
        weight = popularity * np.isin(collection, tastes[c]) * (launch[None, :] <= b_t[rows, None])
        cum = np.cumsum(weight, axis=1)
        pick = (r_events.random(len(rows)) * cum[:, -1])[:, None]
        b_item[rows] = np.minimum((cum <= pick).sum(axis=1), n_sku - 1)

    user = np.concatenate([l_user, l_user[v_line], l_user[c_line], b_user])
    item = np.concatenate([l_item, l_item[v_line], l_item[c_line], b_item])
    t = np.concatenate([l_t, v_t, c_t, b_t])
    name = np.concatenate([np.full(len(l_t), EVENT_NAMES.index("Ordered Product")),
                           np.zeros(len(v_line), np.int64), np.ones(len(c_line), np.int64),
                           np.zeros(len(b_user), np.int64)])
    quantity = np.concatenate([qty, np.ones(len(v_line), np.int64), qty[c_line],
                               np.ones(len(b_user), np.int64)])
    order = np.concatenate([o_inv, np.full(len(v_line) + len(c_line) + len(b_user), -1)])
    ok = (t >= t0) & (t < t2)
    sort = np.flatnonzero(ok)[np.lexsort((item[ok], name[ok], t[ok]))]
    user, item, t, name, quantity, order = (a[sort] for a in (user, item, t, name, quantity,
                                                               order))
    # Order numbers follow time, as a shop's would.
    placed, first_pos = np.unique(order[order >= 0], return_index=True)
    o_rank = np.full(len(o_keys), -1)
    o_rank[placed[np.argsort(first_pos)]] = np.arange(len(placed))
    order = np.where(order >= 0, o_rank[np.maximum(order, 0)], -1)

    user_ids = pa.array(_ids("U", np.arange(1, n + 1), 7))
    event_no = np.arange(1, len(t) + 1)

    def event_frame(rows: np.ndarray) -> pd.DataFrame:
        return pd.DataFrame({
            "event_id": _ids("E", event_no[rows], 10),
            "event_time": _rfc3339(t[rows]),
            "user_id": _take(user_ids, user[rows]),
            "event_name": _take(_arrow(EVENT_NAMES), name[rows]),
            "sku": _take(_arrow(skus), item[rows]),
            "quantity": quantity[rows].astype(np.int64),
            "price": catalog["price"].to_numpy()[item[rows]],
            "order_id": _ids("O", np.maximum(order[rows], 0) + 1, 9, null=order[rows] < 0),
        })

    in_history = t < t1
    hist_rows, hist_dup = _with_duplicates(int(in_history.sum()), spec.duplicate_event_share,
                                           r_frames)
    hold_rows, hold_dup = _with_duplicates(int((~in_history).sum()),
                                           spec.duplicate_event_share, r_frames)
    events = event_frame(np.flatnonzero(in_history)[hist_rows])
    holdout = event_frame(np.flatnonzero(~in_history)[hold_rows])

    business = r_users.choice(len(BUSINESS_TYPES), n, p=BUSINESS_TYPE_P)
    users = pd.DataFrame({
        "user_id": pd.Series(user_ids, dtype="str"),
        "email": pd.Series([f"orders{i + 1}@client{i + 1:04d}.example" for i in range(n)],
                           dtype="str"),
        "business_type": _take(_arrow(BUSINESS_TYPES), business),
        "region": _take(_arrow(REGIONS), r_users.integers(0, len(REGIONS), n)),
        "updated_at": _rfc3339(t1 - r_users.integers(DAY, 2 * 365 * DAY, n)),
    })
    fitment = pd.DataFrame({"sku": pd.Series([], dtype="str"), "make": pd.Series([], dtype="str"),
                            "model": pd.Series([], dtype="str"),
                            "year": np.array([], np.int64)})
    treatment = pd.DataFrame({c: pd.Series([], dtype="float64" if c == "propensity" else "str")
                              for c in ARROW_SCHEMAS["treatment_events"].names})

    basket = pd.DataFrame(basket_rows, columns=["user", "item", "interval_days", "start", "end",
                                                "adopted"])
    lines_hist = in_history & (name == EVENT_NAMES.index("Ordered Product"))
    per_client = np.bincount(user[lines_hist], minlength=n)
    orders_hist = np.unique(order[lines_hist])
    order_user = np.zeros(len(o_keys), np.int64)
    order_user[o_rank[o_rank >= 0]] = (o_keys // 1000)[o_rank >= 0]
    orders_per_client = np.bincount(order_user[orders_hist], minlength=n)
    truth = WholesaleTruth(
        basket=pd.DataFrame({"user_id": np.asarray(user_ids.to_pylist(), object)[basket["user"]],
                             "sku": skus[basket["item"]],
                             "interval_days": basket["interval_days"].round(2),
                             "start": basket["start"].astype(np.int64),
                             "end": basket["end"].astype(np.int64),
                             "adopted": basket["adopted"].astype(bool)}),
        sku_interval_days=pd.Series(interval.round(2), index=skus, name="interval_days"),
        collection=pd.Series(np.asarray(THEMES, object)[collection], index=skus),
        client_collections={u: [THEMES[c] for c in cols]
                            for u, cols in zip(user_ids.to_pylist(), tastes)},
        trending=pd.DataFrame({"sku": skus[trending], "launch": _rfc3339(launch[trending])}),
        discoveries=int(l_disc.sum()), adopted=int(basket["adopted"].sum()))
    manifest = {
        "preset": spec.name, "seed": seed, "format": None, "kind": "wholesale",
        "as_of": events["event_time"].max() if len(events) else _iso(t1 - 1),
        "history_start": _iso(t0), "holdout_start": _iso(t1), "holdout_end": _iso(t2),
        "history_days": spec.history_days, "holdout_days": spec.holdout_days,
        "row_counts": {"catalog": len(catalog), "fitment": 0, "users": len(users),
                       "events": len(events), "holdout_events": len(holdout),
                       "treatment_events": 0},
        "duplicate_event_ids": hist_dup, "holdout_duplicate_event_ids": hold_dup,
        "bad_rows_by_kind": {},
        "stats": {
            "clients": n, "product_groups": int(catalog["part_type"].nunique()),
            "orders": int(len(orders_hist)),
            "order_lines": int(lines_hist.sum()),
            "mean_lines_per_order": round(float(lines_hist.sum() / max(len(orders_hist), 1)), 2),
            "mean_orders_per_client": round(float(orders_per_client.mean()), 2),
            "repeat_purchase_rate": round(float((orders_per_client[per_client > 0] >= 2).mean()),
                                          4) if (per_client > 0).any() else 0.0,
            "recurring_basket_items": int(len(basket)),
            "discovery_lines": int(l_disc.sum()),
            "trending_skus": int(spec.n_trending),
        },
    }
    return World(spec=spec, seed=seed, catalog=catalog, fitment=fitment, users=users,
                 events=events, holdout_events=holdout, treatment_events=treatment,
                 manifest=manifest, truth=truth,
                 arrow_schemas={**ARROW_SCHEMAS, "users": USERS_SCHEMA})
