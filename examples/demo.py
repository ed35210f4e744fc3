"""End-to-end demo: a user signs up and jobs fan out, retry, wait and die, on a real broker.

Run with ``make demo`` (or ``python -m examples.demo``). Uses $AMQP_URL, else the local
broker; works in a namespace of its own and deletes it afterwards.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from urllib.parse import urlsplit

from amqp_jobs import JobClient, JobContext, JobHooks, Namespace, Outcome, OutcomeKind
from amqp_jobs.joblog import JobLog
from amqp_jobs.joblog.recorder import Recorder
from amqp_jobs.topology import dead_queue
from amqp_jobs.transport import transport_for
from amqp_jobs.transport.amqp.connection import connect
from amqp_jobs.urls import mask_url, resolve

from .shop import contracts as c

TIMEOUT = 30.0
#: The demo's job log: a SQLite file that stays after the run, for `amqp-jobs jobs`.
STORE = "sqlite:///amqp-jobs-demo.db"


@dataclass
class Row:
    job: str
    job_id: str
    enqueued: float
    eta: float | None = None
    attempts: list[tuple[float, str]] = field(default_factory=list)
    final: str = ""
    note: str = ""


class Tracker(JobHooks):
    """Collects what happened to every job, through the worker's lifecycle hook. Done
    once every job is enqueued (``arm``) and has an outcome: a periodic tick that ends
    before the first enqueue returns, or a job settled before its own enqueue returns
    (on a busy machine), must not end the demo early or lose a row."""

    def __init__(self, rows: dict[str, Row], t0: float, done: asyncio.Event) -> None:
        self.rows, self.t0, self.done = rows, t0, done
        self.armed = False

    def arm(self) -> None:
        self.armed = True
        self._check()

    def _check(self) -> None:
        if self.armed and all(r.final for r in self.rows.values()):
            self.done.set()

    async def settled(self, ctx: JobContext, outcome: Outcome) -> None:
        at = time.time() - self.t0
        if ctx.job_id not in self.rows:
            if ctx.job_id.startswith("schedule:"):  # a tick of the periodic job
                tick = datetime.fromisoformat(ctx.job_id.split("@", 1)[1]).timestamp()
                self.rows[ctx.job_id] = Row(
                    ctx.job.name, ctx.job_id, tick - self.t0, tick - self.t0
                )
            else:  # settled before its enqueue returned: the enqueue fills in the rest
                self.rows[ctx.job_id] = Row(ctx.job.name, ctx.job_id, at)
        row = self.rows[ctx.job_id]
        if outcome.kind is OutcomeKind.RETRYING:
            row.attempts.append((at, f"failed ({outcome.error.type if outcome.error else '?'})"))
        elif outcome.kind is OutcomeKind.SUCCEEDED:
            row.attempts.append((at, "ok"))
            row.final = "succeeded"
        elif outcome.kind is OutcomeKind.DEFERRED:
            row.attempts.append((at, "waited (section taken)"))
        elif outcome.kind is OutcomeKind.DEAD:
            row.attempts.append((at, "failed"))
            row.final = f"dead ({outcome.dead_reason})"
            row.note = outcome.error.message if outcome.error else ""
        self._check()


def reachable(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "localhost", parts.port or 5672), 3):
            return True
    except OSError:
        return False


def docker_available() -> bool:
    if not shutil.which("docker"):
        return False
    return subprocess.run(["docker", "info"], capture_output=True, check=False).returncode == 0


def no_broker(url: str) -> None:
    print(
        f"No RabbitMQ answers at {mask_url(url)}.\n"
        "Start one, then run `make demo` again:\n"
        "  - local server:   rabbitmq-server -detached\n"
        "                    (install it first if needed: sudo apt-get install rabbitmq-server)\n"
        "  - with Docker:    docker compose -f compose/docker-compose.yml up -d rabbitmq\n"
        "  - elsewhere:      AMQP_URL=amqp://user:pass@host:5672/ make demo",
        file=sys.stderr,
    )
    sys.exit(1)


async def run(url: str) -> None:
    from .shop.worker import app

    namespace = f"demo-{uuid.uuid4().hex[:6]}"
    app.ns = Namespace(namespace, app.settings)
    # the shop syncs stock every quarter hour; here, every 2 s, to see it in a few seconds
    del app.registry.schedules["stock-sync"]
    app.schedule(c.sync_stock, {"warehouse": "all"}, every=2, name="demo-stock-sync")
    rows: dict[str, Row] = {}
    done = asyncio.Event()
    t0 = time.time()
    tracker = Tracker(rows, t0, done)
    worker = app.worker(url, hooks=[tracker], grace=5, events=True, started_after=0)
    recorder = Recorder(STORE, namespace=namespace, url=url)
    print(f"broker {mask_url(url)}, namespace {namespace}, job log {STORE}")
    task = asyncio.create_task(worker.run())
    recording = asyncio.create_task(recorder.run())
    try:
        await asyncio.wait_for(worker.started(), 30)
        async with JobClient(url, namespace=namespace) as jobs:

            async def enqueue(job, args, **kw):  # type: ignore[no-untyped-def]
                queued = time.time() - t0
                job_id = await jobs.enqueue(job, args, **kw)
                delay = kw.get("delay")
                due = None if delay is None else queued + delay.total_seconds()
                row = rows.setdefault(job_id, Row(job.name, job_id, queued))
                row.enqueued, row.eta = queued, due

            user = c.NewUser(user_id=1042, email="ada@example.com", postcode="E1 6AN")
            print("user 1042 signs up: fanning out jobs …")
            await enqueue(c.create_crm_record, user)
            await enqueue(c.assign_fulfilment_centre, user)
            await enqueue(c.send_welcome, {"user_id": user.user_id, "email": user.email})
            await enqueue(
                c.send_reminder,
                {"user_id": user.user_id, "text": "finish your profile"},
                delay=timedelta(seconds=4),
            )
            await enqueue(c.sync_invoice, {"user_id": user.user_id, "amount_cents": 1999})
        tracker.arm()
        try:
            await asyncio.wait_for(done.wait(), TIMEOUT)
        except TimeoutError:
            print(f"not every job finished within {TIMEOUT:.0f}s", file=sys.stderr)
        job_ids = list(rows)  # a tick settling from now on is not shown
        print_table(rows[job_id] for job_id in job_ids)
        await show_dead(url, namespace)
        try:
            await asyncio.wait_for(recorded(namespace, job_ids), 10)
        except TimeoutError:
            print("the recorder has not recorded every outcome yet", file=sys.stderr)
        await show_job_log(namespace, job_ids)
    finally:
        worker.stop()
        recorder.stop()
        await asyncio.wait_for(task, 15)
        await asyncio.wait_for(recording, 15)
        await transport_for(url).delete_namespace(namespace, app.queues, app.settings)
    print(f"\nnamespace {namespace} deleted. Worker stats: {worker.stats}")
    print(
        f"Its job log stays: amqp-jobs jobs list --store {STORE} --namespace {namespace} --key 1042"
    )
    print("Run the same handlers as a worker process: amqp-jobs worker examples.shop.worker:app")


def short_id(job_id: str) -> str:
    """A job id to print: its first 8 characters, or a periodic job's tick time."""
    return "tick " + job_id[-9:-1] if job_id.startswith("schedule:") else job_id[:8]


