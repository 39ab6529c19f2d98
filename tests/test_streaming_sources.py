"""Candidate sources and the union ranker in the streaming refresh (#16 item 2).

For the same events and ``as_of`` a refreshed user's row equals the batch job's
row (``recommend_history``, the batch ``Recommend`` composite's handler in one
process) for every source of the slot mix and for the union ranker; the shared
tables the stream builds per window from the history's tables plus the window's
lines equal the batch build over all lines; the ranker artifact is swapped
without a restart, and a model trained on other sources is refused at start-up in
one line. The tiny generated world: history ``events`` (Dec-Feb), stream
``holdout_events`` (March).
"""
import dataclasses
import os
from types import SimpleNamespace

import apache_beam as beam
import numpy as np
import pandas as pd
import pytest
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import IntervalWindow, TimestampedValue

from models import candidates, profiles, stream_sources, union_ranker
from models import streaming as model
from models.catalog import resolve_conflicts
from models.config import CandidatesConfig, RecsConfig, TrendingConfig
from models.ranker import TrainConfig
from models.recommend_handler import (UnionRerankHandler, handler_for, prepare_history,
                                      recommend_history)
from models.world import WorldSpec, generate, write_world
from pipelines import streaming_refresh
from pipelines.jobs import UsageError
from transforms.io import read_frame
from transforms.ranker import LATEST, save_model
from transforms.streaming import (FileReference, ModelReference, RefreshRecommendations,
                                  TouchedUsers, WindowedPopularity, WindowLines,
                                  WindowOrderLines)
from transforms.streaming.refresh import RefreshMixShardFn

DAY_US = 86_400 * 1_000_000
WEEK_US = 7 * DAY_US
TUNED = [["buy_again", 2], ["also_bought", 1], ["segment_popularity", 1]]
MIXES = {
    "buy_again": [["buy_again", 4]],
    "also_bought": [["also_bought", 4]],
    "trending": [["trending", 4]],
    "segment_popularity": [["segment_popularity", 4]],
    "tuned_mix": TUNED,
    "every_source_boosted": [["buy_again", 1], ["also_bought", 1], ["trending", 1],
                             ["segment_popularity", 1]],
}


def _config(mix, max_history=100, boost=()):
    return dataclasses.replace(RecsConfig(), candidates=CandidatesConfig(
        mix=tuple(tuple(p) for p in mix),
        also_bought=dataclasses.replace(CandidatesConfig().also_bought, max_history=max_history),
        trending=TrendingConfig(min_count=2, boost_sources=tuple(boost))))


