"""Sanity gates (SPEC §10): a run that would e-mail nonsense is gated even when every QA rule holds.

The 15 QA rules check each row against the rules; they cannot see that the
rows as a whole are nonsense. A history that ends a year before ``--as_of``,
a list whose four scores tie (the order is then alphabetical), one SKU sent to
everyone, an eligible catalogue of eleven products, an input a tenth of the
last run's, or most users' lists replaced overnight all pass every rule. Each
gate here turns one of those into a named check with its measured value and
threshold, so the ``qa_checks`` row says how close a run came.

The module is pure (no Beam): ``transforms.publish`` gathers the signals
inside the pipeline (:class:`GateSignals`, additive, so it is a combiner's
accumulator) and calls :func:`evaluate` in the publish step.
"""
from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence

import numpy as np
import pandas as pd

from models.config import GatesConfig
from models.contracts import ORDER_EVENT_NAMES

# Stable names of the gates: the ``name`` of their ``qa_checks`` row and the
# ``gate.<name>`` counters of ``pipeline_runs``. Rule ids follow the 15 QA rules.
STALE_HISTORY = "stale_history"
TIED_SCORES = "tied_scores"
SKU_CONCENTRATION = "sku_concentration"
ELIGIBLE_SKUS = "eligible_skus"
ELIGIBLE_SHARE = "eligible_share"
INPUT_SHRINKAGE = "input_shrinkage"
CHURN = "churn"
GATE_IDS: Dict[str, int] = {name: 101 + i for i, name in enumerate((
    STALE_HISTORY, TIED_SCORES, SKU_CONCENTRATION, ELIGIBLE_SKUS, ELIGIBLE_SHARE,
    INPUT_SHRINKAGE, CHURN))}

# Two scores closer than this (relative) are a tie: the score formula's own
# differences (one order among thousands) are far larger.
TIE_TOLERANCE = 1e-9


class GateResult(NamedTuple):
    """One gate on one run.

    Attributes:
      name: the gate's stable name (see ``GATE_IDS``).
      value: what was measured (None when there was nothing to measure).
      threshold: the configured limit it was compared with.
      tripped: whether the run must be gated for it.
      detail: one line for the operator: what was seen and what to do.
    """

    name: str
    value: Optional[float]
    threshold: float
    tripped: bool
    detail: str


@dataclass
class GateSignals:
    """What the gates measure, gathered across the pipeline; merging two is adding them.

    Attributes:
      newest_order: event time of the newest order line read (None: no orders).
      users: recommendation rows written.
      tied_users: rows whose recommended scores all tie.
      sku_users: per SKU, the rows that recommend it (bounded by the catalogue).
      catalog_skus: SKUs in the resolved catalogue.
      eligible_skus: of those, SKUs that pass the catalogue's eligibility rules.
    """

    newest_order: Optional[pd.Timestamp] = None
    users: int = 0
    tied_users: int = 0
    sku_users: Counter = field(default_factory=Counter)
    catalog_skus: int = 0
    eligible_skus: int = 0

    def merge(self, other: "GateSignals") -> "GateSignals":
        """Adds ``other`` into this one (newest order: the later of the two) and returns it."""
        if other.newest_order is not None and (self.newest_order is None
                                               or other.newest_order > self.newest_order):
            self.newest_order = other.newest_order
        self.users += other.users
        self.tied_users += other.tied_users
        self.sku_users.update(other.sku_users)
        self.catalog_skus += other.catalog_skus
        self.eligible_skus += other.eligible_skus
        return self


