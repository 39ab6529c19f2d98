"""When a vehicle's users are told that its default picks moved (the stream's ranking notices).

A stream order re-ranks its vehicle (`transforms.streaming.ranking.VehiclePicksFn`,
with `picks_between` below: each pair of consecutive windows, joined per window end);
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

from typing import Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import pandas as pd

from models import stream_popularity as cells
from models import streaming as model
from models.config import RankingNoticesConfig, RecsConfig

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


# --- pairing consecutive windows without state ---------------------------------------------

THIS, PREVIOUS = "this", "previous"


def pair_keys(end_us: int, period_us: int) -> Tuple[Tuple[int, str], Tuple[int, str]]:
    """Where a window's popularity goes: as ``this`` under its own end, as ``previous`` one later.

    The window ending ``end_us`` is the one before the window ending one
    period later, so grouping by window end brings each window together with
    the one before it, without any state carried from window to window.

    >>> pair_keys(20, 10)
    ((20, 'this'), (30, 'previous'))
    """
    return (end_us, THIS), (end_us + period_us, PREVIOUS)


def split_pair(entries: Iterable[Tuple[str, object]]) -> Tuple[Optional[object], Optional[object]]:
    """A window end's group → (this window's popularity, the previous window's), each or None.

    A window has one first pane, so each role appears at most once; should a
    runner deliver one twice (a retried bundle), the copies are equal and the
    first is kept.

    >>> split_pair([(PREVIOUS, "p"), (THIS, "t")])
    ('t', 'p')
    >>> split_pair([(PREVIOUS, "p")])
    (None, 'p')
    """
    this = previous = None
    for role, value in entries:
        if role == THIS and this is None:
            this = value
        elif role == PREVIOUS and previous is None:
            previous = value
    return this, previous


def ranked_vehicles(previous: pd.DataFrame, current: pd.DataFrame,
                    by_segment: Mapping[Tuple[str, str], Sequence[str]],
                    levels: Sequence[str]) -> List[str]:
    """The vehicles whose own segments (``levels``) gained or lost orders between two windows."""
    changed = cells.changed_segments(previous, current, levels)
    return sorted({v for segment in changed for v in by_segment.get(segment, ())})


def picks_between(reference, previous: pd.DataFrame, current: pd.DataFrame,
                  vehicles: Sequence[str], config: RecsConfig
                  ) -> Dict[str, Tuple[Picks, Optional[Picks]]]:
    """Each vehicle's default picks under the current window and under the previous one.

    Both windows are ranked here: with no state carried between windows the
    previous window's picks are not at hand (ranking them again costs one more
    `default_picks` over the same vehicles; bench/streaming_ranking.py measures it).
    """
    if not vehicles:
        return {}
    now = model.default_picks(model.scorer(reference, current, config), reference, vehicles,
                              config)
    before = model.default_picks(model.scorer(reference, previous, config), reference, vehicles,
                                 config)
    out = {}
    for vehicle, chosen in now.items():
        base = before.get(vehicle)
        out[vehicle] = (tuple(str(p) for p in chosen),
                        tuple(str(p) for p in base) if base is not None else None)
    return out
