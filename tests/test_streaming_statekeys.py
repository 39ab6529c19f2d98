"""The per-event stateful steps keyed by natural keys (Dataflow) or by buckets (local runner).

`transforms.streaming.statekeys.state_keys_for` picks, per runner, whether
`DropDuplicates` and `FirstOrderLine` keep their state per event id / order
line or per bucket of them; the DoFns are the same either way. These tests
check that the choice is made in one place, that both keyings give the same
records and counts through a TestStream (duplicates, restated order lines,
copies after expiry), and that expired entries leave the state.
"""
import os
import re
from typing import Tuple

import apache_beam as beam
import pandas as pd
import pytest
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.pipeline import PipelineVisitor
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import TimestampedValue

from models import expiring_entries as entries
from models.config import DEFAULT_CONFIG
from models.streaming import WindowSpec
from tests.test_streaming_transforms import streaming_pipeline, summed
from transforms.streaming import DropDuplicates, FileReference, WindowedPopularity
from transforms.streaming.popularity import FirstOrderLineFn, order_line_key
from transforms.streaming.statekeys import (BUCKET_GRID_STEPS, LOCAL_BUCKETS, NATURAL,
                                            StateKeys, state_keys_for, sums_per_cell_for)

BASE = 1_800_000_000            # seconds; a multiple of every grid step used here
US = 1_000_000
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYINGS = [NATURAL, StateKeys(1), StateKeys(LOCAL_BUCKETS)]
KEYING_IDS = ["natural", "one_bucket", "local_buckets"]


def order(i, seconds, order_id=None, sku="S01", event_id=None):
    """An order record as ParseMessages emits it, timestamped at BASE + seconds."""
    return TimestampedValue({"event_id": event_id or f"E{i}", "user_id": f"U{i % 3}",
                             "event_name": "Placed Order", "sku": sku,
                             "order_id": order_id or f"O{i}", "quantity": 1, "price": 100.0,
                             "event_time_us": int((BASE + seconds) * US)}, BASE + seconds)


def finish(stream):
    return stream.advance_watermark_to(BASE + 10_000).advance_watermark_to_infinity()


# --- the seam ------------------------------------------------------------------------------------

@pytest.mark.parametrize("runner, buckets", [
    (None, LOCAL_BUCKETS), ("DirectRunner", LOCAL_BUCKETS),
    ("BundleBasedDirectRunner", LOCAL_BUCKETS), ("SwitchingDirectRunner", LOCAL_BUCKETS),
    ("DataflowRunner", 0), ("PortableRunner", 0), ("PrismRunner", 0), ("FlinkRunner", 0)])
def test_buckets_only_on_the_local_runner(runner, buckets):
    assert state_keys_for(runner) == StateKeys(buckets)
    assert state_keys_for(runner).natural == (buckets == 0)
    # Popularity's per-cell SumPerPeriod: everywhere but on the local runner.
    assert sums_per_cell_for(runner) is (buckets == 0)


def test_a_natural_key_is_itself_and_a_bucket_is_stable_and_bounded():
    assert NATURAL.key_of("E1") == "E1" and NATURAL.key_of(("O1", "S01")) == ("O1", "S01")
    keys = StateKeys(LOCAL_BUCKETS)
    ids = [f"E{i}" for i in range(2_000)]
    lines = [(f"O{i}", "S01") for i in range(2_000)]
    # A bucket key has its natural key's type, so the state key's coder is the same.
    assert {keys.key_of(k) for k in ids} == {f"#{b}" for b in range(LOCAL_BUCKETS)}
    assert {keys.key_of(k) for k in lines} == {(f"#{b}", "") for b in range(LOCAL_BUCKETS)}
    assert [keys.key_of(k) for k in ids] == [keys.key_of(k) for k in ids]   # stable
    assert keys.key_of("O1\x1fS01") == keys.key_of(("O1", "S01"))[0]        # joined as documented
    assert keys.key_of("\ud800") in {f"#{b}" for b in range(LOCAL_BUCKETS)}  # never raises