def newest_order_time(events: pd.DataFrame, as_of: Optional[pd.Timestamp] = None
                      ) -> Optional[pd.Timestamp]:
    """Event time of the newest order event (any of the three order names) at or before
    ``as_of`` (popularity gives later orders no weight), or None.

    >>> ev = pd.DataFrame({"event_name": ["Placed Order", "Viewed Product", "Placed Order"],
    ...                    "event_time": pd.to_datetime(["2026-01-01", "2026-02-01",
    ...                                                  "2026-03-01"], utc=True)})
    >>> str(newest_order_time(ev, pd.Timestamp("2026-02-15", tz="UTC")))
    '2026-01-01 00:00:00+00:00'
    """
    if not len(events):
        return None
    times = pd.to_datetime(events["event_time"], utc=True)
    usable = events["event_name"].isin(ORDER_EVENT_NAMES).to_numpy(bool, copy=True)
    if as_of is not None:
        usable &= (times <= as_of).to_numpy(bool)
    orders = times[usable]
    newest = orders.max() if len(orders) else pd.NaT
    return None if pd.isna(newest) else pd.Timestamp(newest)


def tied_rows(recs: pd.DataFrame, n: int) -> int:
    """Rows whose ``n`` recommended scores all tie (within ``TIE_TOLERANCE``, relative).

    With one recommendation per user nothing can tie, so the count is 0.

    >>> recs = pd.DataFrame({"rec1_score": [2.0, 2.0], "rec2_score": [2.0, 1.0]})
    >>> tied_rows(recs, 2)
    1
    """
    if n < 2 or not len(recs):
        return 0
    scores = recs[[f"rec{i}_score" for i in range(1, n + 1)]].to_numpy(float)
    spread = np.nanmax(scores, axis=1) - np.nanmin(scores, axis=1)
    scale = np.maximum(np.nanmax(np.abs(scores), axis=1), 1.0)
    return int((spread <= TIE_TOLERANCE * scale).sum())


def sku_user_counts(recs: pd.DataFrame, n: int) -> Counter:
    """Per SKU, the rows that recommend it (a SKU counts once per row).

    >>> recs = pd.DataFrame({"rec_part_1": ["A", "A"], "rec_part_2": ["B", "C"]})
    >>> sorted(sku_user_counts(recs, 2).items())
    [('A', 2), ('B', 1), ('C', 1)]
    """
    counts: Counter = Counter()
    if not len(recs):
        return counts
    parts = recs[[f"rec_part_{i}" for i in range(1, n + 1)]]
    for column in parts.columns:  # rule 9 makes the SKUs of a row distinct
        counts.update(parts[column].dropna().astype(str).value_counts().to_dict())
    return counts


def changed_user_share(report: Mapping[str, float]) -> Optional[float]:
    """Share of common users whose list changed, from ``models.stability.stability_report``.

    None when no user is common to both outputs (a first run: nothing to compare).

    >>> changed_user_share({"users_common": 4, "changed_0_share": 0.75})
    0.25
    """
    if not report or not report.get("users_common"):
        return None
    return 1.0 - float(report["changed_0_share"])


def stale_history(newest_order: Optional[pd.Timestamp], as_of: pd.Timestamp,
                  max_age_days: float) -> GateResult:
    """Gated when the newest order is more than ``max_age_days`` before ``as_of``, or absent.

    Popularity halves every half-life: history a year older than ``--as_of``
    (a run on old data without ``--as_of``, which defaults to now) leaves every
    score near zero and the lists in catalogue order.
    """
    if newest_order is None:
        return GateResult(STALE_HISTORY, None, max_age_days, True,
                          f"no orders at or before --as_of {as_of:%Y-%m-%dT%H:%M:%SZ}: nothing "
                          f"to rank by; check the events input (is it empty, are its event "
                          f"names SPEC §2 order events?) and --as_of")
    age = (as_of - newest_order).total_seconds() / 86_400.0
    tripped = age > max_age_days
    detail = (f"history ends {newest_order:%Y-%m-%d %H:%M}Z, {age:,.0f} days before --as_of "
              f"{as_of:%Y-%m-%dT%H:%M:%SZ} (limit {max_age_days:g})")
    if tripped:
        detail += (f"; pass --as_of {newest_order:%Y-%m-%dT%H:%M:%SZ} (the end of the history) "
                   f"or refresh the history")
    return GateResult(STALE_HISTORY, round(age, 3), max_age_days, tripped, detail)


