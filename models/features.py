"""Point-in-time features, exposures and labels of the ranker (SPEC §6); pure pandas/numpy.

Everything here is computed *as of a cutoff*: a function that receives events
reads only those with ``event_time <= cutoff`` for features, and only those in
``(cutoff, cutoff + label_days]`` for labels, so a training row never sees its
own future. Training takes several cutoffs (weekly snapshots before the end of
history); the batch job scores with one cutoff, its ``--as_of``.

Three stages, shared by training and scoring so they cannot drift apart:

1. :func:`user_states` (per user shard): one row per (user, cutoff) with the
   user features, the user's SKU and part-type signals packed into tuple
   columns (so they travel with the user through the vehicle shuffle), the
   SKUs to exclude and, for training, the SKUs bought in the label window.
2. :class:`VehicleLevels` and :func:`candidate_pools` (per vehicle): the
   candidate stage, i.e. segment popularity with fallback levels, exactly as
   :class:`models.recommend.Recommender` ranks; the pool of a user is the
   top ``candidates_per_user`` of the level that would serve them plus every
   candidate they viewed or carted in the intent window, minus what they bought.
3. :func:`feature_matrix`: user, item, segment and pair features of pool rows
   as one float32 matrix in :func:`feature_names` order.

An *exposure* is a (user, SKU) pair the user was shown at a cutoff: the pool
holds the recommendation exposures (what the candidate stage proposes) and the
view exposures (what the user viewed or carted); its label is a purchase of that
SKU within ``label_days`` after the cutoff.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from itertools import chain
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from models.catalog import CatalogArrays
from models.config import RecsConfig
from models.contracts import CART, ORDER_EVENT_NAMES, VIEW
from models.popularity import PopularityIndex, blended_levels, popularity_score, segment_key

DAY_US = 86_400_000_000
NEVER_DAYS = 9_999.0  # "days since" for something that never happened (trees split it off)


@dataclass(frozen=True)
class FeatureConfig:
    """Windows, snapshots and sampling of the ranker's training set.

    Attributes:
      window_days: look-back of the user RFM features and item counts (SPEC: 90).
      label_days: a purchase this many days after the exposure is a positive (SPEC: 7).
      candidates_per_user: recommendation exposures per user (top of the candidate stage).
      cutoff_step_days / n_cutoffs: training snapshots at ``as_of - step * k``,
        k = 1..n; each snapshot's label window ends before the next one's features.
      valid_cutoffs: the latest snapshots held out for validation (time-based split).
      negative_ratio: negatives kept per positive in *training* rows; 0 keeps all.
      eval_user_share: share of users without a purchase kept in validation and
        test snapshots (users with one are always kept); 1 keeps the full pools.
      price_tiers: USD edges of the price tiers behind the tier-share features.
      conversion_prior: pseudo-views that shrink a SKU's conversion toward the mean.
      max_rank: rank feature cap (ranks beyond it are all "far down").
      seed: seed of the negative sampling.

    >>> FeatureConfig().cutoff_offsets_days()[:3]
    (84, 77, 70)
    """

    window_days: int = 90
    label_days: int = 7
    candidates_per_user: int = 50
    cutoff_step_days: int = 7
    n_cutoffs: int = 12
    valid_cutoffs: int = 2
    negative_ratio: float = 50.0
    eval_user_share: float = 1.0
    price_tiers: Tuple[float, ...] = (100.0, 500.0)
    conversion_prior: float = 20.0
    max_rank: int = 1_000
    seed: int = 7

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"invalid ranker feature configuration: {message}")
        for name in ("window_days", "label_days", "candidates_per_user", "cutoff_step_days",
                     "n_cutoffs", "valid_cutoffs", "max_rank", "seed"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool),
                 f"{name} must be an integer, got {value!r}")
        need(self.window_days > 0 and self.label_days > 0, "windows must be > 0 days")
        need(self.candidates_per_user >= 1, "candidates_per_user must be >= 1")
        need(self.cutoff_step_days >= self.label_days,
             "cutoff_step_days must be >= label_days (label windows must not overlap)")
        need(self.n_cutoffs >= 2, "n_cutoffs must be >= 2 (train and validation)")
        need(1 <= self.valid_cutoffs < self.n_cutoffs,
             "valid_cutoffs must be between 1 and n_cutoffs - 1")
        need(np.isfinite(self.negative_ratio) and self.negative_ratio >= 0,
             "negative_ratio must be a finite number >= 0")
        need(0 < self.eval_user_share <= 1, "eval_user_share must be in (0, 1]")
        need(list(self.price_tiers) == sorted(set(self.price_tiers)) and all(
            t > 0 for t in self.price_tiers), "price_tiers must be increasing and > 0")
        need(self.conversion_prior >= 0, "conversion_prior must be >= 0")

    def cutoff_offsets_days(self) -> Tuple[int, ...]:
        """Days before ``as_of`` of every training cutoff, oldest first."""
        return tuple(self.cutoff_step_days * k for k in range(self.n_cutoffs, 0, -1))

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v)
                for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict) -> "FeatureConfig":
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items()})


# ----------------------------------------------------------------------------- feature names

USER_FEATURES = ("u_recency_days", "u_frequency_90d", "u_monetary_90d", "u_basket_size",
                 "u_type_entropy", "u_tier_low", "u_tier_mid", "u_tier_high", "u_views_90d")
ITEM_FEATURES = ("i_log_price", "i_global_pop", "i_orders_90d", "i_views_90d", "i_conversion",
                 "i_is_universal")
PAIR_FEATURES = ("p_type_bought", "p_days_since_type", "p_type_affinity", "p_price_vs_usual",
                 "p_views_sku", "p_days_since_view", "p_carted_sku", "p_days_since_cart")
# User columns that are not model features but feed the pair features.
USER_AUX = ("u_usual_price", "u_touches_90d")
SIGNAL_COLUMNS = ("sig_sku", "sig_views", "sig_view_age", "sig_carts", "sig_cart_age")
TYPE_COLUMNS = ("typ_name", "typ_bought", "typ_age", "typ_touches")
STATE_COLUMNS = USER_FEATURES + USER_AUX + SIGNAL_COLUMNS + TYPE_COLUMNS


def _slug(level_name: str) -> str:
    return level_name.replace("+", "_")


def segment_feature_names(config: RecsConfig) -> Tuple[str, ...]:
    """Per-level popularity (every level) and own-segment weight (levels below global)."""
    names = [_slug(config.level_name(level)) for level in config.levels]
    return (tuple(f"s_pop_{n}" for n in names)
            + tuple(f"s_obs_{n}" for n, level in zip(names, config.levels) if level)
            + ("s_base", "s_rank"))


def feature_names(config: RecsConfig) -> Tuple[str, ...]:
    """Model features in matrix column order (segment features depend on the levels)."""
    return USER_FEATURES + ITEM_FEATURES + segment_feature_names(config) + PAIR_FEATURES


# ----------------------------------------------------------------------------- history

class History(NamedTuple):
    """One shard's events, typed for feature work (times in µs since the epoch).

    lines: distinct (order_id, sku) purchases: user_id, sku, order_id, t, price,
      quantity, part_type (the three order event names of one order collapse).
    views / carts: user_id, sku, t, part_type.
    """

    lines: pd.DataFrame
    views: pd.DataFrame
    carts: pd.DataFrame


def micros(values) -> np.ndarray:
    """UTC times (a Series, an array, one Timestamp or string) as int64 µs since the epoch."""
    if isinstance(values, (pd.Timestamp, str)):
        stamp = pd.Timestamp(values)
        stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
        return np.int64(stamp.as_unit("us").value // 1000)
    index = pd.DatetimeIndex(values)
    index = index.tz_localize("UTC") if index.tz is None else index.tz_convert("UTC")
    return index.as_unit("us").asi8


def build_history(events: pd.DataFrame, catalog: pd.DataFrame) -> History:
    """Order lines, views and carts of deduplicated events, with part types and prices.

    The line price is the event's price, or the catalogue price when the event
    has none; part types come from the resolved catalogue ("" when unknown).
    """
    unique = catalog.drop_duplicates("sku")
    part_type = unique.set_index("sku")["part_type"]
    list_price = unique.set_index("sku")["price"]
    if events is None or not len(events):
        empty = pd.DataFrame({"user_id": pd.Series(dtype=object), "sku": pd.Series(dtype=object),
                              "t": pd.Series(dtype=np.int64),
                              "part_type": pd.Series(dtype=object)})
        return History(empty.assign(order_id=pd.Series(dtype=object),
                                    price=pd.Series(dtype=float),
                                    quantity=pd.Series(dtype=float)),
                       empty.assign(price=pd.Series(dtype=float)), empty)
    frame = pd.DataFrame({
        "user_id": events["user_id"].to_numpy(object),
        "sku": events["sku"].to_numpy(object),
        "t": micros(events["event_time"]),
        "event_name": events["event_name"].to_numpy(object),
    })
    frame["part_type"] = part_type.reindex(frame["sku"]).fillna("").to_numpy(object)
    is_order = frame["event_name"].isin(ORDER_EVENT_NAMES).to_numpy(bool)
    orders = frame.loc[is_order].assign(
        order_id=events["order_id"].to_numpy(object)[is_order],
        price=pd.to_numeric(events["price"], errors="coerce").to_numpy(float)[is_order]
        if "price" in events.columns else np.nan,
        quantity=pd.to_numeric(events["quantity"], errors="coerce").to_numpy(float)[is_order]
        if "quantity" in events.columns else 1.0)
    orders = orders.sort_values(["order_id", "sku", "t"], kind="stable").drop_duplicates(
        ["order_id", "sku"], keep="first")
    orders["price"] = orders["price"].fillna(pd.Series(
        list_price.reindex(orders["sku"]).to_numpy(float), index=orders.index))
    orders["quantity"] = orders["quantity"].fillna(1.0).clip(lower=1.0)
    cols = ["user_id", "sku", "t", "part_type"]
    lines = orders[cols + ["order_id", "price", "quantity"]].reset_index(drop=True)
    views = frame.loc[frame["event_name"] == VIEW, cols].reset_index(drop=True)
    views["price"] = list_price.reindex(views["sku"]).to_numpy(float)
    carts = frame.loc[frame["event_name"] == CART, cols].reset_index(drop=True)
    return History(lines, views, carts)


def cutoff_grid(as_of: pd.Timestamp, fconfig: FeatureConfig) -> List[pd.Timestamp]:
    """Training cutoffs, oldest first: ``as_of - step * k`` for k = n..1."""
    as_of = pd.Timestamp(as_of)
    return [as_of - pd.Timedelta(days=d) for d in fconfig.cutoff_offsets_days()]


# ----------------------------------------------------------------------------- per (user, cutoff)

def _keyed(keys: pd.DataFrame, events: pd.DataFrame) -> pd.DataFrame:
    """Every (key, event) pair of the key's user, with the event's age in days at the cutoff.

    Keeps only events at or before the key's cutoff: the one place where the
    point-in-time rule is applied to feature inputs.
    """
    m = keys[["_k", "user_id", "_cut"]].merge(events, on="user_id", how="inner", sort=False)
    m = m.loc[m["t"].to_numpy() <= m["_cut"].to_numpy()]
    return m.assign(age=(m["_cut"].to_numpy() - m["t"].to_numpy()) / DAY_US)


def _per_key(n: int, keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    return np.bincount(keys, weights=values, minlength=n)[:n]


def user_features(hist: History, keys: pd.DataFrame, fconfig: FeatureConfig) -> pd.DataFrame:
    """User features (:data:`USER_FEATURES` and :data:`USER_AUX`) per row of ``keys``.

    ``keys`` has ``user_id`` and ``cutoff`` (a UTC time). Recency is days since
    the last order line (capped at 365, 365 when none); frequency and monetary
    count distinct orders and spend (price × quantity) in ``window_days``;
    basket size is lines per order and type entropy the Shannon entropy (nats)
    of purchased part types over all history before the cutoff; the tier shares
    split purchased lines by ``price_tiers``. The usual price is the median paid
    price (else the median price of viewed SKUs); touches count lines, views and
    carts in the window (the denominator of part-type affinity).
    """
    k = _keys(keys)
    n = len(k)
    window = float(fconfig.window_days)
    out = {name: np.zeros(n) for name in USER_FEATURES + USER_AUX}
    lines = _keyed(k, hist.lines)
    kk = lines["_k"].to_numpy()
    age = lines["age"].to_numpy()
    recent = age < window
    last = pd.Series(age).groupby(kk).min()
    recency = np.full(n, 365.0)
    recency[last.index.to_numpy()] = np.minimum(last.to_numpy(), 365.0)
    out["u_recency_days"] = recency
    per_order = lines.loc[recent, ["_k", "order_id"]].drop_duplicates()
    out["u_frequency_90d"] = np.bincount(per_order["_k"].to_numpy(), minlength=n)[:n].astype(float)
    spend = lines["price"].to_numpy(float) * lines["quantity"].to_numpy(float)
    out["u_monetary_90d"] = _per_key(n, kk[recent], spend[recent])
    n_lines = np.bincount(kk, minlength=n)[:n].astype(float)
    n_orders = np.bincount(lines[["_k", "order_id"]].drop_duplicates()["_k"].to_numpy(),
                           minlength=n)[:n].astype(float)
    out["u_basket_size"] = np.divide(n_lines, n_orders, out=np.zeros(n), where=n_orders > 0)
    if len(lines):
        per_type = lines.groupby(["_k", "part_type"], sort=False).size()
        share = per_type.to_numpy(float) / n_lines[per_type.index.get_level_values(0)]
        out["u_type_entropy"] = _per_key(n, per_type.index.get_level_values(0).to_numpy(),
                                         -share * np.log(share))
    tier = np.searchsorted(np.asarray(fconfig.price_tiers, float),
                           lines["price"].to_numpy(float), side="right")
    names = ("u_tier_low", "u_tier_mid", "u_tier_high")
    for i in range(len(fconfig.price_tiers) + 1):
        counts = np.bincount(kk[tier == i], minlength=n)[:n].astype(float)
        # More tiers than names: the extra ones fold into the highest share.
        name = names[min(i, len(names) - 1)]
        out[name] = out[name] + np.divide(counts, n_lines, out=np.zeros(n), where=n_lines > 0)
    views = _keyed(k, hist.views)
    carts = _keyed(k, hist.carts)
    v_recent = views["age"].to_numpy() < window
    out["u_views_90d"] = np.bincount(views["_k"].to_numpy()[v_recent], minlength=n)[:n] \
        .astype(float)
    c_recent = carts["age"].to_numpy() < window
    out["u_touches_90d"] = (np.bincount(kk[recent], minlength=n)[:n]
                            + out["u_views_90d"]
                            + np.bincount(carts["_k"].to_numpy()[c_recent], minlength=n)[:n])
    usual = np.full(n, np.nan)
    if len(lines):
        med = pd.Series(lines["price"].to_numpy(float)).groupby(kk).median()
        usual[med.index.to_numpy()] = med.to_numpy()
    if len(views) and np.isnan(usual).any():
        # No purchase yet: the median list price of what the user looked at.
        seen = pd.Series(views["price"].to_numpy(float)).groupby(views["_k"].to_numpy()).median()
        at = seen.index.to_numpy()
        fill = np.isnan(usual[at])
        usual[at[fill]] = seen.to_numpy()[fill]
    out["u_usual_price"] = usual
    return pd.DataFrame(out)


def _keys(keys: pd.DataFrame) -> pd.DataFrame:
    """Keys with a dense row id ``_k`` and the cutoff in µs ``_cut``."""
    return pd.DataFrame({"_k": np.arange(len(keys)),
                         "user_id": keys["user_id"].to_numpy(object),
                         "_cut": micros(keys["cutoff"])})


def sku_signals(hist: History, keys: pd.DataFrame, intent_days: int) -> pd.DataFrame:
    """Views and cart updates of each (key, SKU) in the intent window before the cutoff.

    Columns: ``_k`` (row of ``keys``), sku, views, view_age (days since the
    last view), carts, cart_age; ages are :data:`NEVER_DAYS` when absent.
    """
    k = _keys(keys)
    parts = []
    for frame, name in ((hist.views, "views"), (hist.carts, "carts")):
        m = _keyed(k, frame)
        m = m.loc[m["age"].to_numpy() <= intent_days]
        g = m.groupby(["_k", "sku"], sort=False)["age"].agg(["size", "min"])
        parts.append(g.rename(columns={"size": name, "min": name[:-1] + "_age"}))
    both = pd.concat(parts, axis=1).reset_index()
    both[["views", "carts"]] = both[["views", "carts"]].fillna(0.0)
    both[["view_age", "cart_age"]] = both[["view_age", "cart_age"]].fillna(NEVER_DAYS)
    return both.sort_values(["_k", "sku"], kind="stable").reset_index(drop=True)


def type_signals(hist: History, keys: pd.DataFrame, window_days: int) -> pd.DataFrame:
    """Purchases per (key, part type) over all history, and touches in the window.

    Columns: ``_k``, part_type, bought (order lines), bought_age (days since the
    last, :data:`NEVER_DAYS` when none), touches (lines, views and carts of the
    type in ``window_days``).
    """
    k = _keys(keys)
    lines = _keyed(k, hist.lines)
    bought = lines.groupby(["_k", "part_type"], sort=False)["age"].agg(["size", "min"]).rename(
        columns={"size": "bought", "min": "bought_age"})
    touches = [lines.loc[lines["age"] < window_days, ["_k", "part_type"]]]
    for frame in (hist.views, hist.carts):
        m = _keyed(k, frame)
        touches.append(m.loc[m["age"] < window_days, ["_k", "part_type"]])
    touched = pd.concat(touches, ignore_index=True).groupby(
        ["_k", "part_type"], sort=False).size().rename("touches")
    both = pd.concat([bought, touched], axis=1).reset_index()
    both["bought"] = both["bought"].fillna(0.0)
    both["bought_age"] = both["bought_age"].fillna(NEVER_DAYS)
    both["touches"] = both["touches"].fillna(0.0)
    both = both.loc[both["part_type"] != ""]
    return both.sort_values(["_k", "part_type"], kind="stable").reset_index(drop=True)


def skus_in_window(frame: pd.DataFrame, keys: pd.DataFrame, after_days: float,
                   before_days: float) -> np.ndarray:
    """Per key, sorted tuples of SKUs with events in ``[cutoff - before, cutoff + after]``.

    ``after_days > 0`` looks into the future (labels: ``(cutoff, cutoff + after]``,
    nothing at or before the cutoff); otherwise the window is
    ``[cutoff - before, cutoff]`` (exclusion and intent, as the batch job has it).
    """
    k = _keys(keys)
    m = k.merge(frame, on="user_id", how="inner", sort=False)
    t, cut = m["t"].to_numpy(), m["_cut"].to_numpy()
    if after_days > 0:
        mask = (t > cut) & (t <= cut + int(after_days * DAY_US))
    else:
        mask = (t <= cut) & (t >= cut - int(before_days * DAY_US))
    return _tuples(len(k), m["_k"].to_numpy()[mask], m["sku"].to_numpy(object)[mask])


def _tuples(n: int, rows: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Sorted distinct values per row as tuples (empty tuple where none)."""
    if not len(rows):
        out = np.empty(n, dtype=object)
        out[:] = [()] * n
        return out
    frame = pd.DataFrame({"_k": rows, "v": values}).drop_duplicates().sort_values(
        ["_k", "v"], kind="stable")
    return _pack(n, frame, ["v"])["v"]