def print_table(rows: object) -> None:
    headers = ("job", "id", "queued", "due", "attempts", "outcome")
    lines = []
    for r in rows:  # type: ignore[attr-defined]
        timeline = ", ".join(f"{what} @{at:.1f}s" for at, what in r.attempts)
        due = "now" if r.eta is None else f"{r.eta:.1f}s"
        lines.append(
            (r.job, short_id(r.job_id), f"{r.enqueued:.2f}s", due, timeline, r.final or "pending")
        )
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    print()
    print(fmt.format(*headers))
    print(fmt.format(*("-" * w for w in widths)))
    for line in lines:
        print(fmt.format(*line))


async def recorded(namespace: str, job_ids: list[str]) -> None:
    """Until the job log holds every job's outcome: the recorder writes each event a
    few milliseconds after it happened (bound it yourself)."""
    async with JobLog(STORE, namespace) as joblog:
        for _ in itertools.count():
            records = [await joblog.get(job_id) for job_id in job_ids]
            if all(r is not None and r.is_final for r in records):
                return
            await asyncio.sleep(0.05)


async def show_job_log(namespace: str, job_ids: list[str]) -> None:
    """Each job's row in the job log, as the recorder wrote it from the events."""
    async with JobLog(STORE, namespace) as joblog:
        records = [await joblog.get(job_id) for job_id in job_ids]
    print(f"\njob log ({STORE}):")
    headers = ("id", "job", "key", "state", "attempt", "took", "result or error")
    lines = []
    for job_id, r in zip(job_ids, records, strict=True):
        if r is None:
            lines.append((short_id(job_id), "-", "-", "unknown", "-", "-", "-"))
            continue
        took = "-" if r.duration_ms is None else f"{r.duration_ms:.0f} ms"
        what = f"{r.error_type}: {r.error_message}" if r.error_type else json.dumps(r.result)
        lines.append((short_id(job_id), r.job, r.key or "-", r.state, str(r.attempt), took, what))
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    print(fmt.format(*headers))
    print(fmt.format(*("-" * w for w in widths)))
    for line in lines:
        print(fmt.format(*line).rstrip())


async def show_dead(url: str, namespace: str) -> None:
    connection = await connect(url, name="demo dead-letter check")
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(dead_queue(namespace, "billing"), passive=True)
        message = await queue.get(no_ack=True, fail=False)
        if message is None:
            return
        h = message.headers
        print(f"\ndead-letter queue {queue.name}:")
        print(f"  job {message.type} {message.message_id}")
        print(f"  reason  {h.get('job-dead-reason')} after {h.get('job-attempt')} attempts")
        print(f"  error   {h.get('job-error-type')}: {h.get('job-error-message')}")
        print(f"  args    {message.body.decode()}")
    finally:
        await connection.close()


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="  worker log: %(message)s")
    url = resolve(None).first
    container = None
    if not reachable(url):
        if not os.environ.get("AMQP_URL") and docker_available():
            from testcontainers.community.rabbitmq import RabbitMqContainer

            print("no local broker; starting RabbitMQ with testcontainers …")
            container = RabbitMqContainer("rabbitmq:3.13-management-alpine").start()
            host, port = container.get_container_host_ip(), container.get_exposed_port(5672)
            url = f"amqp://{container.username}:{container.password}@{host}:{port}/"
        else:
            no_broker(url)
    try:
        asyncio.run(run(url))
    finally:
        if container is not None:
            container.stop()


if __name__ == "__main__":
    main()
