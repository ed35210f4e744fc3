"""What a critical section costs a job: taking its lock (freeing it is not waited for),
and the drain rate.

    python -m bench.sections_cost [--jobs N] [--runs R]

One worker in this process drains N short jobs (5 ms of work each) with and without
``exclusive=``, alternating: every job its own key (each lock used once) at
concurrency 1 and at the default; 100 keys in turn (each lock used again, and rarely
by two jobs at once) at the default; and 4 keys in turn (hot keys: every key wanted by
four jobs at once). Prints the drain rate of each (from the first job's start) and the
ratio, the worker's own figures for what a section cost a job (p50, p99), and how
often a job was turned away and how many were handed a section held in the worker. At
concurrency 1 the lock's round trips show alone; at the default, with the broker's
queueing.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import aio_pika
from pydantic import BaseModel

from amqp_jobs import Job, JobApp, JobClient
from amqp_jobs.sections import lock_names
from amqp_jobs.worker import DEFAULT_CONCURRENCY
from bench.common import URL, cleanup, namespace


class Account(BaseModel):
    account: int


PLAIN = Job("bench.plain", Account, queue="sections", key="account")
LOCKED = Job("bench.locked", Account, queue="sections", key="account", exclusive="bench")


async def drain(
    job: Job[Account], n: int, concurrency: int, keys: int
) -> tuple[float, list[float], tuple[int, int]]:
    """Jobs per second, what each section cost (ms) if the job has one, and how many
    times a job was turned away and was handed a section held in the worker."""
    ns = namespace("sections")
    app = JobApp(ns)
    done = asyncio.Event()
    count = 0
    first: float | None = None

    @app.handler(job)
    async def work(args: Account) -> None:
        nonlocal count, first
        if first is None:
            first = time.perf_counter()
        await asyncio.sleep(0.005)
        count += 1
        if count == n:
            done.set()

    worker = app.worker(URL, concurrency=concurrency, log_success=False)
    task = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(worker.started(), 30)
        async with JobClient(URL, namespace=ns) as client:
            await client.enqueue_many(job, [{"account": i % keys} for i in range(n)])
            await asyncio.wait_for(done.wait(), 600)
            assert first is not None
            # from the first job's start: a clock started once all are published
            # would miss what ran while they were (most of a fast drain)
            took = time.perf_counter() - first
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)
        await cleanup(ns, {"sections"})
        if job.exclusive is not None:
            await delete_locks(ns, job.exclusive, keys)
    sections = worker.sections
    costs = list(sections.lock_ms) if sections is not None else []
    if sections is None:
        return n / took, costs, (0, 0)
    return n / took, costs, (sections.turned_away, sections.handed_over)


async def delete_locks(ns: str, group: str, keys: int) -> None:
    """The lock queues a drain used. Left to expire (60 s unused), a thousand of them
    slowed the next run's declarations: rows measured later came out slower."""
    connection = await aio_pika.connect(URL)
    try:
        channel = await connection.channel()
        for key in range(keys):
            for name in lock_names(ns, group, str(key), 1):
                await channel.queue_delete(name)
    finally:
        await connection.close()


async def main_async(jobs: int, runs: int) -> None:
    rows = ((1, jobs), (DEFAULT_CONCURRENCY, jobs), (DEFAULT_CONCURRENCY, 100))
    for concurrency, keys in (*rows, (DEFAULT_CONCURRENCY, 4)):
        rates: dict[str, list[float]] = {"plain": [], "locked": []}
        costs: list[float] = []
        turned_away = handed_over = 0
        for run in range(runs):
            order = [PLAIN, LOCKED] if run % 2 == 0 else [LOCKED, PLAIN]
            for job in order:
                rate, cost, (refused, handed) = await drain(job, jobs, concurrency, keys)
                rates["locked" if job is LOCKED else "plain"].append(rate)
                costs += cost
                turned_away += refused
                handed_over += handed
        plain, locked = statistics.median(rates["plain"]), statistics.median(rates["locked"])
        costs.sort()
        which = "own keys" if keys == jobs else f"{keys} keys in turn"
        print(
            f"concurrency {concurrency}: {jobs:,} jobs of 5 ms, {which}: plain {plain:,.0f}"
            f" jobs/s, exclusive {locked:,.0f} jobs/s ({locked / plain:.2f}x); a section"
            f" cost its job p50 {costs[len(costs) // 2]:.1f} ms,"
            f" p99 {costs[len(costs) * 99 // 100]:.1f} ms; turned away"
            f" {turned_away / runs / jobs:.2f} times a job, handed over"
            f" {handed_over / runs / jobs:.0%}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    options = parser.parse_args()
    asyncio.run(main_async(options.jobs, options.runs))


if __name__ == "__main__":
    main()
