"""Tests of the streaming composites (transforms/streaming/) and their pure logic.

Time is tested with TestStream (watermark, on-time / late / too-late elements,
explicit allowed lateness); data with TestPipeline over bounded timestamped
input; the Pub/Sub and BigQuery I/O in tests/test_streaming_e2e.py.
"""
import json
import os

import apache_beam as beam
import numpy as np
import pandas as pd
import pytest
from apache_beam.io.gcp.pubsub import PubsubMessage
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms import trigger, window
from apache_beam.transforms.window import TimestampedValue

from models import campaign, contracts, profiles, recommend
from models import streaming as model
from models.bandit import BanditConfig
from models.config import DEFAULT_CONFIG, RankingNoticesConfig
from models.popularity import partial_popularity
from models.world import WorldSpec, generate, write_world
from transforms.health import SumCounts
from transforms.io import read_frame
from transforms.recommend import DropUnknownSkusFn
from transforms.streaming import (CheckFunnel, CheckSkus, DropDuplicates, FileReference,
                                  LateDataAudit, ParseMessages, RankingChanges,
                                  RefreshRecommendations, StreamingBandit, TouchedUsers,
                                  WindowedPopularity, dead_letter, shard_of_user,
                                  KeyOrRefuseFn, ParseMessagesFn,
                                  to_bigquery_row, treatment_counts)

CONFIG = DEFAULT_CONFIG
BASE = 1_800_000_000            # seconds; a multiple of every window length used here
US = 1_000_000
SKUS = [f"S{i:02d}" for i in range(1, 13)]


# --- a small hand-made world ------------------------------------------------------------------

def _write_jsonl(path, rows):
    with open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def _catalog_rows(refurbished=()):
    return [{"sku": sku, "title": sku, "part_type": f"Type{i % 6}", "brand": "B",
             "price": 100.0 + i, "image_url": f"https://img.example/{sku}.jpg",
             "tags": ["refurbished"] if sku in refurbished else [], "is_universal": False,
             "variant_group": None} for i, sku in enumerate(SKUS)]


def small_world(directory, history=()):
    """Two vehicles (Ford Mustang 2015: S01-S08, Honda Civic 2018: S05-S12), four users."""
    os.makedirs(directory, exist_ok=True)
    _write_jsonl(os.path.join(directory, "catalog.jsonl"), _catalog_rows())
    fitment = [{"sku": s, "make": "Ford", "model": "Mustang", "year": 2015} for s in SKUS[:8]]
    fitment += [{"sku": s, "make": "Honda", "model": "Civic", "year": 2018} for s in SKUS[4:]]
    _write_jsonl(os.path.join(directory, "fitment.jsonl"), fitment)
    users = [{"user_id": f"U{i}", "email": f"u{i}@example.com",
              "make": "Ford" if i <= 2 else "Honda", "model": "Mustang" if i <= 2 else "Civic",
              "year": 2015 if i <= 2 else 2018, "updated_at": "2026-01-01T00:00:00Z"}
             for i in range(1, 5)]
    _write_jsonl(os.path.join(directory, "users.jsonl"), users)
    _write_jsonl(os.path.join(directory, "events.jsonl"), list(history))
    return str(directory)


def order(i, seconds, user="U1", sku="S01", name="Placed Order", order_id=None):
    """An order record as ParseMessages emits it, timestamped at BASE + seconds."""
    at = (BASE + seconds) * US
    return TimestampedValue({"event_id": f"E{i}", "user_id": user, "event_name": name,
                             "sku": sku, "order_id": order_id or f"O{i}", "quantity": 1,
                             "price": 100.0, "event_time_us": at}, BASE + seconds)


def intent(i, seconds, user="U1", sku="S01", name="Viewed Product"):
    at = (BASE + seconds) * US
    return TimestampedValue({"event_id": f"E{i}", "user_id": user, "event_name": name,
                             "sku": sku, "order_id": None, "quantity": 1, "price": 100.0,
                             "event_time_us": at}, BASE + seconds)


def streaming_pipeline():
    options = PipelineOptions()
    options.view_as(StandardOptions).streaming = True
    return TestPipeline(options=options)


def summed(label, counts):
    """Counter elements of an unbounded test stream summed per name, once the stream ends."""
    return (counts
            | f"{label}Global" >> beam.WindowInto(
                window.GlobalWindows(), trigger=trigger.AfterWatermark(),
                accumulation_mode=trigger.AccumulationMode.DISCARDING)
            | f"{label}Sum" >> beam.CombinePerKey(sum)
            | f"{label}OneKey" >> beam.Map(lambda kv: (0, kv))
            | f"{label}Gather" >> beam.GroupByKey()
            | f"{label}Dict" >> beam.MapTuple(lambda _, kvs: dict(kvs)))


def finish(stream):
    """Watermark to a finite time past every window and timer, then to infinity.

    Timers fire as the watermark passes them; their output must not meet a
    downstream that already saw the final watermark.
    """
    return stream.advance_watermark_to(BASE + 10_000).advance_watermark_to_infinity()


class _Describe(beam.DoFn):
    """A WindowPopularity pane as comparable facts: (end - BASE, timing, first, cells, lines)."""

    def process(self, pane):
        yield (int(pane.window_end.timestamp()) - BASE, pane.timing, pane.is_first, pane.cells,
               pane.lines)


# --- parsing -------------------------------------------------------------------------------------

def _message(payload, **attributes):
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return PubsubMessage(data, attributes)


class _WithTimestamp(beam.DoFn):
    def process(self, record, timestamp=beam.DoFn.TimestampParam):
        yield record["event_id"], timestamp.micros, record["event_time_us"]


