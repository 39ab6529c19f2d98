"""TestPipeline tests of transforms/bandit.py and transforms/campaign.py, windowing included."""
import apache_beam as beam
import numpy as np
import pandas as pd
import pytest
from apache_beam.options.pipeline_options import StandardOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to, equal_to_per_window
from apache_beam.transforms.window import IntervalWindow, TimestampedValue

from models import campaign
from models.bandit import BanditConfig
from models.campaign import ALL, FunnelCounts
from transforms.bandit import (AttachSegments, BanditState, KeyedCounts,
                               SlidingTreatmentCounts, TreatmentCounts, TreatmentCountsFn)
from transforms.campaign import CampaignReport, CleanTreatmentEvents, OrderEvents
from transforms.health import SumCounts

DAY = 86_400
BASE = pd.Timestamp("2026-05-01", tz="UTC")   # a multiple of one day since the epoch
B = int(BASE.timestamp())
CONFIG = BanditConfig(draws=2_000)


def view(n=1):
    return FunnelCounts(0, 0, 0, n, 0)


def at(seconds, key, counts):
    return TimestampedValue((key, counts), B + seconds)


def timestamped(label, elements):
    """Bounded input whose elements carry their event times (as the streaming source will)."""
    return label >> beam.Create(elements).with_output_types(KeyedCounts)


def treatment_frame(rows):
    frame = pd.DataFrame(rows, columns=["event_id", "user_id", "campaign_id", "treatment_id",
                                        "kind", "event_time"])
    return frame.assign(reason=None).astype({"event_time": campaign.TIME})


def _t(hours):
    return BASE + pd.Timedelta(hours=hours)


# --- the CombineFn ---------------------------------------------------------------------------

def test_treatment_counts_fn_is_additive_and_merges():
    fn = TreatmentCountsFn()
    a = fn.add_input(fn.add_input(fn.create_accumulator(), FunnelCounts(1, 1, 0, 1, 0)),
                     FunnelCounts(1, 0, 1, 0, 0))
    b = fn.add_input(fn.create_accumulator(), FunnelCounts(0, 0, 0, 2, 1))
    assert fn.extract_output(fn.merge_accumulators([a, b, fn.create_accumulator()])) == \
        FunnelCounts(2, 1, 1, 3, 1)
    assert fn.default_label() == "SumTreatmentCounts"


# --- sliding windows over bounded, timestamped input --------------------------------------------

def _seconds(timestamped):
    return timestamped.timestamp.micros // 1_000_000


