"""Every reader of the reference data takes its version from the side input on Dataflow.

On the FnApiRunner (where Beam runs the side-input pattern locally, over a
bounded `PeriodicImpulse` in the past) the process first holds the old
reference data, the files are then replaced, and each consumer is run twice:
with the versions side input it serves the replaced data at once; polling
(hourly, the control) it goes on serving the old. `SegmentWeightsFn` is also
fed two versions in consecutive intervals, and a line of the earlier interval
is counted in the old segment while one of the later interval is counted in
the new. The poll seam on the DirectRunner is what tests/test_streaming_transforms.py
runs unchanged; tests/test_streaming_step_labels.py pins both graphs.
"""
import os
from typing import Tuple

import apache_beam as beam
import pandas as pd
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import FixedWindows, GlobalWindows, TimestampedValue
from apache_beam.utils.timestamp import Timestamp

from models import streaming as model
from models.bandit import BanditConfig
from models.config import DEFAULT_CONFIG
from models.stream_popularity import LineState
from tests.test_streaming_transforms import _catalog_rows, _write_jsonl, small_world
from transforms.streaming import (FileReference, RefreshRecommendations, ReferenceVersion,
                                  ReferenceVersions, StreamingBandit, WindowedPopularity)
from transforms.streaming.popularity import SegmentWeightsFn
from transforms.streaming.reference import (POLL, SIDE_INPUT, into_version_windows,
                                            version_side_input)
from transforms.streaming.refresh import RefreshShardFn

CONFIG = DEFAULT_CONFIG
PAST = 1_700_000_000     # seconds: in the past, so a bounded PeriodicImpulse fires at once
INTERVAL = 10
US = 1_000_000
HISTORY = [{"event_id": "H1", "event_time": "2023-11-10T00:00:00Z", "user_id": "U1",
            "event_name": "Placed Order", "sku": "S02", "quantity": 1, "price": 101.0,
            "order_id": "OH1"}]
# The replaced history adds an order of S06 by a Honda owner.
HISTORY_REPLACED = HISTORY + [{**HISTORY[0], "event_id": "H2", "user_id": "U3", "sku": "S06",
                               "order_id": "OH2"}]


def _fnapi():
    return TestPipeline(runner="FnApiRunner", options=PipelineOptions([]))


def _users(u1_make="Ford", u1_model="Mustang", u1_year=2015):
    rows = [{"user_id": f"U{i}", "email": f"u{i}@example.com",
             "make": "Ford" if i <= 2 else "Honda", "model": "Mustang" if i <= 2 else "Civic",
             "year": 2015 if i <= 2 else 2018, "updated_at": "2026-01-01T00:00:00Z"}
            for i in range(1, 5)]
    rows[0].update(make=u1_make, model=u1_model, year=u1_year)
    return rows


def _replace(directory, table, rows):
    """Rewrites a reference file with a modification time a minute later (a new version)."""
    path = os.path.join(directory, f"{table}.jsonl")
    before = os.stat(path).st_mtime
    _write_jsonl(path, rows)
    os.utime(path, (before + 60, before + 60))


def _held_then_replaced(tmp_path, history=(), refresh=3600):
    """A reference whose process holds the old data; its files replaced since (U1 now drives
    a Honda Civic, the history gains an order of S06). Returns (reference, old version)."""
    directory = small_world(tmp_path / "w", history)
    reference = FileReference(directory, CONFIG, refresh, "events" if history else "")
    reference.delivery = SIDE_INPUT
    old = reference.polled()
    assert reference.current(old).version == old.fingerprint     # held, polled hourly
    _replace(directory, "users", _users("Honda", "Civic", 2018))
    if history:
        _replace(directory, "events", HISTORY_REPLACED)
    assert reference.fingerprint() != old.fingerprint
    return reference, old


def _versions(p, reference, intervals=3):
    return p | "Versions" >> ReferenceVersions(reference, Timestamp(PAST),
                                               Timestamp(PAST + intervals * INTERVAL))


def _timestamped(p, label, records):
    return (p | label >> beam.Create(records)
            | f"{label}Stamped" >> beam.Map(
                lambda r: TimestampedValue(r, r["event_time_us"] / US)).with_output_types(dict))


# --- SegmentWeights: a line counts in its buyer's segment of the version in force --------------

class _CellsOfLine(beam.DoFn):
    def process(self, cell, window=beam.DoFn.WindowParam):
        (level, segment, sku), _ = cell
        yield sku, segment


def _segments_by_sku(pairs):
    out = {}
    for sku, segment in pairs:
        out.setdefault(sku, set()).add(segment)
    return out