def test_parse_messages_stamps_event_time_and_dead_letters_bad_messages():
    good = {"event_id": "E1", "event_time": "2026-05-01T10:00:00Z", "user_id": "U1",
            "event_name": "Placed Order", "sku": "S01", "order_id": "O1", "price": 120.0}
    at = int(pd.Timestamp("2026-05-01T10:00:00Z").value // 1000)
    messages = [
        _message(good, event_time="2026-05-01T10:00:00Z"),
        _message({**good, "event_id": "E2"}),                                  # no attribute
        _message({**good, "event_id": "E3"}, event_time="yesterday"),           # unparseable
        _message({**good, "event_id": "E4"}, event_time="2026-05-01T11:00:00Z"),  # mismatch
        _message(b'{"event_id": "E5", "event_time": '),                         # truncated
        _message({**good, "event_id": "E6", "event_name": "Placed Order", "order_id": None}),
        _message({**good, "event_id": "E7", "event_time": "not a time"}),
        _message(b"[1, 2]"),
    ]
    # The contract's own words for a bad time (models/contracts.py decides them).
    bad_time = contracts.validate("events", contracts.records_frame(
        "events", [{**good, "event_id": "E7", "event_time": "not a time"}])).bad_reasons[0]
    with TestPipeline() as p:
        parsed = p | beam.Create(messages) | ParseMessages("events")
        assert_that(parsed.rows | beam.ParDo(_WithTimestamp()),
                    equal_to([(f"E{i}", at, at) for i in (1, 2, 3, 4)]), label="Stamped")
        assert_that(parsed.dead_letters | beam.Map(lambda d: (d["reason"], d["record"][:14])),
                    equal_to([("malformed JSON", '{"event_id": "'),
                              ("order event without order_id", '{"event_id": "'),
                              (bad_time, '{"event_id": "'),
                              ("record is not a JSON object", "[1, 2]")]), label="Dead")
        assert_that(parsed.counts | SumCounts(), equal_to([{
            "events.read": 8, "events.dead_lettered": 4,
            "dead_letter.malformed JSON": 1, "dead_letter.order event without order_id": 1,
            f"dead_letter.{bad_time}": 1,
            "dead_letter.record is not a JSON object": 1,
            "events.event_time_attribute.missing": 1,
            "events.event_time_attribute.unparseable": 1,
            "events.event_time_attribute.mismatch": 1}]), label="Counts")


def test_a_byte_order_mark_before_the_json_is_ignored():
    good = {"event_id": "E1", "event_time": "2026-05-01T10:00:00Z", "user_id": "U1",
            "event_name": "Viewed Product", "sku": "S01"}
    out = model.parse_messages("events", [b"\xef\xbb\xbf" + json.dumps(good).encode(),
                                          "\ufeff" + json.dumps(good)], [{}, {}])
    assert [r["event_id"] for r in out.records] == ["E1", "E1"] and out.bad == []


def test_dead_letters_keep_the_raw_payload_and_attributes():
    with TestPipeline() as p:
        parsed = p | beam.Create([_message(b"\xff not json", event_time="x")]) | ParseMessages(
            "treatment_events")
        reason = contracts.parse_json_line(b"\xff not json")[1]
        assert_that(parsed.dead_letters, equal_to([{
            "table": "treatment_events", "step": "ParseMessages", "reason": reason,
            "record": "\ufffd not json", "attributes": '{"event_time": "x"}'}]))


# --- duplicates -----------------------------------------------------------------------------------

def test_duplicates_are_dropped_within_the_ttl_and_counted():
    ttl = pd.Timedelta(seconds=60)
    stream = (TestStream()
              .advance_watermark_to(BASE)
              .add_elements([order(1, 1), order(2, 2)])
              .add_elements([order(1, 1)])                      # redelivered: dropped
              .advance_watermark_to(BASE + 30)
              .add_elements([order(2, 2)])                      # redelivered: dropped
              .advance_watermark_to(BASE + 100)                 # both ids forgotten
              .add_elements([order(1, 1)]))                      # passes again (documented)
    stream = finish(stream)
    with streaming_pipeline() as p:
        out = p | stream | DropDuplicates("events", ttl)
        assert_that(out.rows | beam.Map(lambda r: r["event_id"]),
                    equal_to(["E1", "E2", "E1"]), label="Rows")
        assert_that(summed("Counts", out.counts), equal_to([{"events.deduplicated": 2}]),
                    label="Counts")


# --- popularity: streaming agrees with batch -------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("tiny_world"))
    write_world(generate(WorldSpec.preset("tiny"), 7), directory, "jsonl", 0)
    return directory


def _batch_popularity(events, users, as_of, history=None):
    """The batch job's computation: order lines with segments, decayed at as_of."""
    attrs = list(CONFIG.segment_attributes)
    flagged = profiles.mark_duplicate_users(users, "email_lower")
    frame = events if history is None else pd.concat([history, events], ignore_index=True)
    lines = profiles.orders_with_segments(profiles.dedupe_events(frame).rows, flagged, attrs)
    return partial_popularity(lines, as_of, CONFIG)


def _frame_rows(frame):
    return sorted((r.level, r.segment, r.sku, round(r.weight, 9), int(r.orders))
                  for r in frame.itertuples(index=False))


class _PaneRows(beam.DoFn):
    def process(self, pane):
        yield int(pane.window_end.timestamp()), _frame_rows(pane.popularity)


@pytest.mark.parametrize("history", [False, True], ids=["stream_only", "history_plus_stream"])
def test_streaming_popularity_equals_batch_over_the_same_events(tiny_world, history):
    """Every window's popularity equals the batch job's over its events, as_of its end."""
    stream_table = "holdout_events" if history else "events"
    stream, _ = read_frame(tiny_world, stream_table)
    users, _ = read_frame(tiny_world, "users")
    history_events = read_frame(tiny_world, "events")[0] if history else None
    catalog, _ = read_frame(tiny_world, "catalog")
    stream = stream.loc[stream["sku"].isin(catalog["sku"])]
    stream = profiles.dedupe_events(stream).rows
    orders = stream.loc[stream["event_name"].isin(model.ORDER_EVENT_NAMES)]
    records = model.typed_records("events", orders)
    spec = model.WindowSpec.of_seconds(14 * 86_400, 7 * 86_400, 0)
    reference = FileReference(tiny_world, CONFIG, 0, "events" if history else "")
    times = [r["event_time_us"] for r in records]
    expected = {}
    for start, end in {w for t in times for w in spec.windows_of(t)}:
        inside = orders.loc[(model.micros(orders["event_time"]) >= start)
                            & (model.micros(orders["event_time"]) < end)]
        expected[end // US] = _frame_rows(_batch_popularity(
            inside, users, pd.Timestamp(end, unit="us", tz="UTC"), history_events))
    assert len(expected) >= 5
    chunks = np.array_split(np.argsort(times, kind="stable"), 4)
    test_stream = TestStream()
    for chunk in chunks:   # four arrivals, each followed by the watermark catching up
        test_stream = test_stream.add_elements(
            [TimestampedValue(records[i], records[i]["event_time_us"] / US) for i in chunk])
        test_stream = test_stream.advance_watermark_to(times[chunk[-1]] / US)
    test_stream = test_stream.advance_watermark_to(times[-1] / US + 10**7)
    test_stream = test_stream.advance_watermark_to_infinity()
    with streaming_pipeline() as p:
        panes = p | test_stream | WindowedPopularity(spec, reference, CONFIG)
        assert_that(panes.first_panes | beam.ParDo(_PaneRows()),
                    equal_to(sorted(expected.items())))


