"""Publishing from sync code (Flask, Django, scripts, threads): ``SyncJobClient``.

A ``JobClient`` belongs to one event loop, and a sync view has none. So a
``SyncJobClient`` runs its own: one daemon thread per client and process, with an event
loop and a ``JobClient``, started by the first call. A call validates and encodes in the
caller's thread (bad input raises there, before anything is sent), hands the prepared
envelope to that loop, and waits for the confirm, bounded.

Forking (gunicorn's workers, multiprocessing) leaves the parent's thread behind: a child
that uses a client inherited from its parent starts its own thread and connection, and
never touches the parent's loop or socket. At interpreter exit every client still open
is closed, within ``CLOSE_TIMEOUT``.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import contextvars
import functools
import logging
import math
import os
import ssl
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, Self

from amqp_jobs.client import BATCH_WINDOW, JobClient
from amqp_jobs.contract import ArgsT, Job, Namespace, TopologySettings
from amqp_jobs.durations import seconds
from amqp_jobs.errors import BrokerUnavailableError, ContractError, PublishTimeoutError
from amqp_jobs.message import Envelope
from amqp_jobs.middleware import Middleware
from amqp_jobs.transport import Transport
from amqp_jobs.urls import BrokerURLs

log = logging.getLogger("amqp_jobs.sync_client")

#: Seconds a caller waits past a call's own bound (the client's loop may be busy).
MARGIN = 1.0
#: Seconds close() (and interpreter exit) gives calls in flight and the connection.
CLOSE_TIMEOUT = 5.0


class _Call:
    """One call handed to the loop; the caller waits on ``done``, a held lock that the
    loop releases (lighter than a concurrent Future, and one is made per job). It runs
    in a copy of the caller's context variables, so a publish middleware sees what the
    caller's thread set (the current span: an enqueue joins the caller's trace)."""

    __slots__ = ("abandoned", "args", "context", "done", "error", "fn", "result", "task")

    def __init__(self, fn: Callable[..., Coroutine[Any, Any, Any]], args: tuple[Any, ...]) -> None:
        self.fn = fn
        self.args = args
        self.context = contextvars.copy_context()
        self.done = threading.Lock()
        self.done.acquire()
        self.result: Any = None
        self.error: BaseException | None = None
        self.task: asyncio.Task[Any] | None = None
        #: the caller stopped waiting: do not start it (set on the loop's thread)
        self.abandoned = False

    def finish(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled():  # the client closed under it (or the caller gave up)
            self.error = PublishTimeoutError(
                "the SyncJobClient was closed before the broker answered; the job may or"
                " may not be stored"
            )
        elif (error := task.exception()) is not None:
            self.error = error
        else:
            self.result = task.result()
        self.done.release()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.done.release()

    def abandon(self) -> None:
        self.abandoned = True
        if self.task is not None:
            self.task.cancel()


class _Runner:
    """The thread and event loop of one client in one process, with its JobClient."""

    def __init__(self, client: JobClient, name: str) -> None:
        self.client = client
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        #: calls handed over and not yet started; one wakeup of the loop starts them all
        self.pending: deque[_Call] = deque()
        self.woken = False
        #: the loop is ending (no call starts any more), and has ended
        self.stopping = False
        self.stopped = False
        self.stop_requested = False
        self.in_flight: set[asyncio.Task[Any]] = set()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()
        _RUNNERS.add(self)

    def _run(self) -> None:
        loop = self.loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            # as asyncio.run() ends: nothing left pending to be destroyed with the loop
            self.stopping = True
            try:
                tasks = asyncio.all_tasks(loop)
                for task in tasks:
                    task.cancel()
                if tasks:
                    loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                asyncio.set_event_loop(None)
                loop.close()
                self.stopped = True
                self._fail_pending()

    # -- calls ----------------------------------------------------------------------

    def call(
        self,
        bound: float,
        fn: Callable[..., Coroutine[Any, Any, Any]],
        *args: Any,
        timeout: Callable[[float], Exception] | None = None,
    ) -> Any:
        """Run ``fn(*args)`` on the loop; its result, or its error raised here. Past
        ``bound`` seconds, the call is cancelled and ``timeout(bound)`` raised
        (PublishTimeoutError by default)."""
        if threading.get_ident() == self.thread.ident:
            raise ContractError(
                "a SyncJobClient cannot be called from its own thread (from a publish"
                " middleware): await a JobClient there"
            )
        call = _Call(fn, args)
        self.pending.append(call)
        if self.stopped:
            self._fail_pending()
        elif not self.woken:
            self.woken = True
            try:
                self.loop.call_soon_threadsafe(self._start_pending)
            except RuntimeError:  # the loop closed meanwhile
                self._fail_pending()
        if not call.done.acquire(timeout=bound):
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(call.abandon)
            if timeout is not None:
                raise timeout(bound)
            raise PublishTimeoutError(
                f"no answer within {bound:.1f}s from {self.client.urls}; the job may or may"
                " not be stored"
            )
        if call.error is not None:
            raise call.error
        return call.result

    def _start_pending(self) -> None:
        """On the loop: start every call handed over since the last wakeup."""
        self.woken = False  # before taking: a call added after this wakes the loop again
        if self.stopping:
            self._fail_pending()
            return
        pending, create, in_flight = self.pending, self.loop.create_task, self.in_flight
        while pending:
            call = pending.popleft()
            if call.abandoned:
                continue
            task = create(call.fn(*call.args), context=call.context)
            call.task = task
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            task.add_done_callback(call.finish)

    def _fail_pending(self) -> None:
        while True:
            try:
                call = self.pending.popleft()
            except IndexError:
                return
            call.fail(_closed())

    # -- stopping -------------------------------------------------------------------

    def stop(self, timeout: float) -> None:
        """Begin to stop: calls in flight finish, the connection closes, the thread ends,
        all within ``timeout`` (else the daemon thread is left to the process's exit)."""
        if self.pid != os.getpid() or self.stop_requested:
            return  # a parent's runner is not ours to stop
        self.stop_requested = True
        with contextlib.suppress(RuntimeError):  # the loop is closed already
            self.loop.call_soon_threadsafe(self._begin_stop, timeout)

    def join(self, timeout: float) -> None:
        if self.pid == os.getpid() and threading.get_ident() != self.thread.ident:
            self.thread.join(timeout)
            if self.thread.is_alive():
                log.warning("%s did not stop within %.1fs", self.thread.name, timeout)

    def _begin_stop(self, timeout: float) -> None:
        # from now on, calls handed over fail as closed: none may start while the
        # connection closes (it would open the link again, and leak its socket)
        self.stopping = True
        self._fail_pending()
        task = self.loop.create_task(self._shutdown(timeout))
        task.add_done_callback(lambda _: self.loop.stop())

    async def _shutdown(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        until = loop.time() + timeout
        if self.in_flight:
            await asyncio.wait(self.in_flight, timeout=timeout / 2)
        for task in self.in_flight:
            task.cancel()
        try:
            async with asyncio.timeout_at(until):
                await self.client.close()
        except Exception as exc:  # closing is best effort: the process may be ending
            log.warning("closing the connection to %s: %r", self.client.urls, exc)


def _timed_out(bound: float) -> Exception:
    return TimeoutError(f"no outcome within {bound - MARGIN:g}s")


def _closed() -> ContractError:
    return ContractError("this SyncJobClient is closed; make a new one to publish again")


class SyncJobClient:
    """Publishes jobs from sync code: ``with SyncJobClient(url, namespace=...) as jobs``.

    The same arguments, validation, confirms and errors as ``JobClient``, without an
    event loop. Safe to share: make one per process (at import, before a fork is fine)
    and call it from any thread. Each call returns or raises within
    ``max(retry_for, confirm_timeout)`` plus ``MARGIN`` seconds, whatever the broker does.

    Async code should ``await`` a ``JobClient`` instead: called from an event loop's
    thread, a SyncJobClient works, but blocks that loop until the broker confirms.
    Publish middleware runs on the client's own thread and loop, and so does a
    ``memory://`` broker's work: run workers on one after the client's calls, not beside.
    """

    def __init__(
        self,
        url: str | Sequence[str] | BrokerURLs | Transport | None = None,
        *,
        namespace: Namespace | str,
        settings: TopologySettings | None = None,
        declare: bool = True,
        ssl_context: ssl.SSLContext | None = None,
        retry_for: float = 30.0,
        confirm_timeout: float = 30.0,
        connect_timeout: float | None = None,
        name: str = "amqp-jobs sync client",
        middleware: Sequence[Middleware] = (),
        store: str | None = None,
        events: bool = False,
    ) -> None:
        options: dict[str, Any] = {
            "store": store,
            "events": events,
            "namespace": namespace,
            "settings": settings,
            "declare": declare,
            "ssl_context": ssl_context,
            "retry_for": retry_for,
            "confirm_timeout": confirm_timeout,
            "connect_timeout": connect_timeout,
            "name": name,
            "middleware": middleware,
        }

        def make() -> JobClient:
            return JobClient(url, **options)

        self._make = make
        # Built now (no I/O): a bad URL or setting raises here, and prepare() needs it.
        self._client = make()
        self.namespace = self._client.namespace
        self.settings = self._client.settings
        self.urls = self._client.urls
        self.retry_for = self._client.retry_for
        #: seconds a call may take: what JobClient's calls take at most, plus MARGIN
        confirm = seconds(confirm_timeout, "confirm_timeout")
        self.bound = max(self.retry_for, confirm) + MARGIN
        connecting = connect_timeout if connect_timeout is not None else self.retry_for
        self._connect_bound = seconds(connecting, "connect_timeout") + MARGIN
        self._name = name
        self._lock = threading.Lock()
        self._runner: _Runner | None = None
        self._closed = False
        self._finalizer: weakref.finalize[Any, Any] | None = None
        _CLIENTS.add(self)

    def __repr__(self) -> str:
        return f"SyncJobClient({self.urls}, namespace={self.namespace!r})"

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- the loop thread ------------------------------------------------------------

    def _running(self) -> _Runner:
        runner = self._runner
        if runner is not None and not self._closed:
            return runner
        with self._lock:
            if self._closed:
                raise _closed()
            if self._runner is None:
                runner = _Runner(self._client, f"{self._name} ({self.namespace})")
                # a client dropped without close() stops its thread (not at exit: atexit)
                self._finalizer = weakref.finalize(self, runner.stop, CLOSE_TIMEOUT)
                self._finalizer.atexit = False
                self._runner = runner
            return self._runner

    def _after_fork_in_child(self) -> None:
        """In a forked child: the parent's thread is gone, and its loop and socket are
        the parent's. Keep them referenced and untouched (collecting them could close
        what the parent still uses), and start afresh on the next call."""
        self._lock = threading.Lock()  # another thread of the parent may have held it
        runner = self._runner
        if runner is None:
            return
        _INHERITED.append(runner)
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        self._runner = None
        self._client = self._make()  # the old one's link holds the parent's connection

    # -- publishing -----------------------------------------------------------------

    def connect(self) -> None:
        """Connect now rather than on the first enqueue; raises BrokerUnavailableError
        after ``connect_timeout`` (default ``retry_for``) seconds."""
        urls = self.urls

        def gave_up(bound: float) -> Exception:
            return BrokerUnavailableError(f"could not connect to {urls} within {bound:.1f}s")

        runner = self._running()
        runner.call(self._connect_bound, runner.client.connect, timeout=gave_up)

    def prepare(
        self,
        job: Job[ArgsT],
        args: ArgsT | Mapping[str, Any],
        *,
        delay: timedelta | float | None = None,
        run_at: datetime | None = None,
        job_id: str | None = None,
        headers: Mapping[str, Any] | None = None,
    ) -> Envelope:
        """Validate and encode one job without sending it (in the caller's thread)."""
        return self._client.prepare(
            job, args, delay=delay, run_at=run_at, job_id=job_id, headers=headers
        )

    def enqueue(
        self,
        job: Job[ArgsT],
        args: ArgsT | Mapping[str, Any],
        *,
        delay: timedelta | float | None = None,
        run_at: datetime | None = None,
        job_id: str | None = None,
        headers: Mapping[str, Any] | None = None,
    ) -> str:
        """Publish one job, confirmed; returns its job id.

        Raises ArgsValidationError or ContractError here, before anything is sent; a
        PublishError or BrokerUnavailableError if the broker did not take it; and
        PublishTimeoutError if no answer came within ``bound`` seconds.
        """
        if self._closed:
            raise _closed()
        envelope = self._client.prepare(
            job, args, delay=delay, run_at=run_at, job_id=job_id, headers=headers
        )
        runner = self._running()  # after validating: bad input starts nothing
        runner.call(self.bound, runner.client.send_prepared, job, envelope)
        return envelope.job_id

    def result(
        self, job_id: str, *, timeout: float | timedelta, job: Job[Any] | None = None
    ) -> Any:
        """Wait for a job's outcome, as ``JobClient.result``: the result, JobFailedError,
        UnknownJobError, or TimeoutError once ``timeout`` seconds pass."""
        if self._closed:
            raise _closed()
        bound = seconds(timeout, "timeout")
        runner = self._running()
        return runner.call(
            bound + MARGIN,
            functools.partial(runner.client.result, job_id, timeout=bound, job=job),
            timeout=_timed_out,
        )

    def enqueue_and_wait(
        self,
        job: Job[ArgsT],
        args: ArgsT | Mapping[str, Any],
        *,
        timeout: float | timedelta,
        delay: timedelta | float | None = None,
        run_at: datetime | None = None,
        job_id: str | None = None,
        headers: Mapping[str, Any] | None = None,
    ) -> Any:
        """Enqueue a job and wait for its result, as ``JobClient.enqueue_and_wait``
        (validated here, before anything is sent)."""
        if self._closed:
            raise _closed()
        self._client.prepare(job, args, delay=delay, run_at=run_at, job_id=job_id, headers=headers)
        bound = seconds(timeout, "timeout")
        runner = self._running()
        wait = functools.partial(
            runner.client.enqueue_and_wait,
            job,
            args,
            timeout=bound,
            delay=delay,
            run_at=run_at,
            job_id=job_id,
            headers=headers,
        )
        return runner.call(bound + MARGIN, wait, timeout=_timed_out)

    def enqueue_many(
        self,
        job: Job[ArgsT],
        batch: Iterable[ArgsT | Mapping[str, Any]],
        *,
        delay: timedelta | float | None = None,
        run_at: datetime | None = None,
    ) -> list[str]:
        """Publish many jobs with pipelined confirms; returns their ids in input order.

        Every item is validated before the first is published. If some are not
        confirmed, raises BatchPublishError saying which. Bounded per window of
        BATCH_WINDOW jobs, as JobClient.enqueue_many sends them.
        """
        if self._closed:
            raise _closed()
        prepare = self._client.prepare
        envelopes = [prepare(job, args, delay=delay, run_at=run_at) for args in batch]
        if not envelopes:
            return []
        windows = math.ceil(len(envelopes) / BATCH_WINDOW)
        bound = (self.bound - MARGIN) * windows + MARGIN
        runner = self._running()
        ids: list[str] = runner.call(bound, runner.client.send_many, job, envelopes)
        return ids

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Let calls in flight finish, close the connection and stop the thread, within
        ``timeout`` (plus MARGIN) seconds. Idempotent; later calls raise ContractError."""
        runner = self._close(timeout)
        if runner is not None:
            runner.join(timeout + MARGIN)

    def _close(self, timeout: float) -> _Runner | None:
        with self._lock:
            if self._closed:
                return None
            self._closed = True
            runner, self._runner = self._runner, None
            if self._finalizer is not None:
                self._finalizer.detach()
        _CLIENTS.discard(self)
        if runner is not None:
            runner.stop(timeout)
        return runner

    @property
    def closed(self) -> bool:
        return self._closed


#: Every client of this process (reset in a forked child), and every running loop thread
#: (stopped at exit).
_CLIENTS: weakref.WeakSet[SyncJobClient] = weakref.WeakSet()
_RUNNERS: weakref.WeakSet[_Runner] = weakref.WeakSet()
#: a forked child's copies of its parent's runners: kept so that nothing closes them
_INHERITED: list[_Runner] = []


def _after_fork_in_child() -> None:
    for client in list(_CLIENTS):
        client._after_fork_in_child()


def _close_all_at_exit() -> None:
    """Close what is still open while the daemon threads still run: their loops end as
    asyncio.run() ends one, with no task destroyed pending and no closed-loop errors."""
    for client in list(_CLIENTS):
        client._close(CLOSE_TIMEOUT)
    runners = [r for r in _RUNNERS if r.pid == os.getpid() and not r.stopped]
    for runner in runners:  # with those of clients collected without close()
        runner.stop(CLOSE_TIMEOUT)
    until = time.monotonic() + CLOSE_TIMEOUT + MARGIN
    for runner in runners:  # stopping together, within one bound
        runner.join(max(0.0, until - time.monotonic()))


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_close_all_at_exit)