def _windows_of(seconds, size, period):
    """The [start, end) sliding windows (starts on multiples of `period`) that contain `seconds`."""
    start, windows = (seconds // period) * period, []
    while start + size > seconds:
        windows.append((start, start + size))
        start -= period
    return windows


def test_sliding_windows_assign_each_count_to_every_window_that_covers_it():
    size, period = 3 * DAY, DAY
    key = ("A", ALL)
    elements = [at(3600, key, view(1)), at(DAY + 60, key, view(2)), at(4 * DAY, key, view(4))]
    expected = {}
    for element in elements:
        for start, end in _windows_of(_seconds(element), size, period):
            window = IntervalWindow(start, end)
            expected.setdefault(window, FunnelCounts(0, 0, 0, 0, 0))
            expected[window] = FunnelCounts(*campaign.add_counts(expected[window],
                                                                 element.value[1]))
    assert len(expected) == 7  # windows starting on days -2 to 4
    with TestPipeline() as p:
        out = (p | timestamped("Counts", elements)
               | SlidingTreatmentCounts(pd.Timedelta(days=3), pd.Timedelta(days=1)))
        assert_that(out, equal_to_per_window({w: [(key, c)] for w, c in expected.items()}),
                    label="PerWindow")


def test_bucketed_counts_give_the_same_windows_as_one_element_per_event():
    # Window 3 days, period 2 days: buckets of gcd = 1 day must not change any window's sums.
    rng = np.random.default_rng(1)
    kinds = list(campaign.KIND_FIELDS)
    hours = np.sort(rng.uniform(0, 24 * 9, 300))
    frame = pd.DataFrame({"event_id": [f"e{i}" for i in range(300)],
                          "treatment_id": rng.choice(["A", "B"], 300),
                          "kind": rng.choice(kinds, 300),
                          "event_time": [_t(h) for h in hours]}).astype(
        {"event_time": campaign.TIME})
    one_hot = [TimestampedValue(((r.treatment_id, ALL), FunnelCounts(
        *[int(r.kind == k) for k in kinds])), r.event_time.timestamp())
        for r in frame.itertuples(index=False)]
    size, period = pd.Timedelta(days=3), pd.Timedelta(days=2)

    def with_window(label):
        return label >> beam.ParDo(_WithWindow())

    with TestPipeline() as p:
        per_event = (p | timestamped("Events", one_hot)
                     | "EventWindows" >> SlidingTreatmentCounts(size, period)
                     | with_window("TagEventWindows"))
        bucketed = (p | "Frames" >> beam.Create([frame.iloc[:150], frame.iloc[150:]])
                    | TreatmentCounts(size, period)
                    | "BucketWindows" >> SlidingTreatmentCounts(size, period)
                    | with_window("TagBucketWindows"))
        assert_that(bucketed, equal_to(_materialise(one_hot, size, period)), label="Bucketed")
        assert_that(per_event, equal_to(_materialise(one_hot, size, period)), label="PerEvent")


class _WithWindow(beam.DoFn):
    def process(self, element, win=beam.DoFn.WindowParam):
        yield (int(win.start), int(win.end), element[0], tuple(element[1]))


def _materialise(one_hot, size, period):
    """Brute-force per-window sums of one-hot elements, as (start, end, key, counts) tuples."""
    size_s, period_s = int(size.total_seconds()), int(period.total_seconds())
    sums = {}
    for tv in one_hot:
        for start, end in _windows_of(_seconds(tv), size_s, period_s):
            k = (start, end, tv.value[0])
            sums[k] = campaign.add_counts(sums.get(k, [0] * 5), tv.value[1])
    return [(s, e, key, tuple(c)) for (s, e, key), c in sums.items()]


# --- streaming: watermark, lateness and accumulating panes --------------------------------------

def _stream(key):
    return (TestStream()
            .advance_watermark_to(B)
            .add_elements([at(3600, key, view(1))])             # on time in [-1d,1d) and [0,2d)
            .advance_watermark_to(B + 2 * DAY + 3600)             # both windows close
            .add_elements([at(7200, key, view(1))])             # late: [0,2d) still allows it
            .add_elements([at(-DAY + 60, key, view(5))])        # too late for every window
            .advance_watermark_to_infinity())


def test_late_data_within_allowed_lateness_restates_the_window():
    key = ("A", ALL)
    options = StandardOptions(streaming=True)
    with TestPipeline(options=options) as p:
        out = (p | _stream(key)
               | SlidingTreatmentCounts(pd.Timedelta(days=2), pd.Timedelta(days=1),
                                        allowed_lateness=pd.Timedelta(days=1)))
        assert_that(out, equal_to_per_window({
            IntervalWindow(B - DAY, B + DAY): [(key, view(1))],
            # the on-time pane, then the late pane with the window's whole (accumulated) count
            IntervalWindow(B, B + 2 * DAY): [(key, view(1)), (key, view(2))],
        }), label="Panes")


def test_bandit_state_publishes_the_latest_pane_of_each_window():
    key = ("A", ALL)
    with TestPipeline(options=StandardOptions(streaming=True)) as p:
        state = (p | _stream(key)
                 | BanditState(CONFIG, pd.Timedelta(days=2), pd.Timedelta(days=1),
                               allowed_lateness=pd.Timedelta(days=1)))
        rows = state.rows | beam.FlatMap(lambda f: [
            (int(r.window_start.timestamp()) - B, r.views, r.alpha, r.beta)
            for r in f.itertuples(index=False)])
        assert_that(rows, equal_to([(-DAY, 1, 1.0, 2.0), (0, 1, 1.0, 2.0), (0, 2, 1.0, 3.0)]))


# --- bandit state over bounded input ------------------------------------------------------------

def test_bandit_state_caps_clicks_and_dead_letters_impossible_counts():
    size = period = pd.Timedelta(days=1)
    a, b, c = ("A", ALL), ("B", ALL), ("C", ALL)
    elements = [
        at(100, a, FunnelCounts(10, 9, 1, 5, 2)), at(200, b, FunnelCounts(10, 10, 0, 3, 1)),
        at(300, b, FunnelCounts(0, 0, 0, 0, 4)),            # clicks whose opens were elsewhere
        at(400, c, FunnelCounts(5, 5, 0, -1, 0)),            # a negative count from upstream
    ]
    with TestPipeline() as p:
        state = p | timestamped("Counts", elements) | BanditState(CONFIG, size, period)
        rows = state.rows | beam.FlatMap(lambda f: [
            (r.treatment_id, r.views, r.clicks, r.clicks_capped, r.alpha, r.beta)
            for r in f.itertuples(index=False)])
        assert_that(rows, equal_to([("A", 5, 2, 0, 3.0, 4.0), ("B", 3, 3, 2, 4.0, 1.0)]),
                    label="Rows")
        assert_that(state.dead_letters | beam.FlatMap(
            lambda f: list(zip(f["table"], f["step"], f["reason"]))),
            equal_to([("treatment_counts", "WindowState", "negative count")]), label="Dead")
        assert_that(state.counts | SumCounts(), equal_to([
            {"bandit.windows": 1, "bandit.clicks_capped": 2, "bandit_state.rows": 2}]),
            label="Counts")


def test_segments_from_users_give_overall_and_per_segment_rows():
    events = treatment_frame([
        ("e1", "u1", "C", "A", "SENT", _t(1)), ("e2", "u1", "C", "A", "VIEWED", _t(2)),
        ("e3", "u2", "C", "A", "SENT", _t(1)), ("e4", "u2", "C", "A", "VIEWED", _t(2)),
        ("e5", "u2", "C", "A", "CLICKED", _t(3)),
        ("e6", "u3", "C", "B", "SENT", _t(1)), ("e7", "u3", "C", "B", "VIEWED", _t(2))])
    users = pd.DataFrame({"user_id": ["u1", "u2"], "make": ["Ford", "Honda"],
                          "model": ["Focus", "Civic"], "updated_at": pd.NaT})
    size = period = pd.Timedelta(days=1)
    with TestPipeline() as p:
        users_pc = p | "Users" >> beam.Create([users])
        state = (p | "Events" >> beam.Create([events])
                 | AttachSegments(users_pc, ["make"], num_shards=2)
                 | TreatmentCounts(size, period, segmented=True)
                 | BanditState(CONFIG, size, period))
        rows = state.rows | beam.FlatMap(lambda f: [
            (r.segment, r.treatment_id, r.views, r.clicks) for r in f.itertuples(index=False)])
        assert_that(rows, equal_to([
            (ALL, "A", 2, 1), (ALL, "B", 1, 0), ("Ford", "A", 1, 0), ("Honda", "A", 1, 1),
            (campaign.NO_SEGMENT, "B", 1, 0)]))


# --- campaign composites ------------------------------------------------------------------

def test_clean_treatment_events_dedupes_checks_and_counts():
    events = treatment_frame([
        ("e1", "u1", "C", "A", "SENT", _t(0)), ("e1", "u1", "C", "A", "SENT", _t(0)),
        ("e2", "u1", "C", "A", "VIEWED", _t(1)), ("e3", "u1", "C", "A", "VIEWED", _t(2)),
        ("e4", "u2", "C", "A", "CLICKED", _t(1))])
    with TestPipeline() as p:
        clean = (p | beam.Create([events.iloc[:3], events.iloc[3:]])
                 | CleanTreatmentEvents(num_shards=3))
        assert_that(clean.rows | beam.FlatMap(lambda f: f["event_id"].tolist()),
                    equal_to(["e1", "e2"]), label="Rows")
        assert_that(clean.dead_letters | beam.FlatMap(lambda f: f["reason"].tolist()),
                    equal_to(["click without send"]), label="Dead")
        assert_that(clean.counts | SumCounts(), equal_to([{
            "treatment_events.deduplicated": 2, "treatment_events.repeated.VIEWED": 1,
            "treatment_events.processed": 2}]), label="Counts")


def test_campaign_report_composite_equals_the_model_on_all_data():
    treatments = treatment_frame([
        ("e1", "u1", "C", "A", "SENT", _t(0)), ("e2", "u1", "C", "A", "VIEWED", _t(1)),
        ("e3", "u2", "C", "B", "SENT", _t(0)), ("e4", "u2", "C", "B", "DELIVERED", _t(0)),
        ("e5", "u3", "C", "B", "SENT", _t(0))])
    events = pd.DataFrame({
        "event_id": ["o1", "o2", "o3", "o3", "v1"], "user_id": ["u1", "u2", "u9", "u9", "u1"],
        "event_name": ["Placed Order", "Ordered Product", "Placed Order", "Placed Order",
                       "Viewed Product"],
        "order_id": ["O1", "O2", "O3", "O3", None], "sku": "S", "price": [100.0, 50.0, 70.0,
                                                                         70.0, 1.0],
        "quantity": 1, "event_time": [_t(5), _t(30), _t(2), _t(2), _t(1)]}).astype(
        {"event_time": campaign.TIME})
    window = pd.Timedelta(days=7)
    orders = events.loc[events["event_name"] != "Viewed Product"].drop_duplicates("event_id")
    expected = campaign.campaign_tables(campaign.campaign_partials(
        campaign.check_funnel(treatments).rows, orders, window), window)

    def matches(actual):
        [tables] = actual
        for name, table in expected.items():
            pd.testing.assert_frame_equal(tables[name].reset_index(drop=True), table,
                                          check_dtype=False)

    with TestPipeline() as p:
        clean = p | "Treatments" >> beam.Create([treatments]) | CleanTreatmentEvents(4)
        order_rows = p | "Events" >> beam.Create([events]) | OrderEvents(4)
        tables, counts = ({"treatment_events": clean.rows, "orders": order_rows.rows}
                          | CampaignReport(window, num_shards=4))
        assert_that(tables, matches, label="Tables")
        assert_that((order_rows.counts, counts) | beam.Flatten() | SumCounts(),
                    equal_to([{"events.processed": 4, "events.deduplicated": 1,
                               "campaign.recipients": 3}]), label="Counts")


@pytest.mark.parametrize("size, period", [(7, 1), (7, 2), (3, 3)])
def test_common_bucket_divides_window_and_period(size, period):
    bucket = campaign.common_bucket(pd.Timedelta(days=size), pd.Timedelta(days=period))
    assert pd.Timedelta(days=size) % bucket == pd.Timedelta(0)
    assert pd.Timedelta(days=period) % bucket == pd.Timedelta(0)
