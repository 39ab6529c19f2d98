"""E-mail campaigns in pandas: event clean-up, bandit window state, the report (SPEC §4, §5).

The unit of the funnel is a *recipient*: one ``(campaign_id, treatment_id,
user_id)`` that was SENT. Its later events (DELIVERED, DELIVERY_FAILED,
VIEWED, CLICKED) only make sense after that send, and each stage is reached
once however many times the tracking pixel fires. `check_funnel` enforces
both, so the bandit never sees a click nobody was sent and the funnel never
counts one open twice.

Orders come from ``events`` under the three order event names; one
``order_id`` is one order whatever names report it. An order is attributed
to the buyer's latest send within the attribution window (last touch), so
each order's revenue is counted once across campaigns, while a recipient
counts as "ordered" in the funnel when any order follows its send within the
window.

Beam adapters live in transforms/; nothing here imports Beam.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Mapping, NamedTuple, Sequence, Tuple

import numpy as np
import pandas as pd

from models import bandit, health
from models.bandit import BanditConfig, CountError
from models.contracts import ORDER_EVENT_NAMES
from models.popularity import segment_keys

SENT, DELIVERED, DELIVERY_FAILED, VIEWED, CLICKED = (
    "SENT", "DELIVERED", "DELIVERY_FAILED", "VIEWED", "CLICKED")
# Treatment-event kind → count field; the order is the accumulator layout of the bandit counts.
KIND_FIELDS = {SENT: "sent", DELIVERED: "delivered", DELIVERY_FAILED: "delivery_failed",
               VIEWED: "views", CLICKED: "clicks"}
COUNT_FIELDS = tuple(KIND_FIELDS.values())
# How a dead-letter reason names an event that has no send before it.
_NOUNS = {DELIVERED: "delivery", DELIVERY_FAILED: "delivery failure", VIEWED: "view",
          CLICKED: "click"}

RECIPIENT_KEY = ("campaign_id", "treatment_id", "user_id")
ALL = "*"                 # campaign_id / treatment_id / segment of a total row
NO_SEGMENT = "unknown"    # segment of a user without a complete vehicle
EPOCH = pd.Timestamp(0, tz="UTC")
TIME = "datetime64[us, UTC]"

STAGES = ("sent", "delivered", "opened", "clicked", "ordered")
OPENED_PATH, DELIVERED_PATH, SENT_PATH = "opened→ordered", "delivered→ordered", "sent→ordered"
PATHS = (OPENED_PATH, DELIVERED_PATH, SENT_PATH)
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
AOV_GROUPS = ("recipients", "recipients_outside_window", "non_recipients")

STATE_COLUMNS = ("window_start", "window_end", "segment", "treatment_id", *COUNT_FIELDS,
                 "clicks_capped", "alpha", "beta", "mean", "ci_low", "ci_high", "p_best",
                 "weight", "scope")
# `bandit_state.scope`: one sliding window's rows, or the one row per arm over all the data.
WINDOW_SCOPE, OVERALL_SCOPE = "window", "overall"


class FunnelCounts(NamedTuple):
    """Additive counts of one treatment (and segment) over some time span."""

    sent: int
    delivered: int
    delivery_failed: int
    views: int
    clicks: int


def add_counts(a: Sequence[int], b: Sequence[int]) -> List[int]:
    """Element-wise sum of two count vectors in `COUNT_FIELDS` order.

    >>> add_counts([1, 1, 0, 1, 0], FunnelCounts(2, 1, 1, 0, 0))
    [3, 2, 1, 1, 0]
    """
    return [int(x) + int(y) for x, y in zip(a, b)]


# --- treatment events: funnel consistency -----------------------------------------

class FunnelCheck(NamedTuple):
    """Treatment events split three ways.

    Attributes:
        rows: Events that count: each recipient's first event of each kind.
        rejected: Events that contradict the funnel, with a ``refusal`` column
            (``'click without send'``, ``'view before send'``, ...); not
            ``reason``, which a DELIVERY_FAILED event already carries.
        repeats: Later copies of a stage the recipient had already reached
            (a second open): reconciled, i.e. kept out of every count.
    """

    rows: pd.DataFrame
    rejected: pd.DataFrame
    repeats: pd.DataFrame


def funnel_refusal(kind: str, before_send: bool) -> str:
    """The reason `check_funnel` gives an event of ``kind`` with no send (or only a later one).

    Public so the streaming job's per-recipient check refuses with the very same words.

    >>> funnel_refusal(CLICKED, False), funnel_refusal(VIEWED, True)
    ('click without send', 'view before send')
    """
    return _NOUNS.get(kind, "") + (" before send" if before_send else " without send")


def check_funnel(events: pd.DataFrame) -> FunnelCheck:
    """Keeps the treatment events that are consistent with each recipient's send.

    An event other than SENT needs a SENT of the same (campaign, treatment,
    user) at or before its time; without one it is rejected with reason
    ``'<kind> without send'`` (no send at all) or ``'<kind> before send'``.
    Of the consistent events only the first of each kind per recipient is
    kept: a stage is reached once, so views never outnumber sends.

    >>> t = pd.Timestamp("2026-05-01", tz="UTC")
    >>> ev = pd.DataFrame({"event_id": ["a", "b", "c", "d"], "campaign_id": "C",
    ...     "treatment_id": "T", "user_id": ["u", "u", "u", "v"],
    ...     "kind": ["SENT", "VIEWED", "VIEWED", "CLICKED"], "event_time": [t, t, t, t]})
    >>> check = check_funnel(ev)
    >>> check.rows["event_id"].tolist(), check.rejected["refusal"].tolist(), len(check.repeats)
    (['a', 'b'], ['click without send'], 1)
    """
    key = list(RECIPIENT_KEY)
    ordered = events.sort_values(key + ["event_time", "event_id"], kind="stable")
    ordered = ordered.reset_index(drop=True)
    is_sent = ordered["kind"].eq(SENT).to_numpy(bool)
    sent_at = (ordered["event_time"].where(is_sent)
               .groupby([ordered[k] for k in key], sort=False).transform("min"))
    noun = ordered["kind"].map(_NOUNS).fillna("").astype(object)
    reason = np.where(sent_at.isna(), noun + " without send",
                      np.where(ordered["event_time"] < sent_at, noun + " before send", None))
    reason = np.where(is_sent, None, reason)
    bad = pd.notna(reason)
    consistent = ordered.loc[~bad]
    repeated = consistent.duplicated(key + ["kind"], keep="first").to_numpy(bool)
    rejected = ordered.loc[bad].assign(refusal=reason[bad])
    return FunnelCheck(consistent.loc[~repeated].reset_index(drop=True),
                       rejected.reset_index(drop=True),
                       consistent.loc[repeated].reset_index(drop=True))


def attach_segments(events: pd.DataFrame, users: pd.DataFrame,
                    attributes: Sequence[str]) -> pd.DataFrame:
    """Adds each event's ``segment`` from the user's vehicle, e.g. ``Ford|Mustang``.

    A user id listed twice takes its latest ``updated_at`` row; an unknown user
    or an incomplete vehicle gives ``NO_SEGMENT`` so its sends still count.
    """
    if len(users):
        latest = (users.sort_values("updated_at", ascending=False, kind="stable",
                                    na_position="last")
                  .drop_duplicates("user_id").set_index("user_id"))
        keys = segment_keys(latest, list(attributes))
        segment = keys.reindex(events["user_id"].to_numpy(object)).to_numpy(object)
    else:
        segment = np.full(len(events), None, dtype=object)
    return events.assign(segment=pd.Series(segment, index=events.index, dtype=object)
                         .fillna(NO_SEGMENT))


def common_bucket(window: pd.Timedelta, period: pd.Timedelta) -> pd.Timedelta:
    """The longest time bucket that never straddles a window boundary: gcd(window, period).

    Sliding windows start at multiples of the period (from the epoch) and end
    a window length later, so every boundary is a multiple of the gcd.

    >>> common_bucket(pd.Timedelta(days=7), pd.Timedelta(days=2))
    Timedelta('1 days 00:00:00')
    """
    unit = pd.Timedelta(seconds=1)
    if window < unit or period < unit or window % unit or period % unit:
        raise ValueError(f"window {window} and period {period} must be whole seconds >= 1 s")
    return unit * math.gcd(window // unit, period // unit)


def bucket_counts(events: pd.DataFrame, bucket: pd.Timedelta,
                  segmented: bool = False) -> pd.DataFrame:
    """Counts per (treatment, segment, time bucket), one column per kind.

    Buckets are aligned to the Unix epoch, like Beam's sliding windows, and the
    caller picks a bucket length dividing both the window size and the period
    (their gcd): then every instant of one bucket lies in exactly the same
    windows, and one pre-summed element per bucket replaces its many events.

    Returns:
        Columns treatment_id, segment (``ALL`` unless `segmented`),
        bucket_start and `COUNT_FIELDS`.

    >>> t = pd.to_datetime(["2026-05-01T03:00Z", "2026-05-01T20:00Z", "2026-05-02T01:00Z"])
    >>> ev = pd.DataFrame({"treatment_id": "T", "kind": ["SENT", "VIEWED", "SENT"],
    ...                    "event_time": t})
    >>> out = bucket_counts(ev, pd.Timedelta(days=1))
    >>> out["bucket_start"].dt.day.tolist(), out["sent"].tolist(), out["views"].tolist()
    ([1, 2], [1, 1], [1, 0])
    """
    index = (events["event_time"] - EPOCH) // bucket
    frame = pd.DataFrame({
        "treatment_id": events["treatment_id"].to_numpy(object),
        "segment": events["segment"].to_numpy(object) if segmented else ALL,
        "bucket_start": EPOCH + index.to_numpy("int64") * bucket,
        "kind": events["kind"].to_numpy(object),
    })
    counts = (frame.groupby(["treatment_id", "segment", "bucket_start", "kind"], sort=True)
              .size().unstack("kind", fill_value=0)
              .reindex(columns=list(KIND_FIELDS), fill_value=0)
              .rename(columns=KIND_FIELDS))
    counts.columns.name = None
    return counts.reset_index().astype({f: "int64" for f in COUNT_FIELDS})


# --- bandit state per window ---------------------------------------------------------

class WindowState(NamedTuple):
    """One window's `bandit_state` rows, rows refused (with a ``refusal``), clicks capped."""

    state: pd.DataFrame
    rejected: pd.DataFrame
    clicks_capped: int


