"""Print every scenario's report at the end of the run."""

from __future__ import annotations

import pytest

from tests.reliability.harness import REPORTS


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if REPORTS:
        terminalreporter.section("reliability reports")
        for line in REPORTS:
            terminalreporter.write_line(line)
