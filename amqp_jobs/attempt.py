"""Running one attempt of a job: the handler inside the middleware, under its deadline.

Async handlers run as tasks, plain functions in the worker's thread pool. Whichever
comes first ends the wait, the attempt or its deadline (the job's timeout, or just
before the broker's consumer_timeout would take the delivery back). A task that swallows
its cancellation, or a thread (threads cannot be killed), keeps its slot until it really
ends, but never holds up settling the delivery.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Any

from amqp_jobs.errors import Defer, Discard, JobTimeoutError, Retry, describe
from amqp_jobs.middleware import Middleware, wrap_attempt
from amqp_jobs.outcome import JobContext
from amqp_jobs.registry import HandlerSpec

log = logging.getLogger("amqp_jobs.worker")


class HandlerThreads:
    """The plain handlers running in a worker's threads right now.

    A thread cannot be stopped: one still running when its worker has stopped (past its
    job's timeout, or cut off by the grace period) is the only thing that may keep the
    process from exiting, and the command line asks this, not the thread list (idle pool
    threads are not handlers).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[int, tuple[str, str]] = {}

    def call(self, call: Any, args: Any, ctx: JobContext) -> Any:
        """Run a plain handler in this (pool) thread, known as running meanwhile."""
        key = threading.get_ident()
        with self._lock:
            self._running[key] = (ctx.job.name, ctx.job_id)
        try:
            return _call_sync(call, args, ctx)
        finally:
            with self._lock:
                del self._running[key]

    def running(self) -> list[tuple[str, str]]:
        """(job name, job id) of each plain handler still running."""
        with self._lock:
            return list(self._running.values())


async def run_attempt(
    spec: HandlerSpec,
    args: Any,
    ctx: JobContext,
    *,
    middleware: Sequence[Middleware],
    executor: Executor | None,
    release_slot: Callable[[], None],
    settle_by: float,
    consumer_timeout: float,
    threads: HandlerThreads | None = None,
) -> tuple[BaseException | None, Any]:
    """Run the attempt; return its exception (None on success) and its result.

    ``settle_by`` (loop time) is when the attempt must end for the delivery to be settled
    before the broker's ``consumer_timeout``; ``release_slot`` is called once when the
    handler has really ended. A plain handler runs through ``threads`` when given (so
    the worker knows which are still running).
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any]
    running = 1  # what holds the slot: the attempt, and a handler's thread
    handler_failure: list[BaseException] = []

    def ended() -> None:
        nonlocal running
        running -= 1
        if running == 0:
            release_slot()

    def finished(_: object) -> None:
        ended()
        if not woken.done():
            woken.set_result(True)

    def in_thread() -> asyncio.Future[Any]:
        run = _call_sync if threads is None else threads.call
        call = functools.partial(contextvars.copy_context().run, run, spec.call, args, ctx)
        return loop.run_in_executor(executor, call)

    if not middleware:
        # the common case, without a coroutine more per job
        future = loop.create_task(spec.call(args, ctx)) if spec.is_async else in_thread()
    else:

        async def handler() -> Any:
            nonlocal running
            try:
                if spec.is_async:
                    return await spec.call(args, ctx)
                thread = in_thread()
                running += 1
                thread.add_done_callback(lambda _: ended())
                try:
                    return await asyncio.shield(thread)
                except asyncio.CancelledError:
                    # The attempt timed out (or the worker stops), but a thread cannot
                    # be stopped: the middleware around it ends when the thread does,
                    # so a critical section is not freed while its holder still runs.
                    # Nobody waits for this: the worker has moved on. A second
                    # cancellation (the process ending) ends the wait.
                    await asyncio.wait([thread])
                    raise
            except BaseException as exc:
                handler_failure.append(exc)
                raise

        future = asyncio.ensure_future(wrap_attempt(middleware, ctx, handler)())
    # One future woken by whichever comes first, the attempt or its deadline: cheaper
    # than asyncio.wait, and, unlike awaiting it under asyncio.timeout, not held
    # hostage by a handler that swallows its cancellation.
    woken: asyncio.Future[bool] = loop.create_future()
    future.add_done_callback(finished)
    timeout = spec.job.timeout
    limit = settle_by - loop.time()
    broker_bound = timeout is None or limit < timeout
    timer = loop.call_later(limit if timeout is None or broker_bound else timeout, _wake, woken)
    try:
        await woken
    except asyncio.CancelledError:
        future.cancel()
        raise
    finally:
        timer.cancel()
    name = spec.job.name
    if not future.done():
        if spec.is_async or middleware:
            future.cancel()
        # a plain handler's thread cannot be stopped: its future is left to end with
        # it, and only then gives the slot back (cancelling would give it back now)
        if broker_bound:
            return JobTimeoutError(
                f"job {name!r} was stopped before the broker's consumer_timeout"
                f" ({consumer_timeout:.0f}s) would take it back; give the job a"
                " timeout, or raise consumer_timeout (README: consumer_timeout)"
            ), None
        return JobTimeoutError(f"job {name!r} exceeded its timeout of {timeout}s"), None
    if future.cancelled():
        return JobTimeoutError(f"job {name!r} was cancelled"), None
    failure = future.exception()
    if failure is None:
        return None, future.result()
    if middleware and not _steers(failure) and failure not in handler_failure:
        log.error(
            "middleware failed around job %s %s: %s; the attempt counts as failed",
            name,
            ctx.job_id,
            describe(failure),
            exc_info=failure,
        )
    return failure, None


def _steers(exc: BaseException) -> bool:
    """An exception that says how the job should go on, not that something broke."""
    return isinstance(exc, Retry | Discard | Defer)


def _wake(woken: asyncio.Future[bool]) -> None:
    if not woken.done():
        woken.set_result(False)


def _call_sync(call: Any, args: Any, ctx: JobContext) -> Any:
    """Run a plain handler in a pool thread; refuse a coroutine it hands back unrun."""
    result = call(args, ctx)
    if inspect.isawaitable(result):
        if inspect.iscoroutine(result):
            result.close()
        raise TypeError(
            f"the handler of {ctx.job.name!r} returned an awaitable from a plain function;"
            " declare it `async def` so the worker awaits it"
        )
    return result
