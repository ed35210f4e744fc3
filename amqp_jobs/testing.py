"""Testing job code: in memory (``memory://``, with virtual time) or against RabbitMQ.

In memory, nothing touches the network, and time can be made to pass::

    broker = memory_broker("shop", virtual_time=True)
    async with JobClient("memory://shop", namespace="shop") as client:
        await client.enqueue(send_welcome, {"user_id": 1}, delay=3600)
    await run_until_idle(app.worker("memory://shop"), advance_time=True)  # milliseconds
    assert enqueued(broker, send_welcome)[0].delay == 3600

Installed with the package (entry point ``pytest11``), the pytest plugin provides:

* ``amqp_url``: ``$AMQP_URL`` if set, else the local broker if one answers, else a
  RabbitMQ started with testcontainers for the session (the header of pytest's output says
  which). With ``CI=true`` a broker that cannot be had fails the run; elsewhere the tests
  that need it are skipped with the reason.
* ``namespace``: a fresh namespace per test (a unique prefix on every exchange and
  queue), deleted after the test. Build apps and clients through it (``namespace.app()``,
  ``namespace.client()``), or run your real app in it (``namespace.worker(app)``), so it
  knows what to delete.
* ``async def`` tests run on asyncio without configuring pytest-asyncio (unless marked for
  anyio or trio).
* ``run_until_idle(worker)``: run a worker until its queues, the delay cascade and the
  worker itself hold nothing more, then stop it gracefully; on a virtual clock it can
  advance time whenever nothing else can happen (``advance_time=True``).
* ``memory_broker(name)``, ``enqueued(broker)``: a fresh in-memory broker, and what was
  enqueued on it (job, args, delay).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import json
import os
import re
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import pytest

from amqp_jobs.app import JobApp
from amqp_jobs.client import JobClient
from amqp_jobs.clock import VirtualClock
from amqp_jobs.contract import Job, TopologySettings
from amqp_jobs.contract import Namespace as ContractNamespace
from amqp_jobs.errors import ContractError, Defer, Discard, Retry
from amqp_jobs.message import H_ETA
from amqp_jobs.middleware import Middleware, Next
from amqp_jobs.outcome import JobContext
from amqp_jobs.transport import Transport, transport_for
from amqp_jobs.transport.memory import MemoryBroker, MemoryTransport
from amqp_jobs.urls import DEFAULT_URL, mask_url, resolve
from amqp_jobs.worker import Worker, WorkerStats

#: How often run_until_idle looks at the queue counts.
IDLE_POLL = 0.05
#: How long run_until_idle on RabbitMQ waits, after it last saw a job in the delay
#: cascade, before it may call the worker idle: a job a delay level dead-letters on
#: (at least once) is counted in no queue until the next takes it.
CASCADE_SETTLE = 0.5


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


@functools.cache
def _choose_broker() -> tuple[str | None, str]:
    """Where the tests' broker is (a URL, or None for testcontainers) and why, in words.
    Decided once per run, so the header and the fixture agree."""
    url = os.environ.get("AMQP_URL")
    if url:
        try:
            urls = resolve(url)
        except ContractError as exc:
            return url, f"$AMQP_URL, which is wrong: {exc}"
        return url, f"$AMQP_URL ({mask_url(urls.first) if urls.memory_name is None else url})"
    if _reachable(DEFAULT_URL, timeout=1.0) is None:
        return DEFAULT_URL, f"the local broker at {mask_url(DEFAULT_URL)} ($AMQP_URL is not set)"
    return None, (
        f"a RabbitMQ container started with testcontainers (no broker answers at"
        f" {mask_url(DEFAULT_URL)} and $AMQP_URL is not set)"
    )


def pytest_report_header(config: pytest.Config) -> str:
    """Say which broker the ``amqp_url`` fixture will use."""
    return f"amqp-jobs: tests that need a broker use {_choose_broker()[1]}"


#: Marks of the async test runners: a test with one of these is theirs.
_ASYNC_MARKS = ("asyncio", "anyio", "trio")


@pytest.hookimpl(wrapper=True)
def pytest_pycollect_makeitem(
    collector: pytest.Module | pytest.Class, name: str, obj: object
) -> Any:
    """Run an ``async def`` test on asyncio (pytest-asyncio, which the ``testing`` extra
    installs) when nothing claims it, as ``@pytest.mark.asyncio`` on it would: no
    ``asyncio_mode = auto`` needed. Only plain test functions are touched; a test marked
    for asyncio, anyio or trio (on itself, its class or module) is left alone."""
    if (
        inspect.isfunction(obj)
        and inspect.iscoroutinefunction(obj)
        and collector.istestfunction(obj, name)
        and collector.config.pluginmanager.has_plugin("asyncio")
        and (collector.config.getoption("asyncio_mode") or collector.config.getini("asyncio_mode"))
        != "auto"
        and not any(m.name in _ASYNC_MARKS for m in getattr(obj, "pytestmark", []))
        and not any(next(collector.iter_markers(m), None) for m in _ASYNC_MARKS)
    ):
        obj.pytestmark = [*getattr(obj, "pytestmark", []), pytest.mark.asyncio]  # type: ignore[attr-defined]
    return (yield)


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    """URL of the broker: $AMQP_URL (``memory://`` runs every test in memory), else the
    local broker if one answers, else a RabbitMQ started with testcontainers for the
    session. With ``CI=true`` a broker that cannot be had fails the run; elsewhere the
    tests that need it are skipped, saying why."""
    url, _ = _choose_broker()
    if url is not None:
        try:
            urls = resolve(url)
        except ContractError as exc:
            _unavailable(f"$AMQP_URL: {exc}")
        if urls.memory_name is not None:
            yield url
            return
        problem = _reachable(urls.first)
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
            _unavailable(
                f"no broker at {mask_url(DEFAULT_URL)}, AMQP_URL is not set and testcontainers"
                " is not installed (pip install 'amqp-jobs[testing]')"
            )
    try:
        container = RabbitMqContainer("rabbitmq:3.13-management-alpine")
        container.start()
    except Exception as exc:
        _unavailable(
            f"no broker at {mask_url(DEFAULT_URL)}, AMQP_URL is not set, and no RabbitMQ"
            f" container could start: {exc}"
        )
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

    @property
    def broker(self) -> MemoryBroker:
        """The in-memory broker of a ``memory://`` namespace."""
        broker = memory_broker_of(self.url)
        if broker is None:
            raise TypeError(f"{self.name} runs on RabbitMQ, not in memory")
        return broker

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
        """A Worker running ``app`` as it is registered (its handlers, hooks, middleware
        and settings), but in this namespace and on this namespace's broker; what it
        declares is deleted with the namespace. Options as ``app.worker()``'s."""
        kwargs.setdefault("grace", 5.0)
        kwargs.setdefault("hooks", app.hooks)
        kwargs.setdefault("middleware", app.worker_middleware)
        if app not in self._apps:
            self._apps.append(app)
        ns = ContractNamespace(self.name, app.settings)
        return Worker(app.registry, namespace=ns, url=self.url, **kwargs)

    def all_queues(self) -> set[str]:
        queues = set(self.queues)
        for app in self._apps:
            queues |= app.registry.queues
        for client in self._clients:
            queues |= client.declared_queues
        return queues

    async def delete(self) -> None:
        """Delete every exchange and queue of the namespace (as laid out by each of the
        settings its apps and clients used: the delay levels depend on them)."""
        for client in self._clients:
            await client.close()
        transport = transport_for(self.url)
        layouts = [self.settings]
        for settings in [app.settings for app in self._apps] + [c.settings for c in self._clients]:
            if settings not in layouts:
                layouts.append(settings)
        for settings in layouts:
            await transport.delete_namespace(self.name, self.all_queues(), settings)


@pytest.fixture
def namespace(amqp_url: str, request: pytest.FixtureRequest) -> Iterator[Namespace]:
    """A fresh namespace for this test, deleted afterwards (with ``memory://``, on a fresh
    in-memory broker of its own)."""
    name = f"t-{_slug(request.node.name)}-{uuid.uuid4().hex[:8]}"
    if resolve(amqp_url).memory_name is not None:
        memory_broker(name)
        amqp_url = f"memory://{name}"
    ns = Namespace(amqp_url, name)
    yield ns
    asyncio.run(ns.delete())


def _left_cascade_lately(worker: Worker) -> bool:
    held_at = worker.cascade_held_at
    return held_at is not None and asyncio.get_running_loop().time() - held_at < CASCADE_SETTLE


async def run_until_idle(
    worker: Worker,
    *,
    timeout: float = 30.0,
    settle_checks: int = 3,
    advance_time: bool = False,
    raise_errors: bool = False,
) -> WorkerStats:
    """Run ``worker`` until nothing is left to do, then stop it; return its stats.

    Idle means: no delivery in the worker, and the work queues, due queues and delay
    cascade are empty, seen ``settle_checks`` times in a row (a message moving between
    two queues is in neither for a moment), and on RabbitMQ, CASCADE_SETTLE seconds
    after a job was last seen in the delay cascade (the broker dead-letters it from one
    level to the next unseen). Raises TimeoutError after ``timeout``.

    ``advance_time`` (a ``memory://`` broker on a virtual clock): whenever every job
    the worker holds waits on the clock and the broker has nothing to hand out, move the
    clock to the next timer (a delay level's TTL, a job's ETA): an hour's delay and a
    day of backoffs drain in milliseconds. ``raise_errors``: re-raise the first
    exception a handler raised (after the worker stopped), instead of only retrying it.
    """
    clock = worker.clock
    if advance_time and not isinstance(clock, VirtualClock):
        raise TypeError(
            "advance_time needs a memory:// broker on a virtual clock:"
            " memory_broker(name, virtual_time=True)"
        )
    capture = _Capture()
    if raise_errors:
        worker.middleware = (*worker.middleware, capture)
    broker = memory_broker_of(worker.transport)
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
                if task.done():
                    task.result()  # the worker died: say why, not "not idle"
                    raise RuntimeError("the worker stopped by itself before it was idle")
                if broker is not None:
                    await _quiesce(worker, broker)
                quiet = quiet + 1 if await worker.pending() == 0 else 0
                if quiet >= settle_checks and broker is None and _left_cascade_lately(worker):
                    quiet = settle_checks - 1
                if quiet >= settle_checks:
                    break
                if (
                    advance_time
                    and isinstance(clock, VirtualClock)
                    and broker is not None
                    and _waits_on_time(worker, broker, clock)
                    and (due := clock.next_due()) is not None
                ):
                    clock.advance_to(due * 1_000_000)
                    quiet = 0
                    continue
                await asyncio.sleep(0 if broker is not None and quiet else IDLE_POLL)
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
    if capture.errors:
        raise capture.errors[0]
    return worker.stats


class _Capture(Middleware):
    """Keeps what handlers raised (not Retry, Discard or Defer: those steer the job)."""

    def __init__(self) -> None:
        self.errors: list[BaseException] = []

    async def attempt(self, ctx: JobContext, call_next: Next) -> Any:
        try:
            return await call_next()
        except (Retry, Discard, Defer):
            raise
        except Exception as exc:
            self.errors.append(exc)
            raise


def memory_broker_of(where: str | Transport) -> MemoryBroker | None:
    """The in-memory broker behind a URL or transport, or None for RabbitMQ."""
    transport = transport_for(where)
    return transport.broker if isinstance(transport, MemoryTransport) else None


async def _quiesce(worker: Worker, broker: MemoryBroker) -> None:
    """Let the event loop run until the broker has handed out what it can."""
    for _ in range(1000):
        await asyncio.sleep(0)
        if not broker.busy():
            return


def _waits_on_time(worker: Worker, broker: MemoryBroker, clock: VirtualClock) -> bool:
    """Nothing can happen until the clock moves: every job the worker holds sleeps on
    it, and the broker is not handing anything out."""
    return (
        not broker.dispatching()
        and broker.callbacks_running() <= clock.sleepers
        and worker.in_flight <= clock.sleepers
    )


def memory_broker(name: str = "default", *, virtual_time: bool = False) -> MemoryBroker:
    """A fresh in-memory broker for ``memory://NAME``, replacing any before it; with
    ``virtual_time`` its clock stands still until advanced (``broker.clock.advance(s)``
    or ``run_until_idle(..., advance_time=True)``)."""
    return MemoryBroker.reset(name, virtual_time=virtual_time)


@dataclass(frozen=True)
class Enqueued:
    """A job a client enqueued (not the worker's own copies: retries, re-delays)."""

    job_name: str
    job_id: str
    args: dict[str, Any]
    #: seconds from the publish to its ETA (None: due at once)
    delay: float | None
    headers: dict[str, Any]


def enqueued(broker: MemoryBroker | str, job: Job[Any] | str | None = None) -> list[Enqueued]:
    """The jobs clients enqueued on an in-memory broker, oldest first (of ``job`` only,
    if given): what a test asserts about code that enqueues."""
    if isinstance(broker, str):
        found = memory_broker_of(broker)
        if found is None:
            raise TypeError(f"{broker} is not a memory:// URL")
        broker = found
    name = job.name if isinstance(job, Job) else job
    out = []
    for published in broker.published:
        if not published.fresh:
            continue
        message = published.message
        if message.type is None or (name is not None and message.type != name):
            continue
        eta = message.headers.get(H_ETA)
        out.append(
            Enqueued(
                message.type,
                message.message_id or "",
                json.loads(message.body),
                None if eta is None else max(0.0, (eta - published.at_ms) / 1000),
                dict(message.headers),
            )
        )
    return out


async def _pending_or_unknown(worker: Worker) -> int | str:
    try:
        return await worker.pending()
    except Exception as exc:
        return f"unknown ({exc})"