def test_segment_weights_count_a_line_in_the_segment_of_the_version_of_its_interval(tmp_path):
    """Two versions in one run: the old one checked for the first interval, the replaced one for
    the third. U1's line in the first interval counts under Ford, the next one under Honda.
    (Every line has a version here, so the 10-second poll is never asked.)"""
    reference, old = _held_then_replaced(tmp_path, refresh=INTERVAL)
    new = ReferenceVersion(old.checked_at + 20, reference.fingerprint())
    lines = [("O1", "S01", LineState((PAST + 1) * US, "E1", "U1"), 1),
             ("O2", "S02", LineState((PAST + 25) * US, "E2", "U1"), 1)]
    with _fnapi() as p:
        versions = (p | "Versions" >> beam.Create(
            [TimestampedValue(old, PAST), TimestampedValue(new, PAST + 20)], reshuffle=False)
            | "VersionWindows" >> beam.WindowInto(FixedWindows(INTERVAL)))
        counted = (p | "Lines" >> beam.Create(lines, reshuffle=False)   # in time order
                   | "Stamp" >> beam.Map(lambda l: TimestampedValue(l, l[2].at_us / US)))
        cells = (into_version_windows(reference, "IntoReferenceWindows", counted)
                 | "SegmentWeights" >> beam.ParDo(SegmentWeightsFn(reference, CONFIG),
                                                  **version_side_input(versions)).with_outputs(
                     "counts", main="rows"))
        got = (cells.rows | beam.ParDo(_CellsOfLine())
               | beam.WindowInto(GlobalWindows()) | beam.combiners.ToList())

        def segments(actual):
            by_sku = _segments_by_sku(actual[0])
            assert "FORD|MUSTANG|2015" in by_sku["S01"] and not any(
                "HONDA" in s for s in by_sku["S01"]), by_sku
            assert "HONDA|CIVIC|2018" in by_sku["S02"] and not any(
                "FORD" in s for s in by_sku["S02"]), by_sku
        assert_that(got, segments)


# --- WindowedPopularity: SegmentWeights and PopularityAtWindowEnd through the composite ---------

def _orders():
    return [{"event_id": f"E{i}", "user_id": "U1", "event_name": "Placed Order", "sku": sku,
             "order_id": f"O{i}", "quantity": 1, "price": 100.0,
             "event_time_us": (PAST + second) * US}
            for i, (second, sku) in enumerate([(1, "S05"), (12, "S07"), (23, "S08")])]


