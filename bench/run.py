"""The benchmark suite: amqp-jobs against raw aio-pika doing the same AMQP work.

    python -m bench.run [--runs 5] [--jobs 20000] [--skip memory,delay,inmemory] [--output FILE]

Each comparison alternates amqp-jobs and the raw aio-pika baseline on the same broker,
queue type and queue, ``--runs`` times, and prints the median with min-max and the
ratio to the baseline (above 1.0 means faster than raw). Results go to
bench/results/latest.json as well. See bench/README.md for what each workload measures.
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import aio_pika

from amqp_jobs import JobClient, JobContext, RetryPolicy
from amqp_jobs.message import CONTENT_TYPE, Envelope
from amqp_jobs.topology import jobs_exchange, work_queue
from amqp_jobs.transport.amqp.connection import connect
from bench.common import (
    URL,
    Signup,
    Spread,
    args,
    bench_job,
    broker_pid,
    cleanup,
    cpu_seconds,
    left_in,
    namespace,
    queue_depth,
    rss_mb,
)
from bench.delay_precision import measure as measure_delays
from bench.first_delay import bench_first_delay
from bench.first_delay import report_line as first_delay_line
from bench.joblog_lookup import bench_joblog
from bench.joblog_lookup import report_line as joblog_line

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


@dataclass
class Comparison:
    """One figure measured for amqp-jobs and the baseline in alternating runs."""

    name: str
    unit: str
    ours: list[float] = field(default_factory=list)
    raw: list[float] = field(default_factory=list)
    higher_is_better: bool = True
    target: float | None = None  # minimum ratio ours/raw (for rates) expected

    def ratios(self) -> list[float]:
        pairs = zip(self.ours, self.raw, strict=True)
        if self.higher_is_better:
            return [o / r for o, r in pairs]
        return [r / o for o, r in pairs]

    def to_json(self) -> dict[str, Any]:
        return {
            "unit": self.unit,
            "amqp_jobs": Spread.of(self.ours).to_json(),
            "raw_aio_pika": Spread.of(self.raw).to_json(),
            "ratio": Spread.of(self.ratios()).to_json(),
            "target_ratio": self.target,
        }


# -- workload 1: enqueue ------------------------------------------------------------

#: Enqueues per sequential run: one at a time is slow (a round trip each).
SEQUENTIAL_JOBS = 5_000
#: The second concurrent-enqueue row: calls gathered this many at a time, as a service
#: publishing under load has them (all 20,000 at once keep 20,000 calls' objects alive,
#: and Python's garbage collector then dominates)
IN_FLIGHT = 1_000


def raw_message(i: int) -> aio_pika.Message:
    """What a careful raw aio-pika publisher sends: the same body, properties, headers."""
    envelope = Envelope.new("bench.signup", json.dumps(args(i)).encode(), "bench")
    return aio_pika.Message(
        envelope.body,
        content_type=CONTENT_TYPE,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=envelope.job_id,
        type=envelope.job_name,
        timestamp=envelope.enqueued_at,
        headers=envelope.headers(),
    )


async def enqueue_raw(ns: str, n: int, width: int | None = None) -> float:
    """Seconds to publish ``n`` jobs gathered ``width`` at a time (default: all at once)."""
    connection = await aio_pika.connect(URL)
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.get_exchange(jobs_exchange(ns), ensure=False)
        began = time.perf_counter()
        for start in range(0, n, width or n):
            await asyncio.gather(
                *(
                    exchange.publish(raw_message(i), "bench.signup", mandatory=True)
                    for i in range(start, min(n, start + (width or n)))
                )
            )
        return time.perf_counter() - began
    finally:
        await connection.close()


async def sequential_cpu(ns: str, n: int, ours: bool) -> float:
    """Client CPU per job (µs) of ``n`` enqueues awaited one at a time: validation,
    encoding and the publish path, without the overlap concurrent calls allow."""
    job = bench_job()
    if ours:
        async with JobClient(URL, namespace=ns) as client:
            await client.enqueue(job, args(-1))  # connect and declare outside the timing
            began = time.process_time()
            for i in range(n):
                await client.enqueue(job, args(i))
            return (time.process_time() - began) * 1e6 / n
    connection = await aio_pika.connect(URL)
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.get_exchange(jobs_exchange(ns), ensure=False)
        began = time.process_time()
        for i in range(n):
            body = json.dumps(args(i)).encode()  # a raw publisher encodes its jobs too
            message = aio_pika.Message(
                body, content_type=CONTENT_TYPE, delivery_mode=aio_pika.DeliveryMode.PERSISTENT
            )
            await exchange.publish(message, "bench.signup", mandatory=True)
        return (time.process_time() - began) * 1e6 / n
    finally:
        await connection.close()


async def enqueue_ours(ns: str, n: int, many: bool, width: int | None = None) -> float:
    """Seconds to enqueue ``n`` jobs: one ``enqueue_many``, or ``enqueue`` calls gathered
    ``width`` at a time (default: all at once)."""
    job = bench_job()
    async with JobClient(URL, namespace=ns) as client:
        await client.enqueue(job, args(-1))  # connect and declare outside the timing
        began = time.perf_counter()
        if many:
            await client.enqueue_many(job, [args(i) for i in range(n)])
        else:
            for start in range(0, n, width or n):
                end = min(n, start + (width or n))
                await asyncio.gather(*(client.enqueue(job, args(i)) for i in range(start, end)))
        return time.perf_counter() - began


async def purge(ns: str) -> None:
    connection = await connect(URL, name="bench purge")
    try:
        channel = await connection.channel()
        queue = await channel.get_queue(work_queue(ns, "bench"), ensure=False)
        await queue.purge()
    finally:
        await connection.close()


async def bench_enqueue(n: int, runs: int, beam: int | None) -> list[Comparison]:
    ns = namespace("enqueue")
    loop_cmp = Comparison("enqueue (concurrent calls)", "jobs/s", target=0.9)
    narrow = Comparison(f"enqueue ({IN_FLIGHT:,} calls in flight at a time)", "jobs/s")
    many_cmp = Comparison("enqueue_many", "jobs/s", target=1.0)
    cpu = Comparison("broker CPU per 1,000 enqueued", "CPU ms", higher_is_better=False, target=None)
    sequential = Comparison(
        "enqueue, awaited one by one: client CPU per job", "µs", higher_is_better=False,
        target=1 / 1.3,
    )  # fmt: skip
    try:
        async with JobClient(URL, namespace=ns) as client:
            await client.enqueue(bench_job(), args(0))
        for run in range(runs):
            order = ["raw", "ours", "many", "raw-narrow", "ours-narrow"]
            if run % 2:
                order.reverse()
            seconds: dict[str, float] = {}
            broker: dict[str, float] = {}
            for kind in order:
                await purge(ns)
                before = cpu_seconds(beam)
                width = IN_FLIGHT if kind.endswith("-narrow") else None
                if kind.startswith("raw"):
                    seconds[kind] = await enqueue_raw(ns, n, width)
                else:
                    seconds[kind] = await enqueue_ours(ns, n, kind == "many", width)
                after = cpu_seconds(beam)
                if before is not None and after is not None:
                    broker[kind] = (after - before) * 1000 / (n / 1000)
            loop_cmp.raw.append(n / seconds["raw"])
            loop_cmp.ours.append(n / seconds["ours"])
            many_cmp.raw.append(n / seconds["raw"])
            many_cmp.ours.append(n / seconds["many"])
            narrow.raw.append(n / seconds["raw-narrow"])
            narrow.ours.append(n / seconds["ours-narrow"])
            if broker:
                cpu.raw.append(broker["raw"])
                cpu.ours.append(broker["ours"])
            for ours in (True, False) if run % 2 == 0 else (False, True):
                await purge(ns)
                per_job = await sequential_cpu(ns, min(n, SEQUENTIAL_JOBS), ours)
                (sequential.ours if ours else sequential.raw).append(per_job)
    finally:
        await cleanup(ns, {"bench"})
    return [loop_cmp, narrow, many_cmp, sequential] + ([cpu] if cpu.ours else [])


# -- workload 2: drain --------------------------------------------------------------


def drain_child(mode: str, ns: str, n: int, prefetch: int, observe: str = "") -> dict[str, float]:
    spawned = time.time()
    result = subprocess.run(
        [sys.executable, "-m", "bench.drain_child", mode, ns, str(n), str(prefetch)],
        cwd=ROOT,
        env={**os.environ, "AMQP_URL": URL, "PYTHONPATH": str(ROOT), "BENCH_OBSERVE": observe},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    exited = time.time()
    if result.returncode != 0:
        raise RuntimeError(f"{mode} drain failed: {result.stderr[-2000:]}")
    times: dict[str, float] = json.loads(result.stdout.strip().splitlines()[-1])
    return {**times, "spawned": spawned, "exited": exited}


async def fill(ns: str, n: int) -> None:
    async with JobClient(URL, namespace=ns) as client:
        await client.enqueue_many(bench_job(), [args(i) for i in range(n)])


#: The CPU-bound jobs of the second ``--processes`` row: loop steps per job (about 1 ms
#: of CPU here), and how many jobs (at most ``--jobs``)
PROCESSES_WORK = 50_000
PROCESSES_WORK_JOBS = 6_000

#: The prefetch at which raw aio-pika drains fastest here (16, 100 and 200 measured:
#: 100 and 200 tie, 16 is 3 % slower): the baseline of "at its best".
RAW_BEST_PREFETCH = 100


async def bench_drain(n: int, runs: int, beam: int | None) -> list[Comparison]:
    from amqp_jobs.worker import DEFAULT_CONCURRENCY

    ns = namespace("drain")
    rate = Comparison(f"drain {n:,} jobs (process start to empty)", "jobs/s", target=0.95)
    best = Comparison(
        f"drain, defaults vs raw at prefetch {RAW_BEST_PREFETCH}", "jobs/s", target=0.9
    )
    observed = Comparison("drain, metrics + every trace (raw: neither)", "jobs/s", target=0.95)
    sampled = Comparison("drain, metrics + 10% of traces (raw: neither)", "jobs/s", target=0.95)
    startup = Comparison("start-up: process start to first job", "s", higher_is_better=False)
    cpu = Comparison("broker CPU per 1,000 drained", "CPU ms", higher_is_better=False)
    sides = [
        ("raw", DEFAULT_CONCURRENCY, ""),
        ("raw", RAW_BEST_PREFETCH, ""),
        ("worker", DEFAULT_CONCURRENCY, ""),
        ("worker-observed", DEFAULT_CONCURRENCY, "metrics,tracing"),
        ("worker-observed", DEFAULT_CONCURRENCY, "metrics,sampled"),
    ]
    try:
        for run in range(runs):
            got: dict[tuple[str, int, str], dict[str, float]] = {}
            for mode, prefetch, observe in sides if run % 2 == 0 else sides[::-1]:
                await fill(ns, n)
                connection = await connect(URL, name="bench check")
                queued = await queue_depth(connection, work_queue(ns, "bench"))
                await connection.close()
                if queued != n:
                    raise RuntimeError(f"{n} jobs enqueued for {mode}, {queued} in the queue")
                before = cpu_seconds(beam)
                loop = asyncio.get_running_loop()
                times = await loop.run_in_executor(
                    None, drain_child, mode, ns, n, prefetch, observe
                )
                after = cpu_seconds(beam)
                connection = await connect(URL, name="bench check")
                left = await left_in(connection, work_queue(ns, "bench"))
                await connection.close()
                if left:
                    seen = times.get("redelivered", 0)
                    raise RuntimeError(f"{mode} left {left} in the queue, saw {seen:g} redelivered")
                times["rate"] = n / (times["done"] - times["spawned"])
                times["startup"] = times["first"] - times["spawned"]
                if before is not None and after is not None:
                    times["broker_ms"] = (after - before) * 1000 / (n / 1000)
                got[(mode, prefetch, observe)] = times
            raw, raw_best = got[sides[0]], got[sides[1]]
            ours, ours_observed, ours_sampled = got[sides[2]], got[sides[3]], got[sides[4]]
            rate.ours.append(ours["rate"])
            rate.raw.append(raw["rate"])
            best.ours.append(ours["rate"])
            best.raw.append(raw_best["rate"])
            observed.ours.append(ours_observed["rate"])
            observed.raw.append(ours["rate"])
            sampled.ours.append(ours_sampled["rate"])
            sampled.raw.append(ours["rate"])
            startup.ours.append(ours["startup"])
            startup.raw.append(raw["startup"])
            if "broker_ms" in ours and "broker_ms" in raw:
                cpu.ours.append(ours["broker_ms"])
                cpu.raw.append(raw["broker_ms"])
    finally:
        await cleanup(ns, {"bench"})
    return [rate, best, observed, sampled, startup] + ([cpu] if cpu.ours else [])


# -- workload 3: retry round trip ---------------------------------------------------


async def bench_retry(n: int) -> dict[str, Any]:
    ns = namespace("retry")
    from amqp_jobs import Job, JobApp

    job = Job("bench.flaky", Signup, queue="bench", retry=RetryPolicy(max_attempts=3, backoff=0))
    app = JobApp(ns)
    succeeded: dict[str, int] = {}
    done = asyncio.Event()

    warmed = asyncio.Event()

    @app.handler(job)
    async def flaky(args: Signup, ctx: JobContext) -> None:
        if args.user_id < 0:  # the warm-up job, outside the count
            warmed.set()
            return
        if ctx.attempt == 1:
            raise RuntimeError("first attempt fails")
        succeeded[ctx.job_id] = succeeded.get(ctx.job_id, 0) + 1
        if len(succeeded) == n:
            done.set()

    worker = app.worker(URL)
    task = asyncio.create_task(worker.run())
    try:
        await worker.started()
        async with JobClient(URL, namespace=ns) as client:
            await client.enqueue(job, args(-1), delay=0.2)  # declare the cascade first
            await asyncio.wait_for(warmed.wait(), 30)
            began = time.perf_counter()
            ids = await client.enqueue_many(job, [args(i) for i in range(n)])
        await asyncio.wait_for(done.wait(), 300)
        seconds = time.perf_counter() - began
    finally:
        worker.stop()
        await task
        await cleanup(ns, {"bench"})
    exactly_once = all(succeeded.get(i) == 1 for i in ids)
    return {"jobs": n, "seconds": seconds, "all_succeeded_exactly_once": exactly_once}


# -- workload 5: memory with pending delays -----------------------------------------


async def bench_memory(n: int) -> dict[str, Any]:
    ns = namespace("memory")
    child = subprocess.Popen(  # noqa: ASYNC220 - a long-lived child, not awaited
        [sys.executable, "-m", "bench.idle_worker", ns],
        cwd=ROOT,
        env={**os.environ, "AMQP_URL": URL, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        loop = asyncio.get_running_loop()
        ready = await loop.run_in_executor(None, child.stdout.readline)
        if "ready" not in ready:
            raise RuntimeError("the idle worker did not start")
        before = rss_mb(child.pid)
        async with JobClient(URL, namespace=ns) as client:
            job = bench_job()
            for start in range(0, n, 10_000):
                await client.enqueue_many(
                    job, [args(i) for i in range(start, min(n, start + 10_000))],
                    delay=timedelta(hours=1),
                )  # fmt: skip
        await asyncio.sleep(2)  # let the worker receive anything it would receive
        after = rss_mb(child.pid)
        connection = await connect(URL, name="bench check")
        in_work_queue = await queue_depth(connection, work_queue(ns, "bench"))
        await connection.close()
    finally:
        child.terminate()
        child.wait(30)
        await cleanup(ns, {"bench"})
    return {
        "pending_delayed_jobs": n,
        "rss_before_mb": before,
        "rss_after_mb": after,
        "growth_mb": after - before,
        "jobs_in_work_queue": in_work_queue,
        "target_growth_mb": 20,
    }


# -- workload 6: the in-memory broker ---------------------------------------------


def _counting(n: int, done: asyncio.Event) -> Callable[[Signup], Awaitable[None]]:
    """A no-op handler that sets ``done`` when it has run ``n`` times."""
    ran = 0

    async def noop(payload: Signup) -> None:
        nonlocal ran
        ran += 1
        if ran == n:
            done.set()

    return noop


async def drain_in_memory(name: str, n: int, middleware: Sequence[Any] = ()) -> tuple[float, float]:
    """``n`` no-op jobs on a fresh ``memory://`` broker ``name``, in this process:
    seconds of ``enqueue_many`` (validate, encode, publish, route), then of the worker's
    pipeline (consume, decode, admit, run, decide, settle) until the last job ran."""
    from amqp_jobs import JobApp
    from amqp_jobs.testing import memory_broker

    memory_broker(name)
    app = JobApp(name, middleware=middleware)
    job = bench_job()
    done = asyncio.Event()
    app.add_handler(job, _counting(n, done))

    url = f"memory://{name}"
    began = time.perf_counter()
    async with JobClient(url, namespace=name) as client:
        for start in range(0, n, 10_000):
            batch = [args(i) for i in range(start, min(n, start + 10_000))]
            await client.enqueue_many(job, batch)
    enqueued = time.perf_counter()
    worker = app.worker(url)
    task = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(done.wait(), 600)
    finally:
        ended = time.perf_counter()
        worker.stop()
        await task
    return enqueued - began, ended - enqueued


async def bench_inmemory(n: int, runs: int) -> dict[str, Any]:
    """No-op jobs on ``memory://``, in one process: ``enqueue_many``, then the worker's
    pipeline until the last job ran (``drain_in_memory``). No baseline: there is nothing
    to compare with."""
    enqueue_rates: list[float] = []
    pipeline_rates: list[float] = []
    for run in range(runs):
        enqueue_s, pipeline_s = await drain_in_memory(f"bench-{run}", n)
        enqueue_rates.append(n / enqueue_s)
        pipeline_rates.append(n / pipeline_s)
    return {
        "jobs": n,
        "enqueue_jobs_per_s": Spread.of(enqueue_rates).to_json(),
        "pipeline_jobs_per_s": Spread.of(pipeline_rates).to_json(),
        "target_jobs_per_s": 20_000,
    }


# -- workload 7: the sync client from threads ----------------------------------------

SYNC_THREADS = 16


def enqueue_sync(ns: str, n: int) -> float:
    """SYNC_THREADS threads, each enqueueing n / SYNC_THREADS jobs one at a time (as
    request handlers do), through one shared SyncJobClient; the seconds it took."""
    import threading

    from amqp_jobs import SyncJobClient

    job = bench_job()
    per = n // SYNC_THREADS
    with SyncJobClient(URL, namespace=ns) as client:
        client.enqueue(job, args(-1))  # connect and declare outside the timing
        start = threading.Barrier(SYNC_THREADS + 1)

        def work(first: int) -> None:
            start.wait()
            for i in range(first, first + per):
                client.enqueue(job, args(i))

        threads = [threading.Thread(target=work, args=(t * per,)) for t in range(SYNC_THREADS)]
        for thread in threads:
            thread.start()
        start.wait()
        began = time.perf_counter()
        for thread in threads:
            thread.join()
        return time.perf_counter() - began


async def bench_sync(n: int, runs: int) -> list[Comparison]:
    """The sync client from 16 threads against the async client's gathered enqueues
    (the "raw" column of this row)."""
    ns = namespace("sync")
    total = n // SYNC_THREADS * SYNC_THREADS
    cmp = Comparison("enqueue, 16 threads, SyncJobClient", "jobs/s", target=0.7)
    try:
        async with JobClient(URL, namespace=ns) as client:
            await client.enqueue(bench_job(), args(0))
        for run in range(runs):
            for kind in ["async", "sync"] if run % 2 == 0 else ["sync", "async"]:
                await purge(ns)
                if kind == "sync":
                    cmp.ours.append(total / await asyncio.to_thread(enqueue_sync, ns, total))
                else:
                    cmp.raw.append(total / await enqueue_ours(ns, total, many=False))
    finally:
        await cleanup(ns, {"bench"})
    return [cmp]


# -- report -------------------------------------------------------------------------


def report(comparisons: list[Comparison], extra: dict[str, Any]) -> str:
    rows = []
    for c in comparisons:
        digits = 3 if c.unit == "s" else 0 if c.unit == "jobs/s" else 1
        ratio = Spread.of(c.ratios())
        target = f"  target ≥ {c.target:.2f}x" if c.target else ""
        rows.append(
            f"{c.name:<44} {Spread.of(c.ours).fmt(' ' + c.unit, digits):>34}"
            f"   raw {Spread.of(c.raw).fmt(' ' + c.unit, digits):>34}"
            f"   {ratio.median:.2f}x ({ratio.low:.2f}-{ratio.high:.2f}){target}"
        )
    lines = ["amqp-jobs vs raw aio-pika (median of alternating runs, min-max)", ""]
    lines += rows
    if any(c.name.startswith("enqueue, 16 threads") for c in comparisons):
        lines.append("(16 threads, SyncJobClient: its 'raw' is the async JobClient's gather)")
    if "processes" in extra:
        p = extra["processes"]
        lines.append(
            f"\n--processes 2 vs one process (target ≥ 1.6x; 2 cores shared with the broker):"
            f"\n  {p['jobs']:,} no-op jobs: {p['noop']['steady']:.2f}x steady"
            f" ({p['noop']['launch']:.2f}x from launch)"
            f"\n  {p['work_jobs']:,} jobs of {p['work_steps']:,} loop steps (~1 ms of CPU):"
            f" {p['work']['steady']:.2f}x steady ({p['work']['launch']:.2f}x from launch)"
        )
    if "retry" in extra:
        r = extra["retry"]
        lines.append(
            f"\nretry round trip: {r['jobs']:,} jobs failing once, {r['seconds']:.2f} s,"
            f" all succeeded exactly once: {r['all_succeeded_exactly_once']}"
        )
    if "delay" in extra:
        d = extra["delay"]
        lines.append(
            f"delay precision: {d['jobs']} jobs over 1-10 s, lateness p50 {d['p50_ms']:.1f} ms,"
            f" p99 {d['p99_ms']:.1f} ms, max {d['max_ms']:.1f} ms, min {d['min_ms']:.1f} ms"
            " (target p99 ≤ 5 ms, never negative)"
        )
    if "inmemory" in extra:
        m, p, e = extra["inmemory"], extra["inmemory"]["pipeline_jobs_per_s"], None
        e = m["enqueue_jobs_per_s"]
        lines.append(
            f"in-memory broker (memory://), {m['jobs']:,} no-op jobs in one process: worker"
            f" pipeline {p['median']:,.0f} jobs/s ({p['min']:,.0f}-{p['max']:,.0f}; target"
            f" ≥ 20,000), enqueue_many {e['median']:,.0f} jobs/s ({e['min']:,.0f}-{e['max']:,.0f})"
        )
    if "first_delay" in extra:
        lines.append(first_delay_line(extra["first_delay"]))
    if "events" in extra:
        from bench.events_cost import report_line as events_line

        lines.append(events_line(extra["events"]))
    if "joblog" in extra:
        lines += [joblog_line(kind, result) for kind, result in extra["joblog"].items()]
    if "memory" in extra:
        m = extra["memory"]
        lines.append(
            f"memory: {m['pending_delayed_jobs']:,} jobs delayed 1 h, worker RSS"
            f" {m['rss_before_mb']:.1f} → {m['rss_after_mb']:.1f} MB"
            f" (+{m['growth_mb']:.1f} MB, target < {m['target_growth_mb']} MB)"
        )
    return "\n".join(lines)


def compile_bytecode() -> None:
    """Compile amqp-jobs and the bench as ``pip install`` does. Without it, a machine
    with PYTHONDONTWRITEBYTECODE set (this one, CI) compiles every module of ours at
    each child's start, while aio-pika comes precompiled from site-packages: start-up
    and drain figures then measure the compiler."""
    for package in ("amqp_jobs", "bench"):
        compileall.compile_dir(ROOT / package, quiet=1)


async def main_async(options: argparse.Namespace) -> dict[str, Any]:
    compile_bytecode()
    beam = broker_pid()
    skip = set(options.skip.split(",")) if options.skip else set()
    comparisons: list[Comparison] = []
    extra: dict[str, Any] = {}
    if "enqueue" not in skip:
        comparisons += await bench_enqueue(options.jobs, options.runs, beam)
    if "drain" not in skip:
        comparisons += await bench_drain(options.jobs, options.runs, beam)
    if "processes" not in skip:
        from bench.processes import main_async as bench_processes

        noop = await bench_processes(options.jobs, 3, 2, [])
        work_jobs = min(PROCESSES_WORK_JOBS, options.jobs)
        work = await bench_processes(work_jobs, 3, 2, [], PROCESSES_WORK)
        extra["processes"] = {
            "jobs": options.jobs,
            "noop": noop,
            "work_jobs": work_jobs,
            "work_steps": PROCESSES_WORK,
            "work": work,
        }
    if "retry" not in skip:
        extra["retry"] = await bench_retry(options.retry_jobs)
    if "delay" not in skip:
        extra["delay"] = await measure_delays(URL, options.delay_jobs, 16)
    if "memory" not in skip:
        extra["memory"] = await bench_memory(options.memory_jobs)
    if "inmemory" not in skip:
        extra["inmemory"] = await bench_inmemory(options.jobs, options.runs)
    if "firstdelay" not in skip:
        extra["first_delay"] = await bench_first_delay(max(options.runs, 5))
    if "sync" not in skip:
        comparisons += await bench_sync(options.jobs, options.runs)
    if "events" not in skip:
        from bench.events_cost import bench_events  # it builds on this module

        extra["events"] = await bench_events(options.jobs, options.runs)
    if "joblog" not in skip:  # needs PostgreSQL too ($AMQP_JOBS_PG_URL)
        extra["joblog"] = await bench_joblog(options.joblog_rows, ["sqlite", "postgres"])
    print(report(comparisons, extra))
    return {
        "broker_cpu_measured": beam is not None,
        "jobs": options.jobs,
        "runs": options.runs,
        "comparisons": {c.name: c.to_json() for c in comparisons},
        **extra,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="amqp-jobs benchmarks against raw aio-pika")
    parser.add_argument("--runs", type=int, default=5, help="alternating runs per comparison")
    parser.add_argument("--jobs", type=int, default=20_000, help="jobs per enqueue/drain run")
    parser.add_argument("--retry-jobs", type=int, default=1_000)
    parser.add_argument("--delay-jobs", type=int, default=1000)
    parser.add_argument("--memory-jobs", type=int, default=100_000)
    parser.add_argument("--joblog-rows", type=int, default=1_000_000, help="jobs in the job log")
    parser.add_argument(
        "--skip",
        default="",
        help="comma-separated: enqueue,drain,processes,retry,delay,memory,inmemory,sync,"
        "firstdelay,events,joblog",
    )
    parser.add_argument("--output", default=str(RESULTS / "latest.json"))
    options = parser.parse_args(argv)
    results = asyncio.run(main_async(options))
    out = Path(options.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nresults written to {out}")


if __name__ == "__main__":
    main()
