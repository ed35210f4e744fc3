"""Faults a worker meets while it runs: nothing makes it deaf, nothing makes it spin.

Each test here failed before its fix (issue 9): a deleted queue left the worker consuming
nothing, an unprintable exception looped hot until the delivery limit dropped its error,
and a living worker's own returns spent delivery counts until it quarantined its jobs.
"""

import asyncio
import logging
import time
from typing import Any

import pytest
from pydantic import BaseModel

from amqp_jobs import Job, JobContext, RetryPolicy
from amqp_jobs.message import H_ERROR_MESSAGE, H_ERROR_TYPE
from amqp_jobs.settle import Release
from amqp_jobs.testing import Namespace
from amqp_jobs.topology import dead_queue, quarantine_queue, work_queue
from amqp_jobs.transport import Delivery, transport_for
from tests.support import Admin, drain, eventually, queue_count


class N(BaseModel):
    n: int


async def test_a_deleted_queue_is_declared_again_and_consumed(namespace: Namespace) -> None:
    app = namespace.app()
    job = Job("t.count", N, queue="del")
    ran: set[int] = set()

    @app.handler(job)
    async def count(args: N) -> None:
        ran.add(args.n)

    worker = namespace.worker(app)
    task = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(worker.started(), 15)
        await Admin(namespace.url).delete_queue(work_queue(namespace.name, "del"))
        # The client re-declares the queue it finds gone; jobs confirmed into it must run.
        async with namespace.client() as client:
            await client.enqueue_many(job, [{"n": i} for i in range(100)])
        await eventually(lambda: len(ran) == 100, timeout=30, what="100 jobs run after delete")
        assert await queue_count(namespace.url, work_queue(namespace.name, "del")) == 0
    finally:
        worker.stop()
        await asyncio.wait_for(task, 15)


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text for you")


async def test_an_exception_whose_str_raises_is_retried_and_parked_with_its_type(
    namespace: Namespace,
) -> None:
    app = namespace.app()
    job = Job("t.unprintable", N, queue="unp", retry=RetryPolicy(max_attempts=2, backoff=0))
    attempts: list[int] = []

    @app.handler(job)
    async def fail(args: N, ctx: JobContext) -> None:
        attempts.append(ctx.attempt)
        raise Unprintable()

    async with namespace.client() as client:
        await client.enqueue(job, {"n": 1})
    worker = namespace.worker(app)
    task = asyncio.create_task(worker.run())
    try:
        [dead] = await drain(namespace.url, dead_queue(namespace.name, "unp"), 1, timeout=20)
    finally:
        worker.stop()
        await asyncio.wait_for(task, 15)
    assert attempts == [1, 2]
    assert worker.stats.quarantined == 0
    assert dead.headers[H_ERROR_TYPE].endswith("Unprintable")
    assert "unprintable" in str(dead.headers[H_ERROR_MESSAGE]).lower()


