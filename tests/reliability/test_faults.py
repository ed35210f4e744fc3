"""Fault injection: every confirmed job runs, none early, duplicates bounded."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from aio_pika import ExchangeType
from pydantic import BaseModel

from amqp_jobs import Job, RetryPolicy
from amqp_jobs.testing import Namespace, run_until_idle
from amqp_jobs.topology import (
    dead_exchange,
    dead_queue,
    delay_exchange,
    quarantine_queue,
    route_levels,
    work_queue,
)
from amqp_jobs.transport import transport_for
from amqp_jobs.transport.amqp.session import FLUSH_TIMEOUT
from tests.reliability import rel_app
from tests.reliability.harness import Harness
from tests.support import (
    MANAGEMENT,
    WorkerProcess,
    channel,
    drain,
    eventually,
    exit_or_parked,
    queue_count,
    require_management,
)

APP = "tests.reliability.rel_app:app"
CONCURRENCY = 8


@pytest.fixture
def harness(namespace: Namespace, tmp_path: Path) -> Harness:
    return Harness(namespace, tmp_path / "events.log")


def start(h: Harness, *extra: str, env: dict[str, str] | None = None) -> WorkerProcess:
    return WorkerProcess(
        h.namespace, h.log_path, "--concurrency", str(CONCURRENCY), *extra, env=env, app=APP
    )


def load(n: int) -> list[dict[str, object]]:
    """Jobs that take a moment; every third fails once and is retried."""
    return [{"n": i, "fail_first": i % 3 == 0, "seconds": 0.02} for i in range(n)]


async def finish(worker: WorkerProcess) -> None:
    """Stop a worker gracefully if it still runs; kill it if that fails."""
    try:
        if worker.proc.poll() is None:
            worker.signal(signal.SIGTERM)
            await worker.wait(30)
    finally:
        worker.stop_now()


async def until_successes(h: Harness, count: int) -> None:
    await eventually(lambda: len(h.succeeded_ids()) >= count, timeout=60, what=f"{count} successes")


async def test_kill_9_twice_mid_load(harness: Harness) -> None:
    await harness.publish(rel_app.work, load(300))
    for target in (60, 150):
        worker = start(harness)
        try:
            await until_successes(harness, target)
            worker.kill()
            await worker.wait(15)
        finally:
            worker.stop_now()
    last = start(harness)
    try:
        await harness.wait_all()
    finally:
        await finish(last)
    report = await harness.report("kill -9 twice mid-load (retries in flight)")
    assert report.lost == 0
    assert report.early == 0
    # at most what was in flight at each kill: running jobs and unacked retry copies
    assert report.duplicates <= 2 * 2 * CONCURRENCY


async def test_sigterm_mid_load(harness: Harness) -> None:
    await harness.publish(rel_app.work, [{"n": i, "seconds": 0.1} for i in range(200)])
    first = start(harness, "--grace", "30")
    try:
        await until_successes(harness, 40)
        first.signal(signal.SIGTERM)
        assert await first.wait(30) == 0, first.output()
    finally:
        first.stop_now()
    started = {e["id"] for e in harness.events("start")}
    assert started <= harness.succeeded_ids(), "every job that started before SIGTERM finished"
    second = start(harness)
    try:
        await harness.wait_all()
    finally:
        await finish(second)
    report = await harness.report("SIGTERM mid-load")
    assert report.lost == 0
    assert report.duplicates == 0, "nothing acked that did not finish, nothing finished twice"


def close_connections(amqp_url: str, marker: str) -> int:
    """Close, from the broker's side, every connection whose name contains ``marker``."""
    parts = urllib.parse.urlsplit(amqp_url)
    auth = f"{parts.username or 'guest'}:{parts.password or 'guest'}".encode()
    import base64

    headers = {"Authorization": "Basic " + base64.b64encode(auth).decode()}
    request = urllib.request.Request(f"{MANAGEMENT}/api/connections", headers=headers)
    with urllib.request.urlopen(request, timeout=10) as response:
        connections = json.load(response)
    closed = 0
    for conn in connections:
        name = (conn.get("client_properties") or {}).get("connection_name", "")
        if marker in name:
            quoted = urllib.parse.quote(conn["name"], safe="")
            delete = urllib.request.Request(
                f"{MANAGEMENT}/api/connections/{quoted}", headers=headers, method="DELETE"
            )
            urllib.request.urlopen(delete, timeout=10).close()
            closed += 1
    return closed


