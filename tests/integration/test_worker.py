"""Workers: async and sync handlers, bounded concurrency, ack only after success."""

import asyncio
import threading
import time

from pydantic import BaseModel

from amqp_jobs import Job, JobContext, JobHooks, Outcome, OutcomeKind
from amqp_jobs.message import Envelope
from amqp_jobs.testing import Namespace, run_until_idle
from amqp_jobs.topology import quarantine_queue, work_queue
from tests.support import eventually, put, queue_count


class N(BaseModel):
    n: int


async def test_async_and_sync_handlers_run_with_their_context(namespace: Namespace) -> None:
    app = namespace.app()
    a = Job("t.async", N, queue="mixed")
    s = Job("t.sync", N, queue="mixed")
    seen: list[tuple[str, int, str, int, str]] = []

    @app.handler(a)
    async def run_a(args: N, ctx: JobContext) -> None:
        seen.append(("async", args.n, ctx.job_id, ctx.attempt, threading.current_thread().name))

    @app.handler(s)
    def run_s(args: N) -> None:  # ctx is optional
        seen.append(("sync", args.n, "", 1, threading.current_thread().name))

    async with namespace.client() as client:
        id_a = await client.enqueue(a, {"n": 1})
        await client.enqueue(s, {"n": 2})
    stats = await run_until_idle(namespace.worker(app))
    assert stats.succeeded == 2
    by_kind = {row[0]: row for row in seen}
    assert by_kind["async"][1:4] == (1, id_a, 1)
    assert by_kind["async"][4] == "MainThread"
    assert by_kind["sync"][4].startswith("amqp-jobs"), "sync handlers run in the pool"


async def test_concurrency_bounds_running_jobs(namespace: Namespace) -> None:
    app = namespace.app()
    job = Job("t.slow", N, queue="slow")
    running = 0
    peak = 0
    release = asyncio.Event()

    @app.handler(job)
    async def slow(args: N) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await release.wait()
        running -= 1

    async with namespace.client() as client:
        await client.enqueue_many(job, [{"n": i} for i in range(12)])
    worker = namespace.worker(app, concurrency=3)
    task = asyncio.create_task(run_until_idle(worker))
    await eventually(lambda: running == 3, what="3 jobs running")
    # the broker holds the rest: prefetch = concurrency
    assert await queue_count(namespace.url, work_queue(namespace.name, "slow")) == 9
    release.set()
    stats = await asyncio.wait_for(task, 30)
    assert stats.succeeded == 12
    assert peak == 3


async def test_sync_concurrency_uses_a_bounded_pool(namespace: Namespace) -> None:
    app = namespace.app()
    job = Job("t.block", N, queue="block")
    lock = threading.Lock()
    running = 0
    peak = 0

    @app.handler(job)
    def block(args: N) -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.05)
        with lock:
            running -= 1

    async with namespace.client() as client:
        await client.enqueue_many(job, [{"n": i} for i in range(20)])
    stats = await run_until_idle(namespace.worker(app, concurrency=4))
    assert stats.succeeded == 20
    assert 2 <= peak <= 4


async def test_job_is_acked_only_after_success(namespace: Namespace) -> None:
    app = namespace.app()
    job = Job("t.gate", N, queue="gate")
    started = asyncio.Event()
    finish = asyncio.Event()

    @app.handler(job)
    async def gate(args: N) -> None:
        started.set()
        await finish.wait()

    async with namespace.client() as client:
        await client.enqueue(job, {"n": 1})
    worker = namespace.worker(app)
    task = asyncio.create_task(run_until_idle(worker))
    await asyncio.wait_for(started.wait(), 10)
    assert worker.stats.succeeded == 0
    assert await worker.pending() == 1, "the running job is still unacked, in flight"
    finish.set()
    stats = await asyncio.wait_for(task, 30)
    assert stats.succeeded == 1


