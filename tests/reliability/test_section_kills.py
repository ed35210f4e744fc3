"""Critical sections under SIGKILL: never two jobs of one key at once, every job runs,
none waits behind a dead holder, and a section costs little.

WORKERS worker processes at CONCURRENCY run JOBS exclusive jobs over KEYS keys (group
"ledger", one job at a time per key). Every handler appends its start and end to a
ledger file of its process, unbuffered. Worker processes are SIGKILLed at random
moments, KILLS times, and replaced. At the end, per key, no two runs overlap (a run
cut by a kill ends when its process died, as its lock did), every job ran to its end,
and the workers' own report says what a section cost its job (reported, not
asserted: `python -m bench.sections_cost` measures it), beside what the same claim
costs from this test's own event loop, which is nearly idle.

The full run (FULL: 4 workers at concurrency 32, 10,000 jobs over 100 keys) runs with
``AMQP_JOBS_SOAK=1``, once with 2 to 10 ms jobs and once with 200 to 400 ms ones;
without it, a smaller one proves the same with the short jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from amqp_jobs.sections import lock_names
from amqp_jobs.testing import Namespace
from amqp_jobs.transport import transport_for
from tests.reliability.harness import REPORTS
from tests.support import WorkerProcess, eventually, ledger_write

SOAK = os.environ.get("AMQP_JOBS_SOAK", "").lower() in ("1", "true", "yes")
FULL = {"workers": 4, "concurrency": 32, "jobs": 10_000, "keys": 100, "kills": 10}
SHORT = {"workers": 2, "concurrency": 16, "jobs": 600, "keys": 20, "kills": 2}
SIZE = FULL if SOAK else SHORT
#: A job's work (ms, uniform), the worker's from its environment. 2 to 10 ms jobs crowd
#: the sections, and drain so fast that the run saturates this machine's 2 cores: every
#: step of a claim's round trip then waits its turn in a busy event loop. 200 to 400 ms
#: jobs leave the cores room, and show what a section costs where they have it.
#: AMQP_JOBS_SECTION_WORK_MS=a,b runs only that.
WORK_ENV = "AMQP_JOBS_SECTION_WORK_MS"
WORK_MS = tuple(float(x) for x in os.environ.get(WORK_ENV, "2,10").split(","))
PROFILES = (
    [os.environ[WORK_ENV]]
    if os.environ.get(WORK_ENV)
    else ["2,10", "200,400"]
    if SOAK
    else ["2,10"]
)
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


async def probe_claims(namespace: Namespace, stop: asyncio.Event) -> list[float]:
    """Meanwhile, the same claim (and free) from this process, whose event loop is
    nearly idle: what a section's round trip costs where the loop is not saturated,
    against the same broker under the same load (ms, one every 20 ms)."""
    (name,) = lock_names(namespace.name, "probe", "probe", 1)
    session = await transport_for(namespace.url).session(name="probe", give_up_after=10)
    took: list[float] = []
    try:
        while not stop.is_set():
            began = time.perf_counter()
            assert await asyncio.wait_for(session.claim(name), 10), "nobody else takes it"
            took.append((time.perf_counter() - began) * 1000)
            await session.release(name)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.02)
        await session.delete_queue(name)
    finally:
        await session.close()
    return sorted(took)


def count_quarantined(directory: Path) -> int:
    """Deliveries the workers (killed ones too) quarantined: held by two workers killed
    in turn, most waiting for their ETA or a slot. Each runs alone, its worker drained
    first, which slows a run down."""
    return sum(
        path.read_text().count("quarantining it to run alone")
        for path in directory.glob("*.worker-*.out")
    )


def read_ledgers(paths: list[Path]) -> list[dict[str, object]]:
    lines = []
    for path in paths:
        if path.exists():
            lines += [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return lines


@pytest.mark.parametrize("work_ms", PROFILES)
async def test_sections_hold_under_kills(
    namespace: Namespace, tmp_path: Path, work_ms: str
) -> None:
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
            env={"REL_NS": namespace.name, WORK_ENV: work_ms},
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
    probing = asyncio.Event()
    probe = asyncio.ensure_future(probe_claims(namespace, probing))
    try:
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
    finally:
        probing.set()  # a run that fails closes the probe's session too
    probed = await asyncio.wait_for(probe, 30)
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
    quarantined = count_quarantined(tmp_path)
    p50 = statistics.median(costs) if costs else float("nan")
    lasted = statistics.median(b - a for spans in runs.values() for a, b, _ in spans) * 1000
    report = (
        f"critical sections: {jobs} jobs over {keys} keys, {SIZE['workers']} workers at"
        f" concurrency {SIZE['concurrency']}, {SIZE['kills']} SIGKILLs, {took:.0f} s;"
        f" {len(overlaps)} overlaps, {jobs - len(ended())} jobs never ended, {len(open_runs)}"
        f" runs cut by a kill; a section cost its job p50 {p50:.1f} ms"
        f" (per surviving worker: {', '.join(f'{c:.1f}' for c in costs)}), which let in"
        f" {let_in} ({handed_over} handed over in the worker) and turned away"
        f" {turned_away}; a handler's {work_ms.replace(',', ' to ')} ms sleep lasted p50"
        f" {lasted:.1f} ms; the same claim from the test's own (idle) event loop took p50"
        f" {statistics.median(probed):.1f} ms; {quarantined} deliveries quarantined"
    )
    print(report)
    REPORTS.append(report)
    assert not overlaps, overlaps[:10]
    assert costs, "the workers stopped without their critical sections' summary"
