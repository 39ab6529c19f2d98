"""The state key of the per-event stateful steps, per runner: the one place that chooses.

`DropDuplicates` (per event id) and `FirstOrderLine` (per order line) keep
state per natural key on Dataflow: a key per id spreads over every worker,
and Dataflow drops a key's state once it is cleared. The bundle-based
DirectRunner does neither: it keeps an entry for every key it has ever seen
(``EvaluationContext._transform_keyed_states`` is never pruned), scans all of
them for timers after every bundle, and runs a stateful step as one bundle
per key. Per-event keys therefore make a long local run slower minute by
minute (docs/streaming-directrunner.md, measured). On that runner the same
steps key their state by ``LOCAL_BUCKETS`` buckets of the natural key
(``crc32``), each bucket holding its entries with their own expiries and one
timer (`models.expiring_entries`); the DoFns are the same, a natural key
being a bucket of one.

Rolling popularity's per-period sums are chosen here too, for the same
reason: on Dataflow `SumPerPeriod` sums each period per (level, segment,
sku) cell key (a `CombinePerKey`, which spreads the sums over workers)
before `CellsPerPeriod` gathers the period; on the local runner every cell
key would be one more entry it keeps and scans for ever (catalogue x
segments of them, growing through a run), so the cells go straight into
`CellsPerPeriod`, whose accumulator is already the per-key map
(`sums_per_cell_for`).

`state_keys_for(runner)` and `sums_per_cell_for(runner)` are the only places
the choice is made (as `reference.delivery_for` chooses how reference
versions travel); composites ask `state_keys_of(pipeline)` and
`sums_per_cell_of(pipeline)` when they are applied.
"""
from __future__ import annotations

import zlib
from typing import Hashable, NamedTuple, Optional

import apache_beam as beam
from apache_beam.options.pipeline_options import StandardOptions
from apache_beam.utils.timestamp import Timestamp

from models import expiring_entries

# The local runners: the bundle-based DirectRunner, which the job selects for "DirectRunner"
# or no runner, and the switching DirectRunner tests run on.
BUCKETED_RUNNERS = (None, "DirectRunner", "BundleBasedDirectRunner", "SwitchingDirectRunner")
# Buckets per step on the local runner: at most this many state keys ever, and at most this
# many per-key bundles per input bundle (a Pub/Sub pull there is up to 10 messages).
LOCAL_BUCKETS = 4
# Timer grid steps per TTL in a bucket: one timer firing per bucket per ttl / 16 at most; an
# entry outlives its expiry by less than that.
BUCKET_GRID_STEPS = 16


class StateKeys(NamedTuple):
    """How a per-event stateful step keys its state: natural keys (``buckets == 0``) or buckets."""

    buckets: int = 0

    @property
    def natural(self) -> bool:
        return self.buckets == 0

    def key_of(self, natural_key: Hashable) -> Hashable:
        """The state key of a natural key (a str, or a tuple of str): itself, or its bucket.

        A bucket key has the natural key's type (``"#3"``, or ``("#3", "")`` for
        a pair), so the step's key coder is the same under both keyings (only
        one keying runs in a pipeline, so the two never meet).
        """
        if self.natural:
            return natural_key
        parts = natural_key if isinstance(natural_key, tuple) else (natural_key,)
        text = "\x1f".join(str(p) for p in parts).encode("utf-8", "surrogatepass")
        bucket = f"#{zlib.crc32(text) % self.buckets}"
        return (bucket,) + ("",) * (len(parts) - 1) if isinstance(natural_key, tuple) else bucket

    def grid_us(self, ttl_us: int) -> int:
        """The timer grid (`models.expiring_entries.grid_of`): 1 ms for natural keys."""
        return expiring_entries.grid_of(ttl_us, 0 if self.natural else BUCKET_GRID_STEPS)


NATURAL = StateKeys(0)


def state_keys_for(runner: Optional[str]) -> StateKeys:
    """The state keys of the per-event stateful steps on ``runner``: the one place that chooses.

    Buckets on the local bundle-based DirectRunner (its keyed state and timer
    scans grow with every key ever seen), natural keys on Dataflow and every
    other runner (they scale out by key and drop cleared state).
    """
    return StateKeys(LOCAL_BUCKETS) if runner in BUCKETED_RUNNERS else NATURAL


def state_keys_of(pipeline: beam.Pipeline) -> StateKeys:
    """`state_keys_for` the runner named in ``pipeline``'s options."""
    return state_keys_for(pipeline.options.view_as(StandardOptions).runner)


def sums_per_cell_for(runner: Optional[str]) -> bool:
    """Whether popularity sums each period per (level, segment, sku) key on ``runner``.

    True on Dataflow and every other runner (`SumPerPeriod`, a `CombinePerKey`
    per cell key, spreads the per-cell sums over workers, and a key's state is
    dropped once its window closes); False on the local bundle-based
    DirectRunner, where each cell key would stay in its keyed states and timer
    scans for the rest of the run: there a period's cells go straight into
    `CellsPerPeriod` (one key, state per period window), which sums them per
    key in its accumulator, pre-summed per bundle by combiner lifting. The window
    popularity is the same either way, up to float rounding of the decayed sums.
    """
    return runner not in BUCKETED_RUNNERS


def sums_per_cell_of(pipeline: beam.Pipeline) -> bool:
    """`sums_per_cell_for` the runner named in ``pipeline``'s options."""
    return sums_per_cell_for(pipeline.options.view_as(StandardOptions).runner)


def expire_held(state, timer, fired_us: int, grid_us: int) -> None:
    """A per-event step's expiry timer fired: drop the entries due, re-arm at the next expiry.

    ``state`` is the step's `Expiring` cell and ``timer`` its event-time timer
    (`DropDuplicateIdsFn`, `FirstOrderLineFn`); the cell is cleared when nothing
    is left, so an idle key holds nothing.
    """
    held, next_us, _ = expiring_entries.expire(state.read(), fired_us, grid_us)
    if held is None:
        state.clear()
        return
    state.write(held)
    timer.set(Timestamp(micros=next_us))
