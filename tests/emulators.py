"""Real local emulators for tests: the BigQuery emulator (bqemulator) and Pub/Sub's.

Each starts on a free port as a subprocess, waits until it answers, and is
stopped (and its port freed) when the context exits. Run this module to start
the BigQuery emulator by hand: ``python -m tests.emulators bigquery --port 9050``.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Iterator, NamedTuple

PROJECT = "test-project"


class Emulator(NamedTuple):
    host: str      # host:port of the main API
    extra: str     # host:port of a second API (BigQuery Storage gRPC), or ""
    project: str


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(ready, proc: subprocess.Popen, what: str, log: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: {_tail(log)}")
        if ready():
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} not ready after {timeout:.0f} s: {_tail(log)}")


def _tail(path: str) -> str:
    with open(path, errors="replace") as handle:
        return handle.read()[-2000:]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def bigquery_emulator() -> Iterator[Emulator]:
    """bqemulator on free REST and gRPC ports, in memory, offline."""
    rest, grpc = free_port(), free_port()
    workdir = tempfile.mkdtemp(prefix="bqemu_")
    log = os.path.join(workdir, "emulator.log")
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.emulators", "bigquery", "--port", str(rest),
             "--grpc_port", str(grpc)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        _wait(lambda: _http_ok(f"http://127.0.0.1:{rest}/readyz"), proc, "bqemulator", log)
        yield Emulator(f"127.0.0.1:{rest}", f"127.0.0.1:{grpc}", PROJECT)
    finally:
        _stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def pubsub_emulator() -> Iterator[Emulator]:
    """The official Pub/Sub emulator (gcloud beta emulators pubsub) on a free port."""
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="pubsubemu_")
    log = os.path.join(workdir, "emulator.log")
    with open(log, "w") as out:
        proc = subprocess.Popen(
            ["gcloud", "beta", "emulators", "pubsub", "start",
             f"--host-port=127.0.0.1:{port}", f"--project={PROJECT}",
             f"--data-dir={workdir}"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait(lambda: _http_ok(f"http://127.0.0.1:{port}/"), proc, "pubsub emulator", log,
              timeout=90.0)
        yield Emulator(f"127.0.0.1:{port}", "", PROJECT)
    finally:
        _stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)


def _serve_bigquery(port: int, grpc_port: int) -> None:
    """Run bqemulator in this process, offline.

    DuckDB's spatial extension comes from its PyPI wheel (otherwise the
    emulator retries a download for minutes), and the emulator's copy of the
    whole table after every write (time travel, never pruned) is turned off
    so memory stays flat under streaming inserts.
    """
    os.environ.setdefault("BQEMU_ENABLE_FORMAT_EXTENSIONS", "false")
    import duckdb_extensions
    duckdb_extensions.import_extension("spatial")
    from bqemulator.versioning import snapshots
    capture = snapshots.SnapshotManager.capture

    def manual_only(self, project_id, dataset_id, table_id, *, kind="AUTO"):
        return None if kind == "AUTO" else capture(self, project_id, dataset_id, table_id,
                                                   kind=kind)

    snapshots.SnapshotManager.capture = manual_only
    from bqemulator.cli import main
    sys.argv = ["bqemulator", "start", "--rest-port", str(port), "--grpc-port", str(grpc_port),
                "--project", PROJECT, "--log-level", "warning"]
    sys.exit(main())


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser()
    parser.add_argument("service", choices=["bigquery"])
    parser.add_argument("--port", type=int, default=9050)
    parser.add_argument("--grpc_port", type=int, default=9060)
    args = parser.parse_args()
    _serve_bigquery(args.port, args.grpc_port)
