"""What every job's entry point does after building its graph: run, report, exit status."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, List, Optional

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

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


def entry_point(run: Callable[[Optional[List[str]]], object],
                returns_status: bool = True) -> None:
    """``main()`` of a job: ``--help``, quiet Beam logging, run, exit with the run's status.

    ``returns_status=False``: ``run`` returns a result, not a status; a
    finished run exits 0 (a failure raises).
    """
    argv = sys.argv[1:]
    if "--help" in argv or "-h" in argv:
        print(job_help(sys.modules[run.__module__]))
        sys.exit(0)
    logging.getLogger().setLevel(logging.WARNING)
    status = run(argv)
    sys.exit(status if returns_status else 0)


def option_classes(module) -> List[type]:
    """The PipelineOptions subclasses a job module defines or imports: its flags."""
    found = [value for value in vars(module).values()
             if isinstance(value, type) and issubclass(value, PipelineOptions)
             and value is not PipelineOptions]
    return sorted(set(found), key=lambda cls: cls.__name__)


def job_help(module) -> str:
    """Help text built from the job's own option classes (Beam's parser has no --help)."""
    name = module.__name__
    if name == "__main__":
        name = module.__spec__.name if module.__spec__ else name
    parser = argparse.ArgumentParser(
        prog=f"python -m {name}", description=module.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Any Beam pipeline option is accepted too, e.g. --runner, --project, "
               "--direct_num_workers=2 --direct_running_mode=multi_processing.")
    for cls in option_classes(module):
        cls._add_argparse_args(parser.add_argument_group(cls.__name__))
    return parser.format_help()