def counts_frame(keyed: Iterable[Tuple[Tuple[str, str], Sequence[int]]],
                 summed: bool = False) -> pd.DataFrame:
    """``((treatment_id, segment), counts)`` pairs of one window as a frame, one row per key.

    With accumulating triggers a late pane restates its key's running totals,
    which only grow, so the largest row per key is the latest; with one pane
    per key this changes nothing. With `summed`, the pairs are disjoint parts
    (time buckets) and are added up instead.
    """
    rows = [(t, s, *counts) for (t, s), counts in keyed]
    frame = pd.DataFrame(rows, columns=["treatment_id", "segment", *COUNT_FIELDS])
    grouped = frame.groupby(["treatment_id", "segment"], as_index=False, sort=True)
    return grouped.sum() if summed else grouped.max()


def _count_reasons(counts: pd.DataFrame) -> np.ndarray:
    """Why a row's counts are impossible ('' if they are fine), via `bandit.validate_counts`.

    Clicks beyond views are not a refusal reason here: `window_state` caps them.
    Funnel counts are checked alone (paired with zero clicks) for sign and integrality.
    """
    _, reason = bandit.validate_counts(counts["views"], counts["clicks"])
    reason = np.where(reason == CountError.CLICKS_EXCEED_VIEWS.value, "", reason).astype(object)
    for field in ("sent", "delivered", "delivery_failed"):
        _, lone = bandit.validate_counts(counts[field], np.zeros(len(counts)))
        reason = np.where(reason == "", lone, reason)
    return reason


