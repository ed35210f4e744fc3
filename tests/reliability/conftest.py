"""Reliability fixtures: private nodes (single, TLS, cluster) and every scenario's report."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from amqp_jobs.testing import Namespace
from tests.reliability.harness import REPORTS
from tests.reliability.nodes import (
    Cluster,
    PrivateNode,
    missing_requirement,
    private_cluster,
    private_node,
)
from tests.reliability.tls_node import TLSNode, tls_node
from tests.support import unavailable


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if REPORTS:
        terminalreporter.section("reliability reports")
        for line in REPORTS:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def tls_broker() -> Iterator[TLSNode]:
    """A second RabbitMQ node with a TLS listener only; fails rather than skips under CI."""
    _require_private_nodes()
    with tls_node() as node:
        yield node


@pytest.fixture
def private_broker() -> Iterator[PrivateNode]:
    """A fresh single RabbitMQ node for this test alone (stop it, kill it at will)."""
    _require_private_nodes()
    with private_node(role="single") as node:
        yield node


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """A 3-node RabbitMQ cluster on loopback, shared by one module's tests (~20 s to start)."""
    _require_private_nodes()
    with private_cluster(3) as nodes:
        yield nodes


@pytest.fixture
async def ns(node: PrivateNode) -> AsyncIterator[Namespace]:
    """A fresh namespace on the test module's private ``node``, deleted afterwards."""
    namespace = Namespace(node.url(), f"p-{uuid.uuid4().hex[:8]}")
    yield namespace
    await namespace.delete()


def _require_private_nodes() -> None:
    """Skip (fail under CI) where a private node cannot be started."""
    reason = missing_requirement()
    if reason is not None:
        unavailable(reason)
