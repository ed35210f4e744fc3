"""Delay precision: lateness (start time minus ETA) of jobs delayed by 1 to 10 s.

    python -m bench.delay_precision [--jobs 1000] [--concurrency 16]

Publishes ``--jobs`` jobs with delays spread evenly over 1-10 s through the broker's
delay cascade, runs one in-process worker, and prints p50, p99 and max lateness.
Negative lateness would mean a job ran early; the run fails if any did.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid

from pydantic import BaseModel

from amqp_jobs import Job, JobApp, JobClient, JobContext
from amqp_jobs.contract import TopologySettings
from amqp_jobs.transport import transport_for
from amqp_jobs.urls import resolve


class Tick(BaseModel):
    n: int


async def measure(url: str, jobs: int, concurrency: int) -> dict[str, float]:
    ns = f"bench-delay-{uuid.uuid4().hex[:6]}"
    job = Job("bench.tick", Tick, queue="ticks")
    app = JobApp(ns)
    lateness: list[float] = []
    done = asyncio.Event()
    warm = asyncio.Event()

    @app.handler(job)
    async def tick(args: Tick, ctx: JobContext) -> None:
        assert ctx.eta is not None
        if args.n < 0:
            warm.set()
            return
        lateness.append(time.time() * 1000 - ctx.eta.timestamp() * 1000)
        if len(lateness) == jobs:
            done.set()

    worker = app.worker(url, concurrency=concurrency)
    task = asyncio.create_task(worker.run())
    try:
        await worker.started()
        async with JobClient(url, namespace=ns) as client:
            # warm up: declare the cascade and let one job pass through every kind of hop
            await client.enqueue(job, {"n": -1}, delay=1.5)
            await asyncio.wait_for(warm.wait(), 30)
            delays = [1 + 9 * i / max(1, jobs - 1) for i in range(jobs)]
            await asyncio.gather(
                *(client.enqueue(job, {"n": i}, delay=d) for i, d in enumerate(delays))
            )
        await asyncio.wait_for(done.wait(), 60)
    finally:
        worker.stop()
        await task
        await transport_for(url).delete_namespace(ns, {"ticks"}, TopologySettings())
    ordered = sorted(lateness)
    return {
        "jobs": len(ordered),
        "min_ms": ordered[0],
        "p50_ms": statistics.median(ordered),
        "p99_ms": ordered[min(len(ordered) - 1, round(0.99 * len(ordered)) - 1)],
        "max_ms": ordered[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    url = resolve(None).first
    result = asyncio.run(measure(url, args.jobs, args.concurrency))
    print(json.dumps({k: round(v, 1) for k, v in result.items()}))
    if result["min_ms"] < 0:
        print(f"FAIL: a job ran {-result['min_ms']:.1f} ms before its ETA", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
