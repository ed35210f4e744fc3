"""The job log in PostgreSQL, through an asyncpg pool (``pip install amqp-jobs[postgres]``).

asyncpg is imported when a store opens, so ``import amqp_jobs`` never needs it. Each
call holds one pooled connection under one deadline (connecting, waiting for a pooled
connection and every statement included); the fence is a conditional write of the
position, so of two recorders racing from the same position one writes and the other
is told, whatever the interleaving.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from amqp_jobs.errors import ContractError, StoreError
from amqp_jobs.events import JobEvent
from amqp_jobs.joblog.base import (
    DEFAULT_TIMEOUT,
    SCHEMA,
    JobRecord,
    Query,
    Statements,
    attempt_of,
    check_apply,
    check_prune,
    check_text,
    fenced,
    list_sql,
    record_of,
    redact,
    rows_of,
    secrets_of,
    store_error,
    unique_is_live,
)

T = TypeVar("T")
SQL = Statements.of("numeric")
SCHEMES = ("postgresql://", "postgres://")
#: Serialises creating the tables across processes (concurrent CREATE ... IF NOT
#: EXISTS can fail on PostgreSQL's catalog).
_SCHEMA_LOCK = 0x616D71705F6A6F62  # "amqp_job"
#: One statement (atomic on its own): the oldest ``batch`` jobs, then their attempts.
_UNIQUE_OWNER_FOR_UPDATE = (
    "SELECT job_id, claimed_at FROM amqp_jobs_unique WHERE ns = $1 AND ukey = $2 FOR UPDATE"
)
_PRUNE = """
WITH gone AS (
    DELETE FROM amqp_jobs WHERE ns = $1 AND state = $2 AND updated_at < $3 AND id IN (
        SELECT id FROM amqp_jobs WHERE ns = $1 AND state = $2 AND updated_at < $3
        ORDER BY updated_at LIMIT $4
    )
    RETURNING id
), attempts AS (
    DELETE FROM amqp_jobs_attempts WHERE ns = $1 AND job_id IN (SELECT id FROM gone)
)
SELECT count(*) FROM gone
"""


def _asyncpg() -> Any:
    try:
        import asyncpg  # type: ignore[import-untyped]
    except ImportError:
        raise StoreError(
            "a PostgreSQL job log needs asyncpg: pip install 'amqp-jobs[postgres]'"
        ) from None
    return asyncpg


class PostgresStore:
    """A job log in a PostgreSQL database (``postgresql://user:pass@host:port/db``)."""

    def __init__(self, url: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        if not url.startswith(SCHEMES):
            raise ContractError(f"not a PostgreSQL URL: {redact(url)!r}")
        self.url = redact(url)
        self._dsn = url
        self._secrets = secrets_of(url)
        self._timeout = timeout
        self._pool: Any = None

    async def _call(self, what: str, fn: Callable[[Any], Awaitable[T]]) -> T:
        """Run ``fn`` with a pooled connection, within the timeout, mapping the driver's
        errors (and the timeout) to StoreError."""
        if self._pool is None:
            raise StoreError(f"job log store {self.url}: not open (or closed)")
        return await self._bounded(what, self._with_connection(fn))

    async def _with_connection(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        async with self._pool.acquire(timeout=self._timeout) as connection:
            return await fn(connection)

    async def _bounded(self, what: str, work: Awaitable[T]) -> T:
        asyncpg = _asyncpg()
        try:
            async with asyncio.timeout(self._timeout):
                return await work
        except StoreError:
            raise
        except TimeoutError:
            raise StoreError(
                f"job log store {self.url}: {what} did not finish within {self._timeout:g} s"
            ) from None
        except (OSError, ValueError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            error = store_error(self.url, self._secrets, what, exc)
            leaks = any(s in repr(exc) for s in self._secrets)
            raise error from (None if leaks else exc)

    async def open(self) -> None:
        if self._pool is not None:
            return
        asyncpg = _asyncpg()

        async def connect() -> Any:
            pool = await asyncpg.create_pool(
                self._dsn,
                min_size=1,
                max_size=4,
                timeout=self._timeout,
                command_timeout=self._timeout,
            )
            try:
                async with pool.acquire() as connection, connection.transaction():
                    await connection.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK)
                    for statement in SCHEMA:
                        await connection.execute(statement)
                    await connection.execute(SQL.probe)
            except BaseException:
                pool.terminate()
                raise
            return pool

        self._pool = await self._bounded("connecting", connect())

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            async with asyncio.timeout(self._timeout):
                await pool.close()
        except TimeoutError:
            pool.terminate()

    async def position(self, namespace: str) -> int | None:
        check_text("namespace", namespace)

        async def read(connection: Any) -> int | None:
            value = await connection.fetchval(SQL.position, namespace)
            return None if value is None else int(value)

        return await self._call("reading the position", read)

    async def apply(
        self, namespace: str, events: Sequence[JobEvent], offset: int, expected: int | None
    ) -> None:
        check_apply(namespace, offset, expected)
        jobs, attempts = rows_of(namespace, events)

        async def write(connection: Any) -> None:
            async with connection.transaction():
                # The position first: its row lock queues a rival recorder behind this
                # transaction, which then finds the position moved.
                now = int(time.time() * 1000)
                if expected is None:
                    status = await connection.execute(SQL.first_position, namespace, offset, now)
                else:
                    status = await connection.execute(
                        SQL.move_position, offset, now, namespace, expected
                    )
                if not status.endswith(" 1"):
                    current = await connection.fetchval(SQL.position, namespace)
                    raise fenced(self.url, namespace, current, expected)
                if jobs:
                    await connection.executemany(SQL.upsert_job, jobs)
                if attempts:
                    await connection.executemany(SQL.upsert_attempt, attempts)

        await self._call(f"applying {len(events)} events", write)

    async def get(self, namespace: str, job_id: str) -> JobRecord | None:
        check_text("namespace", namespace)
        check_text("job_id", job_id)

        async def read(connection: Any) -> JobRecord | None:
            async with connection.transaction(isolation="repeatable_read", readonly=True):
                row = await connection.fetchrow(SQL.get_job, namespace, job_id)
                if row is None:
                    return None
                attempts = await connection.fetch(SQL.get_attempts, namespace, job_id)
            return record_of(tuple(row), [attempt_of(tuple(a)) for a in attempts])

        return await self._call("reading a job", read)

    async def list(self, namespace: str, query: Query) -> list[JobRecord]:
        check_text("namespace", namespace)
        sql, params = list_sql(namespace, query, "numeric")

        async def read(connection: Any) -> list[JobRecord]:
            return [record_of(tuple(row)) for row in await connection.fetch(sql, *params)]

        return await self._call("listing jobs", read)

    async def prune(self, namespace: str, state: str, before_ms: int, batch: int) -> int:
        check_prune(namespace, state, before_ms, batch)

        async def delete(connection: Any) -> int:
            return int(await connection.fetchval(_PRUNE, namespace, state, before_ms, batch))

        return await self._call(f"pruning {state} jobs", delete)

    async def claim_unique(
        self, namespace: str, ukey: str, job_id: str, *, period_ms: int, grace_ms: int
    ) -> str:
        async def claim(connection: Any) -> str:
            while True:  # again only if the holder gave the key up in between
                owner = await claim_once(connection)
                if owner is not None:
                    return owner

        async def claim_once(connection: Any) -> str | None:
            async with connection.transaction():
                now = int(time.time() * 1000)
                status = await connection.execute(SQL.claim_unique, namespace, ukey, job_id, now)
                if status.endswith(" 1"):
                    return job_id
                # the row lock queues rival takers behind this transaction
                row = await connection.fetchrow(_UNIQUE_OWNER_FOR_UPDATE, namespace, ukey)
                if row is None:
                    return None
                owner, claimed_at = row[0], int(row[1])
                job = await connection.fetchrow(SQL.job_state, namespace, owner)
                job_row = None if job is None else tuple(job)
                if unique_is_live(claimed_at, job_row, now, period_ms, grace_ms):
                    return str(owner)
                await connection.execute(SQL.take_unique, job_id, now, namespace, ukey, owner)
                return job_id

        return await self._call("claiming a unique key", claim)

    async def release_unique(self, namespace: str, ukey: str, job_id: str) -> None:
        async def release(connection: Any) -> None:
            await connection.execute(SQL.release_unique, namespace, ukey, job_id)

        await self._call("releasing a unique key", release)
