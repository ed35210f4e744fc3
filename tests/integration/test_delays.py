"""Delayed jobs: broker-side, never early, late by little."""

import asyncio
import time
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import BaseModel

from amqp_jobs import Job, JobContext, TopologySettings
from amqp_jobs.message import Message, now_ms
from amqp_jobs.testing import CASCADE_SETTLE, Namespace, run_until_idle
from amqp_jobs.topology import delay_queue, due_queue, jobs_exchange, work_queue
from amqp_jobs.transport import transport_for
from tests.support import _link, eventually, put, queue_count, running


class N(BaseModel):
    n: int


def timed_app(
    namespace: Namespace, queue: str = "d"
) -> tuple[Job[N], list[tuple[int, float, int | None]]]:
    app = namespace.app()
    job = Job("t.timed", N, queue=queue)
    started: list[tuple[int, float, int | None]] = []

    @app.handler(job)
    async def timed(args: N, ctx: JobContext) -> None:
        eta = None if ctx.eta is None else round(ctx.eta.timestamp() * 1000)
        started.append((args.n, time.time() * 1000, eta))

    timed_app.app = app  # type: ignore[attr-defined]
    return job, started


async def test_delayed_jobs_never_run_early(namespace: Namespace) -> None:
    job, started = timed_app(namespace)
    delays = [0.05, 0.3, 0.9, 1.5, 2.2, 3.1]
    # the worker first: a job due before it started would be late by its start-up
    async with running(namespace.worker(timed_app.app)) as worker:  # type: ignore[attr-defined]
        async with namespace.client() as client:
            for i, d in enumerate(delays):
                await client.enqueue(job, {"n": i}, delay=timedelta(seconds=d))
        await eventually(lambda: len(started) == len(delays), timeout=30, what="every job")
    assert worker.stats.succeeded == len(delays)
    lateness = sorted(at - eta for _, at, eta in started if eta is not None)
    assert len(lateness) == len(delays)
    assert lateness[0] >= 0, f"a job ran {-lateness[0]:.1f} ms early"
    assert lateness[-1] < 1000, f"lateness {lateness}"


async def test_run_at_in_the_past_runs_now_and_future_waits(namespace: Namespace) -> None:
    job, started = timed_app(namespace)
    async with namespace.client() as client:
        await client.enqueue(job, {"n": 1}, run_at=datetime.now(UTC) - timedelta(days=3))
        await client.enqueue(job, {"n": 2}, run_at=datetime.now(UTC) + timedelta(seconds=1))
    assert await queue_count(namespace.url, work_queue(namespace.name, "d")) == 1
    await run_until_idle(namespace.worker(timed_app.app))  # type: ignore[attr-defined]
    assert [n for n, _, _ in started] == [1, 2]
    assert started[1][1] >= started[1][2]  # type: ignore[operator]


async def test_delay_is_held_by_the_broker_before_any_worker_exists(namespace: Namespace) -> None:
    """The publisher declares the cascade; the job waits in a delay level, not a worker."""
    job, started = timed_app(namespace)
    async with namespace.client() as client:
        await client.enqueue(job, {"n": 1}, delay=timedelta(seconds=6))

    # Declaring the cascade takes time on a busy machine, and the route is computed after
    # it: the job enters a level at most 6 s away (level 5 = 3.2 s, or lower), never a
    # work or due queue. 6 s: the checks below end long before it reaches the due queue.
    async def in_the_cascade() -> bool:
        levels = range(7)
        return (
            sum(
                [
                    await queue_count(
                        namespace.url, delay_queue(namespace.name, lv), missing_ok=True
                    )
                    for lv in levels
                ]
            )
            == 1
        )

    await eventually(in_the_cascade, timeout=2, what="the job in a delay level")
    assert await queue_count(namespace.url, due_queue(namespace.name, "d")) == 0
    assert await queue_count(namespace.url, work_queue(namespace.name, "d"), missing_ok=True) == 0
    await eventually(
        lambda: queue_count(namespace.url, due_queue(namespace.name, "d")),
        timeout=15,
        what="the job to reach the due queue with no worker running",
    )
    await run_until_idle(namespace.worker(timed_app.app))  # type: ignore[attr-defined]
    assert len(started) == 1


async def test_a_year_fits_in_the_cascade(namespace: Namespace) -> None:
    job, _ = timed_app(namespace)
    async with namespace.client() as client:
        await client.enqueue(job, {"n": 1}, delay=timedelta(days=366))
    units = (366 * 86_400_000 - 25 * 20) // 100
    top = units.bit_length() - 1
    assert top <= 28
    assert await queue_count(namespace.url, delay_queue(namespace.name, top)) == 1
    assert await queue_count(namespace.url, work_queue(namespace.name, "d"), missing_ok=True) == 0