def _mix_config(name):
    return _config(MIXES[name], boost=("also_bought", "segment_popularity")
                   if name == "every_source_boosted" else ())


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("sources_world"))
    write_world(generate(WorldSpec.preset("tiny"), 7), directory, "jsonl", 0)
    frames = {t: read_frame(directory, t)[0] for t in
              ("catalog", "users", "fitment", "events", "holdout_events")}
    known = frames["catalog"]["sku"]
    stream = profiles.dedupe_events(frames["holdout_events"].loc[
        frames["holdout_events"]["sku"].isin(known)]).rows
    start = model.micros(stream["event_time"]).min()
    end = (start // WEEK_US + 2) * WEEK_US     # a whole epoch-aligned week of the stream
    times = model.micros(stream["event_time"])
    window = stream.loc[(times >= end - WEEK_US) & (times < end)].reset_index(drop=True)
    return SimpleNamespace(dir=directory, **frames, history=frames["events"].loc[
        frames["events"]["sku"].isin(known)], stream=stream, window=window, end_us=int(end),
        as_of=pd.Timestamp(int(end), unit="us", tz="UTC"))


def _stream_rows(world, config, events, as_of, ranker=None):
    """What `RefreshShardFn` does for one window: the window's tables, the handler, the users."""
    ref = FileReference(world.dir, config, 0, "events").current()
    orders = events.loc[events["event_name"].isin(model.ORDER_EVENT_NAMES)]
    pop = model.window_popularity(orders, ref, as_of, config)
    base = stream_sources.HistorySources.build(ref.history_lines, ref.arrays.sku,
                                               config.candidates)
    lines = stream_sources.fresh_lines(stream_sources.cells_of_events(events),
                                       ref.arrays.sku, ref.history_keys)
    tables = stream_sources.tables_at(base, ref.history_lines, ref.history_as_of, lines, as_of,
                                      config.candidates,
                                      frozenset(ref.arrays.sku[ref.arrays.eligible])).tables
    handler = handler_for(config) if ranker is None else UnionRerankHandler(config,
                                                                            lambda: ranker)
    serving = model.serving(ref, pop, handler, tables)
    return model.refresh_users(model.requests_of_events(events), ref, serving, as_of, config)


def _batch_rows(world, config, events, as_of, ranker=None):
    history = prepare_history(world.users, pd.concat([world.history, events], ignore_index=True),
                              as_of, config)
    handler = None if ranker is None else UnionRerankHandler(config, lambda: ranker)
    return recommend_history(history, resolve_conflicts(world.catalog).catalog, world.fitment,
                             as_of, config, handler=handler)


PARTS = [f"rec_part_{i}" for i in range(1, 5)]
SCORES = [f"rec{i}_score" for i in range(1, 5)]


def _facts(rows):
    return sorted((r["user_id"], tuple(r[c] for c in PARTS), r["source"],
                   tuple(round(float(r[c]), 9) for c in SCORES))
                  for r in rows.to_dict("records"))


def _assert_same_rows(stream, batch):
    """Same rows for the refreshed users, and the same users left unserved (a mix of one
    personal source, e.g. buy-again alone, serves only users with four such SKUs)."""
    users = set(stream.rows["user_id"])
    unserved = set(stream.unserved["user_id"])
    assert len(users) >= 3 and len(users | unserved) >= 20
    touched = set(stream.signals["user_id"])
    assert unserved == set(batch.unserved["user_id"]) & touched
    expected = batch.rows.loc[batch.rows["user_id"].isin(users)]
    assert len(expected) == len(stream.rows)
    assert _facts(stream.rows) == _facts(expected)
    # the slot kinds too: which source filled each slot
    kinds = [c for c in stream.rows.columns if c.endswith("_source") and c != "source"]
    assert (stream.rows.set_index("user_id")[kinds].sort_index()
            .equals(expected.set_index("user_id")[kinds].sort_index()))


# --- the shared tables, window by window -------------------------------------------------------

def _shared_equal(got: candidates.SharedTables, want: candidates.SharedTables):
    pd.testing.assert_frame_equal(got.intervals.reset_index(drop=True),
                                  want.intervals.reset_index(drop=True))
    for name in ("trending", "boost"):
        a, b = getattr(got, name), getattr(want, name)
        assert (a is None) == (b is None)
        if a is not None:
            pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-12)
    assert (got.similarity is None) == (want.similarity is None)
    if got.similarity is not None:
        pd.testing.assert_frame_equal(got.similarity.table, want.similarity.table,
                                      check_exact=False, rtol=1e-12)
        for field in ("rows", "lines_capped", "pairs_generated", "pairs_distinct", "pairs_kept"):
            assert getattr(got.similarity, field) == getattr(want.similarity, field), field


