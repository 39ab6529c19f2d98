"""The last steps of a batch run: stage the outputs, gate on QA and run health, publish or refuse.

The gate runs inside the pipeline, after every staged write has finished
(their outputs are its side inputs), because a Dataflow template's launcher
exits long before the job ends: nothing may depend on code after ``run()``.
The sanity gates (SPEC §10, ``models.sanity``) are judged there too, from
signals gathered in the pipeline (:class:`GatherGateSignals`), the counters,
the last published run's counters and the stability report.
The same DoFn publishes to either warehouse (``transforms.warehouse``): the
local one stages Parquet files and swaps inside one DuckDB transaction; the
BigQuery one stages tables by streaming inserts and swaps with copy jobs.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Union

import apache_beam as beam
import pandas as pd
import pyarrow as pa
from apache_beam import typehints

from models import health, rules, sanity
from models.catalog import ineligibility_reasons
from models.config import RecsConfig, RulesConfig
from models.provenance import provenance
from models.stability import (EVENT_COUNTER, explain_changes, format_changes,
                              stability_report)
from models.status import run_health_line
from transforms import schemas
from transforms.bigquery_io import WriteFramesToBigQuery
from transforms.io import WriteFrames
from transforms.warehouse import BigQueryWarehouse, LocalWarehouse, Staged

Warehouse = Union[LocalWarehouse, BigQueryWarehouse]
STAGED = ("recommendations", "segment_popularity", "dead_letter")


class StageOutput(beam.PTransform):
    """Writes one output where ``warehouse`` publishes it from.

    Local: Parquet files under ``staging_dir/<name>/`` (output: the file names).
    BigQuery: the run's staging table, or the log table itself for dead letters
    (output: the rows BigQuery refused). Either output, taken as a side input,
    makes the gate wait for the write.
    """

    def __init__(self, warehouse: Warehouse, run_id: str, name: str, schema: pa.Schema,
                 staging_dir: str):
        super().__init__()
        self._warehouse = warehouse
        self._run_id = run_id
        self._name = name
        self._schema = schema
        self._staging_dir = staging_dir

    def expand(self, frames: beam.PCollection) -> beam.PCollection:
        if isinstance(self._warehouse, BigQueryWarehouse):
            ref = self._warehouse.ref(self._warehouse.sink_table(self._run_id, self._name))
            return frames | "WriteBigQuery" >> WriteFramesToBigQuery(ref, self._name,
                                                                     self._schema)
        return frames | "WriteParquet" >> WriteFrames(
            os.path.join(self._staging_dir, self._name, "part"), self._schema)


def catalog_signals(catalog: pd.DataFrame, rules_config: RulesConfig) -> sanity.GateSignals:
    """Catalogue size and how many SKUs pass the eligibility rules (the same test the
    recommender applies, ``models.catalog.ineligibility_reasons``)."""
    eligible = int(sum(r is None for r in ineligibility_reasons(catalog, rules_config)))
    return sanity.GateSignals(catalog_skus=len(catalog), eligible_skus=eligible)


def order_signals(events: pd.DataFrame, as_of: pd.Timestamp) -> sanity.GateSignals:
    """The newest order at or before ``as_of`` of one batch of (deduplicated) events."""
    return sanity.GateSignals(newest_order=sanity.newest_order_time(events, as_of))


def recommendation_signals(recs: pd.DataFrame, n: int) -> sanity.GateSignals:
    """Users, users whose scores all tie, and users per SKU of one batch of output rows."""
    return sanity.GateSignals(users=len(recs), tied_users=sanity.tied_rows(recs, n),
                              sku_users=sanity.sku_user_counts(recs, n))


@typehints.with_input_types(sanity.GateSignals)
@typehints.with_output_types(sanity.GateSignals)
class GateSignalsCombineFn(beam.CombineFn):
    """Adds partial gate signals into one.

    Accumulator: one ``GateSignals`` (counts, the newest order time, and users
    per recommended SKU), bounded by the number of catalogue SKUs.
    """

    def create_accumulator(self) -> sanity.GateSignals:
        return sanity.GateSignals()

    def add_input(self, acc: sanity.GateSignals, partial: sanity.GateSignals
                  ) -> sanity.GateSignals:
        return acc.merge(partial)

    def merge_accumulators(self, accs: Iterable[sanity.GateSignals]) -> sanity.GateSignals:
        total = sanity.GateSignals()
        for acc in accs:
            total.merge(acc)
        return total

    def extract_output(self, acc: sanity.GateSignals) -> sanity.GateSignals:
        return acc

    def default_label(self) -> str:
        return "MergeGateSignals"


class GatherGateSignals(beam.PTransform):
    """What the sanity gates measure, as a singleton ``GateSignals``.

    Inputs (a dict of collections of frames): ``catalog`` (the resolved
    catalogue singleton), ``events`` (deduplicated events) and
    ``recommendations`` (the output rows). Each yields partial signals; a
    combiner adds them, so nothing here holds more than one SKU count per SKU.
    """

    def __init__(self, config: RecsConfig, as_of: pd.Timestamp):
        super().__init__()
        self._config = config
        self._as_of = as_of

    def expand(self, inputs: Dict[str, beam.PCollection]) -> beam.PCollection:
        n = self._config.rules.recs_per_user
        return ((inputs["catalog"] | "CatalogSignals" >> beam.Map(
                    catalog_signals, self._config.rules),
                 inputs["events"] | "OrderSignals" >> beam.Map(order_signals, self._as_of),
                 inputs["recommendations"] | "RecommendationSignals" >> beam.Map(
                     recommendation_signals, n))
                | "FlattenSignals" >> beam.Flatten()
                | "MergeSignals" >> beam.CombineGlobally(GateSignalsCombineFn()))


class PublishRunFn(beam.DoFn):
    """Writes run logs, and swaps in the new output only when the run is clean.

    A clean run is one that passes every QA rule, the run-health checks
    (``models.health.verdict``) and every sanity gate (``models.sanity``), and
    whose staged outputs are complete (the warehouse refused none of their
    rows). The gates' rows join the rules' in ``qa_checks`` and their values
    the counters, published or not. Publishing also writes the stability
    report against the output it replaces, and prunes backups beyond
    ``keep_backups``. ``accept_changes`` lets a run whose churn against the
    last output is over the limit publish (the operator has read why).
    """

    def __init__(self, warehouse: Warehouse, run: Dict[str, object], config: RecsConfig,
                 min_ratio_vs_last: float, keep_backups: Optional[int] = None,
                 accept_changes: bool = False,
                 input_tables: Sequence[str] = health.RECONCILED_TABLES):
        self._warehouse = warehouse
        self._run = run
        self._config = config
        self._min_ratio = min_ratio_vs_last
        self._keep_backups = keep_backups
        self._accept_changes = accept_changes
        self._input_tables = tuple(input_tables)
        # Fixed where the graph is built (the launcher runs the same image as the workers).
        self._provenance = provenance(config)

    def process(self, counters: Dict[str, int], violations: Dict[int, int],
                recs_staged: List[Any], popularity_staged: List[Any],
                dead_letter_staged: List[Any], signals: sanity.GateSignals
                ) -> Iterator[Dict[str, object]]:
        run_id = self._run["run_id"]
        n = self._config.rules.recs_per_user
        tables = schemas.outputs(n, not self._config.candidates.popularity_only)
        staged = {name: self._warehouse.staged(run_id, name, tables[name], outputs)
                  for name, outputs in zip(STAGED, (recs_staged, popularity_staged,
                                                    dead_letter_staged))}
        refused = {name: s.refused for name, s in staged.items() if s.refused}
        if refused:
            logging.warning("run %s: the warehouse refused rows %s", run_id, refused)
        counters = {**counters, **{f"{name}.refused": k for name, k in refused.items()}}
        written = int(counters.get("recommendations.written", 0))
        previous = self._warehouse.read("recommendations")  # None: the first publish
        staged_recs = self._warehouse.frame(staged["recommendations"])
        model_versions = sorted(set(staged_recs["model_version"].dropna().astype(str)))
        report = stability_report(staged_recs.iloc[:0] if previous is None else previous,
                                  staged_recs, n)
        gates = sanity.evaluate(signals, pd.Timestamp(self._run["as_of"]), counters,
                                self._warehouse.last_published_counters(), report,
                                self._config.gates, self._input_tables, self._accept_changes)
        counters = {**counters, **sanity.gate_counters(gates)}
        verdict = _verdict(violations, written, self._warehouse.last_published_rows(),
                           self._min_ratio, counters, refused, gates)
        qa = qa_rows(violations, gates, self._config).assign(run_id=run_id)
        row = {
            **self._run,
            "finished_at": pd.Timestamp.now(tz="UTC"),
            "status": verdict.status,
            "message": verdict.message,
            "users_read": int(counters.get("users.read", 0)),
            "eligible_users": int(counters.get("users.read", 0)
                                  - counters.get("users.dead_lettered", 0)
                                  - counters.get("users.deduplicated", 0)
                                  + counters.get("users.unserved", 0)),
            "recommendations_written": written,
            "dead_lettered": sum(v for k, v in counters.items() if k.endswith(".dead_lettered")),
            "deduplicated": sum(v for k, v in counters.items() if k.endswith(".deduplicated")),
            "qa_violations": int(sum(violations.values())),
            "counters": json.dumps(dict(sorted(counters.items()))),
            **self._provenance,
            "model_version": ",".join(model_versions) or None,
        }
        logging.info("%s", run_health_line(row))
        logs: Dict[str, Union[pa.Table, Staged]] = {
            "qa_checks": pa.Table.from_pandas(qa, schema=schemas.QA_CHECKS, preserve_index=False),
            "dead_letter": staged["dead_letter"],
            "pipeline_runs": pa.Table.from_pylist([row], schema=schemas.PIPELINE_RUNS),
        }
        published = {name: staged[name] for name in ("recommendations", "segment_popularity")}
        swap = verdict.status == health.PUBLISHED
        if swap:
            logs["stability_report"] = pa.Table.from_pylist([{"run_id": run_id, **report}],
                                                            schema=tables["stability_report"])
        if previous is not None:  # why the lists changed (#19), gated runs included
            changes = explain_changes(
                previous, staged_recs, n, self._dead_letters(run_id, staged["dead_letter"]),
                self._warehouse.read("segment_popularity"),
                self._warehouse.frame(staged["segment_popularity"]), counters,
                self._warehouse.last_published_counters(), made_by=row,
                made_before=self._warehouse.last_published_run())
            logs["stability_changes"] = pa.Table.from_pandas(
                changes.assign(run_id=run_id), schema=schemas.STABILITY_CHANGES,
                preserve_index=False)
            for line in format_changes(changes, swaps=3):
                logging.info("run %s: %s", run_id, line.strip())
        leftovers = self._warehouse.leftovers(run_id)
        if leftovers:  # e.g. a run that crashed before its swap; a rerun does not need them
            logging.warning("run %s: tables left by runs that did not finish: %s; drop them "
                            "once those runs are known to be dead", run_id, ", ".join(leftovers))
        self._warehouse.publish(run_id, published, logs, swap=swap)
        if swap and self._keep_backups is not None:
            pruned = self._warehouse.prune_backups(self._keep_backups)
            if pruned:
                logging.info("run %s: pruned backups %s", run_id, pruned)
        yield row

    def _dead_letters(self, run_id: str, staged: Staged) -> pd.DataFrame:
        """This run's dead-lettered user rows (the lost users' reasons)."""
        if staged.data is not None:
            frame = staged.data.to_pandas()
            return frame[frame["table"] == "users"]
        if not self._warehouse.exists("dead_letter"):  # the sink makes it with the first row
            return pd.DataFrame(columns=["table", "reason", "record"])
        return self._warehouse.query("SELECT `table`, reason, record FROM dead_letter "
                                     "WHERE run_id = ? AND `table` = 'users'", [run_id])


class CountEventNames(beam.PTransform):
    """``(events.name.<event_name>, n)`` counters of deduplicated event frames: the input
    volume per event name that the stability explanation compares with the last run."""

    def expand(self, events: beam.PCollection) -> beam.PCollection:
        return events | "CountPerName" >> beam.FlatMap(
            lambda frame: [(f"{EVENT_COUNTER}{name}", int(k)) for name, k in
                           frame["event_name"].astype(str).value_counts().items()]
            if len(frame) and "event_name" in frame else [])


def qa_rows(violations: Dict[int, int], gates: Sequence[sanity.GateResult],
            config: RecsConfig) -> pd.DataFrame:
    """``qa_checks`` rows: the 15 rules (value = violations, threshold 0), then the gates."""
    rule_rows = rules.qa_table(violations, config)
    rule_rows = rule_rows.assign(value=rule_rows["violations"].astype(float), threshold=0.0,
                                 detail=None)
    return pd.concat([rule_rows, sanity.gate_rows(gates)], ignore_index=True)


def _verdict(violations: Dict[int, int], written: int, last_written: Optional[int],
             min_ratio: float, counters: Dict[str, int], refused: Dict[str, int],
             gates: Sequence[sanity.GateResult] = ()) -> health.Verdict:
    """``models.health.verdict``, and gated when a staged output is incomplete."""
    if refused:
        return health.Verdict(health.GATED, f"alarm: the warehouse refused staged rows "
                                            f"{dict(sorted(refused.items()))}")
    return health.verdict(violations, written, last_written, min_ratio, counters, gates)