def _pack(n: int, long: pd.DataFrame, columns: Sequence[str]) -> Dict[str, np.ndarray]:
    """Long signal rows (sorted by ``_k``) as per-key tuples of each column."""
    rows = long["_k"].to_numpy()
    starts = np.searchsorted(rows, np.arange(n), side="left")
    ends = np.searchsorted(rows, np.arange(n), side="right")
    filled = np.flatnonzero(ends > starts)
    out = {}
    for column in columns:
        values = long[column].to_numpy(object if column in ("v", "sig_sku", "typ_name")
                                       else float).tolist()
        cells = np.empty(n, dtype=object)
        cells[:] = [()] * n
        cells[filled] = [tuple(values[starts[i]:ends[i]]) for i in filled]
        out[column] = cells
    return out


def user_states(users: pd.DataFrame, hist: History, cutoffs: Sequence[pd.Timestamp],
                fconfig: FeatureConfig, config: RecsConfig, labels: bool) -> pd.DataFrame:
    """One row per (user, cutoff): everything the ranker needs to know about the user.

    Carries the user's own columns, ``cutoff``, the user features, the packed
    SKU signals (``sig_*``) and part-type signals (``typ_*``), ``bought``
    (exclusion window), ``viewed`` and ``carted`` (intent window) as the batch
    job defines them, and with ``labels`` the SKUs bought in the label window
    (``label_skus``).
    """
    n_users = len(users)
    reps = np.repeat(np.arange(n_users), len(cutoffs))
    states = users.iloc[reps].reset_index(drop=True)
    states["cutoff"] = pd.Series(np.tile(np.asarray(
        [pd.Timestamp(c) for c in cutoffs], dtype=object), n_users)).astype(
        "datetime64[us, UTC]").to_numpy()
    n = len(states)
    feats = user_features(hist, states, fconfig)
    for column in USER_FEATURES + USER_AUX:
        states[column] = feats[column].to_numpy()
    sig = sku_signals(hist, states, config.scoring.intent_window_days)
    sig = sig.rename(columns={"sku": "sig_sku", "views": "sig_views", "view_age": "sig_view_age",
                              "carts": "sig_carts", "cart_age": "sig_cart_age"})
    for column, cells in _pack(n, sig, SIGNAL_COLUMNS).items():
        states[column] = cells
    typ = type_signals(hist, states, fconfig.window_days).rename(columns={
        "part_type": "typ_name", "bought": "typ_bought", "bought_age": "typ_age",
        "touches": "typ_touches"})
    for column, cells in _pack(n, typ, TYPE_COLUMNS).items():
        states[column] = cells
    states["bought"] = skus_in_window(hist.lines, states, 0, config.rules.exclusion_days)
    intent = config.scoring.intent_window_days
    states["viewed"] = skus_in_window(hist.views, states, 0, intent)
    states["carted"] = skus_in_window(hist.carts, states, 0, intent)
    if labels:
        states["label_skus"] = skus_in_window(hist.lines, states, fconfig.label_days, 0)
    return states


