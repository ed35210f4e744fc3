"""Drain A/B: the worker of several checkouts, and raw aio-pika, in paired rounds.

    python -m bench.drain_ab [--rounds 7] [--jobs 20000] CHECKOUT [CHECKOUT ...]

Each round fills the queue and drains it once per side (a git checkout's directory, or
``raw`` for plain aio-pika), in alternating order, and prints each side's wall rate from
process start to empty, its start-up, its steady rate after the first job, and its
client CPU per job (getrusage of the child). The summary gives each side's ratio to raw
per round: on a machine whose speed drifts from minute to minute, a ratio within one
round is steadier than rates from different minutes. Checkouts are compiled first.
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from amqp_jobs import JobClient
from bench.common import URL, args, bench_job, cleanup, namespace

ROOT = Path(__file__).resolve().parents[1]


async def fill(ns: str, n: int) -> None:
    async with JobClient(URL, namespace=ns) as client:
        await client.enqueue_many(bench_job(), [args(i) for i in range(n)])


def drain(side: str, ns: str, n: int, prefetch: int) -> dict[str, float]:
    checkout = ROOT if side == "raw" else Path(side).resolve()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    spawned = time.time()
    out = subprocess.run(
        [sys.executable, "-m", "bench.drain_child", "raw" if side == "raw" else "worker",
         ns, str(n), str(prefetch)],
        cwd=checkout, env={**os.environ, "PYTHONPATH": str(checkout)},
        capture_output=True, text=True, check=True, timeout=600,
    )  # fmt: skip
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = json.loads(out.stdout.strip().splitlines()[-1])
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {
        "rate": n / (t["done"] - spawned),
        "startup": t["first"] - spawned,
        "steady": n / (t["done"] - t["first"]),
        "cpu_us": cpu * 1e6 / n,
    }


async def run(sides: list[str], rounds: int, n: int, prefetch: int) -> dict[str, Any]:
    for side in sides:
        if side != "raw":
            compileall.compile_dir(Path(side) / "amqp_jobs", quiet=1)
            compileall.compile_dir(Path(side) / "bench", quiet=1)
    results: dict[str, list[dict[str, float]]] = {s: [] for s in sides}
    ns = namespace("drainab")
    loop = asyncio.get_running_loop()
    try:
        for r in range(rounds):
            for side in sides if r % 2 == 0 else sides[::-1]:
                await fill(ns, n)
                got = await loop.run_in_executor(None, drain, side, ns, n, prefetch)
                results[side].append(got)
                print(side, {k: round(v, 3) for k, v in got.items()}, flush=True)
    finally:
        await cleanup(ns, {"bench"})
    summary: dict[str, Any] = {}
    for side in sides:
        rows = results[side]
        entry = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        if "raw" in results and side != "raw":
            ratios = [a["rate"] / b["rate"] for a, b in zip(rows, results["raw"], strict=True)]
            entry["ratio_per_round"] = [round(x, 2) for x in ratios]
            entry["ratio_median"] = statistics.median(ratios)
        summary[side] = entry
        print(side, {k: v if isinstance(v, list) else round(v, 3) for k, v in entry.items()})
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sides", nargs="+", help="checkout directories, or raw")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--prefetch", type=int, default=16)
    options = parser.parse_args()
    asyncio.run(run(options.sides, options.rounds, options.jobs, options.prefetch))


if __name__ == "__main__":
    main()