@pytest.mark.parametrize("max_history", [100, 3], ids=["uncapped", "history_capped_at_3"])
def test_incremental_tables_equal_the_batch_tables_window_by_window(world, max_history):
    """Every window of the stream (4 weekly windows of 14 days, plus one ending before the
    history's last order): the history's tables plus the window's lines equal
    ``candidates.shared_tables`` over the history's and the window's lines."""
    config = _config(MIXES["every_source_boosted"], max_history, boost=("also_bought",))
    ref = FileReference(world.dir, config, 0, "events").current()
    base = stream_sources.HistorySources.build(ref.history_lines, ref.arrays.sku,
                                               config.candidates)
    spec = model.WindowSpec.of_seconds(14 * 86_400, 7 * 86_400, 0)
    times = model.micros(world.stream["event_time"])
    windows = sorted({w for t in times for w in spec.windows_of(int(t))})
    windows.append((int(times.min()) - 30 * DAY_US, int(times.min()) - 20 * DAY_US))
    checked = changed = 0
    for start, end in windows:
        events = world.stream.loc[(times >= start) & (times < end)]
        as_of = pd.Timestamp(end, unit="us", tz="UTC")
        lines = stream_sources.fresh_lines(stream_sources.cells_of_events(events),
                                           ref.arrays.sku, ref.history_keys)
        got = stream_sources.tables_at(base, ref.history_lines, ref.history_as_of, lines,
                                       as_of, config.candidates)
        everything = pd.concat([ref.history_lines, lines], ignore_index=True)
        want = candidates.shared_tables(everything, as_of, config.candidates)
        _shared_equal(got.tables, want)
        history_only = candidates.shared_tables(ref.history_lines, as_of, config.candidates)
        changed += not history_only.similarity.table.equals(want.similarity.table)
        checked += 1
    assert checked >= 5 and changed >= 3   # the windows' lines do move the tables


def test_a_window_adds_only_its_buyers_rows_and_bounds_the_cells(world):
    config = _config(TUNED)
    ref = FileReference(world.dir, config, 0, "events").current()
    base = stream_sources.HistorySources.build(ref.history_lines, ref.arrays.sku,
                                               config.candidates)
    lines = stream_sources.fresh_lines(stream_sources.cells_of_events(world.window),
                                       ref.arrays.sku, ref.history_keys)
    got = stream_sources.window_tables(base, lines, world.as_of, config.candidates)
    assert got.window_lines == len(lines) > 0
    assert got.buyers == lines["user_id"].nunique()
    # cells: at most the catalogue's SKUs squared; the pair updates: buyers x max_history^2
    n = len(ref.arrays.sku)
    assert base.cells <= n * n and got.cells <= n * n
    assert 0 < got.pair_updates <= 2 * got.buyers * config.candidates.also_bought.max_history ** 2
    # only the similarity rows the window moved are cut again; the rest are the history's
    assert 0 < got.rows_rescored < len(ref.arrays.sku)
    # a window without orders: the history's tables at its end
    quiet = stream_sources.window_tables(base, stream_sources.empty_lines(), world.as_of,
                                         config.candidates)
    assert (quiet.window_lines, quiet.buyers, quiet.pair_updates) == (0, 0, 0)
    _shared_equal(quiet.tables, candidates.shared_tables(ref.history_lines, world.as_of,
                                                         config.candidates))


# --- a refreshed user's row equals the batch job's row, per source -------------------------------

@pytest.mark.parametrize("name", list(MIXES))
def test_streaming_rows_equal_batch_rows_for_every_source(world, name):
    config = _mix_config(name)
    stream = _stream_rows(world, config, world.window, world.as_of)
    batch = _batch_rows(world, config, world.window, world.as_of)
    _assert_same_rows(stream, batch)
    slots = dict(stream.counters)
    for source in config.candidates.sources:   # every source of the mix fills some slot
        if name != "segment_popularity":
            assert slots.get(f"slots.source.{source}", 0) > 0, (source, slots)
    assert stream.violations and not any(stream.violations.values())


def test_popularity_only_stream_rows_differ_from_a_tuned_mix(world):
    """The comparison above can fail: the plain stream gives other lists than the tuned mix."""
    mix = _stream_rows(world, _config(TUNED), world.window, world.as_of)
    plain = _stream_rows(world, RecsConfig(), world.window, world.as_of)
    assert _facts(mix.rows) != _facts(plain.rows)


# --- the union ranker ---------------------------------------------------------------------------