def item_counts(hist: History, cutoffs: Sequence[pd.Timestamp],
                fconfig: FeatureConfig) -> pd.DataFrame:
    """Order lines and views per (cutoff, SKU) in the window before each cutoff.

    Additive over shards of users: sum partial frames with :func:`merge_item_counts`.
    """
    parts = []
    window = fconfig.window_days * DAY_US
    for cutoff in cutoffs:
        cut = micros(pd.Timestamp(cutoff))
        for frame, name in ((hist.lines, "orders"), (hist.views, "views")):
            t = frame["t"].to_numpy()
            mask = (t <= cut) & (t > cut - window)
            counts = pd.Series(frame["sku"].to_numpy(object)[mask]).value_counts()
            parts.append(pd.DataFrame({"cutoff": pd.Timestamp(cutoff), "sku": counts.index,
                                       name: counts.to_numpy(float)}))
    return merge_item_counts(parts)


def merge_item_counts(frames) -> pd.DataFrame:
    """Sums partial item-count frames per (cutoff, sku): associative and commutative."""
    frames = [f for f in frames if f is not None and len(f)]
    if not frames:
        return pd.DataFrame({"cutoff": pd.Series(dtype="datetime64[us, UTC]"),
                             "sku": pd.Series(dtype=object), "orders": pd.Series(dtype=float),
                             "views": pd.Series(dtype=float)})
    merged = pd.concat(frames, ignore_index=True)
    for column in ("orders", "views"):
        if column not in merged.columns:
            merged[column] = 0.0
    merged[["orders", "views"]] = merged[["orders", "views"]].fillna(0.0)
    merged["cutoff"] = merged["cutoff"].astype("datetime64[us, UTC]")
    return merged.groupby(["cutoff", "sku"], sort=True, as_index=False)[
        ["orders", "views"]].sum()


