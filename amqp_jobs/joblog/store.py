"""The job log's store: one row per job and one per attempt, in SQLite (a file, the
default) or PostgreSQL, chosen by URL.

``Store`` is what the recorder and ``JobLog`` need of a database, ``open_store`` picks
the backend a URL names. The records, the query and the shared SQL live in
``joblog.base`` (below the backends, which build on them) and are re-exported here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from amqp_jobs.errors import ContractError
from amqp_jobs.events import JobEvent
from amqp_jobs.joblog.base import (
    DEFAULT_STORE,
    DEFAULT_TIMEOUT,
    FINAL_STATES,
    MAX_LIMIT,
    STATES,
    AttemptRecord,
    FencedError,
    JobRecord,
    JobState,
    Query,
    redact,
)
from amqp_jobs.joblog.postgres import SCHEMES as POSTGRES_SCHEMES
from amqp_jobs.joblog.postgres import PostgresStore
from amqp_jobs.joblog.sqlite import PREFIX as SQLITE_PREFIX
from amqp_jobs.joblog.sqlite import SqliteStore

__all__ = [
    "DEFAULT_STORE",
    "DEFAULT_TIMEOUT",
    "FINAL_STATES",
    "MAX_LIMIT",
    "STATES",
    "AttemptRecord",
    "FencedError",
    "JobRecord",
    "JobState",
    "PostgresStore",
    "Query",
    "SqliteStore",
    "Store",
    "open_store",
    "redact",
]


class Store(Protocol):
    """What the recorder and the queries need of a database. Every call returns or
    raises StoreError within the store's timeout."""

    #: the store's URL without its password (for messages and logs)
    url: str

    async def open(self) -> None:
        """Connect, and create the tables if they are missing."""

    async def close(self) -> None:
        """Disconnect; calling it again does nothing."""

    async def position(self, namespace: str) -> int | None:
        """The stream offset of the last event applied for ``namespace`` (None: none)."""

    async def apply(
        self, namespace: str, events: Sequence[JobEvent], offset: int, expected: int | None
    ) -> None:
        """Apply ``events`` and move the position to ``offset``, in one transaction, if
        the position is still ``expected``; else raise FencedError and change nothing."""

    async def get(self, namespace: str, job_id: str) -> JobRecord | None:
        """A job's row with its attempts, or None if the log never heard of it."""

    async def list(self, namespace: str, query: Query) -> list[JobRecord]:
        """The jobs ``query`` names, newest first, without their attempts."""

    async def prune(self, namespace: str, state: str, before_ms: int, batch: int) -> int:
        """Delete up to ``batch`` jobs in ``state`` last updated before ``before_ms``
        (with their attempts); returns how many."""

    async def claim_unique(
        self, namespace: str, ukey: str, job_id: str, *, period_ms: int, grace_ms: int
    ) -> str:
        """Make ``job_id`` the holder of uniqueness key ``ukey`` unless a live job holds
        it (``unique_is_live``); returns the holder's id, ``job_id`` if it won. Exact
        under concurrent callers: one wins, the others get its id."""

    async def release_unique(self, namespace: str, ukey: str, job_id: str) -> None:
        """Give ``ukey`` up if ``job_id`` holds it (its publish failed)."""


def open_store(url: str, *, timeout: float = DEFAULT_TIMEOUT) -> Store:
    """The store a URL names, not yet opened: ``sqlite:///relative/path.db``,
    ``sqlite:////absolute/path.db``, ``sqlite:///:memory:`` (private to this store) or
    ``postgresql://user:password@host:port/db``. Every call on it returns or raises
    StoreError within ``timeout`` seconds."""
    if not isinstance(url, str) or not url:
        raise ContractError(f"a store URL is needed, like {DEFAULT_STORE!r}, got {url!r}")
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise ContractError(f"timeout must be a number of seconds > 0, got {timeout!r}")
    if url.startswith(SQLITE_PREFIX):
        return SqliteStore(url, timeout=timeout)
    if url.startswith(POSTGRES_SCHEMES):
        return PostgresStore(url, timeout=timeout)
    raise ContractError(
        f"unknown store URL {redact(url)!r}: use sqlite:///path/to/file.db or"
        " postgresql://user@host/db"
    )