def _key_choices(runner):
    """What the job's composites, applied under ``runner``, key their state by."""
    options = PipelineOptions()
    options.view_as(StandardOptions).runner = runner
    options.view_as(StandardOptions).streaming = True
    pipeline = beam.Pipeline(runner="BundleBasedDirectRunner", options=options)   # never run
    records = pipeline | beam.Create([])
    _ = records | "Dedupe" >> DropDuplicates("events", pd.Timedelta(seconds=60))
    spec = WindowSpec(pd.Timedelta(seconds=20), pd.Timedelta(seconds=2), pd.Timedelta(seconds=2))
    reference = FileReference(ROOT, DEFAULT_CONFIG, 3600, "events")
    _ = records | "Popularity" >> WindowedPopularity(spec, reference, DEFAULT_CONFIG)
    found = {}

    class Visit(PipelineVisitor):
        def visit_transform(self, node):
            transform = getattr(node.transform, "_do_transform", node.transform)   # with_outputs
            name = node.full_label.split("/")[-1]
            if name in ("KeyByEventId", "FirstCopyOnly", "FirstOrderLine"):
                found[name] = transform.fn.keys
            elif name == "KeyByOrderLine":
                found[name] = transform.args[0]
            elif name in ("SumPerPeriod", "CellsPerPeriod"):
                found[name] = True

        enter_composite_transform = visit_transform

    pipeline.visit(Visit())
    return found


@pytest.mark.parametrize("runner", [None, "BundleBasedDirectRunner", "DataflowRunner"])
def test_the_job_composites_take_their_keys_from_the_seam(runner):
    found = _key_choices(runner)
    sums = {"CellsPerPeriod": True}
    if sums_per_cell_for(runner):
        sums["SumPerPeriod"] = True
    assert found == {**{name: state_keys_for(runner) for name in
                        ("KeyByEventId", "FirstCopyOnly", "KeyByOrderLine", "FirstOrderLine")},
                     **sums}
    assert ("SumPerPeriod" in found) is (runner == "DataflowRunner")


def test_only_the_seam_constructs_state_keys():
    """The choice is made in one place: nothing else in the job builds a `StateKeys`, names
    the local runners or asks for popularity's per-cell sums by runner name."""
    offenders = []
    for package in ("transforms", "pipelines", "models"):
        for directory, _, files in os.walk(os.path.join(ROOT, package)):
            for name in files:
                path = os.path.join(directory, name)
                if not name.endswith(".py") or path.endswith(os.path.join("streaming",
                                                                          "statekeys.py")):
                    continue
                with open(path) as handle:
                    text = handle.read()
                if re.search(r"\bStateKeys\(|\bLOCAL_BUCKETS\b|\bBUCKETED_RUNNERS\b"
                             r"|\bsums_per_cell_for\(", text):
                    offenders.append(os.path.relpath(path, ROOT))
    assert offenders == []


# --- the same records and counts under both keyings ---------------------------------------------

def dedupe_stream():
    """20 ids (TTL 60 s: expiries at +61..+80 s), copies within the TTL, copies after expiry.

    The watermark stops at +72 s: ids 1-5 expired more than one bucket grid step
    (60 s / 16 = 3.75 s) before it, ids 15-20 not yet; only those are copied then
    (an id within one grid step of its expiry may still be caught in a bucket:
    caught longer, never shorter).
    """
    stream = (TestStream()
              .advance_watermark_to(BASE)
              .add_elements([order(i, i) for i in range(1, 21)])
              .add_elements([order(i, i) for i in range(1, 21, 2)])          # 10 copies: dropped
              .advance_watermark_to(BASE + 30)
              .add_elements([order(2, 2), order(4, 4)])                       # dropped
              .advance_watermark_to(BASE + 72)
              .add_elements([order(i, i) for i in range(1, 6)])               # expired: pass
              .add_elements([order(i, i) for i in range(15, 21)])             # within: dropped
              .add_elements([order(21, 71), order(22, 71.5), order(21, 71)])  # one dropped
              .advance_watermark_to(BASE + 74)          # E1, admitted again already expired,
              .add_elements([order(1, 1)])              # is removed by a timer moved earlier
              .advance_watermark_to(BASE + 200)                               # all expired
              .add_elements([order(21, 71), order(20, 20)]))                  # pass again
    return finish(stream)