def _state_rows(counts: pd.DataFrame, post: bandit.Posterior, config: BanditConfig
                ) -> pd.DataFrame:
    """State rows of one group of competing arms (one segment)."""
    p_best = bandit.prob_best(post.alpha, post.beta, config.draws, config.seed)
    return counts.assign(**post._asdict(), p_best=p_best,
                         weight=bandit.allocation_weights(p_best, config.exploration_floor))


def window_state(counts: pd.DataFrame, window_start: pd.Timestamp, window_end: pd.Timestamp,
                 config: BanditConfig = BanditConfig(), scope: str = WINDOW_SCOPE
                 ) -> WindowState:
    """Posteriors, P(best) and allocation weights of every treatment in one window.

    Rows with negative or non-integer counts are refused (dead letters). Clicks
    beyond views happen legitimately at a window's edge (the open fell in the
    previous window, or was not tracked); they are capped at views and the
    number removed is reported, so no posterior sees an impossible count.
    Segment ``ALL`` rows compete across all traffic; with segments, each
    segment's arms are shrunk toward their treatment's overall rate
    (`bandit.shrink_to_parent`) and compete within the segment.

    Args:
        counts: Columns treatment_id, segment and `COUNT_FIELDS`, one row per key.
        window_start: Start of the window (inclusive).
        window_end: End of the window (exclusive).
        config: Prior, draws, seed and exploration floor.
        scope: ``WINDOW_SCOPE`` for a sliding window, ``OVERALL_SCOPE`` for the
            run's overall rows (the span of all the data).

    >>> counts = pd.DataFrame({"treatment_id": ["A", "B"], "segment": ALL, "sent": [10, 10],
    ...     "delivered": [9, 9], "delivery_failed": [1, 1], "views": [5, 3], "clicks": [2, 4]})
    >>> day = pd.Timedelta(days=1)
    >>> out = window_state(counts, EPOCH, EPOCH + day)
    >>> out.state[["treatment_id", "clicks", "clicks_capped", "alpha", "beta"]].to_numpy().tolist()
    [['A', 2, 0, 3.0, 4.0], ['B', 3, 1, 4.0, 1.0]]
    """
    reason = _count_reasons(counts)
    refused = reason != ""
    good = counts.loc[~refused].reset_index(drop=True)
    capped = np.maximum(good["clicks"].to_numpy(np.int64) - good["views"].to_numpy(np.int64), 0)
    good = good.astype({f: "int64" for f in COUNT_FIELDS})
    good["clicks"] = good["clicks"] - capped
    good["clicks_capped"] = capped
    summed = COUNT_FIELDS + ("clicks_capped",)
    overall = good.groupby("treatment_id", as_index=False, sort=True)[list(summed)].sum()
    frames = []
    if len(overall):
        config.check_arms(len(overall))
        post = bandit.posterior(overall["views"], overall["clicks"], config)
        frames.append(_state_rows(overall.assign(segment=ALL), post, config))
        parent = pd.Series(post.mean, index=overall["treatment_id"])
        for _, seg in good.loc[good["segment"] != ALL].groupby("segment", sort=True):
            seg = seg.sort_values("treatment_id").reset_index(drop=True)
            rate = parent.reindex(seg["treatment_id"]).to_numpy(float)
            post_seg = bandit.shrink_to_parent(seg["views"], seg["clicks"], rate,
                                               config.segment_strength, config.interval)
            frames.append(_state_rows(seg, post_seg, config))
    state = (pd.concat(frames, ignore_index=True) if frames
             else pd.DataFrame(columns=[c for c in STATE_COLUMNS
                                        if not c.startswith("window") and c != "scope"]))
    state = state.assign(window_start=window_start, window_end=window_end, scope=scope)
    return WindowState(state[list(STATE_COLUMNS)],
                       counts.loc[refused].assign(refusal=reason[refused]).reset_index(drop=True),
                       int(capped.sum()))