def test_bounded_timestamped_input_gives_the_same_windows(tmp_path):
    """The composite serves batch too: bounded input with event timestamps, one pane per window."""
    spec = model.WindowSpec.of_seconds(20, 10, 0)
    reference = FileReference(small_world(tmp_path / "w"), CONFIG, 0, "")
    orders = [order(1, 3), order(2, 12, sku="S02"), order(3, 12, sku="S02", name="Ordered Product",
                                                          order_id="O2")]
    with TestPipeline() as p:
        out = (p | beam.Create(orders).with_output_types(dict)
               | WindowedPopularity(spec, reference, CONFIG))
        # window ends 10, 20, 30; O2 is one line under two names; U1 has a segment at all
        # four levels, so each line is four cells.
        assert_that(out.panes | beam.ParDo(_Describe()), equal_to([
            (10, "ON_TIME", True, 4, 1), (20, "ON_TIME", True, 8, 2),
            (30, "ON_TIME", True, 4, 1)]), label="Panes")
        assert_that(out.counts | "Sum" >> beam.CombinePerKey(sum), equal_to([
            ("popularity.order_lines", 2), ("popularity.order_lines.repeated", 1),
            ("popularity.panes", 3), ("popularity.cells", 16)]), label="Counts")


# --- late data ---------------------------------------------------------------------------------------

def test_late_data_inside_and_beyond_allowed_lateness_is_counted(tmp_path):
    """Window [0, 10) with 5 s lateness: one on-time, one late-but-allowed, one too-late order."""
    spec = model.WindowSpec.of_seconds(10, 10, 5)
    reference = FileReference(small_world(tmp_path / "w"), CONFIG, 0, "")
    stream = (TestStream()
              .advance_watermark_to(BASE)
              .add_elements([order(1, 1)])                       # on time
              .advance_watermark_to(BASE + 12)                   # [0, 10) fires ON_TIME
              .add_elements([order(2, 2, sku="S02")])            # late, within 5 s: LATE pane
              .advance_watermark_to(BASE + 20)                   # [0, 10) expires at 15
              .add_elements([order(3, 3, sku="S03")])            # too late: dropped, counted
              .advance_watermark_to(BASE + 40)
              .add_elements([order(4, 4, sku="S04")]))            # even later: a further row
    stream = finish(stream)
    with streaming_pipeline() as p:
        orders = p | stream
        panes = orders | WindowedPopularity(spec, reference, CONFIG)
        audit = orders | LateDataAudit("orders", spec)
        # The late order is counted (a late pane restating the window's 4 + 4 cells), not
        # scored and discarded.
        assert_that(panes.panes | beam.ParDo(_Describe()), equal_to([
            (10, "ON_TIME", True, 4, 1)]), label="Panes")
        assert_that(summed("PopularityCounts", panes.counts), equal_to([{
            "popularity.order_lines": 4, "popularity.panes": 1, "popularity.cells": 4,
            "popularity.late_panes": 1, "popularity.late_cells": 8}]),
            label="PopularityCounts")
        assert_that(audit.rows | beam.Map(lambda r: (
            r["stream"], int(r["window_end"].timestamp()) - BASE, r["seen"], r["on_time"],
            r["late"], r["too_late"])), equal_to([
                ("orders", 10, 2, 1, 1, 0),     # settled at 15: on time and late-but-allowed
                ("orders", 10, 1, 0, 0, 1),     # each straggler after that: its own row
                ("orders", 10, 1, 0, 0, 1)]), label="Audit")
        assert_that(summed("Counts", audit.counts), equal_to([{
            "late.orders.allowed": 1, "late.orders.too_late": 2}]), label="Counts")


def test_sliding_windows_audit_each_window_separately(tmp_path):
    """An element late for one sliding window is on time for the next one."""
    spec = model.WindowSpec.of_seconds(20, 10, 0)
    stream = (TestStream()
              .advance_watermark_to(BASE)
              .add_elements([order(1, 5)])                  # windows [-10,10) and [0,20)
              .advance_watermark_to(BASE + 15)              # [-10, 10) settled
              .add_elements([order(2, 6)]))                  # too late for [-10,10), fine for [0,20)
    stream = finish(stream)
    with streaming_pipeline() as p:
        audit = p | stream | LateDataAudit("orders", spec)
        assert_that(audit.rows | beam.Map(lambda r: (
            int(r["window_end"].timestamp()) - BASE, r["seen"], r["on_time"], r["late"],
            r["too_late"])), equal_to([(10, 1, 1, 0, 0), (10, 1, 0, 0, 1), (20, 2, 2, 0, 0)]))


# --- touched users and their refresh -------------------------------------------------------------------

def test_user_signals_carry_the_users_recent_events_and_notices():
    with TestPipeline() as p:
        events = p | "Events" >> beam.Create([intent(1, 1).value, order(2, 2).value,
                                              intent(3, 3, user="U2").value])
        notices = p | "Notices" >> beam.Create([("U3", ("notice", model.REASON_SEGMENT))])
        requests = (events, notices) | TouchedUsers(CONFIG)
        assert_that(requests | beam.Map(lambda kv: (kv[0], kv[1].reasons,
                                                    tuple(e[0] for e in kv[1].events))),
                    equal_to([("U1", ("intent",), ("E1",)), ("U1", ("order",), ("E1", "E2")),
                              ("U2", ("intent",), ("E3",)),
                              ("U3", (model.REASON_SEGMENT,), ())]))


def _batch_recommendations(reference, pop, users, events, as_of):
    scorer = model.scorer(reference, pop, CONFIG)
    servable = reference.servable.loc[users].reset_index(drop=True)
    with_signals = profiles.attach_signals(servable, events, as_of, CONFIG)
    recs, _ = recommend.recommend_all(scorer.recommender, with_signals, reference.fitting)
    return recs


class _RecFacts(beam.DoFn):
    def process(self, frame):
        for r in frame.itertuples(index=False):
            yield (r.user_id, int(r.popularity_as_of.timestamp()) - BASE, r.reason,
                   (r.rec_part_1, r.rec_part_2, r.rec_part_3, r.rec_part_4), r.source)


