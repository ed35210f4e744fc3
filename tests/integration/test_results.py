"""Awaiting a job's outcome: pushed to the client that enqueued it (across retries),
its failure raised with the error, unknown ids never "pending", timeouts kept; and the
on_success / on_dead hooks."""

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from pydantic import BaseModel

from amqp_jobs import Job, JobApp, JobContext, RetryPolicy, SyncJobClient
from amqp_jobs.errors import JobFailedError, UnknownJobError
from amqp_jobs.middleware import Middleware, Next, Publishing
from amqp_jobs.outcome import Outcome
from amqp_jobs.testing import Namespace
from amqp_jobs.worker import Worker

WAIT = 20.0


class Numbers(BaseModel):
    a: int
    b: int


class Sum(BaseModel):
    total: int


@asynccontextmanager
async def running(worker: Worker) -> AsyncIterator[Worker]:
    task = asyncio.create_task(worker.run())
    try:
        async with asyncio.timeout(WAIT):
            await worker.started()
        yield worker
    finally:
        worker.stop()
        async with asyncio.timeout(WAIT):
            await task


def adder(
    namespace: Namespace, app: JobApp | None = None, **handler: Any
) -> tuple[JobApp, Job[Numbers]]:
    app = app or namespace.app()
    job = Job("t.res.add", Numbers, queue="res", result_model=Sum, retry=RetryPolicy(3, backoff=0))

    @app.handler(job, **handler)
    async def add(args: Numbers, ctx: JobContext) -> Sum:
        if args.a < 0 and ctx.attempt < 2:
            raise ValueError("negative: try again")
        if args.b < 0:
            raise ArithmeticError(f"cannot add {args.b}")
        return Sum(total=args.a + args.b)

    return app, job


async def test_enqueue_and_wait_returns_the_result_model(namespace: Namespace) -> None:
    app, job = adder(namespace)
    async with running(namespace.worker(app)), namespace.client() as client:
        got = await client.enqueue_and_wait(job, {"a": 2, "b": 3}, timeout=WAIT)
        assert got == Sum(total=5)
        # the reply queue survives retries: the header travels with every copy
        retried = await client.enqueue_and_wait(job, {"a": -1, "b": 3}, timeout=WAIT)
        assert retried == Sum(total=2)
        # many at once, each to its own caller
        ids = [await client.enqueue(job, {"a": i, "b": i}, reply=True) for i in range(20)]
        results = await asyncio.gather(*(client.result(i, timeout=WAIT, job=job) for i in ids))
        assert [r.total for r in results] == [2 * i for i in range(20)]
        # heard already: asked again, answered at once
        assert await client.result(ids[0], timeout=0.001) == {"total": 0}


async def test_an_awaited_job_passes_a_header_adding_middleware(namespace: Namespace) -> None:
    """enqueue_and_wait puts the reply queue in the job-reply-to header; a publish
    middleware that adds a header of its own (as tracing adds traceparent) must not
    make the enqueue fail over it."""

    class Stamp(Middleware):
        async def publish(self, publishing: Publishing, call_next: Next) -> Any:
            publishing.headers["tenant"] = "acme"
            return await call_next()

    app, job = adder(namespace)
    async with (
        running(namespace.worker(app)),
        namespace.client(middleware=[Stamp()]) as client,
    ):
        assert await client.enqueue_and_wait(job, {"a": 2, "b": 2}, timeout=WAIT) == Sum(total=4)


async def test_a_dead_job_raises_its_error(namespace: Namespace) -> None:
    app, job = adder(namespace)
    async with running(namespace.worker(app)), namespace.client() as client:
        with pytest.raises(JobFailedError) as failed:
            await client.enqueue_and_wait(job, {"a": 1, "b": -5}, timeout=WAIT)
    error = failed.value
    assert error.state == "dead" and error.dead_reason == "exhausted"
    assert error.error_type == "ArithmeticError" and error.error_message == "cannot add -5"
    assert error.traceback is not None and "cannot add -5" in error.traceback


async def test_no_outcome_in_time_is_a_timeout_never_a_hang(namespace: Namespace) -> None:
    _, job = adder(namespace)
    async with namespace.client() as client:  # no worker runs
        job_id = await client.enqueue(job, {"a": 1, "b": 1}, reply=True)
        began = time.monotonic()
        with pytest.raises(TimeoutError):
            await client.result(job_id, timeout=0.3)
        assert time.monotonic() - began < 2.0
        with pytest.raises(TimeoutError):
            await client.enqueue_and_wait(job, {"a": 1, "b": 1}, timeout=0.3)


async def test_an_id_nobody_knows_is_unknown(namespace: Namespace) -> None:
    async with namespace.client() as client:
        with pytest.raises(UnknownJobError, match="not enqueued by this client"):
            await client.result("no-such-job", timeout=5)


async def test_the_final_outcome_hooks(namespace: Namespace) -> None:
    heard: list[tuple[str, str, str]] = []
    done = asyncio.Event()

    def note(which: str) -> Any:
        async def hook(outcome: Outcome, ctx: JobContext | None) -> None:
            heard.append((which, outcome.kind, outcome.job_id))
            if len(heard) == 4:
                done.set()

        return hook

    app = namespace.app(on_success=note("app ok"), on_dead=note("app dead"))
    app, job = adder(namespace, app, on_success=note("job ok"), on_dead=note("job dead"))
    worker = namespace.worker(app)
    async with running(worker), namespace.client() as client:
        ok_id = await client.enqueue(job, {"a": 1, "b": 1}, reply=True)
        assert await client.result(ok_id, timeout=WAIT) == {"total": 2}
        with pytest.raises(JobFailedError) as failed:
            await client.enqueue_and_wait(job, {"a": 1, "b": -1}, timeout=WAIT)
        async with asyncio.timeout(WAIT):
            await done.wait()
    dead_id = failed.value.job_id
    assert heard == [
        ("job ok", "succeeded", ok_id),
        ("app ok", "succeeded", ok_id),
        ("job dead", "dead", dead_id),
        ("app dead", "dead", dead_id),
    ]


@pytest.mark.rabbitmq_only  # a memory broker serves one event loop; this client runs its own
async def test_the_sync_client_waits_too(namespace: Namespace) -> None:
    app, job = adder(namespace)
    client = SyncJobClient(namespace.url, namespace=namespace.name, settings=namespace.settings)
    try:
        async with running(namespace.worker(app)):
            got = await asyncio.to_thread(
                client.enqueue_and_wait, job, {"a": 20, "b": 22}, timeout=WAIT
            )
            assert got == Sum(total=42)
            with pytest.raises(JobFailedError, match="cannot add -1"):
                await asyncio.to_thread(
                    client.enqueue_and_wait, job, {"a": 1, "b": -1}, timeout=WAIT
                )
        with pytest.raises(TimeoutError):  # no worker now
            await asyncio.to_thread(client.enqueue_and_wait, job, {"a": 1, "b": 1}, timeout=0.3)
    finally:
        await asyncio.to_thread(client.close)
