"""Reference data of the streaming job: versions, their side input, BigQuery tables.

The side-input path (PeriodicImpulse → version per fixed window → AsSingleton)
runs on the FnApiRunner over a bounded impulse sequence in the past, which is
where Beam can run it locally; the poll seam runs on the DirectRunner in
tests/test_streaming_transforms.py and tests/test_streaming_e2e.py. BigQuery
tables are bqemulator's (tests/emulators.py).
"""
import os

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import GlobalWindow, TimestampedValue
from apache_beam.utils.timestamp import Timestamp

from models.config import DEFAULT_CONFIG
from pipelines import streaming_refresh as job
from pipelines.jobs import EXIT_USAGE, run_with_status
from tests.test_streaming_transforms import _catalog_rows, _write_jsonl, small_world
from transforms.bigquery_io import load_inputs
from transforms.streaming import (BigQueryReference, CheckSkus, FileReference, ReferenceVersion,
                                  ReferenceVersions, delivery_for)
from transforms.streaming.reference import POLL, SIDE_INPUT
from transforms.warehouse import parse_table

CONFIG = DEFAULT_CONFIG
PAST = 1_700_000_000     # seconds: in the past, so a bounded PeriodicImpulse fires at once
INTERVAL = 10
US = 1_000_000


def _eligible(data, sku):
    return bool(data.arrays.eligible[list(data.arrays.sku).index(sku)])


def _fnapi():
    return TestPipeline(runner="FnApiRunner", options=PipelineOptions([]))


# --- versions and the per-process holder ------------------------------------------------------

def test_the_delivery_is_chosen_per_runner_in_one_place():
    assert delivery_for(None) == POLL                       # the job maps it to the next one
    assert delivery_for("BundleBasedDirectRunner") == POLL
    assert delivery_for("DirectRunner") == POLL
    assert delivery_for("DataflowRunner") == SIDE_INPUT
    assert delivery_for("DataflowRunner", "poll") == POLL     # --reference_delivery overrides
    assert delivery_for(None, "side_input") == SIDE_INPUT
    with pytest.raises(ValueError):
        delivery_for(None, "sometimes")


def test_a_process_loads_once_per_version_and_never_goes_back(tmp_path):
    directory = small_world(tmp_path / "w")
    reference = FileReference(directory, CONFIG, 3600, "")
    first = reference.checked()
    data = reference.current(first)
    assert data.version == first.fingerprint and _eligible(data, "S01")
    # The same fingerprint checked later (the next interval's side input): no reload.
    assert reference.current(ReferenceVersion(first.checked_at + 60, first.fingerprint)) is data
    _write_jsonl(os.path.join(directory, "catalog.jsonl"), _catalog_rows(refurbished=("S01",)))
    os.utime(os.path.join(directory, "catalog.jsonl"), (1, first.checked_at + 5))
    newer = ReferenceVersion(first.checked_at + 120, reference.fingerprint())
    assert newer.fingerprint != first.fingerprint
    replaced = reference.current(newer)
    assert replaced.version == newer.fingerprint and not _eligible(replaced, "S01")
    # An element of an earlier window carries the older version: it gets the newer data.
    assert reference.current(first) is replaced
    # Polling (no side input) in the same process sees the same held data, not a third copy.
    assert reference.current() is replaced


def test_a_pickled_copy_shares_the_process_data(tmp_path):
    """Every DoFn holds its own unpickled copy of the reference; the data exists once."""
    import pickle
    reference = FileReference(small_world(tmp_path / "w"), CONFIG, 3600, "")
    for delivery in (POLL, SIDE_INPUT):
        reference.delivery = delivery
        reference.key = f"{reference.key}-{delivery}"
        copy = pickle.loads(pickle.dumps(reference))
        assert copy.current() is reference.current()


# --- the side input (FnApiRunner, bounded impulses) -------------------------------------------

class _WithWindow(beam.DoFn):
    def process(self, version, window=beam.DoFn.WindowParam):
        yield (int(window.start), int(window.end), version.fingerprint)


def test_versions_are_checked_once_per_interval_each_in_its_own_window(tmp_path):
    reference = FileReference(small_world(tmp_path / "w"), CONFIG, INTERVAL, "")
    expected = [(PAST + i * INTERVAL, PAST + (i + 1) * INTERVAL, reference.fingerprint())
                for i in range(3)]
    with _fnapi() as p:
        versions = p | ReferenceVersions(reference, Timestamp(PAST),
                                         Timestamp(PAST + 3 * INTERVAL))
        assert_that(versions | beam.ParDo(_WithWindow()), equal_to(expected))