# ----------------------------------------------------------------------------- items

@dataclass(frozen=True)
class ItemTable:
    """Item features per catalogue position at one cutoff (columns :data:`ITEM_FEATURES`)."""

    values: np.ndarray  # (n_skus, len(ITEM_FEATURES)) float32

    @classmethod
    def build(cls, catalog: CatalogArrays, counts: pd.DataFrame, index: PopularityIndex,
              fconfig: FeatureConfig) -> "ItemTable":
        """From catalogue arrays, one cutoff's item counts and that cutoff's popularity.

        Conversion is (orders + k · mean rate) / (views + k): a SKU with few
        views converts at about the catalogue's mean rate.
        """
        n = len(catalog)
        pos = catalog.index_of(counts["sku"].to_numpy(str)) if len(counts) else np.array([], int)
        known = pos >= 0
        orders, views = np.zeros(n), np.zeros(n)
        orders[pos[known]] = counts["orders"].to_numpy(float)[known]
        views[pos[known]] = counts["views"].to_numpy(float)[known]
        mean_rate = orders.sum() / views.sum() if views.sum() > 0 else 0.0
        k = fconfig.conversion_prior
        conversion = np.divide(orders + k * mean_rate, views + k, out=np.zeros(n),
                               where=(views + k) > 0)
        global_weight, _ = index.dense(index.config.level_name(()), "", np.arange(n))
        values = np.column_stack([
            np.log1p(np.maximum(catalog.price, 0.0)), np.log1p(global_weight), orders, views,
            conversion, catalog.is_universal.astype(float)])
        return cls(values.astype(np.float32))