async def test_hooks_see_every_attempt_and_its_outcome(namespace: Namespace) -> None:
    events: list[tuple[str, int, str]] = []

    class Record(JobHooks):
        async def started(self, ctx: JobContext) -> None:
            events.append(("started", ctx.attempt, ""))

        async def settled(self, ctx: JobContext, outcome: Outcome) -> None:
            events.append(("settled", ctx.attempt, outcome.kind))

    from amqp_jobs import RetryPolicy

    app = namespace.app(hooks=[Record()])
    job = Job("t.once", N, queue="hooks", retry=RetryPolicy(max_attempts=2, backoff=0))
    calls = 0

    @app.handler(job)
    async def once(args: N) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("first")

    async with namespace.client() as client:
        await client.enqueue(job, {"n": 1})
    await run_until_idle(namespace.worker(app))
    # the retry copy may start before the first attempt's hook has run: order per attempt
    for attempt, kind in [(1, OutcomeKind.RETRYING), (2, OutcomeKind.SUCCEEDED)]:
        mine = [e for e in events if e[1] == attempt]
        assert mine == [("started", attempt, ""), ("settled", attempt, kind)]
    assert len(events) == 4


async def test_worker_consumes_only_the_queues_asked_for(namespace: Namespace) -> None:
    app = namespace.app()
    a = Job("t.a", N, queue="qa")
    b = Job("t.b", N, queue="qb")
    ran: list[str] = []
    app.add_handler(a, lambda args: ran.append("a"))
    app.add_handler(b, lambda args: ran.append("b"))
    async with namespace.client() as client:
        await client.enqueue(a, {"n": 1})
        await client.enqueue(b, {"n": 1})
    await run_until_idle(namespace.worker(app, queues=["qa"]))
    assert ran == ["a"]
    assert await queue_count(namespace.url, work_queue(namespace.name, "qb")) == 1


async def test_plain_function_returning_a_coroutine_fails_loudly(namespace: Namespace) -> None:
    """A lambda around an async function must not count as success without running it."""
    from amqp_jobs import RetryPolicy
    from amqp_jobs.topology import dead_queue
    from tests.support import drain

    app = namespace.app()
    job = Job("t.wrapped", N, queue="wrapped", retry=RetryPolicy(max_attempts=1))
    ran: list[int] = []

    async def real(args: N) -> None:
        ran.append(args.n)

    app.add_handler(job, lambda args: real(args))
    async with namespace.client() as client:
        await client.enqueue(job, {"n": 1})
    stats = await run_until_idle(namespace.worker(app))
    assert ran == []
    assert stats.succeeded == 0
    [dead] = await drain(namespace.url, dead_queue(namespace.name, "wrapped"), 1)
    assert "declare it `async def`" in dead.headers["job-error-message"]


async def test_a_quarantined_job_runs_alone_then_the_others_resume(namespace: Namespace) -> None:
    """What the worker puts in the quarantine queue waits for the running jobs, runs with
    nothing else held, and the paused consumers resume afterwards."""
    app = namespace.app()
    job = Job("t.iso", N, queue="iso")
    gate = asyncio.Event()
    running: set[int] = set()
    spans: dict[int, tuple[float, float]] = {}
    loop = asyncio.get_running_loop()

    @app.handler(job)
    async def run(args: N) -> None:
        running.add(args.n)
        began = loop.time()
        if args.n < 4:
            await gate.wait()  # the first four hold every slot until released
        await asyncio.sleep(0.02)  # work, so that overlaps would show
        spans[args.n] = (began, loop.time())
        running.discard(args.n)

    async with namespace.client() as client:
        await client.enqueue_many(job, [{"n": n} for n in range(8)])
    worker = namespace.worker(app, concurrency=4)
    task = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(worker.started(), 15)
        await eventually(lambda: running == {0, 1, 2, 3}, what="four jobs running")
        suspect = Envelope.new(job.name, b'{"n": 100}', "iso")
        await put(namespace.url, quarantine_queue(namespace.name, "iso"), suspect.to_message())

        async def delivered() -> bool:
            return await queue_count(namespace.url, quarantine_queue(namespace.name, "iso")) == 0

        await eventually(delivered, what="the quarantined job delivered to the worker")
        assert 100 not in running, "it waits for the running jobs"
        gate.set()
        await eventually(lambda: len(spans) == 9, timeout=20, what="all nine jobs done")
    finally:
        worker.stop()
        await asyncio.wait_for(task, 15)
    alone = spans[100]
    for n, (began, ended) in spans.items():
        if n != 100:
            assert ended <= alone[0] or began >= alone[1], f"job {n} overlapped the quarantined one"
    assert all(spans[n][0] >= alone[1] for n in range(4, 8)), "the rest waited until it was done"
    assert worker.stats.succeeded == 9