async def test_a_session_the_broker_closed_closes_at_once(
    namespace: Namespace, caplog: pytest.LogCaptureFixture
) -> None:
    """A session whose connection the broker closed has nothing left to flush: closing
    it, as a worker or a reply consumer does before it reconnects, neither waits out
    FLUSH_TIMEOUT on a dead writer nor warns of dropped settlements."""
    require_management()
    marker = f"closed-session {namespace.name}"
    session = await transport_for(namespace.url).session(name=marker, give_up_after=10)
    lost = asyncio.Event()
    session.on_lost(lambda reason, _: lost.set())
    await session.channel(1)  # a channel whose acks a close would flush, as a worker's
    loop = asyncio.get_running_loop()

    async def closed() -> bool:  # once the management API lists it (stats come every 5 s)
        return await loop.run_in_executor(None, close_connections, namespace.url, marker) == 1

    await eventually(closed, timeout=30, interval=0.5, what="the session's connection listed")
    await asyncio.wait_for(lost.wait(), 10)
    began = loop.time()
    with caplog.at_level(logging.WARNING):
        await asyncio.wait_for(session.close(), 10)
    assert "settlements not written" not in caplog.text
    assert loop.time() - began < FLUSH_TIMEOUT


async def test_connections_closed_by_the_broker_mid_load(harness: Harness) -> None:
    require_management()
    await harness.publish(rel_app.work, load(300))
    worker = start(harness)
    try:
        await until_successes(harness, 60)
        marker = f"[{harness.namespace.name}]"
        loop = asyncio.get_running_loop()
        closed = 0

        async def some_closed() -> bool:
            nonlocal closed
            closed += await loop.run_in_executor(
                None, close_connections, harness.namespace.url, marker
            )
            return closed >= 2

        # the management API lists a connection a moment after it opens
        await eventually(some_closed, timeout=20, interval=0.5, what="worker connections to close")
        await harness.wait_all()
        assert worker.proc.poll() is None, "the worker reconnected instead of dying"
    finally:
        await finish(worker)
    report = await harness.report("connections closed by the broker mid-load")
    assert report.lost == 0
    assert report.duplicates <= 2 * CONCURRENCY


async def test_a_job_that_kills_its_worker_every_time(harness: Harness) -> None:
    from amqp_jobs import TopologySettings
    from amqp_jobs.topology import dead_queue

    limit = 2
    env = {"REL_DELIVERY_LIMIT": str(limit)}
    settings = TopologySettings(delivery_limit=limit)
    harness.namespace.settings = settings
    async with harness.namespace.client(settings=settings) as client:
        good = await client.enqueue_many(
            rel_app.work, [{"n": i, "seconds": 0.05} for i in range(60)]
        )
        doomed = await client.enqueue(rel_app.crash, {"n": -1})
        good += await client.enqueue_many(
            rel_app.work, [{"n": i, "seconds": 0.05} for i in range(60, 120)]
        )
    for job_id in [*good, doomed]:
        harness.confirmed[job_id] = None
    dead = dead_queue(harness.namespace.name, "rel")
    # two crashes among other jobs, then up to limit + 1 alone from the quarantine queue
    for _ in range(2 * limit + 3):
        worker = start(harness, env=env)
        try:
            status = await exit_or_parked(worker, harness.namespace.url, dead)
        finally:
            worker.stop_now()
        if status is None:
            break
        assert status == 7, "the poison job ends the process"
    last = start(harness, env=env)
    try:
        await harness.wait_all(dead={doomed}, timeout=20)
    finally:
        await finish(last)
    report = await harness.report("os._exit on every attempt", dead={doomed})
    assert report.lost == 0
    assert report.dead == 1


