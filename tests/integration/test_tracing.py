"""OpenTelemetry tracing: one trace per job, from the enqueue (PRODUCER) through every
attempt (CONSUMER, the enqueue's child, linked to the attempt before), with the
messaging attributes and the job's id and attempt. On RabbitMQ and memory://, with the
SDK's in-memory exporter."""

from __future__ import annotations

import asyncio
import itertools
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from pydantic import BaseModel

from amqp_jobs import Defer, Job, JobContext, RetryPolicy, SyncJobClient
from amqp_jobs.metrics import Metrics
from amqp_jobs.middleware import Middleware, Next, Publishing
from amqp_jobs.scheduler import Scheduler
from amqp_jobs.testing import Namespace
from amqp_jobs.topology import work_queue
from amqp_jobs.tracing import PREVIOUS_ATTEMPT, Tracing
from amqp_jobs.transport import transport_for
from tests.support import drain, eventually, running


class N(BaseModel):
    n: int


FLAKY = Job("traced.flaky", N, queue="traced", retry=RetryPolicy(max_attempts=4, backoff=0.05))


async def test_one_trace_holds_the_enqueue_and_every_attempt(namespace: Namespace) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing(provider)
    app = namespace.app(middleware=[tracing])
    done = asyncio.Event()
    seen: list[tuple[int, str | None]] = []

    @app.handler(FLAKY)
    async def flaky(args: N, ctx: JobContext) -> None:
        seen.append((ctx.attempt, ctx.headers.get(PREVIOUS_ATTEMPT)))
        if len(seen) == 2:
            raise Defer(0.05, "a section is taken")  # the same attempt, again
        if ctx.attempt < 3:
            raise RuntimeError(f"attempt {ctx.attempt} fails")
        done.set()

    worker = namespace.worker(app)
    task = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(worker.started(), 15)
        async with namespace.client(middleware=[tracing]) as client:
            job_id = await client.enqueue(FLAKY, {"n": 1})
        await asyncio.wait_for(done.wait(), 20)
    finally:
        worker.stop()
        await asyncio.wait_for(task, 20)

    spans = exporter.get_finished_spans()
    (producer,) = [s for s in spans if s.kind is SpanKind.PRODUCER]
    consumers = sorted(
        (s for s in spans if s.kind is SpanKind.CONSUMER), key=lambda s: s.start_time or 0
    )
    assert [c.attributes["amqp_jobs.job.attempt"] for c in consumers] == [1, 2, 2, 3]
    assert producer.name == "publish traced"
    assert producer.attributes["messaging.system"] == "rabbitmq"
    assert producer.attributes["messaging.message.id"] == job_id
    trace_id = producer.context.trace_id
    for before, span in zip([None, *consumers], consumers, strict=False):
        assert span.name == "process traced"
        assert span.context.trace_id == trace_id, "every attempt is in the enqueue's trace"
        assert span.parent is not None and span.parent.span_id == producer.context.span_id
        assert span.attributes["messaging.message.id"] == job_id
        assert span.attributes["messaging.operation.type"] == "process"
        if before is None:
            assert not span.links
        else:
            (link,) = span.links
            assert link.context.span_id == before.context.span_id, "linked to the one before"
    assert [c.status.status_code for c in consumers] == [
        StatusCode.ERROR,
        StatusCode.UNSET,  # deferred: not a failure
        StatusCode.ERROR,
        StatusCode.UNSET,
    ]
    assert consumers[1].attributes["amqp_jobs.deferred_by"] == 0.05
    assert [a for a, _ in seen] == [1, 2, 2, 3]
    assert seen[0][1] is None and all(previous for _, previous in seen[1:])


async def test_a_sync_clients_enqueues_join_their_callers_traces(namespace: Namespace) -> None:
    """SyncJobClient publishes from its own loop thread, taking the calls of many threads
    at one wakeup: each enqueue's span is still the child of the span current in the
    thread that called it."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing(provider)
    namespace.track(FLAKY)
    threads, each = 16, 10

    with SyncJobClient(
        namespace.url, namespace=namespace.name, settings=namespace.settings, middleware=[tracing]
    ) as client:
        client.connect()

        def request(n: int) -> tuple[int, list[str]]:
            with provider.get_tracer("test").start_as_current_span(f"request {n}") as outer:
                ids = [client.enqueue(FLAKY, {"n": n}) for _ in range(each)]
                return outer.get_span_context().span_id, ids

        def all_requests() -> list[tuple[int, list[str]]]:
            with ThreadPoolExecutor(threads) as pool:
                return list(pool.map(request, range(threads)))

        callers = await asyncio.wait_for(asyncio.to_thread(all_requests), 60)

    parent_of = {
        s.attributes["messaging.message.id"]: s.parent.span_id if s.parent else None
        for s in exporter.get_finished_spans()
        if s.kind is SpanKind.PRODUCER
    }
    assert len(parent_of) == threads * each
    wrong = [job for outer, ids in callers for job in ids if parent_of[job] != outer]
    assert not wrong, f"{len(wrong)} enqueues are not children of their caller's span"


async def test_a_scheduled_tick_is_traced_from_its_publish(namespace: Namespace) -> None:
    """The scheduler's ticks pass through the app's publish middleware like an enqueue:
    each tick's trace starts at a PRODUCER span, the parent of its attempt."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = namespace.app(middleware=[Tracing(provider)])
    app.schedule(FLAKY, {"n": 7}, every=1, name="traced-tick")
    ran: asyncio.Queue[str] = asyncio.Queue()

    @app.handler(FLAKY)
    async def tick(args: N, ctx: JobContext) -> None:
        ran.put_nowait(ctx.job_id)

    async with running(namespace.worker(app)):
        tick_id = await asyncio.wait_for(ran.get(), 20)

    assert tick_id.startswith("schedule:traced-tick@")
    spans = exporter.get_finished_spans()
    (producer,) = [
        s
        for s in spans
        if s.kind is SpanKind.PRODUCER and s.attributes["messaging.message.id"] == tick_id
    ]
    assert producer.attributes["amqp_jobs.job.name"] == FLAKY.name
    (consumer,) = [
        s
        for s in spans
        if s.kind is SpanKind.CONSUMER and s.attributes["messaging.message.id"] == tick_id
    ]
    assert consumer.parent is not None and consumer.parent.span_id == producer.context.span_id


