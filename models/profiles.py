"""Per-user signals and the clean-up that precedes scoring: deduplication and joins.

Pure pandas over one shard of users and their events, so the Beam layer only
routes shards and these functions decide.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import pandas as pd

from models.config import RecsConfig
from models.contracts import CART, VIEW
from models.popularity import order_lines


class Deduped(NamedTuple):
    """Rows kept and how many were dropped as duplicates."""

    rows: pd.DataFrame
    duplicates: int


def dedupe_events(events: pd.DataFrame) -> Deduped:
    """One row per ``event_id`` (Pub/Sub and exports redeliver); the earliest copy wins."""
    ordered = events.sort_values(["event_id", "event_time"], kind="stable")
    kept = ordered.drop_duplicates("event_id", keep="first").reset_index(drop=True)
    return Deduped(kept, len(events) - len(kept))


def mark_duplicate_users(users: pd.DataFrame, key: str) -> pd.DataFrame:
    """Flags all but one user per ``key`` value in ``is_duplicate``.

    The latest ``updated_at`` wins, then the lowest ``user_id``. Duplicates are
    kept (flagged) because their past orders still count toward popularity;
    only recommendations are one per e-mail (rule 14) and per user id.
    """
    floor = pd.Timestamp("1970-01-01", tz="UTC")
    flagged = (users["is_duplicate"].astype(bool) if "is_duplicate" in users.columns
               else pd.Series(False, index=users.index))
    ordered = users.assign(_t=users["updated_at"].fillna(floor), is_duplicate=flagged)
    ordered = ordered.sort_values([key, "is_duplicate", "_t", "user_id"],
                                  ascending=[True, True, False, True], kind="stable")
    ordered["is_duplicate"] = ordered["is_duplicate"] | ordered[key].duplicated(keep="first")
    return ordered.drop(columns="_t").reset_index(drop=True)


def _sku_tuples(frame: pd.DataFrame, index: pd.Index) -> pd.Series:
    """Distinct SKUs per user as sorted tuples, aligned to ``index`` (empty where none)."""
    grouped = frame.groupby("user_id")["sku"].agg(lambda s: tuple(sorted(set(s))))
    return grouped.reindex(index).map(lambda v: v if isinstance(v, tuple) else ())


def attach_signals(users: pd.DataFrame, events: pd.DataFrame, as_of: pd.Timestamp,
                   config: RecsConfig) -> pd.DataFrame:
    """Users with the SKUs they bought (exclusion window), carted and viewed (intent window).

    Events after ``as_of`` are ignored so that a rerun with the same reference
    time gives the same answer.
    """
    times = events["event_time"]
    exclusion_start = as_of - pd.Timedelta(days=config.rules.exclusion_days)
    intent_start = as_of - pd.Timedelta(days=config.scoring.intent_window_days)
    lines = order_lines(events)
    bought = lines.loc[(lines["event_time"] >= exclusion_start) & (lines["event_time"] <= as_of)]
    recent = events.loc[(times >= intent_start) & (times <= as_of)]
    index = pd.Index(users["user_id"])
    out = users.copy()
    out["bought"] = _sku_tuples(bought, index).to_numpy(object)
    out["carted"] = _sku_tuples(recent.loc[recent["event_name"] == CART], index).to_numpy(object)
    out["viewed"] = _sku_tuples(recent.loc[recent["event_name"] == VIEW], index).to_numpy(object)
    return out


def orders_with_segments(events: pd.DataFrame, users: pd.DataFrame,
                         attributes: Sequence[str]) -> pd.DataFrame:
    """Distinct order lines with the buyer's segment attributes (missing for unknown buyers).

    An order by a user who is not in ``users`` still counts, at the global level.
    """
    lines = order_lines(events)
    profile = users.sort_values("is_duplicate", kind="stable").drop_duplicates(
        "user_id").set_index("user_id")[list(attributes)]
    joined = profile.reindex(lines["user_id"].to_numpy(object))
    for attr in attributes:
        lines[attr] = joined[attr].to_numpy(object)
    return lines
