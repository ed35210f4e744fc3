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
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from amqp_jobs.contract import Job
from amqp_jobs.errors import ContractError
from amqp_jobs.outcome import JobContext, Outcome
from amqp_jobs.registry import JobHooks

log = logging.getLogger("amqp_jobs.middleware")

#: How long one middleware may take to hear an outcome: the worker's task (and, for a
#: job run alone, the other consumers) waits for it.
SETTLED_TIMEOUT = 30.0

Next = Callable[[], Awaitable[Any]]


@dataclass
class Publishing:
    """One job about to be published; ``headers`` may be added to before ``call_next``."""

    job: Job[Any]
    job_id: str
    queue: str
    eta_ms: int | None
    headers: dict[str, Any] = field(default_factory=dict)


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
        """Wrap one publish (confirmed when ``call_next`` returns)."""
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


def stack(
    middleware: Sequence[Middleware], hooks: Sequence[JobHooks] = ()
) -> tuple[Middleware, ...]:
    """Middleware first, then the hooks (innermost, nearest the handler)."""
    for item in middleware:
        if not isinstance(item, Middleware):
            raise ContractError(f"middleware must subclass amqp_jobs.Middleware, got {item!r}")
    return (*middleware, *(HooksMiddleware(h) for h in hooks))


def wrap_attempt(chain: Sequence[Middleware], ctx: JobContext, handler: Next) -> Next:
    """``handler`` inside every middleware's ``attempt``, the first outermost."""
    call = handler
    for item in reversed(chain):
        call = _bind_attempt(item, ctx, call)
    return call


def _bind_attempt(item: Middleware, ctx: JobContext, inner: Next) -> Next:
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
    async def call() -> Any:
        return await item.publish(publishing, inner)

    return call


async def tell_settled(
    chain: Sequence[Middleware], outcome: Outcome, ctx: JobContext | None
) -> None:
    """Tell every middleware, each within SETTLED_TIMEOUT; a failure or a hang is logged
    and never changes anything (the delivery is settled already)."""
    for item in chain:
        try:
            async with asyncio.timeout(SETTLED_TIMEOUT):
                await item.settled(outcome, ctx)
        except TimeoutError:
            log.error(
                "middleware %r.settled took more than %.0fs (given up)", item, SETTLED_TIMEOUT
            )
        except Exception:
            log.exception("middleware %r.settled failed (ignored)", item)