def complete_windows(state: pd.DataFrame) -> pd.DataFrame:
    """`bandit_state` window rows lying within the span of the data.

    Sliding windows over bounded input include some that start before the
    first send or end after the last one: they hold only the data's first or
    last days, so their intervals widen for no reason a marketer should see.
    The span comes from the overall rows (``scope`` ``overall``: first send's
    bucket to the last one's end); without them, from the windows themselves
    (the last complete window ends at the latest end minus (size - period)).
    When the data are shorter than one window, no window lies within them:
    the overall rows are then the headline.

    >>> ends = pd.to_datetime(["2026-05-08", "2026-05-09", "2026-05-10"], utc=True)
    >>> state = pd.DataFrame({"window_start": ends - pd.Timedelta(days=2), "window_end": ends})
    >>> complete_windows(state)["window_end"].dt.day.tolist()
    [8, 9]
    >>> overall = pd.DataFrame({"window_start": [ends[0] - pd.Timedelta(days=1)],
    ...     "window_end": [ends[2]], "scope": OVERALL_SCOPE})
    >>> both = pd.concat([state.assign(scope=WINDOW_SCOPE), overall])
    >>> complete_windows(both)["window_end"].dt.day.tolist()
    [9, 10]
    """
    if not len(state):
        return state
    if "scope" in state.columns:
        overall = state.loc[state["scope"] == OVERALL_SCOPE]
        windows = state.loc[state["scope"] != OVERALL_SCOPE]
        if len(overall):
            first, last = overall["window_start"].min(), overall["window_end"].max()
            return windows.loc[(windows["window_start"] >= first)
                               & (windows["window_end"] <= last)]
        state = windows
    ends = np.sort(state["window_end"].unique())
    if len(ends) < 2:
        return state
    size = (state["window_end"] - state["window_start"]).max()
    period = pd.Timedelta(np.diff(ends).min())
    last = pd.Timestamp(ends[-1]) - (size - period)
    return state.loc[state["window_end"] <= last]


def overall_rows(state: pd.DataFrame) -> pd.DataFrame:
    """The ``overall`` rows of `bandit_state` (one per arm over all the data)."""
    if "scope" not in state.columns:
        return state.iloc[0:0]
    return state.loc[state["scope"] == OVERALL_SCOPE]


# --- campaign report: recipients, orders, attribution ------------------------------------

def recipients(events: pd.DataFrame) -> pd.DataFrame:
    """One row per recipient with the first time it reached each stage.

    Args:
        events: Funnel-checked treatment events (`check_funnel` rows).

    Returns:
        Columns campaign_id, treatment_id, user_id, sent_at, delivered_at,
        failed_at, opened_at, clicked_at (NaT where not reached) and
        failure_reason (of the first DELIVERY_FAILED, ``'unknown'`` if unstated).
    """
    key = list(RECIPIENT_KEY)
    columns = {SENT: "sent_at", DELIVERED: "delivered_at", DELIVERY_FAILED: "failed_at",
               VIEWED: "opened_at", CLICKED: "clicked_at"}
    if not len(events):
        empty = pd.DataFrame({k: pd.Series(dtype=object) for k in key + ["failure_reason"]})
        return empty.assign(**{c: pd.Series(dtype=TIME) for c in columns.values()})
    times = (events.assign(event_time=events["event_time"].astype(TIME))
             .groupby(key + ["kind"], sort=True)["event_time"].min()
             .unstack("kind").reindex(columns=list(columns)).rename(columns=columns))
    times.columns.name = None
    times = times.astype(TIME)
    failed = events.loc[events["kind"].eq(DELIVERY_FAILED)].sort_values("event_time",
                                                                        kind="stable")
    reason_col = failed["reason"] if "reason" in failed.columns else pd.Series(
        None, index=failed.index, dtype=object)
    reasons = (failed.assign(reason=reason_col.astype(object).fillna("unknown"))
               .drop_duplicates(key).set_index(key)["reason"])
    out = times.join(reasons.rename("failure_reason")).reset_index()
    return out.loc[out["sent_at"].notna()].reset_index(drop=True)


