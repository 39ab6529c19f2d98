"""The last step of a batch run: gate on QA and run health, then publish or refuse.

It runs inside the pipeline, after every staged write has finished (their file
lists are its side inputs), because a Dataflow template's launcher exits long
before the job ends: nothing may depend on code after ``run()``.
"""
from __future__ import annotations

import json
from typing import Dict, Iterator, List

import apache_beam as beam
import pandas as pd
import pyarrow as pa

from models import health, rules
from models.stability import stability_report
from models.config import RecsConfig
from transforms import schemas
from transforms.warehouse import LocalWarehouse, read_staged


class PublishRunFn(beam.DoFn):
    """Writes run logs, and swaps in the new output only when the run is clean."""

    def __init__(self, warehouse: LocalWarehouse, run: Dict[str, object], config: RecsConfig,
                 min_ratio_vs_last: float):
        self._warehouse = warehouse
        self._run = run
        self._config = config
        self._min_ratio = min_ratio_vs_last

    def process(self, counters: Dict[str, int], violations: Dict[int, int],
                recs_files: List[str], popularity_files: List[str],
                dead_letter_files: List[str]) -> Iterator[Dict[str, object]]:
        run_id = self._run["run_id"]
        written = int(counters.get("recommendations.written", 0))
        verdict = health.verdict(violations, written, self._warehouse.last_published_rows(),
                                 self._min_ratio, counters)
        qa = rules.qa_table(violations, self._config).assign(run_id=run_id)
        dead = read_staged(dead_letter_files, schemas.DEAD_LETTER)
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
        logs = {
            "qa_checks": pa.Table.from_pandas(qa, schema=schemas.QA_CHECKS, preserve_index=False),
            "dead_letter": dead.append_column("run_id", pa.array([run_id] * dead.num_rows,
                                                                 pa.string())),
            "pipeline_runs": pa.Table.from_pylist([row], schema=schemas.PIPELINE_RUNS),
        }
        n = self._config.rules.recs_per_user
        published = {
            "recommendations": read_staged(recs_files, schemas.recommendations(n)),
            "segment_popularity": read_staged(popularity_files, schemas.SEGMENT_POPULARITY),
        }
        if verdict.status == health.PUBLISHED:
            previous = self._warehouse.read("recommendations")
            current = published["recommendations"].to_pandas()
            report = stability_report(current.iloc[:0] if previous is None else previous,
                                      current, n)
            logs["stability_report"] = pa.Table.from_pylist([{"run_id": run_id, **report}])
        self._warehouse.publish(run_id, published, logs,
                                swap=verdict.status == health.PUBLISHED)
        yield row
