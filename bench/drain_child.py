"""Child process of the drain benchmark: consume N queued jobs, then print timings as JSON.

    python -m bench.drain_child {worker|worker-events|raw} NAMESPACE N PREFETCH

``worker`` runs an amqp-jobs Worker at the given concurrency with a no-op handler
(``worker-events``: publishing lifecycle events);
``raw`` consumes the same queue with plain aio-pika, manual acks, same prefetch.
Both exit once N deliveries are acked.
"""

from __future__ import annotations

import time

STARTED = time.time()  # before the imports: process start-up counts

import asyncio  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402

import aio_pika  # noqa: E402
from aio_pika.abc import AbstractIncomingMessage  # noqa: E402

from amqp_jobs import JobApp, JobContext, JobHooks, Outcome  # noqa: E402
from amqp_jobs.topology import work_queue  # noqa: E402
from bench.common import URL, Signup, bench_job  # noqa: E402


async def run_worker(
    ns: str, n: int, concurrency: int, *, events: bool = False
) -> dict[str, float]:
    app = JobApp(ns)
    times: dict[str, float] = {}
    done = 0

    @app.handler(bench_job())
    async def noop(args: Signup) -> None:
        if "first" not in times:
            times["first"] = time.time()

    class Count(JobHooks):
        async def settled(self, ctx: JobContext, outcome: Outcome) -> None:
            nonlocal done
            done += 1
            if done == n:
                times["done"] = time.time()
                worker.stop()

    worker = app.worker(URL, concurrency=concurrency, hooks=[Count()], events=events)
    await worker.run()
    return times


async def run_raw(ns: str, n: int, prefetch: int) -> dict[str, float]:
    times: dict[str, float] = {}
    finished = asyncio.Event()
    count = 0
    connection = await aio_pika.connect(URL)
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=prefetch)
    queue = await channel.get_queue(work_queue(ns, "bench"), ensure=False)

    async def on_message(message: AbstractIncomingMessage) -> None:
        nonlocal count
        if "first" not in times:
            times["first"] = time.time()
        await message.ack()
        count += 1
        if count == n:
            times["done"] = time.time()
            finished.set()

    await queue.consume(on_message)
    await finished.wait()
    await connection.close()
    return times


def main() -> None:
    mode, ns, n, prefetch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    if mode == "raw":
        times = asyncio.run(run_raw(ns, n, prefetch))
    else:
        times = asyncio.run(run_worker(ns, n, prefetch, events=mode == "worker-events"))
    print(json.dumps({"started": STARTED, **times}))


if __name__ == "__main__":
    main()
