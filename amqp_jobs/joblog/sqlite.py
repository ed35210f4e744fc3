"""The job log in a SQLite file (the default store): stdlib ``sqlite3``, on one thread.

Every call runs on one dedicated thread, so the event loop never blocks on the disk and
the connection is only ever used by the thread that made it (``:memory:`` included).
WAL lets readers in other processes (``amqp-jobs jobs list``) read while the recorder
writes; ``busy_timeout`` and a timer around each call keep every call bounded, and a
call that outlives its bound is interrupted rather than left to hold the write lock.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

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
    rows_of,
    store_error,
    unique_is_live,
)

T = TypeVar("T")
SQL = Statements.of("qmark")
PREFIX = "sqlite:///"


def sqlite_path(url: str) -> str:
    """The file a ``sqlite:///`` URL names: ``sqlite:///rel/path.db`` (relative to the
    working directory), ``sqlite:////abs/path.db``, or ``sqlite:///:memory:``."""
    path = url.removeprefix(PREFIX) if url.startswith(PREFIX) else ""
    if not path or "?" in path or "#" in path:
        raise ContractError(
            f"bad SQLite store URL {url!r}: use sqlite:///relative/path.db,"
            " sqlite:////absolute/path.db or sqlite:///:memory:"
        )
    return path


class SqliteStore:
    """A job log in one SQLite file (or in memory, for one process)."""

    def __init__(self, url: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.url = url  # a SQLite URL carries no password
        self._path = sqlite_path(url)
        self._timeout = timeout
        self._executor: ThreadPoolExecutor | None = None
        self._db: sqlite3.Connection | None = None
        self._calls = itertools.count()
        self._running: int | None = None  # the call on the thread now
        self._lock = threading.Lock()  # orders an interrupt against a call's end

    # -- the thread -------------------------------------------------------------------

    def _run(self, call: int, fn: Callable[[], T]) -> T:
        with self._lock:
            self._running = call
        try:
            return fn()
        finally:
            with self._lock:
                self._running = None

    async def _submit(self, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the store's thread, bounded: past the timeout its statement is
        interrupted (a call still queued is dropped) and StoreError raised."""
        if self._executor is None:
            raise StoreError(f"job log store {self.url}: not open (or closed)")
        call = next(self._calls)
        future = asyncio.get_running_loop().run_in_executor(self._executor, self._run, call, fn)
        try:
            return await asyncio.wait_for(future, self._timeout)
        except (TimeoutError, asyncio.CancelledError) as exc:
            with self._lock:
                if self._running == call and self._db is not None:
                    self._db.interrupt()
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise StoreError(
                f"job log store {self.url}: {what} did not finish within {self._timeout:g} s"
            ) from None
        except sqlite3.Error as exc:
            raise store_error(self.url, (), what, exc) from exc

    async def _call(self, what: str, fn: Callable[[sqlite3.Connection], T]) -> T:
        """``fn`` with the connection, on the store's thread; a transaction it leaves
        open (it raised) is rolled back."""

        def run() -> T:
            db = self._db
            if db is None:
                raise StoreError(f"job log store {self.url}: closed")
            try:
                return fn(db)
            finally:
                if db.in_transaction:
                    db.rollback()

        return await self._submit(what, run)

    # -- Store ------------------------------------------------------------------------

    async def open(self) -> None:
        if self._executor is not None:
            return
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="amqp-jobs-sqlite")
        try:
            await self._submit("opening", self._connect)
        except BaseException:
            await self.close()
            raise

    def _connect(self) -> None:
        if self._path != ":memory:":  # else SQLite says only "unable to open database file"
            directory = os.path.dirname(os.path.abspath(self._path))
            if not os.path.isdir(directory):
                raise StoreError(
                    f"job log store {self.url}: directory {directory} does not exist"
                    " (create it first)"
                )
        try:
            db = sqlite3.connect(self._path, timeout=self._timeout, isolation_level=None)
        except sqlite3.Error as exc:
            raise store_error(self.url, (), "opening", exc) from exc
        deadline = time.monotonic() + self._timeout
        while True:
            try:
                self._prepare(db)
                break
            except sqlite3.OperationalError as exc:
                # Switching to WAL takes the file alone and does not wait for the busy
                # timeout: several processes opening one file at once see "locked".
                if db.in_transaction:
                    db.rollback()
                if "locked" in str(exc) and time.monotonic() < deadline:
                    time.sleep(0.02)
                    continue
                db.close()
                raise store_error(self.url, (), "opening (is it a job log?)", exc) from exc
            except sqlite3.Error as exc:
                db.close()
                raise store_error(self.url, (), "opening (is it a job log?)", exc) from exc
        self._db = db

    def _prepare(self, db: sqlite3.Connection) -> None:
        db.execute(f"PRAGMA busy_timeout = {int(self._timeout * 1000)}")
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
        db.execute("BEGIN IMMEDIATE")
        for statement in SCHEMA:
            db.execute(statement)
        db.execute("COMMIT")
        db.execute(SQL.probe)

    async def close(self) -> None:
        executor, self._executor = self._executor, None
        if executor is None:
            return

        def shut(_: object) -> None:
            db, self._db = self._db, None
            if db is not None:
                try:
                    db.execute("PRAGMA optimize")
                finally:
                    db.close()

        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.run_in_executor(executor, shut, None), self._timeout)
        except (TimeoutError, sqlite3.Error):
            pass  # closing what may be broken: nothing more to do
        finally:
            executor.shutdown(wait=False, cancel_futures=True)

    async def position(self, namespace: str) -> int | None:
        check_text("namespace", namespace)

        def read(db: sqlite3.Connection) -> int | None:
            row = db.execute(SQL.position, (namespace,)).fetchone()
            return None if row is None else int(row[0])

        return await self._call("reading the position", read)

    async def apply(
        self, namespace: str, events: Sequence[JobEvent], offset: int, expected: int | None
    ) -> None:
        check_apply(namespace, offset, expected)
        jobs, attempts = rows_of(namespace, events)

        def write(db: sqlite3.Connection) -> None:
            db.execute("BEGIN IMMEDIATE")  # the write lock, before the fence is read
            now = int(time.time() * 1000)
            if expected is None:
                moved = db.execute(SQL.first_position, (namespace, offset, now))
            else:
                moved = db.execute(SQL.move_position, (offset, now, namespace, expected))
            if moved.rowcount != 1:
                row = db.execute(SQL.position, (namespace,)).fetchone()
                raise fenced(self.url, namespace, None if row is None else row[0], expected)
            db.executemany(SQL.upsert_job, jobs)
            db.executemany(SQL.upsert_attempt, attempts)
            db.execute("COMMIT")

        await self._call(f"applying {len(events)} events", write)

    async def get(self, namespace: str, job_id: str) -> JobRecord | None:
        check_text("namespace", namespace)
        check_text("job_id", job_id)

        def read(db: sqlite3.Connection) -> JobRecord | None:
            db.execute("BEGIN")  # one snapshot for the job and its attempts
            row = db.execute(SQL.get_job, (namespace, job_id)).fetchone()
            if row is None:
                return None
            attempts = db.execute(SQL.get_attempts, (namespace, job_id)).fetchall()
            return record_of(row, [attempt_of(a) for a in attempts])

        return await self._call("reading a job", read)

    async def list(self, namespace: str, query: Query) -> list[JobRecord]:
        check_text("namespace", namespace)
        sql, params = list_sql(namespace, query, "qmark")

        def read(db: sqlite3.Connection) -> list[JobRecord]:
            return [record_of(row) for row in db.execute(sql, params)]

        return await self._call("listing jobs", read)

    async def prune(self, namespace: str, state: str, before_ms: int, batch: int) -> int:
        check_prune(namespace, state, before_ms, batch)

        def delete(db: sqlite3.Connection) -> int:
            db.execute("BEGIN IMMEDIATE")
            found = db.execute(SQL.prunable, (namespace, state, before_ms, batch))
            ids = [(namespace, row[0]) for row in found]
            db.executemany("DELETE FROM amqp_jobs_attempts WHERE ns = ? AND job_id = ?", ids)
            db.executemany("DELETE FROM amqp_jobs WHERE ns = ? AND id = ?", ids)
            db.execute("COMMIT")
            return len(ids)

        return await self._call(f"pruning {state} jobs", delete)

    async def claim_unique(
        self, namespace: str, ukey: str, job_id: str, *, period_ms: int, grace_ms: int
    ) -> str:
        def claim(db: sqlite3.Connection) -> str:
            db.execute("BEGIN IMMEDIATE")  # the write lock: callers take turns
            now = int(time.time() * 1000)
            if db.execute(SQL.claim_unique, (namespace, ukey, job_id, now)).rowcount == 1:
                db.execute("COMMIT")
                return job_id
            owner, claimed_at = db.execute(SQL.unique_owner, (namespace, ukey)).fetchone()
            job = db.execute(SQL.job_state, (namespace, owner)).fetchone()
            if not unique_is_live(claimed_at, job, now, period_ms, grace_ms):
                db.execute(SQL.take_unique, (job_id, now, namespace, ukey, owner))
                owner = job_id
            db.execute("COMMIT")
            return str(owner)

        return await self._call("claiming a unique key", claim)

    async def release_unique(self, namespace: str, ukey: str, job_id: str) -> None:
        def release(db: sqlite3.Connection) -> None:
            db.execute(SQL.release_unique, (namespace, ukey, job_id))

        await self._call("releasing a unique key", release)