def orders_from_events(events: pd.DataFrame) -> pd.DataFrame:
    """One row per ``order_id``: buyer, time of its first event, revenue.

    The same order arrives under up to three event names; it is one order.
    Revenue sums its distinct lines (order_id, sku), each line's price times
    quantity taken from the first event that states them (quantity defaults to
    1, an unstated price to 0).

    >>> t = pd.Timestamp("2026-05-01", tz="UTC")
    >>> ev = pd.DataFrame({"order_id": ["O", "O", "O"], "sku": ["A", "A", "B"], "user_id": "u",
    ...     "event_name": ["Placed Order", "Ordered Product", "Ordered Product"],
    ...     "event_time": [t, t, t], "price": [100.0, 100.0, 50.0], "quantity": [2, 2, None]})
    >>> orders_from_events(ev)[["order_id", "revenue", "lines"]].to_numpy().tolist()
    [['O', 250.0, 2]]
    """
    orders = events.loc[events["event_name"].isin(ORDER_EVENT_NAMES)] if len(events) else events
    if not len(orders):
        return pd.DataFrame({"order_id": pd.Series(dtype=object),
                             "user_id": pd.Series(dtype=object),
                             "order_time": pd.Series(dtype=TIME),
                             "revenue": pd.Series(dtype=float),
                             "lines": pd.Series(dtype="int64")})
    orders = orders.assign(event_time=orders["event_time"].astype(TIME),
                           price=pd.to_numeric(orders["price"], errors="coerce"),
                           quantity=pd.to_numeric(orders["quantity"], errors="coerce"))
    orders = orders.sort_values(["order_id", "sku", "event_time"], kind="stable")
    lines = orders.groupby(["order_id", "sku"], sort=True).agg(
        user_id=("user_id", "first"), event_time=("event_time", "min"),
        price=("price", "first"), quantity=("quantity", "first"))
    lines["value"] = lines["price"].fillna(0.0) * lines["quantity"].fillna(1.0)
    per_order = lines.reset_index().sort_values(["order_id", "event_time"], kind="stable")
    return (per_order.groupby("order_id", sort=True)
            .agg(user_id=("user_id", "first"), order_time=("event_time", "min"),
                 revenue=("value", "sum"), lines=("sku", "size"))
            .reset_index())


def _user_key(frame: pd.DataFrame) -> pd.DataFrame:
    """``user_id`` as plain objects: merge_asof refuses to match a str column with an object one."""
    return frame.assign(user_id=frame["user_id"].astype(object))


def attribute_orders(recips: pd.DataFrame, orders: pd.DataFrame,
                     window: pd.Timedelta) -> pd.DataFrame:
    """Last touch: each order goes to its buyer's latest send at most `window` before it.

    The path says what the recipient had done before ordering: opened the
    e-mail (a tracked VIEWED before the order), else had it delivered, else
    only sent.

    Returns:
        One row per attributed order: order_id, user_id, campaign_id,
        treatment_id, sent_at, order_time, revenue, path, hours_to_order.
    """
    columns = ["order_id", "user_id", "campaign_id", "treatment_id", "sent_at", "order_time",
               "revenue", "path", "hours_to_order"]
    if not len(recips) or not len(orders):
        return pd.DataFrame({c: pd.Series(dtype=object) for c in columns})
    left = _user_key(orders).sort_values(["order_time", "order_id"], kind="stable")
    right = _user_key(recips).sort_values(["sent_at", "campaign_id", "treatment_id"],
                                          kind="stable")
    matched = pd.merge_asof(left, right, left_on="order_time", right_on="sent_at",
                            by="user_id", direction="backward", tolerance=window)
    matched = matched.loc[matched["sent_at"].notna()].reset_index(drop=True)
    opened = (matched["opened_at"] <= matched["order_time"]).to_numpy(bool)
    delivered = matched["delivered_at"].notna().to_numpy(bool)
    matched["path"] = np.select([opened, delivered], [OPENED_PATH, DELIVERED_PATH], SENT_PATH)
    matched["hours_to_order"] = ((matched["order_time"] - matched["sent_at"])
                                 / pd.Timedelta(hours=1))
    return matched[columns]


def ordered_after_send(recips: pd.DataFrame, orders: pd.DataFrame,
                       window: pd.Timedelta) -> np.ndarray:
    """Whether each recipient (in `recips` order) ordered within `window` after its send."""
    if not len(recips) or not len(orders):
        return np.zeros(len(recips), dtype=bool)
    left = _user_key(recips[["user_id", "sent_at"]]).assign(_row=np.arange(len(recips)))
    right = _user_key(orders[["user_id", "order_time"]]).sort_values("order_time", kind="stable")
    matched = pd.merge_asof(left.sort_values("sent_at", kind="stable"), right,
                            left_on="sent_at", right_on="order_time", by="user_id",
                            direction="forward", tolerance=window)
    flags = np.zeros(len(recips), dtype=bool)
    flags[matched["_row"].to_numpy(np.int64)] = matched["order_time"].notna().to_numpy(bool)
    return flags


