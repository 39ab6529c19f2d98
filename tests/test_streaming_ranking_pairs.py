"""Ranking changes pair consecutive windows per window end, without a single key (issue #16).

`RankingChanges` used to put every window's pane on one key and keep the
previous window in state; it now groups each pane with the one before it per
window end. These tests feed hand-made first panes (popularity frames built
by the models from a few orders on the small world) through a TestStream and
check which window each is compared with: the one just before, or the
history alone when that window held no stream orders (a gap), whatever the
order the panes arrive in; that no step groups by a constant key; and that
the reference version reaches the ranking and the notices as a side input.
"""
import os

import apache_beam as beam
import pandas as pd
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.userstate import get_dofn_specs
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import Timestamp

from models import ranking_notices as rule
from models import stream_popularity as cells
from models import streaming as model
from models.config import DEFAULT_CONFIG, RankingNoticesConfig
from tests.test_streaming_step_labels import graph_labels
from tests.test_streaming_transforms import (BASE, US, _write_jsonl, finish, small_world,
                                             streaming_pipeline, summed)
from transforms.health import Tag
from transforms.streaming import FileReference, RankingChanges, ReferenceVersions, WindowPopularity
from transforms.streaming.ranking import (PairWithNextWindowFn, PicksChangedFn, VehiclePicksFn,
                                          paired_picks)
from transforms.streaming.reference import SIDE_INPUT

CONFIG = DEFAULT_CONFIG.replace(ranking_notices=RankingNoticesConfig(min_interval_hours=0.0))
SPEC = model.WindowSpec.of_seconds(20, 10, 30)     # 20 s windows every 10 s, 30 s lateness
PAST = 1_700_000_000    # seconds: in the past, so a bounded PeriodicImpulse fires at once
MUSTANG, CIVIC = "FORD|MUSTANG|2015", "HONDA|CIVIC|2018"
LEVELS = [CONFIG.level_name(level) for level in CONFIG.levels[:2]]


def _pane(ref, end_s, orders, base=BASE):
    """The first pane of the window ending ``base + end_s``: ``orders`` as (user, sku, second)."""
    by_user = cells.segments_by_user(ref.users, CONFIG)
    keyed = [c for user, sku, second in orders
             for c in cells.line_cells(by_user.get(user), sku, (base + second) * US, 1, CONFIG)]
    end_us = (base + end_s) * US
    frame = cells.window_popularity(keyed, ref, end_us, CONFIG)
    return WindowPopularity(pd.Timestamp(end_us - 20 * US, unit="us", tz="UTC"),
                            pd.Timestamp(end_us, unit="us", tz="UTC"), "ON_TIME", True,
                            len(keyed), len(orders), frame)


