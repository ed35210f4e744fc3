"""A pytest plugin for testing job code against a real RabbitMQ.

Installed with the package (entry point ``pytest11``), it provides:

* ``amqp_url``: ``$AMQP_URL`` if set, else a RabbitMQ started with testcontainers for the
  session. With ``CI=true`` a broker that cannot be reached fails the run; elsewhere the
  tests that need it are skipped with the reason.
* ``namespace``: a fresh namespace per test (a unique prefix on every exchange and
  queue), deleted after the test. Build apps and clients through it (``namespace.app()``,
  ``namespace.client()``) so it knows what to delete.
* ``run_until_idle(worker)``: run a worker until its queues, the delay cascade and the
  worker itself hold nothing more, then stop it gracefully.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest

from amqp_jobs.app import JobApp
from amqp_jobs.client import JobClient
from amqp_jobs.connection import connect, mask_url
from amqp_jobs.contract import Job
from amqp_jobs.topology import TopologySettings, delete_namespace
from amqp_jobs.worker import Worker, WorkerStats

#: How often run_until_idle looks at the queue counts.
IDLE_POLL = 0.05


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _unavailable(reason: str) -> None:
    if _in_ci():
        pytest.fail(f"RabbitMQ is required under CI=true: {reason}", pytrace=False)
    pytest.skip(reason)


def _reachable(url: str, timeout: float = 3.0) -> str | None:
    """None if something accepts TCP connections at the URL's host and port, else why not."""
    parts = urlsplit(url)
    default = 5671 if parts.scheme == "amqps" else 5672
    host, port = parts.hostname or "localhost", parts.port or default
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return f"no broker at {mask_url(url)} ({exc})"


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    """URL of a running RabbitMQ: $AMQP_URL, else a testcontainers one for the session."""
    url = os.environ.get("AMQP_URL")
    if url:
        problem = _reachable(url)
        if problem:
            _unavailable(f"{problem}; start one with `rabbitmq-server -detached` or unset AMQP_URL")
        yield url
        return
    try:
        from testcontainers.community.rabbitmq import RabbitMqContainer
    except ImportError:
        try:
            from testcontainers.rabbitmq import RabbitMqContainer
        except ImportError:
            _unavailable("AMQP_URL is not set and testcontainers is not installed")
    try:
        container = RabbitMqContainer("rabbitmq:3.13-management-alpine")
        container.start()
    except Exception as exc:
        _unavailable(f"AMQP_URL is not set and no RabbitMQ container could start: {exc}")
    try:
        host = container.get_container_host_ip()
        port = container.get_exposed_port(container.port)
        yield f"amqp://{container.username}:{container.password}@{host}:{port}/"
    finally:
        container.stop()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-")[:24] or "t"


class Namespace:
    """A test's own namespace; deletes what it declared when the test ends."""

    def __init__(self, url: str, name: str, settings: TopologySettings | None = None) -> None:
        self.url = url
        self.name = name
        self.settings = settings or TopologySettings()
        self.queues: set[str] = set()
        self._apps: list[JobApp] = []
        self._clients: list[JobClient] = []

    def __str__(self) -> str:
        return self.name

    def track(self, *items: str | Job[Any]) -> None:
        """Have teardown delete these work queues (names or jobs' queues)."""
        for item in items:
            self.queues.add(item.queue if isinstance(item, Job) else item)

    def app(self, **kwargs: Any) -> JobApp:
        """A JobApp in this namespace."""
        kwargs.setdefault("settings", self.settings)
        app = JobApp(self.name, **kwargs)
        self._apps.append(app)
        return app

    def client(self, url: str | None = None, **kwargs: Any) -> JobClient:
        """A JobClient for this namespace (use ``async with``); ``url`` overrides the broker's."""
        kwargs.setdefault("settings", self.settings)
        client = JobClient(url or self.url, namespace=self.name, **kwargs)
        self._clients.append(client)
        return client

    def worker(self, app: JobApp, **kwargs: Any) -> Worker:
        """A Worker for ``app`` on this namespace's broker."""
        kwargs.setdefault("grace", 5.0)
        return app.worker(self.url, **kwargs)

    def all_queues(self) -> set[str]:
        queues = set(self.queues)
        for app in self._apps:
            queues |= app.registry.queues
        for client in self._clients:
            queues |= client.declared_queues
        return queues

    async def delete(self) -> None:
        """Delete every exchange and queue of the namespace."""
        for client in self._clients:
            await client.close()
        connection = await connect(self.url, name=f"cleanup {self.name}", give_up_after=10)
        try:
            await delete_namespace(connection, self.name, self.all_queues(), self.settings)
        finally:
            await connection.close()


@pytest.fixture
def namespace(amqp_url: str, request: pytest.FixtureRequest) -> Iterator[Namespace]:
    """A fresh namespace for this test, deleted afterwards."""
    ns = Namespace(amqp_url, f"t-{_slug(request.node.name)}-{uuid.uuid4().hex[:8]}")
    yield ns
    asyncio.run(ns.delete())


async def run_until_idle(
    worker: Worker,
    *,
    timeout: float = 30.0,
    settle_checks: int = 3,
) -> WorkerStats:
    """Run ``worker`` until nothing is left to do, then stop it; return its stats.

    Idle means: no delivery in the worker, and the work queues, due queues and delay
    cascade are empty, seen ``settle_checks`` times in a row (a message moving between
    two queues is in neither for a moment). Raises TimeoutError after ``timeout``.
    """
    task = asyncio.create_task(worker.run())
    try:
        async with asyncio.timeout(timeout):
            started = asyncio.ensure_future(worker.started())
            await asyncio.wait({started, task}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                started.cancel()
                task.result()  # raises why the worker stopped
            quiet = 0
            while quiet < settle_checks:
                quiet = quiet + 1 if await worker.pending() == 0 else 0
                if quiet < settle_checks:
                    await asyncio.sleep(IDLE_POLL)
    except TimeoutError:
        pending = await _pending_or_unknown(worker)
        worker.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, worker.grace + 5)
        raise TimeoutError(
            f"worker not idle after {timeout}s: {pending} messages pending, stats {worker.stats}"
        ) from None
    worker.stop()
    await asyncio.wait_for(task, worker.grace + 5)
    return worker.stats


async def _pending_or_unknown(worker: Worker) -> int | str:
    try:
        return await worker.pending()
    except Exception as exc:
        return f"unknown ({exc})"
