"""The whole suite: a guard on the shared broker for the length of the run."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from amqp_jobs.testing import Namespace
from amqp_jobs.urls import DEFAULT_URL
from tests.shared_broker import Guard, is_local
from tests.support import private_pg_database

GUARD = pytest.StashKey[Guard | None]()
#: Every namespace this run's tests create (the guard looks for their leftovers).
CREATED: set[str] = set()
_init = Namespace.__init__


def _recording_init(self: Namespace, *args: object, **kwargs: object) -> None:
    _init(self, *args, **kwargs)  # type: ignore[arg-type]
    CREATED.add(self.name)


Namespace.__init__ = _recording_init  # type: ignore[method-assign]
#: The check of the shared broker, which must run after every other test.
LAST = "test_shared_broker.py::test_the_shared_broker_was_left_alone"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    last = [item for item in items if item.nodeid.endswith(LAST)]
    items[:] = [item for item in items if item not in last] + last


def pytest_collection_finish(session: pytest.Session) -> None:
    """Watch the shared broker if the check will run (it takes a few rabbitmqctl calls)."""
    url = os.environ.get("AMQP_URL") or DEFAULT_URL  # as the plugin's amqp_url
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


@pytest.fixture(scope="session")
def created_namespaces() -> set[str]:
    return CREATED


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A PostgreSQL database of this run's own (job log stores), dropped at the end."""
    with private_pg_database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A job log store: a SQLite file of the test's own, or the run's PostgreSQL database
    (the tables are keyed by namespace, and each test has its own)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/log.db"  # an absolute path: four slashes
    return str(request.getfixturevalue("pg_database"))
