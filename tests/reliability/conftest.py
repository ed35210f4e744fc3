"""Reliability fixtures: the TLS node, and every scenario's report at the end of the run."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.reliability.harness import REPORTS
from tests.reliability.tls_node import TLSNode, missing_requirement, tls_node
from tests.support import unavailable


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if REPORTS:
        terminalreporter.section("reliability reports")
        for line in REPORTS:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def tls_broker() -> Iterator[TLSNode]:
    """A second RabbitMQ node with a TLS listener only; fails rather than skips under CI."""
    reason = missing_requirement()
    if reason is not None:
        unavailable(reason)
    with tls_node() as node:
        yield node
