"""The scheduler: one leader per namespace, elected by the broker, enqueues every tick once.

Every process whose app has schedules is a candidate. Each consumes the namespace's
token queue (quorum, single active consumer, prefetch 1) on a transactional channel:
the broker delivers only to the oldest consumer, and when its connection closes, to the
next, a few milliseconds later. Whoever holds the newest token leads.

Each message in the queue is a ``State`` (schedules.py): a token, or a candidate's
announcement of the schedules its code defines. A leader never acks a message before
what it says is in a newer token, and every step is one transaction: the step's ticks
out, the next token in, the held one acked. A leader killed mid-step leaves its token
to the next, which computes the same ticks with the same job ids; a step that
committed moved the cursor with its ticks. So no tick runs twice or goes missing.

A leader enqueues every schedule in the token, including those its own code does not
define (from their announced definitions): a process with fewer schedules never
silences the others'.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict

from amqp_jobs.clock import Clock
from amqp_jobs.contract import Job, TopologySettings
from amqp_jobs.errors import AmqpJobsError, describe
from amqp_jobs.events import EventKind, header_key
from amqp_jobs.lifecycle import job_event
from amqp_jobs.message import CONTENT_TYPE, H_KEY, Envelope, Message
from amqp_jobs.middleware import Middleware, Publishing, publish_envelope
from amqp_jobs.schedules import Entry, Schedule, State, due
from amqp_jobs.topology import (
    STATUS_QUEUE_ARGUMENTS,
    TOKEN_QUEUE_ARGUMENTS,
    events_exchange,
    jobs_exchange,
    scheduler_queue,
    scheduler_status_queue,
)
from amqp_jobs.transport import Delivery, Link, Transport, TxChannel
from amqp_jobs.waiting import Stopped, unless_stopped

log = logging.getLogger("amqp_jobs.scheduler")

#: A leader with nothing due re-publishes its token this often: the broker's
#: consumer_timeout never takes it back, and ``amqp-jobs schedules`` stays fresh.
REFRESH = 30.0
#: How long a leader waits after a schedule failed to enqueue before it steps again.
FAILED_PAUSE = 1.0
#: Pauses between attempts at reaching the broker.
BACKOFF = (0.2, 5.0)
TOKEN_TYPE = "amqp-jobs.scheduler"
#: Messages of the token queue held at once: announcements reach a leader that holds
#: its token (with prefetch 1 they would wait for its next step).
PREFETCH = 16


class Scheduler:
    """A candidate for the namespace's scheduler; it leads when the broker says so."""

    def __init__(
        self,
        transport: Transport,
        namespace: str,
        schedules: Sequence[Schedule],
        *,
        settings: TopologySettings | None = None,
        name: str | None = None,
        middleware: Sequence[Middleware] = (),
        contracts: Mapping[str, Job[Any]] | None = None,
        events: bool = False,
    ) -> None:
        """``middleware``: those that override ``publish`` wrap each tick's publish, as
        they wrap an enqueue (a PRODUCER span, a publish counted). ``contracts``: the
        scheduled jobs' contracts by job name, which ``Publishing.job`` shows; a tick of
        a schedule only another process defines gets a stand-in (its name and queue).
        ``events``: publish each tick's ``enqueued`` event, in the step's transaction."""
        self.transport = transport
        self.namespace = namespace
        self.schedules = list(schedules)
        self.settings = settings or TopologySettings()
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.clock: Clock = transport.clock
        self.queue = scheduler_queue(namespace)
        self.status_queue = scheduler_status_queue(namespace)
        #: while leading: since when (UTC); None otherwise
        self.leading_since: datetime | None = None
        self.ticks_enqueued = 0
        self._stop = asyncio.Event()
        self._link: Link | None = None
        #: when this process's schedules were announced: at its start, once, so that a
        #: process reconnecting later never passes off its definitions as newer
        self._defined_at = datetime.now(UTC)
        #: after a schedule failed to enqueue: no step before this (clock ms)
        self._pause_until = 0
        self.middleware = tuple(m for m in middleware if type(m).publish is not Middleware.publish)
        self._contracts: dict[str, Job[Any]] = dict(contracts or {})
        self.events = events

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Stand for election until stop(); reconnect with backoff when the broker goes."""
        pause = BACKOFF[0]
        self._link = self.transport.link(
            self.namespace, self.settings, name=f"{self.name} scheduler"
        )
        try:
            while not self._stop.is_set():
                try:
                    await self._stand()
                    pause = BACKOFF[0]
                    continue
                except AmqpJobsError as exc:
                    log.warning("scheduler: %s; standing again in %.1fs", describe(exc), pause)
                except Exception:  # a bug must not silence every schedule for good
                    log.exception("scheduler failed; standing again in %.1fs", pause)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), pause)
                pause = min(pause * 2, BACKOFF[1])
        finally:
            await self._link.close()

    # -- one session: candidate, then perhaps leader --------------------------------

    async def _stand(self) -> None:
        opening = self.transport.session(name=f"{self.name} scheduler", give_up_after=None)
        try:
            session = await unless_stopped(opening, self._stop)
        except Stopped:
            return
        lost = asyncio.Event()
        session.on_lost(lambda reason, _: lost.set())
        inbox: asyncio.Queue[Delivery] = asyncio.Queue()

        async def on_delivery(delivery: Delivery) -> None:
            inbox.put_nowait(delivery)

        try:
            await session.declare_queue(self.queue, TOKEN_QUEUE_ARGUMENTS)
            await session.declare_queue(self.status_queue, STATUS_QUEUE_ARGUMENTS)
            tx = await session.transactional(PREFETCH)
            await tx.consume(self.queue, on_delivery)
            # announce this process's schedules (on a first start, this is the token)
            await tx.publish("", self.queue, self._message(self._announcement()))
            await tx.commit()
            await self._follow(tx, inbox, lost)
        finally:
            if self.leading_since is not None:
                log.info("scheduler: %s no longer leads %s", self.name, self.namespace)
            self.leading_since = None
            await session.close()

    async def _follow(
        self, tx: TxChannel, inbox: asyncio.Queue[Delivery], lost: asyncio.Event
    ) -> None:
        """Take in every message the broker hands this consumer; while holding its own
        newest token, lead: a step whenever ticks are due."""
        state = State({})
        mine: str | None = None  # the id of the newest token this session committed
        held: list[Delivery] = []  # unacked: acked by the next step, or alone
        holding = False  # ``mine`` is among ``held``: this consumer leads
        news = False  # ``held`` says something ``mine`` does not
        held_since = 0
        while not (lost.is_set() or self._stop.is_set()):
            wait_ms = self._until_due(state, held_since) if holding else None
            delivery = await self._next(inbox, lost, wait_ms)
            if lost.is_set() or self._stop.is_set():
                return  # what is held goes back to the queue
            if delivery is not None:
                theirs = _read(delivery)
                if theirs is None:  # not a state of any version: logged, and dropped
                    await delivery.ack()
                    await tx.commit()
                    continue
                news |= state.merge(theirs)
                held.append(delivery)
                if theirs.token is not None and theirs.token == mine:
                    state.leader, holding = theirs.leader, True
                    held_since = self.clock.now_ms()
                    self._lead_now(state)
                if not inbox.empty():
                    continue  # take in all that is here before acting
            if holding:
                if self.clock.now_ms() < self._pause_until and not news:
                    continue
                plan = self._due(state)
                due_now = any(ticks or entry.cursor is None for entry, ticks, _ in plan)
                refresh = self.clock.now_ms() - held_since >= REFRESH * 1000
                if not (due_now or news or refresh):
                    continue
                mine = await self._step(tx, held, state, plan)
            elif mine is None or news:
                mine = await self._step(tx, held, state, [])  # a token with all we know
            elif held:
                for stale in held:  # what they say is in our newest token already
                    await stale.ack()
                await tx.commit()
            held, holding, news = [], False, False

    def _lead_now(self, state: State) -> None:
        if self.leading_since is None:
            self.leading_since = datetime.now(UTC)
            log.info(
                "scheduler: %s leads %s (%d schedules)",
                self.name,
                self.namespace,
                len(state.entries),
            )

    def _due(self, state: State) -> list[tuple[Entry, list[datetime], datetime]]:
        """Per schedule: the ticks due now and the cursor to keep once they are out."""
        now = self._now()
        plan = []
        for entry in state.entries.values():
            ticks, cursor = due(entry.schedule, entry.cursor, now)
            plan.append((entry, ticks, cursor))
        return plan

    def _until_due(self, state: State, held_since: int) -> int:
        """Milliseconds until the next tick, or the token's refresh if sooner."""
        now = self._now()
        wake = min(
            (e.schedule.next_tick(max(e.cursor or now, now)) for e in state.entries.values()),
            default=now + timedelta(seconds=REFRESH),
        )
        wait_ms = int((wake - now).total_seconds() * 1000) + 1
        now_ms = self.clock.now_ms()
        refresh_in = held_since + int(REFRESH * 1000) - now_ms
        return max(0, min(wait_ms, refresh_in), self._pause_until - now_ms)

    async def _next(
        self, inbox: asyncio.Queue[Delivery], lost: asyncio.Event, wait_ms: int | None
    ) -> Delivery | None:
        """The next delivery; None once ``wait_ms`` passed, or the session or the
        scheduler ends."""
        if not inbox.empty():
            return inbox.get_nowait()
        getting = asyncio.ensure_future(inbox.get())
        waits = [
            getting,
            asyncio.ensure_future(lost.wait()),
            asyncio.ensure_future(self._stop.wait()),
        ]
        if wait_ms is not None:
            at = self.clock.now_ms() + wait_ms
            waits.append(asyncio.ensure_future(self.clock.sleep_until(at)))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits[1:]:
                waiting.cancel()
            if not getting.done():
                getting.cancel()  # a cancelled get leaves the item in the queue
        if getting.done() and not getting.cancelled():
            return getting.result()
        return None

    async def _step(
        self,
        tx: TxChannel,
        held: Sequence[Delivery],
        state: State,
        plan: Sequence[tuple[Entry, list[datetime], datetime]],
    ) -> str:
        """One transaction: the due ticks out, the next token in, what is held acked.

        A schedule that cannot enqueue its ticks (its queue cannot be declared, its
        settings clashing with the broker's, say; or a publish middleware fails) keeps
        as its cursor the last tick it staged: the rest are tried again after
        FAILED_PAUSE, and the other schedules go on."""
        exchange = jobs_exchange(self.namespace)
        sent: list[tuple[Entry, datetime, Envelope]] = []
        for entry, ticks, cursor in plan:
            if ticks and not await self._enqueue(tx, exchange, entry, ticks, sent):
                continue
            entry.cursor = cursor
        if self.events and sent:
            await self._stage_events(tx, [envelope for _, _, envelope in sent])
        state.version += 1
        state.token = os.urandom(8).hex()
        if self.leading_since is not None:
            state.leader = {
                "name": self.name,
                "since": self.leading_since.isoformat(),
                "at": datetime.now(UTC).isoformat(),
            }
        for entry, tick, _ in sent:
            if entry.last_tick is None or tick > entry.last_tick:
                entry.last_tick = tick
        token = self._message(state)
        await tx.publish("", self.queue, token)
        await tx.publish("", self.status_queue, token)  # for `amqp-jobs schedules`
        for delivery in held:
            await delivery.ack()
        await tx.commit()
        self.ticks_enqueued += len(sent)
        for entry, tick, _ in sent:
            log.debug("scheduler: enqueued %s", entry.schedule.tick_id(tick))
        return state.token

    # -- helpers ---------------------------------------------------------------------

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock.now_ms() / 1000, UTC)

    def _announcement(self) -> State:
        return State({s.name: Entry(s, self._defined_at) for s in self.schedules})

    def _message(self, state: State) -> Message:
        return Message(
            json.dumps(state.to_json(), separators=(",", ":")).encode(),
            CONTENT_TYPE,
            state.token or f"announcement-{os.urandom(8).hex()}",
            TOKEN_TYPE,
            datetime.now(UTC).replace(microsecond=0),
            {},
        )

    def _tick(self, schedule: Schedule, tick: datetime) -> Envelope:
        """A tick's job: its args as the schedule holds them, and its key (the
        ``job-key`` header, as a client sets it) when its contract is known here."""
        body = json.dumps(dict(schedule.args), separators=(",", ":")).encode()
        job = self._contracts.get(schedule.job_name)
        key = None
        if job is not None and job.key is not None:
            with contextlib.suppress(AmqpJobsError):  # the worker reads it from the args
                key = job.key_of(job.validate(schedule.args))
        return Envelope.new(
            schedule.job_name,
            body,
            schedule.queue,
            job_id=schedule.tick_id(tick),
            headers={H_KEY: key} if key is not None else None,
        )

    async def _enqueue(
        self,
        tx: TxChannel,
        exchange: str,
        entry: Entry,
        ticks: Sequence[datetime],
        sent: list[tuple[Entry, datetime, Envelope]],
    ) -> bool:
        """Stage one schedule's ``ticks`` (into ``sent``, with what was published); False
        if not all of them were: its cursor is then the last tick staged, if any, and
        the next step waits."""
        assert self._link is not None
        schedule = entry.schedule
        try:
            await self._link.declare_queue(schedule.queue, [schedule.job_name])
        except AmqpJobsError as exc:
            self._failed(schedule, f"cannot enqueue into {schedule.queue}: {describe(exc)}")
            return False
        for tick in ticks:
            try:
                envelope = await self._publish_tick(tx, exchange, schedule, tick)
            except _MiddlewareFailed as failed:
                error = failed.__cause__
                self._failed(
                    schedule,
                    f"a publish middleware failed on tick {tick.isoformat()}: {describe(error)}",
                    error if not isinstance(error, AmqpJobsError) else None,
                )
                if sent and sent[-1][0] is entry:
                    entry.cursor = sent[-1][1]  # what was staged is committed with the step
                return False
            sent.append((entry, tick, envelope))
        return True

    def _failed(self, schedule: Schedule, why: str, error: BaseException | None = None) -> None:
        log.error(
            "scheduler: schedule %s %s; trying again in %.0fs",
            schedule.name,
            why,
            FAILED_PAUSE,
            exc_info=error,
        )
        self._pause_until = self.clock.now_ms() + int(FAILED_PAUSE * 1000)

    async def _publish_tick(
        self, tx: TxChannel, exchange: str, schedule: Schedule, tick: datetime
    ) -> Envelope:
        """One tick into the step's transaction, through the publish middleware; returns
        what was published. The broker's errors are raised as they are (the session is
        lost); a middleware's, as _MiddlewareFailed."""
        envelope = self._tick(schedule, tick)
        if not self.middleware:
            await tx.publish(exchange, schedule.job_name, envelope.to_message())
            return envelope
        publishing = Publishing(
            self._contract(schedule),
            envelope.job_id,
            schedule.queue,
            None,
            dict(envelope.extra_headers),
            transactional=True,
        )
        broker_errors: list[BaseException] = []

        async def send(staged: Envelope) -> None:
            try:
                await tx.publish(exchange, schedule.job_name, staged.to_message())
            except BaseException as exc:
                broker_errors.append(exc)
                raise

        try:
            return await publish_envelope(self.middleware, publishing, envelope, send)
        except Exception as exc:
            if broker_errors:
                raise broker_errors[0] from None
            raise _MiddlewareFailed from exc

    async def _stage_events(self, tx: TxChannel, published: Sequence[Envelope]) -> None:
        """Each tick's ``enqueued`` event, in the step's transaction: recorded exactly
        when the tick is (the job log then shows a tick from its enqueue on)."""
        assert self._link is not None
        try:
            await self._link.declare_events()
        except AmqpJobsError as exc:  # a tick is never held back for its event
            log.warning(
                "scheduler: %d ticks enqueued without their events: %s",
                len(published),
                describe(exc),
            )
            return
        exchange = events_exchange(self.namespace)
        now_ms = self.clock.now_ms()
        for envelope in published:
            event = job_event(
                EventKind.ENQUEUED,
                envelope,
                envelope.queue or "",
                now_ms,
                header_key(envelope.extra_headers),
            )
            await tx.publish(exchange, event.routing_key, event.to_message())

    def _contract(self, schedule: Schedule) -> Job[Any]:
        job = self._contracts.get(schedule.job_name)
        if job is None:
            job = Job(schedule.job_name, _AnyArgs, queue=schedule.queue)
            self._contracts[schedule.job_name] = job
        return job


