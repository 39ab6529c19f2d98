"""Candidate sources and the ranker in the stream: a window's order lines, the watched model.

`WindowOrderLines` gathers the distinct order lines of each sliding window (the
side input the refresh builds the sources' shared tables from, with
`models.stream_sources`); `ModelReference` watches the ranker artifact and
swaps a new one in without a restart, as Beam's RunInference does with
``WatchFilePattern``: its fingerprint is a side input on Dataflow
(`ModelVersions`) and polled on the local DirectRunner, the reference data's
mechanism (`transforms.streaming.reference.Watched`; docs/streaming.md).
"""
from __future__ import annotations

import logging
import threading
from typing import Dict, Iterable, NamedTuple, Optional, Tuple

import apache_beam as beam
from apache_beam import typehints
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.transforms import window
from apache_beam.utils.timestamp import Timestamp

from models.config import RecsConfig
from models.ranker import RankerModel, refusal
from models.streaming import WindowSpec
from transforms.health import NAMESPACE
from transforms.ranker import load_model, resolve_model_path
from transforms.signatures import CachedSignatures, MapFn, WindowInto
from transforms.streaming.reference import ReferenceVersion, Watched, WatchedVersions
from transforms.streaming.refusals import Record
from transforms.streaming.windows import seconds_of

_LOG = logging.getLogger(__name__)

LineKey = Tuple[str, str]        # (order_id, sku)
LineCell = Tuple[int, str]       # (event time in microseconds, user_id): the earliest event


class WindowLines(NamedTuple):
    """The distinct order lines of one sliding window, ``{(order_id, sku): (time_us, user)}``."""

    window_end_us: int
    cells: Dict[LineKey, LineCell]


def line_of(record: Record) -> Tuple[LineKey, LineCell]:
    """An order event as its line's key and cell."""
    return (record["order_id"], record["sku"]), (record["event_time_us"], record["user_id"])


def _keep_earliest(acc: Dict[LineKey, LineCell], cells: Dict[LineKey, LineCell]
                   ) -> Dict[LineKey, LineCell]:
    """Adds ``cells`` to ``acc`` in place, each line keeping its earliest cell."""
    for key, cell in cells.items():
        held = acc.get(key)
        if held is None or cell < held:
            acc[key] = cell
    return acc


def _merge_earliest(accs: Iterable[Dict[LineKey, LineCell]]) -> Dict[LineKey, LineCell]:
    """Line maps merged into the first (Beam lets a merge reuse its first input)."""
    accs = iter(accs)
    out = next(accs, {})
    for acc in accs:
        _keep_earliest(out, acc)
    return out


@typehints.with_input_types(Tuple[LineKey, LineCell])
@typehints.with_output_types(Dict[LineKey, LineCell])
class EarliestLinesFn(beam.CombineFn):
    """Each order line once, at its earliest event (what `popularity.order_lines` keeps).

    Accumulator: ``{(order_id, sku): (event_time_us, user_id)}``, one entry per
    distinct order line of the window; merging keeps the earlier cell, so the
    result does not depend on arrival order. Bounded by the distinct order lines
    of one period (period × order rate), not by the stream's total.
    """

    def create_accumulator(self) -> Dict[LineKey, LineCell]:
        return {}

    def add_input(self, acc: Dict[LineKey, LineCell], element) -> Dict[LineKey, LineCell]:
        key, cell = element
        return _keep_earliest(acc, {key: cell})

    def merge_accumulators(self, accs: Iterable[Dict[LineKey, LineCell]]
                           ) -> Dict[LineKey, LineCell]:
        return _merge_earliest(accs)

    def extract_output(self, acc: Dict[LineKey, LineCell]) -> Dict[LineKey, LineCell]:
        return acc

    def default_label(self) -> str:
        return "EarliestLines"


@typehints.with_input_types(Dict[LineKey, LineCell])
@typehints.with_output_types(Dict[LineKey, LineCell])
class MergeLineMapsFn(EarliestLinesFn):
    """The period maps of one sliding window merged, each order line at its earliest event.

    Accumulator: the same ``{(order_id, sku): (event_time_us, user_id)}`` map as
    `EarliestLinesFn`'s (and its merge); its inputs are whole period maps, so an
    order line is added once per period and the sliding fan-out (``size / period``
    windows) applies to the period maps, not to each line.
    """

    def add_input(self, acc: Dict[LineKey, LineCell], cells: Dict[LineKey, LineCell]
                  ) -> Dict[LineKey, LineCell]:
        return _keep_earliest(acc, cells)

    def default_label(self) -> str:
        return "MergeLineMaps"


class _AtWindowEnd(CachedSignatures, beam.DoFn):
    def process(self, cells: Dict[LineKey, LineCell], win=beam.DoFn.WindowParam):
        yield WindowLines(win.end.micros, cells)


