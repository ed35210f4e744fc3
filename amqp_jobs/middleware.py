"""Middleware: code around every attempt and every publish, told every outcome.

The seam that results, the job log, per-key locks, metrics and tracing plug into,
without touching the worker. A middleware wraps an attempt (``attempt``: the handler
runs inside ``await call_next()``) and may change how it ends by raising Retry, Discard
or ``Defer`` (run again later without counting an attempt), or by returning another
result. It wraps each enqueue (``publish``: add headers such as ``traceparent`` or a
job key before ``call_next()``). It is told how every delivery ended (``settled``),
including the ones that never reached a handler: poison, re-delays, quarantine.

Failures of middleware never lose a job: an exception from ``attempt`` that is not a
steering one is logged and treated as a failed attempt (retried by the job's policy,
then parked); one from ``settled`` is logged and ignored.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import Awaitable, Callable, Coroutine, Generator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from amqp_jobs.contract import Job
from amqp_jobs.errors import ContractError, PublishError
from amqp_jobs.message import Envelope, check_middleware_headers
from amqp_jobs.outcome import JobContext, Outcome, OutcomeKind
from amqp_jobs.registry import JobHooks

log = logging.getLogger("amqp_jobs.middleware")

#: How long one middleware may take to hear an outcome: the worker's task (and, for a
#: job run alone, the other consumers) waits for it.
SETTLED_TIMEOUT = 30.0

Next = Callable[[], Awaitable[Any]]


@dataclass
class Publishing:
    """One job about to be published; ``headers`` may be added to before ``call_next``.

    ``transactional``: a scheduler's tick. Its ``call_next`` returns once the publish is
    staged in the scheduler's transaction, not confirmed; the step commits it after.
    A step that fails is tried again, and its ticks published again (same job ids)."""

    job: Job[Any]
    job_id: str
    queue: str
    eta_ms: int | None
    headers: dict[str, Any] = field(default_factory=dict)
    transactional: bool = False


class Middleware:
    """Subclass and override what you need; pass to ``JobApp(middleware=[...])`` (the
    worker side) and ``JobClient(middleware=[...])`` (the publishing side). The first in
    the list is the outermost."""

    async def attempt(self, ctx: JobContext, call_next: Next) -> Any:
        """Wrap one attempt; returns the handler's result (or another)."""
        return await call_next()

    async def settled(self, outcome: Outcome, ctx: JobContext | None) -> None:
        """A delivery ended and the broker confirmed what follows; ``ctx`` is None when
        no handler was reached (poison, re-delay, quarantine)."""

    async def publish(self, publishing: Publishing, call_next: Next) -> Any:
        """Wrap one publish (confirmed when ``call_next`` returns, unless it is
        ``publishing.transactional``)."""
        return await call_next()


class HooksMiddleware(Middleware):
    """``JobHooks`` as middleware: started before the handler, settled or not_run after."""

    def __init__(self, hooks: JobHooks) -> None:
        self.hooks = hooks

    def __repr__(self) -> str:
        return repr(self.hooks)

    async def attempt(self, ctx: JobContext, call_next: Next) -> Any:
        try:
            await self.hooks.started(ctx)
        except Exception:
            log.exception("hook %r.started failed (ignored)", self.hooks)
        return await call_next()

    async def settled(self, outcome: Outcome, ctx: JobContext | None) -> None:
        if ctx is None:
            await self.hooks.not_run(outcome)
        else:
            await self.hooks.settled(ctx, outcome)


#: ``on_success`` / ``on_dead``: told a job's final outcome (``ctx`` is None for a
#: message that never reached its handler); plain or ``async def``.
OutcomeHook = Callable[[Outcome, JobContext | None], Awaitable[None] | None]


class FinalOutcomes(Middleware):
    """``on_success`` and ``on_dead`` (Sidekiq's retries-exhausted), per job and per app:
    called once the broker confirmed a job's end, the job's own before the app's.
    ``on_dead`` hears of every parked job: retries exhausted, discarded, or poison."""

    def __init__(
        self,
        on_success: Mapping[str | None, Sequence[OutcomeHook]],
        on_dead: Mapping[str | None, Sequence[OutcomeHook]],
    ) -> None:
        self.hooks = {OutcomeKind.SUCCEEDED: on_success, OutcomeKind.DEAD: on_dead}

    def __repr__(self) -> str:
        return "FinalOutcomes()"

    async def settled(self, outcome: Outcome, ctx: JobContext | None) -> None:
        hooks = self.hooks.get(outcome.kind)
        if not hooks:
            return
        for hook in (*hooks.get(outcome.job_name, ()), *hooks.get(None, ())):
            try:
                done = hook(outcome, ctx)
                if inspect.isawaitable(done):
                    await done
            except Exception:
                log.exception(
                    "%s hook %r failed for job %s (ignored)",
                    "on_success" if outcome.kind is OutcomeKind.SUCCEEDED else "on_dead",
                    hook,
                    outcome.job_id,
                )


