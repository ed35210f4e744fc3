"""Runs last (tests/conftest.py): the suite left the shared broker at $AMQP_URL as it found
it. Tests that restart, stop, kill or reconfigure a broker, or need TLS, use private nodes
(tests/reliability/nodes.py)."""

import pytest

from tests.shared_broker import Guard


def test_the_shared_broker_was_left_alone(
    shared_broker_guard: Guard | None, created_namespaces: set[str]
) -> None:
    if shared_broker_guard is None:
        pytest.skip("no local broker at $AMQP_URL to watch (rabbitmqctl reads it)")
    assert shared_broker_guard.problems(created_namespaces) == []
