"""Entries that expire in event time, held together under one state key with one timer.

The streaming job's per-event stateful steps (`DropDuplicates`,
`FirstOrderLine`) remember each event id or order line until an event-time
expiry. On Dataflow each natural key (an id, an order line) is its own state
key: one entry per key. The bundle-based DirectRunner never forgets a key it
has seen and scans every one for timers after each bundle, so locally the
same steps hold many entries under a few bucket keys instead
(`transforms.streaming.statekeys`). This module is the logic both share: a
natural key is a bucket of one.

`Expiring` is the state of one key: its entries, each with its own expiry,
and the time of the key's one timer, set at the earliest expiry rounded up to
a grid. When the timer fires, every entry due by then is removed and the
timer moves to the next earliest. The grid bounds the firings per key to one
per grid step whatever the rate (with one timer per bucket and no grid, a
dense stream would fire once per entry); an entry outlives its expiry by less
than one grid step, so a copy is caught a little longer, never shorter.
With a grid of one millisecond (natural keys) the timer is the entry's own
expiry, rounded up to the whole millisecond portable runners keep timers in.

Bound per key: entries arriving within ``ttl + grid`` of the key's time,
i.e. ``rate x (ttl + grid) / buckets`` for a bucket, one for a natural key.
"""
from __future__ import annotations

from typing import Any, Dict, Hashable, NamedTuple, Optional, Tuple

MILLI_US = 1_000


class Expiring(NamedTuple):
    """One state key's entries: ``{key: (value, expires_us)}``, and when its timer is set."""

    entries: Dict[Hashable, Tuple[Any, int]]
    timer_us: int


def grid_of(ttl_us: int, steps: int) -> int:
    """The timer grid of a TTL split into ``steps`` (at least one millisecond, whole ms).

    ``steps = 0`` asks for the finest grid (one millisecond): one entry per key.
    """
    if ttl_us < 0 or steps < 0:
        raise ValueError(f"ttl and steps must be >= 0, got {ttl_us}, {steps}")
    if steps == 0:
        return MILLI_US
    return max(MILLI_US, -(-ttl_us // steps // MILLI_US) * MILLI_US)


def timer_for(expires_us: int, grid_us: int) -> int:
    """The timer instant covering an expiry: the expiry rounded up to the grid.

    >>> timer_for(10_000_001, 1_000), timer_for(10_000_000, 1_000), timer_for(1, 500_000)
    (10001000, 10000000, 500000)
    """
    return -(-expires_us // grid_us) * grid_us


def get(held: Optional[Expiring], key: Hashable) -> Optional[Any]:
    """The value kept for ``key`` (None when the key holds none, or holds nothing at all)."""
    if held is None:
        return None
    entry = held.entries.get(key)
    return None if entry is None else entry[0]


def admit(held: Optional[Expiring], key: Hashable, value: Any, expires_us: int,
          grid_us: int) -> Tuple[Expiring, Optional[int]]:
    """Adds an entry; returns the state and the instant to (re)set the timer to, or None.

    The timer moves only earlier: an entry expiring after the timer is
    covered when the timer fires (the next timer is set then).

    >>> held, timer = admit(None, "E1", True, 5_000, 1_000)
    >>> held, timer
    (Expiring(entries={'E1': (True, 5000)}, timer_us=5000), 5000)
    >>> admit(held, "E2", True, 9_500, 1_000)[1] is None, admit(held, "E3", True, 2_500, 1_000)[1]
    (True, 3000)
    """
    timer = timer_for(expires_us, grid_us)
    if held is None:
        return Expiring({key: (value, expires_us)}, timer), timer
    held.entries[key] = (value, expires_us)
    if timer < held.timer_us:
        return held._replace(timer_us=timer), timer
    return held, None


def restate(held: Expiring, key: Hashable, value: Any) -> Expiring:
    """Replaces the value of an entry, keeping its expiry (set by its first arrival)."""
    _, expires_us = held.entries[key]
    held.entries[key] = (value, expires_us)
    return held


def expire(held: Optional[Expiring], fired_us: int,
           grid_us: int) -> Tuple[Optional[Expiring], Optional[int], int]:
    """Removes the entries due by ``fired_us`` (the timer's instant).

    Returns the state (None when nothing is left: the key is cleared), the
    next timer instant (None: no timer), and how many entries were removed.

    >>> held = Expiring({"A": (1, 1_000), "B": (2, 2_400), "C": (3, 7_000)}, 1_000)
    >>> expire(held, 3_000, 1_000)
    (Expiring(entries={'C': (3, 7000)}, timer_us=7000), 7000, 2)
    >>> expire(Expiring({"C": (3, 7_000)}, 7_000), 7_000, 1_000)
    (None, None, 1)
    """
    if held is None:
        return None, None, 0
    kept = {k: entry for k, entry in held.entries.items() if entry[1] > fired_us}
    removed = len(held.entries) - len(kept)
    if not kept:
        return None, None, removed
    timer = timer_for(min(entry[1] for entry in kept.values()), grid_us)
    return Expiring(kept, timer), timer, removed
