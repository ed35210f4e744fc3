"""Prometheus metrics: the middleware counts and times jobs on both sides (RabbitMQ and
memory://); a worker serves them on loopback and runs on when its port is taken; under
--processes the supervisor serves every child's, and they match the ledger exactly
after a child is killed."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from pydantic import BaseModel

from amqp_jobs import Job, JobContext
from amqp_jobs.errors import ContractError, Discard
from amqp_jobs.metrics import Metrics, parse_address
from amqp_jobs.testing import Namespace
from tests.integration.process_app import WORK
from tests.integration.test_processes import children, stopped, supervisor
from tests.support import eventually


class N(BaseModel):
    n: int


COUNTED = Job("metrics.counted", N, queue="metered")


async def test_jobs_are_counted_and_timed_on_both_sides(namespace: Namespace) -> None:
    metrics = Metrics(CollectorRegistry())
    app = namespace.app(middleware=[metrics])
    done = asyncio.Event()
    ran = 0

    @app.handler(COUNTED)
    async def counted(args: N, ctx: JobContext) -> None:
        nonlocal ran
        running = metrics.registry.get_sample_value(
            "amqp_jobs_jobs_running", {"queue": "metered", "job": COUNTED.name}
        )
        assert running is not None and running >= 1
        ran += 1
        if ran == 6:
            done.set()
        if args.n == 0:
            raise Discard("no")

    worker = namespace.worker(app)
    task = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(worker.started(), 15)
        async with namespace.client(middleware=[metrics]) as client:
            for n in range(6):
                await client.enqueue(COUNTED, {"n": n})
        await asyncio.wait_for(done.wait(), 15)

        def value(name: str, **labels: str) -> float:
            return metrics.registry.get_sample_value(name, labels) or 0.0

        job = {"queue": "metered", "job": COUNTED.name}
        await eventually(
            lambda: value("amqp_jobs_jobs_total", **job, outcome="succeeded") == 5, timeout=10
        )
        await eventually(lambda: value("amqp_jobs_jobs_total", **job, outcome="dead") == 1)
        assert value("amqp_jobs_published_total", **job) == 6
        assert value("amqp_jobs_publish_confirm_seconds_count", queue="metered") == 6
        assert value("amqp_jobs_job_duration_seconds_count", **job) == 6
        assert value("amqp_jobs_job_wait_seconds_count", **job) == 6
        assert value("amqp_jobs_jobs_running", **job) == 0
    finally:
        worker.stop()
        await asyncio.wait_for(task, 20)


def test_a_metrics_address_is_loopback_unless_told() -> None:
    assert parse_address("9464") == ("127.0.0.1", 9464)
    assert parse_address(":9464") == ("127.0.0.1", 9464)
    assert parse_address("0.0.0.0:9") == ("0.0.0.0", 9)
    assert parse_address("[::1]:9464") == ("::1", 9464)
    for bad in ("", "x", "host:", "1:99999"):
        with pytest.raises(ContractError, match="--metrics"):
            parse_address(bad)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> tuple[str, float]:
    began = time.perf_counter()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return text, time.perf_counter() - began


def sample(text: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"{name}\{{(.*)\}} (\S+)$", line)
        if m and all(f'{k}="{v}"' in m[1] for k, v in labels.items()):
            total += float(m[2])
    return total


@pytest.mark.rabbitmq_only
async def test_a_taken_port_is_an_error_and_the_worker_runs_on(
    namespace: Namespace, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        worker, ledger = supervisor(namespace, tmp_path, "--metrics", str(port))
        try:
            async with namespace.client() as client:
                await client.enqueue(WORK, {"n": 1, "ms": 1})
            await eventually(lambda: ledger.ended() == {1}, timeout=30, what="the job")
            assert await stopped(worker, 30) == 0
            out = worker.output_path.read_text()
            assert f"metrics: cannot serve on 127.0.0.1:{port} (Address already in use)" in out
        finally:
            worker.stop_now()


@pytest.mark.rabbitmq_only
async def test_the_supervisor_serves_every_child_and_the_counts_match_the_ledger(
    namespace: Namespace, tmp_path: Path
) -> None:
    """4 children, one SIGKILLed mid-run: succeeded jobs counted equal the ledger's,
    nothing runs when all is done, and a scrape takes under 50 ms."""
    port = free_port()
    sup, ledger = supervisor(
        namespace, tmp_path, "--processes", "4", "-c", "4", "--metrics", str(port)
    )
    try:
        await eventually(lambda: len(children(sup.output_path)) == 4, timeout=30, what="4 children")
        jobs = 800
        async with namespace.client() as client:
            await client.enqueue_many(WORK, [{"n": n, "ms": 10} for n in range(jobs)])
        await eventually(lambda: len(ledger.ended()) >= jobs // 3, timeout=60, what="progress")
        os.kill(children(sup.output_path)[2][-1], signal.SIGKILL)
        await eventually(lambda: len(ledger.ended()) == jobs, timeout=120, what="every job")
        oks = lambda: sum(1 for x in ledger.lines() if x["e"] == "ok")  # noqa: E731

        def counted() -> bool:
            text, _ = scrape(port)
            return sample(text, "amqp_jobs_jobs_total", outcome="succeeded") == oks()

        await eventually(counted, timeout=15, what="the counters to match the ledger")
        text, _ = scrape(port)
        assert sample(text, "amqp_jobs_jobs_running") == 0, "a dead child's jobs are not running"
        assert sample(text, "amqp_jobs_job_duration_seconds_count") >= jobs
        assert "amqp_jobs_queue_messages" in text
        times = sorted(scrape(port)[1] for _ in range(10))
        assert times[5] < 0.05, f"a scrape took {times[5] * 1000:.0f} ms"
        print(f"counted {oks()} succeeded = ledger; scrape p50 {times[5] * 1000:.1f} ms")
    finally:
        assert await stopped(sup) == 0
