"""The worker: consume, decode, validate, wait for the ETA, run under a timeout, settle.

One process consumes one or more work queues with ``prefetch = concurrency``, plus each
queue's due queue (delayed jobs within one unit of their ETA) on a channel of its own, so
jobs held for their last fraction of a second never take the slots of running jobs.
Async handlers run as tasks, plain functions in a thread pool; both share one limit.

A job the broker has handed out twice without a settlement was held by workers that went
away: it may be what killed them. It moves to the queue's quarantine queue, which is
consumed one message at a time, and runs alone: the worker pauses its other consumers and
finishes what it holds first. If it kills the process again, only its own delivery count
grows, so the broker's delivery limit dead-letters it and not its neighbours.

Only process deaths may count. A living worker returns a delivery by storing a copy and
acking it (see ``settle.release``), and when it must nack one instead (no copy could be
stored) or the broker takes deliveries back from it (a lost connection or node, a
consumer_timeout), the worker vouches for them: when they come back it resets their
count instead of suspecting them. No job runs past the broker's
consumer_timeout: one without a timeout of its own is stopped and retried just before.
A consumer the broker cancels (its queue was deleted) is declared and consumed again.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
import os
import socket
import ssl
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_delay,
    stop_never,
    wait_exponential,
    wait_random,
)
from tenacity.stop import stop_base

from amqp_jobs import lifecycle
from amqp_jobs.attempt import HandlerThreads, run_attempt
from amqp_jobs.contract import (
    Job,
    Namespace,
    TopologySettings,
    check_queue_name,
)
from amqp_jobs.durations import seconds
from amqp_jobs.errors import (
    ArgsValidationError,
    BrokerUnavailableError,
    ConnectionLostError,
    ContractError,
    ResultError,
    describe,
)
from amqp_jobs.events import EventKind, JobEvent, header_key
from amqp_jobs.message import (
    DEFAULT_MAX_BODY,
    H_REPLY_TO,
    DeadReason,
    Envelope,
    ErrorInfo,
    PoisonMessage,
    check_body,
    dead_message,
    decode,
    moved_message,
)
from amqp_jobs.middleware import Middleware, stack, tell_settled, wrapping_attempts
from amqp_jobs.outcome import (
    Bury,
    Decision,
    DeferBy,
    Hold,
    JobContext,
    Outcome,
    OutcomeKind,
    Redelay,
    RetryIn,
    Succeed,
    admit,
    decide,
    outcome_of,
)
from amqp_jobs.registry import HandlerSpec, JobHooks, Registry
from amqp_jobs.scheduler import Scheduler
from amqp_jobs.sections import CriticalSections
from amqp_jobs.settle import (
    RELEASE_RETRY_FOR,
    Action,
    Fate,
    Park,
    Quarantine,
    Release,
    Reply,
    Republish,
    action_for,
    settle,
)
from amqp_jobs.slots import Slots
from amqp_jobs.topology import (
    delay_queue,
    due_queue,
    high_queue,
    quarantine_queue,
    work_queue,
)
from amqp_jobs.transport import Channel, Delivery, Session, Transport, transport_for
from amqp_jobs.urls import BrokerURLs
from amqp_jobs.waiting import Stopped, unless_stopped

log = logging.getLogger("amqp_jobs.worker")

#: RabbitMQ's default consumer_timeout: a delivery unacked for longer closes the channel.
BROKER_CONSUMER_TIMEOUT = 1800.0
DEFAULT_CONCURRENCY = 16
DEFAULT_GRACE = 30.0
#: An attempt's started event goes out once it has run this long (seconds): a shorter
#: one's end event carries its start, and a publish per job is saved.
STARTED_AFTER = 0.2
#: Deliveries the due channel may hold at once; all are within one unit of their ETA.
DUE_PREFETCH = 1000
#: Handed out this many times unsettled (quorum queues count it), a job is quarantined.
SUSPECT_AFTER = 2
#: Seconds between checks that every queue the worker consumes has a consumer.
CONSUMER_CHECK_INTERVAL = 3.0
#: Job ids remembered as returned to the broker by this living process (vouched for).
VOUCH_MEMORY = 100_000
#: Longest pause before returning a delivery whose processing failed unexpectedly.
MAX_TROUBLE_PAUSE = 60.0
#: Longest pause between attempts to reconnect.
MAX_RECONNECT_PAUSE = 2.0


class Vouch(enum.Enum):
    """How a living worker forgives a count it caused (see ``_vouched_for``)."""

    RESET = "reset"  # give it back as an unchanged copy, whose count starts again
    RUN = "run"  # its reset failed last time: run it as it is


def consumer_timeout_margin(consumer_timeout: float) -> float:
    """How long before the broker's consumer_timeout a job is stopped and settled."""
    return min(60.0, max(2.0, consumer_timeout / 10))


class stop_when(stop_base):
    """A tenacity stop: ``condition()`` holds (the worker is stopping)."""

    def __init__(self, condition: Callable[[], bool]) -> None:
        self.condition = condition

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self.condition()


class Source(enum.Enum):
    """Which of a work queue's three queues a delivery came from."""

    WORK = "work"
    HIGH = "high"  # the work queue's high-priority twin
    DUE = "due"
    QUARANTINE = "quarantine"


