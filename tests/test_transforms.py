"""TestPipeline tests of the batch composites: each runs a real (Direct) pipeline."""
import json

import apache_beam as beam
import pandas as pd
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from models import popularity
from models.config import DEFAULT_CONFIG
from transforms.frames import CoGroupFrames, GroupFrames
from transforms.health import CountRows, DeadLetterCounts, SumCounts
from transforms.io import ReadTable
from transforms.recommend import (CheckOneRowPerEmail, CleanCatalog, DedupeEvents,
                                  DropUnknownSkus, SegmentPopularity)

AS_OF = pd.Timestamp("2026-06-01", tz="UTC")


def _event(i, **overrides):
    row = {"event_id": f"E{i}", "event_time": "2026-05-01T10:00:00Z", "user_id": "U1",
           "event_name": "Ordered Product", "sku": "S1", "quantity": 1, "price": 99.0,
           "order_id": f"O{i}"}
    row.update(overrides)
    return row


def _write_jsonl(path, rows, extra_lines=()):
    with open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
        for line in extra_lines:
            handle.write(line + "\n")
    return str(path)


def _rows(frames):
    """Frames → sorted list of row tuples, so equal_to can compare them."""
    return frames | beam.FlatMap(lambda f: [tuple(r) for r in f.itertuples(index=False)])


def test_read_table_dead_letters_bad_rows_with_reasons(tmp_path):
    path = _write_jsonl(tmp_path / "events.jsonl", [
        _event(1), _event(2, event_name="Teleported"), _event(3, price=-5.0),
        _event(4, order_id=None), {"event_id": "E5"}],
        extra_lines=['{"event_id": "E6", "price": NaN, "event_time": "2026-05-01T10:00:00Z", '
                     '"user_id": "U1", "event_name": "Viewed Product", "sku": "S1"}',
                     '{"truncated": ', "[1, 2]"])
    with TestPipeline() as p:
        read = p | ReadTable("events", path, batch_rows=3)
        assert_that(read.rows | "Ids" >> beam.FlatMap(lambda f: list(f["event_id"])),
                    equal_to(["E1"]), label="OnlyGoodRowPasses")
        reasons = read.dead_letters | beam.FlatMap(lambda f: list(f["reason"]))
        assert_that(reasons, equal_to([
            "unknown event_name", "negative price", "order event without order_id",
            "missing event_time", "non-finite price", "malformed JSON",
            "record is not a JSON object"]), label="ReasonPerBadRow")
        counts = read.counts | "Sum" >> SumCounts()
        assert_that(counts, equal_to([{"events.read": 8}]), label="EveryLineCounted")


def test_group_frames_puts_each_key_in_one_shard():
    frames = [pd.DataFrame({"k": ["a", "b", "c"], "v": [1, 2, 3]}),
              pd.DataFrame({"k": ["a", "c"], "v": [4, 5]})]
    with TestPipeline() as p:
        grouped = (p | beam.Create(frames) | GroupFrames(["k"], num_shards=4)
                   | beam.FlatMap(lambda kv: [(k, sorted(g["v"])) for k, g in
                                              kv[1].groupby("k")]))
        assert_that(grouped, equal_to([("a", [1, 4]), ("b", [2]), ("c", [3, 5])]))


def test_cogroup_frames_joins_on_differently_named_frames():
    users = pd.DataFrame({"user_id": ["U1", "U2"], "email": ["a@x", "b@x"]})
    events = pd.DataFrame({"user_id": ["U1", "U1", "U3"], "sku": ["S1", "S2", "S3"]})
    with TestPipeline() as p:
        joined = ({"users": p | "U" >> beam.Create([users]),
                   "events": p | "E" >> beam.Create([events])}
                  | CoGroupFrames({"users": ["user_id"], "events": ["user_id"]}, 3)
                  | beam.FlatMap(lambda kv: [
                      (u, sorted(kv[1]["events"].query("user_id == @u")["sku"])
                       if len(kv[1]["events"]) else [])
                      for u in (kv[1]["users"]["user_id"] if len(kv[1]["users"]) else [])]))
        assert_that(joined, equal_to([("U1", ["S1", "S2"]), ("U2", [])]))


def _catalog_row(sku, part_type="Intake", price=100.0):
    return {"sku": sku, "title": sku, "part_type": part_type, "brand": "B", "price": price,
            "image_url": "https://img/x.jpg", "tags": (), "is_universal": False,
            "variant_group": None}


def test_clean_catalog_resolves_conflicts_and_counts_duplicates():
    batch1 = pd.DataFrame([_catalog_row("S1"), _catalog_row("S2", "Wheel")])
    batch2 = pd.DataFrame([_catalog_row("S2", "Exhaust"), _catalog_row("S1")])
    with TestPipeline() as p:
        cleaned = p | beam.Create([batch1, batch2]) | CleanCatalog()
        assert_that(_rows(cleaned.rows | beam.Map(lambda f: f[["sku", "part_type"]])),
                    equal_to([("S1", "Intake"), ("S2", "Exhaust")]), label="Canonical")
        assert_that(cleaned.dead_letters | beam.FlatMap(lambda f: list(f["reason"])),
                    equal_to(["catalogue conflict: sku S2 listed with part_type 'Wheel'; "
                              "kept 'Exhaust'"]), label="ConflictReported")
        assert_that(cleaned.counts | SumCounts(), equal_to(
            [{"catalog.deduplicated": 1, "catalog.processed": 2}]), label="Counts")