# ----------------------------------------------------------------------------- candidate stage

@dataclass
class VehicleLevels:
    """Segment popularity of one vehicle's candidates at every level, most specific first.

    ``usable`` marks levels whose segment the user has (a user without a year
    cannot be served at the year level); ranks and orders follow the batch
    job's base score (popularity + specificity bonus, ties by SKU).
    """

    names: List[str]
    usable: np.ndarray     # (L,) bool
    pop: np.ndarray        # (L, C) popularity_score of the shrunk rate
    own: np.ndarray        # (L, C) log1p of the decayed weight in the very segment
    observed: np.ndarray   # (L, C) bool: ordered in the very segment
    base: np.ndarray       # (L, C) pop + specific bonus
    order: np.ndarray      # (L, C) candidate indices best first
    rank: np.ndarray       # (L, C) position of each candidate in ``order``

    @property
    def support(self) -> np.ndarray:
        return self.observed.sum(axis=1)


def vehicle_levels(index: PopularityIndex, first: pd.Series, cand: np.ndarray,
                   catalog: CatalogArrays, config: RecsConfig) -> VehicleLevels:
    """The candidate stage's scores for one vehicle (``first``: any of its users)."""
    segments = [segment_key([first.get(a) for a in level]) for level in config.levels]
    blended = blended_levels(index, segments, cand)
    specific = ~catalog.is_universal[cand]
    n_levels, n_cand = len(blended), len(cand)
    pop, own, base = (np.zeros((n_levels, n_cand)) for _ in range(3))
    observed = np.zeros((n_levels, n_cand), bool)
    order = np.zeros((n_levels, n_cand), np.int64)
    rank = np.zeros((n_levels, n_cand), np.int64)
    for i, scores in enumerate(blended):
        pop[i] = popularity_score(scores.rate, config)
        base[i] = pop[i] + config.scoring.specific_bonus * specific
        weight, _ = index.dense(scores.name, scores.segment, cand)
        own[i] = np.log1p(weight)
        observed[i] = scores.observed
        order[i] = np.argsort(-base[i], kind="stable")
        rank[i, order[i]] = np.arange(n_cand)
    return VehicleLevels([s.name for s in blended], np.array([s.segment is not None
                                                               for s in blended]),
                         pop, own, observed, base, order, rank)


