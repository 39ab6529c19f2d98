"""Beam writers of the serving store, and keeping the store in step with the warehouse.

The batch job writes every user's row into a new version of the store
(``WriteServingVersion``: one MSET per 2,000 rows, pipelined, per bundle)
while the warehouse stages its output; after the gate, ``SwitchServingFn``
either serves that version (a published run: fallback lists, one pointer
switch, old versions pruned with the warehouse's backups) or drops it (a gated
run). The streaming refresh writes its refreshed users as streaming rows
(``WriteServingUpdates``), which the service prefers while they are newer than
the served version. ``follow_warehouse`` is what a rollback and
``python -m pipelines.serve rebuild`` call: serve whatever the warehouse's
published table holds, loading it first if the store does not have it.
Key layout and encoding: ``models.serving``.
"""
from __future__ import annotations

import argparse
import logging
import time
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple, Union

import apache_beam as beam
import pandas as pd
from apache_beam import typehints
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions

from models import health
from models.serving import (KEEP_VERSIONS, NAMESPACE, ServingStore, StoreUnavailable,
                            encode_rows, fallback_lists, frames_in_chunks)
from transforms.health import NAMESPACE as COUNTERS
from transforms.warehouse import BigQueryWarehouse, LocalWarehouse

Warehouse = Union[LocalWarehouse, BigQueryWarehouse]
LOAD_ROWS = 50_000
# A store command that fails is retried this many times, this far apart, before the rows
# count as not written: the store is a copy (the warehouse is the record), so an outage
# must not fail the job that publishes the warehouse.
RETRIES = 3
RETRY_SECONDS = 1.0


def _with_retries(write, *args) -> int:
    """``write(*args)``, retried on store errors; raises the last error."""
    import redis
    for attempt in range(RETRIES + 1):
        try:
            return write(*args)
        except (redis.RedisError, OSError):
            if attempt == RETRIES:
                raise
            time.sleep(RETRY_SECONDS * (attempt + 1))
    return 0


class ServingOptions(PipelineOptions):
    """Where the jobs also publish for low-latency serving (off unless given)."""

    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--serving_store", default=None,
                            help="Redis URL (redis://HOST:PORT/DB) of the serving store: a "
                                 "published run is also written there and switched in "
                                 "atomically; unset: no serving store.")
        parser.add_argument("--serving_namespace", default=NAMESPACE,
                            help="Key prefix of the serving store's keys.")
        parser.add_argument("--serving_keep_versions", type=int, default=KEEP_VERSIONS,
                            help="Versions the serving store keeps (the served one included, "
                                 "at least 1): each is a full copy; a rollback further back "
                                 "reloads from the warehouse.")


def store_from(options: PipelineOptions) -> Optional[ServingStore]:
    """The configured store, checked to answer now (ValueError with one line), or None."""
    opts = options.view_as(ServingOptions)
    if not opts.serving_store:
        return None
    if opts.serving_keep_versions < 1:
        raise ValueError("--serving_keep_versions must be >= 1")
    store = ServingStore(opts.serving_store, opts.serving_namespace)
    store.keep_versions = opts.serving_keep_versions
    try:
        store.check()
    except StoreUnavailable as err:
        raise ValueError(f"--serving_store {opts.serving_store} does not answer ({err}); "
                         f"start it or leave the flag out") from None
    return store


# --------------------------------------------------------------------------- the warehouse

def held_versions(warehouse: Warehouse) -> Set[str]:
    """Run ids whose output the warehouse still holds: production and every backup."""
    held = set(warehouse.list_backups()["run_id"].dropna().astype(str))
    current = published_run(warehouse)
    return held | ({current} if current else set())


def published_run(warehouse: Warehouse) -> Optional[str]:
    """The run id of the warehouse's production ``recommendations`` (None when there is none)."""
    try:
        found = warehouse.query("SELECT MIN(run_id) AS run_id FROM recommendations")
    except Exception:  # noqa: BLE001 (no production table yet: nothing published)
        return None
    value = found.iloc[0, 0] if len(found) else None
    return None if value is None or pd.isna(value) else str(value)


