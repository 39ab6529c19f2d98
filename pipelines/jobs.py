"""What every job's entry point does: refuse bad flags, run, report, exit with a distinct status.

Exit status of every job (README "Exit status"):

* 0: published (or, for jobs that publish nothing, done);
* 1: gated: the run finished but its checks kept the output from production;
* 2: usage or configuration error: refused at start-up with one line on
  stderr saying what to fix (unknown flag, bad time, missing input, busy
  warehouse, unreachable endpoint, ...);
* 3: failure: an unexpected exception during the run; one line on stderr,
  the traceback in a file it names (and on stderr too with ``--debug``).

A crash must never look like a gated run (1) to a scheduler deciding
whether to page someone or retry.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import logging
import os
import socket
import sys
import tempfile
import traceback
from typing import Callable, Iterable, Iterator, List, Optional, Sequence

import apache_beam as beam
import duckdb
import pandas as pd
from apache_beam.options.pipeline_options import (PipelineOptions, StandardOptions,
                                                  _BeamArgumentParser)

from models import health
from transforms.warehouse import LocalWarehouse, WarehouseBusy, WarehouseLock


LOCAL_RUNNERS = (None, "DirectRunner", "BundleBasedDirectRunner", "PrismRunner",
                 "FnApiRunner", "InteractiveRunner")
# Runners whose job server adds its own flags at submission (not knowable up front).
JOB_SERVER_RUNNERS = ("PortableRunner", "FlinkRunner", "SparkRunner", "SamzaRunner")

EXIT_PUBLISHED, EXIT_GATED, EXIT_USAGE, EXIT_FAILED = 0, 1, 2, 3
DEBUG_FLAG = "--debug"


class UsageError(SystemExit):
    """A refusal the user can fix (bad flag, option, config, input or environment): exit 2.

    A ``SystemExit`` so that code and tests catching the start-up refusals
    the old way keep working; ``entry_point`` prints ``str(err)`` as one line
    and exits 2. Raised before any data is read.
    """

    def __init__(self, message: str):
        super().__init__(one_line(message))
        self.code = EXIT_USAGE


def one_line(text: object, limit: int = 500) -> str:
    """``text`` on one line (newlines folded), at most ``limit`` characters."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[:limit - 1] + "…"


class _RefusingParser(_BeamArgumentParser):
    """Beam's option parser, but a bad value is a one-line UsageError, not usage text and exit 2."""

    def error(self, message: str):
        raise UsageError(message)


def _beam_option_classes() -> List[type]:
    """Beam's own option classes (runner, GCP, worker, debug, ...): always accepted."""
    return [cls for cls in PipelineOptions.__subclasses__()
            if cls.__module__.startswith("apache_beam.")]


def flag_parser(classes: Iterable[type]) -> _RefusingParser:
    """One parser over ``classes`` and Beam's own options, as Beam itself would build it."""
    parser = _RefusingParser(allow_abbrev=False, add_help=False)
    seen = set()
    for cls in list(classes) + _beam_option_classes():
        if cls not in seen:
            seen.add(cls)
            cls._add_argparse_args(parser)
    return parser


def check_flags(argv: Sequence[str], classes: Iterable[type]) -> None:
    """Refuse any argument that is neither one of ``classes``' flags nor a Beam option.

    Beam's ``PipelineOptions`` silently keeps unknown arguments, so a
    mistyped ``--asof`` would run with the default (now). Values are parsed
    too, so ``--num_shards x`` is one line, not Beam's page of usage text.
    Runners with a job server (Flink, Spark, portable) add flags of their own
    at submission; for them only the values of known flags are checked.
    """
    parser = flag_parser(classes)
    _, unknown = parser.parse_known_args(list(argv))
    if not unknown:
        return
    runner = _runner_of(argv)
    if runner in JOB_SERVER_RUNNERS:
        return
    flags = sorted(opt for action in parser._actions for opt in action.option_strings
                   if opt.startswith("--"))
    word = unknown[0]
    if not word.startswith("-"):
        raise UsageError(f"unexpected argument {word!r}: every option is a --flag "
                         f"(see --help)")
    name = word.split("=", 1)[0]
    guess = difflib.get_close_matches(name.replace("-", "_").replace("__", "--", 1),
                                      flags, n=1, cutoff=0.6)
    hint = f"; did you mean {guess[0]}?" if guess else "; see --help for the job's flags"
    raise UsageError(f"unknown flag {name}{hint}")


