"""The streaming bandit: treatment events → `bandit_state` per window, as the batch job does.

The windowed computation is the batch job's own `transforms.bandit.BanditState`;
this module only turns treatment events into its keyed funnel counts per period.
With segment attributes (``--bandit_segment_by``, the batch ``--segment_by``),
each event is keyed by its user's segment, looked up in the job's reference
``users`` (of the version in force: a side input on Dataflow), and
`campaign.window_state` then publishes the overall ``*`` arms and each
segment's arms shrunk toward them, exactly as the batch job does.
"""
from __future__ import annotations

import uuid
from typing import Dict, Iterator, Optional, Sequence

import apache_beam as beam
import pandas as pd
from apache_beam import typehints

from models.bandit import BanditConfig
from models.campaign import ALL, KIND_FIELDS, NO_SEGMENT, FunnelCounts
from models.popularity import segment_keys
from models.streaming import WindowSpec
from transforms.bandit import BanditState, KeyedCounts, TreatmentCountsFn
from transforms.signatures import CachedSignatures, MapFn
from transforms.streaming.reference import (Reference, cached, into_version_windows,
                                            version_side_input)
from transforms.streaming.refusals import Record
from transforms.streaming.windows import period_buckets

_KINDS = tuple(KIND_FIELDS)


def treatment_counts(record: Record) -> KeyedCounts:
    """One treatment event as a one-hot ``((treatment_id, segment), FunnelCounts)``.

    The segment is the record's ``segment`` (set by `SegmentOfUserFn`), else ``ALL``.
    """
    return (record["treatment_id"], record.get("segment", ALL)), FunnelCounts(
        *(int(record["kind"] == kind) for kind in _KINDS))


def segment_of_users(users: pd.DataFrame, attributes: Sequence[str]) -> Dict[str, str]:
    """user_id → segment key (e.g. ``FORD|MUSTANG``) from each user's latest row.

    Users with an incomplete vehicle are left out (they count as ``NO_SEGMENT``),
    as `campaign.attach_segments` does in batch.
    """
    if not len(users):
        return {}
    latest = (users.sort_values("updated_at", ascending=False, kind="stable",
                                na_position="last")
              .drop_duplicates("user_id").set_index("user_id"))
    keys = segment_keys(latest, list(attributes))
    return {u: s for u, s in keys.items() if isinstance(s, str)}


@typehints.with_input_types(Record)
@typehints.with_output_types(Record)
class SegmentOfUserFn(CachedSignatures, beam.DoFn):
    """Adds ``segment`` to a treatment record from the reference users (built once per version).

    ``reference_version`` is the version side input where the job has one (the
    record in the versions' window of its time); None polls.
    """

    def __init__(self, reference: Reference, attributes: Sequence[str]):
        self._reference = reference
        self._attributes = tuple(attributes)
        self._key = uuid.uuid4().hex

    def process(self, record: Record, reference_version=None) -> Iterator[Record]:
        ref = self._reference.current(reference_version)
        segments = cached(self._key, ref.version,
                          lambda: segment_of_users(ref.users, self._attributes))
        yield {**record, "segment": segments.get(record["user_id"], NO_SEGMENT)}


class StreamingBandit(beam.PTransform):
    """Timestamped treatment records → `bandit_state` frames, one per window pane.

    The very transform the batch job uses (`transforms.bandit.BanditState`),
    fed per-period sums as the batch job feeds it per-bucket sums (here the
    sums are a streaming combine, so late messages add late deltas); late
    panes restate a window, and its latest row wins. With ``segment_by`` (and
    the ``reference`` whose users name the segments) arms are kept per
    segment too; with ``versions`` (`ReferenceVersions`, the job's side input
    on Dataflow) each event's segment comes from the users of the version
    checked for its time's interval, without from each worker's poll.
    """

    def __init__(self, config: BanditConfig, spec: WindowSpec,
                 reference: Optional[Reference] = None, segment_by: Sequence[str] = (),
                 versions: Optional[beam.PCollection] = None):
        super().__init__()
        self._versions = versions
        if segment_by and reference is None:
            raise ValueError("segment_by needs the reference whose users name the segments")
        self._config = config
        self._spec = spec
        self._reference = reference
        self._segment_by = tuple(segment_by)

    def expand(self, treatments: beam.PCollection):
        if self._segment_by:
            if self._versions is not None:   # the next step re-windows into periods anyway
                treatments = into_version_windows(self._reference, "IntoReferenceWindows",
                                                  treatments)
            treatments = treatments | "SegmentOfUser" >> beam.ParDo(
                SegmentOfUserFn(self._reference, self._segment_by),
                **version_side_input(self._versions))
        return (treatments
                | "CountsPerMessage" >> beam.ParDo(MapFn(treatment_counts)).with_output_types(
                    KeyedCounts)
                | "PeriodBuckets" >> period_buckets(self._spec)
                | "SumPerPeriod" >> beam.CombinePerKey(TreatmentCountsFn()).with_output_types(
                    KeyedCounts)
                | "BanditState" >> BanditState(self._config, self._spec.size, self._spec.period,
                                               self._spec.lateness))
