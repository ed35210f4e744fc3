"""Job log lookups on a big log: ``JobLog.get`` by id and ``JobLog.list(key=...)``
(newest first, limit 100) on 1,000,000 jobs, for each store. Target: p99 ≤ 20 ms.

    python -m bench.joblog_lookup [--rows 1000000] [--store sqlite|postgres|both]

The fill is bulk (executemany into SQLite, COPY into PostgreSQL, secondary indexes
dropped and then rebuilt by the store's own ``open``), but every row is one that
``apply`` wrote: a few job lives (succeeded at once, retried, dead, running, deferred,
scheduled...) are applied through a real store, and each of the N jobs copies one of
their rows with its own id, name, queue, key and times. About 10,000 distinct keys,
so a key lists about 100 jobs. The SQLite file (under /tmp) and the PostgreSQL
database (``$AMQP_JOBS_PG_URL``'s server) are private to the run and removed after it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from amqp_jobs.events import EventKind, JobEvent
from amqp_jobs.joblog import JobLog, open_store
from amqp_jobs.joblog.base import ATTEMPT_COLUMNS, JOB_COLUMNS, SCHEMA, redact

PG_URL = os.environ.get("AMQP_JOBS_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
TARGET_P99_MS = 20.0
KEYS = 10_000
NS = "bench"
CHUNK = 50_000
DAY_MS = 86_400_000
#: Where the time columns are in a job row and an attempt row (shifted per job).
JOB_TIMES = (10, 11, 12, 13, 14)
ATTEMPT_TIMES = (7, 8)
TRACEBACK = "Traceback (most recent call last):\n" + '  File "app.py", line 42, in send\n' * 12
K = EventKind

# -- the job lives a store is filled with ----------------------------------------------


def _e(kind: EventKind, at: int, attempt: int = 1, **fields: Any) -> JobEvent:
    fields.setdefault("worker", "worker-3:4711")
    return JobEvent(kind, "T", "T", "T", at, attempt=attempt, key="T", enqueued_at=-900, **fields)


def _ran(
    attempt: int, start: int, kind: EventKind, deferrals: int = 0, **fields: Any
) -> list[JobEvent]:
    """One try: started, then ended as ``kind`` 180 ms later."""
    end = dict(started_at=start, duration_ms=180.5, **fields)
    return [
        _e(K.STARTED, start, attempt, deferrals=deferrals),
        _e(kind, start + 180, attempt, deferrals=deferrals, **end),
    ]


_FAILURE: dict[str, Any] = {
    "error_type": "SMTPServerDisconnected",
    "error_message": "Connection unexpectedly closed",
    "traceback": TRACEBACK,
}
_BURIAL: dict[str, Any] = {
    "dead_reason": "exhausted",
    "error_type": "ValueError",
    "error_message": "bad address",
    "traceback": TRACEBACK,
}
_DISCARD: dict[str, Any] = {
    "dead_reason": "discarded",
    "error_type": "Discard",
    "error_message": "unsubscribed",
}


def _failed(attempt: int, start: int) -> list[JobEvent]:
    return _ran(attempt, start, K.RETRYING, retry_in=30.0, **_FAILURE)


#: (weight, the events of one job's life so far)
LIVES: list[tuple[int, list[JobEvent]]] = [
    (60, _ran(1, 0, K.SUCCEEDED, result={"message_id": "<a1b2c3@mail>", "accepted": 1})),
    (10, _failed(1, 0) + _ran(2, 30_500, K.SUCCEEDED, result={"accepted": 1})),
    (4, _failed(1, 0) + _failed(2, 30_500) + _ran(3, 61_000, K.DEAD, **_BURIAL)),
    (5, [_e(K.STARTED, 0)]),
    (5, _failed(1, 0)),
    (5, [_e(K.SCHEDULED, 0, eta=3_600_000)]),
    (5, [_e(K.ENQUEUED, 0)]),
    (4, _ran(1, 0, K.DEFERRED, retry_in=5.0) + _ran(1, 5_300, K.SUCCEEDED, deferrals=1)),
    (2, _ran(1, 0, K.DISCARDED, **_DISCARD)),
]


@dataclass(frozen=True)
class Template:
    """What ``apply`` wrote for one life: the job row and its attempt rows."""

    weight: int
    job: tuple[Any, ...]
    attempts: list[tuple[Any, ...]]


async def templates(workdir: Path) -> list[Template]:
    """Apply each life through a real SQLite store and read back the rows it wrote."""
    path = workdir / "templates.db"
    store = open_store(f"sqlite:///{path}")
    await store.open()
    for n, (_, events) in enumerate(LIVES):
        lived = [replace(e, job_id=f"life-{n}") for e in events]
        await store.apply(NS, lived, n + 1, n or None)
    await store.close()
    with sqlite3.connect(path) as db:
        out = []
        for n, (weight, _) in enumerate(LIVES):
            job = db.execute(f"SELECT {JOB_COLUMNS} FROM amqp_jobs WHERE id = ?", (f"life-{n}",))
            attempts = db.execute(
                f"SELECT {ATTEMPT_COLUMNS} FROM amqp_jobs_attempts WHERE job_id = ?",
                (f"life-{n}",),
            )
            out.append(Template(weight, job.fetchone(), attempts.fetchall()))
    return out


def _shift(row: tuple[Any, ...], times: tuple[int, ...], base: int) -> list[Any]:
    values = list(row)
    for i in times:
        if values[i] is not None:
            values[i] += base
    return values


@dataclass
class Fill:
    """N jobs made from the templates, in id order (the primary key fills in order)."""

    rows: int
    seed: int = 7

    def __post_init__(self) -> None:
        rng = random.Random(self.seed)
        self.ids = sorted(
            str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(self.rows)
        )
        self.keys = [f"user-{i}" for i in range(KEYS)]

    def chunks(self, templates: Sequence[Template]) -> Iterator[tuple[list[Any], list[Any]]]:
        rng = random.Random(self.seed + 1)
        names = [(f"app.{verb}", queue) for verb, queue in
                 [("send_email", "mail"), ("send_sms", "mail"), ("resize", "media"),
                  ("transcode", "media"), ("charge", "billing"), ("refund", "billing"),
                  ("sync_crm", "default"), ("reindex", "default")]]  # fmt: skip
        now = int(time.time() * 1000)
        weights = [t.weight for t in templates]
        for start in range(0, self.rows, CHUNK):
            jobs: list[Any] = []
            attempts: list[Any] = []
            for job_id in self.ids[start : start + CHUNK]:
                template = rng.choices(templates, weights)[0]
                name, queue = rng.choice(names)
                key = rng.choice(self.keys) if rng.random() < 0.9 else None
                base = now - rng.randrange(7 * DAY_MS)
                row = _shift(template.job, JOB_TIMES, base)
                row[0:5] = NS, job_id, name, queue, key
                jobs.append(row)
                for attempt in template.attempts:
                    values = _shift(attempt, ATTEMPT_TIMES, base)
                    values[0:2] = NS, job_id
                    attempts.append(values)
            yield jobs, attempts


def _secondary_indexes() -> list[str]:
    return [s.split(" ON ")[0].split()[-1] for s in SCHEMA if s.startswith("CREATE INDEX")]


async def fill_sqlite(url: str, path: Path, fill: Fill, made: Sequence[Template]) -> int:
    store = open_store(url)
    await store.open()  # the schema, as the store makes it
    await store.close()
    count = 0
    with sqlite3.connect(path, isolation_level=None) as db:
        db.execute("PRAGMA synchronous = OFF")
        for index in _secondary_indexes():
            db.execute(f"DROP INDEX {index}")
        db.execute("BEGIN")
        job_sql = f"INSERT INTO amqp_jobs ({JOB_COLUMNS}) VALUES ({', '.join('?' * 22)})"
        attempt_sql = (
            f"INSERT INTO amqp_jobs_attempts ({ATTEMPT_COLUMNS}) VALUES ({', '.join('?' * 16)})"
        )
        for jobs, attempts in fill.chunks(made):
            db.executemany(job_sql, jobs)
            db.executemany(attempt_sql, attempts)
            count += len(attempts)
        db.execute("COMMIT")
    store = open_store(url, timeout=600)
    await store.open()  # rebuilds the indexes
    await store.close()
    return count


async def fill_postgres(url: str, fill: Fill, made: Sequence[Template]) -> int:
    import asyncpg  # type: ignore[import-untyped]

    store = open_store(url)
    await store.open()
    await store.close()
    count = 0
    db = await asyncpg.connect(url)
    try:
        for index in _secondary_indexes():
            await db.execute(f"DROP INDEX {index}")
        job_columns = [c.strip() for c in JOB_COLUMNS.split(",")]
        attempt_columns = [c.strip() for c in ATTEMPT_COLUMNS.split(",")]
        for jobs, attempts in fill.chunks(made):
            await db.copy_records_to_table("amqp_jobs", records=jobs, columns=job_columns)
            await db.copy_records_to_table(
                "amqp_jobs_attempts", records=attempts, columns=attempt_columns
            )
            count += len(attempts)
    finally:
        await db.close()
    store = open_store(url, timeout=600)
    await store.open()  # rebuilds the indexes
    await store.close()
    db = await asyncpg.connect(url)
    try:
        await db.execute("VACUUM ANALYZE")  # what autovacuum does to a table this size
    finally:
        await db.close()
    return count


# -- timing ----------------------------------------------------------------------------


def spread(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_ms": statistics.median(ordered),
        "p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
        "max_ms": ordered[-1],
    }


async def time_lookups(url: str, fill: Fill, n: int) -> dict[str, Any]:
    rng = random.Random(11)
    gets: list[float] = []
    lists: list[float] = []
    listed = 0
    async with JobLog(url, NS) as log:
        for job_id in rng.sample(fill.ids, n):
            began = time.perf_counter()
            record = await log.get(job_id)
            gets.append((time.perf_counter() - began) * 1000)
            assert record is not None, job_id
        for key in rng.choices(fill.keys, k=n):
            began = time.perf_counter()
            rows = await log.list(key=key, limit=100)
            lists.append((time.perf_counter() - began) * 1000)
            listed += len(rows)
    got, ls = spread(gets), spread(lists)
    return {
        "get_by_id": got,
        "list_by_key": ls | {"mean_rows": listed / n},
        "pass": max(got["p99_ms"], ls["p99_ms"]) <= TARGET_P99_MS,
    }


def _size_mb(workdir: Path) -> float:
    return sum(p.stat().st_size for p in workdir.glob("joblog.db*")) / 1e6


async def bench_store(
    kind: str, fill: Fill, made: Sequence[Template], lookups: int, workdir: Path
) -> dict[str, Any]:
    began = time.perf_counter()
    if kind == "sqlite":
        path = workdir / "joblog.db"
        url = f"sqlite:///{path}"
        attempts = await fill_sqlite(url, path, fill, made)
        size_mb = _size_mb(workdir)
        return await _measure(kind, url, fill, attempts, began, lookups) | {"size_mb": size_mb}
    import asyncpg

    database = f"amqp_jobs_bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(PG_URL, timeout=10)
    try:
        await admin.execute(f'CREATE DATABASE "{database}"')
        url = PG_URL.partition("?")[0].rsplit("/", 1)[0] + f"/{database}"
        try:
            attempts = await fill_postgres(url, fill, made)
            return await _measure(kind, url, fill, attempts, began, lookups)
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    finally:
        await admin.close()


async def _measure(
    kind: str, url: str, fill: Fill, attempts: int, began: float, lookups: int
) -> dict[str, Any]:
    filled = time.perf_counter() - began
    print(f"{kind}: filled {fill.rows:,} jobs, {attempts:,} attempts in {filled:.1f} s", flush=True)
    timed = await time_lookups(url, fill, lookups)
    return {"store": redact(url), "jobs": fill.rows, "attempts": attempts, "fill_s": filled} | timed


def report_line(kind: str, r: dict[str, Any]) -> str:
    g, ls = r["get_by_id"], r["list_by_key"]
    return (
        f"job log {kind}, {r['jobs']:,} jobs: get by id p50 {g['p50_ms']:.2f} ms, p99"
        f" {g['p99_ms']:.2f} ms, max {g['max_ms']:.1f} ms; list by key (limit 100, ~"
        f"{ls['mean_rows']:.0f} rows) p50 {ls['p50_ms']:.2f} ms, p99 {ls['p99_ms']:.2f} ms,"
        f" max {ls['max_ms']:.1f} ms; {'PASS' if r['pass'] else 'FAIL'} (p99 ≤ 20 ms)"
    )


async def bench_joblog(rows: int, stores: Sequence[str], lookups: int = 2_000) -> dict[str, Any]:
    """Each store filled with ``rows`` jobs and timed; its figures by store name."""
    workdir = Path(tempfile.mkdtemp(prefix="amqp-jobs-joblog-bench-", dir="/tmp"))
    try:
        fill, made = Fill(rows), await templates(workdir)
        return {kind: await bench_store(kind, fill, made, lookups, workdir) for kind in stores}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="jobs in the log")
    parser.add_argument("--lookups", type=int, default=2_000, help="timed calls of each kind")
    parser.add_argument("--store", choices=["sqlite", "postgres", "both"], default="both")
    options = parser.parse_args(argv)
    stores = ["sqlite", "postgres"] if options.store == "both" else [options.store]
    results = asyncio.run(bench_joblog(options.rows, stores, options.lookups))
    for kind, result in results.items():
        print(report_line(kind, result))
    sys.exit(0 if all(r["pass"] for r in results.values()) else 1)


if __name__ == "__main__":
    main()