class WindowOrderLines(beam.PTransform):
    """Order records → one `WindowLines` per sliding window (the refresh's side input).

    Lines are first gathered per period (fixed windows of one period: every
    instant of a period lies in the same sliding windows), and only the period
    maps slide, so each line is handled once, not once per window it belongs
    to. The windows are popularity's (size, period), with no allowed lateness:
    the refresh reads each window once, when it closes with its refresh period,
    as it reads popularity's first pane; a line arriving after its period closed
    is counted by ``AuditOrderLateness`` and left to the nightly batch job.
    """

    def __init__(self, spec: WindowSpec):
        super().__init__()
        self._spec = spec

    def expand(self, orders: beam.PCollection) -> beam.PCollection:
        return (orders
                | "LineOfOrder" >> beam.ParDo(MapFn(line_of)).with_output_types(
                    Tuple[LineKey, LineCell])
                | "SourcePeriods" >> WindowInto(window.FixedWindows(
                    seconds_of(self._spec.period)))
                | "LinesPerPeriod" >> beam.CombineGlobally(EarliestLinesFn()).without_defaults()
                | "SourceWindows" >> WindowInto(window.SlidingWindows(
                    seconds_of(self._spec.size), seconds_of(self._spec.period)))
                | "LinesPerWindow" >> beam.CombineGlobally(MergeLineMapsFn()).without_defaults()
                | "AtWindowEnd" >> beam.ParDo(_AtWindowEnd()))


# --- the watched ranker artifact ------------------------------------------------------------

_SERVED: Dict[str, Optional[RankerModel]] = {}  # key → the model last accepted in this process
_LOCK = threading.Lock()


class ModelReference(Watched):
    """The ranker artifact a stream serves, swapped in when a new one appears.

    ``path`` is what ``--ranker_model`` takes in the batch job: a ``.json``
    artifact, or a model directory whose ``LATEST`` names the artifact (write
    the new artifact first, then ``LATEST``: the swap is the pointer's change).
    Its version is the resolved artifact's fingerprint (path, size,
    modification time), delivered as the reference data's is (`Watched`, one
    mechanism): on Dataflow checked once per ``refresh_seconds`` for the whole
    job by `ModelVersions` and read by the scoring step as a windowed side
    input, as Beam's RunInference reads ``WatchFilePattern``'s; under the poll
    seam (the local DirectRunner) fingerprinted at most every
    ``refresh_seconds`` per worker process. The model is loaded once per
    process and version. A new artifact that does not fit this configuration
    (trained on other sources, unreadable, half written) is refused with one
    logged line per version and process and counted
    (``ranker.artifacts_refused``); the model in force stays. An artifact that
    did not beat the blend on validation (`models.ranker.refusal`) is not
    served: the plain mix serves until a better one appears, as the batch job
    does.
    """

    def __init__(self, path: str, config: RecsConfig, refresh_seconds: float):
        super().__init__(refresh_seconds)
        self.path = path
        self.config = config

    def where(self) -> str:
        return self.path

    def check(self) -> Tuple[RankerModel, Optional[str]]:
        """At start-up: the model and why it is not served (None: served); one-line errors.

        Raises:
          ValueError or FileNotFoundError: the artifact is missing, unreadable, or
            trained on other features or sources than this configuration's mix.
        """
        model = load_model(self.path)
        model.check_features(self.config)
        with _LOCK:
            _SERVED.setdefault(self.key, None if refusal(model) else model)
        return model, refusal(model)

    def fingerprint(self) -> str:
        """The resolved artifact's path, size and modification time."""
        resolved = resolve_model_path(self.path)
        meta = FileSystems.match([resolved])[0].metadata_list[0]
        return f"{resolved}:{meta.size_in_bytes}:{meta.last_updated_in_seconds}"

    def _fingerprint_now(self) -> str:
        """The fingerprint; while the pointer is mid-swap, the one this process last saw."""
        try:
            return self.fingerprint()
        except (OSError, ValueError, IndexError) as err:
            held = self._holder().version
            _LOG.warning("ranker artifact %s not readable now (%s); keeping the model in "
                         "force", self.path, err)
            return held.fingerprint if held is not None else ""

    def current(self, version: Optional[ReferenceVersion] = None) -> Optional[RankerModel]:
        """The model in force (None: the plain mix serves): of ``version`` or the polled one."""
        return super().current(version)

    def _load(self, fingerprint: str) -> Optional[RankerModel]:
        with _LOCK:
            previous = _SERVED.get(self.key)
        try:
            model = load_model(self.path)
            model.check_features(self.config)
        except (OSError, ValueError) as err:
            Metrics.counter(NAMESPACE, "ranker.artifacts_refused").inc()
            _LOG.warning("ranker artifact %s refused, keeping %s: %s", fingerprint,
                         previous.version if previous is not None else "the plain mix", err)
            return previous
        why = refusal(model)
        if why:
            Metrics.counter(NAMESPACE, "ranker.artifacts_refused").inc()
            _LOG.warning("ranker artifact %s not served: %s", fingerprint, why)
            model = None
        else:
            Metrics.counter(NAMESPACE, "ranker.loads").inc()
            _LOG.info("ranker %s in force (%s)", model.version, fingerprint)
        with _LOCK:
            _SERVED[self.key] = model
        return model


class ModelVersions(WatchedVersions):
    """The ranker artifact's versions, once per ``--ranker_refresh_seconds`` (`WatchedVersions`).

    The scoring step reads them with ``version_side_input(versions,
    RANKER_VERSION_ARG)``; only the fingerprint travels, the model is loaded
    per worker process.
    """

    def __init__(self, ranker: ModelReference, start: Optional[Timestamp] = None,
                 stop: Optional[Timestamp] = None):
        super().__init__(ranker, start, stop, "ranker.checks")