async def test_an_unexpected_processing_error_pauses_before_each_return(
    namespace: Namespace, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever breaks inside the worker, a delivery is never returned in a hot loop."""
    app = namespace.app()
    job = Job("t.fine", N, queue="trouble")

    @app.handler(job)
    async def fine(args: N) -> None:
        pass

    import amqp_jobs.worker as worker_module

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug in the worker")

    monkeypatch.setattr(worker_module, "_decode_args", broken)
    async with namespace.client() as client:
        await client.enqueue(job, {"n": 1})
    worker = namespace.worker(app)
    caplog.set_level(logging.ERROR, logger="amqp_jobs.worker")

    def troubles() -> list[float]:
        return [r.created for r in caplog.records if "unexpected error processing" in r.message]

    task = asyncio.create_task(worker.run())
    try:
        await eventually(lambda: len(troubles()) >= 3, timeout=20, what="three returns")
    finally:
        worker.stop()
        await asyncio.wait_for(task, 15)
    first, second, third = troubles()[:3]
    assert second - first >= 0.9, "the first return waited a second"
    assert third - second >= 1.9, "the pause grows for the same job"
    assert worker.stats.quarantined == 0, "our own returns spend no delivery count"
    assert await queue_count(namespace.url, quarantine_queue(namespace.name, "trouble")) == 0


async def test_jobs_cut_off_by_a_stop_do_not_spend_the_delivery_count(
    namespace: Namespace,
) -> None:
    """A graceful stop returns the jobs that outlive its grace period; however many stops
    in a row, none of them is taken for a job that kills workers."""
    app = namespace.app()
    job = Job("t.held", N, queue="held")
    gate = asyncio.Event()
    running: set[int] = set()
    done: set[int] = set()

    @app.handler(job)
    async def held(args: N) -> None:
        running.add(args.n)
        try:
            await gate.wait()
        finally:
            running.discard(args.n)
        done.add(args.n)

    async with namespace.client() as client:
        await client.enqueue_many(job, [{"n": 1}, {"n": 2}])
    for _ in range(3):
        worker = namespace.worker(app, concurrency=2, grace=0.1)
        task = asyncio.create_task(worker.run())
        await eventually(lambda: running == {1, 2}, timeout=15, what="both jobs running")
        worker.stop()
        await asyncio.wait_for(task, 15)
        assert worker.stats.quarantined == 0
    gate.set()
    worker = namespace.worker(app, concurrency=2)
    task = asyncio.create_task(worker.run())
    try:
        await eventually(lambda: done == {1, 2}, timeout=15, what="both jobs done")
    finally:
        worker.stop()
        await asyncio.wait_for(task, 15)
    assert worker.stats.quarantined == 0
    assert await queue_count(namespace.url, quarantine_queue(namespace.name, "held")) == 0


async def test_jobs_without_a_timeout_stop_before_the_consumer_timeout(
    namespace: Namespace,
) -> None:
    """The worker knows consumer_timeout: a job never runs into it (the broker would take
    it back and close the channel under every other job)."""
    app = namespace.app()
    job = Job("t.endless", N, queue="endless", retry=RetryPolicy(max_attempts=1), timeout=None)
    started = time.monotonic()

    @app.handler(job)
    async def endless(args: N) -> None:
        await asyncio.sleep(3600)

    async with namespace.client() as client:
        await client.enqueue(job, {"n": 1})
    worker = namespace.worker(app, consumer_timeout=3.0)
    task = asyncio.create_task(worker.run())
    try:
        [dead] = await drain(namespace.url, dead_queue(namespace.name, "endless"), 1, timeout=20)
    finally:
        worker.stop()
        await asyncio.wait_for(task, 15)
    assert time.monotonic() - started < 15
    assert "consumer_timeout" in str(dead.headers[H_ERROR_MESSAGE])
    assert dead.headers[H_ERROR_TYPE].endswith("JobTimeoutError")


@pytest.mark.rabbitmq_only  # the in-memory broker is always there
async def test_stop_while_the_broker_cannot_be_reached_returns_at_once(
    namespace: Namespace,
) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket is closed
    app = namespace.app()
    app.add_handler(Job("t.never", N, queue="never"), lambda args: None)
    worker = app.worker(f"amqp://guest:guest@127.0.0.1:{port}/", connect_timeout=30)
    task = asyncio.create_task(worker.run())
    await asyncio.sleep(0)  # it starts connecting
    worker.stop()
    await asyncio.wait_for(task, 5)  # not connect_timeout: a stop ends the attempts


async def test_a_job_given_back_by_nack_does_not_spend_the_delivery_count(
    namespace: Namespace, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A living worker gives a delivery back by storing a copy; when no copy can be
    stored (a queue's leader moving in a cluster) it nacks, and the broker counts that.
    Those counts were no death: the job is never quarantined. And a job whose count
    cannot be reset runs as it is, rather than go round the broker until its delivery
    limit dead-letters it. (A rolling restart of a cluster quarantined a whole prefetch
    window this way.)"""
    app = namespace.app()
    job = Job("t.nacked", N, queue="nacked")
    ran: list[int] = []

    @app.handler(job)
    async def run(args: N) -> None:
        ran.append(args.n)

    import amqp_jobs.settle as settle_module
    import amqp_jobs.worker as worker_module
    from amqp_jobs.errors import PublishRefusedError

    real_decode = worker_module._decode_args
    decoded = 0

    def broken_twice(*args: Any, **kwargs: Any) -> Any:
        nonlocal decoded
        decoded += 1
        if decoded <= 2:  # enough to quarantine the job, were the nacks counted
            raise RuntimeError("a bug in the worker")
        return real_decode(*args, **kwargs)

    def nacks() -> int:
        return sum("returning it by nack" in r.message for r in caplog.records)

    monkeypatch.setattr(worker_module, "_decode_args", broken_twice)
    monkeypatch.setattr(settle_module, "RELEASE_RETRY_FOR", 0.3)
    caplog.set_level(logging.WARNING, logger="amqp_jobs.settle")
    async with namespace.client() as client:
        await client.enqueue(job, {"n": 1})
    worker = namespace.worker(app)

    async def refused(queue_name: str, message: Any) -> None:
        raise PublishRefusedError(f"{queue_name}: refused (injected)")

    monkeypatch.setattr(worker.link, "send_to_queue", refused)
    task = asyncio.create_task(worker.run())
    try:
        await eventually(lambda: ran == [1], timeout=30, what="the job run once")
    finally:
        worker.stop()
        await asyncio.wait_for(task, 15)
    assert nacks() >= 4  # two resets that failed among them
    assert worker.stats.quarantined == 0, "our own nacks spend no delivery count"
    assert await queue_count(namespace.url, quarantine_queue(namespace.name, "nacked")) == 0


async def test_a_job_given_back_as_a_copy_is_not_vouched_for(namespace: Namespace) -> None:
    """Only a delivery that went back counted (nacked, or its channel lost) is vouched
    for. One given back as a copy starts its count again; a vouch left for its id would
    forgive the count of a later copy that did kill workers."""
    app = namespace.app()
    job = Job("t.copied", N, queue="copied")

    @app.handler(job)
    async def run(args: N) -> None:
        pass

    async with namespace.client() as client:
        await client.enqueue(job, {"n": 1})
    worker = namespace.worker(app)
    session = await transport_for(namespace.url).session(name="test", give_up_after=10)
    try:
        channel = await session.channel(1)
        queue = work_queue(namespace.name, "copied")

        got: list[Delivery] = []

        async def taken() -> bool:
            delivery = await channel.get(queue)
            if delivery is not None:
                got.append(delivery)
            return bool(got)

        async def copy_ready() -> bool:
            return await queue_count(namespace.url, queue) == 1

        await eventually(taken, timeout=10, what="the job")
        assert not await worker._settle(got[0], Release(), "copied")
        assert got[0].message_id not in worker._vouched
        assert not worker._not_reset
        await eventually(copy_ready, timeout=10, what="its copy in the queue")
    finally:
        await session.close()
        await worker.link.close()
