"""Run health (SPEC §7): reconcile counters and decide whether a run may publish.

A run that writes nothing, writes far fewer rows than the last published run,
breaks any QA rule or trips a sanity gate (SPEC §10, ``models.sanity``) is an
alarm: it is recorded, never published.
"""
from __future__ import annotations

from typing import Mapping, NamedTuple, Optional, Sequence

from models.sanity import GateResult

PUBLISHED = "published"
GATED = "gated"

# Tables whose counts must reconcile: read = processed + dead-lettered + deduplicated.
RECONCILED_TABLES = ("catalog", "fitment", "users", "events")


class Verdict(NamedTuple):
    status: str
    message: str


def reconcile(counters: Mapping[str, int], tables: Sequence[str] = RECONCILED_TABLES
              ) -> dict:
    """Per table: read, processed, dead-lettered, deduplicated and the unexplained gap."""
    out = {}
    for table in tables:
        read = int(counters.get(f"{table}.read", 0))
        processed = int(counters.get(f"{table}.processed", 0))
        dead = int(counters.get(f"{table}.dead_lettered", 0))
        dup = int(counters.get(f"{table}.deduplicated", 0))
        out[table] = {"read": read, "processed": processed, "dead_lettered": dead,
                      "deduplicated": dup, "unexplained": read - processed - dead - dup}
    return out


def verdict(violations: Mapping[int, int], written: int, last_written: Optional[int],
            min_ratio_vs_last: float, counters: Mapping[str, int],
            gates: Sequence[GateResult] = ()) -> Verdict:
    """Publish only a clean, plausibly sized run whose counts reconcile and passes every gate.

    Every reason to gate is named in the message, QA rules first, then the
    alarms, then the sanity gates of ``models.sanity`` (SPEC §10), so one look
    at ``pipeline_runs`` says everything that was wrong.
    """
    reasons = []
    failed = [f"rule {rule} ({n} violations)" for rule, n in sorted(violations.items()) if n]
    if failed:
        reasons.append("QA failed: " + ", ".join(failed))
    if written == 0:
        reasons.append("alarm: zero recommendations written")
    elif last_written and written < min_ratio_vs_last * last_written:
        reasons.append(f"alarm: {written} recommendations, under "
                       f"{min_ratio_vs_last:.0%} of the last run's {last_written}")
    gaps = {t: r["unexplained"] for t, r in reconcile(counters).items() if r["unexplained"]}
    if gaps:
        reasons.append(f"alarm: counts do not reconcile {gaps}")
    tripped = [g for g in gates if g.tripped]
    if tripped:
        reasons.append("sanity gates tripped: " + "; ".join(
            f"{g.name} ({g.detail})" for g in tripped))
    if reasons:
        return Verdict(GATED, "; ".join(reasons))
    return Verdict(PUBLISHED, f"published {written} recommendations")
