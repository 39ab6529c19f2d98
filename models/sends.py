"""Attribution by send: each funnel event counted at its send, and the log of sends (issue #18).

The bandit compares treatments by what their *sends* earned. A view or click
belongs to the send it follows, so here every funnel event is re-timed to its
recipient's send (when it falls within the attribution window after it): a
window's counts are then the counts of the sends made in it, whatever window
boundary lies between a send and its click, and clicks never outnumber views
because a click was cut off from its open by a boundary.

A click with no tracked open (images blocked, a preview pane) still proves the
e-mail was opened: the bandit counts it as a view too (``opens_inferred``), so
its views → clicks posterior never sees an impossible count.

`send_log` is what off-policy evaluation reads (`models.ope`): per distinct
(treatment, propensity, clicked) the number of sends, so a shard ships a few
counts rather than one row per send. `policy_value_table` turns the merged
log into the campaign report's ``campaign_policy_value`` table.

Beam adapters live in transforms/; nothing here imports Beam.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd

from models import ope
from models.campaign import CLICKED, RECIPIENT_KEY, SENT, VIEWED

LOG_COLUMNS = ("treatment_id", "propensity", "clicked", "sends")
POLICY_COLUMNS = ("policy", "method", "value", "ci_low", "ci_high", "sends",
                  "sends_without_propensity")
LOGGED, LIFT = "logged", "lift_vs_uniform"


class SendAttribution(NamedTuple):
    """Funnel events at their sends' times, and what was left out or added.

    Attributes:
        rows: SENT events and the later events within the window, each with
            ``event_time`` set to its recipient's send time (``event_time``
            of the event itself is kept as ``occurred_at``), plus one VIEWED
            per click whose open was not tracked.
        beyond: Events later than the window after their send: processed, not
            counted by the bandit (the report counts them as ``bandit.beyond_attribution``).
        opens_inferred: VIEWED rows added for clicks without a tracked open.
    """

    rows: pd.DataFrame
    beyond: int
    opens_inferred: int


def attribute_to_sends(events: pd.DataFrame, window: pd.Timedelta) -> SendAttribution:
    """Re-times funnel-checked events to their recipient's send (within `window` after it).

    Args:
        events: `campaign.check_funnel` rows: every non-SENT event has a send
            at or before it, and each kind appears once per recipient.
        window: Attribution window after the send.

    >>> t = pd.Timestamp("2026-05-01T23:00Z")
    >>> ev = pd.DataFrame({"campaign_id": "C", "treatment_id": "T", "user_id": ["u"] * 3,
    ...     "kind": ["SENT", "CLICKED", "DELIVERED"],
    ...     "event_time": [t, t + pd.Timedelta(hours=2), t + pd.Timedelta(days=9)]})
    >>> out = attribute_to_sends(ev, pd.Timedelta(days=7))
    >>> out.rows["kind"].tolist(), out.rows["event_time"].dt.day.tolist(), out.beyond
    (['SENT', 'CLICKED', 'VIEWED'], [1, 1, 1], 1)
    """
    if not len(events):
        return SendAttribution(events.assign(occurred_at=events["event_time"]), 0, 0)
    key = list(RECIPIENT_KEY)
    is_sent = events["kind"].eq(SENT)
    sent_at = (events["event_time"].where(is_sent)
               .groupby([events[k] for k in key], sort=False).transform("min"))
    within = (is_sent | (events["event_time"] - sent_at <= window)).to_numpy(bool)
    rows = events.loc[within].assign(occurred_at=events["event_time"],
                                     event_time=sent_at)[list(events.columns) + ["occurred_at"]]
    clicked = rows["kind"].eq(CLICKED)
    viewed = rows["kind"].eq(VIEWED).groupby([rows[k] for k in key], sort=False).transform("any")
    inferred = rows.loc[(clicked & ~viewed).to_numpy(bool)].assign(kind=VIEWED)
    out = pd.concat([rows, inferred], ignore_index=True) if len(inferred) else rows.reset_index(
        drop=True)
    return SendAttribution(out, int((~within).sum()), len(inferred))


def send_log(events: pd.DataFrame, window: pd.Timedelta) -> pd.DataFrame:
    """Sends per (treatment_id, propensity, clicked): the compact log OPE reads.

    ``clicked`` is whether the recipient clicked within `window` after the
    send; ``propensity`` is the SENT event's (NaN when the sender did not
    record one).

    >>> t = pd.Timestamp("2026-05-01", tz="UTC")
    >>> ev = pd.DataFrame({"campaign_id": "C", "treatment_id": ["A", "A", "B", "A"],
    ...     "user_id": ["u", "u", "v", "w"], "kind": ["SENT", "CLICKED", "SENT", "SENT"],
    ...     "event_time": t, "propensity": [0.5, None, 0.5, 0.5]})
    >>> send_log(ev, pd.Timedelta(days=7)).values.tolist()
    [['A', 0.5, False, 1], ['A', 0.5, True, 1], ['B', 0.5, False, 1]]
    """
    key = list(RECIPIENT_KEY)
    empty = pd.DataFrame({"treatment_id": pd.Series(dtype=object),
                          "propensity": pd.Series(dtype=float),
                          "clicked": pd.Series(dtype=bool), "sends": pd.Series(dtype="int64")})
    if not len(events):
        return empty
    sent = (events.loc[events["kind"].eq(SENT)].sort_values("event_time", kind="stable")
            .drop_duplicates(key))
    if not len(sent):
        return empty
    prop = (sent["propensity"].astype(float) if "propensity" in sent.columns
            else pd.Series(np.nan, index=sent.index))
    clicks = (events.loc[events["kind"].eq(CLICKED)].groupby(key)["event_time"].min()
              .rename("clicked_at"))
    joined = sent[key + ["event_time"]].assign(propensity=prop.to_numpy(float)).join(
        clicks, on=key)
    delay = joined["clicked_at"] - joined["event_time"]
    joined["clicked"] = (joined["clicked_at"].notna() & (delay <= window)).to_numpy(bool)
    out = (joined.groupby(["treatment_id", "propensity", "clicked"], dropna=False, sort=True)
           .size().rename("sends").reset_index())
    return out.astype({"sends": "int64", "clicked": bool})[list(LOG_COLUMNS)]


def merge_send_logs(logs: pd.DataFrame) -> pd.DataFrame:
    """Several shards' send logs (concatenated) summed per cell."""
    if not len(logs):
        return logs
    return (logs.groupby(["treatment_id", "propensity", "clicked"], dropna=False, sort=True)
            ["sends"].sum().reset_index())


