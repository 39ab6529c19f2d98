"""Ranker scoring in the batch job: signals per user, re-ranked recommendations, drift.

The batch job wires these in beside its own composites (docs/ranker.md):

- :class:`AttachRankerSignals` adds the ranker's user features and packed
  signals (``models.features.user_states`` at ``as_of``) to the profiles;
- :class:`RankerItemCounts` counts orders and views per SKU (a singleton);
- the re-ranking itself is ``models.recommend_handler.RerankHandler``, applied by
  the ``Recommend`` composite (transforms/recommend_composite.py) given a ranker;
- :class:`FeatureDrift` turns drift partials into a PSI table and counters.

The model artifact is one JSON file read through Beam ``FileSystems`` (local
path or ``gs://``); it loads once per worker in the DoFn, as RunInference
loads a model.
"""
from __future__ import annotations

import posixpath
from typing import Dict, Iterable, Iterator, List, NamedTuple, Optional, Tuple

import apache_beam as beam
import pandas as pd
from apache_beam import typehints
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from models import features, ranker
from models.config import RecsConfig
from transforms.features import ItemCountsFn, UserStates, empty_events
from transforms.frames import DEFAULT_SHARDS, GroupFrames
from transforms.health import NAMESPACE

LATEST = "LATEST"
DRIFT = "drift"


# ----------------------------------------------------------------------------- artifacts

def save_model(model: ranker.RankerModel, model_dir: str) -> str:
    """Writes ``<model_dir>/<version>.json`` and points ``<model_dir>/LATEST`` at it."""
    path = FileSystems.join(model_dir, f"{model.version}.json")
    mkdirs(model_dir)
    with FileSystems.create(path) as handle:
        handle.write(model.to_bytes())
    with FileSystems.create(FileSystems.join(model_dir, LATEST)) as handle:
        handle.write(f"{model.version}.json\n".encode())
    return path


def mkdirs(path: str) -> None:
    try:
        FileSystems.mkdirs(path)
    except IOError:
        pass  # exists already (or an object store, where directories are implicit)


def resolve_model_path(path: str) -> str:
    """A ``.json`` artifact as given, or the one a directory's ``LATEST`` names."""
    if path.endswith(".json"):
        return path
    pointer = FileSystems.join(path, LATEST)
    if not FileSystems.exists(pointer):
        raise FileNotFoundError(f"{path!r} is neither a ranker .json artifact nor a model "
                                f"directory with a {LATEST} file")
    with FileSystems.open(pointer) as handle:
        name = handle.read().decode().strip()
    return FileSystems.join(path, posixpath.basename(name))


def load_model(path: str) -> ranker.RankerModel:
    """The ranker artifact at ``path`` (a file, or a directory with ``LATEST``)."""
    resolved = resolve_model_path(path)
    if not FileSystems.exists(resolved):
        raise FileNotFoundError(f"ranker artifact {resolved!r} does not exist")
    with FileSystems.open(resolved) as handle:
        return ranker.RankerModel.from_bytes(handle.read())


def check_model(path: str, config: RecsConfig) -> ranker.RankerModel:
    """Load at graph-construction time so a bad ``--ranker_model`` fails before any work."""
    model = load_model(path)
    model.check_features(config)
    return model


# ----------------------------------------------------------------------------- inputs

class AttachRankerSignals(beam.PTransform):
    """Profiles (one row per user) + events → profiles with the ranker's state columns.

    A second ``user_id`` shuffle beside ``JoinUsersWithEvents``; cheap next to
    scoring. The profiles keep every column they had (``bought``, ``viewed``
    and ``carted`` are recomputed with the same windows).
    """

    def __init__(self, catalog: beam.PCollection, as_of: pd.Timestamp, config: RecsConfig,
                 fconfig: features.FeatureConfig, num_shards: int = DEFAULT_SHARDS):
        super().__init__()
        self._catalog = catalog
        self._as_of = pd.Timestamp(as_of)
        self._config = config
        self._fconfig = fconfig
        self._num_shards = num_shards

    def expand(self, inputs: Dict[str, beam.PCollection]) -> beam.PCollection:
        return (inputs
                | "StatesAtAsOf" >> UserStates(self._catalog, [self._as_of], self._config,
                                               self._fconfig, labels=False,
                                               num_shards=self._num_shards)).states


@typehints.with_input_types(Tuple[int, pd.DataFrame], pd.DataFrame)
@typehints.with_output_types(pd.DataFrame)
class _ItemCountsFn(beam.DoFn):
    def __init__(self, as_of: pd.Timestamp, fconfig: features.FeatureConfig):
        self._as_of = pd.Timestamp(as_of)
        self._fconfig = fconfig

    def process(self, element: Tuple[int, pd.DataFrame], catalog: pd.DataFrame
                ) -> Iterator[pd.DataFrame]:
        _, events = element
        hist = features.build_history(events if len(events) else empty_events(), catalog)
        counts = features.item_counts(hist, [self._as_of], self._fconfig)
        if len(counts):
            yield counts


