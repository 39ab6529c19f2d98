"""Run-to-run stability of published recommendations (SPEC §3 stability report).

Compares the previous and the new output user by user and position by
position, the way the field's daily refresh was reported: users common,
gained and lost; users by number of changed positions; change rate per
position; average recommended price before and after; users whose scores rose
or fell and the mean score change.

:func:`explain_changes` says why, as the field did by hand before each launch
(SPEC §10): the largest SKU swaps with the popularity evidence behind them,
the users lost with their reason, and the input volume per event name against
the last run. Its rows are the ``stability_changes`` table.
"""
from __future__ import annotations

import json
from typing import Any, Dict, List, Mapping, Optional

import numpy as np
import pandas as pd

# Why a user of the previous output has no row now (``lost_users``), checked in this order.
EMAIL_CHANGED = "e-mail changed"
VEHICLE_CHANGED = "vehicle changed"
TOO_FEW_PARTS = "fewer eligible parts than recommendations"
DEAD_LETTERED = "newly dead-lettered"
REMOVED = "e-mail removed (not in the users input)"
UNSERVED_REASON = "fewer eligible parts than recommendations at every level"
ORDER_EVENTS = ("Placed Order", "Ordered Product", "Consumer Website Order")
EVENT_COUNTER = "events.name."
CHANGE_COLUMNS = ["rank", "kind", "subject", "users", "value_before", "value_after", "detail"]


def stability_report(previous: pd.DataFrame, current: pd.DataFrame, n: int) -> Dict[str, float]:
    """Stability figures of ``current`` against ``previous`` (both SPEC §3 rows keyed by email).

    A position counts as changed when the SKU at that rank differs, so a swap
    of ranks 1 and 2 changes two positions; the per-position rates then add up
    to the mean number of changed positions per common user.

    >>> old = pd.DataFrame({"email_lower": ["a", "b"], "rec_part_1": ["X", "Y"],
    ...                     "rec1_price": [100.0, 200.0]})
    >>> new = pd.DataFrame({"email_lower": ["b", "c"], "rec_part_1": ["Z", "Y"],
    ...                     "rec1_price": [300.0, 200.0]})
    >>> r = stability_report(old, new, 1)
    >>> (r["users_common"], r["users_gained"], r["users_lost"], r["changed_1_share"])
    (1, 1, 1, 1.0)
    """
    parts = [f"rec_part_{i}" for i in range(1, n + 1)]
    prices = [f"rec{i}_price" for i in range(1, n + 1)]
    old = previous.set_index("email_lower")
    new = current.set_index("email_lower")
    common = old.index.intersection(new.index)
    changed = (old.loc[common, parts].to_numpy(object)
               != new.loc[common, parts].to_numpy(object))
    per_user = changed.sum(axis=1)
    report: Dict[str, float] = {
        "users_previous": int(len(old)),
        "users_current": int(len(new)),
        "users_common": int(len(common)),
        "users_gained": int(len(new.index.difference(old.index))),
        "users_lost": int(len(old.index.difference(new.index))),
    }
    for k in range(n + 1):
        report[f"changed_{k}_share"] = float((per_user == k).mean()) if len(common) else 0.0
    for i in range(n):
        report[f"position_{i + 1}_change_rate"] = (float(changed[:, i].mean())
                                                   if len(common) else 0.0)
    report["avg_price_before"] = _mean_price(previous, prices)
    report["avg_price_after"] = _mean_price(current, prices)
    report.update(score_changes(old.loc[common], new.loc[common], n))
    return report


def score_changes(old: pd.DataFrame, new: pd.DataFrame, n: int) -> Dict[str, float]:
    """Common users (aligned rows) whose mean recommendation score rose or fell, and the
    mean change; zeros when the outputs carry no score columns.

    >>> old = pd.DataFrame({"rec1_score": [1.0, 2.0, 3.0]})
    >>> new = pd.DataFrame({"rec1_score": [1.5, 2.0, 2.0]})
    >>> score_changes(old, new, 1)
    {'users_score_up': 1, 'users_score_down': 1, 'mean_score_change': -0.16666666666666666}
    """
    scores = [f"rec{i}_score" for i in range(1, n + 1)]
    if not len(old) or not set(scores) <= set(old.columns) & set(new.columns):
        return {"users_score_up": 0, "users_score_down": 0, "mean_score_change": 0.0}
    delta = (new[scores].to_numpy(float).mean(axis=1) - old[scores].to_numpy(float).mean(axis=1))
    delta = np.where(np.isfinite(delta), delta, 0.0)
    tolerance = 1e-9
    return {"users_score_up": int((delta > tolerance).sum()),
            "users_score_down": int((delta < -tolerance).sum()),
            "mean_score_change": float(delta.mean())}


