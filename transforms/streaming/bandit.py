"""The streaming bandit: treatment events → `bandit_state` per window, as the batch job does.

The windowed computation is the batch job's own `transforms.bandit.BanditState`;
this module only turns treatment events into its keyed funnel counts per period.
"""
from __future__ import annotations

import apache_beam as beam

from models.bandit import BanditConfig
from models.campaign import ALL, KIND_FIELDS, FunnelCounts
from models.streaming import WindowSpec
from transforms.bandit import BanditState, KeyedCounts, TreatmentCountsFn
from transforms.streaming.refusals import Record
from transforms.streaming.windows import period_buckets

_KINDS = tuple(KIND_FIELDS)


def treatment_counts(record: Record) -> KeyedCounts:
    """One treatment event as a one-hot ``((treatment_id, ALL), FunnelCounts)``."""
    return (record["treatment_id"], ALL), FunnelCounts(
        *(int(record["kind"] == kind) for kind in _KINDS))


class StreamingBandit(beam.PTransform):
    """Timestamped treatment records → `bandit_state` frames, one per window pane.

    The very transform the batch job uses (`transforms.bandit.BanditState`),
    fed per-period sums as the batch job feeds it per-bucket sums (here the
    sums are a streaming combine, so late messages add late deltas); late
    panes restate a window, and its latest row wins.
    """

    def __init__(self, config: BanditConfig, spec: WindowSpec):
        super().__init__()
        self._config = config
        self._spec = spec

    def expand(self, treatments: beam.PCollection):
        return (treatments
                | "CountsPerMessage" >> beam.Map(treatment_counts).with_output_types(KeyedCounts)
                | "PeriodBuckets" >> period_buckets(self._spec)
                | "SumPerPeriod" >> beam.CombinePerKey(TreatmentCountsFn()).with_output_types(
                    KeyedCounts)
                | "BanditState" >> BanditState(self._config, self._spec.size, self._spec.period,
                                               self._spec.lateness))