async def test_retry_republish_to_a_vanished_exchange_loses_nothing(harness: Harness) -> None:
    """The delay level a retry needs is deleted under the worker: redeclared, not lost."""
    backoff_ms = round(rel_app.RETRY_BACKOFF * 1000)
    for sent_after_ms in (0, 20):  # the retry is routed a little after its ETA is set
        levels = route_levels(backoff_ms - sent_after_ms, harness.namespace.settings)
        assert levels == (0,), f"the retries must pass level 0 alone, not {levels}"
    worker = start(harness)
    try:
        # a first retry makes the worker declare (and cache) the cascade
        await harness.publish(rel_app.work, [{"n": 0, "fail_first": True}])
        await until_successes(harness, 1)
        async with channel(harness.namespace.url) as ch:
            await ch.exchange_delete(delay_exchange(harness.namespace.name, 0))
        await harness.publish(rel_app.work, [{"n": i, "fail_first": True} for i in range(1, 21)])
        await harness.wait_all()
    finally:
        await finish(worker)
    # the worker declared the level again (logging "declaring the topology again" when
    # its publish hit the missing exchange)
    async with channel(harness.namespace.url) as ch:
        await ch.get_exchange(delay_exchange(harness.namespace.name, 0), ensure=True)
    report = await harness.report("retry republish into a deleted exchange")
    assert report.lost == 0


async def test_blocked_thread_still_times_out_and_shuts_down(harness: Harness) -> None:
    """A sync handler sleeping past its timeout is retried on time; shutdown is not held."""
    worker = start(harness, "--grace", "1")
    try:
        [blocked] = await harness.publish(rel_app.block, [{"n": 1, "seconds": 5}])
        await until_successes(harness, 1)
        starts = [e for e in harness.events("start") if e["id"] == blocked]
        assert [e["attempt"] for e in starts] == [1, 2]
        assert starts[1]["t"] - starts[0]["t"] < 2.5, "retried at its 0.5 s timeout, not after 5 s"
        [stuck] = await harness.publish(rel_app.block_long, [{"n": 2, "seconds": 30}])
        await eventually(
            lambda: stuck in {e["id"] for e in harness.events("start")}, what="the long job"
        )
        loop = asyncio.get_running_loop()
        began = loop.time()
        worker.signal(signal.SIGTERM)
        assert await worker.wait(15) == 0
        assert loop.time() - began < 10, "shutdown waited --grace, not the blocked thread"
    finally:
        worker.stop_now()
    await eventually(
        lambda: _equals(
            queue_count(harness.namespace.url, work_queue(harness.namespace.name, "rel")), 1
        ),
        what="the unfinished job back in its queue",
    )


async def _equals(value: object, expected: int) -> bool:
    return (await value) == expected  # type: ignore[misc]


class Count(BaseModel):
    n: int


async def test_a_dead_letter_that_cannot_be_stored_is_not_acked(
    namespace: Namespace, caplog: pytest.LogCaptureFixture
) -> None:
    """The dead exchange is replaced under a running worker by one it cannot use: the
    job stays with the broker, and is parked once the exchange is repaired."""
    url, ns = namespace.url, namespace.name
    app = namespace.app()
    job = Job("t.doomed", Count, queue="dl", retry=RetryPolicy(max_attempts=1))

    @app.handler(job)
    async def fail(args: Count) -> None:
        raise ValueError("boom")

    worker = namespace.worker(app)
    task = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(worker.started(), 15)
        async with channel(url) as ch:  # same name, other type, nothing bound
            await ch.exchange_delete(dead_exchange(ns))
            await ch.declare_exchange(dead_exchange(ns), ExchangeType.FANOUT, durable=True)
        async with namespace.client(declare=False) as client:
            job_id = await client.enqueue(job, {"n": 1})
        await eventually(
            lambda: "could not store the dead letter" in caplog.text,
            what="a failed dead-letter publish",
        )
    finally:
        worker.stop()
        await asyncio.wait_for(task, 15)
    held = [work_queue(ns, "dl"), quarantine_queue(ns, "dl")]

    async def held_once() -> bool:
        return sum([await queue_count(url, name) for name in held]) == 1

    # not acked, not lost: back in its queue a moment after the worker's connection closed
    await eventually(held_once, timeout=10, what="the job back in its queue, once")
    assert await queue_count(url, dead_queue(ns, "dl")) == 0
    async with channel(url) as ch:  # repaired: the next worker declares it properly
        await ch.exchange_delete(dead_exchange(ns))
    await run_until_idle(namespace.worker(app))
    [parked] = await drain(url, dead_queue(ns, "dl"), 1)
    assert parked.message_id == job_id
    assert parked.headers["job-dead-reason"] == "exhausted"
