"""Shared fixtures: real local emulators, started once per test session (per xdist worker),
and a generated world without planted bad rows."""
import importlib.util
import json
import os
import re
import shutil
from typing import Dict, List

import pytest

from pipelines import generate_world
from tests.emulators import Emulator, bigquery_emulator


@pytest.fixture(scope="session")
def bigquery() -> Emulator:
    """bqemulator on free ports: REST at ``.host``, Storage Read API (gRPC) at ``.extra``."""
    with bigquery_emulator() as emulator:
        yield emulator


@pytest.fixture(scope="module")
def clean_world(tmp_path_factory):
    """The tiny preset (seed 11) with no bad rows planted: ``(directory, world.json manifest)``."""
    out = str(tmp_path_factory.mktemp("clean_world"))
    generate_world.main(["--preset", "tiny", "--seed", "11", "--out", out, "--bad_rows", "0"])
    with open(os.path.join(out, "world.json")) as handle:
        return out, json.load(handle)


# --------------------------------------------------------------------------- components (#19)
#
# Tests that start a real emulator need its program. Without this check, a machine without
# gcloud or Java (e.g. python:3.11-slim) failed with a traceback per test; now the session
# stops before any test runs, with one line naming what is missing and where it comes from.
# A component is required when a collected test module names one of its starters.

def _pubsub_emulator_missing() -> str:
    gcloud = shutil.which("gcloud")
    if gcloud is None:
        return "gcloud is not on PATH"
    root = os.path.dirname(os.path.dirname(os.path.realpath(gcloud)))
    if not os.path.isdir(os.path.join(root, "platform", "pubsub-emulator")):
        return f"the Pub/Sub emulator component is not installed in {root}"
    if shutil.which("java") is None:
        return "java (which the Pub/Sub emulator runs on) is not on PATH"
    return ""


def _bigquery_emulator_missing() -> str:
    return "" if importlib.util.find_spec("bqemulator") else "the bqemulator package is missing"


# component -> (a pattern in a test module that needs it, the check, how to install it)
COMPONENTS = {
    "Pub/Sub emulator": (r"pubsub_emulator", _pubsub_emulator_missing,
                         "apt-get install google-cloud-cli-pubsub-emulator default-jre-headless, "
                         "or run in the image of templates/test/Dockerfile"),
    "BigQuery emulator": (r"bigquery_emulator|def \w+\([^)]*\bbigquery\b",
                          _bigquery_emulator_missing, "pip install -e '.[test]'"),
}


def missing_components(sources: Dict[str, str]) -> List[str]:
    """One line per missing component the given test modules (path -> source) need."""
    lines = []
    for component, (pattern, check, hint) in COMPONENTS.items():
        needing = sorted(path for path, text in sources.items() if re.search(pattern, text))
        why = check() if needing else ""
        if why:
            names = ", ".join(os.path.basename(p) for p in needing[:3])
            more = f" and {len(needing) - 3} more" if len(needing) > 3 else ""
            lines.append(f"{component} unavailable ({why}) but {names}{more} need it; "
                         f"install: {hint}")
    return lines


def _stop_if_missing(sources: Dict[str, str]) -> None:
    problems = missing_components(sources)
    if problems:
        pytest.exit("; ".join(problems), returncode=pytest.ExitCode.USAGE_ERROR)


def _sources_of(args: List[str]) -> Dict[str, str]:
    """The test modules named by command-line paths (directories searched for test_*.py)."""
    files = []
    for arg in args:
        path = arg.split("::", 1)[0]
        if os.path.isdir(path):
            files += [os.path.join(d, f) for d, _, names in os.walk(path) for f in names
                      if f.startswith("test_") and f.endswith(".py")]
        elif path.endswith(".py") and os.path.isfile(path):
            files.append(path)
    sources = {}
    for path in sorted(set(files)):
        with open(path, encoding="utf-8") as handle:
            sources[path] = handle.read()
    return sources


def pytest_sessionstart(session) -> None:
    """With pytest-xdist (-n N) the controller collects nothing and a worker that exits
    crashes the run; so the controller checks the modules its paths name, before any
    worker starts (a -k selection is not seen: a named module counts)."""
    config = session.config
    if hasattr(config, "workerinput") or not getattr(config.option, "numprocesses", None):
        return
    _stop_if_missing(_sources_of([str(a) for a in config.args]))


def pytest_collection_finish(session) -> None:
    """Stop the session with one line when a selected test needs a missing component."""
    if hasattr(session.config, "workerinput"):  # the xdist controller checked already
        return
    sources = {}
    for item in session.items:
        path = str(getattr(item, "fspath", "") or "")
        if path.endswith(".py") and path not in sources:
            with open(path, encoding="utf-8") as handle:
                sources[path] = handle.read()
    _stop_if_missing(sources)
