"""Slowly changing reference data of the streaming job (catalogue, fitment, users, history).

A `Reference` says where the tables are and what version they are at: a
`FileReference` reads files of an input directory (local or ``gs://``) and
versions them by size and modification time; a `BigQueryReference` reads
tables of a BigQuery dataset and versions them by each table's last
modification time and row count. Every DoFn that needs the data asks
``reference.current()``; the data is built once per worker process and
version.

How a consumer learns the version is chosen in one place,
`delivery_for(runner)` (docs/streaming-reference.md):

* ``side_input`` (Dataflow, portable runners): `ReferenceVersions` checks the
  version once per ``--reference_refresh_seconds`` for the whole job
  (``PeriodicImpulse(apply_windowing=True)``: one version per fixed window of
  the interval) and consumers read it with ``AsSingleton`` in windowed form
  (`version_side_input`), passing it to ``current(version)``. Only the
  fingerprint travels as a side input, never the data (Streaming Engine caps
  side inputs at 80 MB; the full preset's users alone are larger). The data
  is held per process through ``apache_beam.utils.shared.Shared``.
* ``poll`` (the local bundle-based DirectRunner, where PeriodicImpulse does
  not run in streaming and a DoFn is rebuilt every bundle): each process
  fingerprints the sources itself at most every interval, and the data is held
  in a module-level cache: the documented local seam.

Either way a process only ever moves forward: it holds the data of the most
recently checked version, and a request carrying an older check (an element
of an earlier window) is served the newer data rather than a reload.

The mechanism is `Watched`'s, shared with the ranker artifact
(`transforms.streaming.sources.ModelReference`): a subclass says how to
fingerprint and load its source, and `WatchedVersions` / `version_side_input`
/ ``current(version)`` deliver its versions the same way.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Callable, Dict, Iterator, NamedTuple, Optional, Tuple

import apache_beam as beam
import pandas as pd
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.transforms.periodicsequence import PeriodicImpulse
from apache_beam.utils import shared
from apache_beam.utils.timestamp import MAX_TIMESTAMP, Timestamp

from models import streaming as model
from models.config import RecsConfig
from transforms.health import NAMESPACE
from transforms.io import find_table, read_frame
from transforms.signatures import CachedSignatures, WindowInto
from transforms.warehouse import TableRef


_LOG = logging.getLogger(__name__)

POLL, SIDE_INPUT = "poll", "side_input"
DELIVERIES = ("auto", POLL, SIDE_INPUT)
# Runners that cannot run the side-input pattern in streaming (docs/streaming.md, measured).
POLLING_RUNNERS = (None, "DirectRunner", "BundleBasedDirectRunner", "SwitchingDirectRunner")
VERSION_ARG = "reference_version"   # the keyword a consumer's process() takes the version as
RANKER_VERSION_ARG = "ranker_version"   # ... and the ranker artifact's version

# Per worker process: what each source (by key) last fingerprinted (fingerprint, monotonic
# time, wall time), and objects built per (key, tag) by `cached`.
_VERSIONS: Dict[str, Tuple[str, float, float]] = {}
_LOADED: Dict[str, Tuple[str, object]] = {}
_HELD: Dict[str, "_Held"] = {}      # the poll seam's data per watched source (reference, model)
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


def delivery_for(runner: Optional[str], requested: str = "auto") -> str:
    """How reference versions reach consumers on ``runner``: the one place that chooses.

    ``auto`` is ``poll`` on the local DirectRunner (PeriodicImpulse does not
    run there in streaming, and a global-window side input from an unbounded
    source would block the main input forever) and ``side_input`` elsewhere
    (Dataflow). ``requested`` (``--reference_delivery``) overrides it.
    """
    if requested not in DELIVERIES:
        raise ValueError(f"reference delivery must be one of {', '.join(DELIVERIES)}, "
                         f"got {requested!r}")
    if requested != "auto":
        return requested
    return POLL if runner in POLLING_RUNNERS else SIDE_INPUT


class ReferenceVersion(NamedTuple):
    """A version of the reference data: its sources' fingerprint and when it was checked.

    ``checked_at`` (seconds since the epoch) orders versions, so a process
    never goes back to an older one. It is the checking worker's clock: a skew
    between workers can at most delay a switch to the next check.
    """

    checked_at: float
    fingerprint: str


class _Held:
    """What one process holds of one watched source: the newest checked version and its data.

    Weak-referenceable (``shared.Shared`` keeps it per process on Dataflow).
    A load holds the lock, so concurrent callers wait for it and reuse it; a
    failed load leaves nothing held and the next caller tries again.
    """

    def __init__(self):
        self.lock = threading.Lock()
        self.version: Optional[ReferenceVersion] = None
        self.data: Optional[object] = None

    def get(self, version: ReferenceVersion, load: Callable[[str], object]) -> object:
        with self.lock:   # one load at a time: a second caller waits and reuses it
            held = self.version
            if held is not None and (version.fingerprint == held.fingerprint
                                     or version.checked_at <= held.checked_at):
                if version.checked_at > held.checked_at:   # same data, checked later
                    self.version = version
                return self.data
            # The old copy goes before the new one is built: every caller waits on the lock
            # anyway, and a process never holds two (docs/streaming-reference.md).
            self.data = self.version = None
            self.data = load(version.fingerprint)
            self.version = version
            return self.data


class Watched:
    """A slowly changing source a stream watches: versioned by fingerprint, held once per process.

    Subclasses say what the source is (`fingerprint`, `_load`, `where`). The
    version reaches consumers as `delivery_for` chose: a side input of
    `WatchedVersions` (``current(version)``), or polled by each process at most
    every ``refresh_seconds`` (``current()``). Either way a process holds one
    copy, of the most recently checked version, and never goes back to an older
    one. ``key`` identifies the source across pickling (per-process caches use
    it); every DoFn handed the same instance shares the data.
    """

    def __init__(self, refresh_seconds: float):
        self.refresh_seconds = float(refresh_seconds)
        self.key = uuid.uuid4().hex
        self._delivery = POLL
        self._shared = shared.Shared()
        self._held: Optional[_Held] = None   # this copy's strong reference to the shared data

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_held": None}

    @property
    def delivery(self) -> str:
        """`POLL` or `SIDE_INPUT` (set by the job from `delivery_for`)."""
        return self._delivery

    @delivery.setter
    def delivery(self, value: str) -> None:
        if value not in (POLL, SIDE_INPUT):
            raise ValueError(f"reference delivery is {POLL!r} or {SIDE_INPUT!r}, not {value!r}")
        self._delivery = value
        self._held = None     # held where the new delivery keeps it

    # --- what a source says about itself

    def where(self) -> str:
        """Where the source is, for logs and messages."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """A string that changes whenever the source is replaced."""
        raise NotImplementedError

    def _load(self, fingerprint: str) -> object:
        """The source's data, read now (``fingerprint`` is what was checked before)."""
        raise NotImplementedError

    def _fingerprint_now(self) -> str:
        """`fingerprint`, or what a source says when it cannot be read this instant."""
        return self.fingerprint()

    # --- versions

    def checked(self) -> ReferenceVersion:
        """The version now (fingerprinted this instant)."""
        return ReferenceVersion(time.time(), self._fingerprint_now())

    def polled(self) -> ReferenceVersion:
        """The version as this process last polled it, re-checked every ``refresh_seconds``."""
        now = time.monotonic()
        with _CACHE_LOCK:
            known = _VERSIONS.get(self.key)
        if known is None or now - known[1] >= self.refresh_seconds:
            known = (self._fingerprint_now(), now, time.time())
            with _CACHE_LOCK:
                _VERSIONS[self.key] = known
        return ReferenceVersion(known[2], known[0])

    def version(self) -> str:
        """The fingerprint, re-checked at most every ``refresh_seconds`` per process."""
        return self.polled().fingerprint

    def current(self, version: Optional[ReferenceVersion] = None) -> object:
        """The data in force: of ``version`` (a side input) or of the polled one.

        Loaded once per process and version; a version checked before the one
        held is served the held (newer) data.
        """
        return self._holder().get(version or self.polled(), self._load)

    def _holder(self) -> _Held:
        """Where this process keeps the data: `Shared` (side inputs) or the module cache (poll)."""
        if self._held is not None:
            return self._held
        if self.delivery == SIDE_INPUT:
            self._held = self._shared.acquire(_Held, tag=self.key)
        else:
            with _CACHE_LOCK:
                self._held = _HELD.setdefault(self.key, _Held())
        return self._held