class CampaignPartials(NamedTuple):
    """Additive pieces of the report from one shard of users; `merge_partials` adds them up.

    Attributes:
        funnel: Recipients per (campaign_id, treatment_id) at each of `STAGES`,
            with the first and last send time.
        failures: Delivery failures per (campaign_id, reason).
        attributed: One row per attributed order (`attribute_orders`).
        orders: One row per order: order_id, order_time, revenue, recipient (the
            buyer was sent some e-mail), attributed.
        sends: The compact send log off-policy evaluation reads
            (`models.sends.send_log`); empty unless the caller adds it.
    """

    funnel: pd.DataFrame
    failures: pd.DataFrame
    attributed: pd.DataFrame
    orders: pd.DataFrame
    sends: pd.DataFrame = pd.DataFrame()


def campaign_partials(treatment_events: pd.DataFrame, order_events: pd.DataFrame,
                      window: pd.Timedelta) -> CampaignPartials:
    """The report's partial sums for users whose events are all in these frames.

    Args:
        treatment_events: Funnel-checked treatment events of some users.
        order_events: Deduplicated order events of the same users.
        window: Attribution window after a send.
    """
    recips = recipients(treatment_events)
    orders = orders_from_events(order_events)
    recips["ordered"] = ordered_after_send(recips, orders, window)
    funnel = (recips.assign(sent=True, delivered=recips["delivered_at"].notna(),
                            opened=recips["opened_at"].notna(),
                            clicked=recips["clicked_at"].notna(),
                            first_sent=recips["sent_at"], last_sent=recips["sent_at"])
              .groupby(["campaign_id", "treatment_id"], sort=True)
              .agg(**{s: (s, "sum") for s in STAGES}, first_sent=("first_sent", "min"),
                   last_sent=("last_sent", "max"))
              .reset_index())
    failed = recips.loc[recips["failed_at"].notna()]
    failures = (failed.groupby(["campaign_id", "failure_reason"], sort=True).size()
                .rename("failures").reset_index().rename(columns={"failure_reason": "reason"}))
    attributed = attribute_orders(recips, orders, window)
    order_rows = orders.assign(
        recipient=orders["user_id"].isin(recips["user_id"]).to_numpy(bool),
        attributed=orders["order_id"].isin(attributed["order_id"]).to_numpy(bool),
    )[["order_id", "order_time", "revenue", "recipient", "attributed"]]
    return CampaignPartials(funnel, failures, attributed, order_rows)


def merge_partials(parts: Iterable[CampaignPartials]) -> CampaignPartials:
    """All shards' partials as one (frames concatenated; sums happen in `campaign_tables`)."""
    parts = list(parts)
    if not parts:
        empty = pd.DataFrame()
        return CampaignPartials(empty, empty, empty, empty, empty)
    return CampaignPartials(*(pd.concat([getattr(p, f) for p in parts], ignore_index=True)
                              for f in CampaignPartials._fields))


# --- campaign report: tables -----------------------------------------------------------------

