"""The warehouse reads behind ``python -m pipelines.status``: one :class:`models.status.Snapshot`.

Plain queries through either warehouse (``transforms.warehouse``), bounded by
the number of runs shown, so a status probe costs a few small queries on
BigQuery whatever the size of the tables. No Beam: status is not a pipeline.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Union

import pandas as pd

from models.status import Snapshot
from transforms.warehouse import BigQueryWarehouse, LocalWarehouse

Warehouse = Union[LocalWarehouse, BigQueryWarehouse]


def _last_runs(warehouse: Warehouse, runs_shown: int) -> str:
    return (f"SELECT run_id FROM pipeline_runs ORDER BY finished_at DESC, run_id DESC "
            f"LIMIT {int(runs_shown)}")


def read_published(warehouse: Warehouse) -> Optional[Dict[str, Any]]:
    """Rows, newest ``generated_at``, run ids and model versions of production
    ``recommendations`` (None when the table does not exist)."""
    if not warehouse.exists("recommendations"):
        return None
    summary = warehouse.query("SELECT count(*) AS n, max(generated_at) AS newest "
                              "FROM recommendations").iloc[0]
    runs = warehouse.query("SELECT DISTINCT run_id FROM recommendations")["run_id"]
    models = warehouse.query("SELECT DISTINCT model_version FROM recommendations")[
        "model_version"]
    return {"rows": int(summary["n"]), "generated_at": summary["newest"],
            "run_ids": sorted(str(r) for r in runs.dropna()),
            "model_versions": sorted(str(m) for m in models.dropna())}


def read_streaming(warehouse: Warehouse) -> Optional[Dict[str, Any]]:
    """The newest ``streaming_health`` row (None when the table is missing or empty)."""
    if not warehouse.exists("streaming_health"):
        return None
    rows = warehouse.query("SELECT * FROM streaming_health ORDER BY emitted_at DESC LIMIT 1")
    return None if rows.empty else rows.iloc[0].to_dict()


def read_snapshot(warehouse: Warehouse, now: pd.Timestamp, runs_shown: int,
                  streaming: Optional[Warehouse] = None,
                  streaming_expected: bool = False) -> Snapshot:
    """Everything status decides on, from ``warehouse`` (and the stream's health from
    ``streaming``, default the warehouse itself)."""
    last = _last_runs(warehouse, runs_shown)
    if warehouse.exists("pipeline_runs"):
        runs = warehouse.query(f"SELECT * FROM pipeline_runs WHERE run_id IN ({last}) "
                               f"ORDER BY finished_at DESC, run_id DESC")
    else:
        runs = pd.DataFrame(columns=["run_id", "job", "status", "finished_at", "message",
                                     "recommendations_written", "dead_lettered",
                                     "qa_violations", "counters"])
    qa = (warehouse.query(f"SELECT * FROM qa_checks WHERE run_id IN ({last})")
          if warehouse.exists("qa_checks") and warehouse.exists("pipeline_runs")
          else pd.DataFrame())
    stability = (warehouse.query(f"SELECT * FROM stability_report WHERE run_id IN ({last})")
                 if warehouse.exists("stability_report") and warehouse.exists("pipeline_runs")
                 else pd.DataFrame())
    snapshot = Snapshot(now=now, location=warehouse.location, runs=runs, qa=qa,
                        published=read_published(warehouse),
                        backups=warehouse.list_backups(), stability=stability,
                        streaming=read_streaming(streaming or warehouse),
                        streaming_expected=streaming_expected)
    last = snapshot.last_batch_run()  # gated or not: a gated run's changes say why
    if last is not None and warehouse.exists("stability_changes"):
        snapshot.changes = warehouse.query("SELECT * FROM stability_changes WHERE run_id = ? "
                                           "ORDER BY rank", [last["run_id"]])
    return snapshot
