"""The fuzz suite reads its budget from the environment (budget.py); ``--fuzz-long`` sets it."""

from __future__ import annotations

import os

import pytest

from tests.fuzz.budget import ENV


def pytest_configure(config: pytest.Config) -> None:
    # runs when this conftest is loaded, before the fuzz modules are imported and decorated
    if config.getoption("--fuzz-long", default=False):
        os.environ[ENV] = "long"
