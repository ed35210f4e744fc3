"""Critical sections under SIGKILL: never two jobs of one key at once, every job runs,
none waits behind a dead holder, and a section costs little.

WORKERS worker processes at CONCURRENCY run JOBS exclusive jobs over KEYS keys (group
"ledger", one job at a time per key). Every handler appends its start and end to a
ledger file of its process, unbuffered. Worker processes are SIGKILLed at random
moments, KILLS times, and replaced. At the end, per key, no two runs overlap (a run
cut by a kill ends when its process died, as its lock did), every job ran to its end,
and the workers' own report says what a section cost its job (reported, not
asserted: `python -m bench.sections_cost` measures it).

The full run (FULL_*: 4 workers at concurrency 32, 10,000 jobs over 100 keys) runs
with ``AMQP_JOBS_SOAK=1``; without it, a smaller one proves the same.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import re
import signal
import statistics
import time
from collections import defaultdict
from pathlib import Path

import pytest
from pydantic import BaseModel

from amqp_jobs import Job, JobApp, JobContext
from amqp_jobs.testing import Namespace
from tests.reliability.harness import REPORTS
from tests.support import WorkerProcess, eventually, ledger_write

SOAK = os.environ.get("AMQP_JOBS_SOAK", "").lower() in ("1", "true", "yes")
FULL = {"workers": 4, "concurrency": 32, "jobs": 10_000, "keys": 100, "kills": 10}
SHORT = {"workers": 2, "concurrency": 16, "jobs": 600, "keys": 20, "kills": 2}
SIZE = FULL if SOAK else SHORT
#: A job's work (ms, uniform): short by default, to crowd the sections; set
#: AMQP_JOBS_SECTION_WORK_MS=50,100 to see the cost on a machine that is not saturated.
WORK_MS = tuple(float(x) for x in os.environ.get("AMQP_JOBS_SECTION_WORK_MS", "2,10").split(","))
SEED = 31

pytestmark = pytest.mark.timeout(1200 if SOAK else 240)

APP = "tests.reliability.test_section_kills:app"


class Entry(BaseModel):
    account: int
    n: int


POST = Job("ledger.post", Entry, queue="ledger", key="account", exclusive="ledger")

app = JobApp(os.environ.get("REL_NS", "rel"))


@app.handler(POST)
async def post(args: Entry, ctx: JobContext) -> None:
    pid = os.getpid()
    ledger_write({"e": "start", "n": args.n, "key": args.account, "t": time.time(), "pid": pid})
    await asyncio.sleep(random.uniform(*WORK_MS) / 1000)  # the work
    ledger_write({"e": "end", "n": args.n, "key": args.account, "t": time.time(), "pid": pid})


def read_ledgers(paths: list[Path]) -> list[dict[str, object]]:
    lines = []
    for path in paths:
        if path.exists():
            lines += [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return lines


async def test_sections_hold_under_kills(namespace: Namespace, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    namespace.track(POST)
    ledgers: list[Path] = []
    killed_at: dict[int, float] = {}
    workers: dict[int, WorkerProcess] = {}

    def start_worker() -> None:
        path = tmp_path / f"ledger-{len(ledgers)}.jsonl"
        ledgers.append(path)
        w = WorkerProcess(
            namespace,
            path,
            "--concurrency",
            str(SIZE["concurrency"]),
            "--no-success-log",
            app=APP,
            env={"REL_NS": namespace.name},
        )
        workers[w.proc.pid] = w

    for _ in range(SIZE["workers"]):
        start_worker()
    jobs, keys = SIZE["jobs"], SIZE["keys"]
    async with namespace.client() as client:
        await client.enqueue_many(POST, [{"account": n % keys, "n": n} for n in range(jobs)])

    ends: set[object] = set()
    read_to: dict[Path, int] = {}

    def ended() -> set[object]:
        """Jobs that ran to their end, reading only what the ledgers gained: parsing
        them whole every 50 ms took half a core from the workers being measured."""
        for path in ledgers:
            if not path.exists():
                continue
            with path.open("rb") as f:
                f.seek(read_to.get(path, 0))
                data = f.read()
            whole = data[: data.rfind(b"\n") + 1]  # a line being written waits
            read_to[path] = read_to.get(path, 0) + len(whole)
            ends.update(x["n"] for x in map(json.loads, whole.splitlines()) if x["e"] == "end")
        return ends

    started = time.monotonic()
    for k in range(SIZE["kills"]):
        # kill at a random share of the way through the jobs
        target = jobs * (k + 1) / (SIZE["kills"] + 1) * rng.uniform(0.8, 1.0)
        await eventually(lambda t=target: len(ended()) >= t, timeout=180, what="progress")
        pid = rng.choice(sorted(workers))
        killed_at[pid] = time.time()
        workers.pop(pid).kill()
        start_worker()
    await eventually(lambda: len(ended()) == jobs, timeout=300, what="every job's end")
    took = time.monotonic() - started
    costs: list[float] = []
    let_in = handed_over = turned_away = 0
    for w in workers.values():
        w.signal(signal.SIGTERM)
    for w in list(workers.values()):
        await w.wait(30)
        text = w.output_path.read_text()
        print(*[x for x in text.splitlines() if "critical sections:" in x], sep="\n")
        m = re.search(r"p50 ([\d.]+) ms, p99 ([\d.]+) ms", text)
        if m:
            costs.append(float(m[1]))
        m = re.search(r"(\d+) let in \((\d+) handed over [^)]*\), (\d+) turned away", text)
        if m:
            let_in, handed_over = let_in + int(m[1]), handed_over + int(m[2])
            turned_away += int(m[3])

    # never two runs of one key at once: a run cut by a kill ended when its process died
    runs: dict[object, list[tuple[float, float, object]]] = defaultdict(list)
    open_runs: dict[tuple[object, object], float] = {}
    for x in sorted(read_ledgers(ledgers), key=lambda x: float(x["t"])):
        if x["e"] == "start":
            open_runs[(x["n"], x["pid"])] = float(x["t"])
        else:
            begun = open_runs.pop((x["n"], x["pid"]))
            runs[x["key"]].append((begun, float(x["t"]), x["n"]))
    for (n, pid), begun in open_runs.items():
        assert pid in killed_at, f"job {n} started in {pid}, which was not killed, and never ended"
        key = n % keys
        runs[key].append((begun, killed_at[pid], n))
    overlaps = []
    for key, spans in runs.items():
        spans.sort()
        for (_, a1, an), (b0, _, bn) in itertools.pairwise(spans):
            if b0 < a1:
                overlaps.append((key, an, bn, round(a1 - b0, 4)))
    p50 = statistics.median(costs) if costs else float("nan")
    lasted = statistics.median(b - a for spans in runs.values() for a, b, _ in spans) * 1000
    report = (
        f"critical sections: {jobs} jobs over {keys} keys, {SIZE['workers']} workers at"
        f" concurrency {SIZE['concurrency']}, {SIZE['kills']} SIGKILLs, {took:.0f} s;"
        f" {len(overlaps)} overlaps, {jobs - len(ended())} jobs never ended, {len(open_runs)}"
        f" runs cut by a kill; a section cost its job p50 {p50:.1f} ms"
        f" (per surviving worker: {', '.join(f'{c:.1f}' for c in costs)}), which let in"
        f" {let_in} ({handed_over} handed over in the worker) and turned away"
        f" {turned_away}; a handler's {WORK_MS[0]:g} to {WORK_MS[1]:g} ms sleep lasted p50"
        f" {lasted:.1f} ms"
    )
    print(report)
    REPORTS.append(report)
    assert not overlaps, overlaps[:10]
    assert costs, "the workers stopped without their critical sections' summary"