def _event(i, seconds, sku):
    return {"event_id": f"E{i}", "user_id": "U1", "event_name": "Viewed Product", "sku": sku,
            "event_time_us": (PAST + seconds) * US}


def _timestamped(p, events):
    return (p | beam.Create(events)
            | beam.Map(lambda r: TimestampedValue(r, r["event_time_us"] / US)).with_output_types(
                dict))


class _Where(beam.DoFn):
    def process(self, record, window=beam.DoFn.WindowParam):
        yield (record["event_id"], isinstance(window, GlobalWindow))


def test_check_skus_reads_the_new_version_from_the_side_input_without_waiting_to_poll(tmp_path):
    """The process holds the catalogue without S13; the file is then replaced by one with it.

    Polling every hour, the step goes on refusing S13 (the control run); with
    the versions side input it is told of the new version at the next
    interval. An event older than the first impulse (its window has no
    version) falls back to the poll and gets the newest data the process
    holds. Every output is back in the global window.
    """
    directory = small_world(tmp_path / "w")
    reference = FileReference(directory, CONFIG, 3600, "")
    reference.delivery = SIDE_INPUT
    assert "S13" not in set(reference.current().catalog["sku"])   # polled and held
    rows = _catalog_rows() + [{**_catalog_rows()[0], "sku": "S13"}]
    _write_jsonl(os.path.join(directory, "catalog.jsonl"), rows)
    events = [_event(1, 1, "S01"), _event(2, 15, "S13"), _event(3, 25, "S99"),
              _event(4, -100, "S13")]
    with _fnapi() as p:      # the control: no side input, the poll has not re-checked
        polled = _timestamped(p, events) | CheckSkus("events", reference)
        assert_that(polled.rows | beam.Map(lambda r: r["event_id"]), equal_to(["E1"]))
    with _fnapi() as p:
        versions = p | "Versions" >> ReferenceVersions(reference, Timestamp(PAST),
                                                       Timestamp(PAST + 3 * INTERVAL))
        checked = _timestamped(p, events) | CheckSkus("events", reference, versions)
        assert_that(checked.rows | "RowsWhere" >> beam.ParDo(_Where()),
                    equal_to([("E1", True), ("E2", True), ("E4", True)]), label="Rows")
        assert_that(checked.dead_letters | beam.Map(lambda d: (d["reason"], d["step"])),
                    equal_to([("unknown sku", "CheckSkus")]), label="DeadLetters")
    assert "S13" in set(reference.current().catalog["sku"])


def test_versions_need_a_refresh_interval_of_a_second(tmp_path):
    with pytest.raises(ValueError, match="at least 1 second"):
        ReferenceVersions(FileReference(small_world(tmp_path / "w"), CONFIG, 0, ""))


# --- BigQuery reference tables (bqemulator) ---------------------------------------------------

def _bigquery_reference(emulator, dataset, refresh=0):
    endpoint = f"http://{emulator.host}"
    tables = {t: parse_table(t, emulator.project, dataset) for t in ("catalog", "users", "fitment")}
    return BigQueryReference(tables, emulator.project, CONFIG, refresh, "", endpoint)


def test_bigquery_tables_give_the_same_data_as_the_files_and_a_replaced_table_a_new_version(
        bigquery, tmp_path):
    directory = small_world(tmp_path / "w")
    endpoint = f"http://{bigquery.host}"
    load_inputs(directory, bigquery.project, "ref_replace", endpoint,
                tables=("catalog", "users", "fitment"))
    reference = _bigquery_reference(bigquery, "ref_replace")
    reference.check()
    data = reference.current()
    files = FileReference(directory, CONFIG, 0, "").current()
    assert sorted(data.catalog["sku"]) == sorted(files.catalog["sku"])
    assert list(data.arrays.eligible) == list(files.arrays.eligible)
    assert dict(data.fitting) == dict(files.fitting)
    assert sorted(data.servable["user_id"]) == sorted(files.servable["user_id"])
    assert _eligible(data, "S01")
    # The catalogue table is replaced while the job runs (a load job, as a nightly export does).
    replaced_dir = tmp_path / "replaced"
    replaced_dir.mkdir()
    _write_jsonl(str(replaced_dir / "catalog.jsonl"), _catalog_rows(refurbished=("S01",)))
    load_inputs(str(replaced_dir), bigquery.project, "ref_replace", endpoint, tables=("catalog",))
    after = reference.current()
    assert after.version != data.version
    assert after.version.split("|")[1:] == data.version.split("|")[1:]   # users, fitment same
    assert not _eligible(after, "S01")
    # A reference that polls hourly keeps its version until then.
    slow = _bigquery_reference(bigquery, "ref_replace", refresh=3600)
    first = slow.current()
    load_inputs(directory, bigquery.project, "ref_replace", endpoint, tables=("catalog",))
    assert slow.current() is first