async def test_early_arrival_is_delayed_again(namespace: Namespace) -> None:
    """A message published straight to the work queue with a future job-eta still waits."""

    job, started = timed_app(namespace)
    async with namespace.client() as client:
        await client.enqueue(job, {"n": 0})  # declares queue and binding
    eta = now_ms() + 1500
    early = Message(b'{"n": 1}', "application/json", "early-1", "t.timed", None, {"job-eta": eta})
    await put(namespace.url, "t.timed", early, exchange=jobs_exchange(namespace.name))
    stats = await run_until_idle(namespace.worker(timed_app.app))  # type: ignore[attr-defined]
    assert stats.redelayed == 1
    late = [at for n, at, _ in started if n == 1]
    assert late
    assert late[0] >= eta


async def test_held_jobs_do_not_take_running_slots(namespace: Namespace) -> None:
    """With concurrency 1, five held jobs do not block an immediate one.

    A 10 s delay unit sends a 6 s delay straight to the due queue, so the worker holds
    the jobs for the whole 6 s: long enough to observe on a busy machine.
    """
    namespace.settings = TopologySettings(delay_unit_ms=10_000, delay_levels=20)
    app = namespace.app()
    job = Job("t.mixed", N, queue="h")
    ran: list[tuple[int, float]] = []
    t0 = time.monotonic()

    @app.handler(job)
    async def mixed(args: N) -> None:
        ran.append((args.n, time.monotonic() - t0))

    async with namespace.client() as client:
        await client.enqueue_many(job, [{"n": i} for i in range(1, 6)], delay=6)
    worker = namespace.worker(app, concurrency=1)
    task = asyncio.create_task(run_until_idle(worker))
    await eventually(lambda: worker.in_flight == 5, what="5 delayed jobs held by the worker")
    async with namespace.client() as client:
        await client.enqueue(job, {"n": 0})
    await asyncio.wait_for(task, 30)
    assert ran[0][0] == 0, "the immediate job ran while the delayed ones were held"
    assert ran[0][1] < 6 <= ran[1][1]
    assert sorted(n for n, _ in ran) == [0, 1, 2, 3, 4, 5]


async def test_a_publisher_declares_only_its_levels_and_topology_declare_all(
    namespace: Namespace,
) -> None:
    """The first delayed job waits for the levels of its delay alone; declaring the
    topology (``amqp-jobs topology declare``) makes every level, for publishers that spell
    their own delays."""
    job, _ = timed_app(namespace)
    levels = range(namespace.settings.delay_levels)
    link = _link(namespace.url)

    async def declared() -> int:
        names = [delay_queue(namespace.name, lv) for lv in levels]
        return sum([await link.depth(name) is not None for name in names])

    try:
        async with namespace.client() as client:
            await client.enqueue(job, {"n": 1}, delay=timedelta(hours=1))
        if not namespace.url.startswith("memory://"):  # in memory, declaring costs nothing
            assert 0 < await declared() < len(levels)
        declaring = transport_for(namespace.url).link(namespace.name, namespace.settings, name="t")
        try:
            await declaring.declare_cascade()
        finally:
            await declaring.close()
        assert await declared() == len(levels)
    finally:
        await link.close()


async def test_run_until_idle_waits_for_a_job_between_delay_levels(namespace: Namespace) -> None:
    """A job a delay level dead-letters on is counted in no queue until the next takes
    it (RabbitMQ shows it as messages_dlx only, not to a queue.declare): a worker whose
    pending() saw a job in the cascade is not idle until CASCADE_SETTLE s later."""
    if namespace.url.startswith("memory://"):
        pytest.skip("the memory broker moves a job between queues at once")
    job, _ = timed_app(namespace)
    async with namespace.client() as client:
        await client.enqueue(job, {"n": 1}, delay=timedelta(seconds=30))
    worker = namespace.worker(timed_app.app)  # type: ignore[attr-defined]
    assert await worker.pending() == 1
    assert worker.cascade_held_at is not None, "pending() saw the job in a delay level"
    loop = asyncio.get_running_loop()
    real_pending = worker.pending
    calls: list[float] = []

    async def then_in_transit() -> int:
        calls.append(loop.time())
        if len(calls) == 1:
            return await real_pending()  # the job is in a level: seen there
        return 0  # from now on it is "between two queues"

    worker.pending = then_in_transit  # type: ignore[method-assign]
    await run_until_idle(worker)
    assert calls[-1] - calls[0] >= CASCADE_SETTLE, "called idle with a job just out of a level"
