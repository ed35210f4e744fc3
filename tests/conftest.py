"""The whole suite: a guard on the shared broker for the length of the run."""

from __future__ import annotations

import os

import pytest

from tests.shared_broker import Guard, is_local

GUARD = pytest.StashKey[Guard | None]()
#: The check of the shared broker, which must run after every other test.
LAST = "test_shared_broker.py::test_the_shared_broker_was_left_alone"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    last = [item for item in items if item.nodeid.endswith(LAST)]
    items[:] = [item for item in items if item not in last] + last


def pytest_collection_finish(session: pytest.Session) -> None:
    """Watch the shared broker if the check will run (it takes a few rabbitmqctl calls)."""
    url = os.environ.get("AMQP_URL", "")
    guard = None
    wanted = any(item.nodeid.endswith(LAST) for item in session.items)
    if wanted and url.startswith("amqp://") and is_local(url):
        try:
            guard = Guard(url)
        except Exception as exc:  # no broker: the tests that need one say so
            print(f"shared-broker guard not started: {exc!r}")
    session.config.stash[GUARD] = guard


def pytest_sessionfinish(session: pytest.Session) -> None:
    guard = session.config.stash.get(GUARD, None)
    if guard is not None:
        guard.close()


@pytest.fixture(scope="session")
def shared_broker_guard(request: pytest.FixtureRequest) -> Guard | None:
    return request.config.stash.get(GUARD, None)
