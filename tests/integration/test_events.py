"""Lifecycle events: every transition of every job reaches the events stream, with its
key, result and error, confirmed before the delivery is acked."""

import asyncio
from typing import Any

import pytest
from pydantic import BaseModel

from amqp_jobs import Job, JobContext, RetryPolicy
from amqp_jobs.events import EventKind, JobEvent
from amqp_jobs.message import Message
from amqp_jobs.middleware import Middleware, Next, Publishing
from amqp_jobs.testing import Namespace, run_until_idle
from amqp_jobs.topology import events_stream, work_queue
from amqp_jobs.transport import transport_for
from amqp_jobs.transport.base import Delivery
from tests.support import running

WAIT = 20.0


class Account(BaseModel):
    user_id: int


class Total(BaseModel):
    total: int


async def read_events(namespace: Namespace, count: int) -> list[JobEvent]:
    """The first ``count`` events of the namespace's stream, read from its start."""
    transport = transport_for(namespace.url)
    session = await transport.session(name="events test", give_up_after=10)
    got: list[JobEvent] = []
    enough = asyncio.Event()

    async def on_delivery(delivery: Delivery) -> None:
        got.append(JobEvent.from_json(delivery.body))
        assert isinstance(delivery.headers.get("x-stream-offset"), int)
        await delivery.ack()
        if len(got) >= count:
            enough.set()

    try:
        channel = await session.channel(100)
        await channel.consume(
            events_stream(namespace.name), on_delivery, arguments={"x-stream-offset": "first"}
        )
        async with asyncio.timeout(WAIT):
            await enough.wait()
    finally:
        await session.close()
    return got


async def test_every_transition_is_an_event_with_key_result_and_error(
    namespace: Namespace,
) -> None:
    app = namespace.app()
    total = Job("t.ev.total", Account, queue="ev", key="user_id", result_model=Total)
    flaky = Job("t.ev.flaky", Account, queue="ev", key="user_id", retry=RetryPolicy(2, backoff=0))

    @app.handler(total)
    async def run_total(args: Account) -> Total:
        return Total(total=args.user_id * 2)

    @app.handler(flaky)
    async def run_flaky(args: Account, ctx: JobContext) -> None:
        raise ValueError(f"attempt {ctx.attempt} failed")

    async with namespace.client() as client:
        ok = await client.enqueue(total, {"user_id": 1042})
        bad = await client.enqueue(flaky, {"user_id": 1042})
    await run_until_idle(namespace.worker(app, events=True, started_after=0))
    events = await read_events(namespace, 6)
    by_job: dict[str, list[JobEvent]] = {}
    for event in events:
        by_job.setdefault(event.job_id, []).append(event)

    assert [e.event for e in by_job[ok]] == [EventKind.STARTED, EventKind.SUCCEEDED]
    done = by_job[ok][1]
    assert done.result == {"total": 2084}
    assert done.key == "1042" and done.queue == "ev" and done.job == "t.ev.total"
    assert done.routing_key == "succeeded.ev.t.ev.total"
    assert done.started_at is not None and done.duration_ms is not None
    assert done.worker and done.enqueued_at is not None

    kinds = [(e.event, e.attempt) for e in by_job[bad]]
    assert kinds == [
        (EventKind.STARTED, 1),
        (EventKind.RETRYING, 1),
        (EventKind.STARTED, 2),
        (EventKind.DEAD, 2),
    ]
    dead = by_job[bad][-1]
    assert dead.dead_reason == "exhausted" and dead.key == "1042"
    assert dead.error_type == "ValueError" and dead.error_message == "attempt 2 failed"
    assert dead.traceback and "attempt 2 failed" in dead.traceback
    orders = [e.order for e in by_job[bad]]
    assert orders == sorted(orders) and len(set(orders)) == 4


async def test_a_result_its_model_refuses_fails_the_attempt(namespace: Namespace) -> None:
    app = namespace.app()
    job = Job("t.ev.bad-result", Account, queue="ev", result_model=Total, retry=RetryPolicy(1))

    @app.handler(job)
    async def run(args: Account) -> dict[str, Any]:
        return {"total": "not a number"}

    async with namespace.client() as client:
        job_id = await client.enqueue(job, {"user_id": 1})
    await run_until_idle(namespace.worker(app, events=True, started_after=0))
    started, dead = await read_events(namespace, 2)
    assert (started.event, dead.event, dead.job_id) == (
        EventKind.STARTED,
        EventKind.DEAD,
        job_id,
    )
    assert dead.error_type == "amqp_jobs.errors.ResultError"
    assert dead.error_message is not None and "Total refuses" in dead.error_message