class Reference(Watched):
    """Catalogue, fitment, users and order history, reloaded when their version changes.

    Subclasses say where the tables are (`check`, `fingerprint`, `read`).
    ``delivery`` is set by the job from `delivery_for`. Every DoFn handed the
    same instance shares the data.
    """

    def __init__(self, config: RecsConfig, refresh_seconds: float, history_table: str = "events"):
        super().__init__(refresh_seconds)
        self.config = config
        self.history_table = history_table
        self.tables = ("catalog", "users") + (
            ("fitment",) if config.fitment_attributes else ()) + (
            (history_table,) if history_table else ())

    # --- what a source says about itself

    def check(self) -> None:
        """Fails fast (at start-up) when an input is missing."""
        raise NotImplementedError

    def read(self, table: str) -> Tuple[pd.DataFrame, Dict[str, int]]:
        """A whole table, validated against its contract, with rejected rows by reason."""
        raise NotImplementedError

    def current(self, version: Optional[ReferenceVersion] = None) -> model.ReferenceData:
        """The reference data in force: of ``version`` (a side input) or of the polled one."""
        return super().current(version)

    def _load(self, fingerprint: str) -> model.ReferenceData:
        started = time.perf_counter()
        frames, rejected = {}, {}
        for table in self.tables:
            frames[table], rejected[table] = self.read(table)
        data = model.build_reference(
            frames["catalog"], frames.get("fitment"), frames["users"],
            frames.get(self.history_table), self.config, fingerprint)
        Metrics.counter(NAMESPACE, "reference.loads").inc()
        _LOG.info("reference data from %s loaded in %.1f s (version %s; rejected rows: %s)",
                  self.where(), time.perf_counter() - started, fingerprint, rejected)
        return data