def _mean_price(frame: pd.DataFrame, prices) -> float:
    values = frame[prices].to_numpy(float) if len(frame) else np.array([])
    return float(values.mean()) if values.size else 0.0


def sku_swaps(previous: pd.DataFrame, current: pd.DataFrame, n: int,
              popularity_before: Optional[pd.DataFrame] = None,
              popularity_now: Optional[pd.DataFrame] = None, top: int = 10) -> pd.DataFrame:
    """The largest SKU swaps: which SKU replaced which, for how many users, and why.

    A swap is one position of a common user (same e-mail) whose SKU is no longer
    in the user's list, replaced by a SKU that was not in it before (a reordering
    is not a swap). The evidence is each SKU's time-decayed orders at the global
    level of ``segment_popularity`` (``weight``), before and now.

    >>> old = pd.DataFrame({"email_lower": ["a", "b", "c"], "rec_part_1": ["X", "X", "Y"]})
    >>> new = pd.DataFrame({"email_lower": ["a", "b", "c"], "rec_part_1": ["Z", "Z", "Y"]})
    >>> sku_swaps(old, new, 1)[["old_sku", "new_sku", "users"]].to_dict("records")
    [{'old_sku': 'X', 'new_sku': 'Z', 'users': 2}]
    """
    parts = [f"rec_part_{i}" for i in range(1, n + 1)]
    columns = ["old_sku", "new_sku", "users", "old_orders_before", "old_orders_now",
               "new_orders_before", "new_orders_now"]
    old = previous.set_index("email_lower")
    new = current.set_index("email_lower")
    common = old.index.intersection(new.index)
    if not len(common):
        return pd.DataFrame(columns=columns)
    before = old.loc[common, parts].to_numpy(object)
    after = new.loc[common, parts].to_numpy(object)
    pairs = []
    for i in range(n):
        kept_old = (after == before[:, [i]]).any(axis=1)    # the old SKU moved, not left
        had_new = (before == after[:, [i]]).any(axis=1)     # the new SKU was there already
        swapped = (before[:, i] != after[:, i]) & ~kept_old & ~had_new
        pairs.append(pd.DataFrame({"old_sku": before[swapped, i], "new_sku": after[swapped, i]}))
    found = pd.concat(pairs, ignore_index=True)
    if found.empty:
        return pd.DataFrame(columns=columns)
    counted = (found.groupby(["old_sku", "new_sku"]).size().rename("users").reset_index()
               .sort_values(["users", "old_sku", "new_sku"], ascending=[False, True, True])
               .head(top).reset_index(drop=True))
    was, now = _global_orders(popularity_before), _global_orders(popularity_now)
    for sku, prefix in (("old_sku", "old"), ("new_sku", "new")):
        counted[f"{prefix}_orders_before"] = counted[sku].map(was).astype(float)
        counted[f"{prefix}_orders_now"] = counted[sku].map(now).astype(float)
    return counted[columns]


def _global_orders(popularity: Optional[pd.DataFrame]) -> Dict[str, float]:
    if popularity is None or popularity.empty:
        return {}
    rows = popularity[popularity["level"] == "global"]
    return dict(zip(rows["sku"], rows["weight"].astype(float)))


