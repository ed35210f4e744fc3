"""Helpers shared by the integration and reliability suites (fixtures: amqp_jobs.testing)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, NoReturn

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel

from amqp_jobs import Worker
from amqp_jobs.contract import TopologySettings
from amqp_jobs.message import Message
from amqp_jobs.testing import Namespace, memory_broker_of
from amqp_jobs.transport import Link, transport_for

ROOT = Path(__file__).resolve().parents[1]


async def eventually(
    check: Callable[[], Awaitable[bool]] | Callable[[], bool],
    *,
    timeout: float = 15.0,
    interval: float = 0.05,
    what: str = "condition",
) -> None:
    """Poll ``check`` until true; fail with ``what`` after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


@asynccontextmanager
async def running(
    worker: Worker, *, start_within: float = 15.0, stop_within: float = 20.0
) -> AsyncIterator[Worker]:
    """``worker`` running in a task for the block: started (within ``start_within``
    seconds) when it is entered, stopped gracefully and awaited when it is left."""
    task = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(worker.started(), start_within)
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(task, stop_within)


@asynccontextmanager
async def channel(url: str) -> AsyncIterator[AbstractChannel]:
    connection = await aio_pika.connect(url, client_properties={"connection_name": "test helper"})
    try:
        yield await connection.channel()
    finally:
        await connection.close()


def _link(url: str) -> Link:
    """A link that declares nothing, for the helpers below (RabbitMQ or memory://)."""
    return transport_for(url).link("test", TopologySettings(), name="test helper", declare=False)


async def queue_count(url: str, name: str, *, missing_ok: bool = False) -> int:
    """Messages ready in a queue (RabbitMQ or memory://); a missing queue fails the test
    unless ``missing_ok`` (a delay level is declared once a job first needs it)."""
    link = _link(url)
    try:
        depth = await link.depth(name)
    finally:
        await link.close()
    assert depth is not None or missing_ok, f"no queue {name}"
    return depth or 0


