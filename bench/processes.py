"""What ``--processes N`` buys: ``amqp-jobs worker`` draining a full queue with one
process and with N, in alternating rounds.

    python -m bench.processes [--jobs 20000] [--rounds 3] [--processes 2] [--work STEPS]
                              [--extra ...]

Each side is the real command (the supervisor and its children for N > 1). Two rates:
*steady*, from the first job taken until the queue holds no ready job (the drain rate:
start-up is its own figure, ``bench.run``'s start to first job), and *from launch*,
timed from the command's start. At the end at most a prefetch of unacked jobs per
process is still finishing: under 0.2 % of the jobs. ``--work`` gives every job that
many loop steps of pure-Python CPU work (0, the default: no-op jobs). Prints each side's
rates and the ratios of N processes to one, per round and in median.
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
from dataclasses import dataclass

from amqp_jobs.contract import TopologySettings
from amqp_jobs.topology import work_queue
from amqp_jobs.transport import transport_for
from bench.common import URL, cleanup, namespace
from bench.drain_ab import fill

POLL = 0.02


@dataclass
class Rates:
    steady: float
    launch: float


async def drain(ns: str, n: int, extra: list[str], work: int) -> Rates:
    """Jobs per second of one ``amqp-jobs worker`` run over ``n`` queued jobs."""
    await fill(ns, n)
    link = transport_for(URL).link(ns, TopologySettings(), name="bench watch", declare=False)
    env = {**os.environ, "BENCH_NS": ns, "AMQP_URL": URL, "BENCH_WORK": str(work)}
    queue = work_queue(ns, "bench")
    began = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "amqp_jobs.cli", "worker", "bench.drain_app:app",
        "--no-success-log", "--log-level", "WARNING", *extra,
        env=env, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = began + 600
        first: tuple[float, int] | None = None  # when the depth first fell, and to what
        while (depth := await link.depth(queue)) != 0:
            if first is None and depth < n:
                first = time.perf_counter(), depth
            if time.perf_counter() > deadline or proc.returncode is not None:
                raise RuntimeError(f"the worker did not drain the queue: {proc.returncode}")
            await asyncio.sleep(POLL)  # a queue's depth has no event to wait on
        ended = time.perf_counter()
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 60)
        await link.close()
    if first is None:  # drained between two polls: no steady state to time
        first = began, n
    return Rates(steady=first[1] / max(ended - first[0], POLL), launch=n / (ended - began))


async def main_async(
    jobs: int, rounds: int, processes: int, extra: list[str], work: int = 0
) -> dict[str, float]:
    """The median ratios of N processes to one: ``steady`` and ``launch``, with the
    median rates they come from."""
    ns = namespace("processes")
    one: list[Rates] = []
    many: list[Rates] = []
    sides = [([], one), (["--processes", str(processes)], many)]
    try:
        for r in range(rounds):
            for flags, rates in sides if r % 2 == 0 else sides[::-1]:
                rates.append(await drain(ns, jobs, [*flags, *extra], work))
            print(
                f"round {r + 1}: steady {one[-1].steady:,.0f} against"
                f" {many[-1].steady:,.0f} jobs/s ({many[-1].steady / one[-1].steady:.2f}x);"
                f" from launch {one[-1].launch:,.0f} against {many[-1].launch:,.0f} jobs/s"
                f" ({many[-1].launch / one[-1].launch:.2f}x)"
            )
    finally:
        await cleanup(ns, {"bench"})
    out = {
        "one": statistics.median(r.steady for r in one),
        "many": statistics.median(r.steady for r in many),
        "steady": statistics.median(m.steady / o.steady for m, o in zip(many, one, strict=True)),
        "launch": statistics.median(m.launch / o.launch for m, o in zip(many, one, strict=True)),
    }
    print(
        f"median, {'no-op jobs' if not work else f'{work:,} steps of work per job'}:"
        f" 1 process {out['one']:,.0f} jobs/s, {processes} processes {out['many']:,.0f}"
        f" jobs/s: {out['steady']:.2f}x steady, {out['launch']:.2f}x from launch"
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--work", type=int, default=0, help="loop steps of CPU work per job")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[])
    options = parser.parse_args()
    asyncio.run(
        main_async(options.jobs, options.rounds, options.processes, options.extra, options.work)
    )


if __name__ == "__main__":
    main()
