"""What every job's entry point does after building its graph: run, report, exit status."""
from __future__ import annotations

import logging
import sys
from typing import Callable, List, Optional

import apache_beam as beam

from models import health
from transforms.warehouse import LocalWarehouse


def finish_run(pipeline: beam.Pipeline, warehouse: LocalWarehouse, run_id: str,
               summary: Callable[[], str]) -> int:
    """Run to completion and print the summary; 0 when the run published, 1 when gated."""
    pipeline.run().wait_until_finish()
    print(summary())
    status = warehouse.query("SELECT status FROM pipeline_runs WHERE run_id = ?",
                             [run_id])["status"].iloc[0]
    return 0 if status == health.PUBLISHED else 1


def entry_point(run: Callable[[Optional[List[str]]], int]) -> None:
    """``main()`` of a job: quiet Beam logging, run with the command line, exit with its status."""
    logging.getLogger().setLevel(logging.WARNING)
    sys.exit(run(sys.argv[1:]))