class FileReference(Reference):
    """Reference tables as files of an input directory (local or ``gs://``).

    The version is every file's path, size and modification time: it changes
    when a file is replaced.
    """

    def __init__(self, input_dir: str, config: RecsConfig, refresh_seconds: float,
                 history_table: str = "events"):
        super().__init__(config, refresh_seconds, history_table)
        self.input_dir = input_dir

    def where(self) -> str:
        return self.input_dir

    def check(self) -> None:
        for table in self.tables:
            find_table(self.input_dir, table)

    def fingerprint(self) -> str:
        parts = []
        for table in self.tables:
            path = find_table(self.input_dir, table)
            meta = FileSystems.match([path])[0].metadata_list[0]
            parts.append(f"{table}:{meta.size_in_bytes}:{meta.last_updated_in_seconds}")
        return "|".join(parts)

    def read(self, table: str) -> Tuple[pd.DataFrame, Dict[str, int]]:
        return read_frame(self.input_dir, table, self.config.inputs)


class BigQueryReference(Reference):
    """Reference tables in BigQuery (the batch job's ``--source bigquery`` tables).

    The version is each table's last modification time and row count: a
    load job, ``CREATE OR REPLACE TABLE`` or a copy changes it on BigQuery
    and on bqemulator, as does DML on BigQuery (bqemulator does not update the
    modification time on DML; docs/streaming-reference.md). A table is read whole with
    ``tabledata.list`` (no query cost) and validated as the batch source
    validates it (`transforms.bigquery_io.read_table_frame`).

    Args:
        tables: contract name (``catalog``, ``users``, ``fitment``, and the
            history's name) → the BigQuery table holding it.
        project: the project billed for the reads.
        endpoint: a BigQuery emulator's URL; None on Google Cloud.
    """

    def __init__(self, tables: Dict[str, TableRef], project: str, config: RecsConfig,
                 refresh_seconds: float, history_table: str = "events",
                 endpoint: Optional[str] = None):
        super().__init__(config, refresh_seconds, history_table)
        missing = [t for t in self.tables if t not in tables]
        if missing:
            raise ValueError(f"no BigQuery table given for {', '.join(missing)}")
        self.refs = {t: tables[t] for t in self.tables}
        self.project = project
        self.endpoint = endpoint
        self._client = None

    def __getstate__(self) -> dict:   # a client does not pickle; each process makes its own
        return {**super().__getstate__(), "_client": None}

    @property
    def client(self):
        if self._client is None:
            from transforms.bigquery import client
            self._client = client(self.project, self.endpoint)
        return self._client

    def where(self) -> str:
        dataset = sorted({f"{r.project}.{r.dataset}" for r in self.refs.values()})
        return "bigquery://" + ",".join(dataset)

    def check(self) -> None:
        """Raises FileNotFoundError naming the first table that does not exist."""
        self.columns()

    def columns(self) -> Dict[str, Optional[set]]:
        """Each table's column names (None when the schema is empty); checks that all exist."""
        from google.api_core.exceptions import NotFound
        found = {}
        for table, ref in self.refs.items():
            try:
                schema = self.client.get_table(ref.id).schema
            except NotFound:
                raise FileNotFoundError(f"BigQuery reference table {ref.id} ({table}) does "
                                        f"not exist") from None
            found[table] = {field.name for field in schema or ()} or None
        return found

    def fingerprint(self) -> str:
        parts = []
        for table, ref in self.refs.items():
            meta = self.client.get_table(ref.id)
            modified = meta.modified.isoformat() if meta.modified is not None else "?"
            parts.append(f"{table}:{modified}:{meta.num_rows}")
        return "|".join(parts)

    def read(self, table: str) -> Tuple[pd.DataFrame, Dict[str, int]]:
        from transforms.bigquery_io import read_table_frame
        # The history is validated as events (its contract) whatever its table's name.
        contract = "events" if table == self.history_table else table
        return read_table_frame(self.client, self.refs[table], contract, self.config.inputs)


