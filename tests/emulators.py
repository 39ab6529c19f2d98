"""Real local emulators for tests: the BigQuery emulator (bqemulator) and Pub/Sub's.

Each starts on a free port as a subprocess, waits until it answers, and is
stopped (and its port freed) when the context exits. Run this module to start
the BigQuery emulator by hand: ``python -m tests.emulators bigquery --port 9050``.

Fault tests use the ``restartable_*`` variants: they yield an
:class:`EmulatorProcess` that can be stopped and started again on the same
ports (``stop()``, ``start()``). The Pub/Sub emulator keeps everything in
memory (topics and subscriptions must be re-created after a restart); the
BigQuery emulator can be made persistent (a DuckDB file in its work
directory), so its tables and rows survive a restart as BigQuery's would.
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
from typing import Callable, Iterator, List, NamedTuple, Optional, TypeVar

PROJECT = "test-project"
T = TypeVar("T")


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


class EmulatorProcess:
    """One emulator subprocess on fixed ports: stopped and started again on the same ports."""

    def __init__(self, what: str, argv: List[str], ready_url: str, emulator: Emulator,
                 workdir: str, cwd: Optional[str] = None, timeout: float = 60.0):
        self.what = what
        self.emulator = emulator
        self.workdir = workdir
        self._argv = argv
        self._ready_url = ready_url
        self._cwd = cwd
        self._timeout = timeout
        self._log = os.path.join(workdir, "emulator.log")
        self._proc: Optional[subprocess.Popen] = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> float:
        """Start (again) on the same ports; returns the seconds until it answered."""
        if self.running:
            raise RuntimeError(f"{self.what} is already running")
        started = time.monotonic()
        with open(self._log, "a") as out:
            self._proc = subprocess.Popen(self._argv, stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True, cwd=self._cwd)
        _wait(lambda: _http_ok(self._ready_url), self._proc, self.what, self._log,
              timeout=self._timeout)
        return time.monotonic() - started

    def stop(self) -> None:
        """Stop the process group (SIGTERM, then SIGKILL) and wait until the port is free."""
        if self._proc is not None:
            _stop(self._proc)
        port = int(self.emulator.host.rsplit(":", 1)[1])
        deadline = time.monotonic() + 15
        while _listening(port) and time.monotonic() < deadline:
            time.sleep(0.1)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _bigquery_process(rest: Optional[int] = None, grpc: Optional[int] = None,
                      persistent: bool = False) -> EmulatorProcess:
    rest, grpc = rest or free_port(), grpc or free_port()
    workdir = tempfile.mkdtemp(prefix="bqemu_")
    argv = [sys.executable, "-m", "tests.emulators", "bigquery", "--port", str(rest),
            "--grpc_port", str(grpc)]
    if persistent:
        argv += ["--data_dir", os.path.join(workdir, "data")]
    return EmulatorProcess("bqemulator", argv, f"http://127.0.0.1:{rest}/readyz",
                           Emulator(f"127.0.0.1:{rest}", f"127.0.0.1:{grpc}", PROJECT), workdir,
                           cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _pubsub_process(port: Optional[int] = None) -> EmulatorProcess:
    port = port or free_port()
    workdir = tempfile.mkdtemp(prefix="pubsubemu_")
    argv = ["gcloud", "beta", "emulators", "pubsub", "start", f"--host-port=127.0.0.1:{port}",
            f"--project={PROJECT}", f"--data-dir={workdir}"]
    return EmulatorProcess("pubsub emulator", argv, f"http://127.0.0.1:{port}/",
                           Emulator(f"127.0.0.1:{port}", "", PROJECT), workdir, timeout=90.0)


def wait_for(what: str, fetch: Callable[[], T], done: Callable[[T], bool],
             timeout: float = 90.0) -> T:
    """Polls ``fetch`` every 0.5 s until ``done(value)``; fails with the last value on timeout.

    A fetch that raises counts as not yet (a table may not have received rows).
    """
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        try:
            value = fetch()
        except Exception:  # noqa: BLE001 (polled again until the deadline)
            value = None
        if value is not None and done(value):
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}; last value: {value!r}")


@contextlib.contextmanager
def _running(process: EmulatorProcess) -> Iterator[EmulatorProcess]:
    try:
        process.start()
        yield process
    finally:
        process.close()


@contextlib.contextmanager
def bigquery_emulator() -> Iterator[Emulator]:
    """bqemulator on free REST and gRPC ports, in memory, offline."""
    with _running(_bigquery_process()) as process:
        yield process.emulator


def create_streams(publisher, subscriber, project: str, names, prefix: str = "") -> dict:
    """A topic and a ``<topic>-sub`` subscription per name on the Pub/Sub emulator.

    Returns:
      name → ``(topic path, subscription path)``; topics are ``<prefix><name>``.
    """
    paths = {}
    for name in names:
        topic = publisher.topic_path(project, f"{prefix}{name}")
        subscription = subscriber.subscription_path(project, f"{prefix}{name}-sub")
        publisher.create_topic(name=topic)
        subscriber.create_subscription(name=subscription, topic=topic)
        paths[name] = (topic, subscription)
    return paths


@contextlib.contextmanager
def pubsub_emulator() -> Iterator[Emulator]:
    """The official Pub/Sub emulator (gcloud beta emulators pubsub) on a free port."""
    with _running(_pubsub_process()) as process:
        yield process.emulator


@contextlib.contextmanager
def restartable_bigquery_emulator(persistent: bool = True, rest_port: Optional[int] = None,
                                  grpc_port: Optional[int] = None
                                  ) -> Iterator[EmulatorProcess]:
    """bqemulator that can be stopped and restarted on the same ports.

    ``persistent``: tables live in a DuckDB file of its work directory and
    survive a restart (BigQuery is durable); otherwise a restart empties it.
    """
    with _running(_bigquery_process(rest_port, grpc_port, persistent)) as process:
        yield process


@contextlib.contextmanager
def restartable_pubsub_emulator(port: Optional[int] = None) -> Iterator[EmulatorProcess]:
    """The Pub/Sub emulator, stoppable and restartable on the same port.

    It keeps topics, subscriptions and unacknowledged messages in memory only:
    after ``start()`` they must be created again, and messages it held are gone.
    """
    with _running(_pubsub_process(port)) as process:
        yield process


def _serve_bigquery(port: int, grpc_port: int, data_dir: Optional[str] = None) -> None:
    """Run bqemulator in this process, offline (in memory, or persistent under ``data_dir``).

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
    if data_dir:
        os.makedirs(data_dir, exist_ok=True)
        sys.argv += ["--persistent", "--data-dir", data_dir]
    sys.exit(main())


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser()
    parser.add_argument("service", choices=["bigquery"])
    parser.add_argument("--port", type=int, default=9050)
    parser.add_argument("--grpc_port", type=int, default=9060)
    parser.add_argument("--data_dir", default=None,
                        help="Keep tables in a DuckDB file under this directory (persistent).")
    args = parser.parse_args()
    _serve_bigquery(args.port, args.grpc_port, args.data_dir)
