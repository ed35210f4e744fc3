"""Critical sections: at most N jobs per (group, key) run at once, across every worker.

A job whose contract says ``exclusive="finance"`` (and ``key="user_id"``) takes a lock
before its handler runs: ``Session.claim`` of ``{ns}.lock.{digest}.{slot}``, on RabbitMQ
an exclusive consumer on that queue. A second taker is refused, and the broker drops the
consumer the instant the holder's connection closes: a killed worker frees its sections
at once, with no TTL to tune and nothing to reap. With ``exclusive_limit=N`` there are N
such locks per key; any free one will do.

A job that finds every slot taken is deferred (``Defer``) by a short random delay: no
attempt is counted, and no worker slot is held while it waits in the broker.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections import deque
from typing import Any

from amqp_jobs.errors import AmqpJobsError, Defer, describe
from amqp_jobs.middleware import Middleware, Next
from amqp_jobs.outcome import JobContext
from amqp_jobs.transport import Session

log = logging.getLogger("amqp_jobs.sections")

#: How long a job turned away waits before it tries again (seconds, uniform).
RETRY_AFTER = (0.05, 0.5)


def lock_names(namespace: str, group: str, key: str, limit: int) -> list[str]:
    """The locks of one section: ``limit`` of them, the same for every worker."""
    digest = hashlib.sha256(f"{group}\0{key}".encode()).hexdigest()[:24]
    return [f"{namespace}.lock.{digest}.{slot}" for slot in range(limit)]


class CriticalSections(Middleware):
    """Takes a job's section around its attempt; the worker adds it (outermost) when a
    job it runs is ``exclusive``, and hands it each session it consumes on."""

    def __init__(self, namespace: str, *, retry_after: tuple[float, float] = RETRY_AFTER):
        self.namespace = namespace
        self.retry_after = retry_after
        self._session: Session | None = None
        #: locks this process holds or is taking: asking the broker for one it holds
        #: already would only cost a refusal
        self._held: set[str] = set()
        #: sections entered and turned away, since start (read by tests and metrics)
        self.entered = 0
        self.turned_away = 0
        #: what taking and freeing a section cost, per job let in (ms; the newest 10,000)
        self.lock_ms: deque[float] = deque(maxlen=10_000)
        self.take_ms: deque[float] = deque(maxlen=10_000)

    def attach(self, session: Session | None) -> None:
        """The session locks are taken on (the worker's current one; None: none now)."""
        self._session = session

    async def attempt(self, ctx: JobContext, call_next: Next) -> Any:
        job = ctx.job
        if job.exclusive is None:
            return await call_next()
        if ctx.key is None:
            # A keyed job always has one (the client and the worker both set it); a
            # message from elsewhere without the field's value cannot be placed.
            raise Defer(self._pause(), reason=f"no {job.key} to take section {job.exclusive}")
        session = self._session
        if session is None:
            raise Defer(self._pause(), reason="no connection to take the section on")
        names = lock_names(self.namespace, job.exclusive, ctx.key, job.exclusive_limit)
        random.shuffle(names)  # N slots: spread the holders, not all on slot 0
        began = time.perf_counter()
        held = None
        for name in names:
            if name in self._held:
                continue
            self._held.add(name)
            try:
                taken = await session.claim(name)
            except BaseException as exc:
                self._held.discard(name)
                if isinstance(exc, AmqpJobsError):
                    reason = f"section {job.exclusive}: {describe(exc)}"
                    raise Defer(self._pause(), reason=reason) from exc
                raise
            if taken:
                held = name
                break
            self._held.discard(name)
        if held is None:
            self.turned_away += 1
            raise Defer(self._pause(), reason=f"section {job.exclusive}/{ctx.key} is taken")
        self.entered += 1
        took = time.perf_counter() - began
        self.take_ms.append(took * 1000)
        try:
            return await call_next()
        finally:
            began = time.perf_counter()
            try:
                await session.release(held)
            except AmqpJobsError as exc:
                # a lost connection freed it already; otherwise it lasts as long as the
                # connection does, and the key waits: say so
                log.error(
                    "could not free section %s/%s (%s): %s; it is freed when this"
                    " worker's connection closes",
                    job.exclusive,
                    ctx.key,
                    held,
                    describe(exc),
                )
            finally:
                self._held.discard(held)  # only now: a claim meanwhile would be refused
                self.lock_ms.append((took + time.perf_counter() - began) * 1000)

    def summary(self) -> str:
        """One line for the log: how many got in, were turned away, and what it cost."""
        costs = sorted(self.lock_ms)
        cost = (
            f"; taking and freeing a section p50 {costs[len(costs) // 2]:.1f} ms,"
            f" p99 {costs[min(len(costs) - 1, len(costs) * 99 // 100)]:.1f} ms"
            if costs
            else ""
        )
        takes = sorted(self.take_ms)
        if takes:
            cost += f"; taking alone p50 {takes[len(takes) // 2]:.1f} ms"
        return f"critical sections: {self.entered} let in, {self.turned_away} turned away{cost}"

    def _pause(self) -> float:
        return random.uniform(*self.retry_after)