# --------------------------------------------------------------------------- side input

@beam.typehints.with_output_types(ReferenceVersion)
class CheckVersionFn(CachedSignatures, beam.DoFn):
    """Each impulse → the watched source's version at that moment (once for the whole job)."""

    def __init__(self, source: Watched, counter: str = "reference.checks"):
        self._source = source
        self._counter = counter

    def process(self, _impulse) -> Iterator[ReferenceVersion]:
        Metrics.counter(NAMESPACE, self._counter).inc()
        yield self._source.checked()


class WatchedVersions(beam.PTransform):
    """The slowly-changing side input: a watched source's version once per refresh interval.

    ``PeriodicImpulse(apply_windowing=True)`` fires every
    ``source.refresh_seconds`` and puts each impulse in its own fixed
    window of that length; the version checked then is the window's single
    element, read by consumers with ``AsSingleton`` (`version_side_input`).
    The reference data (`ReferenceVersions`) and the ranker artifact
    (`transforms.streaming.sources.ModelVersions`) are both delivered this way.

    Args:
        source: whose version to check.
        start, stop: the impulses' first timestamp and the bound after which
            none fire (tests run a bounded sequence); default: from when the
            job starts, for ever.
        counter: the counter of checks (``reference.checks``, ``ranker.checks``).
    """

    def __init__(self, source: Watched, start: Optional[Timestamp] = None,
                 stop: Optional[Timestamp] = None, counter: str = "reference.checks"):
        super().__init__()
        if source.refresh_seconds < 1:
            raise ValueError("versions as a side input need a refresh interval of "
                             "at least 1 second")
        self._source = source
        self._start = start
        self._stop = stop
        self._counter = counter

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection:
        start = self._start if self._start is not None else Timestamp.now()
        return (pbegin
                | "EveryRefreshInterval" >> PeriodicImpulse(
                    start_timestamp=start,
                    stop_timestamp=self._stop if self._stop is not None else MAX_TIMESTAMP,
                    fire_interval=self._source.refresh_seconds, apply_windowing=True)
                | "CheckVersion" >> beam.ParDo(CheckVersionFn(self._source, self._counter)))


class ReferenceVersions(WatchedVersions):
    """The reference data's versions, once per ``--reference_refresh_seconds``."""

    def __init__(self, reference: Reference, start: Optional[Timestamp] = None,
                 stop: Optional[Timestamp] = None):
        super().__init__(reference, start, stop, "reference.checks")


def version_side_input(versions: Optional[beam.PCollection],
                       arg: str = VERSION_ARG) -> Dict[str, object]:
    """The keyword side input a consumer's ParDo takes (``reference_version=``), or none.

    Windowed ``AsSingleton``: an element reads the version of the interval its
    window ends in; a window no impulse covered (an element older than the
    job) reads None, and ``current(None)`` then polls. ``arg`` names the
    keyword (``ranker_version`` for the model's versions).
    """
    if versions is None:
        return {}
    return {arg: beam.pvalue.AsSingleton(versions, default_value=None)}


def into_version_windows(source: Watched, label: str,
                         pcoll: beam.PCollection) -> beam.PCollection:
    """A global-window collection in the versions' fixed windows, so it can read them."""
    return pcoll | label >> WindowInto(beam.window.FixedWindows(source.refresh_seconds))

