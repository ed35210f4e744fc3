"""Unique jobs: while a job with a key is live (or ended within the period), enqueueing
an equal one publishes nothing and returns the live job's id, exactly, under concurrent
publishers. Against SQLite and PostgreSQL stores, on RabbitMQ and memory://.

The full proof (8 publishers x 1,000 keys x 10 rounds) runs with ``AMQP_JOBS_SOAK=1``;
without it, 8 x 100 x 10.
"""

import asyncio
import os
import random
from collections import defaultdict
from datetime import timedelta

import pytest
from pydantic import BaseModel

from amqp_jobs import Job, JobContext, JobLog, Recorder
from amqp_jobs.errors import ContractError
from amqp_jobs.testing import Namespace
from amqp_jobs.topology import work_queue
from tests.support import eventually, queue_count

SOAK = os.environ.get("AMQP_JOBS_SOAK", "").lower() in ("1", "true", "yes")
PUBLISHERS, KEYS, ROUNDS = 8, (1000 if SOAK else 100), 10

pytestmark = pytest.mark.timeout(900 if SOAK else 180)


class Sync(BaseModel):
    account: int


SYNC = Job("t.sync", Sync, queue="unique", key="account", unique=0)
#: still refused for an hour after the job ended
HOURLY = Job("t.hourly", Sync, queue="unique", key="account", unique=timedelta(hours=1))


async def test_concurrent_publishers_get_one_job_per_key(
    namespace: Namespace, store_url: str
) -> None:
    namespace.track(SYNC)
    recorder = Recorder(store_url, namespace=namespace.name, url=namespace.url)
    recording = asyncio.create_task(recorder.run())
    ids: dict[int, set[str]] = defaultdict(set)

    async def publisher(seed: int) -> None:
        rng = random.Random(seed)
        async with namespace.client(store=store_url) as client:
            for _ in range(ROUNDS):
                keys = list(range(KEYS))
                rng.shuffle(keys)
                for key in keys:
                    ids[key].add(await client.enqueue(SYNC, {"account": key}))

    try:
        await asyncio.wait_for(asyncio.gather(*(publisher(i) for i in range(PUBLISHERS))), 600)
    finally:
        recorder.stop()
        await asyncio.wait_for(recording, 30)
    assert all(len(held) == 1 for held in ids.values()), {
        k: v for k, v in ids.items() if len(v) > 1
    }
    assert len(ids) == KEYS
    assert await queue_count(namespace.url, work_queue(namespace.name, SYNC.queue)) == KEYS


async def test_a_key_is_free_again_once_its_job_ended_and_the_period_passed(
    namespace: Namespace, store_url: str
) -> None:
    ran: list[str] = []
    app = namespace.app()

    @app.handler(SYNC)
    async def sync(args: Sync, ctx: JobContext) -> None:
        ran.append(ctx.job_id)

    @app.handler(HOURLY)
    async def hourly(args: Sync, ctx: JobContext) -> None:
        ran.append(ctx.job_id)

    async def logged(job_id: str) -> bool:
        async with JobLog(store_url, namespace.name) as log:
            record = await log.get(job_id)
        return record is not None and record.is_final

    recorder = Recorder(store_url, namespace=namespace.name, url=namespace.url)
    recording = asyncio.create_task(recorder.run())
    worker = namespace.worker(app, events=True, started_after=0)
    task = None
    try:
        async with namespace.client(store=store_url) as client:
            first = await client.enqueue(SYNC, {"account": 1}, reply=True)
            assert await client.enqueue(SYNC, {"account": 1}) == first  # queued: the same
            task = asyncio.create_task(worker.run())
            await client.result(first, timeout=15)  # ended (pushed to this client)
            await eventually(lambda: logged(first), timeout=15, what="its end in the log")
            second = await client.enqueue(SYNC, {"account": 1})  # unique=0: free again
            assert second != first
            hourly = await client.enqueue(HOURLY, {"account": 1}, reply=True)
            await client.result(hourly, timeout=15)
            await eventually(lambda: logged(hourly), timeout=15, what="its end in the log")
            # ended, but within its hour: still the same job
            assert await client.enqueue(HOURLY, {"account": 1}) == hourly
            assert await client.enqueue(HOURLY, {"account": 2}) != hourly  # another key
    finally:
        worker.stop()
        recorder.stop()
        if task is not None:
            await asyncio.wait_for(task, 20)
        await asyncio.wait_for(recording, 30)


async def test_unique_jobs_need_a_store_and_say_so_before_publishing(
    namespace: Namespace,
) -> None:
    namespace.track(SYNC)
    async with namespace.client() as client:
        with pytest.raises(ContractError, match=r"needs JobClient\(store=\.\.\.\)"):
            await client.enqueue(SYNC, {"account": 1})
    assert (
        await queue_count(namespace.url, work_queue(namespace.name, "unique"), missing_ok=True) == 0
    )
    with pytest.raises(ContractError, match="unique= needs key="):
        Job("t.x", Sync, unique=60)
