"""The chaos suite prints its figures whatever pytest's capture mode: each test hands its summary
line (and the path of its JSON report) to :func:`chaos_report`, and the terminal summary shows them."""

from __future__ import annotations

from collections.abc import Callable

import pytest

_LINES = pytest.StashKey[list[str]]()


@pytest.fixture
def chaos_report(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """``chaos_report(line)``: print ``line`` in the terminal summary of this session."""
    lines = request.config.stash.setdefault(_LINES, [])

    def add(line: str) -> None:
        lines.append(f"{request.node.name}: {line}")

    return add


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    lines = config.stash.get(_LINES, [])
    if lines:
        terminalreporter.section("chaos and soak figures")
        for line in lines:
            terminalreporter.write_line(line)