class RankerItemCounts(beam.PTransform):
    """Deduplicated events → orders and views per SKU in the window before ``as_of``.

    Events are grouped by ``user_id`` first: the three event names of one order
    must meet to count as one order line (as they do in training, where
    events arrive per user shard).
    """

    def __init__(self, catalog: beam.PCollection, as_of: pd.Timestamp,
                 fconfig: features.FeatureConfig, num_shards: int = DEFAULT_SHARDS):
        super().__init__()
        self._catalog = catalog
        self._as_of = as_of
        self._fconfig = fconfig
        self._num_shards = num_shards

    def expand(self, events: beam.PCollection) -> beam.PCollection:
        return (events
                | "ShardByUserId" >> GroupFrames(["user_id"], self._num_shards)
                | "CountPerShard" >> beam.ParDo(_ItemCountsFn(self._as_of, self._fconfig),
                                                beam.pvalue.AsSingleton(self._catalog))
                | "SumItemCounts" >> beam.CombineGlobally(ItemCountsFn()))


# ----------------------------------------------------------------------------- drift

@typehints.with_input_types(dict)
@typehints.with_output_types(dict)
class DriftCombineFn(beam.CombineFn):
    """Sums drift partials (``DriftCounts.to_dict()``).

    Accumulator: ``{"rows": int, "counts": {feature: [count per bin]}}``,
    merged by adding counts bin by bin.
    """

    def create_accumulator(self) -> dict:
        return {"rows": 0, "counts": {}}

    def add_input(self, acc: dict, partial: dict) -> dict:
        acc["rows"] += int(partial.get("rows", 0))
        for name, counts in partial.get("counts", {}).items():
            have = acc["counts"].get(name)
            acc["counts"][name] = list(counts) if have is None else [
                a + b for a, b in zip(have, counts)]
        return acc

    def merge_accumulators(self, accs: Iterable[dict]) -> dict:
        merged = self.create_accumulator()
        for acc in accs:
            self.add_input(merged, acc)
        return merged

    def extract_output(self, acc: dict) -> dict:
        return acc

    def default_label(self) -> str:
        return "SumDriftCounts"


class DriftOut(NamedTuple):
    table: beam.PCollection    # singleton frame: feature, psi, flagged, rows, threshold
    counts: beam.PCollection   # (name, value) counters for the run-health row


class FeatureDrift(beam.PTransform):
    """Drift partials → PSI per feature against the model's training distribution.

    Counters: ``ranker.drift_rows`` (rows binned), ``ranker.psi_max_milli``
    (largest PSI × 1000), ``ranker.features_drifted`` and
    ``ranker.retrain_recommended`` (1 when any feature's PSI exceeds the
    threshold). Drift flags retraining; it does not gate publishing. The
    threshold defaults to the one stored with the model (``psi_threshold``).
    """

    def __init__(self, model_path: str, threshold: Optional[float] = None):
        super().__init__()
        self._model_path = model_path
        self._threshold = threshold

    def expand(self, partials: beam.PCollection) -> DriftOut:
        table = (partials
                 | "SumDriftCounts" >> beam.CombineGlobally(DriftCombineFn())
                 | "PsiPerFeature" >> beam.Map(_psi_table, self._model_path, self._threshold))
        counters = table | "DriftCounters" >> beam.FlatMap(_drift_counters)
        return DriftOut(table, counters)


def _psi_table(state: dict, model_path: str, threshold: Optional[float]) -> pd.DataFrame:
    metadata = load_model(model_path).metadata
    distributions = metadata.get("feature_distributions", {})
    if threshold is None:
        threshold = float(metadata.get("psi_threshold", ranker.DEFAULT_PSI_THRESHOLD))
    drift = ranker.DriftCounts.from_dict(distributions, state)
    return ranker.drift_table(distributions, drift, threshold)


def _drift_counters(table: pd.DataFrame) -> List[Tuple[str, int]]:
    finite = table["psi"].dropna()
    flagged = int(table["flagged"].sum())
    out = [("ranker.drift_rows", int(table["rows"].iloc[0]) if len(table) else 0),
           ("ranker.psi_max_milli", int(round(1000 * finite.max())) if len(finite) else 0),
           ("ranker.features_drifted", flagged),
           ("ranker.retrain_recommended", int(flagged > 0))]
    for name, value in out:
        Metrics.counter(NAMESPACE, name).inc(value)
    return out