def load_from_warehouse(store: ServingStore, warehouse: Warehouse) -> Dict[str, Any]:
    """Write the warehouse's published recommendations as a store version; not switched.

    Returns ``run_id``, ``users`` written and ``seconds``.
    """
    started = time.perf_counter()
    frame = warehouse.read("recommendations")
    if frame is None or not len(frame):
        raise ValueError(f"{warehouse.location} has no published recommendations to serve")
    run_id = str(frame["run_id"].min())
    if store.meta(run_id) is not None and store.current() != run_id:
        store.drop(run_id)  # a half-loaded earlier attempt: start again from nothing
    store.begin(run_id, run_id, str(frame["model_version"].iloc[0]),
                frame["generated_at"].iloc[0])
    users = 0
    for chunk in frames_in_chunks(frame, LOAD_ROWS):
        users += store.write_users(run_id, chunk["user_id"].astype(str).tolist(),
                                   encode_rows(chunk))
    segments, global_list = fallback_lists(frame)
    store.write_fallbacks(run_id, segments, global_list)
    return {"run_id": run_id, "users": users, "segments": len(segments),
            "seconds": time.perf_counter() - started, "frame_rows": len(frame)}


def serve_published(store: ServingStore, warehouse: Warehouse, run_id: str,
                    users: Optional[int] = None) -> float:
    """Write the fallback lists of the warehouse's published output, then switch to ``run_id``.

    Returns the switch's seconds.
    """
    columns = ["segment", "source"] + [c for c in _rec_columns(warehouse)]
    frame = warehouse.read("recommendations", columns)
    segments, global_list = fallback_lists(frame)
    store.write_fallbacks(run_id, segments, global_list)
    return store.switch(run_id, users)


def _rec_columns(warehouse: Warehouse) -> List[str]:
    sample = warehouse.query("SELECT * FROM recommendations LIMIT 1")
    return [c for c in sample.columns if c.startswith("rec_part_")
            or (c.startswith("rec") and c.endswith(("_score", "_source")))]


def follow_warehouse(store: ServingStore, warehouse: Warehouse,
                     reload: bool = False) -> Dict[str, Any]:
    """Serve what the warehouse publishes: switch to its run (loading it if the store lacks it,
    or always with ``reload``), then drop versions the warehouse no longer backs up."""
    run_id = published_run(warehouse)
    if run_id is None:
        raise ValueError(f"{warehouse.location} has no published recommendations to serve")
    loaded: Dict[str, Any] = {"run_id": run_id, "users": None, "seconds": 0.0}
    if reload or not store.complete(run_id):
        loaded = load_from_warehouse(store, warehouse)
    loaded["switch_seconds"] = store.switch(run_id, loaded.get("users"))
    loaded["pruned"] = store.prune(held_versions(warehouse), store.keep_versions)
    return loaded


# --------------------------------------------------------------------------- batch

@typehints.with_input_types(pd.DataFrame)
@typehints.with_output_types(Tuple[int, int])
class _WriteVersionFn(beam.DoFn):
    """Writes frames of recommendation rows into one store version.

    Yields ``(rows written, rows not written)``: a store that stays down through the
    retries leaves rows unwritten, and the switch then keeps the served version.
    """

    def __init__(self, store: ServingStore, version: str, model_version: str,
                 generated_at: pd.Timestamp):
        self._store = store
        self._version = version
        self._model_version = model_version
        self._generated_at = generated_at
        self._rows = Metrics.counter(COUNTERS, "serving.rows_written")
        self._failed = Metrics.counter(COUNTERS, "serving.rows_not_written")

    def process(self, frame: pd.DataFrame) -> Iterator[Tuple[int, int]]:
        if not len(frame):
            return
        import redis
        try:
            _with_retries(self._store.begin, self._version, self._version,
                          self._model_version, self._generated_at)
            written = _with_retries(self._store.write_users, self._version,
                                    frame["user_id"].astype(str).tolist(), encode_rows(frame))
        except (redis.RedisError, OSError) as err:
            logging.error("serving store: %d rows not written (%s)", len(frame),
                          type(err).__name__)
            self._failed.inc(len(frame))
            yield 0, len(frame)
            return
        self._rows.inc(written)
        yield written, 0


def _add_pairs(pairs) -> Tuple[int, int]:
    """Sums ``(written, not written)`` pairs (a CombineGlobally function: (0, 0) when empty)."""
    written = failed = 0
    for w, f in pairs:
        written, failed = written + w, failed + f
    return written, failed