def test_refresh_scores_touched_users_with_the_windows_popularity(tmp_path):
    """Users touched in [0, 10) are refreshed with window [-10, 10)'s popularity, as batch would."""
    spec = model.WindowSpec.of_seconds(20, 10, 0)
    reference = FileReference(small_world(tmp_path / "w"), CONFIG, 0, "")
    events = [order(1, 2, user="U3", sku="S07"), order(2, 3, user="U4", sku="S07"),
              intent(3, 4, user="U1", sku="S06", name="Cart Update"),
              order(4, 5, user="U2", sku="S03"), intent(5, 6, user="U9")]
    stream = (TestStream()
              .advance_watermark_to(BASE)
              .add_elements(events))
    stream = finish(stream)
    ref = reference.current()
    as_of = pd.Timestamp((BASE + 10) * US, unit="us", tz="UTC")
    frame = model.events_frame([e.value for e in events])
    pop = model.window_popularity(frame.loc[frame["event_name"] == "Placed Order"], ref, as_of,
                                  CONFIG)
    expected = _batch_recommendations(ref, pop, ["U1", "U2", "U3", "U4"], frame, as_of)
    reasons = {"U1": "intent", "U2": "order", "U3": "order", "U4": "order"}
    want = [(r.user_id, 10, reasons[r.user_id],
             (r.rec_part_1, r.rec_part_2, r.rec_part_3, r.rec_part_4), r.source)
            for r in expected.itertuples(index=False)]
    assert "S06" in want[0][3] and "S03" not in want[1][3]   # cart boosts, bought is excluded
    with streaming_pipeline() as p:
        records = p | stream
        orders = records | beam.Filter(model.is_order)
        popularity = orders | WindowedPopularity(spec, reference, CONFIG)
        notices = p | "NoNotices" >> beam.Create([])
        requests = (records, notices) | TouchedUsers(CONFIG)
        out = requests | RefreshRecommendations(reference, popularity.first_panes, CONFIG, spec,
                                                3, "run", "v", clock=lambda: 0.0)
        assert_that(out.rows | beam.ParDo(_RecFacts()), equal_to(want), label="Rows")
        assert_that(summed("Counts", out.counts), equal_to([{
            "refresh.requests": 5, "refresh.unknown_users": 1, "refresh.duplicate_users": 0,
            "recommendations.written": 4, "users.source.global": 4}]),
                    label="Counts")


def test_catalog_change_is_picked_up_without_restart(tmp_path):
    directory = small_world(tmp_path / "w")
    reference = FileReference(directory, CONFIG, 0, "")
    before = reference.current()
    assert before.arrays.eligible[list(before.arrays.sku).index("S01")]
    _write_jsonl(os.path.join(directory, "catalog.jsonl"), _catalog_rows(refurbished=("S01",)))
    after = reference.current()
    assert after.version != before.version
    assert not after.arrays.eligible[list(after.arrays.sku).index("S01")]
    slow = FileReference(directory, CONFIG, 3600, "")
    first = slow.current()
    _write_jsonl(os.path.join(directory, "catalog.jsonl"), _catalog_rows())
    assert slow.current().version == first.version   # not checked again before the interval


# --- ranking changes ------------------------------------------------------------------------------------

def test_a_vehicle_whose_top_picks_change_notifies_its_users(tmp_path):
    """Mustang's own segment moves to S08: its users are told. Only vehicles whose own segments
    gained or lost orders since the previous window are re-ranked, so the Civic, which only
    sees the global level move, is not."""
    spec = model.WindowSpec.of_seconds(10, 10, 0)
    reference = FileReference(small_world(tmp_path / "w"), CONFIG, 0, "")
    # Window [0,10): Mustang buyers order S01; window [10,20): many order S08 instead.
    first = [order(i, i, user="U1", sku="S01") for i in range(1, 4)]
    second = [order(10 + i, 10 + i, user="U2", sku="S08") for i in range(1, 8)]
    stream = (TestStream()
              .advance_watermark_to(BASE)
              .add_elements(first)
              .advance_watermark_to(BASE + 10)
              .add_elements(second))
    stream = finish(stream)
    with streaming_pipeline() as p:
        popularity = p | stream | WindowedPopularity(spec, reference, CONFIG)
        notices = popularity.first_panes | RankingChanges(reference, CONFIG, spec)
        assert_that(notices.rows, equal_to([(u, ("notice", model.REASON_SEGMENT))
                                            for u in ("U1", "U2")]),
                    label="Notices")
        assert_that(summed("Counts", notices.counts), equal_to([{
            "ranking.vehicles_ranked": 2, "ranking.vehicles_changed": 1,
            "ranking.users_notified": 2,
            "ranking.previous_from_history": 1}]), label="Counts")   # [-10, 0): no orders


# --- bandit ----------------------------------------------------------------------------------------------

def _treatment(i, seconds, treatment, kind):
    return TimestampedValue({"event_id": f"T{i}", "user_id": f"U{i}", "treatment_id": treatment,
                             "campaign_id": "C", "kind": kind, "reason": None,
                             "event_time_us": (BASE + seconds) * US}, BASE + seconds)


def test_streaming_bandit_state_per_window_with_a_late_restatement():
    spec = model.WindowSpec.of_seconds(10, 10, 5)
    stream = (TestStream()
              .advance_watermark_to(BASE)
              .add_elements([_treatment(1, 1, "A", "VIEWED"), _treatment(2, 2, "A", "CLICKED"),
                             _treatment(3, 3, "B", "VIEWED")])
              .advance_watermark_to(BASE + 12)
              .add_elements([_treatment(4, 4, "B", "VIEWED")]))     # late, allowed
    stream = finish(stream)
    with streaming_pipeline() as p:
        state = p | stream | StreamingBandit(BanditConfig(draws=500), spec)
        assert_that(state.rows | beam.FlatMap(lambda f: [
            (int(r.window_end.timestamp()) - BASE, r.treatment_id, r.views, r.clicks)
            for r in f.itertuples(index=False)]), equal_to([
                (10, "A", 1, 1), (10, "B", 1, 0),                    # on-time pane
                (10, "A", 1, 1), (10, "B", 2, 0)]))                  # late pane restates


def test_treatment_counts_are_one_hot():
    counts = treatment_counts(_treatment(1, 0, "A", "DELIVERY_FAILED").value)
    assert counts == (("A", "*"), (0, 0, 1, 0, 0))


# --- models/streaming.py --------------------------------------------------------------------------

def test_window_spec_refuses_misaligned_windows():
    with pytest.raises(ValueError, match="multiple of period"):
        model.WindowSpec.of_seconds(25, 10, 0)
    with pytest.raises(ValueError, match="lateness"):
        model.WindowSpec(pd.Timedelta(seconds=10), pd.Timedelta(seconds=10),
                         pd.Timedelta(seconds=-1))


def test_order_lines_keep_the_earliest_event_whatever_the_arrival_order():
    records = [order(1, 5, name="Ordered Product", order_id="O").value,
               order(2, 3, name="Placed Order", order_id="O").value,
               order(3, 3, name="Consumer Website Order", order_id="O").value]
    forward, backward = {}, {}
    for r in records:
        model.add_order(forward, r)
    for r in reversed(records):
        model.add_order(backward, r)
    assert forward == backward == {("O", "S01"): ((BASE + 3) * US, "E2", "U1", "Placed Order")}
    assert model.merge_orders([{("O", "S01"): forward[("O", "S01")]},
                               {("O", "S01"): ((BASE + 1) * US, "E9", "U1", "x")}]) == {
        ("O", "S01"): ((BASE + 1) * US, "E9", "U1", "x")}