def stack(
    middleware: Sequence[Middleware], hooks: Sequence[JobHooks] = ()
) -> tuple[Middleware, ...]:
    """Middleware first, then the hooks (innermost, nearest the handler)."""
    for item in middleware:
        if not isinstance(item, Middleware):
            raise ContractError(f"middleware must subclass amqp_jobs.Middleware, got {item!r}")
    return (*middleware, *(HooksMiddleware(h) for h in hooks))


def wrapping_attempts(chain: Sequence[Middleware]) -> tuple[Middleware, ...]:
    """The middleware that do something around an attempt: those that override
    ``attempt``, and hooks that override ``started``. The others are left out of the
    wrapping: a no-op job paid a coroutine per layer for nothing."""
    return tuple(item for item in chain if _wraps(item))


def _wraps(item: Middleware) -> bool:
    if isinstance(item, HooksMiddleware):
        return type(item.hooks).started is not JobHooks.started
    return type(item).attempt is not Middleware.attempt


def wrap_attempt(chain: Sequence[Middleware], ctx: JobContext, handler: Next) -> Next:
    """``handler`` inside every middleware's ``attempt``, the first outermost."""
    call = handler
    for item in reversed(chain):
        call = _bind_attempt(item, ctx, call)
    return call


def _bind_attempt(item: Middleware, ctx: JobContext, inner: Next) -> Next:
    # a coroutine of our own (not a partial of ``item.attempt``): an ``attempt`` that
    # raises when called, or returns no awaitable, then fails inside the attempt's task
    # like any other middleware failure, and the attempt's slot is given back
    async def call() -> Any:
        return await item.attempt(ctx, inner)

    return call


async def publish_through(chain: Sequence[Middleware], publishing: Publishing, send: Next) -> Any:
    """``send`` inside every middleware's ``publish``, the first outermost."""
    call = send
    for item in reversed(chain):
        call = _bind_publish(item, publishing, call)
    return await call()


def _bind_publish(item: Middleware, publishing: Publishing, inner: Next) -> Next:
    return functools.partial(item.publish, publishing, inner)


async def publish_envelope(
    chain: Sequence[Middleware],
    publishing: Publishing,
    envelope: Envelope,
    send: Callable[[Envelope], Awaitable[Any]],
) -> Envelope:
    """``send`` the envelope inside every middleware's ``publish``, with the headers they
    leave in ``publishing.headers`` (checked like a caller's); returns what was sent.
    Raises PublishError if a middleware returned without calling on: the job was not
    published."""
    sent: Envelope | None = None

    async def call() -> None:
        nonlocal sent
        headers = dict(publishing.headers)
        if headers != envelope.extra_headers:
            check_middleware_headers(headers, envelope.extra_headers)
        out = replace(envelope, extra_headers=headers)
        await send(out)
        sent = out

    await publish_through(chain, publishing, call)
    if sent is None:
        raise PublishError(
            f"job {envelope.job_id} was not published: a middleware's publish() returned"
            " without calling call_next(), or swallowed its error"
        )
    return sent


async def tell_settled(
    chain: Sequence[Middleware], outcome: Outcome, ctx: JobContext | None
) -> None:
    """Tell every middleware, each within SETTLED_TIMEOUT; a failure or a hang is logged
    and never changes anything (the delivery is settled already).

    Most ``settled`` methods (counting, logging) finish without waiting on anything: a
    timer per outcome (asyncio.timeout, a heap entry scheduled and cancelled) cost a
    no-op job 20 µs, more than the hook. So each runs at once, and only one that
    suspends runs the rest of its way under the timeout.
    """
    for item in chain:
        try:
            if type(item) is HooksMiddleware and ctx is not None:
                call = item.hooks.settled(ctx, outcome)  # a coroutine less per job
            else:
                call = item.settled(outcome, ctx)
            try:
                waiting_on = call.send(None)
            except StopIteration:
                continue
            async with asyncio.timeout(SETTLED_TIMEOUT):
                await _Resumed(call, waiting_on)
        except TimeoutError:
            log.error(
                "middleware %r.settled took more than %.0fs (given up)", item, SETTLED_TIMEOUT
            )
        except Exception:
            log.exception("middleware %r.settled failed (ignored)", item)


class _Resumed:
    """A coroutine already started, awaited from where it suspended: what it waits on
    goes to the task, and what the task sends or throws goes back into it."""

    __slots__ = ("call", "waiting_on")

    def __init__(self, call: Coroutine[Any, Any, None], waiting_on: Any) -> None:
        self.call = call
        self.waiting_on = waiting_on

    def __await__(self) -> Generator[Any, Any, None]:
        call, value = self.call, self.waiting_on
        while True:
            try:
                sent = yield value
            except BaseException as exc:  # cancelled (the timeout) while it waited
                try:
                    value = call.throw(exc)
                except StopIteration:
                    return
            else:
                try:
                    value = call.send(sent)
                except StopIteration:
                    return
