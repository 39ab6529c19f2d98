"""Shared fixtures: real local emulators, started once per test session (per xdist worker),
and a generated world without planted bad rows."""
import json
import os

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