def policy_value_table(logs: pd.DataFrame, resamples: int = 1000, seed: int = 2026,
                       draws: int = 10_000) -> pd.DataFrame:
    """``campaign_policy_value``: click-through per send, realised and off-policy, with intervals.

    Rows: the logging policy's realised rate (``logged``/``realised``); the
    uniform, greedy and Thompson policies' IPS, SNIPS and DR estimates from
    the same sends; and ``lift_vs_uniform`` (realised minus the uniform
    policy's SNIPS estimate, paired bootstrap). Greedy and Thompson are
    learned from these very sends (a per-send Beta(1, 1) posterior per
    treatment), so their estimates lean optimistic; uniform's does not.
    Only sends with a recorded propensity enter; the others are counted in
    ``sends_without_propensity``.
    """
    logs = merge_send_logs(logs) if len(logs) else logs
    known = logs.loc[logs["propensity"].notna()] if len(logs) else logs
    missing = int(logs.loc[logs["propensity"].isna(), "sends"].sum()) if len(logs) else 0
    rows = []
    if len(known) and known["sends"].sum() > 0:
        arms = sorted(known["treatment_id"].unique())
        index = {t: i for i, t in enumerate(arms)}
        log = ope.make_log(known["treatment_id"].map(index).to_numpy(np.intp),
                           known["propensity"].to_numpy(float),
                           known["clicked"].to_numpy(float), known["sends"].to_numpy(float),
                           n_arms=len(arms))
        realised = ope.on_policy(log, resamples, seed=seed)
        rows.append((LOGGED, "realised", *realised))
        alpha, beta = ope.policy_posterior(log, len(arms))
        for name, policy in ope.candidate_policies(alpha, beta, draws, seed).items():
            for method, est in ope.estimate(log, policy, len(arms), resamples=resamples,
                                            seed=seed).items():
                rows.append((name, method, *est))
        rows.append((LIFT, "snips", *ope.lift(log, ope.uniform_policy(len(arms)), len(arms),
                                              resamples=resamples, seed=seed)))
        sends = log.sends
    else:
        sends = 0
    table = pd.DataFrame(rows, columns=["policy", "method", "value", "ci_low", "ci_high"])
    table["sends"] = np.int64(sends)
    table["sends_without_propensity"] = np.int64(missing)
    return table.astype({"sends": "int64", "sends_without_propensity": "int64",
                         "value": float, "ci_low": float, "ci_high": float})[
        list(POLICY_COLUMNS)]