def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0 where the denominator is 0."""
    num = np.asarray(numerator, dtype=float)
    den = np.asarray(denominator, dtype=float)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def _with_totals(frame: pd.DataFrame, keys: Sequence[str], sums: Sequence[str]) -> pd.DataFrame:
    """Adds total rows: each key in turn (from the last) replaced by `ALL` and summed over."""
    frames = [frame]
    for n in range(len(keys) - 1, -1, -1):
        kept = list(keys[:n])
        grouped = (frame.groupby(kept, as_index=False, sort=True)[list(sums)].sum() if kept
                   else frame[list(sums)].sum().to_frame().T)
        frames.append(grouped.assign(**{k: ALL for k in keys[n:]}))
    return pd.concat(frames, ignore_index=True)[list(keys) + list(sums)]


def funnel_table(funnel: pd.DataFrame) -> pd.DataFrame:
    """`campaign_funnel`: recipients per stage, share of sent and step conversion.

    Rows per (campaign_id, treatment_id), per campaign (treatment ``*``) and in
    total (``*``, ``*``). rate_of_sent = stage / sent (how SPEC §5 quotes its
    field figures); rate_of_previous = stage / previous stage.
    """
    keys = ["campaign_id", "treatment_id"]
    if not len(funnel):
        funnel = pd.DataFrame({**{k: pd.Series(dtype=object) for k in keys},
                               **{s: pd.Series(dtype="int64") for s in STAGES}})
    totals = _with_totals(funnel, keys, STAGES)
    long = totals.melt(id_vars=keys, value_vars=list(STAGES), var_name="stage",
                       value_name="recipients")
    long["stage_order"] = long["stage"].map({s: i + 1 for i, s in enumerate(STAGES)})
    long = long.sort_values(keys + ["stage_order"], kind="stable").reset_index(drop=True)
    long["recipients"] = long["recipients"].astype("int64")
    sent = long.groupby(keys, sort=False)["recipients"].transform("first")
    previous = long.groupby(keys, sort=False)["recipients"].shift(1).fillna(sent)
    long["rate_of_sent"] = _ratio(long["recipients"], sent)
    long["rate_of_previous"] = _ratio(long["recipients"], previous)
    return long[keys + ["stage", "stage_order", "recipients", "rate_of_sent",
                        "rate_of_previous"]]


def revenue_by_path_table(attributed: pd.DataFrame, campaigns: Sequence[str]) -> pd.DataFrame:
    """`campaign_revenue_by_path`: attributed orders and revenue per conversion path.

    Every campaign sent (and the total ``*``) lists all three paths, zeros
    included, with the path's share of the campaign's attributed revenue and
    its AOV.
    """
    columns = ["campaign_id", "path", "orders", "revenue", "share_of_revenue", "aov"]
    campaigns = sorted(set(campaigns) | set(attributed["campaign_id"]))
    grid = pd.MultiIndex.from_product([campaigns + [ALL], list(PATHS)],
                                      names=["campaign_id", "path"])
    if len(attributed):
        rows = attributed.assign(orders=1)[["campaign_id", "path", "orders", "revenue"]]
        rows = pd.concat([rows, rows.assign(campaign_id=ALL)], ignore_index=True)
        sums = rows.groupby(["campaign_id", "path"])[["orders", "revenue"]].sum()
    else:
        sums = pd.DataFrame(columns=["orders", "revenue"])
    table = sums.reindex(grid, fill_value=0).reset_index()
    table["orders"] = table["orders"].astype("int64")
    table["revenue"] = table["revenue"].astype(float)
    total = table.groupby("campaign_id", sort=False)["revenue"].transform("sum")
    table["share_of_revenue"] = _ratio(table["revenue"], total)
    table["aov"] = _ratio(table["revenue"], table["orders"])
    return table[columns]


def aov_table(orders: pd.DataFrame, funnel: pd.DataFrame, window: pd.Timedelta) -> pd.DataFrame:
    """`campaign_aov`: average order value of recipients versus non-recipients.

    Both groups are taken over the same span, from the first send to the last
    send plus the attribution window, so seasonality does not pose as a
    campaign effect. ``recipients`` are attributed orders, ``non_recipients``
    orders by users sent nothing, and ``recipients_outside_window`` the rest.
    """
    columns = ["group", "orders", "revenue", "aov", "median_order_value", "span_start",
               "span_end"]
    if not len(funnel):
        span_start = span_end = pd.NaT
        in_span = orders.iloc[0:0]
    else:
        span_start = pd.Timestamp(funnel["first_sent"].min())
        span_end = pd.Timestamp(funnel["last_sent"].max()) + window
        times = orders["order_time"]
        in_span = orders.loc[((times >= span_start) & (times <= span_end)).to_numpy(bool)]
    if len(in_span):
        group = np.select([in_span["attributed"].to_numpy(bool),
                           in_span["recipient"].to_numpy(bool)],
                          [AOV_GROUPS[0], AOV_GROUPS[1]], AOV_GROUPS[2])
        stats = (in_span.assign(group=group).groupby("group")["revenue"]
                 .agg(orders="size", revenue="sum", median_order_value="median"))
    else:
        stats = pd.DataFrame(columns=["orders", "revenue", "median_order_value"])
    table = stats.reindex(list(AOV_GROUPS)).rename_axis("group").reset_index()
    table["orders"] = table["orders"].fillna(0).astype("int64")
    table["revenue"] = table["revenue"].fillna(0.0).astype(float)
    table["median_order_value"] = table["median_order_value"].astype(float)
    table["aov"] = _ratio(table["revenue"], table["orders"])
    table["span_start"] = pd.Series([span_start] * len(table), dtype=TIME)
    table["span_end"] = pd.Series([span_end] * len(table), dtype=TIME)
    return table[columns]


def hour_edges(window: pd.Timedelta) -> np.ndarray:
    """Histogram edges in hours: fine in the first day, then daily, up to the window.

    >>> hour_edges(pd.Timedelta(days=3)).tolist()
    [0.0, 1.0, 3.0, 6.0, 12.0, 24.0, 48.0, 72.0]
    """
    hours = window / pd.Timedelta(hours=1)
    first_day = [e for e in (0.0, 1.0, 3.0, 6.0, 12.0, 24.0) if e < hours]
    days = np.arange(24.0, hours, 24.0)[1:] if hours > 24 else np.array([])
    return np.unique(np.concatenate([first_day, days, [hours]]))


def time_to_order_table(attributed: pd.DataFrame, window: pd.Timedelta) -> pd.DataFrame:
    """`campaign_time_to_order`: hours from send to attributed order, per campaign and in total.

    Quantile rows (kind ``quantile``, label ``p50``, hours_low == hours_high ==
    the quantile, orders == how many orders it summarises) and histogram rows
    (kind ``histogram``, [hours_low, hours_high) bins of `hour_edges`, the last
    bin closed).
    """
    columns = ["campaign_id", "kind", "label", "q", "hours_low", "hours_high", "orders"]
    edges = hour_edges(window)
    frames = []
    groups = [(ALL, attributed)]
    if len(attributed):
        groups += list(attributed.groupby("campaign_id", sort=True))
    for campaign, rows in groups:
        hours = rows["hours_to_order"].to_numpy(float) if len(rows) else np.array([])
        n = hours.size
        values = np.quantile(hours, QUANTILES) if n else np.full(len(QUANTILES), np.nan)
        frames.append(pd.DataFrame({
            "campaign_id": campaign, "kind": "quantile",
            "label": [f"p{round(q * 100)}" for q in QUANTILES], "q": list(QUANTILES),
            "hours_low": values, "hours_high": values, "orders": n}))
        counts, _ = np.histogram(hours, bins=edges)
        frames.append(pd.DataFrame({
            "campaign_id": campaign, "kind": "histogram",
            "label": [f"{lo:g}–{hi:g} h" for lo, hi in zip(edges[:-1], edges[1:])],
            "q": np.nan, "hours_low": edges[:-1], "hours_high": edges[1:], "orders": counts}))
    table = pd.concat(frames, ignore_index=True)
    table["orders"] = table["orders"].astype("int64")
    return table[columns]


def delivery_failures_table(failures: pd.DataFrame, funnel: pd.DataFrame) -> pd.DataFrame:
    """`campaign_delivery_failures`: failed deliveries per reason, per campaign and in total.

    share_of_failures = failures / the campaign's failures; share_of_sent =
    failures / the campaign's sends.
    """
    columns = ["campaign_id", "reason", "failures", "share_of_failures", "share_of_sent"]
    if not len(failures):
        return pd.DataFrame({"campaign_id": pd.Series(dtype=object),
                             "reason": pd.Series(dtype=object),
                             "failures": pd.Series(dtype="int64"),
                             "share_of_failures": pd.Series(dtype=float),
                             "share_of_sent": pd.Series(dtype=float)})
    sums = failures.groupby(["campaign_id", "reason"], as_index=False)["failures"].sum()
    table = pd.concat([sums, sums.groupby("reason", as_index=False)["failures"].sum()
                       .assign(campaign_id=ALL)], ignore_index=True)
    sent = funnel.groupby("campaign_id")["sent"].sum()
    sent[ALL] = sent.sum()
    table["failures"] = table["failures"].astype("int64")
    table["share_of_failures"] = _ratio(
        table["failures"], table.groupby("campaign_id")["failures"].transform("sum"))
    table["share_of_sent"] = _ratio(table["failures"],
                                    sent.reindex(table["campaign_id"]).fillna(0).to_numpy())
    return (table.sort_values(["campaign_id", "failures", "reason"],
                              ascending=[True, False, True], kind="stable")
            .reset_index(drop=True)[columns])


def campaign_tables(parts: CampaignPartials, window: pd.Timedelta) -> Dict[str, pd.DataFrame]:
    """The five SPEC §5 tables from all shards' partials, keyed by table name."""
    funnel = parts.funnel
    if len(funnel):
        funnel = (funnel.groupby(["campaign_id", "treatment_id"], as_index=False, sort=True)
                  .agg(**{s: (s, "sum") for s in STAGES}, first_sent=("first_sent", "min"),
                       last_sent=("last_sent", "max")))
    attributed = parts.attributed
    if not len(attributed):
        attributed = attribute_orders(pd.DataFrame(), pd.DataFrame(), window)
    orders = parts.orders if len(parts.orders) else pd.DataFrame(
        {"order_time": pd.Series(dtype=TIME), "revenue": pd.Series(dtype=float),
         "recipient": pd.Series(dtype=bool), "attributed": pd.Series(dtype=bool)})
    return {
        "campaign_funnel": funnel_table(funnel),
        "campaign_revenue_by_path": revenue_by_path_table(
            attributed, funnel["campaign_id"] if len(funnel) else []),
        "campaign_aov": aov_table(orders, funnel, window),
        "campaign_time_to_order": time_to_order_table(attributed, window),
        "campaign_delivery_failures": delivery_failures_table(parts.failures, funnel),
    }


def run_verdict(gate_counter: str, counters: Mapping[str, int],
                reconciled: Sequence[str]) -> health.Verdict:
    """Publish a report run only when it produced something and its input counts add up (SPEC §7).

    A zero `gate_counter` (no bandit rows, no recipients) is an alarm, not a
    success; so is a table whose read count is not explained by processed +
    dead-lettered + deduplicated rows.

    >>> run_verdict("bandit_state.rows", {}, ()).message
    'alarm: bandit_state.rows is 0'
    >>> run_verdict("bandit_state.rows", {"bandit_state.rows": 3, "t.read": 2}, ("t",)).message
    "alarm: counts do not reconcile {'t': 2}"
    """
    produced = int(counters.get(gate_counter, 0))
    if produced == 0:
        return health.Verdict(health.GATED, f"alarm: {gate_counter} is 0")
    gaps = {name: r["unexplained"] for name, r in health.reconcile(counters, reconciled).items()
            if r["unexplained"]}
    if gaps:
        return health.Verdict(health.GATED, f"alarm: counts do not reconcile {gaps}")
    return health.Verdict(health.PUBLISHED, f"published: {gate_counter} = {produced:,}")