async def count_once_settled(url: str, name: str, expected: int, *, timeout: float = 10.0) -> int:
    """Queue ``name``'s ready count: ``expected`` as soon as it reads so, else the last
    count after ``timeout`` s. Messages a closed channel held come back to a quorum queue
    a moment after the close has returned: a count read at once can miss them."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        count = await queue_count(url, name)
        if count == expected or loop.time() > deadline:
            return count
        await asyncio.sleep(0.05)


async def declare(ns: Namespace, queue: str, job_names: set[str] | None = None) -> None:
    """Declare a work queue of the namespace (RabbitMQ or memory://), tracked for cleanup."""
    ns.track(queue)
    link = transport_for(ns.url).link(ns.name, ns.settings, name="test helper")
    try:
        await link.declare_queue(queue, job_names or set())
    finally:
        await link.close()


class Admin:
    """Raw broker operations a test needs, on RabbitMQ or memory:// alike."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.memory = memory_broker_of(url)

    async def declare_exchange(self, name: str, kind: str = "direct") -> None:
        if self.memory is not None:
            self.memory.declare_exchange(name, kind)
            return
        async with channel(self.url) as ch:
            await ch.declare_exchange(name, kind, durable=True)

    async def declare_queue(
        self,
        name: str,
        arguments: dict[str, Any] | None = None,
        *,
        bind: tuple[str, str] | None = None,
    ) -> None:
        """A durable queue, bound to ``bind`` = (exchange, key) if given."""
        if self.memory is not None:
            self.memory.declare_queue(name, arguments or {})
            if bind:
                self.memory.bind(bind[0], name, bind[1])
            return
        async with channel(self.url) as ch:
            q = await ch.declare_queue(name, durable=True, arguments=arguments)
            if bind:
                await q.bind(bind[0], bind[1])

    async def delete_queue(self, name: str) -> None:
        if self.memory is not None:
            self.memory.delete_queue(name)
            return
        async with channel(self.url) as ch:
            await ch.queue_delete(name)

    async def purge(self, name: str) -> None:
        if self.memory is not None:
            self.memory.purge(name)
            return
        async with channel(self.url) as ch:
            await (await ch.declare_queue(name, passive=True)).purge()


async def put(url: str, queue_name: str, message: Message, *, exchange: str = "") -> None:
    """Publish straight into one queue (or to ``exchange`` with key ``queue_name``),
    confirmed (RabbitMQ or memory://)."""
    link = _link(url)

    async def send() -> None:
        if exchange:
            await link.publish(exchange, queue_name, message)
        else:
            await link.send_to_queue(queue_name, message)

    try:
        await link.retrying(send, give_up_after=10)
    finally:
        await link.close()


async def drain(url: str, name: str, expected: int, timeout: float = 15.0) -> list[Message]:
    """Take ``expected`` messages off a queue (RabbitMQ or memory://), waiting for them to
    arrive; fails if more are there."""
    got: list[Message] = []
    link = _link(url)
    try:

        async def take() -> bool:
            while len(got) < expected:
                message = await link.take(name)
                if message is None:
                    return False
                got.append(message)
            return True

        await eventually(take, timeout=timeout, what=f"{expected} messages in {name}")
        assert await link.take(name) is None, f"more than {expected} in {name}"
    finally:
        await link.close()
    return got


class WorkerProcess:
    """``amqp-jobs worker`` in a child process, for signal and crash tests."""

    def __init__(
        self,
        ns: Namespace,
        log_path: Path,
        *extra: str,
        env: dict[str, str] | None = None,
        app: str = "tests.integration.sample_app:app",
    ) -> None:
        self.log_path = log_path
        full_env = {
            **os.environ,
            "AMQP_URL": ns.url,
            "SAMPLE_NS": ns.name,
            "SAMPLE_LOG": str(log_path),
            "REL_NS": ns.name,
            "REL_LOG": str(log_path),
            "PYTHONPATH": str(ROOT),
            **(env or {}),
        }
        # Output goes to a file, not a pipe: a chatty worker (reconnects, say) fills a pipe
        # nobody reads until the end, then blocks on its next log line.
        self.output_path = log_path.with_name(log_path.name + f".worker-{id(self)}.out")
        with open(self.output_path, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "amqp_jobs.cli", "worker", app, *extra],
                env=full_env,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
            )

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.proc.send_signal(signum)

    def kill(self) -> None:
        self.proc.kill()  # SIGKILL

    async def wait(self, timeout: float = 30.0) -> int:
        loop = asyncio.get_running_loop()
        return await asyncio.wait_for(loop.run_in_executor(None, self.proc.wait), timeout)

    def output(self) -> str:
        if self.proc.poll() is None:
            return ""
        return self.output_path.read_text()

    def stop_now(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


async def exit_or_parked(
    worker: WorkerProcess, url: str, dead: str, timeout: float = 60.0
) -> int | None:
    """The worker's exit status, or None once a job is in ``dead``. The broker
    dead-letters the poison job (at-least-once) a moment after the crash that used up its
    deliveries: a worker started before it lands finds nothing to crash on."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        status = worker.proc.poll()
        if status is not None:
            return status
        if await queue_count(url, dead) >= 1:
            return None
        if loop.time() > deadline:
            pytest.fail(f"the worker neither crashed nor saw the poison job parked in {timeout}s")
        await asyncio.sleep(0.25)  # each look opens a connection: not too often


def ledger_write(line: dict[str, object]) -> None:
    """Append ``line`` to the ledger file ``$REL_LOG`` of a worker process's handler, in
    one unbuffered write: a process killed at any moment leaves every line it wrote."""
    import json

    fd = os.open(os.environ["REL_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, (json.dumps(line) + "\n").encode())
    finally:
        os.close(fd)


def read_log(path: Path) -> list[dict[str, Any]]:
    import json

    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


MANAGEMENT = os.environ.get("AMQP_MANAGEMENT_URL", "http://127.0.0.1:15672")


def require_management() -> None:
    """Skip (fail under CI) unless the RabbitMQ management API answers."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(MANAGEMENT + "/api/overview", timeout=3):
            return
    except urllib.error.HTTPError:
        return  # it answers (401 without credentials)
    except OSError:
        pass
    message = (
        f"no RabbitMQ management API at {MANAGEMENT} (rabbitmq-plugins enable rabbitmq_management)"
    )
    unavailable(message)


def unavailable(reason: str) -> NoReturn:
    """Skip a test whose requirement this machine lacks; under CI=true, fail it instead."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


#: The PostgreSQL server the job log's tests use (a database of their own on it).
PG_URL = os.environ.get("AMQP_JOBS_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


@contextmanager
def private_pg_database(prefix: str = "amqp_jobs_t") -> Iterator[str]:
    """A database of the caller's own on the PostgreSQL server, dropped afterwards: its
    URL. Unreachable: skipped, or a failure under CI=true."""
    import asyncpg

    from amqp_jobs.joblog import redact

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"

    async def admin(sql: str) -> None:
        connection = await asyncpg.connect(PG_URL, timeout=5)
        try:
            await connection.execute(sql)
        finally:
            await connection.close()

    try:
        asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        unavailable(f"PostgreSQL at {redact(PG_URL)} is not reachable: {exc!r}")
    base, _, query = PG_URL.partition("?")
    try:
        yield base.rsplit("/", 1)[0] + f"/{name}" + (f"?{query}" if query else "")
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