def test_refresh_reports_unknown_and_duplicate_users(tmp_path):
    directory = small_world(tmp_path / "w")
    users = [json.loads(line) for line in open(os.path.join(directory, "users.jsonl"))]
    users.append({**users[0], "user_id": "U5", "email": "U1@Example.com",
                  "updated_at": "2025-01-01T00:00:00Z"})   # same e-mail, older: a duplicate
    _write_jsonl(os.path.join(directory, "users.jsonl"), users)
    ref = FileReference(directory, CONFIG, 0, "").current()
    as_of = pd.Timestamp(BASE, unit="s", tz="UTC")
    scorer = model.scorer(ref, model.window_popularity(model.orders_frame({}), ref, as_of,
                                                       CONFIG), CONFIG)
    requests = {u: model.RefreshRequest(("intent",), ()) for u in ("U1", "U5", "U404")}
    out = model.refresh_users(requests, ref, scorer, as_of, CONFIG)
    assert out.rows["user_id"].tolist() == ["U1"]
    assert out.duplicate_users == ["U5"] and out.unknown_users == ["U404"]


# --- poisoned elements, oversized messages, parity with the batch job (#13) -------------------------

SURROGATE = chr(0xD800)          # what a JSON "\ud800" decodes to: no UTF-8 writer takes it


def _poisoned(good, field):
    """``good`` as message bytes with a lone-surrogate escape at the start of ``field``."""
    text = json.dumps(good)
    return text.replace(f'"{field}": "', f'"{field}": "\\ud800', 1).encode()


def _storable(row):
    """Every text of a dead-letter row encodes as UTF-8 (BigQuery, Pub/Sub, Beam's coders)."""
    return all(v is None or v.encode("utf-8") is not None for v in row.values())


class _StampAndId(beam.DoFn):
    def process(self, record):
        yield record["event_id"]


def test_a_poisoned_message_never_stops_the_stream():
    """Lone-surrogate escapes in any id: dead letters with a reason, and the stream goes on."""
    at = pd.Timestamp(BASE + 1, unit="s", tz="UTC").strftime("%Y-%m-%dT%H:%M:%SZ")
    good = {"event_id": "E1", "event_time": at, "user_id": "U1",
            "event_name": "Placed Order", "sku": "S01", "order_id": "O1", "price": 120.0}
    poisoned = [_poisoned({**good, "event_id": f"P-{f}"}, f)
                for f in ("event_id", "user_id", "sku", "order_id")]
    stream = (TestStream()
              .advance_watermark_to(BASE)
              .add_elements([_message(good)] + [_message(p) for p in poisoned])
              .add_elements([_message({**good, "event_id": "E2"}),
                             _message({**good, "event_id": "E1"})]))  # after: still processed
    stream = finish(stream)
    reasons = sorted(model.parse_messages("events", poisoned, [{}] * 4).bad)
    assert all(reason for _, reason in reasons)
    with streaming_pipeline() as p:
        parsed = p | stream | ParseMessages("events")
        unique = parsed.rows | DropDuplicates("events", pd.Timedelta(seconds=60))
        assert_that(unique.rows | beam.ParDo(_StampAndId()), equal_to(["E1", "E2"]),
                    label="Processed")
        assert_that(parsed.dead_letters | beam.Map(lambda d: (
            d["reason"], _storable(d), d["record"].split('"event_id": "')[1].split('"')[0])),
            equal_to([(reason, True, ("\\ud800" if f == "event_id" else "") + f"P-{f}")
                      for (_, reason), f in zip(
                reasons, ("event_id", "user_id", "sku", "order_id"))]), label="Dead")
        counts = (parsed.counts, unique.counts) | beam.Flatten()
        assert_that(summed("Counts", counts | beam.Filter(
            lambda kv: not kv[0].startswith(("dead_letter.", "events.event_time_attribute")))),
            equal_to([{"events.read": 7, "events.dead_lettered": 4,
                       "events.deduplicated": 1}]), label="Reconciled")


def _outputs(dofn, elements):
    """(tag, value) of everything a DoFn emits for ``elements`` in one bundle.

    For values Beam cannot even carry between steps (a lone surrogate fails
    every coder, so no TestStream or Create can hold one): the DoFn that meets
    such a value must turn it into something that can travel.
    """
    out = []
    dofn.start_bundle()
    emitted = [o for e in elements for o in (dofn.process(e) or ())]
    emitted += list(dofn.finish_bundle() or ())
    for o in emitted:
        tag = o.tag if isinstance(o, beam.pvalue.TaggedOutput) else None
        value = o.value if tag else o
        out.append((tag, getattr(value, "value", value)))
    return out


def test_a_payload_of_unencodable_text_is_a_storable_dead_letter():
    """A text payload holding a raw lone surrogate: its dead letter escapes it (it used to crash)."""
    good = {"event_id": "E1", "event_time": "2026-05-01T10:00:00Z", "user_id": "U1",
            "event_name": "Viewed Product", "sku": "S01"}
    raw = json.dumps({**good, "user_id": "U" + SURROGATE}, ensure_ascii=False)   # not \\ud800
    payloads = [raw, json.dumps(good)]
    out = _outputs(ParseMessagesFn("events"), payloads)
    rows = [v["event_id"] for tag, v in out if tag is None]
    dead = [v for tag, v in out if tag == "dead_letter"]
    assert rows == ["E1"] and len(dead) == 1
    assert _storable(dead[0]) and "U\\ud800" in dead[0]["record"] and dead[0]["reason"]


def test_the_parse_refuses_unencodable_text_even_past_the_contract_parser(monkeypatch):
    """The second guard: a parser change that let a lone surrogate through is still caught."""
    good = {"event_id": "E1", "event_time": "2026-05-01T10:00:00Z", "user_id": "U1",
            "event_name": "Viewed Product", "sku": "S01"}
    leaky = {b"1": {**good, "sku": "S" + SURROGATE}, b"2": {**good, "x" + SURROGATE: 1},
             b"3": good}
    monkeypatch.setattr(contracts, "parse_json_line", lambda payload: (leaky[payload], None))
    out = model.parse_messages("events", [b"1", b"2", b"3"], [{}] * 3)
    assert out.bad == [(0, "invalid unicode in sku"), (1, "invalid unicode in extra field")]
    assert [r["event_id"] for r in out.records] == ["E1"]


