"""A resource alarm on a private node: publishing is bounded, a retry is kept, not re-run.

During a memory alarm RabbitMQ stops reading the socket of every connection that
publishes. Before the fix, ``enqueue`` of a job the client had not declared yet waited
for the whole alarm (declarations had no deadline), and the worker released a job whose
retry copy it could not store, so the job ran again and again while the alarm lasted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator

import pytest
from pydantic import BaseModel

from amqp_jobs import Job, JobContext, PublishTimeoutError, RetryPolicy
from amqp_jobs.testing import Namespace
from amqp_jobs.topology import due_queue
from tests.reliability.nodes import PrivateNode
from tests.support import eventually, queue_count

pytestmark = pytest.mark.timeout(180)

#: confirm_timeout and retry_for of the publisher under test: the documented bound.
BOUND = 3.0
#: What the bound may be overrun by: the confirm watchdog's wake-up and scheduling.
SLACK = 1.5


class N(BaseModel):
    n: int


@pytest.fixture
def node(private_broker: PrivateNode) -> Iterator[PrivateNode]:
    return private_broker


def raise_alarm(node: PrivateNode) -> None:
    node.ctl("set_vm_memory_high_watermark", "0.000001")


def clear_alarm(node: PrivateNode) -> None:
    node.ctl("set_vm_memory_high_watermark", "0.4")


def alarm_on(node: PrivateNode) -> bool:
    return "memory" in node.ctl("eval", "rabbit_alarm:get_alarms().").stdout


async def in_thread(call: object, *args: object) -> object:
    return await asyncio.get_running_loop().run_in_executor(None, call, *args)  # type: ignore[arg-type]


async def test_enqueue_is_bounded_during_a_memory_alarm(node: PrivateNode, ns: Namespace) -> None:
    declared = Job("alarm.declared", N, queue="a")
    fresh = Job("alarm.fresh", N, queue="b")
    async with ns.client(retry_for=BOUND, confirm_timeout=BOUND) as client:
        await client.enqueue(declared, {"n": 0})  # declared before the alarm
        await in_thread(raise_alarm, node)
        try:
            await eventually(lambda: in_thread(alarm_on, node), timeout=30, what="the alarm")
            for job in (declared, fresh):
                began = time.monotonic()
                with pytest.raises(PublishTimeoutError, match="alarm"):
                    await client.enqueue(job, {"n": 1})
                took = time.monotonic() - began
                assert took < BOUND + SLACK, f"{job.name}: {took:.1f}s"
            # a new client, whose first act is to declare, is bounded the same way
            async with ns.client(retry_for=BOUND, confirm_timeout=BOUND) as other:
                began = time.monotonic()
                with pytest.raises(PublishTimeoutError):
                    await other.enqueue(Job("alarm.other", N, queue="c"), {"n": 2})
                assert time.monotonic() - began < BOUND + SLACK
        finally:
            await in_thread(clear_alarm, node)
    async with ns.client() as client:
        await client.enqueue(declared, {"n": 3})  # and publishing works again afterwards


async def test_a_retry_that_cannot_be_stored_is_kept_not_run_again(
    node: PrivateNode, ns: Namespace, caplog: pytest.LogCaptureFixture
) -> None:
    app = ns.app()
    job = Job("alarm.flaky", N, queue="w", retry=RetryPolicy(max_attempts=3, backoff=0))
    attempts: list[int] = []
    fail_now = asyncio.Event()

    @app.handler(job)
    async def flaky(args: N, ctx: JobContext) -> None:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            await fail_now.wait()
            raise ConnectionError("the first attempt fails, during the alarm")

    def kept() -> bool:
        return any("keeping the job" in r.message for r in caplog.records)

    worker = ns.worker(app)
    caplog.set_level(logging.WARNING, logger="amqp_jobs.settle")
    task = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(worker.started(), 30)
        async with ns.client() as client:
            await client.enqueue(job, {"n": 1})
        await eventually(lambda: attempts == [1], timeout=20, what="the first attempt")
        await in_thread(raise_alarm, node)
        await eventually(lambda: in_thread(alarm_on, node), timeout=30, what="the alarm")
        fail_now.set()  # the retry copy is published now, into the alarm
        await eventually(kept, timeout=30, what="the worker to report the wait")
        assert attempts == [1], "the job ran again while its retry could not be stored"
        await in_thread(clear_alarm, node)
        await eventually(lambda: attempts == [1, 2], timeout=60, what="the retry after the alarm")
        assert await queue_count(ns.url, due_queue(ns.name, "w")) == 0
        assert attempts == [1, 2], "one copy of the retry, stored once"
    finally:
        await in_thread(clear_alarm, node)
        worker.stop()
        await asyncio.wait_for(task, 30)
    assert worker.stats.quarantined == 0
