"""The fuzz suite reads its budget from the environment (budget.py); ``--fuzz-long`` sets it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.fuzz.budget import ENV, is_long

HERE = Path(__file__).parent


def pytest_configure(config: pytest.Config) -> None:
    # runs when this conftest is loaded, before the fuzz modules are imported and decorated
    if config.getoption("--fuzz-long", default=False):
        os.environ[ENV] = "long"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # the long profile runs for as long as it takes: lift the suite's 60 s per-test timeout
    if is_long():
        for item in items:
            if HERE in item.path.parents:
                item.add_marker(pytest.mark.timeout(0), append=False)  # before any of its own