@pytest.mark.parametrize("keys", KEYINGS, ids=KEYING_IDS)
def test_dedupe_gives_the_same_records_and_counts_under_every_keying(keys):
    expected = ([f"E{i}" for i in range(1, 21)] + [f"E{i}" for i in range(1, 6)]
                + ["E21", "E22", "E1", "E21", "E20"])
    with streaming_pipeline() as p:
        out = p | dedupe_stream() | DropDuplicates("events", pd.Timedelta(seconds=60), keys)
        assert_that(out.rows | beam.Map(lambda r: r["event_id"]), equal_to(expected),
                    label="Rows")
        assert_that(summed("Counts", out.counts),
                    equal_to([{"events.deduplicated": 10 + 2 + 6 + 1}]), label="Counts")


SPEC = WindowSpec(pd.Timedelta(seconds=40), pd.Timedelta(seconds=2), pd.Timedelta(seconds=8))


def order_lines_stream():
    """Order lines (TTL = size + lateness = 48 s) with copies under other event ids.

    O1/S01 first at +10 s, then an earlier copy at +5 s (restated: -1 at 10,
    +1 at 5), then a copy at +8 s (repeated); O2/S02 twice at +12 s
    (repeated); O3..O14 one line each; after the watermark passes +10 + 48 +
    one grid step (3 s), O1/S01 comes again and counts again.
    """
    stream = (TestStream()
              .advance_watermark_to(BASE)
              .add_elements([order(1, 10, "O1", "S01", "A1"), order(2, 12, "O2", "S02", "A2")])
              .add_elements([order(3, 5, "O1", "S01", "A3"), order(4, 12, "O2", "S02", "A4")]
                            + [order(i, i, f"O{i}", f"S{i % 5:02d}", f"A{i}")
                               for i in range(5, 15)])
              .advance_watermark_to(BASE + 20)
              .add_elements([order(15, 8, "O1", "S01", "A15"), order(16, 14, "O14", "S04",
                                                                      "A16")])
              .advance_watermark_to(BASE + 64)          # O1/S01 (expiry +58) and O2 forgotten
              .add_elements([order(17, 30, "O1", "S01", "A17"),     # counts again
                             order(18, 14, "O14", "S04", "A18")])     # expiry +62+: forgotten
              .advance_watermark_to(BASE + 300)
              .add_elements([order(19, 13, "O2", "S02", "A19")]))   # counts again
    return finish(stream)


def _counted(element):
    order_id, sku, line, sign = element
    return order_id, sku, line.event_id, line.at_us // US - BASE, sign


@pytest.mark.parametrize("keys", KEYINGS, ids=KEYING_IDS)
def test_first_order_line_gives_the_same_lines_and_counts_under_every_keying(keys):
    expected = ([("O1", "S01", "A1", 10, 1), ("O2", "S02", "A2", 12, 1),
                 ("O1", "S01", "A1", 10, -1), ("O1", "S01", "A3", 5, 1)]
                + [(f"O{i}", f"S{i % 5:02d}", f"A{i}", i, 1) for i in range(5, 15)]
                + [("O1", "S01", "A17", 30, 1), ("O14", "S04", "A18", 14, 1),
                   ("O2", "S02", "A19", 13, 1)])
    with streaming_pipeline() as p:
        out = (p | order_lines_stream()
               | "Key" >> beam.Map(order_line_key, keys).with_output_types(
                   Tuple[Tuple[str, str], Tuple[Tuple[str, str], dict]])
               | "FirstOrderLine" >> beam.ParDo(FirstOrderLineFn(SPEC, keys)).with_outputs(
                   "counts", main="rows"))
        assert_that(out.rows | beam.Map(_counted), equal_to(expected), label="Lines")
        assert_that(summed("Counts", out.counts),
                    equal_to([{"popularity.order_lines.restated": 1,
                               "popularity.order_lines.repeated": 3}]), label="Counts")