def test_keyed_steps_refuse_keys_utf8_cannot_encode():
    """A record that reaches a keyed step with an unencodable key is a dead letter, not a crash."""
    bad = {**order(9, 2).value, "event_id": "E" + SURROGATE}
    out = _outputs(KeyOrRefuseFn("events", "DropDuplicates", ("event_id",)),
                   [order(1, 1).value, bad])
    assert [v[0] for tag, v in out if tag is None] == ["E1"]
    dead = [v for tag, v in out if tag == "dead_letter"]
    assert [(d["step"], d["reason"], _storable(d), json.loads(d["record"])["event_id"])
            for d in dead] == [("DropDuplicates", "invalid unicode in event_id", True,
                                "E" + SURROGATE)]
    assert dict(v for tag, v in out if tag == "counts") == {
        "events.dead_lettered": 1, "dead_letter.invalid unicode in event_id": 1}
    sent = {**_treatment(1, 1, "A", "SENT").value, "user_id": "U" + SURROGATE}
    out = _outputs(KeyOrRefuseFn("treatment_events", "CheckFunnel", model.RECIPIENT_KEY),
                   [sent, _treatment(2, 1, "A", "SENT").value])
    assert [v[0] for tag, v in out if tag is None] == [("C", "A", "U2")]
    assert [v["reason"] for tag, v in out if tag == "dead_letter"] == [
        "invalid unicode in user_id"]


def test_rows_for_bigquery_and_dead_letters_escape_unencodable_text():
    row = to_bigquery_row({"user_id": "U" + SURROGATE, "n": np.int64(3)})
    assert row == {"user_id": "U\\ud800", "n": 3}
    letter = dead_letter("users", "Step", "why " + SURROGATE, "x" + SURROGATE, {"a": "b"})
    assert letter["record"] == "x\\ud800" and letter["reason"] == "why \\ud800"
    assert _storable(letter)
    assert shard_of_user("U" + SURROGATE, 4) in range(4)


def test_oversized_messages_are_dead_lettered_with_their_head_and_size():
    """5 MB and 9.9 MB messages (legal on Pub/Sub) in one bundle with good ones.

    What Dataflow hands the parse: each oversized message is an "oversized
    record" dead letter whose stored payload is its first 64 KiB plus its size
    (a BigQuery row holds at most 10 MB); the others in the bundle are processed.
    """
    good = {"event_id": "E1", "event_time": "2026-05-01T10:00:00Z", "user_id": "U1",
            "event_name": "Viewed Product", "sku": "S01"}
    sizes = (5 * 1024 * 1024, 9_900_000)
    big = [b'{"event_id": "BIG", "pad": "' + b"x" * (n - 30) + b'"}' for n in sizes]
    messages = ([_message(good)] + [_message(b, event_time="2026-05-01T10:00:00Z") for b in big]
                + [_message({**good, "event_id": "E2"})])
    limit = model.DEAD_LETTER_RECORD_BYTES

    def facts(letter):
        record = letter["record"]
        head, note = record[:limit], record[limit:]
        return (letter["reason"], head.startswith('{"event_id": "BIG"'), note,
                json.loads(letter["attributes"]))

    with TestPipeline() as p:
        parsed = p | beam.Create(messages, reshuffle=False) | ParseMessages("events")
        assert_that(parsed.rows | beam.Map(lambda r: r["event_id"]), equal_to(["E1", "E2"]),
                    label="Processed")
        assert_that(parsed.dead_letters | beam.Map(facts), equal_to([
            ("oversized record", True,
             model.TRUNCATION_NOTE.format(kept=limit, size=len(b)),
             {"event_time": "2026-05-01T10:00:00Z"}) for b in big]), label="Dead")
        assert_that(parsed.counts | SumCounts(), equal_to([{
            "events.read": 4, "events.dead_lettered": 2, "dead_letter.oversized record": 2,
            "events.event_time_attribute.missing": 2}]), label="Counts")


def test_unknown_skus_are_dead_lettered_as_in_batch(tmp_path):
    directory = small_world(tmp_path / "w")
    reference = FileReference(directory, CONFIG, 0, "")
    # The batch job's words for the same refusal (transforms/recommend.py).
    frame = pd.DataFrame({"sku": ["S99"], "event_id": ["E9"]})
    batch = list(DropUnknownSkusFn("events").process(frame, pd.DataFrame({"sku": SKUS})))
    batch_reason = batch[0].value["reason"].iloc[0]
    with TestPipeline() as p:
        out = (p | beam.Create([order(1, 1).value, order(2, 2, sku="S99").value,
                                intent(3, 3, sku="S99").value, intent(4, 4).value])
               | CheckSkus("events", reference))
        assert_that(out.rows | beam.Map(lambda r: r["event_id"]), equal_to(["E1", "E4"]),
                    label="Known")
        assert_that(out.dead_letters | beam.Map(lambda d: (
            d["step"], d["reason"], json.loads(d["record"])["event_id"],
            json.loads(d["record"])["event_time"])), equal_to([
                ("CheckSkus", batch_reason, "E2",
                 pd.Timestamp(BASE + 2, unit="s", tz="UTC").isoformat()),
                ("CheckSkus", batch_reason, "E3",
                 pd.Timestamp(BASE + 3, unit="s", tz="UTC").isoformat())]), label="Dead")
        assert_that(out.counts | SumCounts(), equal_to([{
            "events.dead_lettered": 2, f"dead_letter.{batch_reason}": 2}]), label="Counts")


def _recipient(i, seconds, kind, user="U1", treatment="A"):
    return TimestampedValue({"event_id": f"T{i}", "user_id": user, "treatment_id": treatment,
                             "campaign_id": "C", "kind": kind, "reason": None,
                             "event_time_us": (BASE + seconds) * US}, BASE + seconds)


def test_funnel_needs_a_send_per_recipient_as_in_batch():
    """SENT then CLICKED passes; CLICKED alone, or before its send, or after the TTL is refused."""
    ttl = pd.Timedelta(seconds=100)
    stream = (TestStream()
              .advance_watermark_to(BASE)
              .add_elements([_recipient(1, 10, "SENT"), _recipient(2, 11, "CLICKED"),
                             _recipient(3, 12, "CLICKED"),                   # repeat
                             _recipient(4, 5, "VIEWED"),                     # before its send
                             _recipient(5, 11, "CLICKED", user="U2"),        # no send at all
                             _recipient(6, 11, "CLICKED", treatment="B"),    # other treatment
                             _recipient(7, 20, "SENT", user="U3")])
              .advance_watermark_to(BASE + 30)
              .add_elements([_recipient(8, 30, "VIEWED", user="U3")])        # within the TTL
              .advance_watermark_to(BASE + 200)                              # U1, U3 forgotten
              .add_elements([_recipient(9, 200, "VIEWED")]))
    stream = finish(stream)
    with streaming_pipeline() as p:
        out = p | stream | CheckFunnel(ttl)
        assert_that(out.rows | beam.Map(lambda r: r["event_id"]),
                    equal_to(["T1", "T2", "T7", "T8"]), label="Counted")
        assert_that(out.dead_letters | beam.Map(lambda d: (json.loads(d["record"])["event_id"],
                                                           d["step"], d["reason"])),
                    equal_to([("T4", "CheckFunnel", "view before send"),
                              ("T5", "CheckFunnel", "click without send"),
                              ("T6", "CheckFunnel", "click without send"),
                              ("T9", "CheckFunnel", "view without send")]), label="Dead")
        assert_that(summed("Counts", out.counts), equal_to([{
            "treatment_events.dead_lettered": 4, "dead_letter.view before send": 1,
            "dead_letter.click without send": 2, "dead_letter.view without send": 1,
            "treatment_events.deduplicated": 1, "treatment_events.repeated.CLICKED": 1}]),
            label="Counts")


