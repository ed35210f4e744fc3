"""Priorities under load: how soon a high-priority job starts in a saturated worker, and
what share normal work keeps under a flood of high-priority jobs.

    python -m bench.priorities [--low 10000] [--high 200] [--seconds 0.05]

1. A worker (default concurrency) has LOW normal jobs of SECONDS each queued. HIGH jobs
   are enqueued one at a time, 20 to 100 ms apart; each one's wait is the time from its
   enqueue returning to its handler starting. Target: p99 within one normal job's
   duration plus 50 ms.
2. Then the queue holds normal jobs and high-priority ones keep coming faster than the
   worker runs them; over that window, the share of starts that were normal jobs.
   Target: at least 30 %.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time

from pydantic import BaseModel

from amqp_jobs import Job, JobApp, JobClient
from amqp_jobs.worker import DEFAULT_CONCURRENCY
from bench.common import URL, cleanup, namespace


class Work(BaseModel):
    n: int
    high: bool = False
    sent: float = 0.0


WORK = Job("bench.prio", Work, queue="prio")


async def run(low: int, high: int, seconds: float) -> None:
    ns = namespace("prio")
    app = JobApp(ns)
    waits: list[float] = []
    starts: list[bool] = []  # high?
    counting = False

    @app.handler(WORK)
    async def work(args: Work) -> None:
        if args.high and args.sent:
            waits.append(time.time() - args.sent)
        if counting:
            starts.append(args.high)
        await asyncio.sleep(seconds)

    worker = app.worker(URL, log_success=False)
    task = asyncio.create_task(worker.run())
    rng = random.Random(7)
    try:
        await asyncio.wait_for(worker.started(), 30)
        async with JobClient(URL, namespace=ns) as client:
            await client.enqueue_many(WORK, [{"n": n} for n in range(low)])
            for n in range(high):  # 1. single high-priority jobs into a saturated worker
                await asyncio.sleep(rng.uniform(0.02, 0.1))
                await client.enqueue(
                    WORK, {"n": n, "high": True, "sent": time.time()}, priority="high"
                )
            waits_sorted = sorted(waits)
            p99 = waits_sorted[min(len(waits_sorted) - 1, len(waits_sorted) * 99 // 100)]
            print(
                f"high-priority start in a worker saturated with {low:,} normal jobs of"
                f" {seconds * 1000:.0f} ms (concurrency {DEFAULT_CONCURRENCY}): p50"
                f" {statistics.median(waits) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms,"
                f" max {waits_sorted[-1] * 1000:.1f} ms over {len(waits)} jobs (target p99"
                f" <= {(seconds + 0.05) * 1000:.0f} ms)"
            )
            # 2. a flood: more high-priority jobs than the worker can run
            rate = DEFAULT_CONCURRENCY / seconds * 2
            counting = True
            began = time.monotonic()
            while time.monotonic() - began < 5:
                await client.enqueue_many(
                    WORK, [{"n": 0, "high": True} for _ in range(int(rate / 10))], priority="high"
                )
                await asyncio.sleep(0.1)
            counting = False
            share = starts.count(False) / len(starts)
            print(
                f"under a flood of high-priority jobs ({rate:.0f}/s, twice what the worker"
                f" runs): normal jobs got {share:.0%} of {len(starts)} starts (target >= 30%)"
            )
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)
        await cleanup(ns, {"prio"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--low", type=int, default=10_000)
    parser.add_argument("--high", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=0.05)
    options = parser.parse_args()
    asyncio.run(run(options.low, options.high, options.seconds))


if __name__ == "__main__":
    main()