def lost_users(previous: pd.DataFrame, current: pd.DataFrame,
               dead_letters: Optional[pd.DataFrame] = None,
               vehicle: tuple = ("make", "model", "year")) -> pd.DataFrame:
    """Each user of ``previous`` with no row in ``current``, with the reason.

    Reasons, first match: the user id now has another e-mail (:data:`EMAIL_CHANGED`);
    the user was refused for too few eligible parts and their vehicle differs from
    the previous row's (:data:`VEHICLE_CHANGED`) or not (:data:`TOO_FEW_PARTS`);
    refused for another reason (:data:`DEAD_LETTERED`, with it); else the user is
    gone from the input (:data:`REMOVED`). ``dead_letters`` are this run's rows of
    the ``dead_letter`` table (``table``, ``reason``, ``record`` as JSON).
    """
    gone = previous[~previous["email_lower"].isin(current["email_lower"])]
    columns = ["user_id", "email_lower", "reason", "detail"]
    if gone.empty:
        return pd.DataFrame(columns=columns)
    now_email = (dict(zip(current["user_id"], current["email_lower"]))
                 if "user_id" in current else {})
    refused = _refused_users(dead_letters)
    rows = []
    for row in gone.to_dict("records"):
        user = row.get("user_id")
        if user in now_email:
            rows.append((user, row["email_lower"], EMAIL_CHANGED, f"now {now_email[user]}"))
        elif user in refused:
            reason, record = refused[user]
            if reason.startswith(UNSERVED_REASON[:20]):
                was = tuple(_plain(row.get(a)) for a in vehicle)
                is_ = tuple(_plain(record.get(a)) for a in vehicle)
                if was != is_:
                    rows.append((user, row["email_lower"], VEHICLE_CHANGED,
                                 f"{' '.join(map(str, was))} -> {' '.join(map(str, is_))}"))
                else:
                    rows.append((user, row["email_lower"], TOO_FEW_PARTS,
                                 " ".join(map(str, was))))
            else:
                rows.append((user, row["email_lower"], DEAD_LETTERED, reason))
        else:
            rows.append((user, row["email_lower"], REMOVED, ""))
    return pd.DataFrame(rows, columns=columns)


def _plain(value: Any) -> Optional[str]:
    """A vehicle attribute comparable across a warehouse row and a JSON record
    (NaN and None alike, 2022.0 as 2022)."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return None
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        value = int(value)
    return str(value)


def _refused_users(dead_letters: Optional[pd.DataFrame]) -> Dict[Any, tuple]:
    """user_id -> (reason, record) of this run's dead-lettered user rows."""
    if dead_letters is None or dead_letters.empty:
        return {}
    users = dead_letters[dead_letters["table"] == "users"]
    found = {}
    for reason, text in zip(users["reason"], users["record"]):
        try:
            record = json.loads(text) if isinstance(text, str) else {}
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("user_id") is not None:
            found.setdefault(record["user_id"], (str(reason), record))
    return found


def event_volumes(counters: Mapping[str, Any], last: Optional[Mapping[str, Any]]
                  ) -> pd.DataFrame:
    """Events read per ``event_name`` now and in the last published run (counters
    ``events.name.<name>``); an order event name seen before and missing now is the
    failure the field checked for by hand."""
    last = last or {}
    names = sorted({k[len(EVENT_COUNTER):] for k in list(counters) + list(last)
                    if k.startswith(EVENT_COUNTER)} | set(ORDER_EVENTS))
    rows = [{"event_name": name, "now": int(counters.get(EVENT_COUNTER + name, 0) or 0),
             "before": (int(last[EVENT_COUNTER + name]) if EVENT_COUNTER + name in last
                        else None)} for name in names]
    return pd.DataFrame(rows, columns=["event_name", "now", "before"])


