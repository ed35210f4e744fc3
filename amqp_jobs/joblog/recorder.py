"""The recorder: keeps the job log by consuming a namespace's events stream.

However many run, one leads per namespace: it holds the lock ``{ns}.recorder``
(``Session.claim``), which the broker frees the instant its connection closes; the
others try to take it every ``poll`` seconds. The leader reads the stream from the
position the store holds, and writes each batch of events and the new position in one
transaction, fenced on the position it read: a recorder killed at any point and
restarted (or replaced) neither loses nor doubles an event, and one that lost its lock
without knowing cannot write over its successor's work. Rows are keyed by job and guarded by
each event's place in its job's life, so redelivered or late events never move a job
backwards.

Retention is per state: rows of jobs that ended long enough ago are deleted in batches
by the leader (live jobs are never pruned).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    wait_exponential,
    wait_random,
)

from amqp_jobs.contract import Namespace, TopologySettings
from amqp_jobs.durations import seconds
from amqp_jobs.errors import (
    AmqpJobsError,
    BrokerUnavailableError,
    ConnectionLostError,
    ContractError,
    StoreError,
    describe,
)
from amqp_jobs.events import InvalidEventError, JobEvent
from amqp_jobs.joblog.store import FencedError, Store, open_store
from amqp_jobs.topology import events_stream
from amqp_jobs.transport import Delivery, Session, Transport, transport_for
from amqp_jobs.urls import BrokerURLs

log = logging.getLogger("amqp_jobs.recorder")

#: Events written per transaction at most.
BATCH = 500
#: How often a recorder that does not lead tries to take the lead (seconds).
POLL = 0.5
#: How often the leader prunes rows past their retention (seconds).
PRUNE_EVERY = 60.0
#: Rows deleted per statement when pruning.
PRUNE_BATCH = 1000
#: How long rows of ended jobs are kept, per state (None: until deleted).
DEFAULT_RETENTION: Mapping[str, timedelta | None] = {
    "succeeded": timedelta(days=7),
    "discarded": timedelta(days=7),
    "dead": None,
}
#: States that may be pruned: a live job's row is never deleted.
PRUNABLE = frozenset(DEFAULT_RETENTION)


def recorder_lock(ns: str) -> str:
    """The lock the leading recorder of a namespace holds."""
    return f"{ns}.recorder"


@dataclass
class RecorderStats:
    """What a recorder did (tests and logs read it)."""

    applied: int = 0
    batches: int = 0
    skipped: int = 0
    pruned: int = 0
    leads: int = 0
    fenced: int = 0
    position: int | None = None
    errors: list[str] = field(default_factory=list)


class Recorder:
    """Keeps ``namespace``'s job log in ``store`` (a URL or a Store) until stopped."""

    def __init__(
        self,
        store: str | Store,
        *,
        namespace: Namespace | str,
        url: str | Sequence[str] | BrokerURLs | Transport | None = None,
        settings: TopologySettings | None = None,
        retention: Mapping[str, timedelta | None] | None = None,
        batch: int = BATCH,
        poll: float = POLL,
        prune_every: float = PRUNE_EVERY,
        connect_timeout: float = 30.0,
        name: str = "amqp-jobs recorder",
    ) -> None:
        ns = Namespace.of(namespace, settings)
        self.namespace = ns.name
        self.settings = ns.settings
        self.store = open_store(store) if isinstance(store, str) else store
        self.transport = transport_for(url)
        self.retention = _retention(retention)
        if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= 10_000:
            raise ContractError(f"batch must be an int in 1..10000, got {batch!r}")
        self.batch = batch
        self.poll = seconds(poll, "poll")
        self.prune_every = seconds(prune_every, "prune_every")
        self.connect_timeout = seconds(connect_timeout, "connect_timeout")
        self.name = f"{name} [{self.namespace}]"
        self.stats = RecorderStats()
        #: set while this recorder leads (tests wait on it)
        self.leading = asyncio.Event()
        self._wrote = asyncio.Event()
        self._stop = asyncio.Event()
        self._started = False

    async def applied(self, count: int) -> None:
        """Wait until this recorder has written ``count`` events (bound it yourself)."""
        while self.stats.applied < count:
            self._wrote.clear()
            await self._wrote.wait()

    def stop(self) -> None:
        """Stop: the batch being written is finished (or not written at all)."""
        self._stop.set()

    async def run(self) -> None:
        """Contend for the lead and record while leading, until stop(). The first
        connection gives up after ``connect_timeout`` (BrokerUnavailableError); after
        that, lost connections and store failures are logged and retried with backoff."""
        await self.store.open()
        try:
            while not self._stop.is_set():
                await self._retrying()(self._session_once)
        finally:
            await self.store.close()

    def _retrying(self) -> AsyncRetrying:
        """Backoff between failed sessions; it starts afresh after a session that led."""

        async def pause(delay: float) -> None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)

        def failed(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            log.warning("recorder: %s; trying again", describe(exc))

        def give_up(state: RetryCallState) -> bool:
            waited = state.seconds_since_start or 0.0
            first = not self._started and waited > self.connect_timeout
            return first or self._stop.is_set()

        return AsyncRetrying(
            retry=retry_if_exception(self._retriable),
            stop=give_up,
            wait=wait_exponential(multiplier=0.2, max=5.0) + wait_random(0, 0.1),
            sleep=pause,
            before_sleep=failed,
            reraise=True,
        )

    def _retriable(self, exc: BaseException) -> bool:
        if isinstance(exc, BrokerUnavailableError):
            return self._started  # the first connection is bounded by connect_timeout
        return isinstance(exc, ConnectionLostError | StoreError | _Again)

    async def _session_once(self) -> None:
        """One connection: contend, then lead until it is lost or stop()."""
        if self._stop.is_set():
            return
        session = await self.transport.session(
            name=self.name, give_up_after=None if self._started else self.connect_timeout
        )
        self._started = True
        lost = asyncio.Event()

        def on_lost(reason: str, _: float | None) -> None:
            log.info("recorder: %s", reason)
            lost.set()

        session.on_lost(on_lost)
        try:
            if await self._contend(session, lost):
                await self._lead(session, lost)
            elif lost.is_set() and not self._stop.is_set():
                raise ConnectionLostError("the recorder's connection was lost")
        finally:
            self.leading.clear()
            with contextlib.suppress(AmqpJobsError, OSError):
                await session.close()

    async def _contend(self, session: Session, lost: asyncio.Event) -> bool:
        """Wait until this session holds the lock (True), or stop/loss (False)."""
        lock = recorder_lock(self.namespace)
        waited = False
        while not (self._stop.is_set() or lost.is_set()):
            if await session.claim(lock):
                return True
            if not waited:
                log.info("recorder: another recorder leads %s; standing by", self.namespace)
                waited = True
            await _first(self._stop.wait(), lost.wait(), timeout=self.poll)
        return False

    async def _lead(self, session: Session, lost: asyncio.Event) -> None:
        self.stats.leads += 1
        link = self.transport.link(
            self.namespace,
            self.settings,
            name=f"{self.name} (declare)",
            connect_timeout=self.connect_timeout,
        )
        try:
            await link.declare_events()
        finally:
            await link.close()
        position = await self.store.position(self.namespace)
        self.stats.position = position
        inbox: deque[Delivery] = deque()
        arrived = asyncio.Event()
        channel = await session.channel(self.batch * 2)

        async def on_delivery(delivery: Delivery) -> None:
            inbox.append(delivery)
            arrived.set()

        start: Any = "first" if position is None else position + 1
        await channel.consume(
            events_stream(self.namespace), on_delivery, arguments={"x-stream-offset": start}
        )
        log.info(
            "recorder leads %s, from stream offset %s into %s",
            self.namespace,
            start,
            getattr(self.store, "display", type(self.store).__name__),
        )
        self.leading.set()
        next_prune = time.monotonic()
        while not (self._stop.is_set() or lost.is_set()):
            if time.monotonic() >= next_prune:
                await self._prune()
                next_prune = time.monotonic() + self.prune_every
            if not inbox:
                arrived.clear()
                await _first(arrived.wait(), self._stop.wait(), lost.wait(), timeout=POLL * 4)
                continue
            deliveries = [inbox.popleft() for _ in range(min(self.batch, len(inbox)))]
            position = await self._apply(deliveries, position)

    async def _apply(self, deliveries: list[Delivery], position: int | None) -> int | None:
        """Write one batch and its last offset; ack it. Returns the new position."""
        events: list[JobEvent] = []
        last = position
        for delivery in deliveries:
            offset = delivery.headers.get("x-stream-offset")
            if not isinstance(offset, int):
                raise _Again(f"a stream delivery without an offset: {delivery.message_id}")
            if position is not None and offset <= position:
                continue  # a stream resumes at its chunk's start: seen already
            try:
                events.append(JobEvent.from_json(delivery.body))
            except InvalidEventError as exc:
                self.stats.skipped += 1
                log.warning("recorder: skipped event at offset %d: %s", offset, exc)
            last = offset
        if last is not None and last != position:
            try:
                await self.store.apply(self.namespace, events, last, position)
            except FencedError:
                self.stats.fenced += 1
                raise _Again("another recorder moved the position: contending again") from None
            self.stats.applied += len(events)
            self.stats.batches += 1
            self.stats.position = last
            self._wrote.set()
        for delivery in deliveries:
            await delivery.ack()  # a stream keeps it: this only gives credit back
        return last

    async def _prune(self) -> None:
        now_ms = int(time.time() * 1000)
        for state, keep in self.retention.items():
            if keep is None:
                continue
            before = now_ms - int(keep.total_seconds() * 1000)
            while not self._stop.is_set():
                deleted = await self.store.prune(self.namespace, state, before, PRUNE_BATCH)
                self.stats.pruned += deleted
                if deleted < PRUNE_BATCH:
                    break
                await asyncio.sleep(0)  # a batch at a time: events keep flowing


class _Again(AmqpJobsError):
    """Start over with a new connection (and contend again)."""


async def _first(*waits: Awaitable[Any], timeout: float) -> None:
    """Wait until the first of ``waits`` finishes, or ``timeout``; cancel the rest."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


def _retention(
    given: Mapping[str, timedelta | None] | None,
) -> dict[str, timedelta | None]:
    out: dict[str, timedelta | None] = dict(DEFAULT_RETENTION)
    for state, keep in (given or {}).items():
        if state not in PRUNABLE:
            raise ContractError(
                f"retention is per ended state ({', '.join(sorted(PRUNABLE))}), got {state!r}"
            )
        if keep is not None and not isinstance(keep, timedelta):
            raise ContractError(f"retention of {state} must be a timedelta or None: {keep!r}")
        out[state] = keep
    return out