async def test_a_poison_message_is_recorded_dead_with_its_reason(namespace: Namespace) -> None:
    app = namespace.app()
    job = Job("t.ev.poison", Account, queue="ev")

    @app.handler(job)
    async def run(args: Account) -> None: ...

    async with namespace.client() as client:
        await client._link.declare_queue("ev", [job.name])
        await client._link.send_to_queue(
            work_queue(namespace.name, "ev"),
            Message(b"{not json", "application/json", "poison-1", job.name, None, {}),
        )
    await run_until_idle(namespace.worker(app, events=True, started_after=0))
    [dead] = await read_events(namespace, 1)
    assert (dead.event, dead.job_id, dead.dead_reason) == (
        EventKind.DEAD,
        "poison-1",
        "invalid-json",
    )


async def test_events_off_publish_nothing(namespace: Namespace) -> None:
    app = namespace.app()
    job = Job("t.ev.quiet", Account, queue="ev")
    ran = asyncio.Event()

    @app.handler(job)
    async def run(args: Account) -> None:
        ran.set()

    async with namespace.client() as client:
        await client.enqueue(job, {"user_id": 1})
        await run_until_idle(namespace.worker(app, events=False))
        assert ran.is_set()
        assert await client._link.depth(events_stream(namespace.name)) is None


async def test_only_an_attempt_still_running_after_started_after_says_started(
    namespace: Namespace,
) -> None:
    app = namespace.app()
    quick = Job("t.ev.quick", Account, queue="ev")
    slow = Job("t.ev.slow", Account, queue="ev")

    @app.handler(quick)
    async def run_quick(args: Account) -> None: ...

    @app.handler(slow)
    async def run_slow(args: Account) -> None:
        await asyncio.sleep(2.5)  # the job's own duration, five times started_after

    async with namespace.client() as client:
        fast_id = await client.enqueue(quick, {"user_id": 1})
        slow_id = await client.enqueue(slow, {"user_id": 2})
    # 0.5 s: a quick job starved that long on a busy machine would publish STARTED too
    await run_until_idle(namespace.worker(app, events=True, started_after=0.5))
    events = await read_events(namespace, 3)
    kinds = {(e.job_id, e.event) for e in events}
    assert kinds == {
        (fast_id, EventKind.SUCCEEDED),
        (slow_id, EventKind.STARTED),
        (slow_id, EventKind.SUCCEEDED),
    }
    quick_end = next(e for e in events if e.job_id == fast_id)
    # the end of a quick attempt carries its start: the log misses nothing of it
    assert quick_end.started_at is not None and quick_end.worker
    started = next(e for e in events if e.event is EventKind.STARTED)
    slow_end = next(e for e in events if e.job_id == slow_id and e.is_terminal)
    assert started.at == slow_end.started_at  # when it started, published later


class Stamp(Middleware):
    """A publish middleware: ticks then pass through ``publish_envelope``."""

    async def publish(self, publishing: Publishing, call_next: Next) -> Any:
        publishing.headers["stamped"] = True
        return await call_next()


@pytest.mark.parametrize("middleware", [False, True], ids=["plain", "with-middleware"])
async def test_a_scheduled_tick_is_enqueued_in_the_events_like_any_job(
    namespace: Namespace, middleware: bool
) -> None:
    """The scheduler publishes each tick's ``enqueued`` event in the transaction that
    enqueues the tick, with the job's key (also through publish middleware): the job
    log shows a periodic job from its enqueue on, as one a client enqueued."""
    app = namespace.app(middleware=[Stamp()] if middleware else [])
    tick = Job("t.ev.tick", Account, queue="ev", key="user_id")
    app.schedule(tick, {"user_id": 7}, every=1, name="ev-tick")
    ran: asyncio.Queue[tuple[str, str | None]] = asyncio.Queue()

    @app.handler(tick)
    async def run_tick(args: Account, ctx: JobContext) -> None:
        ran.put_nowait((ctx.job_id, ctx.headers.get("job-key")))

    async with running(namespace.worker(app, events=True, started_after=0)):
        tick_id, key_header = await asyncio.wait_for(ran.get(), WAIT)
    assert key_header == "7", "the tick carries the job-key header a client would set"
    events: list[JobEvent] = []
    for count in range(3, 30):  # until the tick's end is among them
        events = [e for e in await read_events(namespace, count) if e.job_id == tick_id]
        if any(e.event is EventKind.SUCCEEDED for e in events):
            break
    kinds = [e.event for e in events]
    assert kinds.count(EventKind.ENQUEUED) == 1, kinds
    assert EventKind.SUCCEEDED in kinds, kinds
    (enqueued,) = [e for e in events if e.event is EventKind.ENQUEUED]
    assert enqueued.key == "7" and enqueued.queue == "ev" and enqueued.job == tick.name
    assert enqueued.enqueued_at is not None