def test_funnel_refusals_are_the_batch_check_funnels_words():
    at = pd.Timestamp("2026-05-01", tz="UTC")
    kinds = ["DELIVERED", "DELIVERY_FAILED", "VIEWED", "CLICKED"]
    alone = pd.DataFrame({"event_id": kinds, "campaign_id": "C", "treatment_id": "T",
                          "user_id": kinds, "kind": kinds, "event_time": at})
    batch = dict(zip(*campaign.check_funnel(alone).rejected[["kind", "refusal"]].T.values))
    stream = {k: model.funnel_step(None, k, 0).refusal for k in kinds}
    assert stream == batch and set(batch.values()) >= {"click without send"}


def test_a_vehicle_whose_stream_orders_leave_the_window_is_re_ranked(tmp_path):
    """Window [0,20): Civic buyers order S12 five times; in [10,30) those orders are gone, so the
    Civic's picks fall back to the history-free ranking: its users are told both times (the
    window before the first held no stream orders: its ranking is the history's alone). The Mustang's S01 orders in [20,30) leave
    its picks as they were without them: no notice."""
    spec = model.WindowSpec.of_seconds(20, 10, 0)
    reference = FileReference(small_world(tmp_path / "w"), CONFIG, 0, "")
    civic = [order(i, i, user="U3", sku="S12") for i in range(1, 6)]
    mustang = [order(20 + i, 20 + i, user="U1", sku="S01") for i in range(1, 3)]
    stream = (TestStream()
              .advance_watermark_to(BASE)
              .add_elements(civic)
              .advance_watermark_to(BASE + 20)
              .add_elements(mustang))
    stream = finish(stream)
    unthrottled = CONFIG.replace(ranking_notices=RankingNoticesConfig(min_interval_hours=0.0))
    with streaming_pipeline() as p:
        popularity = p | stream | WindowedPopularity(spec, reference, CONFIG)
        notices = popularity.first_panes | RankingChanges(reference, unthrottled, spec)
        assert_that(notices.rows | "Users" >> beam.Map(lambda kv: kv[0]),
                    equal_to(["U3", "U4", "U3", "U4"]), label="Notices")


def test_decayed_cells_add_in_any_order_to_the_batch_weight():
    """Cells re-expressed at the window end equal the batch job's decay weights, whatever order."""
    from models import stream_popularity as cells
    from models.popularity import decay_weights
    rng = np.random.default_rng(3)
    times = rng.integers(0, 40 * 86_400, 50) * US
    end = 41 * 86_400 * US
    forward = cells.add_all((cells.one_order(t) for t in times), 30.0)
    backward = cells.add_all((cells.one_order(t) for t in times[::-1]), 30.0)
    want = decay_weights(pd.Series(pd.to_datetime(times, unit="us", utc=True)),
                         pd.Timestamp(end, unit="us", tz="UTC"), 30.0).sum()
    for total in (forward, backward):
        assert total.orders == 50
        assert cells.at_window_end(total, end, 30.0) == pytest.approx(want, rel=1e-12)
    # taking one order back leaves the other 49
    less = cells.add(forward, cells.one_order(times[0], -1), 30.0)
    assert less.orders == 49


def test_window_blocks_sum_per_key_as_cells_add():
    """Period blocks appended to a window and summed once per key (`MergeCellsFn`) give each key
    the cell that adding its cells one by one gives (weight at the latest instant, orders),
    whatever the split into blocks, the merge order, or a compaction; taken-back lines net out.
    (The map of `Decayed` cells that windows carried before did not slide blocks at all.)"""
    from models import stream_popularity as cells
    from transforms.streaming.popularity import MergeCellsFn, WindowCellsFn
    rng = np.random.default_rng(5)
    keys = [("global", "", f"S{i}") for i in range(7)] + [("make", "Ford", "S1")]
    lines = [(keys[int(rng.integers(len(keys)))], int(rng.integers(0, 20 * 86_400)) * US,
              1 if rng.random() < 0.8 else -1) for _ in range(300)]
    want = {}
    for key, at, sign in lines:
        want[key] = cells.add(want.get(key, cells.EMPTY), cells.one_order(at, sign), 30.0)
    periods = WindowCellsFn(30.0)
    blocks = []
    for chunk in np.array_split(np.arange(len(lines)), 9):
        acc = periods.create_accumulator()
        for i in chunk:
            key, at, sign = lines[i]
            acc = periods.add_input(acc, (key, cells.one_order(at, sign)))
        blocks.append(periods.extract_output(acc))
    window = MergeCellsFn(30.0)
    # without compaction a window holds each key once per block it appears in
    unbounded = window.create_accumulator()
    for block in blocks:
        unbounded = window.add_input(unbounded, block)
    assert len(unbounded) == len(blocks)
    MergeCellsFn.COMPACT_AT, MergeCellsFn.COMPACT_ROWS = 3, 0   # compact on the way
    try:
        one = window.create_accumulator()
        for block in blocks[:5]:
            one = window.add_input(one, block)
            # bounded: at most about twice the distinct keys plus the newest block
            assert sum(len(b.keys) for b in one) <= 2 * len(keys) + len(block.keys)
        assert len(one) < 5
        other = window.create_accumulator()
        for block in blocks[5:][::-1]:
            other = window.add_input(other, block)
        got = window.extract_output(window.merge_accumulators([other, one]))
    finally:
        MergeCellsFn.COMPACT_AT, MergeCellsFn.COMPACT_ROWS = 512, 10_000
    assert sorted(window.extract_output(unbounded).keys) == sorted(got.keys)
    assert sorted(got.keys) == sorted(want)
    end = 21 * 86_400 * US
    for key, at, weight, orders in zip(got.keys, got.at_us, got.weight, got.orders):
        assert orders == want[key].orders
        # (an instant may differ where cells netted to nothing; the weight at the end may not)
        assert (cells.at_window_end(cells.Decayed(int(at), float(weight), int(orders)), end, 30.0)
                == pytest.approx(cells.at_window_end(want[key], end, 30.0), rel=1e-9, abs=1e-12))
    # the window-end frame keeps the keys with orders, as from the cells themselves
    frame = cells.cells_frame(got, end, 30.0)
    assert _frame_rows(frame) == _frame_rows(cells.cells_frame(list(want.items()), end, 30.0))
    assert cells.segments_with_orders(got) == frozenset(
        (k[0], k[1]) for k, c in want.items() if c.orders > 0)