# --- expired entries leave the state --------------------------------------------------------------

def test_a_bucket_holds_only_entries_within_ttl_plus_one_grid_step():
    """12 events/s into 4 buckets for 10 minutes with the watermark 1 s behind: each bucket's
    timer removes exactly the entries due (never one before its expiry), the held entries stay
    within rate x (ttl + grid + lag), and everything is gone once the watermark passes."""
    keys, ttl_us, rate, lag_us = StateKeys(4), 60 * US, 12, 1 * US
    grid = keys.grid_us(ttl_us)
    assert grid == ttl_us // BUCKET_GRID_STEPS
    held, timers, firings, most = {}, {}, 0, 0
    watermark = 0

    def fire_due(upto):
        nonlocal firings
        for bucket in list(timers):
            while bucket in timers and timers[bucket] <= upto:
                fired = timers.pop(bucket)
                before = dict(held[bucket].entries)
                kept, timer, removed = entries.expire(held[bucket], fired, grid)
                firings += 1
                assert all(exp <= fired for k, (_, exp) in before.items()
                           if kept is None or k not in kept.entries)
                assert kept is None or all(exp > fired for _, exp in kept.entries.values())
                assert removed == len(before) - (0 if kept is None else len(kept.entries))
                if kept is None:
                    del held[bucket]
                else:
                    held[bucket], timers[bucket] = kept, timer

    for n in range(rate * 600):
        at = n * US // rate
        event_id = f"E{n}"
        bucket = keys.key_of(event_id)
        state, timer = entries.admit(held.get(bucket), event_id, True, at + ttl_us, grid)
        held[bucket] = state
        if timer is not None:
            timers[bucket] = timer
        watermark = max(watermark, at - lag_us)
        fire_due(watermark)
        most = max(most, sum(len(s.entries) for s in held.values()))
    assert most <= rate * (ttl_us + grid + lag_us) / US + 1
    assert most >= rate * ttl_us / US                     # not removed before expiry
    assert firings <= 4 * (600 * US // grid + 2)          # one per bucket per grid step
    fire_due(watermark + ttl_us + 2 * grid)
    assert held == {} and timers == {}


def test_with_natural_keys_the_timer_is_the_expiry_to_the_millisecond():
    held, timer = entries.admit(None, "E1", True, 5_000_400, NATURAL.grid_us(60 * US))
    assert timer == 5_001_000 and held.timer_us == 5_001_000
    assert entries.expire(held, timer, 1_000) == (None, None, 1)


# --- popularity's period sums: per cell key (Dataflow) or straight into the period (local) ------

POPULARITY_SPEC = WindowSpec(pd.Timedelta(seconds=20), pd.Timedelta(seconds=5),
                             pd.Timedelta(seconds=10))


def popularity_stream():
    """Orders of four users over 12 periods: repeated and restated lines, late and too late.

    Windows of 20 s every 5 s, 10 s lateness. O3/S03 comes first at +9 s, then
    under another event name at +3 s (restated: -1 at 9, +1 at 3), then at
    +11 s (repeated); after the windows ending at +15 and +20 fired, an order at
    +12 s is late but allowed (late panes), one at +4 s after +35 too late.
    """
    from tests.test_streaming_transforms import order as line
    users, skus = ["U1", "U2", "U3", "U4"], [f"S{i:02d}" for i in range(1, 13)]
    first = [line(i, i, users[i % 4], skus[(i * 5) % 12]) for i in range(1, 21) if i != 3]
    return finish(TestStream()
                  .advance_watermark_to(BASE)
                  .add_elements([line(3, 9, "U3", "S03")] + first[:10])
                  .add_elements([line(30, 3, "U3", "S03", "Ordered Product", "O3")]
                                + first[10:])
                  .add_elements([line(31, 11, "U3", "S03", "Consumer Website Order", "O3")])
                  .advance_watermark_to(BASE + 22)
                  .add_elements([line(32, 12, "U2", "S07"), line(33, 24, "U1", "S02")])
                  .advance_watermark_to(BASE + 36)
                  .add_elements([line(34, 4, "U4", "S09")]                 # too late
                                + [line(40 + i, 36 + i, users[i % 4], skus[i % 12])
                                   for i in range(24)])
                  .advance_watermark_to(BASE + 61))


class _PaneFacts(beam.DoFn):
    """A pane as comparable facts, tagged by graph: rows rounded where float sums may differ."""

    def __init__(self, graph):
        self._graph = graph

    def process(self, pane):
        rows = sorted((r.level, r.segment, r.sku, float(r.weight), int(r.orders))
                      for r in pane.popularity.itertuples(index=False))
        yield (self._graph, int(pane.window_end.timestamp()) - BASE, pane.timing, pane.cells,
               pane.lines, tuple(rows))


def _same_panes_in_both_graphs(actual):
    by_graph = {"per_cell": {}, "per_period": {}}
    for graph, end, timing, cells, lines, rows in actual:
        assert (end, timing) not in by_graph[graph], (graph, end, timing)
        by_graph[graph][(end, timing)] = (cells, lines, rows)
    per_cell, per_period = by_graph["per_cell"], by_graph["per_period"]
    assert sorted(per_cell) == sorted(per_period)
    assert len(per_cell) >= 10 and all(lines > 0 for _, lines, _ in per_cell.values())
    for window, (cells, lines, rows) in per_cell.items():
        other_cells, other_lines, other_rows = per_period[window]
        assert (cells, lines, len(rows)) == (other_cells, other_lines, len(other_rows)), window
        for row, other in zip(rows, other_rows):
            assert row[:3] == other[:3] and row[4] == other[4], (window, row, other)
            assert other[3] == pytest.approx(row[3], rel=1e-9, abs=1e-12), (window, row, other)


def test_both_period_sums_give_the_same_window_popularity_and_counts(tmp_path):
    """The same stream through the per-cell graph (Dataflow's) and the local one, side by side."""
    from tests.test_streaming_transforms import small_world
    reference = FileReference(small_world(tmp_path / "w"), DEFAULT_CONFIG, 0, "")
    with streaming_pipeline() as p:
        orders = p | popularity_stream()
        graphs = {graph: orders | f"Popularity_{graph}" >> WindowedPopularity(
            POPULARITY_SPEC, reference, DEFAULT_CONFIG, sums_per_cell=(graph == "per_cell"))
            for graph in ("per_cell", "per_period")}
        facts = ([out.panes | f"Facts_{graph}" >> beam.ParDo(_PaneFacts(graph))
                  for graph, out in graphs.items()]
                 | "AllFacts" >> beam.Flatten())
        assert_that(facts, _same_panes_in_both_graphs, label="Panes")
        # Counters are integers: equal exactly. Lines 20 + 2 + 1 + 24 (O3's restatement
        # nets to 0); 15 windows; the late order restates the windows ending at +15 and +20.
        for graph, out in graphs.items():
            assert_that(summed(f"Counts_{graph}", out.counts), equal_to([{
                "popularity.order_lines": 20 + 2 + 1 + 24,
                "popularity.order_lines.restated": 1, "popularity.order_lines.repeated": 1,
                "popularity.panes": 15, "popularity.cells": 574,
                "popularity.late_panes": 2, "popularity.late_cells": 98}]),
                label=f"Counts_{graph}")