class _MiddlewareFailed(Exception):
    """A tick's publish middleware raised (the cause), or returned without publishing."""


class _AnyArgs(BaseModel):
    """The args model of a stand-in contract: what the defining process validated."""

    model_config = ConfigDict(extra="allow")


def _read(delivery: Delivery) -> State | None:
    """A message of the token queue as a State; None (logged) if it is no state of any
    version. A state of a newer version raises: it is never acked here, and never lost;
    this candidate steps aside, and the token goes on to one that can read it."""
    try:
        data = json.loads(delivery.body)
    except ValueError:
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("v"), int):
        log.error(
            "scheduler: dropping a message of the token queue that is no scheduler state: %r",
            delivery.body[:200],
        )
        return None
    if data["v"] != 1:
        raise AmqpJobsError(
            f"the scheduler token is of version {data['v']}, newer than this process"
            " reads; standing aside for a candidate that can"
        )
    try:
        return State.from_json(data)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise AmqpJobsError(f"the scheduler token cannot be read ({exc}); standing aside") from exc


def describe_state(state: State, now: datetime) -> list[dict[str, Any]]:
    """Each schedule of a token, for people: last and next tick."""
    rows = []
    for name, entry in sorted(state.entries.items()):
        after = max(entry.cursor or now, now)
        rows.append(
            {
                "name": name,
                "job": entry.schedule.job_name,
                "queue": entry.schedule.queue,
                "when": entry.schedule.spec,
                "catch_up": entry.schedule.catch_up.value,
                "last": entry.last_tick,
                "next": entry.schedule.next_tick(after),
            }
        )
    return rows