def _examples(seed, sources, users=60):
    """Synthetic union rows: the user buys the rank-3 SKU of the second source (the blend lists
    the first source's top), so the model learns and beats the blend."""
    rng = np.random.default_rng(seed)
    by_source, future, blend = {s: [] for s in sources}, {}, []
    for u in range(users):
        user = f"s{seed}u{u}"
        for k, source in enumerate(sources):
            skus = [f"{source[:2]}{j}" for j in rng.permutation(30)[:6]]
            for sku, score in zip(skus, np.sort(rng.random(6))[::-1]):
                by_source[source].append((user, sku, float(score)))
            if k == 0:
                blend.append((user, 1, skus[0]))
            if k == 1:
                future[user] = frozenset({skus[2]})
    frames = {s: pd.DataFrame(r, columns=["user_id", "sku", "score"]) for s, r in
              by_source.items()}
    frame = union_ranker.union_features(frames, list(sources))
    frame = frame.assign(y=union_ranker.label(frame, future))
    return union_ranker.Examples(frame, pd.DataFrame(blend, columns=["user_id", "slot", "sku"])
                                 ), future


@pytest.fixture(scope="module")
def union_model():
    config = _config(TUNED)
    sources = config.candidates.sources
    train, _ = _examples(1, sources)
    valid, future = _examples(2, sources)
    model_, report = union_ranker.train_union(
        train, valid, future, config,
        TrainConfig(k=1, objective="binary", min_data_in_leaf=5, max_rounds=30), k=1)
    assert report["beats_baseline"]
    return model_


def _versioned(model_, version):
    import copy
    out = copy.copy(model_)
    out.metadata = {**model_.metadata, "version": version}
    return out


def test_union_ranker_rows_equal_batch_rows(world, union_model):
    config = _config(TUNED)
    ranker = _versioned(union_model, "union-stream-test")
    stream = _stream_rows(world, config, world.window, world.as_of, ranker)
    batch = _batch_rows(world, config, world.window, world.as_of, ranker)
    _assert_same_rows(stream, batch)
    assert dict(stream.counters)["ranker.rows_scored"] > 0


def _refresh(fn, world, end_us, events):
    """One refresh period of one shard through the DoFn; its rows."""
    requests = list(model.requests_of_events(events).items())
    element = ((0, end_us), [requests])
    lines = WindowLines(end_us, stream_sources.cells_of_events(events))
    win = IntervalWindow(end_us / 1e6 - 7 * 86_400, end_us / 1e6)
    out = [o for o in fn.process(element, None, lines, win=win) if isinstance(o, pd.DataFrame)]
    return pd.concat(out, ignore_index=True)


def test_a_new_model_artifact_is_swapped_in_without_a_restart(world, union_model, tmp_path):
    """Period 1 is scored by v1; v2 is saved (artifact, then LATEST); period 2 by v2, same DoFn.
    A half-written artifact is refused and v2 stays; a slow poll does not see the swap yet."""
    config = _config(TUNED)
    models_dir = str(tmp_path / "models")
    save_model(_versioned(union_model, "union-v1"), models_dir)
    watched = ModelReference(models_dir, config, 0)
    slow = ModelReference(models_dir, config, 3600)
    assert watched.check()[1] is None and slow.current().version == "union-v1"
    fn = RefreshMixShardFn(FileReference(world.dir, config, 0, "events"), config, "run",
                           "unused", clock=lambda: 0.0, ranker=watched)
    first_week = world.window
    first = _refresh(fn, world, world.end_us, first_week)
    assert set(first["model_version"]) == {"union-v1"} and len(first) >= 20
    save_model(_versioned(union_model, "union-v2"), models_dir)
    times = model.micros(world.stream["event_time"])
    second_week = world.stream.loc[(times >= world.end_us) & (times < world.end_us + WEEK_US)]
    second = _refresh(fn, world, world.end_us + WEEK_US, second_week)
    assert set(second["model_version"]) == {"union-v2"} and len(second) >= 20
    assert slow.current().version == "union-v1"   # polled at most every hour
    with open(os.path.join(models_dir, "union-v3.json"), "w") as handle:
        handle.write('{"format": "segment-recs-ranker", "form')    # a copy still being written
    with open(os.path.join(models_dir, LATEST), "w") as handle:
        handle.write("union-v3.json\n")
    third = _refresh(fn, world, world.end_us + WEEK_US, second_week)
    assert set(third["model_version"]) == {"union-v2"}


