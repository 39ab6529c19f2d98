"""Shared fixtures: real local emulators, started once per test session (per xdist worker)."""
import pytest

from tests.emulators import Emulator, bigquery_emulator


@pytest.fixture(scope="session")
def bigquery() -> Emulator:
    """bqemulator on free ports: REST at ``.host``, Storage Read API (gRPC) at ``.extra``."""
    with bigquery_emulator() as emulator:
        yield emulator