def test_refresh_requests_wait_for_their_period_and_late_ones_join_the_next():
    """No wall clock: a request leaves when the watermark passes its period's end, stamped there;
    one for a period already released joins the next period, counted, never dropped."""
    from transforms.streaming import GatherPeriodFn

    def request(user, seconds):
        return TimestampedValue((0, (user, model.RefreshRequest(("intent",), ()))),
                                BASE + seconds)

    stream = (TestStream()
              .advance_watermark_to(BASE)
              .add_elements([request("U1", 2), request("U2", 7)])
              .advance_watermark_to(BASE + 15)            # [0, 10) released at 10
              .add_elements([request("U3", 3)])           # late: its period is gone
              .add_elements([request("U4", 12)]))
    stream = finish(stream)

    class _Released(beam.DoFn):
        def process(self, element, timestamp=beam.DoFn.TimestampParam):
            (shard, end_us), requests = element
            yield (end_us // US - BASE, round(float(timestamp) - BASE, 6),
                   sorted(u for u, _ in requests))

    with streaming_pipeline() as p:
        out = (p | stream
               | beam.ParDo(GatherPeriodFn(pd.Timedelta(seconds=10))).with_outputs(
                   "counts", main="rows"))
        assert_that(out.rows | beam.ParDo(_Released()), equal_to([
            (10, 9.999999, ["U1", "U2"]), (20, 19.999999, ["U3", "U4"])]), label="Released")
        assert_that(out.counts | beam.Map(lambda kv: kv), equal_to([
            ("refresh.late_requests", 1)]), label="Counts")


def test_health_counters_are_summed_per_event_time_period_and_late_ones_add_a_row():
    from transforms.streaming import PeriodCounters
    stream = (TestStream()
              .advance_watermark_to(BASE)
              .add_elements([TimestampedValue(("events.read", 2), BASE + 1),
                             TimestampedValue(("events.read", 1), BASE + 4),
                             TimestampedValue(("events.read", 5), BASE + 12)])
              .advance_watermark_to(BASE + 15)
              .add_elements([TimestampedValue(("events.read", 7), BASE + 3)]))   # late
    stream = finish(stream)
    with streaming_pipeline() as p:
        rows = p | stream | PeriodCounters(pd.Timedelta(seconds=10))
        assert_that(rows | beam.Map(lambda r: (int(r["window_end"].timestamp()) - BASE,
                                               json.loads(r["counters"]))),
                    equal_to([(10, {"events.read": 3}), (20, {"events.read": 5}),
                              (10, {"events.read": 7})]))


def test_ranking_notices_only_for_products_users_would_see_change(tmp_path):
    """Many short periods (a 20 s window every 2 s), orders on both vehicles and at every level:
    each notice is for a vehicle whose default picks (ranked here from the models, every vehicle,
    every window) hold other products than at its previous notice (for the first: than in the
    window before); a reorder alone is never noticed; lists do move and are noticed."""
    from models import stream_popularity as cells
    spec = model.WindowSpec.of_seconds(20, 2, 0)
    reference = FileReference(small_world(tmp_path / "w"), CONFIG, 0, "")
    rng = np.random.default_rng(7)
    # Civic buyers all along; a Mustang order every 24 s, so the Mustang's own segments empty
    # out and fill again while the global level keeps moving.
    seconds = [*range(0, 60, 2), 1, 25, 49]
    users = [*rng.choice(["U3", "U4"], 30), "U1", "U2", "U1"]
    skus = [SKUS[int(rng.integers(4, 8))] if u in ("U1", "U2") else SKUS[int(rng.integers(4, 12))]
            for u in users]
    records = [order(i, int(s), user=str(u), sku=sku)
               for i, (s, u, sku) in enumerate(zip(seconds, users, skus))]
    ref = reference.current()
    by_user = cells.segments_by_user(ref.users, CONFIG)
    vehicles = sorted(ref.vehicle_users)

    def picks_at(end_us):
        inside = [r.value for r in records
                  if end_us - 20 * US <= r.value["event_time_us"] < end_us]
        keyed = [c for r in inside for c in cells.line_cells(
            by_user.get(r["user_id"]), r["sku"], r["event_time_us"], 1, CONFIG)]
        pop = cells.window_popularity(keyed, ref, end_us, CONFIG)
        return model.default_picks(model.scorer(ref, pop, CONFIG), ref, vehicles, CONFIG)

    ends = range(BASE * US, (BASE + 82) * US, 2 * US)     # from the empty window before
    ranked = {end: picks_at(end) for end in ends}
    moved = {(end // US - BASE, u) for end in ends[1:]
             for v in vehicles if ranked[end][v] != ranked[end - 2 * US][v]
             for u in ref.vehicle_users[v]}
    assert moved    # the stream does move lists here

    class _At(beam.DoFn):
        def process(self, notice, timestamp=beam.DoFn.TimestampParam):
            yield round(float(timestamp)) - BASE, notice[0]

    stream = TestStream().advance_watermark_to(BASE)
    for second in range(0, 60, 2):
        stream = stream.add_elements([r for r in records if second <= r.timestamp - BASE
                                      < second + 2]).advance_watermark_to(BASE + second + 2)
    stream = finish(stream)

    vehicle_of = {u: v for v in vehicles for u in ref.vehicle_users[v]}
    reorders = {(end // US - BASE, v) for end in ends[1:] for v in vehicles
                if ranked[end][v] != ranked[end - 2 * US][v]
                and set(ranked[end][v][1:]) == set(ranked[end - 2 * US][v][1:])}

    assert reorders    # some of those moves only reorder the same products

    def only_visible_changes(got):
        assert got and len(got) == len(set(got)), sorted(got)
        told = {}
        for second, user in sorted(got):
            end = (BASE + second) * US
            vehicle = vehicle_of[user]
            before = told.get(vehicle, ranked[end - 2 * US][vehicle])
            assert set(ranked[end][vehicle][1:]) != set(before[1:]), (second, user)
            if user == ref.vehicle_users[vehicle][-1]:
                told[vehicle] = ranked[end][vehicle]
        noticed = {(second, vehicle_of[u]) for second, u in got}
        assert not noticed & reorders, sorted(noticed & reorders)

    # No throttle here (min_interval_hours 0): this test is about what counts as a change;
    # tests/test_streaming_notices.py checks the throttle.
    unthrottled = CONFIG.replace(ranking_notices=RankingNoticesConfig(min_interval_hours=0.0))
    with streaming_pipeline() as p:
        popularity = p | stream | WindowedPopularity(spec, reference, CONFIG)
        notices = popularity.first_panes | RankingChanges(reference, unthrottled, spec)
        assert_that(notices.rows | beam.ParDo(_At()), only_visible_changes)
