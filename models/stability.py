"""Run-to-run stability of published recommendations (SPEC §3 stability report).

Compares the previous and the new output user by user and position by
position, the way the field's daily refresh was reported: users common,
gained and lost; users by number of changed positions; change rate per
position; average recommended price before and after.
"""
from __future__ import annotations

from typing import Dict

import numpy as np
import pandas as pd


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
    return report


def _mean_price(frame: pd.DataFrame, prices) -> float:
    values = frame[prices].to_numpy(float) if len(frame) else np.array([])
    return float(values.mean()) if values.size else 0.0


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
    ])
