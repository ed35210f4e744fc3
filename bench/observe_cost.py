"""What metrics and tracing cost per job, where nothing else moves: the worker's whole
pipeline on ``memory://`` in one process, with and without the observing middleware.

    python -m bench.observe_cost [--jobs 20000] [--runs 5] [SIDE ...]

A side is ``none`` or a ``$BENCH_OBSERVE`` value of the drain benchmark (``metrics``,
``sampled``: tracing with 10 % of traces sampled, ``tracing``: every trace, ``off``: a
tracer that samples nothing, or several joined by commas); default: ``none metrics
sampled metrics,sampled metrics,tracing``. Each run enqueues N no-op jobs, then times
the worker until the last one ran, sides in alternating order. Prints each side's
microseconds per job (median and minimum of the runs) and what it adds to ``none``.
On RabbitMQ a no-op job costs the worker about 180 µs of CPU: divide by that for the
share of a drain.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics

from bench.drain_child import observing
from bench.run import drain_in_memory

SIDES = ["none", "metrics", "sampled", "metrics,sampled", "metrics,tracing"]


async def per_job(side: str, n: int, run: int) -> float:
    """Microseconds per job of the worker's pipeline over ``n`` queued no-op jobs."""
    os.environ["BENCH_OBSERVE"] = side
    middleware = [] if side == "none" else observing()
    _, pipeline = await drain_in_memory(f"observe-{side.replace(',', '-')}-{run}", n, middleware)
    return pipeline / n * 1e6


async def main_async(sides: list[str], n: int, runs: int) -> dict[str, list[float]]:
    got: dict[str, list[float]] = {side: [] for side in sides}
    for run in range(runs):
        for side in sides if run % 2 == 0 else sides[::-1]:
            got[side].append(await per_job(side, n, run))
    base = statistics.median(got[sides[0]])
    for side in sides:
        median = statistics.median(got[side])
        print(
            f"{side:<20} {median:6.1f} µs/job (min {min(got[side]):.1f})"
            f"  +{median - base:5.1f} µs over {sides[0]}"
        )
    return got


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("sides", nargs="*", default=SIDES)
    options = parser.parse_args()
    asyncio.run(main_async(options.sides, options.jobs, options.runs))


if __name__ == "__main__":
    main()