@dataclass
class _Consumer:
    channel: Channel
    tag: str
    queue: str
    source: Source
    name: str  # the AMQP queue consumed
    received: int = 0  # deliveries so far
    received_at_last: int = -1  # at the previous consumer check


@dataclass
class WorkerStats:
    """Counters since start; read by tests, the demo and (later) metrics."""

    received: int = 0
    succeeded: int = 0
    retried: int = 0
    dead: int = 0
    redelayed: int = 0
    deferred: int = 0
    quarantined: int = 0
    abandoned: int = 0
    connections: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)


class Worker:
    """Runs the handlers of a registry for some of its queues until stopped."""

    def __init__(
        self,
        registry: Registry,
        *,
        namespace: Namespace | str,
        url: str | Sequence[str] | BrokerURLs | Transport | None = None,
        queues: Sequence[str] | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
        grace: float = DEFAULT_GRACE,
        settings: TopologySettings | None = None,
        hooks: Sequence[JobHooks] = (),
        middleware: Sequence[Middleware] = (),
        ssl_context: ssl.SSLContext | None = None,
        max_body: int = DEFAULT_MAX_BODY,
        connect_timeout: float = 30.0,
        consumer_timeout: float = BROKER_CONSUMER_TIMEOUT,
        name: str = "amqp-jobs worker",
        log_success: bool = True,
        events: bool = False,
        started_after: float = STARTED_AFTER,
        scheduler: bool = True,
    ) -> None:
        """``log_success``: log one INFO line per job that succeeded (``job NAME ID
        succeeded in 12 ms, attempt 1``); False spares a high-throughput worker that
        line. Retries, dead letters and deferrals are logged either way.

        ``events``: publish a lifecycle event at each transition of each job to the
        namespace's events exchange and stream (amqp_jobs.events), each attempt's last
        confirmed before its delivery is acked; what the job log records and waiting
        callers hear. Off by default: an event is a confirmed publish, which costs as
        much client CPU as a no-op job (README: Lifecycle events).

        ``started_after``: an attempt's ``started`` event is published once it has run
        this long (checked every STARTED_AFTER / 2 s): a shorter one's end event carries
        its start time and worker, and one publish a job is saved. 0: at every start.

        ``scheduler``: if the app has schedules, stand for the namespace's scheduler
        (one leads; README: Periodic jobs). False: this worker never runs schedules."""
        if len(registry) == 0:
            raise ContractError("the app has no handlers: register some with @app.handler(job)")
        self.registry = registry
        ns = Namespace.of(namespace, settings)
        self.namespace = ns.name
        self.settings = ns.settings
        #: the broker (RabbitMQ at the URLs given, else $AMQP_URL, else local; or memory://)
        self.transport = transport_for(url, ssl_context=ssl_context)
        self.urls = self.transport.urls
        self.clock = self.transport.clock
        known = registry.queues
        self.queues = sorted(set(queues) if queues else known)
        for q in self.queues:
            check_queue_name(q)
            if q not in known:
                raise ContractError(
                    f"no handler runs on queue {q!r}; this app's queues: {', '.join(sorted(known))}"
                )
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ContractError(f"concurrency must be an int >= 1, got {concurrency!r}")
        grace = seconds(grace, "grace")
        connect_timeout = seconds(connect_timeout, "connect_timeout")
        consumer_timeout = seconds(consumer_timeout, "consumer_timeout")
        if consumer_timeout == 0:
            raise ContractError("consumer_timeout must be > 0 seconds, got 0")
        self.concurrency = concurrency
        self.grace = grace
        self.hooks = tuple(hooks)
        #: critical sections (outermost), if a job of the registry is exclusive
        self.sections = (
            CriticalSections(ns.name) if any(s.job.exclusive for s in registry) else None
        )
        #: middleware, then the hooks as middleware (innermost)
        self.middleware = stack(
            [self.sections, *middleware] if self.sections else middleware, hooks
        )
        #: those of them that wrap attempts (computed again when run() starts)
        self._wrapping = wrapping_attempts(self.middleware)
        self.max_body = max_body
        self.connect_timeout = connect_timeout
        self.log_success = bool(log_success)
        self.events = bool(events)
        self.started_after = seconds(started_after, "started_after")
        # the namespace in the connection name lets operators (and the management UI) tell
        # which application a connection belongs to
        self.name = f"{name} [{self.namespace}]"
        _check_timeouts(registry, self.queues, consumer_timeout)
        self.consumer_timeout = consumer_timeout
        self.stats = WorkerStats()
        #: the loop time pending() last found a job in the delay cascade: one that
        #: leaves a level is in no queue while the broker dead-letters it on
        self.cascade_held_at: float | None = None
        #: the namespace's scheduler candidate, if the app has schedules
        self.scheduler: Scheduler | None = None
        if scheduler and registry.schedules:
            self.scheduler = Scheduler(
                self.transport,
                self.namespace,
                list(registry.schedules.values()),
                settings=self.settings,
                name=f"{self.name} {socket.gethostname()}:{os.getpid()}",
                middleware=middleware,
                contracts={spec.job.name: spec.job for spec in registry} | registry.scheduled_jobs,
                events=self.events,
            )
        self.link = self.transport.link(
            self.namespace,
            self.settings,
            name=f"{self.name} (publish)",
            connect_timeout=connect_timeout,
            # The worker's own copies (retries, dead letters) wait for their confirm as
            # long as the delivery may be held: one copy, stored once the broker can.
            confirm_timeout=None,
        )
        self._tasks: set[asyncio.Task[Any]] = set()
        #: started events being published
        self._recording: set[asyncio.Task[None]] = set()
        #: attempts whose started event is not out yet, by task: (loop time it began,
        #: envelope, queue, epoch ms it began, key)
        self._starting: dict[asyncio.Task[Any], tuple[float, Envelope, str, int, str | None]] = {}
        self._stop = asyncio.Event()
        self._started = asyncio.Event()
        self._sem: Slots | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._threads = HandlerThreads()
        self._consumers: list[_Consumer] = []
        # One quarantined job runs at a time, alone; these are the tasks that carry them.
        self._alone = asyncio.Lock()
        self._alone_tasks: set[asyncio.Task[Any]] = set()
        # The delivery each processing task holds; vouched-for job ids (returned to the
        # broker by this living process); job ids whose processing failed unexpectedly.
        self._held: dict[asyncio.Task[Any], Delivery] = {}
        #: deliveries whose settlement has begun (never released again after that)
        self._decided: set[Delivery] = set()
        #: deliveries whose settlement gave them back counted (Fate.RETURNED)
        self._returned: set[Delivery] = set()
        #: consumer_timeout_margin of the consumer_timeout it was computed for
        self._margin_for, self._margin = -1.0, 0.0
        self._vouched: OrderedDict[str, None] = OrderedDict()
        self._troubled: OrderedDict[str, int] = OrderedDict()
        #: vouched-for job ids whose count could not be reset (nacked again): they run
        #: as they are next time, not round the broker once more
        self._not_reset: OrderedDict[str, None] = OrderedDict()
        self._lost = asyncio.Event()
        self._prefetch = {
            # With events, each settlement waits for its event's confirm: twice as many
            # deliveries let jobs settle while as many others run (the slots still
            # bound the handlers to ``concurrency``).
            Source.WORK: concurrency * 2 if self.events else concurrency,
            # high-priority deliveries wait for slots here, not behind normal ones: twice
            # as many as run, so that some wait while high-priority jobs fill the slots
            Source.HIGH: concurrency * 2,
            Source.DUE: DUE_PREFETCH,
            Source.QUARANTINE: 1,
        }

    # -- lifecycle -----------------------------------------------------------------

    def stop(self) -> None:
        """Ask for a graceful stop: no new deliveries, in-flight jobs get ``grace`` seconds."""
        self._stop.set()
        if self.scheduler is not None:
            self.scheduler.stop()  # its token goes to another candidate now

    async def started(self) -> None:
        """Wait until the worker consumes from all its queues."""
        await self._started.wait()

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def handlers_running(self) -> list[tuple[str, str]]:
        """(job name, job id) of each plain handler still running in a thread. After
        ``run()`` returned, these are handlers that outlived their job's timeout or the
        grace period: a thread cannot be stopped."""
        return self._threads.running()

    async def run(self) -> None:
        """Consume until stop(); reconnect with backoff whenever the connection is lost.

        The first connection gives up after ``connect_timeout`` seconds with
        BrokerUnavailableError; after that the worker keeps trying, logging each failure.
        """
        # what wraps attempts, from the middleware as they are now (a test harness may
        # have added one since the worker was made)
        self._wrapping = wrapping_attempts(self.middleware)
        self._sem = Slots(self.concurrency)
        if self.sections is not None:
            self.sections.slots = self._sem  # a lock handed over takes its slot along
        self._executor = ThreadPoolExecutor(self.concurrency, thread_name_prefix="amqp-jobs")
        session: Session | None = None
        lost: asyncio.Event
        announcing = None
        if self.events and self.started_after:
            announcing = asyncio.ensure_future(self._announce_long_attempts())
        scheduling = None
        if self.scheduler is not None:
            scheduling = asyncio.ensure_future(self.scheduler.run())
        try:
            while not self._stop.is_set():
                try:
                    session, lost = await self._reconnects()(self._connect)
                except (ConnectionLostError, Stopped):
                    if self._stop.is_set():
                        break  # asked to stop while reconnecting
                    raise
                self._started.set()
                log.info(
                    "worker consuming %s from %s (concurrency %d)",
                    ", ".join(self.queues),
                    self.urls,
                    self.concurrency,
                )
                stop_wait = asyncio.ensure_future(self._stop.wait())
                lost_wait: asyncio.Future[Any] = asyncio.ensure_future(lost.wait())
                watch = asyncio.ensure_future(self._watch_consumers())
                waits: set[asyncio.Future[Any]] = {stop_wait, lost_wait}
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                stop_wait.cancel()
                lost_wait.cancel()
                watch.cancel()
                if self._stop.is_set():
                    break
                self._vouch_held()
                self._consumers = []
                await _close_quietly(session)
                session = None
            await self._shutdown(session)
        finally:
            if announcing is not None:
                announcing.cancel()
            if scheduling is not None:
                await _stop_scheduler(self.scheduler, scheduling)
            if self.sections is not None:
                log.info("%s", self.sections.summary())
            await _close_quietly(session)
            await self.link.close()
            if self._executor is not None:
                self._executor.shutdown(wait=False, cancel_futures=True)

    def _reconnects(self) -> AsyncRetrying:
        """Attempts at connecting and consuming, with capped backoff between failed
        setups; a pause, or a connection attempt, ends early when the worker is asked to
        stop. At the first start everything is bounded by ``connect_timeout``, and a
        refusal (no permission, other queue arguments) is final; once the worker has
        consumed, it keeps trying whatever the broker says, logging each failure."""

        async def pause(seconds: float) -> None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), seconds)

        first = not self._started.is_set()
        retry_on = ConnectionLostError if first else BrokerUnavailableError
        stop = stop_after_delay(self.connect_timeout) if first else stop_never
        return AsyncRetrying(
            retry=retry_if_exception_type(retry_on),
            stop=stop | stop_when(self._stop.is_set),
            wait=wait_exponential(multiplier=0.2, max=MAX_RECONNECT_PAUSE) + wait_random(0, 0.1),
            sleep=pause,
            reraise=True,
        )

    async def _connect(self) -> tuple[Session, asyncio.Event]:
        """Connect and consume every queue; a failure on the way closes the session."""
        first = not self._started.is_set()
        opening = self.transport.session(
            name=self.name, give_up_after=self.connect_timeout if first else None
        )
        session = await unless_stopped(opening, self._stop)  # Stopped: asked to stop
        self.stats.connections += 1
        if self.sections is not None:
            self.sections.attach(session)  # locks live as long as this connection
        try:
            return session, await self._start_consuming(session)
        except BaseException as exc:
            if isinstance(exc, ConnectionLostError):
                log.warning("worker setup failed: %s; retrying", describe(exc))
            await session.close()
            raise

    async def _start_consuming(self, session: Session) -> asyncio.Event:
        self._lost = lost = asyncio.Event()
        session.on_lost(self._on_lost)
        # declare afresh: a queue deleted while we were away must come back
        self.link.forget_declarations()
        for q in self.queues:
            await self.link.declare_queue(q, self.registry.jobs_for(q))
        self._consumers = []
        for source in (Source.WORK, Source.HIGH, Source.DUE, Source.QUARANTINE):
            channel = await session.channel(self._prefetch[source])
            for q in self.queues:
                await self._consume(channel, q, source)
        return lost

    async def _consume(self, channel: Channel, queue: str, source: Source) -> None:
        name = {
            Source.WORK: work_queue,
            Source.HIGH: high_queue,
            Source.DUE: due_queue,
            Source.QUARANTINE: quarantine_queue,
        }[source](self.namespace, queue)
        consumer = _Consumer(channel, "", queue, source, name)
        # a partial, not a closure coroutine: one coroutine less per delivery
        consumer.tag = await channel.consume(name, functools.partial(self._process, consumer))
        self._consumers.append(consumer)

    def _on_lost(self, reason: str, consumer_timeout: float | None) -> None:
        """The session lost a consumer: reconnect. Learn the broker's consumer_timeout if
        that is why (the job that outlived it is named in the log)."""
        if consumer_timeout is not None:
            log.error(
                "the broker closed a channel because a delivery was held past its"
                " consumer_timeout of %.0fs (this worker was told %.0fs: pass"
                " --consumer-timeout %.0f); jobs are now stopped before that",
                consumer_timeout,
                self.consumer_timeout,
                consumer_timeout,
            )
            self.consumer_timeout = min(self.consumer_timeout, consumer_timeout)
        elif not self._lost.is_set() and not self._stop.is_set():
            log.warning("%s; reconnecting", reason)
        self._lost.set()

    def _restart(self, consumer: _Consumer, why: str) -> None:
        """Reconnect, which declares every queue again and consumes them anew.

        Not just this consumer: deliveries the broker made to a consumer of a deleted
        queue can be stuck on its channel, and only closing the connection returns them.
        """
        log.warning("%s of %s (was it deleted?); reconnecting", why, consumer.name)
        self._lost.set()

    async def _watch_consumers(self) -> None:
        """Every few seconds, check that each queue we consume reaches us.

        A quorum queue deleted and declared again at once (by a publisher, say) leaves our
        consumer on the deleted queue; the broker's cancel may never come, and the new
        queue even counts the old consumer. What shows it: messages ready in the queue,
        room in our prefetch, and nothing delivered, two checks in a row. Then (or if the
        queue is gone) the worker reconnects.
        """
        stalled: set[str] = set()
        while not self._lost.is_set():
            await asyncio.sleep(CONSUMER_CHECK_INTERVAL)
            try:
                async with asyncio.timeout(CONSUMER_CHECK_INTERVAL * 2):  # a blocked link
                    suspects = await self._stalled_consumers()
            except (BrokerUnavailableError, TimeoutError) as exc:
                log.debug("checking consumers: %s", describe(exc))
                continue
            for consumer in suspects:
                if consumer.tag in stalled:
                    self._restart(consumer, "messages wait but none reach our consumer")
                    return
            stalled = {c.tag for c in suspects}

    async def _stalled_consumers(self) -> list[_Consumer]:
        """Consumers whose queue is gone, or has ready messages while the consumer has
        room and received nothing since the last check."""
        out = []
        for consumer in list(self._consumers):
            received = consumer.received
            room = self._prefetch[consumer.source] > sum(
                1 for d in self._held.values() if d.channel is consumer.channel
            )
            ready = await self.link.depth(consumer.name)
            if ready is None:
                return [consumer]
            if ready and room and received == consumer.received_at_last:
                out.append(consumer)
            consumer.received_at_last = received
        return out

    def _vouch_held(self) -> None:
        """The broker takes back what this living process held: none of it killed us."""
        for delivery in self._held.values():
            self._vouch(delivery)

    def _vouch(self, delivery: Delivery) -> None:
        if delivery.message_id:
            self._vouched[delivery.message_id] = None
            self._vouched.move_to_end(delivery.message_id)
            if len(self._vouched) > VOUCH_MEMORY:
                self._vouched.popitem(last=False)

    async def _cancel(self, consumers: list[_Consumer]) -> None:
        for consumer in consumers:
            if consumer not in self._consumers:
                continue  # already cancelled (shutdown and a quarantined job may race)
            self._consumers.remove(consumer)
            if consumer.channel.is_closed:
                continue
            try:
                await consumer.channel.cancel(consumer.tag)
            except ConnectionLostError as exc:
                log.debug("cancelling consumer %s: %s", consumer.tag, describe(exc))

    async def _shutdown(self, session: Session | None) -> None:
        """Stop consuming, give running jobs ``grace`` seconds, return the rest."""
        await self._cancel(list(self._consumers))
        if self._tasks:
            n = len(self._tasks)
            log.info(
                "waiting up to %.1fs for %d in-flight %s",
                self.grace,
                n,
                "job" if n == 1 else "jobs",
            )
            _, pending = await asyncio.wait(set(self._tasks), timeout=self.grace)
            if pending:
                log.warning(
                    "%d %s not finish within %.1fs; returning %s to the queue",
                    len(pending),
                    "job did" if len(pending) == 1 else "jobs did",
                    self.grace,
                    "it" if len(pending) == 1 else "them",
                )
                for task in pending:
                    task.cancel()
                await asyncio.wait(pending, timeout=RELEASE_RETRY_FOR + 1.0)
        if self.sections is not None:
            await self.sections.freed(timeout=1.0)  # locks given back in the background
        # Closing the session returns every unacked delivery to its queue.
        await _close_quietly(session)
        log.info("worker stopped")

    # -- one delivery ----------------------------------------------------------------

    async def _process(self, consumer: _Consumer, msg: Delivery) -> None:
        consumer.received += 1
        queue, source = consumer.queue, consumer.source
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._held[task] = msg
        self.stats.received += 1
        try:
            if source is Source.QUARANTINE:
                await self._run_alone(task, msg, queue)
            elif (vouch := self._vouched_for(msg)) is Vouch.RESET:
                # returned by the broker while this process lived: reset its count
                await self._reset(msg, queue)
            elif vouch is None and self._suspect(msg):
                await self._quarantine(msg, queue)
            else:  # not suspect, or vouched for but its count could not be reset
                await self._pipeline(
                    msg, queue, is_due=source is Source.DUE, high=source is Source.HIGH
                )
        except asyncio.CancelledError:
            if self._stop.is_set() and msg not in self._decided:
                # cut off by a stop after its grace period: this process did not die
                # of it, so give it back without spending its delivery count
                await self._settle(msg, Release(), queue)
            raise
        except Exception:
            if msg in self._decided:
                log.exception("unexpected error after settling job %s", msg.message_id)
            else:
                await self._trouble(msg, queue)
        finally:
            self._tasks.discard(task)
            self._held.pop(task, None)
            self._decided.discard(msg)
            self._returned.discard(msg)

    async def _trouble(self, msg: Delivery, queue: str) -> None:
        """Processing failed where it never should: log it, pause (longer each time for
        the same job), then return the delivery. Never a hot redelivery loop."""
        job_id = msg.message_id or ""
        times = self._troubled.pop(job_id, 0) + 1
        self._troubled[job_id] = times
        if len(self._troubled) > 1000:
            self._troubled.popitem(last=False)
        pause = min(MAX_TROUBLE_PAUSE, 2.0 ** (times - 1))
        log.exception(
            "unexpected error processing job %s (time %d); returning it in %.0fs",
            job_id or "without id",
            times,
            pause,
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), pause)
        await self._settle(msg, Release(), queue)

    async def _reset(self, msg: Delivery, queue: str) -> None:
        """Give a vouched-for delivery back as an unchanged copy, whose count starts
        again. If even that copy cannot be stored, it is nacked (vouched for again) and
        runs as it is when it comes back: never a loop of resets, each spending a count
        until the broker's delivery limit dead-letters a job that never ran."""
        await self._settle(msg, Release(), queue)
        job_id = msg.message_id
        if job_id and msg in self._returned and not msg.channel.is_closed:
            self._not_reset[job_id] = None  # nacked: its copy could not be stored
            if len(self._not_reset) > VOUCH_MEMORY:
                self._not_reset.popitem(last=False)

    def _vouched_for(self, msg: Delivery) -> Vouch | None:
        """This process gave the delivery back while alive, and the broker counted it:
        reset its count, or run it as it is if its last reset failed (None: neither)."""
        job_id = msg.message_id
        if job_id is None or job_id not in self._vouched:
            return None
        del self._vouched[job_id]
        reset_failed = job_id in self._not_reset
        self._not_reset.pop(job_id, None)  # used up with the vouch
        if msg.delivery_count == 0 or self.settings.queue_type != "quorum":
            return None
        return Vouch.RUN if reset_failed else Vouch.RESET

    def _suspect(self, msg: Delivery) -> bool:
        """Handed out ``SUSPECT_AFTER`` times (or up to a lower limit) and never settled."""
        if self.settings.queue_type != "quorum":
            return False  # classic queues neither count deliveries nor limit them
        return msg.delivery_count >= min(SUSPECT_AFTER, self.settings.delivery_limit)

    async def _quarantine(self, msg: Delivery, queue: str) -> None:
        log.warning(
            "message %s of queue %s was delivered %s times and never settled (did its"
            " worker die?); quarantining it to run alone",
            msg.message_id,
            queue,
            msg.headers.get("x-delivery-count"),
        )
        event = None
        if self.events:
            event = lifecycle.not_run(EventKind.QUARANTINED, msg, queue, self.clock.now_ms())
        if await self._settle(msg, Quarantine(moved_message(msg, queue)), queue, event):
            self.stats.quarantined += 1
            await self._not_run(OutcomeKind.QUARANTINED, msg, queue)

    async def _run_alone(self, task: asyncio.Task[Any], msg: Delivery, queue: str) -> None:
        """Run a quarantined delivery with nothing else held: pause, drain, run, resume."""
        self._alone_tasks.add(task)
        try:
            async with self._alone:
                paused = [c for c in self._consumers if c.source is not Source.QUARANTINE]
                await self._cancel(paused)
                while others := [t for t in self._tasks if t not in self._alone_tasks]:
                    await asyncio.wait(others)
                try:
                    await self._pipeline(msg, queue, is_due=True)
                finally:
                    await self._resume(paused)
        finally:
            self._alone_tasks.discard(task)

    async def _resume(self, paused: list[_Consumer]) -> None:
        for consumer in paused:
            if self._stop.is_set() or consumer.channel.is_closed:
                continue
            try:
                await self._consume(consumer.channel, consumer.queue, consumer.source)
            except ConnectionLostError as exc:
                # the channel is going away; the reconnect starts every consumer afresh
                log.debug("resuming consumer on %s: %s", consumer.queue, describe(exc))

    async def _pipeline(
        self, msg: Delivery, queue: str, is_due: bool, *, high: bool = False
    ) -> None:
        """One delivery: decode → admit (ETA) → its turn at a section it needs that this
        process holds → a slot → the attempt → decide → settle."""
        try:
            env = decode(msg, max_body=self.max_body)
            spec = self.registry.get(env.job_name)
            if spec is None:
                raise PoisonMessage(
                    DeadReason.UNKNOWN_JOB,
                    f"no handler for job {env.job_name!r} in this worker"
                    f" (queues: {', '.join(self.queues)})",
                )
            check_body(env.body)
            args = _decode_args(spec.job, env.body)
        except PoisonMessage as poison:
            log.warning("dead-lettering message %s: %s", msg.message_id, poison)
            error = ErrorInfo("InvalidMessage", poison.detail)
            await self._park(msg, poison.reason, error, queue)
            return

        admission = admit(
            env.eta_ms,
            self.clock.now_ms(),
            from_due_queue=is_due,
            hold_window_ms=self.settings.hold_window_ms,
        )
        if isinstance(admission, Redelay):
            if await self._settle(msg, Republish(env), queue):
                self.stats.redelayed += 1
                await self._not_run(OutcomeKind.REDELAYED, msg, queue, env)
            return
        if isinstance(admission, Hold) and not await self._hold_until(admission.until_ms):
            await self._settle(msg, Release(), queue)
            return

        ctx = JobContext(
            job=spec.job,
            job_id=env.job_id,
            attempt=env.attempt,
            queue=queue,
            enqueued_at=env.enqueued_at,
            eta=None if env.eta_ms is None else datetime.fromtimestamp(env.eta_ms / 1000, UTC),
            logger=logging.LoggerAdapter(
                spec.logger, {"job_id": env.job_id, "attempt": env.attempt}
            ),
            headers=env.extra_headers,
            key=(header_key(env.extra_headers) or spec.job.key_of(args))
            if spec.job.key is not None
            else None,
        )
        if self.sections is None or spec.job.exclusive is None:
            await self._run(msg, queue, env, spec, args, ctx, high)
            return
        try:
            await self.sections.wait_turn(ctx)  # a section this process holds: no slot
            await self._run(msg, queue, env, spec, args, ctx, high)
        finally:
            self.sections.forfeit(ctx)

    async def _run(
        self,
        msg: Delivery,
        queue: str,
        env: Envelope,
        spec: HandlerSpec,
        args: Any,
        ctx: JobContext,
        high: bool,
    ) -> None:
        """An admitted job: a slot → the attempt → decide → settle."""
        if not await self._slot_for(ctx, high):
            await self._settle(msg, Release(), queue)
            return
        loop = asyncio.get_running_loop()
        began = loop.time()
        key, started_ms = ctx.key, 0
        reply_to = env.extra_headers.get(H_REPLY_TO)
        task = None
        if self.events or reply_to:
            started_ms = self.clock.now_ms()
            if self.events:
                if self.started_after:  # built only if it runs that long
                    task = asyncio.current_task()
                    assert task is not None
                    self._starting[task] = (began, env, queue, started_ms, key)
                else:
                    self._record(
                        lifecycle.job_event(EventKind.STARTED, env, queue, started_ms, key)
                    )
        assert self._sem is not None
        failure, result = await run_attempt(
            spec,
            args,
            ctx,
            middleware=self._wrapping,
            executor=self._executor,
            release_slot=self._sem.release,
            settle_by=self._deadline(msg),
            consumer_timeout=self.consumer_timeout,
            threads=self._threads,
        )
        if task is not None:
            self._starting.pop(task, None)
        duration = loop.time() - began
        data = None
        if failure is None and (self.events or reply_to or spec.job.result_model is not None):
            try:
                data = spec.job.result_data(result)
            except ResultError as exc:
                failure = exc
        decision = decide(spec.job.retry, env.attempt, failure, result)
        action = action_for(
            decision,
            _carrying(env, ctx, decision),
            msg,
            queue,
            self.clock,
            duration=duration,
            log_success=self.log_success,
        )
        event = reply = None
        if self.events or reply_to:
            ended = lifecycle.ended(
                decision,
                env,
                queue,
                self.clock.now_ms(),
                key,
                started_ms=started_ms,
                duration=duration,
                result=data,
            )
            event = ended if self.events else None
            if isinstance(reply_to, str) and ended.is_terminal:
                reply = Reply(reply_to, ended)
        settled = await self._settle(msg, action, queue, event, reply)
        if settled:
            self._count(decision)
        else:
            self.stats.abandoned += 1
        if self.middleware:
            outcome = outcome_of(
                decision,
                duration=duration,
                job_id=env.job_id,
                job_name=env.job_name,
                queue=queue,
                attempt=env.attempt,
            )
            if not settled:
                outcome = replace(outcome, kind=OutcomeKind.ABANDONED)
            await tell_settled(self.middleware, outcome, ctx)

    async def _not_run(
        self,
        kind: OutcomeKind,
        msg: Delivery,
        queue: str,
        env: Envelope | None = None,
        **fields: Any,
    ) -> None:
        """Tell the middleware how a delivery that reached no handler ended."""
        if not self.middleware:
            return
        outcome = Outcome(
            kind,
            job_id=msg.message_id or "",
            job_name=msg.type or "",
            queue=queue,
            attempt=env.attempt if env is not None else 0,
            **fields,
        )
        await tell_settled(self.middleware, outcome, None)

    async def _park(self, msg: Delivery, reason: DeadReason, error: ErrorInfo, queue: str) -> None:
        """Park a message that can never run (poison), with its reason."""
        event = None
        if self.events:
            event = lifecycle.not_run(
                EventKind.DEAD, msg, queue, self.clock.now_ms(), error=error, dead_reason=reason
            )
        reply_to = msg.headers.get(H_REPLY_TO)
        reply = None
        if isinstance(reply_to, str):
            reply = Reply(
                reply_to,
                event
                or lifecycle.not_run(
                    EventKind.DEAD, msg, queue, self.clock.now_ms(), error=error, dead_reason=reason
                ),
            )
        parked = Park(dead_message(msg, reason, error, queue))
        if await self._settle(msg, parked, queue, event, reply):
            self.stats.dead += 1
            self.stats.by_reason[reason] = self.stats.by_reason.get(reason, 0) + 1
            await self._not_run(OutcomeKind.DEAD, msg, queue, error=error, dead_reason=reason)

    def _record(self, event: JobEvent) -> None:
        """Publish an event that no settlement waits for (``started``), in the
        background; a failure is logged (the attempt's end is recorded either way)."""
        task = asyncio.ensure_future(
            self.link.retrying(
                self.link.send_event,
                event.routing_key,
                event.to_message(),
                give_up_after=self.connect_timeout,
            )
        )
        self._recording.add(task)
        task.add_done_callback(self._recorded)

    async def _announce_long_attempts(self) -> None:
        """Publish the started event of every attempt that has run ``started_after``."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.started_after / 2)
            since = loop.time() - self.started_after
            due = [task for task, started in self._starting.items() if started[0] <= since]
            for task in due:
                _, env, queue, at, key = self._starting.pop(task)
                self._record(lifecycle.job_event(EventKind.STARTED, env, queue, at, key))

    def _recorded(self, task: asyncio.Task[None]) -> None:
        self._recording.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.warning("could not publish a started event: %s", describe(exc))

    async def _hold_until(self, eta_ms: int) -> bool:
        """Wait for the ETA in memory; False if the worker is stopping first."""
        if self._stop.is_set():
            return False
        due = asyncio.ensure_future(self.clock.sleep_until(eta_ms))
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({due, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            due.cancel()
            stop.cancel()
        return not self._stop.is_set()

    async def _slot_for(self, ctx: JobContext, high: bool) -> bool:
        """A slot for the job. One handed a section's lock takes the slot its holder
        reserved as it ended (freed in the same turn of the loop); should it not come
        within ``local_wait`` (a safety net: other workers' jobs of the key are turned
        away while this one holds the lock), the job gives the lock back and waits as
        any other."""
        sections = self.sections
        reserved = sections.take_slot(ctx) if sections is not None else None
        if sections is not None and reserved is not None:
            assert self._sem is not None
            try:
                await asyncio.wait([reserved], timeout=sections.local_wait)
            except asyncio.CancelledError:
                self._sem.give_up(reserved)
                raise
            if reserved.done() and not self._stop.is_set():
                return True
            self._sem.give_up(reserved)
            sections.forfeit(ctx)
        return await self._acquire_slot(high)

    async def _acquire_slot(self, high: bool = False) -> bool:
        """Take one of ``concurrency`` slots (``high``: ahead of normal work, slots.py);
        False if the worker is stopping first."""
        assert self._sem is not None
        if self._stop.is_set():
            return False
        if not self._sem.locked():
            await self._sem.acquire(high)
            return True
        acquire = asyncio.ensure_future(self._sem.acquire(high))
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({acquire, stop}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            stop.cancel()
            if acquire.done() and not acquire.cancelled():
                self._sem.release()  # granted as this was cancelled
            else:
                acquire.cancel()  # Slots.acquire hands on one granted meanwhile
            raise
        stop.cancel()
        if acquire.done() and not acquire.cancelled():
            if self._stop.is_set():
                self._sem.release()
                return False
            return True
        acquire.cancel()
        return False

    def _deadline(self, msg: Delivery, *, settling: bool = False) -> float:
        """Loop time by which a delivery's handler must end (``settling``: by which its
        settlement must be done), before the broker's consumer_timeout takes it back.
        The handler stops a margin early; settling may use three quarters of that."""
        ct = self.consumer_timeout
        if ct != self._margin_for:
            self._margin_for, self._margin = ct, consumer_timeout_margin(ct)
        margin = self._margin
        return msg.received + ct - (margin / 4 if settling else margin)

    def _count(self, decision: Decision) -> None:
        """Count a decision the broker confirmed."""
        stats = self.stats
        if type(decision) is Succeed:
            stats.succeeded += 1
        elif isinstance(decision, RetryIn):
            stats.retried += 1
        elif isinstance(decision, DeferBy):
            stats.deferred += 1
        elif isinstance(decision, Bury):
            stats.dead += 1
            reason = str(decision.reason)
            stats.by_reason[reason] = stats.by_reason.get(reason, 0) + 1

    async def _settle(
        self,
        msg: Delivery,
        action: Action,
        queue: str,
        event: JobEvent | None = None,
        reply: Reply | None = None,
    ) -> bool:
        """Settle ``msg`` once: its fate (acked, replaced or given back) is then decided,
        and a later failure on its task must not give it back a second time. True if it
        was acked; vouched for if it went back counted."""
        self._decided.add(msg)
        fate = await settle(
            msg,
            action,
            self.link,
            queue,
            hold_until=self._deadline(msg, settling=True),
            event=event,
            reply=reply,
        )
        if fate is Fate.RETURNED:
            # nacked by this living process (not even an unchanged copy could be
            # stored), or taken back from it (its channel closed): a count that comes
            # back with it was no death
            self._vouch(msg)
            self._returned.add(msg)
        return fate is Fate.ACKED

    # -- idleness (tests, demo) ------------------------------------------------------

    async def pending(self) -> int:
        """Messages not yet done: in this worker, in its queues and in the delay cascade."""
        total = self.in_flight
        names = [
            name(self.namespace, q)
            for q in self.queues
            for name in (work_queue, due_queue, quarantine_queue)
        ]
        for name in names:
            total += await self.link.depth(name) or 0
        for level in range(self.settings.delay_levels):
            # a level is declared once a job first needs it: a missing one holds nothing
            if depth := await self.link.depth(delay_queue(self.namespace, level)) or 0:
                total += depth
                self.cascade_held_at = asyncio.get_running_loop().time()
        return total


def _decode_args(job: Job[Any], body: bytes) -> Any:
    try:
        return job.decode_args(body)
    except ArgsValidationError as exc:
        bad_json = any(e.get("type") == "json_invalid" for e in exc.errors)
        reason = DeadReason.INVALID_JSON if bad_json else DeadReason.INVALID_ARGS
        raise PoisonMessage(reason, str(exc)) from None


def _check_timeouts(registry: Registry, queues: Sequence[str], consumer_timeout: float) -> None:
    for spec in registry:
        job = spec.job
        if job.queue not in queues:
            continue
        if job.timeout is None:
            log.warning(
                "job %s has no timeout: a run is stopped and retried after %.0fs, before"
                " the broker's consumer_timeout (%.0fs) would take it back",
                job.name,
                consumer_timeout - consumer_timeout_margin(consumer_timeout),
                consumer_timeout,
            )
        elif job.timeout >= consumer_timeout:
            raise ContractError(
                f"job {job.name!r} has timeout {job.timeout:.0f}s, not below the broker's"
                f" consumer_timeout ({consumer_timeout:.0f}s): the broker would close the"
                " channel mid-job. Lower the job's timeout, or raise consumer_timeout in"
                " rabbitmq.conf and tell the worker (--consumer-timeout)."
            )


async def _stop_scheduler(scheduler: Scheduler | None, task: asyncio.Future[None]) -> None:
    """Stop standing for scheduler (bounded): the token goes to another candidate."""
    if scheduler is not None:
        scheduler.stop()
    try:
        async with asyncio.timeout(5):
            await asyncio.shield(task)
    except TimeoutError:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
    except Exception:
        log.exception("the scheduler failed")


async def _close_quietly(session: Session | None) -> None:
    if session is not None:
        await session.close()


def _carrying(env: Envelope, ctx: JobContext, decision: Decision) -> Envelope:
    """The envelope a retry or deferral copies, with the headers middleware asked the
    next copy to carry (``JobContext.carry``)."""
    if not ctx.carry or not isinstance(decision, RetryIn | DeferBy):
        return env
    return replace(env, extra_headers={**env.extra_headers, **ctx.carry})