class OneLineParser(argparse.ArgumentParser):
    """argparse for the jobs that are not Beam pipelines (publish, backtest, generate_world,
    import_dataset): no abbreviations (``--as`` is not ``--as_of``), and a mistake is one
    line on stderr with a suggestion, exit 2, instead of the usage text."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        if message.startswith("unrecognized arguments: "):
            word = message.split(": ", 1)[1].split()[0]
            flags = sorted({opt for parser in [self, *self._subparsers_of()]
                            for action in parser._actions for opt in action.option_strings
                            if opt.startswith("--")})
            name = word.split("=", 1)[0]
            guess = difflib.get_close_matches(
                name.replace("-", "_").replace("__", "--", 1), flags, n=1, cutoff=0.6)
            message = (f"unknown flag {name}; did you mean {guess[0]}?" if guess and
                       name.startswith("-") else f"unexpected argument {word!r}; see --help")
        print(f"error: {one_line(message)}", file=sys.stderr)
        sys.exit(EXIT_USAGE)

    def _subparsers_of(self) -> List[argparse.ArgumentParser]:
        return [sub for action in self._actions
                if isinstance(action, argparse._SubParsersAction)
                for sub in action.choices.values()]


def _runner_of(argv: Sequence[str]) -> Optional[str]:
    for i, word in enumerate(argv):
        if word.startswith("--runner="):
            return word.split("=", 1)[1]
        if word == "--runner" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def job_options(argv: Optional[List[str]], module_name: str) -> PipelineOptions:
    """The options of job ``module_name`` from ``argv``, after refusing unknown flags.

    ``argv=None`` keeps Beam's behaviour (read ``sys.argv``) unchecked, for
    callers embedding a job; ``entry_point`` always passes the list.
    """
    if argv is not None:
        check_flags(argv, option_classes(sys.modules[module_name]))
    return PipelineOptions(argv)


@contextlib.contextmanager
def locked_warehouse(path: str, job: str, run_id: Optional[str] = None,
                     flag: str = "warehouse") -> Iterator[WarehouseLock]:
    """Hold the local warehouse ``path`` for the whole ``with`` block, after checking it.

    At start-up, in seconds: the warehouse's directory must be writable, no
    other run may hold it (the message says who does), and an existing file
    must open as DuckDB (a truncated one fails here, not after the run).
    Call ``lock.note(...)`` once the run id is known so a waiting run can
    name it. The lock is released on leaving the block, and by the OS if
    the process dies.
    """
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as err:
        raise UsageError(f"--{flag} {path!r}: cannot create its directory: "
                         f"{err.strerror or err}") from None
    if os.path.isdir(path):
        raise UsageError(f"--{flag} {path!r} is a directory; give the DuckDB file's name")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--{flag} {path!r}: directory {parent} is not writable")
    lock = WarehouseLock(path)
    try:
        lock.acquire(holder(job, run_id))
    except WarehouseBusy as busy:
        raise UsageError(f"warehouse {os.path.abspath(path)} is in use by {busy}; wait for "
                         f"that run to end (its lock goes when its process exits) or use "
                         f"another --{flag}") from None
    except OSError as err:
        raise UsageError(f"--{flag} {path!r}: cannot create its lock file {lock.path}: "
                         f"{err.strerror or err}") from None
    try:
        try:
            LocalWarehouse(path).check_readable()
        except duckdb.Error as err:
            raise UsageError(f"--{flag} {path!r} is not a readable DuckDB warehouse "
                             f"({one_line(err, 200)}); restore it from a copy or give another "
                             f"--{flag}") from None
        yield lock
    finally:
        lock.release()


def holder(job: str, run_id: Optional[str]) -> dict:
    """Who holds a warehouse lock: what the next run prints when it is refused."""
    return {"job": job, "run_id": run_id, "pid": os.getpid(), "host": socket.gethostname(),
            "started_at": pd.Timestamp.now(tz="UTC").isoformat(timespec="seconds")}


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
                returns_status: bool = True, argv: Optional[List[str]] = None) -> None:
    """``main()`` of a job: ``--help``, quiet Beam logging, run, exit with a distinct status.

    ``returns_status=False``: ``run`` returns a result, not a status; a
    finished run exits 0. Whatever ``run`` raises is mapped here, once for
    every job: a ``UsageError`` (or any ``SystemExit`` carrying a message)
    exits 2 with its one line; any other exception exits 3 with one line
    naming it, and the traceback saved to a file (printed with ``--debug``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--help" in argv or "-h" in argv:
        print(job_help(sys.modules[run.__module__]))
        sys.exit(0)
    debug = DEBUG_FLAG in argv
    argv = [a for a in argv if a != DEBUG_FLAG]
    logging.getLogger().setLevel(logging.INFO if debug else logging.WARNING)
    if not debug:  # a failing DoFn's traceback goes to the file exit 3 names, not stderr
        logging.getLogger("apache_beam.runners.common").setLevel(logging.CRITICAL)
    sys.exit(run_with_status(run, argv, returns_status, debug, _job_name(run)))


def run_with_status(run: Callable[[Optional[List[str]]], object], argv: List[str],
                    returns_status: bool = True, debug: bool = False,
                    job: str = "job") -> int:
    """Call ``run(argv)`` and turn its outcome into the job's exit status (0/1/2/3)."""
    try:
        status = run(argv)
    except SystemExit as err:
        if err.code is None or isinstance(err.code, int) and not isinstance(err, UsageError):
            return err.code or 0
        message = str(err) if isinstance(err, UsageError) else one_line(err.code)
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 (every crash becomes exit 3 with one line)
        details = "".join(traceback.format_exception(type(err), err, err.__traceback__))
        where = _save_traceback(job, details)
        if debug:
            sys.stderr.write(details)
        print(f"failed: {type(err).__name__}: {one_line(err, 300)} "
              f"(traceback in {where}; rerun with {DEBUG_FLAG} to print it)", file=sys.stderr)
        return EXIT_FAILED
    if not returns_status:
        return EXIT_PUBLISHED
    return int(status)


def _job_name(run: Callable) -> str:
    module = sys.modules.get(run.__module__)
    name = run.__module__
    if name == "__main__" and module is not None and module.__spec__ is not None:
        name = module.__spec__.name
    return name.rsplit(".", 1)[-1]


def _save_traceback(job: str, details: str) -> str:
    """Write a crash's traceback to a temporary file; its path (or why not) for the one line."""
    try:
        handle, path = tempfile.mkstemp(prefix=f"{job}-", suffix=".traceback")
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(details)
        return path
    except OSError as err:
        return f"nowhere: {err}"


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
               "--direct_num_workers=2 --direct_running_mode=multi_processing; any other "
               f"flag is refused. {DEBUG_FLAG}: print a crash's traceback. Exit status: 0 "
               "published (or done), 1 gated, 2 usage or configuration error, 3 failure.")
    for cls in option_classes(module):
        cls._add_argparse_args(parser.add_argument_group(cls.__name__))
    return parser.format_help()