def _at_end(pane):
    """A pane as the popularity step emits it: stamped at its window's last instant."""
    return TimestampedValue(pane, Timestamp(micros=int(pane.window_end.value // 1_000) - 1))


def _history(ref, end_s):
    return cells.window_popularity([], ref, (BASE + end_s) * US, CONFIG)


def _expected(ref, previous_frame, pane):
    """(vehicle, end - BASE, picks, earlier) of the vehicles re-ranked between two frames."""
    by_segment = cells.vehicles_by_segment(ref.vehicle_users, CONFIG)
    vehicles = rule.ranked_vehicles(previous_frame, pane.popularity, by_segment, LEVELS)
    end = int(pane.window_end.value // 1_000) // US - BASE
    return [(v, end, now, before) for v, (now, before) in rule.picks_between(
        ref, previous_frame, pane.popularity, vehicles, CONFIG).items()]


class _Facts(beam.DoFn):
    def process(self, element):
        vehicle, (end_us, picks, earlier) = element
        yield vehicle, end_us // US - BASE, picks, earlier


def _panes(ref):
    """Windows ending at 10, 20, 30, 40 (s after BASE); the one ending at 30 is the gap."""
    return {
        10: _pane(ref, 10, [("U1", "S08", 1), ("U1", "S07", 2), ("U3", "S12", 3)]),
        20: _pane(ref, 20, [("U1", "S08", 11), ("U2", "S08", 12), ("U4", "S12", 13)]),
        30: _pane(ref, 30, [("U1", "S01", 21), ("U2", "S01", 22), ("U1", "S02", 23),
                            ("U4", "S12", 24)]),
        40: _pane(ref, 40, [("U2", "S08", 31), ("U1", "S08", 32), ("U3", "S12", 33)]),
    }


def test_consecutive_windows_pair_and_a_window_without_orders_is_the_history_alone(tmp_path):
    """Panes for the windows ending at 10, 20 and 40: the one ending at 30 held no stream orders.

    Window 40 is compared with the history alone at 30, not with window 20,
    the last pane seen (which a "previous pane seen" pairing would use; the
    Mustang's own segment holds S08 in both 20 and 40, so it would not be
    re-ranked at all); window 10 with the history at 0.
    """
    reference = FileReference(small_world(tmp_path / "w"), CONFIG, 0, "")
    ref = reference.current()
    panes = _panes(ref)
    want = (_expected(ref, _history(ref, 0), panes[10])
            + _expected(ref, panes[10].popularity, panes[20])
            + _expected(ref, _history(ref, 30), panes[40]))
    assert (MUSTANG, 40) in {(v, end) for v, end, _, _ in want}
    assert MUSTANG not in {v for v, _, _, _ in _expected(ref, panes[20].popularity, panes[40])}
    stream = TestStream().advance_watermark_to(BASE)
    for end in (10, 20, 40):
        stream = stream.add_elements([_at_end(panes[end])]).advance_watermark_to(BASE + end)
    with streaming_pipeline() as p:
        picks = paired_picks(p | finish(stream), reference, CONFIG, SPEC)
        assert_that(picks[Tag.ROWS.value] | beam.ParDo(_Facts()), equal_to(want), label="Picks")
        assert_that(summed("Counts", picks[Tag.COUNTS.value]), equal_to([{
            "ranking.vehicles_ranked": len(want), "ranking.previous_from_history": 2}]),
                    label="Counts")


def test_an_older_window_arriving_after_a_newer_one_notifies_nothing_stale(tmp_path):
    """Window 30's pane arrives late, after window 40 was compared (with the history at 30).

    Late, it still meets its partners: window 30 is compared with 20, and
    window 40 again with 30 (both re-fired groups). The Mustang, compared at
    40 already, gets no notice for 30 (stale for its state) and no second one
    for 40; the notices are exactly those of the windows in their order.
    """
    reference = FileReference(small_world(tmp_path / "w"), CONFIG, 0, "")
    ref = reference.current()
    panes = _panes(ref)
    on_time = (_expected(ref, _history(ref, 0), panes[10])
               + _expected(ref, panes[10].popularity, panes[20])
               + _expected(ref, _history(ref, 30), panes[40]))
    late = (_expected(ref, panes[20].popularity, panes[30])
            + _expected(ref, panes[30].popularity, panes[40]))
    assert (MUSTANG, 30) in {(v, end) for v, end, _, _ in late}   # 30 would move the Mustang
    # What PicksChanged decides, in arrival order (throttle off): the notices expected.
    states, notices = {}, []
    for vehicle, end, now, before in on_time:
        states[vehicle], decision = rule.notice_decision(states.get(vehicle), (BASE + end) * US,
                                                         now, before, 1, 0)
        if decision == rule.NOTIFY:
            notices += [(end, user) for user in ref.vehicle_users[vehicle]]
    mustang_at_30 = [now for v, end, now, _ in late if (v, end) == (MUSTANG, 30)][0]
    assert rule.visible_change(states[MUSTANG].told, mustang_at_30, 1)   # were it not stale
    assert all(v in states and states[v].latest_end_us == (BASE + 40) * US
               for v, _, _, _ in late)                 # all stale: nothing more is noticed

    class _At(beam.DoFn):
        def process(self, notice, timestamp=beam.DoFn.TimestampParam):
            yield round(float(timestamp)) - BASE, notice[0]

    stream = TestStream().advance_watermark_to(BASE)
    for end in (10, 20, 40):
        stream = stream.add_elements([_at_end(panes[end])]).advance_watermark_to(BASE + end)
    stream = stream.add_elements([_at_end(panes[30])]).advance_watermark_to(BASE + 45)
    with streaming_pipeline() as p:
        first = p | finish(stream)
        picks = paired_picks(first, reference, CONFIG, SPEC)
        assert_that(picks[Tag.ROWS.value] | beam.ParDo(_Facts()), equal_to(on_time + late),
                    label="Picks")
        out = first | "Notices" >> RankingChanges(reference, CONFIG, SPEC)
        assert_that(out.rows | beam.ParDo(_At()), equal_to(notices), label="Notices")
        assert_that(summed("Counts", picks[Tag.COUNTS.value]), equal_to([{
            "ranking.vehicles_ranked": len(on_time) + len(late),
            "ranking.previous_from_history": 2, "ranking.late_pairs": 2}]), label="Counts")


def test_no_step_groups_every_window_under_one_key(tmp_path):
    """Each pane goes to two keys (its window end and the next); a key holds at most two panes.

    And the graph of the job has no constant-key step left in RankingChanges:
    its only stateful step is keyed per vehicle.
    """
    reference = FileReference(small_world(tmp_path / "w"), CONFIG, 0, "")
    ref = reference.current()
    panes = [_pane(ref, end, [("U1", "S08", end - 5)]) for end in range(10, 110, 10)]
    with TestPipeline() as p:
        keyed = (p | beam.Create(panes)
                 | beam.ParDo(PairWithNextWindowFn(10 * US))
                 | beam.Map(lambda kv: (kv[0], 1))
                 | beam.CombinePerKey(sum))
        assert_that(keyed | beam.Map(lambda kv: (kv[0] // US - BASE, kv[1])),
                    equal_to([(10, 1)] + [(end, 2) for end in range(20, 110, 10)] + [(110, 1)]))
    labels = {label for label in graph_labels([]) if label.startswith("RankingChanges/")}
    assert not {label for label in labels if label.endswith("OneKey")}, labels
    assert {"RankingChanges/PairPerWindowEnd", "RankingChanges/VehiclePicks",
            "RankingChanges/PicksChanged"} <= labels
    assert get_dofn_specs(VehiclePicksFn(reference, CONFIG, 10 * US)) == (set(), set())
    assert get_dofn_specs(PicksChangedFn())[0]      # per vehicle: the notice state


def test_the_ranking_and_the_notices_read_the_reference_version_side_input(tmp_path):
    """A user added to the Mustang after the process loaded the users is told with the side input.

    The process polls hourly and holds the users without U5; the file is then
    replaced. The control run (no side input) notifies U1 and U2; with the
    versions side input (FnApiRunner, bounded impulses as in
    tests/test_streaming_reference.py) the new version reaches the steps at
    the next interval, and U5 is notified too.
    """
    directory = small_world(tmp_path / "w")
    reference = FileReference(directory, CONFIG, 3600, "")
    reference.delivery = SIDE_INPUT
    ref = reference.current()
    pane = _pane(ref, 10, [("U1", "S08", 1), ("U1", "S07", 2)], PAST)
    users = [{"user_id": f"U{i}", "email": f"u{i}@example.com",
              "make": "Ford" if i in (1, 2, 5) else "Honda",
              "model": "Mustang" if i in (1, 2, 5) else "Civic",
              "year": 2015 if i in (1, 2, 5) else 2018, "updated_at": "2026-01-01T00:00:00Z"}
             for i in range(1, 6)]
    _write_jsonl(os.path.join(directory, "users.jsonl"), users)

    def run(with_versions):
        options = PipelineOptions([])
        with TestPipeline(runner="FnApiRunner", options=options) as p:
            versions = (p | "Versions" >> ReferenceVersions(reference, Timestamp(PAST),
                                                            Timestamp(PAST + 60))
                        if with_versions else None)
            first = p | beam.Create([pane])
            out = first | RankingChanges(reference, CONFIG, SPEC, versions)
            assert_that(out.rows | beam.Map(lambda kv: kv[0]), equal_to(expected))

    expected = ["U1", "U2"]             # the held users: the Mustang's two
    run(False)
    expected = ["U1", "U2", "U5"]
    run(True)
    assert "U5" in reference.current().vehicle_users[MUSTANG]


def test_a_pane_is_keyed_by_its_window_end_and_the_next_and_a_group_splits_by_role():
    assert rule.pair_keys(20 * US, 10 * US) == ((20 * US, rule.THIS), (30 * US, rule.PREVIOUS))
    assert rule.split_pair([]) == (None, None)
    assert rule.split_pair([(rule.THIS, "t")]) == ("t", None)
    assert rule.split_pair([(rule.PREVIOUS, "p"), (rule.THIS, "t"), (rule.THIS, "t2")]) == (
        "t", "p")      # a redelivered copy is ignored
