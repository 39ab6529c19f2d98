"""The last steps of a batch run: stage the outputs, gate on QA and run health, publish or refuse.

The gate runs inside the pipeline, after every staged write has finished
(their outputs are its side inputs), because a Dataflow template's launcher
exits long before the job ends: nothing may depend on code after ``run()``.
The same DoFn publishes to either warehouse (``transforms.warehouse``): the
local one stages Parquet files and swaps inside one DuckDB transaction; the
BigQuery one stages tables by streaming inserts and swaps with copy jobs.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, Iterator, List, Optional, Union

import apache_beam as beam
import pandas as pd
import pyarrow as pa

from models import health, rules
from models.config import RecsConfig
from models.stability import stability_report
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


class PublishRunFn(beam.DoFn):
    """Writes run logs, and swaps in the new output only when the run is clean.

    A clean run is one that passes every QA rule and the run-health checks
    (``models.health.verdict``) and whose staged outputs are complete (the
    warehouse refused none of their rows). Publishing also writes the stability
    report against the output it replaces, and prunes backups beyond
    ``keep_backups``.
    """

    def __init__(self, warehouse: Warehouse, run: Dict[str, object], config: RecsConfig,
                 min_ratio_vs_last: float, keep_backups: Optional[int] = None):
        self._warehouse = warehouse
        self._run = run
        self._config = config
        self._min_ratio = min_ratio_vs_last
        self._keep_backups = keep_backups

    def process(self, counters: Dict[str, int], violations: Dict[int, int],
                recs_staged: List[Any], popularity_staged: List[Any],
                dead_letter_staged: List[Any]) -> Iterator[Dict[str, object]]:
        run_id = self._run["run_id"]
        n = self._config.rules.recs_per_user
        tables = schemas.outputs(n)
        staged = {name: self._warehouse.staged(run_id, name, tables[name], outputs)
                  for name, outputs in zip(STAGED, (recs_staged, popularity_staged,
                                                    dead_letter_staged))}
        refused = {name: s.refused for name, s in staged.items() if s.refused}
        if refused:
            logging.warning("run %s: the warehouse refused rows %s", run_id, refused)
        counters = {**counters, **{f"{name}.refused": k for name, k in refused.items()}}
        written = int(counters.get("recommendations.written", 0))
        verdict = _verdict(violations, written, self._warehouse.last_published_rows(),
                           self._min_ratio, counters, refused)
        qa = rules.qa_table(violations, self._config).assign(run_id=run_id)
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
        }
        logs: Dict[str, Union[pa.Table, Staged]] = {
            "qa_checks": pa.Table.from_pandas(qa, schema=schemas.QA_CHECKS, preserve_index=False),
            "dead_letter": staged["dead_letter"],
            "pipeline_runs": pa.Table.from_pylist([row], schema=schemas.PIPELINE_RUNS),
        }
        published = {name: staged[name] for name in ("recommendations", "segment_popularity")}
        swap = verdict.status == health.PUBLISHED
        if swap:
            columns = ["email_lower"] + [f"rec_part_{i}" for i in range(1, n + 1)] + [
                f"rec{i}_price" for i in range(1, n + 1)]
            previous = self._warehouse.read("recommendations", columns)
            current = self._warehouse.frame(published["recommendations"])[columns]
            report = stability_report(current.iloc[:0] if previous is None else previous,
                                      current, n)
            logs["stability_report"] = pa.Table.from_pylist([{"run_id": run_id, **report}],
                                                            schema=tables["stability_report"])
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


def _verdict(violations: Dict[int, int], written: int, last_written: Optional[int],
             min_ratio: float, counters: Dict[str, int],
             refused: Dict[str, int]) -> health.Verdict:
    """``models.health.verdict``, and gated when a staged output is incomplete."""
    if refused:
        return health.Verdict(health.GATED, f"alarm: the warehouse refused staged rows "
                                            f"{dict(sorted(refused.items()))}")
    return health.verdict(violations, written, last_written, min_ratio, counters)
