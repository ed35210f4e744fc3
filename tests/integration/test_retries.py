"""Retries through the delay cascade; dead letters with the error when they run out."""

import asyncio
import itertools
import time

import pytest
from pydantic import BaseModel

from amqp_jobs import (
    Discard,
    Job,
    JobContext,
    JobHooks,
    JobTimeoutError,
    Outcome,
    OutcomeKind,
    Retry,
    RetryPolicy,
)
from amqp_jobs.testing import Namespace, run_until_idle
from amqp_jobs.topology import dead_queue
from tests.support import drain


class N(BaseModel):
    n: int


async def test_flaky_job_retries_with_backoff_and_keeps_its_id(namespace: Namespace) -> None:
    app = namespace.app()
    job = Job("t.flaky", N, queue="r", retry=RetryPolicy(max_attempts=5, backoff=0.3))
    runs: list[tuple[str, int, float]] = []

    @app.handler(job)
    async def flaky(args: N, ctx: JobContext) -> None:
        runs.append((ctx.job_id, ctx.attempt, time.monotonic()))
        if ctx.attempt < 3:
            raise ConnectionError(f"attempt {ctx.attempt}")

    async with namespace.client() as client:
        job_id = await client.enqueue(job, {"n": 1})
    stats = await run_until_idle(namespace.worker(app))
    assert [(r[0], r[1]) for r in runs] == [(job_id, 1), (job_id, 2), (job_id, 3)]
    gaps = [b[2] - a[2] for a, b in itertools.pairwise(runs)]
    assert all(gap >= 0.3 for gap in gaps), gaps
    assert (stats.succeeded, stats.retried, stats.dead) == (1, 2, 0)


async def test_exhausted_job_is_parked_with_its_error(namespace: Namespace) -> None:
    app = namespace.app()
    job = Job("t.doomed", N, queue="r", retry=RetryPolicy(max_attempts=3, backoff=0))

    @app.handler(job)
    def doomed(args: N) -> None:
        raise ValueError(f"cannot handle {args.n}")

    async with namespace.client() as client:
        job_id = await client.enqueue(job, {"n": 42})
    stats = await run_until_idle(namespace.worker(app))
    assert (stats.retried, stats.dead) == (2, 1)
    [dead] = await drain(namespace.url, dead_queue(namespace.name, "r"), 1)
    h = dead.headers
    assert dead.message_id == job_id
    assert dead.type == "t.doomed"
    assert dead.body == b'{"n":42}'
    assert h["job-attempt"] == 3
    assert h["job-dead-reason"] == "exhausted"
    assert h["job-error-type"] == "ValueError"
    assert h["job-error-message"] == "cannot handle 42"
    traceback, failed_at = h["job-error-traceback"], h["job-failed-at"]
    assert isinstance(traceback, str) and "in doomed" in traceback
    assert isinstance(failed_at, int) and abs(failed_at / 1000 - time.time()) < 60
    assert h["job-queue"] == "r"
    # x-death is never carried over (x-delivery-count is the dead queue's own, on delivery)
    assert not any(k.startswith(("x-death", "x-first-death", "x-last-death")) for k in h)


async def test_handler_can_ask_for_retry_delay_and_discard(namespace: Namespace) -> None:
    app = namespace.app()
    again = Job("t.again", N, queue="r", retry=RetryPolicy(max_attempts=3, backoff=3600))
    drop = Job("t.drop", N, queue="r")
    times: list[float] = []

    @app.handler(again)
    async def run_again(args: N, ctx: JobContext) -> None:
        times.append(time.monotonic())
        if ctx.attempt == 1:
            raise Retry(delay=0.4)  # overrides the policy's hour

    @app.handler(drop)
    async def run_drop(args: N) -> None:
        raise Discard("customer deleted")

    async with namespace.client() as client:
        await client.enqueue(again, {"n": 1})
        await client.enqueue(drop, {"n": 2})
    stats = await run_until_idle(namespace.worker(app))
    assert len(times) == 2
    assert times[1] - times[0] >= 0.4
    assert stats.succeeded == 1
    assert stats.dead == 1
    [dead] = await drain(namespace.url, dead_queue(namespace.name, "r"), 1)
    assert dead.headers["job-dead-reason"] == "discarded"
    assert dead.headers["job-error-message"] == "customer deleted"
    assert dead.headers["job-attempt"] == 1


async def test_exception_filters(namespace: Namespace) -> None:
    app = namespace.app()
    policy = RetryPolicy(
        max_attempts=5, backoff=0, retry_on=(ConnectionError,), give_up_on=(ConnectionRefusedError,)
    )
    refused = Job("t.refused", N, queue="r", retry=policy)
    other = Job("t.other", N, queue="r", retry=policy)
    calls = {"refused": 0, "other": 0}

    @app.handler(refused)
    async def run_refused(args: N) -> None:
        calls["refused"] += 1
        raise ConnectionRefusedError("go away")

    @app.handler(other)
    async def run_other(args: N) -> None:
        calls["other"] += 1
        raise KeyError("not retried")

    async with namespace.client() as client:
        await client.enqueue(refused, {"n": 1})
        await client.enqueue(other, {"n": 2})
    await run_until_idle(namespace.worker(app))
    assert calls == {"refused": 1, "other": 1}
    dead = await drain(namespace.url, dead_queue(namespace.name, "r"), 2)
    assert {d.headers["job-dead-reason"] for d in dead} == {"not-retryable"}


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_timeout_is_a_retryable_failure(namespace: Namespace, kind: str) -> None:
    outcomes: dict[int, Outcome] = {}

    class Record(JobHooks):
        async def settled(self, ctx: JobContext, outcome: Outcome) -> None:
            outcomes[ctx.attempt] = outcome

    app = namespace.app(hooks=[Record()])
    job = Job("t.slow", N, queue="r", timeout=0.3, retry=RetryPolicy(max_attempts=2, backoff=0))
    attempts: list[int] = []

    if kind == "async":

        @app.handler(job)
        async def slow(args: N, ctx: JobContext) -> None:
            attempts.append(ctx.attempt)
            if ctx.attempt == 1:
                await asyncio.sleep(30)

    else:

        @app.handler(job)
        def slow_sync(args: N, ctx: JobContext) -> None:
            attempts.append(ctx.attempt)
            if ctx.attempt == 1:
                time.sleep(1.0)  # a thread cannot be interrupted; the job is retried anyway

    async with namespace.client() as client:
        await client.enqueue(job, {"n": 1})
    stats = await run_until_idle(namespace.worker(app))
    assert attempts == [1, 2]
    assert (stats.retried, stats.succeeded) == (1, 1)
    # the first attempt was retried because it timed out, and says so in its error
    first = outcomes[1]
    assert first.kind == OutcomeKind.RETRYING
    assert first.error is not None
    assert first.error.type == f"{JobTimeoutError.__module__}.{JobTimeoutError.__qualname__}"
    assert outcomes[2].kind == OutcomeKind.SUCCEEDED