def test_a_model_trained_on_other_sources_is_refused_at_start_up_in_one_line(
        world, union_model, tmp_path):
    models_dir = str(tmp_path / "models")
    save_model(_versioned(union_model, "union-v1"), models_dir)
    options = PipelineOptions(["--ranker_model", models_dir])
    other = _config([["buy_again", 3], ["segment_popularity", 1]])
    with pytest.raises(UsageError) as err:
        streaming_refresh.ranker_of(options, other)
    assert str(err.value).startswith("--ranker_model: ranker union-v1 was trained on the "
                                     "sources buy_again, also_bought, segment_popularity")
    assert "\n" not in str(err.value)
    with pytest.raises(UsageError, match="^--ranker_model: the stream serves union rankers"):
        streaming_refresh.ranker_of(options, RecsConfig())
    garbage = tmp_path / "broken.json"
    garbage.write_text("{not json")
    with pytest.raises(UsageError) as err:
        streaming_refresh.ranker_of(PipelineOptions(["--ranker_model", str(garbage)]),
                                    _config(TUNED))
    assert str(err.value).startswith("--ranker_model: ") and "\n" not in str(err.value)
    accepted = streaming_refresh.ranker_of(options, _config(TUNED))
    assert accepted.current().version == "union-v1"


# --- the Beam graph: TestStream, the window's lines as a side input ------------------------------

