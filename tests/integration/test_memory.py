"""What only the in-memory broker offers: virtual time and assertion helpers.

The semantics it shares with RabbitMQ are proven by the rest of this suite, which runs
every test of library semantics against both.
"""

import asyncio
import itertools
from datetime import timedelta

import pytest
from pydantic import BaseModel

from amqp_jobs import (
    Job,
    JobApp,
    JobClient,
    JobContext,
    JobHooks,
    Namespace,
    Outcome,
    OutcomeKind,
    RetryPolicy,
)
from amqp_jobs.clock import VirtualClock
from amqp_jobs.testing import enqueued, memory_broker, run_until_idle
from amqp_jobs.topology import dead_queue
from tests.support import drain


class N(BaseModel):
    n: int


HOUR_MS = 3_600_000


async def test_an_hour_of_delay_and_eight_backoffs_drain_on_the_virtual_clock() -> None:
    broker = memory_broker("virtual", virtual_time=True)
    clock = broker.clock
    assert isinstance(clock, VirtualClock)
    start = clock.now_ms()
    app = JobApp(Namespace("v"))
    job = Job("t.slowly", N, queue="v", retry=RetryPolicy(max_attempts=9, backoff=60))
    runs: list[tuple[int, int]] = []

    @app.handler(job)
    async def flaky(args: N, ctx: JobContext) -> None:
        runs.append((ctx.attempt, clock.now_ms()))
        if ctx.attempt < 9:
            raise ConnectionError("not yet")

    async with JobClient("memory://virtual", namespace="v") as client:
        await client.enqueue(job, {"n": 1}, delay=timedelta(hours=1))
    # No wall-clock wait: the bound is the test's, the hours pass on the clock.
    stats = await run_until_idle(app.worker("memory://virtual"), advance_time=True, timeout=20)
    assert [attempt for attempt, _ in runs] == list(range(1, 10))
    first_at = runs[0][1]
    assert first_at >= start + HOUR_MS, "never early"
    assert first_at <= start + HOUR_MS + 1000
    gaps = [b - a for (_, a), (_, b) in itertools.pairwise(runs)]
    backoffs = [job.retry.delay_after(attempt) * 1000 for attempt in range(1, 9)]
    for gap, backoff in zip(gaps, backoffs, strict=True):
        assert gap >= backoff, (gaps, backoffs)  # each retry waited its backoff
    assert (stats.succeeded, stats.retried, stats.dead) == (1, 8, 0)


async def test_without_advancing_the_clock_a_delayed_job_waits() -> None:
    broker = memory_broker("frozen", virtual_time=True)
    app = JobApp("f")
    job = Job("t.later", N, queue="f")
    app.add_handler(job, lambda args: None)
    async with JobClient("memory://frozen", namespace="f") as client:
        await client.enqueue(job, {"n": 1}, delay=60)
    with pytest.raises(TimeoutError, match="1 messages pending"):
        await run_until_idle(app.worker("memory://frozen"), timeout=0.5)
    assert isinstance(broker.clock, VirtualClock)
    broker.clock.advance(61)
    stats = await run_until_idle(app.worker("memory://frozen"), timeout=5)
    assert stats.succeeded == 1


async def test_enqueued_tells_what_the_code_under_test_enqueued() -> None:
    broker = memory_broker("asserts", virtual_time=True)
    ping = Job("t.ping", N, queue="a")
    pong = Job("t.pong", N, queue="a")
    async with JobClient("memory://asserts", namespace="a") as client:
        ping_id = await client.enqueue(ping, {"n": 1}, headers={"origin": "test"})
        await client.enqueue(pong, {"n": 2}, delay=90)
    [first] = enqueued(broker, ping)
    assert (first.job_name, first.job_id, first.args, first.delay) == (
        "t.ping",
        ping_id,
        {"n": 1},
        None,
    )
    assert first.headers["origin"] == "test"
    [second] = enqueued("memory://asserts", "t.pong")
    assert second.args == {"n": 2}
    assert second.delay == pytest.approx(90, abs=0.01)
    assert [e.job_name for e in enqueued(broker)] == ["t.ping", "t.pong"]


async def test_retries_are_not_counted_as_enqueued() -> None:
    broker = memory_broker("copies", virtual_time=True)
    app = JobApp("c")
    job = Job("t.twice", N, queue="c", retry=RetryPolicy(max_attempts=2, backoff=1))

    @app.handler(job)
    async def fail(args: N, ctx: JobContext) -> None:
        raise ValueError("no")

    async with JobClient("memory://copies", namespace="c") as client:
        await client.enqueue(job, {"n": 1})
    await run_until_idle(app.worker("memory://copies"), advance_time=True)
    assert len(enqueued(broker, job)) == 1
    [dead] = await drain("memory://copies", dead_queue("c", "c"), 1)
    assert dead.headers["job-dead-reason"] == "exhausted"


async def test_raise_errors_reraises_what_the_handler_raised() -> None:
    memory_broker("errors")
    app = JobApp("e")
    job = Job("t.bug", N, queue="e", retry=RetryPolicy(max_attempts=1))

    @app.handler(job)
    def buggy(args: N) -> None:
        raise KeyError("the bug under test")

    async with JobClient("memory://errors", namespace="e") as client:
        await client.enqueue(job, {"n": 1})
    with pytest.raises(KeyError, match="the bug under test"):
        await run_until_idle(app.worker("memory://errors"), raise_errors=True)


async def test_one_broker_per_name_and_none_shared_between_names() -> None:
    memory_broker("left")
    memory_broker("right")
    job = Job("t.where", N, queue="w")
    async with JobClient("memory://left", namespace="w") as client:
        await client.enqueue(job, {"n": 1})
    assert [e.args for e in enqueued("memory://left")] == [{"n": 1}]
    assert enqueued("memory://right") == []


async def test_advance_time_needs_a_virtual_clock() -> None:
    memory_broker("wall")
    app = JobApp("w")
    app.add_handler(Job("t.any", N, queue="w"), lambda args: None)
    with pytest.raises(TypeError, match="virtual"):
        await run_until_idle(app.worker("memory://wall"), advance_time=True)


async def test_a_lost_connection_is_survived_in_memory_too() -> None:
    """The worker's reconnect loop, on the in-memory broker's connection drop: what it
    held goes back to the queue and runs once."""
    broker = memory_broker("drop")
    app = JobApp("d")
    job = Job("t.held", N, queue="d")
    gate = asyncio.Event()
    started = asyncio.Event()
    succeeded = asyncio.Event()
    runs: list[int] = []

    class Done(JobHooks):
        async def settled(self, ctx: JobContext, outcome: Outcome) -> None:
            if outcome.kind is OutcomeKind.SUCCEEDED:
                succeeded.set()

    app.hooks.append(Done())

    @app.handler(job)
    async def held(args: N, ctx: JobContext) -> None:
        runs.append(ctx.attempt)
        started.set()
        await gate.wait()

    async with JobClient("memory://drop", namespace="d") as client:
        await client.enqueue(job, {"n": 1})
    worker = app.worker("memory://drop", grace=1)
    task = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(started.wait(), 5)
        broker.drop_connections("test: network gone")
        gate.set()
        await asyncio.wait_for(succeeded.wait(), 10)
    finally:
        worker.stop()
        await asyncio.wait_for(task, 10)
    # the first run's ack was lost with the connection; the job ran again, once
    assert runs == [1, 1]
    assert worker.stats.connections == 2
    assert worker.stats.quarantined == 0, "a living worker vouches for what it held"
