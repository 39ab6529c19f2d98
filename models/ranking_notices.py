"""When a vehicle's users are told that its default picks moved (the stream's ranking notices).

A stream order re-ranks its vehicle (`transforms.streaming.ranking.VehiclePicksFn`);
at short refresh periods the picks flip back and forth or only reorder, and a
notice for each flip re-scores every user of the vehicle for nothing they
would see. The rule here keeps only what a user would notice, at a mail's
cadence:

- a notice needs the *products* of the picks to differ from those of the last
  notice (at least ``min_changed_picks`` new SKUs; order and the fallback level
  that served them do not count);
- at most one notice per vehicle per ``min_interval_hours`` of event time; a
  visible change inside the interval is *held*, and re-checked when the
  interval ends: still there, it is noticed then (once); flipped back, never.

`transforms.streaming.ranking.PicksChangedFn` keeps one `NoticeState` per
vehicle in keyed state and sets an event-time timer at `recheck_at`. Nothing
here imports Beam.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple

from models.config import RankingNoticesConfig

Picks = Tuple[str, ...]         # (source, rec_part_1, ...), as VehiclePicksFn emits them

NOTIFY, HOLD, SAME, STALE = "notify", "hold", "same", "stale"

_MICROS_PER_MILLI = 1_000


def interval_us(notices: RankingNoticesConfig) -> int:
    """The configured interval in microseconds (0: no throttle)."""
    return int(round(notices.min_interval_hours * 3_600 * 1_000_000))


def visible_change(told: Optional[Sequence[str]], now: Sequence[str], min_changed: int) -> bool:
    """Whether a vehicle's picks ``now`` show products its users were not ``told`` about.

    Picks are ``(source, sku, ...)``; only the products count, not their order
    or the fallback level that served them: a reorder shows the same products.
    A vehicle never told about counts as changed.

    >>> visible_change(("make", "A", "B"), ("global", "B", "A"), 1)
    False
    >>> visible_change(("make", "A", "B"), ("make", "A", "C"), 1)
    True
    >>> visible_change(("make", "A", "B"), ("make", "A", "C"), 2)
    False
    """
    if told is None:
        return True
    return len(set(now[1:]) - set(told[1:])) >= min_changed


class NoticeState(NamedTuple):
    """Per vehicle: what its users were last told and its latest picks (a few SKUs, bounded).

    Attributes:
      told: the picks of the last notice (before the first notice: the picks of
        the window before the first one compared, which is what users were served).
      told_at_us: event time of that notice (None: never notified).
      latest_end_us: end of the newest window compared (an older window arriving
        later is ignored).
      latest: that window's picks, what a held change is re-checked with.
    """

    told: Optional[Picks]
    told_at_us: Optional[int]
    latest_end_us: int
    latest: Picks


def notice_decision(state: Optional[NoticeState], end_us: int, picks: Picks,
                    earlier: Optional[Picks], min_changed: int, interval: int
                    ) -> Tuple[NoticeState, str]:
    """A vehicle's picks in the window ending ``end_us`` → its new state and the decision.

    ``earlier`` is the vehicle's picks in the window before (used only for a
    vehicle without state). Decisions:

    - ``notify``: the products differ from the last notice's and the interval
      since it has passed (or there was none);
    - ``hold``: they differ, but the last notice is less than ``interval`` old;
      the caller re-checks at `recheck_at` (a flip back before then costs nothing);
    - ``same``: no visible change (identical, reordered, or fewer new products
      than ``min_changed``);
    - ``stale``: a window no newer than one already compared; the state is unchanged.
    """
    if state is not None and state.latest_end_us >= end_us:
        return state, STALE
    told = state.told if state is not None else earlier
    told_at = state.told_at_us if state is not None else None
    if not visible_change(told, picks, min_changed):
        return NoticeState(told, told_at, end_us, picks), SAME
    if told_at is not None and end_us < told_at + interval:
        return NoticeState(told, told_at, end_us, picks), HOLD
    return NoticeState(picks, end_us, end_us, picks), NOTIFY


def recheck_at(state: NoticeState, interval: int) -> int:
    """When a held change is re-checked: the interval's end, rounded up to a whole millisecond.

    Portable runners (the FnApiRunner, Dataflow's runner v2) keep timer
    timestamps in whole milliseconds, so a timer set at any other instant
    fires at a different one from runner to runner; a whole millisecond is the
    same everywhere, and the re-check's notice carries it as its time.
    """
    due = state.told_at_us + interval
    return -(-due // _MICROS_PER_MILLI) * _MICROS_PER_MILLI


def recheck(state: NoticeState, at_us: int, min_changed: int) -> Tuple[NoticeState, bool]:
    """At the end of a held interval: notify (at ``at_us``) if the latest picks still differ."""
    if not visible_change(state.told, state.latest, min_changed):
        return state, False
    return NoticeState(state.latest, at_us, state.latest_end_us, state.latest), True