class _Facts(beam.DoFn):
    def process(self, frame):
        for r in frame.to_dict("records"):
            yield (r["user_id"], tuple(r[c] for c in PARTS), r["source"],
                   tuple(round(float(r[c]), 9) for c in SCORES), r["model_version"],
                   int(r["popularity_as_of"].value // 1000))


def test_the_streaming_graph_serves_the_tuned_mix_as_batch_does(world):
    """Events of 40 users over one week through WindowedPopularity, WindowOrderLines,
    TouchedUsers and RefreshRecommendations: the rows equal the batch job's."""
    config = _config(TUNED)
    users = sorted(world.window["user_id"].unique())[:40]
    events = world.window.loc[world.window["user_id"].isin(users)].reset_index(drop=True)
    batch = _batch_rows(world, config, events, world.as_of)
    batch_rows = batch.rows.loc[batch.rows["user_id"].isin(set(users))]
    want = [(u, p, s, sc, "slot-mix-v1+stream", world.end_us) for u, p, s, sc in
            _facts(batch_rows)]
    assert len(want) >= 15
    spec = model.WindowSpec.of_seconds(7 * 86_400, 7 * 86_400, 0)
    records = model.typed_records("events", events)
    stream = TestStream().advance_watermark_to(world.end_us / 1e6 - 7 * 86_400)
    stream = stream.add_elements([TimestampedValue(r, r["event_time_us"] / 1e6)
                                  for r in records])
    stream = stream.advance_watermark_to(world.end_us / 1e6 + 60).advance_watermark_to_infinity()
    reference = FileReference(world.dir, config, 0, "events")
    options = PipelineOptions()
    options.view_as(StandardOptions).streaming = True
    with TestPipeline(options=options) as p:
        records_ = p | stream
        orders = records_ | beam.Filter(model.is_order)
        popularity = orders | WindowedPopularity(spec, reference, config)
        lines = orders | WindowOrderLines(spec)
        notices = p | "NoNotices" >> beam.Create([])
        requests = (records_, notices) | TouchedUsers(config)
        out = requests | RefreshRecommendations(
            reference, popularity.first_panes, config, spec, 2, "run", "unused",
            clock=lambda: 0.0, lines=lines)
        assert_that(out.rows | beam.ParDo(_Facts()), equal_to(want))

        def counted(actual):
            totals = {}
            for name, n in actual:
                totals[name] = totals.get(name, 0) + n
            assert totals["sources.windows_built"] == 1, totals   # one window, one process
            assert totals["sources.window_lines"] > 0 and totals["slots.source.buy_again"] > 0
            assert not any(v for k, v in totals.items() if k.startswith("qa.rule_"))
        assert_that(out.counts, counted, label="Counts")


class _SwapAfterFirstPeriod(beam.DoFn):
    """Saves ``v2`` (artifact, then LATEST) when the first period's rows come out, as a
    trainer publishing a new model while the job runs."""

    def __init__(self, model_, models_dir, first_end_us):
        self._model = model_
        self._dir = models_dir
        self._first = first_end_us

    def process(self, frame):
        ends = {int(t.value // 1000) for t in frame["popularity_as_of"]}
        if self._first in ends and not os.path.exists(os.path.join(self._dir, "union-v2.json")):
            save_model(_versioned(self._model, "union-v2"), self._dir)
        for end, version in zip(frame["popularity_as_of"], frame["model_version"]):
            yield int(end.value // 1000), version


def test_the_model_is_swapped_mid_stream_in_one_running_pipeline(world, union_model, tmp_path):
    """Two weekly refresh periods in one TestStream run: the first scored by union-v1; a new
    artifact saved when its rows come out; the second period scored by union-v2. (The
    DirectRunner emits the next TestStream event once the pipeline is idle, so the save
    precedes the second period; the DoFn-level test above does not rely on it.)"""
    config = _config(TUNED)
    models_dir = str(tmp_path / "models")
    save_model(_versioned(union_model, "union-v1"), models_dir)
    ranker = ModelReference(models_dir, config, 0)
    times = model.micros(world.stream["event_time"])
    first_start, first_end = world.end_us - WEEK_US, world.end_us
    users = sorted(world.stream.loc[(times >= first_start) & (times < first_end + WEEK_US),
                                    "user_id"].unique())[:30]
    picked = world.stream.loc[world.stream["user_id"].isin(users)]
    ptimes = model.micros(picked["event_time"])
    weeks = [picked.loc[(ptimes >= first_start) & (ptimes < first_end)],
             picked.loc[(ptimes >= first_end) & (ptimes < first_end + WEEK_US)]]
    assert all(len(w) for w in weeks)
    spec = model.WindowSpec.of_seconds(7 * 86_400, 7 * 86_400, 0)
    stream = TestStream().advance_watermark_to(first_start / 1e6)
    for week, end in zip(weeks, (first_end, first_end + WEEK_US)):
        stream = stream.add_elements([TimestampedValue(r, r["event_time_us"] / 1e6)
                                      for r in model.typed_records("events", week)])
        stream = stream.advance_watermark_to(end / 1e6 + 1).advance_processing_time(60)
    stream = stream.advance_watermark_to_infinity()
    reference = FileReference(world.dir, config, 0, "events")
    options = PipelineOptions()
    options.view_as(StandardOptions).streaming = True
    with TestPipeline(options=options) as p:
        records = p | stream
        orders = records | beam.Filter(model.is_order)
        popularity = orders | WindowedPopularity(spec, reference, config)
        lines = orders | WindowOrderLines(spec)
        requests = (records, p | "NoNotices" >> beam.Create([])) | TouchedUsers(config)
        out = requests | RefreshRecommendations(
            reference, popularity.first_panes, config, spec, 2, "run", "unused",
            clock=lambda: 0.0, lines=lines, ranker=ranker)
        versions = out.rows | beam.ParDo(_SwapAfterFirstPeriod(union_model, models_dir,
                                                                first_end))
        want = {(first_end, "union-v1"), (first_end + WEEK_US, "union-v2")}

        def scored_by(actual):
            if set(actual) != want:
                raise AssertionError(f"(period end, model_version) {sorted(set(actual))} "
                                     f"!= {sorted(want)}")
        assert_that(versions, scored_by)


def test_window_order_lines_gather_each_line_once_per_sliding_window():
    """20-second windows every 10 s: lines pre-gathered per period, then slid; an order reported
    twice (two event names) counts at its earliest event, whichever arrives first."""
    base = 1_800_000_000
    spec = model.WindowSpec.of_seconds(20, 10, 0)

    def line(i, second, order="O1", sku="A", user="u"):
        record = {"event_id": f"E{i}", "user_id": user, "event_name": "Placed Order",
                  "sku": sku, "order_id": order, "event_time_us": (base + second) * 1_000_000}
        return TimestampedValue(record, base + second)

    events = [line(1, 3), line(2, 1), line(3, 12, "O2", "B", "v"), line(4, 25, "O3", "A", "w")]
    stream = (TestStream().advance_watermark_to(base - 20).add_elements(events)
              .advance_watermark_to(base + 100).advance_watermark_to_infinity())
    us = 1_000_000
    o1, o2, o3 = ((("O1", "A"), ((base + 1) * us, "u"))), (("O2", "B"), ((base + 12) * us, "v")), (
        ("O3", "A"), ((base + 25) * us, "w"))
    want = [(base + 10, dict([o1])), (base + 20, dict([o1, o2])), (base + 30, dict([o2, o3])),
            (base + 40, dict([o3]))]
    options = PipelineOptions()
    options.view_as(StandardOptions).streaming = True
    with TestPipeline(options=options) as p:
        got = (p | stream | WindowOrderLines(spec)
               | beam.Map(lambda w: (w.window_end_us // us, w.cells)))
        assert_that(got, equal_to(want))


# --- the model's versions as a side input (Dataflow's delivery; FnApiRunner, bounded impulses) ---

def _fnapi():
    return TestPipeline(runner="FnApiRunner", options=PipelineOptions([]))


class _Versions(beam.DoFn):
    def process(self, frame):
        for end, version in zip(frame["popularity_as_of"], frame["model_version"]):
            yield int(end.value // 1000), version


def _scored_periods(p, world, config, ranker, ranker_versions, periods):
    """Refresh periods (end_us, events) of one shard through the refresh DoFn on the FnApiRunner,
    in time order, each in its weekly refresh window; their (period end, model_version)."""
    from apache_beam.transforms.window import FixedWindows
    from apache_beam.utils.timestamp import Timestamp
    from transforms.streaming.reference import RANKER_VERSION_ARG, version_side_input
    elements = [((0, end), [list(model.requests_of_events(events).items())])
                for end, events in periods]
    gathered = (p | "Periods" >> beam.Create(elements, reshuffle=False)
                | "AtPeriodEnd" >> beam.Map(
                    lambda e: TimestampedValue(e, Timestamp(micros=e[0][1] - 1)))
                | "RefreshPeriods" >> beam.WindowInto(FixedWindows(7 * 86_400)))
    none = p | "NoSideInput" >> beam.Create([])
    fn = RefreshMixShardFn(FileReference(world.dir, config, 0, "events"), config, "run",
                           "unused", clock=lambda: 0.0, ranker=ranker)
    scored = gathered | "RefreshShard" >> beam.ParDo(
        fn, beam.pvalue.AsSingleton(none, default_value=None),
        beam.pvalue.AsSingleton(none, default_value=None),
        **version_side_input(ranker_versions, RANKER_VERSION_ARG)).with_outputs(
        "dead_letter", "counts", main="rows")
    return scored.rows | "ModelVersions" >> beam.ParDo(_Versions())


def _week_after(world):
    times = model.micros(world.stream["event_time"])
    return world.stream.loc[(times >= world.end_us) & (times < world.end_us + WEEK_US)]


def test_the_model_swapped_mid_run_through_the_side_input(world, union_model, tmp_path):
    """Two weekly refresh periods in one FnApiRunner run; the model's side input holds union-v1's
    fingerprint for the first week and union-v2's for the second (v2 saved before the run, the
    process already holding v1 and polling hourly): week 1 is scored by v1, week 2 by v2."""
    from transforms.streaming.reference import SIDE_INPUT, ReferenceVersion
    config = _config(TUNED)
    models_dir = str(tmp_path / "models")
    save_model(_versioned(union_model, "union-v1"), models_dir)
    ranker = ModelReference(models_dir, config, 7 * 86_400)
    ranker.delivery = SIDE_INPUT
    v1 = ranker.polled()
    assert ranker.current(v1).version == "union-v1"
    save_model(_versioned(union_model, "union-v2"), models_dir)
    v2 = ReferenceVersion(v1.checked_at + 1, ranker.fingerprint())
    assert v2.fingerprint != v1.fingerprint and ranker.current().version == "union-v1"
    first, second = world.end_us, world.end_us + WEEK_US
    with _fnapi() as p:
        versions = (p | "Versions" >> beam.Create(
            [TimestampedValue(v1, (first - WEEK_US) / 1e6), TimestampedValue(v2, first / 1e6)],
            reshuffle=False) | "VersionWindows" >> beam.WindowInto(
            beam.window.FixedWindows(7 * 86_400)))
        got = _scored_periods(p, world, config, ranker, versions,
                              [(first, world.window), (second, _week_after(world))])
        assert_that(got | beam.Distinct(), equal_to([(first, "union-v1"),
                                                     (second, "union-v2")]))


def test_model_versions_checked_by_the_impulse_swap_the_model_and_refuse_a_half_written_one(
        world, union_model, tmp_path):
    """`ModelVersions` (a bounded PeriodicImpulse) checks the artifact for the job: v2, saved
    after the process loaded v1, serves although the hourly poll still has v1 (the control
    run); then a half-written v3 is refused, counted, and v2 stays."""
    from apache_beam.metrics.metric import MetricsFilter
    from apache_beam.utils.timestamp import Timestamp
    from transforms.streaming import ModelVersions
    from transforms.streaming.reference import SIDE_INPUT
    config = _config(TUNED)
    models_dir = str(tmp_path / "models")
    save_model(_versioned(union_model, "union-v1"), models_dir)
    ranker = ModelReference(models_dir, config, 3600)
    ranker.delivery = SIDE_INPUT
    assert ranker.current().version == "union-v1"          # held; polled hourly
    save_model(_versioned(union_model, "union-v2"), models_dir)
    period = [(world.end_us, world.window)]
    # Hourly checks over the last three hours of the week: the period's end reads the last.
    start = Timestamp(micros=world.end_us) - 3 * 3600

    for with_side_input, want in ((False, "union-v1"), (True, "union-v2")):
        p = _fnapi()
        versions = (p | "Versions" >> ModelVersions(ranker, start, start + 3 * 3600)
                    if with_side_input else None)
        got = _scored_periods(p, world, config, ranker, versions, period) | beam.Distinct()
        assert_that(got, equal_to([(world.end_us, want)]))
        p.run().wait_until_finish()
    with open(os.path.join(models_dir, "union-v3.json"), "w") as handle:
        handle.write('{"format": "segment-recs-ranker", "form')    # a copy still being written
    with open(os.path.join(models_dir, LATEST), "w") as handle:
        handle.write("union-v3.json\n")
    p = _fnapi()
    versions = p | "Versions" >> ModelVersions(ranker, start, start + 3 * 3600)
    got = _scored_periods(p, world, config, ranker, versions, period) | beam.Distinct()
    assert_that(got, equal_to([(world.end_us, "union-v2")]))
    result = p.run()
    result.wait_until_finish()
    refused = result.metrics().query(MetricsFilter().with_name("ranker.artifacts_refused"))
    assert sum(c.committed for c in refused["counters"]) == 1
    checks = result.metrics().query(MetricsFilter().with_name("ranker.checks"))
    assert sum(c.committed for c in checks["counters"]) == 3     # once per interval, per job
