"""The job log's stores, SQLite and PostgreSQL alike: events in any order, duplicated or
late, leave a job's row where its latest event puts it; the recorder's position moves
only with its rows and only from where the recorder read it; queries are checked before
any I/O and every failure is a bounded StoreError that never shows a password.

PostgreSQL: ``$AMQP_JOBS_PG_URL`` (default the local server as ``postgres``); this run
creates a database of its own and drops it at the end. Unreachable: skipped, or a
failure when ``CI=true``.
"""

import asyncio
import itertools
import os
import random
import sqlite3
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from amqp_jobs.errors import ContractError, StoreError
from amqp_jobs.events import EventKind, JobEvent
from amqp_jobs.joblog import FencedError, JobLog, JobRecord, Query, Store, open_store, redact
from amqp_jobs.joblog.sqlite import SqliteStore

PG_URL = os.environ.get("AMQP_JOBS_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
NOW = int(time.time() * 1000)
K = EventKind


@pytest.fixture
def ns(request: pytest.FixtureRequest) -> str:
    """A namespace of this test's own (PostgreSQL's database is shared by the run)."""
    return f"t-{request.node.originalname}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    store = open_store(store_url)
    await store.open()
    yield store
    await store.close()


def ev(
    kind: EventKind, job_id: str = "j1", attempt: int = 1, at: int = 0, **fields: Any
) -> JobEvent:
    """An event of job ``job_id``, ``at`` ms after the test's start."""
    fields.setdefault("worker", "host:1")
    fields.setdefault("enqueued_at", NOW - 1000)
    return JobEvent(kind, job_id, "t.send", "mail", NOW + at, attempt=attempt, **fields)


#: One job's life: attempt 1 fails, attempt 2 is deferred once, then succeeds.
LIFE = [
    ev(K.ENQUEUED, key="user-1"),
    ev(K.STARTED, at=10, key="user-1"),
    ev(K.RETRYING, at=20, started_at=NOW + 10, duration_ms=10, error_type="OSError",
       error_message="refused", traceback="Traceback ...", retry_in=1.5, key="user-1"),
    ev(K.STARTED, attempt=2, at=30, key="user-1"),
    ev(K.DEFERRED, attempt=2, at=40, started_at=NOW + 30, duration_ms=10, retry_in=5, key="user-1"),
    ev(K.STARTED, attempt=2, at=50, deferrals=1, key="user-1", worker="host:2"),
    ev(K.SUCCEEDED, attempt=2, at=60, deferrals=1, started_at=NOW + 50, duration_ms=10,
       result={"sent": True, "to": ["ü@x"], "n": 2.5}, key="user-1", worker="host:2"),
]  # fmt: skip


def at(ms: int) -> datetime:
    """The time ``ms`` after the test's start, as a record gives it."""
    return datetime.fromtimestamp((NOW + ms) / 1000, UTC)


def comparable(record: JobRecord | None) -> dict[str, Any]:
    assert record is not None
    return record.to_json(with_attempts=True) | {"job_id": None}


async def test_apply_and_get_round_trip_with_attempts_and_result(store: Store, ns: str) -> None:
    await store.apply(ns, LIFE, 7, None)
    record = await store.get(ns, "j1")
    assert record is not None
    assert (record.namespace, record.job, record.queue, record.key) == (
        ns,
        "t.send",
        "mail",
        "user-1",
    )
    assert (record.state, record.attempt, record.replays) == ("succeeded", 2, 0)
    assert record.is_final
    assert record.result == {"sent": True, "to": ["ü@x"], "n": 2.5}
    assert record.error_type is None and record.traceback is None  # success clears the error
    assert record.enqueued_at == at(-1000)
    assert record.started_at == at(50)
    assert record.finished_at == record.updated_at == at(60)
    assert (record.duration_ms, record.worker) == (10.0, "host:2")
    assert [(a.attempt, a.state) for a in record.attempts] == [(1, "retrying"), (2, "succeeded")]
    first, second = record.attempts
    assert (first.error_type, first.error_message) == ("OSError", "refused")
    assert first.traceback == "Traceback ..."
    assert (first.retry_in, first.duration_ms, first.worker) == (1.5, 10.0, "host:1")
    assert first.ended_at == at(20)
    assert second.error_type is None and second.worker == "host:2"
    assert record.to_json(with_attempts=True)["attempts"][0]["state"] == "retrying"
    assert await store.position(ns) == 7


async def test_any_order_of_a_jobs_events_gives_the_row_of_the_latest(
    store: Store, ns: str
) -> None:
    await store.apply(ns, LIFE, 0, None)
    expected = comparable(await store.get(ns, "j1"))
    orders = random.Random(12).sample(list(itertools.permutations(LIFE)), 200)
    orders.append(tuple(reversed(LIFE)))
    for n, order in enumerate(orders):
        await store.apply(ns, [replace(e, job_id=f"perm-{n}") for e in order], n + 1, n)
    for n in range(len(orders)):
        assert comparable(await store.get(ns, f"perm-{n}")) == expected, orders[n]


async def test_duplicates_and_late_events_never_move_a_job_backwards(store: Store, ns: str) -> None:
    await store.apply(ns, LIFE, 1, None)
    before = comparable(await store.get(ns, "j1"))
    await store.apply(ns, LIFE, 2, 1)  # the same batch again (redelivered)
    await store.apply(ns, [LIFE[1], LIFE[3]], 3, 2)  # started after succeeded
    assert comparable(await store.get(ns, "j1")) == before

    # retrying of attempt 1 after started of attempt 2: the job runs attempt 2, and
    # attempt 1's history still gets its end
    await store.apply(ns, [ev(K.STARTED, "j2", 1), ev(K.STARTED, "j2", 2, at=30)], 4, 3)
    await store.apply(
        ns, [ev(K.RETRYING, "j2", 1, at=20, error_type="E", error_message="late")], 5, 4
    )
    record = await store.get(ns, "j2")
    assert record is not None
    assert (record.state, record.attempt, record.finished_at) == ("running", 2, None)
    assert [(a.attempt, a.state) for a in record.attempts] == [(1, "retrying"), (2, "running")]
    assert record.attempts[0].error_message == "late"


async def test_a_replay_starts_a_new_life_that_late_events_cannot_undo(
    store: Store, ns: str
) -> None:
    dead = ev(K.DEAD, "j3", 3, at=10, error_type="ValueError", error_message="bad",
              traceback="tb", dead_reason="exhausted", started_at=NOW + 5, duration_ms=5)  # fmt: skip
    await store.apply(ns, [ev(K.STARTED, "j3", 3, at=5), dead], 1, None)
    replayed = ev(K.REPLAYED, "j3", 1, at=100, replays=1, worker=None)
    await store.apply(ns, [replayed, dead, ev(K.STARTED, "j3", 3, at=5)], 2, 1)  # late copies
    record = await store.get(ns, "j3")
    assert record is not None
    assert (record.state, record.replays, record.attempt) == ("enqueued", 1, 1)
    assert (record.started_at, record.finished_at, record.duration_ms, record.worker) == (None,) * 4
    assert (record.error_type, record.error_message, record.traceback) == (None,) * 3
    assert record.dead_reason is None
    assert record.enqueued_at == at(-1000)  # its first enqueue
    assert [(a.replays, a.attempt, a.state) for a in record.attempts] == [(0, 3, "dead")]

    await store.apply(ns, [ev(K.STARTED, "j3", 1, at=110, replays=1)], 3, 2)
    record = await store.get(ns, "j3")
    assert record is not None and (record.state, record.replays) == ("running", 1)
    assert [(a.replays, a.attempt) for a in record.attempts] == [(0, 3), (1, 1)]


async def test_a_fenced_apply_writes_nothing(store: Store, ns: str) -> None:
    await store.apply(ns, [ev(K.STARTED, "a")], 10, None)
    with pytest.raises(FencedError, match=r"position of namespace .* is 10, not 9"):
        await store.apply(ns, [ev(K.SUCCEEDED, "a", at=5), ev(K.STARTED, "b")], 11, 9)
    with pytest.raises(FencedError, match="is 10, not none"):
        await store.apply(ns, [ev(K.STARTED, "b")], 11, None)
    assert await store.position(ns) == 10
    assert await store.get(ns, "b") is None
    record = await store.get(ns, "a")
    assert record is not None and record.state == "running"
    assert isinstance(FencedError("x"), StoreError)
    other = f"{ns}-other"  # positions are per namespace
    with pytest.raises(FencedError, match="is none, not 10"):
        await store.apply(other, [ev(K.STARTED, "a")], 11, 10)
    assert await store.position(other) is None


async def test_of_two_recorders_racing_from_one_position_one_writes(
    store_url: str, ns: str
) -> None:
    one, two = open_store(store_url), open_store(store_url)
    await one.open()
    await two.open()
    try:
        await one.apply(ns, [], 1, None)
        results = await asyncio.gather(
            one.apply(ns, [ev(K.STARTED, "by-one")], 2, 1),
            two.apply(ns, [ev(K.STARTED, "by-two")], 3, 1),
            return_exceptions=True,
        )
        assert sorted(type(r).__name__ for r in results) == ["FencedError", "NoneType"]
        winner = "by-one" if results[0] is None else "by-two"
        assert await one.position(ns) == (2 if winner == "by-one" else 3)
        assert [await one.get(ns, j) is not None for j in ("by-one", "by-two")] == [
            winner == "by-one", winner == "by-two",
        ]  # fmt: skip
    finally:
        await one.close()
        await two.close()


async def test_the_position_survives_close_and_reopen(store_url: str, ns: str) -> None:
    first = open_store(store_url)
    await first.open()
    assert await first.position(ns) is None
    await first.apply(ns, [ev(K.STARTED)], 41, None)
    await first.apply(ns, [ev(K.SUCCEEDED, at=5)], 42, 41)
    await first.close()
    await first.close()  # twice is fine
    with pytest.raises(StoreError, match="not open"):
        await first.position(ns)
    second = open_store(store_url)
    await second.open()
    try:
        assert await second.position(ns) == 42
        record = await second.get(ns, "j1")
        assert record is not None and record.state == "succeeded"
        await second.apply(ns, [], 43, 42)
        assert await second.position(ns) == 43
    finally:
        await second.close()


async def test_list_filters_newest_first_with_a_limit(store_url: str, ns: str) -> None:
    writer = open_store(store_url)
    await writer.open()
    old = -3_600_000  # an hour before the test
    await writer.apply(ns, [
        ev(K.SUCCEEDED, "old", at=old, key="k1"),
        ev(K.STARTED, "a", at=1, key="k1"),
        ev(K.DEAD, "b", at=2, key="k1", dead_reason="exhausted"),
        ev(K.STARTED, "c", at=3, key="k2"),
        JobEvent(K.STARTED, "d", "t.other", "other", NOW + 4, key="k1"),
        ev(K.STARTED, "e", at=5),
    ], 1, None)  # fmt: skip
    await writer.apply(f"{ns}-other", [ev(K.STARTED, "x", at=6, key="k1")], 1, None)
    await writer.close()

    async with JobLog(store_url, ns) as log:

        async def ids(**filters: Any) -> list[str]:
            return [r.job_id for r in await log.list(**filters)]

        assert await ids() == ["e", "d", "c", "b", "a", "old"]
        assert await ids(key="k1") == ["d", "b", "a", "old"]
        assert await ids(key="k1", limit=2) == ["d", "b"]
        assert await ids(state="running") == ["e", "d", "c", "a"]
        assert await ids(state="dead") == ["b"]
        assert await ids(job="t.other") == ["d"]
        assert await ids(queue="mail", key="k1") == ["b", "a", "old"]
        assert await ids(key="k1", since=timedelta(minutes=30)) == ["d", "b", "a"]
        assert await ids(since=at(3)) == ["e", "d", "c"]
        assert await ids(key="nobody") == []
        listed = await log.list(state="dead")
        assert listed[0].dead_reason == "exhausted" and listed[0].attempts == ()
        assert await log.get("nobody") is None
        full = await log.get("b")
        assert full is not None and [a.state for a in full.attempts] == ["dead"]


async def test_prune_deletes_old_jobs_of_a_state_in_batches(store: Store, ns: str) -> None:
    events = [ev(K.SUCCEEDED, f"s{i}", at=i) for i in range(5)]
    events += [ev(K.DEAD, f"d{i}", at=i) for i in range(2)]
    events += [ev(K.SUCCEEDED, "new", at=1000), ev(K.STARTED, "live", at=0)]
    await store.apply(ns, events, 1, None)
    before = NOW + 500
    deleted = [await store.prune(ns, "succeeded", before, 2) for _ in range(4)]
    assert deleted == [2, 2, 1, 0]
    assert [await store.get(ns, f"s{i}") for i in range(5)] == [None] * 5
    for job_id in ("d0", "d1", "new", "live"):
        assert await store.get(ns, job_id) is not None, job_id
    # its attempt rows went with it: the id's history starts again
    await store.apply(ns, [ev(K.STARTED, "s0", attempt=3, at=2000)], 2, 1)
    again = await store.get(ns, "s0")
    assert again is not None and [a.attempt for a in again.attempts] == [3]
    assert await store.prune(ns, "dead", before, 10) == 2


@pytest.mark.parametrize(
    ("call", "problem"),
    [
        (lambda log: log.list(state="bogus"), "unknown state 'bogus'"),
        (lambda log: log.list(limit=0), "limit must be 1..10000"),
        (lambda log: log.list(limit=10_001), "limit must be 1..10000"),
        (lambda log: log.list(limit="5"), "limit must be an int"),
        (lambda log: log.list(key=5), "key must be a non-empty string"),
        (lambda log: log.list(since=5), "since must be a timedelta or a datetime"),
        (lambda log: log.list(since=datetime(2026, 1, 1)), "aware datetime"),
        (lambda log: log.list(since=timedelta(-1)), "since must be a timedelta >= 0"),
        (lambda log: log.get(""), "job_id must be a non-empty string"),
        (lambda log: log.store.apply("ns", [], -1, None), "offset must be >= 0"),
        (lambda log: log.store.apply("ns", [], 1, "0"), "expected must be an int"),
        (lambda log: log.store.prune("ns", "running", 0, 0), "batch must be 1..10000"),
        (lambda log: log.store.prune("ns", "nope", 0, 10), "unknown state 'nope'"),
        (lambda log: log.store.list("", Query()), "namespace must be a non-empty string"),
    ],
)
async def test_bad_input_is_a_contract_error_before_any_io(call: Any, problem: str) -> None:
    # a store that has never connected, and could not: any I/O would be a StoreError
    log = JobLog("postgresql://u:secret@127.0.0.1:1/db", "ns")
    with pytest.raises(ContractError, match=problem):
        await call(log)


def test_store_urls_are_checked() -> None:
    for url in ("mysql://u@h/db", "sqlite://relative.db", "sqlite:///", "", "redis://u:pw@h"):
        with pytest.raises(ContractError, match="store URL") as caught:
            open_store(url)
        assert "pw" not in str(caught.value)
    with pytest.raises(ContractError, match="timeout"):
        open_store("sqlite:///:memory:", timeout=0)
    with pytest.raises(ContractError, match="namespace"):
        JobLog("sqlite:///:memory:", "")


def test_redact_hides_every_password() -> None:
    assert redact("postgresql://u:s3cret@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert redact("postgresql://u:p@ss/w@h/db") == "postgresql://u:***@h/db"
    assert redact("postgres://h/db?user=u&password=pw&sslmode=require") == (
        "postgres://h/db?user=u&password=***&sslmode=require"
    )
    assert redact("postgresql://u@h/db") == "postgresql://u@h/db"
    assert redact("sqlite:////tmp/a.db") == "sqlite:////tmp/a.db"


async def test_an_unreachable_postgres_is_a_bounded_store_error_without_the_password() -> None:
    store = open_store("postgresql://u:secret@127.0.0.1:1/db?password=secret2", timeout=2)
    began = time.monotonic()
    with pytest.raises(StoreError) as caught:
        await store.open()
    assert time.monotonic() - began < 3
    message = str(caught.value)
    assert "postgresql://u:***@127.0.0.1:1/db" in message and "connecting" in message
    for error in (caught.value, caught.value.__cause__, caught.value.__context__):
        assert "secret" not in repr(error)


async def test_a_missing_postgres_database_is_a_store_error(pg_database: str) -> None:
    url = pg_database.rsplit("/", 1)[0] + f"/amqp_jobs_t_missing_{uuid.uuid4().hex[:8]}"
    with pytest.raises(
        StoreError, match=r"amqp_jobs_t_missing_\w+: connecting failed.*does not exist"
    ):
        await open_store(url, timeout=5).open()


async def test_without_asyncpg_postgres_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "asyncpg", None)
    with pytest.raises(StoreError, match=r"pip install 'amqp-jobs\[postgres\]'"):
        await open_store("postgresql://u@127.0.0.1:1/db").open()


async def test_sqlite_in_a_missing_directory_is_a_store_error(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path}/missing/log.db")
    with pytest.raises(StoreError, match=rf"directory {tmp_path}/missing does not exist"):
        await store.open()
    assert not (tmp_path / "missing").exists()


async def test_sqlite_relative_and_memory_urls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for url in ("sqlite:///rel/log.db", "sqlite:///:memory:"):
        (tmp_path / "rel").mkdir(exist_ok=True)
        store = open_store(url)
        await store.open()
        await store.apply("ns", [ev(K.STARTED)], 1, None)
        assert await store.position("ns") == 1
        await store.close()
    assert (tmp_path / "rel" / "log.db").exists()


async def test_sqlite_refuses_a_table_that_is_not_a_job_log(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "other.db") as db:
        db.execute("CREATE TABLE amqp_jobs (ns TEXT, id TEXT, PRIMARY KEY (ns, id))")
    with pytest.raises(StoreError, match="is it a job log"):
        await open_store(f"sqlite:///{tmp_path}/other.db").open()


async def test_a_locked_sqlite_file_is_a_bounded_store_error(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    store = open_store(f"sqlite:///{path}", timeout=0.5)
    await store.open()
    await store.apply("ns", [ev(K.STARTED)], 1, None)
    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # another writer holds the lock
        began = time.monotonic()
        with pytest.raises(StoreError, match=f"job log store sqlite:///{path}"):
            await store.apply("ns", [ev(K.SUCCEEDED, at=5)], 2, 1)
        assert time.monotonic() - began < 2
        assert await store.position("ns") == 1  # readers still read under WAL
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    await store.apply("ns", [ev(K.SUCCEEDED, at=5)], 2, 1)  # and the store works on
    record = await store.get("ns", "j1")
    assert record is not None and record.state == "succeeded"
    await store.close()


async def test_a_sqlite_call_past_its_bound_is_interrupted(tmp_path: Path) -> None:
    """The timer, not only busy_timeout: a statement still running at the bound is
    interrupted, so the store's one thread is free for the next call."""
    store = SqliteStore(f"sqlite:///{tmp_path}/log.db", timeout=0.3)
    await store.open()
    endless = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT max(x) FROM c"
    began = time.monotonic()
    with pytest.raises(StoreError, match=r"counting did not finish within 0.3 s"):
        await store._call("counting", lambda db: db.execute(endless).fetchone())
    assert time.monotonic() - began < 1
    await store.apply("ns", [ev(K.STARTED)], 1, None)  # answered within the bound again
    assert await store.position("ns") == 1
    await store.close()
