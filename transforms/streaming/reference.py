"""Slowly changing reference data of the streaming job (catalogue, fitment, users, history).

A `FileReference` re-reads its input files when their fingerprint changes,
at most every refresh interval, and `cached` keeps one built copy per worker
process and key. docs/streaming.md explains why this is not a PeriodicImpulse
side input on the DirectRunner.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Callable, Dict, Tuple

from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from models import streaming as model
from models.config import RecsConfig
from transforms.health import NAMESPACE
from transforms.io import find_table, read_frame


_LOG = logging.getLogger(__name__)

# Per worker process: what each source (by key) last fingerprinted and when, and the data
# built for that fingerprint. A module-level cache, not ``shared.Shared``: the
# bundle-based DirectRunner builds a new DoFn per bundle and Shared keeps alive only
# the last object acquired across all tokens, so both would reload every bundle.
_VERSIONS: Dict[str, Tuple[str, float]] = {}
_LOADED: Dict[str, Tuple[str, object]] = {}
_CACHE_LOCK = threading.Lock()
_LOAD_LOCK = threading.Lock()


def cached(key: str, tag: str, build: Callable[[], object]) -> object:
    """The object built for (key, tag) in this process; a new tag replaces the old object."""
    with _CACHE_LOCK:
        held = _LOADED.get(key)
    if held is not None and held[0] == tag:
        return held[1]
    with _LOAD_LOCK:   # one build at a time: a second caller waits and reuses it
        with _CACHE_LOCK:
            held = _LOADED.get(key)
        if held is None or held[0] != tag:
            held = (tag, build())
            with _CACHE_LOCK:
                _LOADED[key] = held
    return held[1]


class FileReference:
    """Catalogue, fitment, users and order history from an input directory, reloaded on change.

    `current` fingerprints the files (path, size, modification time) at most
    every ``refresh_seconds`` per worker process and rebuilds
    `models.streaming.ReferenceData` when the fingerprint changed, once per
    process, so a new catalogue is picked up without restarting the job.
    Every DoFn handed the same instance shares the data.
    """

    def __init__(self, input_dir: str, config: RecsConfig, refresh_seconds: float,
                 history_table: str = "events"):
        self.input_dir = input_dir
        self.config = config
        self.refresh_seconds = float(refresh_seconds)
        self.history_table = history_table
        self.tables = ("catalog", "users") + (
            ("fitment",) if config.fitment_attributes else ()) + (
            (history_table,) if history_table else ())
        self.key = uuid.uuid4().hex

    def check(self) -> None:
        """Fails fast (at start-up) when an input is missing."""
        for table in self.tables:
            find_table(self.input_dir, table)

    def fingerprint(self) -> str:
        """Path, size and modification time of every input: changes when a file is replaced."""
        parts = []
        for table in self.tables:
            path = find_table(self.input_dir, table)
            meta = FileSystems.match([path])[0].metadata_list[0]
            parts.append(f"{table}:{meta.size_in_bytes}:{meta.last_updated_in_seconds}")
        return "|".join(parts)

    def version(self) -> str:
        """The inputs' fingerprint, re-checked at most every ``refresh_seconds`` per process."""
        now = time.monotonic()
        with _CACHE_LOCK:
            known = _VERSIONS.get(self.key)
        if known is None or now - known[1] >= self.refresh_seconds:
            known = (self.fingerprint(), now)
            with _CACHE_LOCK:
                _VERSIONS[self.key] = known
        return known[0]

    def current(self) -> model.ReferenceData:
        """The reference data in force now (reloaded when the inputs changed)."""
        version = self.version()
        return cached(self.key, version, lambda: self._load(version))

    def _load(self, version: str) -> model.ReferenceData:
        started = time.perf_counter()
        frames, rejected = {}, {}
        for table in self.tables:
            frames[table], rejected[table] = read_frame(self.input_dir, table)
        data = model.build_reference(
            frames["catalog"], frames.get("fitment"), frames["users"],
            frames.get(self.history_table), self.config, version)
        Metrics.counter(NAMESPACE, "reference.loads").inc()
        _LOG.info("reference data %s loaded in %.1f s (rejected rows: %s)", version,
                  time.perf_counter() - started, rejected)
        return data
