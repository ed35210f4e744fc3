"""Reading the job log: ``JobLog`` answers "what happened to job X" and "which jobs of
key K, newest first" from the store the recorder writes."""

from __future__ import annotations

import builtins
from datetime import UTC, datetime, timedelta
from types import TracebackType

from amqp_jobs.errors import ContractError
from amqp_jobs.joblog.base import DEFAULT_TIMEOUT, JobRecord, Query, check_text
from amqp_jobs.joblog.store import Store, open_store


def _since_ms(since: timedelta | datetime | None) -> int | None:
    if since is None:
        return None
    if isinstance(since, datetime):
        if since.tzinfo is None:
            raise ContractError(f"since must be an aware datetime (which zone?), got {since!r}")
        return int(since.timestamp() * 1000)
    if isinstance(since, timedelta):
        if since < timedelta(0):
            raise ContractError(f"since must be a timedelta >= 0, got {since!r}")
        return int((datetime.now(UTC) - since).timestamp() * 1000)
    raise ContractError(f"since must be a timedelta or a datetime, got {since!r}")


class JobLog:
    """A namespace's job log, read-only: use it as ``async with JobLog(url, ns) as log``.

    Input is checked before any I/O (ContractError), and every call returns or raises
    StoreError within ``timeout`` seconds, so a web handler can call it directly.
    """

    def __init__(self, store_url: str, namespace: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.namespace = check_text("namespace", namespace)
        self.store: Store = open_store(store_url, timeout=timeout)
        self._open = False

    async def __aenter__(self) -> JobLog:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def open(self) -> None:
        """Connect (``async with`` calls it)."""
        await self.store.open()
        self._open = True

    async def close(self) -> None:
        self._open = False
        await self.store.close()

    def _check_open(self) -> None:
        if not self._open:
            raise ContractError("the JobLog is not open: use `async with JobLog(...) as log`")

    async def get(self, job_id: str) -> JobRecord | None:
        """The job's row with its attempts, oldest first; None if the log never heard of
        it (or pruned it)."""
        check_text("job_id", job_id)
        self._check_open()
        return await self.store.get(self.namespace, job_id)

    async def list(
        self,
        state: str | None = None,
        job: str | None = None,
        key: str | None = None,
        queue: str | None = None,
        since: timedelta | datetime | None = None,
        limit: int = 100,
    ) -> builtins.list[JobRecord]:
        """Jobs matching every filter given, most recently updated first, at most
        ``limit`` (1..10,000); ``since`` is an age (timedelta) or an aware datetime.
        Rows come without their attempts: ``get`` one job for its history."""
        query = Query(state, job, key, queue, _since_ms(since), limit)
        self._check_open()
        return await self.store.list(self.namespace, query)