def tied_scores(tied: int, users: int, max_share: float) -> GateResult:
    """Gated when more than ``max_share`` of the users get a list whose scores all tie."""
    share = tied / users if users else 0.0
    return GateResult(TIED_SCORES, share, max_share, share > max_share,
                      f"{tied:,} of {users:,} users ({share:.1%}) get a list whose scores all "
                      f"tie (limit {max_share:.0%}); their order says nothing"
                      + ("; is the history stale or too thin?" if share > max_share else ""))


def sku_concentration(sku_users: Mapping[str, int], users: int,
                      max_share: float) -> GateResult:
    """Gated when one SKU goes to more than ``max_share`` of the users."""
    if not users or not sku_users:
        return GateResult(SKU_CONCENTRATION, 0.0, max_share, False, "no recommendations")
    top_users = max(sku_users.values())
    top = min(s for s, k in sku_users.items() if k == top_users)  # deterministic on ties
    share = top_users / users
    return GateResult(SKU_CONCENTRATION, share, max_share, share > max_share,
                      f"SKU {top} goes to {top_users:,} of {users:,} users ({share:.1%}, "
                      f"limit {max_share:.0%})"
                      + ("; check the catalogue rules and that SKU" if share > max_share
                         else ""))


def eligible_catalog(eligible: int, catalog: int, min_skus: int,
                     min_share: float) -> List[GateResult]:
    """Two gates: at least ``min_skus`` eligible SKUs, and at least ``min_share`` of the catalogue.

    Another shop's catalogue under this shop's rules (price floor, low-value
    part types, service SKU patterns) can leave a handful of products, and
    every user then gets the same few.
    """
    share = eligible / catalog if catalog else 0.0
    hint = "; revisit the rules section of --config for this catalogue"
    what = f"{eligible:,} of {catalog:,} catalogue SKUs ({share:.1%}) pass the eligibility rules"
    by_count = eligible < min_skus
    by_share = share < min_share
    return [
        GateResult(ELIGIBLE_SKUS, float(eligible), float(min_skus), by_count,
                   f"{what} (need at least {min_skus:,})" + (hint if by_count else "")),
        GateResult(ELIGIBLE_SHARE, share, min_share, by_share,
                   f"{what} (need at least {min_share:.1%})" + (hint if by_share else "")),
    ]


def input_shrinkage(counters: Mapping[str, float], last: Optional[Mapping[str, float]],
                    tables: Sequence[str], min_ratio: float) -> GateResult:
    """Gated when an input table read fewer than ``min_ratio`` of the last published run's rows.

    Compares the ``<table>.read`` counters; a table the last run did not read
    (or read empty) is not compared. The value is the smallest ratio.
    """
    ratios = {}
    for table in tables:
        before = float((last or {}).get(f"{table}.read", 0) or 0)
        if before > 0:
            ratios[table] = float(counters.get(f"{table}.read", 0)) / before
    if not ratios:
        return GateResult(INPUT_SHRINKAGE, None, min_ratio, False,
                          "no published run to compare the inputs with")
    table = min(ratios, key=lambda t: (ratios[t], t))
    ratio = ratios[table]
    tripped = ratio < min_ratio
    detail = (f"{table}: {int(counters.get(f'{table}.read', 0)):,} rows read, "
              f"{ratio:.1%} of the last published run's {int(last[f'{table}.read']):,} "
              f"(limit {min_ratio:.0%})")
    if tripped:
        detail += "; is the input truncated or the wrong file?"
    return GateResult(INPUT_SHRINKAGE, ratio, min_ratio, tripped, detail)


