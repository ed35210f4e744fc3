"""Critical sections: at most N jobs per (group, key) run at once, across every worker.

A job whose contract says ``exclusive="finance"`` (and ``key="user_id"``) takes a lock
before its handler runs: ``Session.claim`` of ``{ns}.lock.{digest}.{slot}``, on RabbitMQ
an exclusive consumer on that queue. A second taker is refused, and the broker drops the
consumer the instant the holder's connection closes: a killed worker frees its sections
at once, with no TTL to tune and nothing to reap. With ``exclusive_limit=N`` there are N
such locks per key; any free one will do. The lock is freed in the background as the
attempt ends: the job's settlement (and its slot) need not wait for the broker.

A job that finds every slot taken is deferred (``Defer``) by a short random delay: no
attempt is counted, and no worker slot is held while it waits in the broker.

Except when this very process holds the section: then one job of the section at a time
waits here, before it takes a worker slot, for at most ``LOCAL_WAIT``; the holder hands
its lock over as its attempt ends, with its slot, and with no broker round trip for
either of them (``wait_turn``). A busy key on one worker runs its jobs back to back
instead of sending each through the delay queues and asking the broker again, up to
``MAX_HAND_OVERS`` in a row.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import logging
import random
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from amqp_jobs.errors import AmqpJobsError, ConnectionLostError, Defer, describe
from amqp_jobs.middleware import Middleware, Next
from amqp_jobs.outcome import JobContext
from amqp_jobs.slots import Slots
from amqp_jobs.transport import Session

log = logging.getLogger("amqp_jobs.sections")

#: How long a job turned away waits before it tries again (seconds, uniform).
RETRY_AFTER = (0.05, 0.5)
#: How long a job waits for a section held in its own process to be handed over
#: (seconds), before it is turned away like any other: no longer than a deferral would.
LOCAL_WAIT = RETRY_AFTER[1]
#: Jobs in a row that hold a lock in one process before it goes back to the broker,
#: where a job of the key on any worker may take it next (the one waiting here steps
#: aside: it is deferred).
MAX_HAND_OVERS = 10

#: A section: (group, key, limit). Job types may share a group with different limits;
#: a lock is handed over only between jobs of the same three.
Section = tuple[str, str, int]


@dataclass(frozen=True)
class Grant:
    """A lock handed over: its name, its section, and the holder's slot (reserved;
    None without slots)."""

    name: str
    section: Section
    slot: asyncio.Future[None] | None


class Turn(enum.Enum):
    """How a wait ends without a lock: try the broker, or be deferred."""

    GO = "go"
    STEP_ASIDE = "step aside"


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
        self.local_wait = LOCAL_WAIT
        self._session: Session | None = None
        #: locks this process holds, is taking, is freeing, or has handed to a job not
        #: yet in its attempt: asking the broker for one would only cost a refusal
        self._held: set[str] = set()
        #: per section held here, the one job waiting for it to be handed over: it gets
        #: a Grant, GO (take your chances with the broker) or STEP_ASIDE (be deferred)
        self._waiting: dict[Section, asyncio.Future[Grant | Turn]] = {}
        #: locks handed over to a job whose attempt has not begun (by id of its ctx)
        self._granted: dict[int, Grant] = {}
        #: jobs told to step aside, their attempt yet to come (by id of their ctx)
        self._aside: set[int] = set()
        #: per lock handed over, how many jobs in a row have held it
        self._chains: dict[str, int] = {}
        #: the worker's slots: a lock handed over takes its holder's slot along
        self.slots: Slots | None = None
        self._freeing: set[asyncio.Task[None]] = set()
        #: sections entered (of them, handed over in this process) and turned away,
        #: since start (read by tests and metrics)
        self.entered = 0
        self.handed_over = 0
        self.turned_away = 0
        #: what its section cost each job let in (ms; the newest 10,000): taking it, and
        #: handing it on or sending its free off (the job does not wait for the free)
        self.lock_ms: deque[float] = deque(maxlen=10_000)

    @property
    def waiting(self) -> int:
        """Jobs waiting here for a section this process holds."""
        return len(self._waiting)

    def attach(self, session: Session | None) -> None:
        """The session locks are taken on (the worker's current one; None: none now)."""
        self._session = session

    async def wait_turn(self, ctx: JobContext) -> None:
        """Before a job takes a worker slot: if this process holds every lock of its
        section, wait up to ``local_wait`` for one to be handed over (one waiter per
        section; the others are turned away as usual). The worker calls ``forfeit``
        once the job is done with, so a lock handed to a job that never ran returns."""
        job = ctx.job
        if job.exclusive is None or ctx.key is None or self._session is None:
            return
        section = (job.exclusive, ctx.key, job.exclusive_limit)
        names = lock_names(self.namespace, *section)
        if section in self._waiting or not all(name in self._held for name in names):
            return
        turn: asyncio.Future[Grant | Turn] = asyncio.get_running_loop().create_future()
        self._waiting[section] = turn
        try:
            await asyncio.wait([turn], timeout=self.local_wait)
        finally:
            if self._waiting.get(section) is turn:
                del self._waiting[section]
            if not turn.done():
                turn.cancel()  # the holder will not hand it to a job gone
            elif isinstance(grant := turn.result(), Grant):
                self._granted[id(ctx)] = grant  # even if cancelled now: forfeit frees it
            elif grant is Turn.STEP_ASIDE:
                self._aside.add(id(ctx))

    def is_granted(self, ctx: JobContext) -> bool:
        """Whether ``ctx``'s job holds a lock handed over, its attempt yet to come."""
        return id(ctx) in self._granted

    def take_slot(self, ctx: JobContext) -> asyncio.Future[None] | None:
        """The slot reserved with the lock handed to ``ctx``'s job, if any: the worker's
        from now on (done once granted; cancel it, or release it if done)."""
        grant = self._granted.get(id(ctx))
        if grant is None or grant.slot is None:
            return None
        self._granted[id(ctx)] = Grant(grant.name, grant.section, None)
        return grant.slot

    def forfeit(self, ctx: JobContext) -> None:
        """A lock handed to ``ctx``'s job that its attempt did not take (no slot soon
        enough, the worker stopping, the job not reaching its attempt): give it back,
        and the slot that came with it."""
        self._aside.discard(id(ctx))
        grant = self._granted.pop(id(ctx), None)
        if grant is not None:
            self._give_back_slot(grant.slot)
            self._free_later(grant.name, grant.section)

    def _give_back_slot(self, slot: asyncio.Future[None] | None) -> None:
        if slot is not None and self.slots is not None:  # reserved only with slots
            self.slots.give_up(slot)

    def _free_later(self, name: str, section: Section, session: Session | None = None) -> None:
        """Free ``name`` in the background: the job done with it need not wait for the
        broker, nor hold its slot meanwhile. It stays in ``_held`` until then, so no job
        here asks the broker for it in between (one may wait for it, and goes on then)."""
        session = session or self._session
        if session is None:
            self._freed(name, section)
            return
        task = asyncio.ensure_future(self._release(session, name, section))
        self._freeing.add(task)
        task.add_done_callback(self._freeing.discard)

    async def freed(self, timeout: float) -> None:
        """Wait (up to ``timeout`` s) for the locks given back in the background: the
        worker, before it closes its connection."""
        if self._freeing:
            await asyncio.wait(set(self._freeing), timeout=timeout)

    async def attempt(self, ctx: JobContext, call_next: Next) -> Any:
        job = ctx.job
        grant = self._granted.pop(id(ctx), None)
        if grant is not None:
            self._give_back_slot(grant.slot)  # the worker takes it first; if not, unused
        stepping_aside = id(ctx) in self._aside
        self._aside.discard(id(ctx))
        if job.exclusive is None or ctx.key is None:
            if grant is not None:  # never: wait_turn hands over only with both
                self._free_later(grant.name, grant.section)
            if job.exclusive is None:
                return await call_next()
            # A keyed job always has one (the client and the worker both set it); a
            # message from elsewhere without the field's value cannot be placed.
            raise Defer(self._pause(), reason=f"no {job.key} to take section {job.exclusive}")
        section = (job.exclusive, ctx.key, job.exclusive_limit)
        if stepping_aside:
            self.turned_away += 1
            reason = f"section {job.exclusive}/{ctx.key}: other workers' turn"
            raise Defer(self._pause(), reason=reason)
        names = lock_names(self.namespace, *section)
        granted = None
        if grant is not None:
            if grant.name in names:
                granted = grant.name
            else:  # never handed across limits, but if it were, it is not this job's
                self._free_later(grant.name, grant.section)
        session = self._session
        if session is None:
            if granted is not None:
                self._freed(granted, section)  # it went with the connection
            raise Defer(self._pause(), reason="no connection to take the section on")
        random.shuffle(names)  # N slots: spread the holders, not all on slot 0
        if granted is not None:
            names = [granted, *(name for name in names if name != granted)]
        began = time.perf_counter()
        held = None
        for name in names:
            if name in self._held and name != granted:
                continue
            self._held.add(name)
            try:
                # a lock handed over is still this session's: no round trip (unless the
                # connection went in between, and then it is a claim like any other)
                taken = await session.claim(name)
            except BaseException as exc:
                self._freed(name, section)
                if isinstance(exc, AmqpJobsError):
                    reason = f"section {job.exclusive}: {describe(exc)}"
                    raise Defer(self._pause(), reason=reason) from exc
                raise
            if taken:
                held = name
                break
            self._freed(name, section)  # the broker said no: it is not held here
        if held is None:
            self.turned_away += 1
            raise Defer(self._pause(), reason=f"section {job.exclusive}/{ctx.key} is taken")
        self.entered += 1
        chain = 1
        if held == granted:
            self.handed_over += 1
            chain = self._chains.pop(held, 0) + 1
        took = time.perf_counter() - began
        try:
            return await call_next()
        finally:
            began = time.perf_counter()
            waiter = self._waiting.pop(section, None)
            if waiter is not None and not waiter.done() and chain < MAX_HAND_OVERS:
                self._chains[held] = chain
                # its slot too: freed as this attempt ends, it goes to the waiter
                slot = self.slots.reserve() if self.slots is not None else None
                waiter.set_result(Grant(held, section, slot))  # still held, in _held
            else:
                if waiter is not None and not waiter.done():
                    waiter.set_result(Turn.STEP_ASIDE)
                self._free_later(held, section, session)
            self.lock_ms.append((took + time.perf_counter() - began) * 1000)

    async def _release(self, session: Session, held: str, section: Section) -> None:
        try:
            await session.release(held)
        except ConnectionLostError as exc:
            log.debug("section lock %s went with its connection: %s", held, describe(exc))
        except AmqpJobsError as exc:
            # otherwise it lasts as long as the connection does, and the key waits
            log.error(
                "could not free section %s/%s (%s): %s; it is freed when this"
                " worker's connection closes",
                section[0],
                section[1],
                held,
                describe(exc),
            )
        except Exception:  # freed in the background: nobody else would hear of it
            log.exception("freeing section %s/%s (%s) failed", section[0], section[1], held)
        finally:
            self._freed(held, section)  # only now: a claim meanwhile would be refused

    def _freed(self, name: str, section: Section) -> None:
        """``name`` is no longer held here (or never was): a job waiting for it to be
        handed over goes on to take it from the broker (of any limit of the group)."""
        self._held.discard(name)
        self._chains.pop(name, None)
        for other, waiter in list(self._waiting.items()):
            if other[:2] == section[:2] and name in lock_names(self.namespace, *other):
                del self._waiting[other]
                if not waiter.done():
                    waiter.set_result(Turn.GO)

    def summary(self) -> str:
        """One line for the log: how many got in, were turned away, and what it cost."""
        costs = sorted(self.lock_ms)
        cost = (
            f"; a section cost its job p50 {costs[len(costs) // 2]:.1f} ms,"
            f" p99 {costs[min(len(costs) - 1, len(costs) * 99 // 100)]:.1f} ms"
            if costs
            else ""
        )
        return (
            f"critical sections: {self.entered} let in ({self.handed_over} handed over in"
            f" this process), {self.turned_away} turned away{cost}"
        )

    def _pause(self) -> float:
        return random.uniform(*self.retry_after)
