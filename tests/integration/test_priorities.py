"""Priorities on quorum queues: a high-priority job starts ahead of queued normal work,
normal work still gets its share under a flood of high-priority jobs, and status shows
each level. On RabbitMQ and memory:// alike."""

import asyncio

import pytest
from pydantic import BaseModel

from amqp_jobs import Job, JobContext
from amqp_jobs import ops as ops_
from amqp_jobs.errors import ContractError
from amqp_jobs.testing import Namespace
from amqp_jobs.transport import transport_for
from tests.support import eventually, running


class Work(BaseModel):
    n: int
    seconds: float = 0.0


WORK = Job("t.work", Work, queue="prio")


async def test_a_high_priority_job_starts_ahead_of_queued_normal_work(
    namespace: Namespace,
) -> None:
    """Two normal jobs run (concurrency 2) and 18 wait in the queue; a high-priority
    job enqueued now takes the first slot that frees."""
    started: list[tuple[int, str]] = []
    app = namespace.app()
    release = asyncio.Event()

    @app.handler(WORK)
    async def work(args: Work, ctx: JobContext) -> None:
        started.append((args.n, "high" if args.n < 0 else "normal"))
        if args.n >= 0:  # the normal jobs' work: until the high one waits for a slot
            await asyncio.wait_for(release.wait(), 30)

    worker = namespace.worker(app, concurrency=2)
    async with running(worker, start_within=10), namespace.client() as client:
        await client.enqueue_many(WORK, [{"n": n} for n in range(20)])
        await eventually(lambda: len(started) >= 2, timeout=10, what="2 running")
        await client.enqueue(WORK, {"n": -1}, priority="high")
        # held by the worker beside the 2 running (normal prefetch = concurrency)
        await eventually(lambda: worker.in_flight == 3, timeout=10, what="high held")
        release.set()
        await eventually(lambda: len(started) == 21, timeout=60, what="every job")
    position = [n for n, _ in started].index(-1)
    assert position == 2, started  # the next slot that freed, not after 18 queued jobs


async def test_normal_work_gets_its_share_under_a_flood_of_high(namespace: Namespace) -> None:
    started: list[str] = []
    app = namespace.app()

    go = asyncio.Event()

    @app.handler(WORK)
    async def work(args: Work, ctx: JobContext) -> None:
        started.append("high" if args.n < 0 else "normal")
        # until the worker consumes both queues: the normal one is consumed first, and
        # a busy machine could run many normal jobs before the high one is
        await asyncio.wait_for(go.wait(), 30)
        await asyncio.sleep(0.01)

    async with namespace.client() as client:
        namespace.track(WORK)
        await client.enqueue_many(WORK, [{"n": n} for n in range(60)])
        await client.enqueue_many(WORK, [{"n": -1 - n} for n in range(60)], priority="high")
    async with running(namespace.worker(app, concurrency=3), start_within=10):
        go.set()
        await eventually(lambda: len(started) >= 60, timeout=60, what="60 jobs")
    first = started[:60]
    share = first.count("normal") / len(first)
    assert share >= 0.25, first  # about 1 in NORMAL_EVERY while both wait
    assert first.count("high") > first.count("normal")  # and high goes first


async def test_status_shows_each_level(namespace: Namespace) -> None:
    namespace.track(WORK)
    async with namespace.client() as client:
        await client.enqueue_many(WORK, [{"n": n} for n in range(3)])
        await client.enqueue_many(WORK, [{"n": -n - 1} for n in range(2)], priority="high")
        with pytest.raises(ContractError, match="priority must be"):
            await client.enqueue(WORK, {"n": 9}, priority="urgent")
    transport = transport_for(namespace.url)
    async with ops_.Broker(transport, namespace.name, namespace.settings) as broker:
        status = await ops_.status(broker, ["prio"])
    (row,) = status.queues
    assert (row.high, row.ready) == (2, 3)