def churn(changed_share: Optional[float], common: int, max_share: float,
          accept_changes: bool) -> GateResult:
    """Gated when more than ``max_share`` of the common users' lists changed, unless accepted."""
    if changed_share is None:
        return GateResult(CHURN, None, max_share, False,
                          "no user in common with the last published output")
    over = changed_share > max_share
    detail = (f"{changed_share:.1%} of the {common:,} users common with the last published "
              f"output get a changed list (limit {max_share:.0%}; the field's daily refresh: "
              f"16.2%)")
    if over and accept_changes:
        detail += "; accepted with --accept_changes"
    elif over:
        detail += ("; read the stability figures, then rerun with --accept_changes if the "
                   "change is intended")
    return GateResult(CHURN, changed_share, max_share, over and not accept_changes, detail)


def baseline_gates(gates: GatesConfig) -> GatesConfig:
    """The gates of a global-popularity baseline run (``--strategy global``): one list for
    every user is that strategy's definition, so concentration is not held against it; the
    other gates stand.

    >>> baseline_gates(GatesConfig(max_sku_user_share=0.9)).max_sku_user_share
    1.0
    """
    return dataclasses.replace(gates, max_sku_user_share=1.0)


def evaluate(signals: GateSignals, as_of: pd.Timestamp, counters: Mapping[str, float],
             last_counters: Optional[Mapping[str, float]], stability: Optional[Mapping[str, float]],
             gates: GatesConfig, tables: Sequence[str], accept_changes: bool = False
             ) -> List[GateResult]:
    """Every gate on one run, in ``GATE_IDS`` order."""
    report = stability or {}
    return [
        stale_history(signals.newest_order, as_of, gates.max_history_age_days),
        tied_scores(signals.tied_users, signals.users, gates.max_tied_user_share),
        sku_concentration(signals.sku_users, signals.users, gates.max_sku_user_share),
        *eligible_catalog(signals.eligible_skus, signals.catalog_skus, gates.min_eligible_skus,
                          gates.min_eligible_share),
        input_shrinkage(counters, last_counters, tables, gates.min_input_ratio),
        churn(changed_user_share(report), int(report.get("users_common", 0) or 0),
              gates.max_changed_user_share, accept_changes),
    ]


def gate_rows(results: Iterable[GateResult]) -> pd.DataFrame:
    """``qa_checks`` rows of the gates: id, name, 1 violation when tripped, value, threshold."""
    results = list(results)
    return pd.DataFrame({
        "rule_id": [GATE_IDS[r.name] for r in results],
        "name": [f"gate: {r.name}" for r in results],
        "violations": [int(r.tripped) for r in results],
        "value": [float("nan") if r.value is None else float(r.value) for r in results],
        "threshold": [float(r.threshold) for r in results],
        "detail": [r.detail for r in results],
    })


def gate_counters(results: Iterable[GateResult]) -> Dict[str, float]:
    """``gate.<name>`` (the measured value) and ``gate.<name>.tripped`` for ``pipeline_runs``."""
    out: Dict[str, float] = {}
    for r in results:
        if r.value is not None and math.isfinite(r.value):
            out[f"gate.{r.name}"] = round(float(r.value), 6)
        out[f"gate.{r.name}.tripped"] = int(r.tripped)
    return out


def format_gates(rows: pd.DataFrame) -> List[str]:
    """The gate rows of ``qa_checks`` as the lines a run's summary prints: every gate's value
    against its threshold, then one line per tripped gate saying what to do."""
    gates = rows[rows["rule_id"].isin(list(GATE_IDS.values()))]
    if not len(gates):
        return []
    def figure(value: float) -> str:
        if pd.isna(value):
            return "n/a"
        return f"{value:,.0f}" if float(value).is_integer() else f"{value:.4g}"
    lines = ["sanity gates: " + ", ".join(
        f"{r.name.removeprefix('gate: ')} {figure(r.value)} (limit {figure(r.threshold)})"
        + (" TRIPPED" if r.violations else "") for r in gates.itertuples())]
    lines += [f"  TRIPPED {r.name.removeprefix('gate: ')}: {r.detail}"
              for r in gates.itertuples() if r.violations]
    return lines