class _PaneFacts(beam.DoFn):
    def process(self, pane):
        makes = sorted({seg.split("|")[0] for level, seg in pane.segments if "|" in seg})
        history_s06 = bool(((pane.popularity["sku"] == "S06")).any())
        yield int(pane.window_end.value // 10**9), tuple(makes), history_s06


def test_windowed_popularity_reads_the_replaced_users_and_history_from_the_side_input(tmp_path):
    """Every window: U1's orders under Honda (the replaced users, at ingest) and the replaced
    history's S06 in the window's popularity (at the window's end)."""
    want = [(PAST + 10, ("HONDA",), True), (PAST + 20, ("HONDA",), True),
            (PAST + 30, ("HONDA",), True), (PAST + 40, ("HONDA",), True)]
    reference, _ = _held_then_replaced(tmp_path, HISTORY)
    spec = model.WindowSpec.of_seconds(2 * INTERVAL, INTERVAL, 0)
    with _fnapi() as p:
        orders = _timestamped(p, "Orders", _orders())
        popularity = orders | WindowedPopularity(spec, reference, CONFIG,
                                                 _versions(p, reference, 4))
        assert_that(popularity.first_panes | beam.ParDo(_PaneFacts()), equal_to(want))


def test_windowed_popularity_polling_hourly_keeps_the_old_users_and_history(tmp_path):
    """The control: no side input, the hourly poll has not re-checked."""
    want = [(PAST + 10, ("FORD",), False), (PAST + 20, ("FORD",), False),
            (PAST + 30, ("FORD",), False), (PAST + 40, ("FORD",), False)]
    reference, _ = _held_then_replaced(tmp_path / "poll", HISTORY)
    spec = model.WindowSpec.of_seconds(2 * INTERVAL, INTERVAL, 0)
    with _fnapi() as p:
        orders = _timestamped(p, "Orders", _orders())
        popularity = orders | WindowedPopularity(spec, reference, CONFIG)
        assert_that(popularity.first_panes | beam.ParDo(_PaneFacts()), equal_to(want))


# --- the bandit's segments ----------------------------------------------------------------------

def _treatments():
    kinds = ("SENT", "DELIVERED", "VIEWED")
    return [{"event_id": f"T{i}", "user_id": "U1", "treatment_id": "T1", "campaign_id": "C",
             "kind": kinds[i % 3], "event_time_us": (PAST + 1 + i) * US} for i in range(6)]


class _Segments(beam.DoFn):
    def process(self, frame):
        for segment in frame["segment"]:
            yield segment


def _bandit_segments(tmp_path, with_side_input):
    reference, _ = _held_then_replaced(tmp_path)
    spec = model.WindowSpec.of_seconds(2 * INTERVAL, INTERVAL, 0)
    with _fnapi() as p:
        versions = _versions(p, reference) if with_side_input else None
        out = (_timestamped(p, "Treatments", _treatments())
               | StreamingBandit(BanditConfig(draws=200), spec, reference, ("make", "model"),
                                 versions))
        segments = (out.rows | beam.ParDo(_Segments())
                    | beam.Filter(lambda s: s != "*") | beam.Distinct())
        want = ["HONDA|CIVIC"] if with_side_input else ["FORD|MUSTANG"]
        assert_that(segments, equal_to(want))


def test_bandit_arms_follow_the_users_of_the_side_input_version(tmp_path):
    _bandit_segments(tmp_path / "side", True)


def test_bandit_arms_polling_hourly_keep_the_old_users(tmp_path):
    _bandit_segments(tmp_path / "poll", False)


# --- the refresh --------------------------------------------------------------------------------

class _Recs(beam.DoFn):
    def process(self, frame):
        for row in frame.to_dict("records"):
            yield row["user_id"], tuple(sorted(row[f"rec_part_{i}"] for i in range(1, 5)))


def shard_period(p, label, end_us, requests):
    """One gathered (shard, period) as `GatherShard` emits it, in its refresh period's window.

    (The FnApiRunner's in-process state cache sizes every state value by walking the loaded
    modules, which makes `GatherPeriod`'s timers crawl here; the DirectRunner tests run it.)
    """
    element = ((0, end_us), [list(requests)])
    return (p | label >> beam.Create([element], reshuffle=False)
            | f"{label}AtPeriodEnd" >> beam.Map(
                lambda e: TimestampedValue(e, Timestamp(micros=e[0][1] - 1)))
            | f"{label}Periods" >> beam.WindowInto(FixedWindows(INTERVAL)))


def test_the_refresh_scores_with_the_catalogue_of_the_side_input_version(tmp_path):
    """U1 (a Ford) is refreshed in the second period, through the whole `RefreshRecommendations`
    composite; the replaced catalogue marks S01-S04 refurbished, which leaves S05-S08 as the
    Ford's only eligible parts. The control (polling hourly) runs first: afterwards the
    process holds the replaced catalogue."""
    directory = small_world(tmp_path / "w")
    reference = FileReference(directory, CONFIG, 3600, "")
    reference.delivery = SIDE_INPUT
    reference.current()                                     # the old catalogue, held
    _replace(directory, "catalog", _catalog_rows(refurbished=("S01", "S02", "S03", "S04")))
    spec = model.WindowSpec.of_seconds(2 * INTERVAL, INTERVAL, 0)
    request = ("U1", model.RefreshRequest((model.REASON_INTENT,), (
        ("E1", "Viewed Product", "S01", None, (PAST + 12) * US),)))
    for with_side_input in (False, True):
        with _fnapi() as p:
            versions = _versions(p, reference) if with_side_input else None
            requests = (p | "Requests" >> beam.Create([request])
                        | "Stamp" >> beam.Map(lambda r: TimestampedValue(r, PAST + 12)))
            out = requests | RefreshRecommendations(
                reference, p | "NoPopularity" >> beam.Create([]), CONFIG, spec, 2, "run", "v",
                clock=lambda: 0.0, versions=versions)
            recs = out.rows | beam.ParDo(_Recs())
            ends = out.rows | beam.FlatMap(lambda f: [int(t.value // 10**9)
                                                      for t in f["popularity_as_of"]])
            assert_that(ends, equal_to([PAST + 20]), label="PeriodEnd")
            if with_side_input:
                assert_that(recs, equal_to([("U1", ("S05", "S06", "S07", "S08"))]))
            else:   # the control: the old catalogue, where S01-S04 are still eligible
                assert_that(recs, _old_catalogue)


def _old_catalogue(got):
    assert len(got) == 1 and got[0][0] == "U1", got
    assert set(got[0][1]) & {"S01", "S02", "S03", "S04"}, got


# --- every reader of a version, wired in the job's graph ---------------------------------------

READERS = {   # step → the side inputs it must read on Dataflow (a ranker, bandit segments)
    "CheckEventSkus/KnownSkusOnly": {"ReferenceVersions/CheckVersion"},
    "RollingPopularity/SegmentWeights": {"ReferenceVersions/CheckVersion"},
    "RollingPopularity/PopularityAtWindowEnd": {"ReferenceVersions/CheckVersion"},
    "RollingBanditState/SegmentOfUser": {"ReferenceVersions/CheckVersion"},
    "RankingChanges/VehiclePicks": {"ReferenceVersions/CheckVersion"},
    "RankingChanges/NotifyUsers": {"ReferenceVersions/CheckVersion"},
    "RefreshRecommendations/RefreshShard": {"ReferenceVersions/CheckVersion",
                                            "RankerVersions/CheckVersion"},
}


def _side_inputs_of_steps(delivery):
    from tests.test_streaming_step_labels import SUBSCRIPTIONS, VARIANT_CONFIGS
    from pipelines import streaming_refresh as job
    from transforms.streaming import ModelReference
    from apache_beam.options.pipeline_options import StandardOptions
    config = VARIANT_CONFIGS["tuned_mix"]
    options = PipelineOptions(["--events_subscription", SUBSCRIPTIONS[0],
                               "--treatments_subscription", SUBSCRIPTIONS[1],
                               "--streaming_dataset", "test-project.recs", "--input_dir", "unused",
                               "--bandit_segment_by", "make,model"])
    options.view_as(StandardOptions).streaming = True
    ctx = job.StreamingContext("run", pd.Timestamp("2026-01-01", tz="UTC"), "test-project",
                               "test-project.recs", model.WindowSpec.of_seconds(3600, 60, 600),
                               config, BanditConfig(), pd.Timedelta(seconds=600))
    reference = FileReference("unused", config, 60)
    ranker = ModelReference("unused", config, 60)
    reference.delivery = ranker.delivery = delivery
    pipeline = beam.Pipeline(options=options)
    job.build(pipeline, options, ctx, reference, ranker)
    found = {}

    class Steps(beam.pipeline.PipelineVisitor):
        def visit_transform(self, node):   # a multi-output ParDo's leaf is <step>/ParDo(<Fn>)
            step = node.full_label.split("/ParDo(")[0]
            if step in READERS:
                found[step] = {s.pvalue.producer.full_label for s in node.side_inputs}

    pipeline.visit(Steps())
    return found


def test_every_reader_takes_the_versions_as_side_inputs_on_dataflow_and_none_when_polling():
    side = _side_inputs_of_steps(SIDE_INPUT)
    for step, wanted in READERS.items():
        assert wanted <= side[step], (step, side[step])
    polled = _side_inputs_of_steps(POLL)
    for step in READERS:
        assert not {s for s in polled[step] if "Versions" in s}, (step, polled[step])


# --- period timers on portable runners (whole-millisecond timer times) ---------------------------

class _Bag:
    def __init__(self, items=()):
        self.items = list(items)

    def read(self):
        return list(self.items)

    def add(self, item):
        self.items.append(item)

    def clear(self):
        self.items = []


class _Cell:
    def __init__(self, value=None):
        self.value = value

    def read(self):
        return self.value

    def write(self, value):
        self.value = value

    def clear(self):
        self.value = None


class _Timer:
    def __init__(self):
        self.set_at = []

    def set(self, at):
        self.set_at.append(at)


def test_a_period_timer_fired_at_a_whole_millisecond_releases_its_period():
    """The FnApiRunner and Dataflow's runner v2 keep timer times in whole milliseconds: the
    timer set at a period's end - 1 us fires at end - 1 ms. The period's requests (and
    counter sums) are released then, not held with the timer set again at the same instant
    (which looped for ever on the FnApiRunner)."""
    from transforms.streaming.health import PeriodSumsFn
    from transforms.streaming.refresh import GatherPeriodFn
    end = (PAST + 10) * US
    fired = Timestamp(micros=end - 1_000)
    request = model.RefreshRequest((model.REASON_INTENT,), ())
    flush = _Timer()
    out = list(GatherPeriodFn(pd.Timedelta(seconds=INTERVAL)).release(
        key=0, fired=fired, pending=_Bag([(end, ("U1", request))]), next_end=_Cell(end),
        released=_Cell(), flush=flush))
    assert out == [((0, end), [("U1", request)])] and flush.set_at == []
    flush = _Timer()
    rows = list(PeriodSumsFn(INTERVAL * US).release(
        fired=fired, sums=_Bag([(end, {"events.read": 3})]), flush=flush))
    assert [(r["window_end"], r["counters"]) for r in rows] == [
        (pd.Timestamp(end, unit="us", tz="UTC"), '{"events.read": 3}')]
    assert flush.set_at == []


def test_health_counters_per_period_on_the_fnapi_runner():
    from transforms.streaming import PeriodCounters
    counts = [TimestampedValue(("events.read", 1), PAST + s) for s in (1, 2, 12)]
    with _fnapi() as p:
        rows = (p | beam.Create(counts).with_output_types(Tuple[str, int])
                | PeriodCounters(pd.Timedelta(seconds=INTERVAL))
                | beam.Map(lambda r: (int(r["window_end"].value // 10**9), r["counters"])))
        assert_that(rows, equal_to([(PAST + 10, '{"events.read": 2}'),
                                    (PAST + 20, '{"events.read": 1}')]))