def _job_argv(bigquery, dataset, *extra):
    return ["--events_subscription", "projects/test-project/subscriptions/events",
            "--treatments_subscription", "projects/test-project/subscriptions/treatments",
            "--streaming_dataset", "test-project.streaming", "--project", bigquery.project,
            "--bigquery_endpoint", f"http://{bigquery.host}", "--source", "bigquery",
            "--bigquery_dataset", dataset, *extra]


HISTORY = [{"event_id": "H1", "event_time": "2026-01-02T10:00:00Z", "user_id": "U1",
            "event_name": "Placed Order", "sku": "S02", "quantity": 1, "price": 101.0,
            "order_id": "OH1"}]


def test_the_job_reads_its_reference_tables_from_bigquery_and_refuses_a_missing_one(
        bigquery, tmp_path, capsys):
    directory = small_world(tmp_path / "w", HISTORY)
    load_inputs(directory, bigquery.project, "ref_job", f"http://{bigquery.host}",
                tables=("catalog", "users", "events"))          # no fitment table
    status = run_with_status(job.run, _job_argv(bigquery, "ref_job"))
    err = capsys.readouterr().err.strip()
    assert status == EXIT_USAGE
    assert err.count("\n") == 0
    assert "test-project.ref_job.fitment (fitment) does not exist" in err
    assert "fitment_attributes: []" in err                       # the hint a shop without it needs

    load_inputs(directory, bigquery.project, "ref_job", f"http://{bigquery.host}",
                tables=("fitment",))
    options = PipelineOptions(_job_argv(bigquery, "ref_job"))
    ctx = job.context_from(options)
    reference = job.reference_of(options, ctx)
    assert isinstance(reference, BigQueryReference) and reference.delivery == POLL
    assert reference.refs["events"].id == "test-project.ref_job.events"   # the history
    assert list(reference.current().history_lines["order_id"]) == ["OH1"]
    side = job.reference_of(PipelineOptions(_job_argv(
        bigquery, "ref_job", "--runner", "DataflowRunner")), ctx)
    assert side.delivery == SIDE_INPUT                          # auto, on Dataflow
    with pytest.raises(SystemExit, match="does not run on the local DirectRunner"):
        job.reference_of(PipelineOptions(_job_argv(
            bigquery, "ref_job", "--reference_delivery", "side_input")), ctx)
    with pytest.raises(SystemExit, match="--events_since is not used"):
        job.reference_of(PipelineOptions(_job_argv(
            bigquery, "ref_job", "--events_since", "2026-01-01T00:00:00Z")), ctx)
    with pytest.raises(SystemExit, match="must be >= 1"):
        job.reference_of(PipelineOptions(_job_argv(
            bigquery, "ref_job", "--runner", "DataflowRunner",
            "--reference_refresh_seconds", "0")), ctx)


def test_parquet_reference_tables_are_validated_as_the_batch_source_validates_them(tmp_path):
    """A null year in Parquet is an absent year (as in JSON, BigQuery and the batch job's
    ValidateArrowFn), not a non-finite one: the user stays in the reference data."""
    import pandas as pd
    directory = small_world(tmp_path / "w")
    users = pd.read_json(os.path.join(directory, "users.jsonl"), lines=True, dtype=False)
    users["year"] = pd.array([2015, None, 2018, 2018], dtype="Int64")
    users.to_parquet(os.path.join(directory, "users.parquet"), index=False)
    os.remove(os.path.join(directory, "users.jsonl"))
    data = FileReference(directory, CONFIG, 0, "").current()
    assert sorted(data.users["user_id"]) == ["U1", "U2", "U3", "U4"]