class WriteServingVersion(beam.PTransform):
    """Frames of recommendation rows -> one store version (not served yet) -> ``(rows
    written, rows not written)`` (a singleton; as a side input it makes the switch wait
    for every write)."""

    def __init__(self, store: ServingStore, version: str, model_version: str,
                 generated_at: pd.Timestamp):
        super().__init__()
        self._fn = _WriteVersionFn(store, version, model_version, generated_at)

    def expand(self, frames: beam.PCollection) -> beam.PCollection:
        return (frames
                | "WriteUsers" >> beam.ParDo(self._fn)
                | "SumWritten" >> beam.CombineGlobally(_add_pairs))


class SwitchServingFn(beam.DoFn):
    """After the gate: serve a published run's version, or drop a gated run's.

    Input: the run's ``pipeline_runs`` row (from ``PublishRunFn``); side input:
    ``(rows written, rows not written)`` of the store version. A published run
    whose every row was written gets its fallback lists (from the table just
    published), the pointer switch, and the store pruned to the versions the
    warehouse backs up. The row passes through.

    The warehouse is the record and has already published, so a store that
    failed (rows not written, or down at switch time) does not fail the job:
    the store keeps serving its previous version, an error line says so, and
    ``python -m pipelines.serve rebuild`` catches it up.
    """

    def __init__(self, store: ServingStore, warehouse: Warehouse):
        self._store = store
        self._warehouse = warehouse
        self._switched = Metrics.counter(COUNTERS, "serving.switched")
        self._not_switched = Metrics.counter(COUNTERS, "serving.not_switched")

    def process(self, row: Dict[str, object], written: Tuple[int, int]
                ) -> Iterator[Dict[str, object]]:
        import redis
        run_id = str(row["run_id"])
        rows, failed = written
        try:
            if row["status"] != health.PUBLISHED:
                _with_retries(self._store.drop, run_id)
                logging.info("run %s: gated; its serving store version was dropped", run_id)
            elif failed:
                self._not_switched.inc()
                logging.error("run %s: published, but %d rows did not reach the serving "
                              "store; it keeps serving its previous version (run `python -m "
                              "pipelines.serve rebuild`)", run_id, failed)
            else:
                seconds = _with_retries(serve_published, self._store, self._warehouse, run_id,
                                        rows)
                pruned = self._store.prune(held_versions(self._warehouse),
                                           self._store.keep_versions)
                self._switched.inc()
                logging.info("run %s: serving store switched to it (%d users, switch %.3f s); "
                             "pruned %d old version(s)", run_id, rows, seconds, len(pruned))
        except (redis.RedisError, OSError) as err:
            self._not_switched.inc()
            logging.error("run %s: the serving store did not answer (%s); it keeps serving "
                          "its previous version (run `python -m pipelines.serve rebuild`)",
                          run_id, type(err).__name__)
        yield row


# --------------------------------------------------------------------------- streaming

@typehints.with_input_types(pd.DataFrame)
@typehints.with_output_types(int)
class _WriteLiveFn(beam.DoFn):
    """Writes refreshed users as streaming rows (each with its own run and time, and a TTL).

    A store down through the retries costs those rows' copies in the store (counted as
    ``serving.live_rows_not_written``), never the job: the rows are in BigQuery's
    ``recommendation_updates``, and the user's next refresh or the nightly batch run
    serves them again.
    """

    def __init__(self, store: ServingStore):
        self._store = store
        self._rows = Metrics.counter(COUNTERS, "serving.live_rows_written")
        self._failed = Metrics.counter(COUNTERS, "serving.live_rows_not_written")

    def process(self, frame: pd.DataFrame) -> Iterator[int]:
        if not len(frame):
            return
        import redis
        payloads = list(zip(frame["user_id"].astype(str).tolist(),
                            encode_rows(frame, with_run=True)))
        try:
            written = _with_retries(self._store.write_live, payloads)
        except (redis.RedisError, OSError) as err:
            self._failed.inc(len(payloads))
            logging.error("serving store: %d streaming rows not written (%s)", len(payloads),
                          type(err).__name__)
            return
        self._rows.inc(written)
        yield written


class WriteServingUpdates(beam.PTransform):
    """Frames of refreshed recommendation rows -> streaming rows of the store -> rows written."""

    def __init__(self, store: ServingStore):
        super().__init__()
        self._store = store

    def expand(self, frames: beam.PCollection) -> beam.PCollection:
        return frames | "WriteLiveRows" >> beam.ParDo(_WriteLiveFn(self._store))