class Pools(NamedTuple):
    """Pool rows of a group of users: user row, candidate index (into ``cand``) and level."""

    row: np.ndarray
    item: np.ndarray
    level: np.ndarray


def positions_in(cand: np.ndarray, catalog: CatalogArrays, rows: np.ndarray,
                 skus: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(row, candidate index) of SKUs that are among ``cand``; the others are dropped."""
    if not len(skus) or not len(cand):
        return np.array([], np.int64), np.array([], np.int64)
    idx = catalog.index_of(skus.astype(str))
    where = np.clip(np.searchsorted(cand, idx), 0, len(cand) - 1)
    hit = (cand[where] == idx) & (idx >= 0)
    return rows[hit].astype(np.int64), where[hit].astype(np.int64)


def explode(cells: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Tuple cells → (row of each element, the elements)."""
    lengths = np.fromiter(map(len, cells), dtype=np.int64, count=len(cells))
    rows = np.repeat(np.arange(len(cells)), lengths)
    values = np.empty(int(lengths.sum()), dtype=object)
    values[:] = list(chain.from_iterable(cells))
    return rows, values


def _flat(cells: np.ndarray) -> np.ndarray:
    """Numeric tuple cells concatenated into one float array."""
    return np.fromiter(chain.from_iterable(cells), dtype=float)


def serving_levels(levels: VehicleLevels, n_users: int, bought_row: np.ndarray,
                   bought_item: np.ndarray, n: int) -> np.ndarray:
    """Level each user is served from (rule 12, as the Recommender decides).

    The most specific usable level where at least ``n`` candidates were
    ordered in the segment and not bought by the user; the last usable level
    (global) always serves.
    """
    usable = np.flatnonzero(levels.usable)
    chosen = np.full(n_users, usable[-1], dtype=np.int64)
    decided = np.zeros(n_users, bool)
    for i in usable[:-1]:
        excluded = np.bincount(bought_row, weights=levels.observed[i][bought_item].astype(float),
                               minlength=n_users)[:n_users]
        ok = ~decided & (levels.support[i] - excluded >= n)
        chosen[ok] = i
        decided |= ok
    return chosen


def candidate_pools(levels: VehicleLevels, level_of_user: np.ndarray, size: int,
                    bought: Tuple[np.ndarray, np.ndarray],
                    intent: Tuple[np.ndarray, np.ndarray]) -> Pools:
    """Each user's pool: top ``size`` of their level not bought, plus intent items not bought.

    ``bought`` and ``intent`` are (user row, candidate index) pairs. Rows come
    out sorted by user, then candidate index.
    """
    n_users = len(level_of_user)
    n_cand = levels.order.shape[1]
    if not n_users or not n_cand:
        return Pools(*(np.array([], np.int64) for _ in range(3)))
    bought_keys = np.unique(bought[0] * n_cand + bought[1])
    extra = int(np.bincount(bought[0], minlength=n_users).max()) if len(bought[0]) else 0
    head = min(size + extra, n_cand)
    top = levels.order[level_of_user, :head]                      # (users, head)
    keys = np.arange(n_users)[:, None] * n_cand + top
    free = ~np.isin(keys, bought_keys) if len(bought_keys) else np.ones_like(top, bool)
    keep = free & (np.cumsum(free, axis=1) <= size)
    rows, cols = np.nonzero(keep)
    pool_keys = rows.astype(np.int64) * n_cand + top[rows, cols]
    intent_keys = intent[0] * n_cand + intent[1]
    if len(intent_keys) and len(bought_keys):
        intent_keys = intent_keys[~np.isin(intent_keys, bought_keys)]
    pool_keys = np.unique(np.concatenate([pool_keys, intent_keys]))
    row, item = pool_keys // n_cand, pool_keys % n_cand
    return Pools(row, item, level_of_user[row])


# ----------------------------------------------------------------------------- feature matrix

def _lookup(keys: np.ndarray, table_keys: np.ndarray, values: np.ndarray,
            default: float) -> np.ndarray:
    """values[table_keys == key] per key (table_keys sorted), ``default`` where absent."""
    out = np.full(len(keys), default, dtype=float)
    if not len(table_keys) or not len(keys):
        return out
    where = np.clip(np.searchsorted(table_keys, keys), 0, len(table_keys) - 1)
    hit = table_keys[where] == keys
    out[hit] = values[where[hit]]
    return out


class UserSignals(NamedTuple):
    """The packed signals of a group of users unpacked for vectorised lookups."""

    sku_keys: np.ndarray      # sorted row * n_skus + catalogue position
    sku_values: np.ndarray    # (len, 4): views, view_age, carts, cart_age
    type_keys: np.ndarray     # sorted row * n_types + type code
    type_values: np.ndarray   # (len, 3): bought, bought_age, touches


def unpack_signals(users: pd.DataFrame, catalog: CatalogArrays,
                   type_codes: np.ndarray) -> UserSignals:
    """Tuple columns ``sig_*`` / ``typ_*`` of ``users`` → sorted key arrays."""
    n_skus, n_types = len(catalog), len(type_codes) + 1
    rows, skus = explode(users["sig_sku"].to_numpy(object))
    pos = catalog.index_of(skus.astype(str)) if len(skus) else np.array([], np.int64)
    cols = [_flat(users[name].to_numpy(object)) for name in SIGNAL_COLUMNS[1:]]
    ok = pos >= 0
    sku_keys = rows[ok].astype(np.int64) * n_skus + pos[ok]
    sku_values = np.column_stack(cols)[ok] if len(skus) else np.zeros((0, 4))
    order = np.argsort(sku_keys, kind="stable")
    t_rows, names = explode(users["typ_name"].to_numpy(object))
    code = (np.searchsorted(type_codes, names.astype(str)) if len(names)
            else np.array([], np.int64))
    code = np.clip(code, 0, max(len(type_codes) - 1, 0))
    known = (type_codes[code] == names.astype(str)) if len(names) and len(type_codes) else \
        np.zeros(len(names), bool)
    t_cols = [_flat(users[name].to_numpy(object)) for name in TYPE_COLUMNS[1:]]
    type_keys = t_rows[known].astype(np.int64) * n_types + code[known]
    type_values = np.column_stack(t_cols)[known] if len(names) else np.zeros((0, 3))
    t_order = np.argsort(type_keys, kind="stable")
    return UserSignals(sku_keys[order], sku_values[order], type_keys[t_order],
                       type_values[t_order])


def part_type_codes(catalog: CatalogArrays) -> Tuple[np.ndarray, np.ndarray]:
    """Sorted distinct part types and the code of every catalogue position."""
    types, code = np.unique(catalog.part_type.astype(str), return_inverse=True)
    return types, code


def feature_matrix(users: pd.DataFrame, pools: Pools, cand: np.ndarray, levels: VehicleLevels,
                   items: ItemTable, catalog: CatalogArrays, types: Tuple[np.ndarray, np.ndarray],
                   fconfig: FeatureConfig, signals: Optional[UserSignals] = None) -> np.ndarray:
    """Feature rows of ``pools`` in :func:`feature_names` order (float32)."""
    row, pos = pools.row, cand[pools.item]
    user = users[list(USER_FEATURES)].to_numpy(float)[row]
    item = items.values[pos]
    n_levels = levels.pop.shape[0]
    seg_pop = levels.pop[:, pools.item].T
    seg_own = levels.own[:, pools.item].T[:, [i for i in range(n_levels) if i < n_levels - 1]]
    base = levels.base[pools.level, pools.item]
    rank = np.minimum(levels.rank[pools.level, pools.item], fconfig.max_rank)
    signals = signals or unpack_signals(users, catalog, types[0])
    pair_keys = row.astype(np.int64) * len(catalog) + pos
    sku = [_lookup(pair_keys, signals.sku_keys, signals.sku_values[:, j], default)
           for j, default in enumerate((0.0, NEVER_DAYS, 0.0, NEVER_DAYS))]
    type_keys = row.astype(np.int64) * (len(types[0]) + 1) + types[1][pos]
    typ = [_lookup(type_keys, signals.type_keys, signals.type_values[:, j], default)
           for j, default in enumerate((0.0, NEVER_DAYS, 0.0))]
    touches = users["u_touches_90d"].to_numpy(float)[row]
    affinity = np.divide(typ[2], touches, out=np.zeros(len(row)), where=touches > 0)
    usual = users["u_usual_price"].to_numpy(float)[row]
    price = catalog.price[pos]
    ok = np.isfinite(usual) & (usual > 0) & (price > 0)
    price_vs = np.zeros(len(row))
    price_vs[ok] = np.log(price[ok] / usual[ok])
    pair = np.column_stack([typ[0], typ[1], affinity, price_vs, sku[0], sku[1], sku[2], sku[3]])
    return np.column_stack([user, item, seg_pop, seg_own, base, rank, pair]).astype(np.float32)


# ----------------------------------------------------------------------------- labels, sampling

def pool_labels(users: pd.DataFrame, pools: Pools, cand: np.ndarray,
                catalog: CatalogArrays) -> np.ndarray:
    """1 where the pool row's SKU is among the user's ``label_skus``, else 0."""
    rows, skus = explode(users["label_skus"].to_numpy(object))
    lrow, litem = positions_in(cand, catalog, rows, skus)
    n_cand = max(len(cand), 1)
    label_keys = np.unique(lrow * n_cand + litem)
    return np.isin(pools.row * n_cand + pools.item, label_keys).astype(np.int8)


def downsample_negatives(labels: np.ndarray, ratio: float, rng: np.random.Generator
                         ) -> Tuple[np.ndarray, float]:
    """Mask keeping every positive and about ``ratio`` negatives per positive.

    Each negative is kept with the same probability ``p = min(1, ratio · P / N)``
    (P positives, N negatives), so the kept negatives are an unbiased sample and
    a probability model can be corrected by ``p`` afterwards. ``ratio`` 0 keeps
    everything. Returns the mask and ``p``.

    >>> mask, p = downsample_negatives(np.array([1, 0, 0, 0, 0]), 2.0, np.random.default_rng(0))
    >>> int(mask[0]), p
    (1, 0.5)
    """
    labels = np.asarray(labels)
    positives = int((labels == 1).sum())
    negatives = len(labels) - positives
    if ratio <= 0 or negatives == 0:
        return np.ones(len(labels), bool), 1.0
    keep_rate = min(1.0, ratio * positives / negatives)
    return (labels == 1) | (rng.random(len(labels)) < keep_rate), keep_rate


def expected_keep_rate(positives: int, negatives: int, ratio: float) -> float:
    """The negative keep probability :func:`downsample_negatives` uses for global counts."""
    if ratio <= 0 or negatives == 0:
        return 1.0
    return min(1.0, ratio * positives / negatives)


# ----------------------------------------------------------------------------- one vehicle

class PoolBuilder:
    """Candidate pools and their feature rows for users who share one vehicle.

    Training and scoring both go through :meth:`build`, so a feature cannot
    mean one thing in training and another when the model is used.
    """

    def __init__(self, catalog: CatalogArrays, config: RecsConfig, fconfig: FeatureConfig):
        self.catalog = catalog
        self.config = config
        self.fconfig = fconfig
        self.types = part_type_codes(catalog)
        self.names = feature_names(config)

    def user_pairs(self, users: pd.DataFrame, cand: np.ndarray, column: str
                   ) -> Tuple[np.ndarray, np.ndarray]:
        """(row, candidate index) of the SKUs in a tuple column that are candidates."""
        if column not in users.columns:
            return np.array([], np.int64), np.array([], np.int64)
        rows, skus = explode(users[column].to_numpy(object))
        return positions_in(cand, self.catalog, rows, skus)

    def build(self, users: pd.DataFrame, cand: np.ndarray, index: PopularityIndex,
              levels: Optional[VehicleLevels] = None, size: Optional[int] = None
              ) -> Tuple[VehicleLevels, Pools]:
        """Levels of the vehicle and the pool of every user (rows sorted by user)."""
        levels = levels or vehicle_levels(index, users.iloc[0], cand, self.catalog, self.config)
        bought = self.user_pairs(users, cand, "bought")
        viewed = self.user_pairs(users, cand, "viewed")
        carted = self.user_pairs(users, cand, "carted")
        intent = (np.concatenate([viewed[0], carted[0]]), np.concatenate([viewed[1], carted[1]]))
        level_of_user = serving_levels(levels, len(users), *bought,
                                       self.config.rules.recs_per_user)
        pools = candidate_pools(levels, level_of_user, size or self.fconfig.candidates_per_user,
                                bought, intent)
        return levels, pools

    def matrix(self, users: pd.DataFrame, pools: Pools, cand: np.ndarray,
               levels: VehicleLevels, items: ItemTable) -> np.ndarray:
        return feature_matrix(users, pools, cand, levels, items, self.catalog, self.types,
                              self.fconfig)

    def labelled(self, users: pd.DataFrame, cand: np.ndarray, index: PopularityIndex
                 ) -> "Labelled":
        """Pools of one vehicle at one cutoff (``users`` share both) with their labels."""
        levels, pools = self.build(users, cand, index)
        return Labelled(users, cand, levels, pools, pool_labels(users, pools, cand, self.catalog))

    def examples(self, group: "Labelled", items: ItemTable,
                 keep: Optional[np.ndarray] = None, weight: float = 1.0) -> pd.DataFrame:
        """Feature rows of a labelled group; ``keep`` selects rows, ``weight`` is 1 / keep rate
        of the negatives (positives always weigh 1)."""
        pools, labels, users = group.pools, group.labels, group.users
        if keep is not None:
            pools = Pools(*(a[keep] for a in pools))
            labels = labels[keep]
            # Only the users with a kept row are unpacked.
            needed = np.unique(pools.row)
            users = users.iloc[needed].reset_index(drop=True)
            pools = Pools(np.searchsorted(needed, pools.row), pools.item, pools.level)
        x = self.matrix(users, pools, group.cand, group.levels, items)
        frame = pd.DataFrame(x, columns=list(self.names))
        frame.insert(0, "user_id", users["user_id"].to_numpy(object)[pools.row])
        frame.insert(1, "cutoff", users["cutoff"].to_numpy()[pools.row])
        frame.insert(2, "sku", self.catalog.sku[group.cand[pools.item]].astype(object))
        frame.insert(3, "label", labels.astype(np.int8))
        frame.insert(4, "weight", np.where(labels == 1, 1.0, weight))
        return frame


class Labelled(NamedTuple):
    """One vehicle's users at one cutoff, their pools and the pools' labels."""

    users: pd.DataFrame
    cand: np.ndarray
    levels: VehicleLevels
    pools: Pools
    labels: np.ndarray


def sample_shard(groups: Sequence[Labelled], train: Sequence[bool], ratio: float,
                 rng: np.random.Generator, eval_user_share: float = 1.0
                 ) -> Tuple[List[Optional[np.ndarray]], float, List[float]]:
    """Row masks and negative weights for a shard's groups.

    Training groups: negatives are downsampled with one keep rate for the
    whole shard (``ratio`` negatives per positive over all its training
    groups), never per group, so a group without a positive keeps its share of
    negatives too, the kept negatives are a uniform sample and ``1 / rate`` is
    each one's weight. Validation and test groups keep whole users: all with a
    purchase, and a share ``eval_user_share`` of the others (weight
    ``1 / share``), so their metrics see the serving distribution.

    A shard whose training groups hold no positive has a keep rate of 0 (no
    negatives per no positive): its training negatives are all dropped and
    their weight is 1.0, since there is no kept negative to re-weight (the
    weight used to be ``1 / 0``, which crashed the job).

    Returns the masks (None: keep all), the training keep rate, and the weight
    of each group's kept negatives.
    """
    labels = [g.labels for g, t in zip(groups, train) if t]
    every = np.concatenate(labels) if labels else np.zeros(0, np.int8)
    positives = int(every.sum())
    rate = expected_keep_rate(positives, len(every) - positives, ratio)
    masks: List[Optional[np.ndarray]] = []
    weights: List[float] = []
    for group, is_train in zip(groups, train):
        if is_train:
            masks.append(None if rate >= 1.0 else
                         (group.labels == 1) | (rng.random(len(group.labels)) < rate))
            weights.append(1.0 / rate if rate > 0 else 1.0)
        elif eval_user_share >= 1.0:
            masks.append(None)
            weights.append(1.0)
        else:
            n_users = len(group.users)
            buyer = np.zeros(n_users, bool)
            buyer[group.pools.row[group.labels == 1]] = True
            kept = buyer | (rng.random(n_users) < eval_user_share)
            masks.append(kept[group.pools.row])
            weights.append(1.0 / eval_user_share)
    return masks, rate, weights


EXAMPLE_KEYS = ("user_id", "cutoff", "sku", "label", "weight")
