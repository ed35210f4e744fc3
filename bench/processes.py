"""What ``--processes N`` buys: ``amqp-jobs worker`` draining a full queue with one
process and with N, in alternating rounds.

    python -m bench.processes [--jobs 20000] [--rounds 3] [--processes 2] [--extra ...]

Each side is the real command (the supervisor and its children for N > 1), timed from
its start until the queue holds no ready job (at most a prefetch of unacked jobs per
process is still finishing then: under 0.2 % of the jobs). Prints each side's rate and
the ratio of N processes to one, per round and in median.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import time

from amqp_jobs.contract import TopologySettings
from amqp_jobs.topology import work_queue
from amqp_jobs.transport import transport_for
from bench.common import URL, cleanup, namespace
from bench.drain_ab import fill

POLL = 0.02


async def drain(ns: str, n: int, extra: list[str]) -> float:
    """Jobs per second of one ``amqp-jobs worker`` run over ``n`` queued jobs."""
    await fill(ns, n)
    link = transport_for(URL).link(ns, TopologySettings(), name="bench watch", declare=False)
    env = {**os.environ, "BENCH_NS": ns, "AMQP_URL": URL}
    began = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "amqp_jobs.cli", "worker", "bench.drain_app:app",
        "--no-success-log", "--log-level", "WARNING", *extra,
        env=env, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = began + 600
        while (await link.depth(work_queue(ns, "bench"))) != 0:
            if time.perf_counter() > deadline or proc.returncode is not None:
                raise RuntimeError(f"the worker did not drain the queue: {proc.returncode}")
            await asyncio.sleep(POLL)  # a queue's depth has no event to wait on
        took = time.perf_counter() - began
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 60)
        await link.close()
    return n / took


async def main_async(jobs: int, rounds: int, processes: int, extra: list[str]) -> float:
    ns = namespace("processes")
    one: list[float] = []
    many: list[float] = []
    sides = [([], one), (["--processes", str(processes)], many)]
    try:
        for r in range(rounds):
            for flags, rates in sides if r % 2 == 0 else sides[::-1]:
                rates.append(await drain(ns, jobs, [*flags, *extra]))
            print(
                f"round {r + 1}: 1 process {one[-1]:,.0f} jobs/s, {processes} processes"
                f" {many[-1]:,.0f} jobs/s ({many[-1] / one[-1]:.2f}x)"
            )
    finally:
        await cleanup(ns, {"bench"})
    ratio = statistics.median(m / o for m, o in zip(many, one, strict=True))
    print(
        f"median: 1 process {statistics.median(one):,.0f} jobs/s, {processes} processes"
        f" {statistics.median(many):,.0f} jobs/s: {ratio:.2f}x"
    )
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[])
    options = parser.parse_args()
    asyncio.run(main_async(options.jobs, options.rounds, options.processes, options.extra))


if __name__ == "__main__":
    main()
