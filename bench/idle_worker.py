"""Child process of the memory benchmark: a worker with nothing due, printing 'ready'."""

from __future__ import annotations

import asyncio
import signal
import sys

from amqp_jobs import JobApp
from bench.common import URL, Signup, bench_job


async def main(ns: str) -> None:
    app = JobApp(ns)

    @app.handler(bench_job())
    async def noop(args: Signup) -> None:
        pass

    worker = app.worker(URL)
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, worker.stop)
    task = asyncio.create_task(worker.run())
    await worker.started()
    print("ready", flush=True)
    await task


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