def test_drop_unknown_skus_dead_letters_them():
    catalog = pd.DataFrame([_catalog_row("S1")])
    events = pd.DataFrame([_event(1), _event(2, sku="NOPE")])
    with TestPipeline() as p:
        cat = p | "Cat" >> beam.Create([catalog])
        kept = p | "Ev" >> beam.Create([events]) | DropUnknownSkus("events", cat)
        assert_that(kept.rows | beam.FlatMap(lambda f: list(f["event_id"])),
                    equal_to(["E1"]), label="Known")
        assert_that(kept.dead_letters | DeadLetterCounts(),
                    equal_to([("events.dead_lettered", 1), ("dead_letter.unknown sku", 1)]),
                    label="Unknown")


def test_dedupe_events_across_batches():
    first = pd.DataFrame([_event(1), _event(2)])
    second = pd.DataFrame([_event(2), _event(3)])
    for frame in (first, second):
        frame["event_time"] = pd.to_datetime(frame["event_time"], utc=True)
    with TestPipeline() as p:
        deduped = p | beam.Create([first, second]) | DedupeEvents("events", num_shards=3)
        assert_that(deduped.rows | beam.FlatMap(lambda f: list(f["event_id"])),
                    equal_to(["E1", "E2", "E3"]), label="Unique")
        assert_that(deduped.counts | SumCounts(), equal_to([{"events.deduplicated": 1}]),
                    label="Counted")


def test_segment_popularity_does_not_depend_on_batching():
    lines = pd.DataFrame({
        "order_id": [f"O{i}" for i in range(6)],
        "sku": ["S1", "S1", "S2", "S3", "S1", "S2"],
        "user_id": ["U1"] * 6,
        "event_time": pd.to_datetime(["2026-05-01", "2026-04-01", "2026-05-20",
                                      "2026-03-01", "2026-05-30", "2026-01-01"], utc=True),
        "make": ["Ford", "Ford", "Ford", "Kia", None, "Kia"],
        "model": ["GT", "GT", "GT", "Rio", None, "Rio"],
        "year": [2015, 2016, 2015, 2012, None, 2012],
    })
    whole = popularity.partial_popularity(lines, AS_OF, DEFAULT_CONFIG)
    expected = [tuple(r) for r in whole.round(12).itertuples(index=False)]
    with TestPipeline() as p:
        pop = (p | beam.Create([lines.iloc[:2], lines.iloc[2:5], lines.iloc[5:]])
               | SegmentPopularity(AS_OF, DEFAULT_CONFIG))
        assert_that(_rows(pop | beam.Map(lambda f: f.round(12))), equal_to(expected))


def test_one_row_per_email_counts_duplicates_across_batches():
    frames = [pd.DataFrame({"email_lower": ["a@x", "b@x"]}),
              pd.DataFrame({"email_lower": ["a@x", "c@x", "c@x"]})]
    with TestPipeline() as p:
        checked = (p | beam.Create(frames) | CheckOneRowPerEmail(num_shards=2)
                   | beam.Map(lambda d: d[14]) | beam.CombineGlobally(sum))
        assert_that(checked, equal_to([2]))


def test_count_rows_is_zero_for_empty_input():
    with TestPipeline() as p:
        counted = p | beam.Create([]) | CountRows("nothing")
        assert_that(counted, equal_to([("nothing", 0)]))


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_read_table_gives_same_rows_from_jsonl_and_parquet(tmp_path, fmt):
    rows = [_event(1), _event(2, event_name="Viewed Product", order_id=None, price=12.5)]
    if fmt == "jsonl":
        path = _write_jsonl(tmp_path / "events.jsonl", rows)
    else:
        path = str(tmp_path / "events.parquet")
        pd.DataFrame(rows).to_parquet(path)
    with TestPipeline() as p:
        read = p | ReadTable("events", path)
        assert_that(_rows(read.rows | beam.Map(
            lambda f: f[["event_id", "event_name", "price", "order_id"]])),
            equal_to([("E1", "Ordered Product", 99.0, "O1"),
                      ("E2", "Viewed Product", 12.5, None)]))


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_read_table_ignores_a_bom_where_the_file_starts(tmp_path, suffix):
    """A UTF-8 BOM before the first record used to dead-letter it as malformed JSON."""
    import gzip

    from models.config import InputConfig
    from transforms.io import read_frame

    body = b"\xef\xbb\xbf" + b"".join(json.dumps(_event(i)).encode() + b"\n" for i in (1, 2))
    path = tmp_path / f"events{suffix}"
    path.write_bytes(gzip.compress(body) if suffix.endswith(".gz") else body)
    with TestPipeline() as p:
        read = p | ReadTable("events", str(path), limits=InputConfig(max_quantity=5))
        assert_that(read.rows | "Ids" >> beam.FlatMap(lambda f: list(f["event_id"])),
                    equal_to(["E1", "E2"]), label="BothRecordsRead")
        assert_that(read.dead_letters, equal_to([]), label="NoDeadLetters")
    frame, rejected = read_frame(str(tmp_path), "events")
    assert frame["event_id"].tolist() == ["E1", "E2"] and rejected == {}


def test_read_table_applies_the_runs_input_limits(tmp_path):
    from models.config import InputConfig

    path = _write_jsonl(tmp_path / "events.jsonl", [_event(1, quantity=50_000), _event(2)])
    with TestPipeline() as p:
        default = p | "Default" >> ReadTable("events", path)
        raised = p | "Raised" >> ReadTable("events", path,
                                           limits=InputConfig(max_quantity=100_000))
        assert_that(default.dead_letters | "Why" >> beam.FlatMap(lambda f: list(f["reason"])),
                    equal_to(["absurd quantity"]), label="CappedByDefault")
        assert_that(raised.rows | "Ids" >> beam.FlatMap(lambda f: list(f["event_id"])),
                    equal_to(["E1", "E2"]), label="WholesaleLinePasses")