def explain_changes(previous: pd.DataFrame, current: pd.DataFrame, n: int,
                    dead_letters: Optional[pd.DataFrame] = None,
                    popularity_before: Optional[pd.DataFrame] = None,
                    popularity_now: Optional[pd.DataFrame] = None,
                    counters: Optional[Mapping[str, Any]] = None,
                    last_counters: Optional[Mapping[str, Any]] = None,
                    top: int = 10, made_by: Optional[Mapping[str, Any]] = None,
                    made_before: Optional[Mapping[str, Any]] = None) -> pd.DataFrame:
    """The ``stability_changes`` rows of a run (without ``run_id``): one per SKU swap,
    per reason users were lost, for the score change and per event name.

    Columns: ``rank`` (order of reading), ``kind`` (``sku_swap``, ``users_lost``,
    ``scores``, ``event_volume``), ``subject``, ``users``, ``value_before``,
    ``value_after`` and ``detail``, the line a reviewer reads. ``made_by`` and
    ``made_before`` (``pipeline_runs`` provenance of this run and of the last
    published one) add a ``provenance`` row first for each of the configuration,
    model and commit that changed: the likeliest cause of everything below.
    """
    rows: List[Dict[str, Any]] = []
    for field, what in (("config_digest", "configuration"), ("model_version", "model"),
                        ("source_commit", "code")):
        now, was = (made_by or {}).get(field), (made_before or {}).get(field)
        if isinstance(now, str) and isinstance(was, str) and now != was:
            rows.append({"kind": "provenance", "subject": field, "users": None,
                         "value_before": None, "value_after": None,
                         "detail": f"{what} changed since the last published run: {field} "
                                   f"{was} -> {now}"})
    for swap in sku_swaps(previous, current, n, popularity_before, popularity_now,
                          top).to_dict("records"):
        rows.append({"kind": "sku_swap", "subject": f"{swap['old_sku']} -> {swap['new_sku']}",
                     "users": int(swap["users"]), "value_before": swap["old_orders_now"],
                     "value_after": swap["new_orders_now"],
                     "detail": f"{swap['new_sku']} replaced {swap['old_sku']} for "
                               f"{int(swap['users']):,} users: "
                               f"{_orders(swap['new_orders_now'])} vs "
                               f"{_orders(swap['old_orders_now'])} decayed orders now (before "
                               f"{_orders(swap['new_orders_before'])} vs "
                               f"{_orders(swap['old_orders_before'])})"})
    lost = lost_users(previous, current, dead_letters)
    for reason, group in lost.groupby("reason", sort=False):
        examples = ", ".join(list(dict.fromkeys(d for d in group["detail"] if d))[:3])
        rows.append({"kind": "users_lost", "subject": reason, "users": len(group),
                     "value_before": None, "value_after": None,
                     "detail": f"{len(group):,} users lost: {reason}"
                               + (f" (e.g. {examples})" if examples else "")})
    old = previous.set_index("email_lower")
    new = current.set_index("email_lower")
    common = old.index.intersection(new.index)
    scores = score_changes(old.loc[common], new.loc[common], n)
    if len(common):
        rows.append({"kind": "scores", "subject": "mean score per user",
                     "users": scores["users_score_up"] + scores["users_score_down"],
                     "value_before": None, "value_after": scores["mean_score_change"],
                     "detail": f"scores rose for {scores['users_score_up']:,} users and fell "
                               f"for {scores['users_score_down']:,}; mean change "
                               f"{scores['mean_score_change']:+.4f}"})
    if counters is not None:
        for event in event_volumes(counters, last_counters).to_dict("records"):
            before = None if pd.isna(event["before"]) else int(event["before"])
            if before is None:
                note = "no earlier count"
            elif before and not event["now"]:
                note = "MISSING NOW"
            else:
                note = f"{(event['now'] - before) / before:+.1%}" if before else "new"
            rows.append({"kind": "event_volume", "subject": event["event_name"],
                         "users": None, "value_before": before, "value_after": event["now"],
                         "detail": f"{event['event_name']}: {event['now']:,} events read"
                                   + (f" vs {before:,} last run ({note})" if before is not None
                                      else f" ({note})")})
    frame = pd.DataFrame(rows, columns=CHANGE_COLUMNS[1:])
    frame.insert(0, "rank", np.arange(1, len(frame) + 1, dtype=np.int64))
    return frame


def _orders(value: Any) -> str:
    return "?" if value is None or not np.isfinite(value) else f"{value:,.1f}"


def format_changes(changes: pd.DataFrame, swaps: int = 5) -> List[str]:
    """The explanation lines of a run, as the run summary and status print them: the
    ``swaps`` largest SKU swaps, then every other row (lost users, scores, events)."""
    if changes is None or changes.empty:
        return []
    ordered = changes.sort_values("rank")
    swapped = ordered["kind"] == "sku_swap"
    shown = pd.concat([ordered[ordered["kind"] == "provenance"], ordered[swapped].head(swaps),
                       ordered[~swapped & (ordered["kind"] != "provenance")]])
    return [f"  {d}" for d in shown["detail"]]


def format_report(report: Dict[str, float], n: int) -> str:
    """The stability report as the few lines a reviewer reads."""
    changed = ", ".join(f"{k}: {report[f'changed_{k}_share']:.2%}" for k in range(n + 1))
    positions = ", ".join(f"{report[f'position_{i}_change_rate']:.2%}" for i in range(1, n + 1))
    return "\n".join([
        f"users common {report['users_common']:,} / gained +{report['users_gained']:,} / "
        f"lost -{report['users_lost']:,}",
        f"users by changed recs: {changed}",
        f"change rate by position: {positions}",
        f"average recommended price: ${report['avg_price_before']:,.0f} -> "
        f"${report['avg_price_after']:,.0f}",
    ] + ([f"scores rose for {int(report['users_score_up']):,} users, fell for "
          f"{int(report['users_score_down']):,}; mean change "
          f"{report['mean_score_change']:+.4f}"] if "users_score_up" in report
         and pd.notna(report.get("users_score_up")) else []))