async def until_enqueued(scheduler: Scheduler, ticks: int) -> None:
    """Run ``scheduler`` until it has enqueued ``ticks`` ticks, then stop it."""
    task = asyncio.create_task(scheduler.run())
    try:
        await eventually(
            lambda: scheduler.ticks_enqueued >= ticks, timeout=30, what=f"{ticks} ticks"
        )
    finally:
        scheduler.stop()
        await asyncio.wait_for(task, 10)


async def test_a_leader_traces_the_ticks_of_schedules_only_others_define(
    namespace: Namespace,
) -> None:
    """A leader enqueues schedules it knows only from another process's announcement:
    its publish middleware sees a stand-in contract with the job's name and queue."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    namespace.track(FLAKY)
    other = namespace.app()
    other.schedule(FLAKY, {"n": 1}, every=1, name="theirs")
    transport = transport_for(namespace.url)
    scheduler = Scheduler(
        transport, namespace.name, other.schedules, middleware=[Tracing(provider)], contracts={}
    )
    await until_enqueued(scheduler, 1)
    producers = [s for s in exporter.get_finished_spans() if s.kind is SpanKind.PRODUCER]
    assert producers, "no PRODUCER span for the tick"
    assert all(s.attributes["amqp_jobs.job.name"] == FLAKY.name for s in producers)
    assert all(s.name == f"publish {FLAKY.queue}" for s in producers)
    ids = {s.attributes["messaging.message.id"] for s in producers}
    assert all(str(i).startswith("schedule:theirs@") for i in ids)


async def test_a_publish_middleware_that_fails_delays_ticks_and_loses_none(
    namespace: Namespace,
) -> None:
    """A publish middleware failing on a tick holds back that schedule alone: the
    scheduler keeps leading, the other schedules go on, and the failed ticks are
    enqueued at a later step, each once. Metrics count the ticks, with no confirm time
    (a tick is staged in the step's transaction, not confirmed)."""

    class FailingTwice(Middleware):
        def __init__(self) -> None:
            self.failed: list[str] = []

        async def publish(self, publishing: Publishing, call_next: Next) -> Any:
            if publishing.job.name == FLAKY.name and len(self.failed) < 2:
                self.failed.append(publishing.job_id)
                raise RuntimeError("exporter down")
            return await call_next()

    other_job = Job("traced.steady", N, queue=FLAKY.queue)
    namespace.track(FLAKY, other_job)
    app = namespace.app()
    app.schedule(FLAKY, {"n": 1}, every=1, name="flaky-mw", catch_up="all")
    app.schedule(other_job, {"n": 2}, every=1, name="steady", catch_up="all")
    failing, metrics = FailingTwice(), Metrics()
    scheduler = Scheduler(
        transport_for(namespace.url),
        namespace.name,
        app.schedules,
        middleware=[metrics, failing],
        contracts={FLAKY.name: FLAKY, other_job.name: other_job},
    )
    task = asyncio.create_task(scheduler.run())
    try:
        await eventually(lambda: scheduler.leading_since is not None, timeout=15, what="lead")
        led_since = scheduler.leading_since
        await eventually(
            lambda: len(failing.failed) == 2 and scheduler.ticks_enqueued >= 6,
            timeout=30,
            what="2 failed ticks, then 6 enqueued",
        )
        assert scheduler.leading_since == led_since, "it kept leading through the failures"
    finally:
        scheduler.stop()
        await asyncio.wait_for(task, 10)
    messages = await drain(
        namespace.url, work_queue(namespace.name, FLAKY.queue), scheduler.ticks_enqueued
    )
    ids = [m.message_id for m in messages]
    assert len(set(ids)) == len(ids), "a tick was enqueued twice"
    assert set(failing.failed) <= set(ids), "a tick whose publish failed was never enqueued"
    for name in ("flaky-mw", "steady"):
        ticks = sorted(datetime.fromisoformat(i.split("@", 1)[1]) for i in ids if f":{name}@" in i)
        assert all(b - a == timedelta(seconds=1) for a, b in itertools.pairwise(ticks)), ticks
    published = metrics.registry.get_sample_value(
        "amqp_jobs_published_total", {"queue": FLAKY.queue, "job": other_job.name}
    )
    assert published is not None and published >= 1
    confirms = metrics.registry.get_sample_value(
        "amqp_jobs_publish_confirm_seconds_count", {"queue": FLAKY.queue}
    )
    assert not confirms, "a tick has no confirm to time"
