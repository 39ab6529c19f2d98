"""What every job's entry point does after building its graph: run, report, exit status."""
from __future__ import annotations

import logging
import sys
from typing import Callable, List, Optional

import apache_beam as beam
from apache_beam.options.pipeline_options import StandardOptions

from models import health
from transforms.warehouse import LocalWarehouse


LOCAL_RUNNERS = (None, "DirectRunner", "BundleBasedDirectRunner", "PrismRunner",
                 "FnApiRunner", "InteractiveRunner")


def finish_run(pipeline: beam.Pipeline, warehouse: LocalWarehouse, run_id: str,
               summary: Callable[[], str]) -> int:
    """Run, and on a local runner wait, print the summary and return 0 if published, 1 if gated.

    On Dataflow the launcher only submits the job: the gate and the run-health
    row are written by the job itself, so there is nothing to wait for here.
    """
    result = pipeline.run()
    if pipeline.options.view_as(StandardOptions).runner not in LOCAL_RUNNERS:
        logging.info("submitted run %s; its verdict lands in pipeline_runs", run_id)
        return 0
    result.wait_until_finish()
    print(summary())
    status = warehouse.query("SELECT status FROM pipeline_runs WHERE run_id = ?",
                             [run_id])["status"].iloc[0]
    return 0 if status == health.PUBLISHED else 1


def entry_point(run: Callable[[Optional[List[str]]], int]) -> None:
    """``main()`` of a job: quiet Beam logging, run with the command line, exit with its status."""
    logging.getLogger().setLevel(logging.WARNING)
    sys.exit(run(sys.argv[1:]))
