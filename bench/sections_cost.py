"""What a critical section costs a job: taking and freeing its lock, and the drain rate.

    python -m bench.sections_cost [--jobs N] [--runs R]

One worker in this process drains N short jobs (5 ms of work each) with and without
``exclusive=``, alternating: every job its own key (each lock used once) at
concurrency 1 and at the default, and 100 keys in turn (each lock used again, and
rarely by two jobs at once) at the default. Prints the drain rate of each and the ratio, and the
worker's own figures for taking and freeing a section (p50, p99). At concurrency 1 the
lock's round trips show alone; at the default, with the broker's queueing.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from pydantic import BaseModel

from amqp_jobs import Job, JobApp, JobClient
from amqp_jobs.worker import DEFAULT_CONCURRENCY
from bench.common import URL, cleanup, namespace


class Account(BaseModel):
    account: int


PLAIN = Job("bench.plain", Account, queue="sections", key="account")
LOCKED = Job("bench.locked", Account, queue="sections", key="account", exclusive="bench")


async def drain(
    job: Job[Account], n: int, concurrency: int, keys: int
) -> tuple[float, list[float]]:
    """Jobs per second, and what each section cost (ms) if the job has one."""
    ns = namespace("sections")
    app = JobApp(ns)
    done = asyncio.Event()
    count = 0

    @app.handler(job)
    async def work(args: Account) -> None:
        nonlocal count
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
            began = time.perf_counter()
            await asyncio.wait_for(done.wait(), 600)
            took = time.perf_counter() - began
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)
        await cleanup(ns, {"sections"})
    costs = list(worker.sections.lock_ms) if worker.sections is not None else []
    return n / took, costs


async def main_async(jobs: int, runs: int) -> None:
    for concurrency, keys in ((1, jobs), (DEFAULT_CONCURRENCY, jobs), (DEFAULT_CONCURRENCY, 100)):
        rates: dict[str, list[float]] = {"plain": [], "locked": []}
        costs: list[float] = []
        for run in range(runs):
            order = [PLAIN, LOCKED] if run % 2 == 0 else [LOCKED, PLAIN]
            for job in order:
                rate, cost = await drain(job, jobs, concurrency, keys)
                rates["locked" if job is LOCKED else "plain"].append(rate)
                costs += cost
        plain, locked = statistics.median(rates["plain"]), statistics.median(rates["locked"])
        costs.sort()
        which = "own keys" if keys == jobs else f"{keys} keys in turn"
        print(
            f"concurrency {concurrency}: {jobs:,} jobs of 5 ms, {which}: plain {plain:,.0f}"
            f" jobs/s, exclusive {locked:,.0f} jobs/s ({locked / plain:.2f}x); taking and"
            f" freeing a section p50 {costs[len(costs) // 2]:.1f} ms,"
            f" p99 {costs[len(costs) * 99 // 100]:.1f} ms"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    options = parser.parse_args()
    asyncio.run(main_async(options.jobs, options.runs))


if __name__ == "__main__":
    main()
