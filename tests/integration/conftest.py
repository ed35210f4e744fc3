"""The integration suite runs each test of library semantics twice: against RabbitMQ
and against the in-memory broker (``memory://``), which must behave the same.

A test that only the real broker can show (a TCP proxy cutting connections, a worker
process, raw AMQP clients, the management API) is marked ``rabbitmq_only`` and runs
against RabbitMQ alone. Helpers shared with the reliability suite: tests/support.py.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest

from amqp_jobs.testing import Namespace, _slug, memory_broker

TRANSPORTS = ["rabbitmq", "memory"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        callspec = getattr(item, "callspec", None)
        transport = callspec.params.get("namespace") if callspec else None
        if transport == "memory" and item.get_closest_marker("rabbitmq_only"):
            item.add_marker(pytest.mark.skip(reason="shows RabbitMQ itself (rabbitmq_only)"))


@pytest.fixture(params=TRANSPORTS)
def namespace(request: pytest.FixtureRequest) -> Iterator[Namespace]:
    """A fresh namespace for this test on RabbitMQ, or on its own in-memory broker."""
    name = f"t-{_slug(request.node.originalname)}-{uuid.uuid4().hex[:8]}"
    if request.param == "memory":
        memory_broker(name)
        ns = Namespace(f"memory://{name}", name)
    else:
        ns = Namespace(request.getfixturevalue("amqp_url"), name)
    yield ns
    asyncio.run(ns.delete())
