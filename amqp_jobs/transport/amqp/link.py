"""A live link to the broker: connection, declarer and publisher, rebuilt when lost.

Also the one place that decides where a job message goes: straight to the jobs
exchange, or into the delay cascade when it is due later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import threading
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import aiormq
from aio_pika.abc import AbstractConnection
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    retry_if_not_exception_type,
    wait_exponential,
    wait_random,
)

from amqp_jobs.clock import WALL
from amqp_jobs.contract import TopologySettings
from amqp_jobs.errors import (
    BrokerUnavailableError,
    ContractError,
    PublishError,
    PublishRefusedError,
    PublishTimeoutError,
    UnroutableError,
)
from amqp_jobs.message import CONTENT_TYPE, Envelope, Message
from amqp_jobs.topology import (
    dead_exchange,
    delayed_route,
    events_exchange,
    fresh_route,
    quarantine_queue,
    route_levels,
)
from amqp_jobs.transport.amqp.channels import LOST, is_alive, open_channel, ours
from amqp_jobs.transport.amqp.connection import (
    TRANSIENT,
    Publisher,
    bounded,
    connect,
    deadline,
    describe,
    log_retries,
)
from amqp_jobs.transport.amqp.declare import Declarer
from amqp_jobs.urls import BrokerURLs, resolve

log = logging.getLogger("amqp_jobs.link")

#: Connections of loops a link moved away from that are not closed (a forked child's
#: copies of its parent's, a stopped loop's): never collected, so never closed from here.
_LEFT_BEHIND: list[tuple[AbstractConnection, Publisher | None]] = []

#: Channel-level failures that a fresh channel or connection may cure.
RECOVERABLE = (*TRANSIENT, aiormq.exceptions.ChannelClosed)
#: ... except these, which say the same thing again however often we ask.
PERMANENT = (
    aiormq.exceptions.ChannelAccessRefused,
    aiormq.exceptions.ChannelPreconditionFailed,
    aiormq.exceptions.ProbableAuthenticationError,
)


def message_properties(message: Message) -> aiormq.spec.Basic.Properties:
    return aiormq.spec.Basic.Properties(
        content_type=message.content_type,
        delivery_mode=2,
        message_id=message.message_id,
        message_type=message.type,
        timestamp=message.timestamp,
        headers=dict(message.headers),
    )


def envelope_properties(envelope: Envelope) -> aiormq.spec.Basic.Properties:
    """Built straight from the envelope: the publish hot path skips the Message."""
    return aiormq.spec.Basic.Properties(
        content_type=CONTENT_TYPE,
        delivery_mode=2,
        message_id=envelope.job_id,
        message_type=envelope.job_name,
        timestamp=envelope.enqueued_at,
        headers=envelope.headers(),
    )


class Link:
    """One connection with its declarer and confirm publisher."""

    clock = WALL

    def __init__(
        self,
        urls: BrokerURLs | str | Sequence[str],
        namespace: str,
        settings: TopologySettings,
        *,
        name: str,
        declare: bool = True,
        ssl_context: ssl.SSLContext | None = None,
        connect_timeout: float | None = 30.0,
        confirm_timeout: float | None = 30.0,
    ) -> None:
        self.urls = resolve(urls)
        self.namespace = namespace
        self.settings = settings
        self.name = name
        self.declare = declare
        self.ssl_context = ssl_context
        self.connect_timeout = connect_timeout
        self.confirm_timeout = confirm_timeout
        self._connection: AbstractConnection | None = None
        self._declarer: Declarer | None = None
        self._publisher: Publisher | None = None
        self._lock = asyncio.Lock()
        #: the event loop (and process) the connection, publisher and lock belong to
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pid = os.getpid()
        #: (queue, job name) pairs, and "cascade", known declared on this connection
        self._ready: set[tuple[str, str] | str] = set()
        #: every work queue an earlier declarer of this link declared
        self._known: set[str] = set()

    @property
    def known_queues(self) -> set[str]:
        """Every work queue this link declared (for cleanup by tests)."""
        current = self._declarer.queues if self._declarer is not None else set()
        return self._known | current

    @property
    def is_open(self) -> bool:
        """Connected, in the running event loop (a connection of another loop is dead
        to this one: it cannot be used, nor closed, from here)."""
        return is_alive(self._connection) and self._loop is asyncio._get_running_loop()

    @property
    def connection(self) -> AbstractConnection:
        if self._connection is None:
            raise BrokerUnavailableError("not connected; call open() first")
        return self._connection

    @property
    def declarer(self) -> Declarer:
        assert self._declarer is not None, "open() first"
        return self._declarer

    @property
    def publisher(self) -> Publisher:
        assert self._publisher is not None, "open() first"
        return self._publisher

    async def open(self) -> None:
        """Connect (again) if not connected; retries as ``connect`` does."""
        if self.is_open:
            return
        if self._loop is not asyncio.get_running_loop():
            self._move_to_running_loop()
        async with self._lock:
            if self.is_open:
                return
            if self._declarer is not None:
                self._known |= self._declarer.queues
            connection = await connect(
                self.urls,
                name=self.name,
                give_up_after=self.connect_timeout,
                ssl_context=self.ssl_context,
            )
            self._connection = connection
            self._declarer = Declarer(connection, self.namespace, self.settings)
            self._ready = set()
            self._publisher = Publisher(connection, confirm_timeout=self.confirm_timeout)
            log.debug("%s connected to %s", self.name, self.urls)

    def _move_to_running_loop(self) -> None:
        """Start afresh in the running loop: a client reused by a second ``asyncio.run()``,
        or in a forked child.

        The connection, its publisher (with its watchdog task) and the lock belong to the
        loop they were made in. That loop is closed (``asyncio.run`` cancelled their tasks
        and the connection with them), stopped, or in the parent process, whose socket
        this one shares: they are left untouched, and the next open() connects anew.
        """
        old = self._loop
        if old is not None and old.is_running() and self._pid == os.getpid():
            raise ContractError(
                f"{self.name}: in use by an event loop running in another thread; a"
                " JobClient serves one event loop at a time (make one per loop, or publish"
                " from threads with SyncJobClient)"
            )
        if old is not None and not old.is_closed() and self._connection is not None:
            if self._pid == os.getpid():
                # a stopped loop of this process: close them there, briefly
                _close_on(old, self._connection, self._publisher)
            else:
                # Kept, not collected: aio-pika closes a collected connection from the
                # running loop, which would write on the parent's socket.
                _LEFT_BEHIND.append((self._connection, self._publisher))
        if self._declarer is not None:
            self._known |= self._declarer.queues
        self._connection, self._declarer, self._publisher = None, None, None
        self._ready = set()
        self._lock = asyncio.Lock()
        self._loop, self._pid = asyncio.get_running_loop(), os.getpid()

    async def close(self) -> None:
        old = self._loop
        if old is not None and old is not asyncio.get_running_loop():
            if old.is_running() and self._pid == os.getpid():
                # open in a loop running in another thread: closed there
                done = asyncio.run_coroutine_threadsafe(self.close(), old)
                await asyncio.wrap_future(done)
            else:
                self._move_to_running_loop()  # closes what a stopped loop of ours holds
            return
        if self._publisher is not None:
            await self._publisher.close()  # its confirm watchdog and retiring channels
        if self._declarer is not None:
            self._known |= self._declarer.queues
        if self._connection is not None and not self._connection.is_closed:
            await self._connection.close()
        self._connection = None

    def forget_declarations(self) -> None:
        if self._declarer is not None:
            self._known |= self._declarer.queues
            self._declarer.declared.clear()
        self._ready = set()

    # -- sending -------------------------------------------------------------------

    async def send(self, envelope: Envelope, queue: str, *, via_jobs_exchange: bool = True) -> None:
        """Publish one job message, confirmed, to where its ETA says.

        Due now and ``via_jobs_exchange``: the jobs exchange, keyed by job name (a fresh
        job). Otherwise: the delay cascade, which ends in ``queue``'s due queue (retries,
        re-delays, delayed jobs).
        """
        clock, s = self.clock, self.settings
        delay_ms = 0 if envelope.eta_ms is None else envelope.eta_ms - clock.now_ms()
        if self.declare:
            # What this publish needs: a job due now, its work queue; one to wait, its
            # queue's due queue and the levels of its delay. Declaring takes time, which
            # changes the delay and so perhaps the levels: until they hold. The route is
            # computed after the last await.
            job, declarer = envelope.job_name, self.declarer
            while True:
                if delay_ms <= 0 and via_jobs_exchange:
                    if (queue, job) in self._ready:
                        break
                    levels: tuple[int, ...] | None = None
                else:
                    levels = route_levels(delay_ms, s)
                    if declarer.has_due(queue) and declarer.has_levels(levels):
                        break
                async with bounded():
                    await declarer.publishing(queue, (job,), levels)
                if levels is None:
                    self._ready.add((queue, job))
                delay_ms = 0 if envelope.eta_ms is None else envelope.eta_ms - clock.now_ms()
        if delay_ms <= 0 and via_jobs_exchange:
            exchange, key = fresh_route(self.namespace, envelope)
        else:
            exchange, key = delayed_route(self.namespace, queue, delay_ms, s)
        await self.publisher.publish(exchange, key, envelope.body, envelope_properties(envelope))

    async def declare_queue(self, queue: str, job_names: Iterable[str]) -> None:
        try:
            async with bounded():
                await self.open()
                await self.declarer.queue(queue, set(job_names))
        except RECOVERABLE as exc:
            raise ours(f"declaring queue {queue}", exc) from exc

    async def send_batch(
        self, envelopes: Sequence[Envelope], queue: str, *, give_up_after: float
    ) -> list[BaseException | None]:
        """Publishes in flight together: their confirms arrive pipelined."""

        results = await asyncio.gather(
            *(self.retrying(self.send, e, queue, give_up_after=give_up_after) for e in envelopes),
            return_exceptions=True,
        )
        out: list[BaseException | None] = []
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, Exception):
                raise result
            out.append(result)
        return out

    async def declare_cascade(self) -> None:
        try:
            async with bounded():
                await self.open()
                await self.declarer.cascade()
        except RECOVERABLE as exc:
            raise ours("declaring the delay cascade", exc) from exc

    async def declare_events(self) -> None:
        try:
            async with bounded():
                await self.open()
                await self.declarer.events()
        except RECOVERABLE as exc:
            raise ours("declaring the events exchange and stream", exc) from exc

    async def send_dead(self, message: Message, queue: str) -> None:
        """Park a message in ``queue``'s dead-letter queue, confirmed."""
        if self.declare:
            async with bounded():
                await self.declarer.queue(queue, frozenset())
        await self.publisher.publish(
            dead_exchange(self.namespace), queue, message.body, message_properties(message)
        )

    async def send_quarantine(self, message: Message, queue: str) -> None:
        """Move a message to ``queue``'s quarantine queue (default exchange), confirmed."""
        if self.declare:
            async with bounded():
                await self.declarer.queue(queue, frozenset())
        await self.send_to_queue(quarantine_queue(self.namespace, queue), message)

    async def send_event(self, routing_key: str, message: Message) -> None:
        """A lifecycle event to the events exchange (and so its stream), confirmed."""
        if self.declare and "events" not in self.declarer.declared:
            async with bounded():
                await self.declarer.events()
        await self.publisher.publish(
            events_exchange(self.namespace), routing_key, message.body, message_properties(message)
        )

    async def send_to_queue(self, queue_name: str, message: Message) -> None:
        await self.publish("", queue_name, message)

    async def publish(self, exchange: str, routing_key: str, message: Message) -> None:
        await self.publisher.publish(
            exchange, routing_key, message.body, message_properties(message)
        )

    async def take(self, queue_name: str) -> Message | None:
        try:
            await self.open()
            channel = await open_channel(self.connection, publisher_confirms=False)
            try:
                raw = await channel.get_underlay_channel()
                got = await raw.basic_get(queue_name, no_ack=True)
            finally:
                if not channel.is_closed:
                    await channel.close()
        except (*RECOVERABLE, *LOST) as exc:
            raise ours(f"taking from {queue_name}", exc) from exc
        if got.delivery is None or isinstance(got.delivery, aiormq.spec.Basic.GetEmpty):
            return None
        p = got.header.properties
        return Message(
            got.body,
            p.content_type,
            p.message_id,
            p.message_type,
            p.timestamp,
            dict(p.headers or {}),
        )

    async def depth(self, queue_name: str) -> int | None:
        """Messages ready in a queue (a passive declare), or None if it does not exist."""
        counts = await self.counts(queue_name)
        return None if counts is None else counts[0]

    async def counts(self, queue_name: str) -> tuple[int, int] | None:
        """(ready, consumers) of a queue (a passive declare), or None if it does not exist."""
        try:
            await self.open()
            channel = await open_channel(self.connection, publisher_confirms=False)
        except RECOVERABLE as exc:
            raise ours(f"reading the depth of {queue_name}", exc) from exc
        try:
            raw = await channel.get_underlay_channel()
            ok = await raw.queue_declare(queue_name, passive=True)
            if ok is None:
                return 0, 0
            return ok.message_count or 0, ok.consumer_count or 0
        except aiormq.exceptions.ChannelNotFoundEntity:
            return None
        except (*RECOVERABLE, *LOST) as exc:
            raise ours(f"reading the depth of {queue_name}", exc) from exc
        finally:
            if not channel.is_closed:
                with contextlib.suppress(*LOST):
                    await channel.close()

    async def retrying(
        self, op: Callable[..., Awaitable[None]], *args: Any, give_up_after: float
    ) -> None:
        """Run ``op(*args)``, a publishing operation, reconnecting and retrying transient
        failures. (Arguments rather than a closure: every object alive per job in flight
        costs garbage collection, which dominated concurrent enqueues.)

        Returns or raises within ``max(give_up_after, confirm_timeout)`` seconds (with no
        confirm_timeout: ``give_up_after``, confirms waited for until then), whatever
        the broker does: every wait on the broker is bounded by that deadline. A stale
        declaration cache (topology deleted under us) is redeclared once. Errors are
        mapped: connection trouble as BrokerUnavailableError, no answer in time as
        PublishTimeoutError, other publish trouble as PublishError.
        """
        loop = asyncio.get_running_loop()
        ct = self.confirm_timeout
        budget = give_up_after if ct is None else max(give_up_after, ct)
        began = loop.time()
        token = deadline.set(began + budget)
        try:
            if self.is_open:
                # Fast path: one attempt without building a retry loop (or another
                # coroutine), which would cost more than the publish itself. Anything
                # worth retrying falls through.
                try:
                    await op(*args)
                    return
                except (*RECOVERABLE, PublishRefusedError):
                    pass
                except PublishError as exc:
                    if not (self.declare and _stale_topology(exc)):
                        raise
            await self._retry(op, args, give_up_after, budget, began + give_up_after)
        finally:
            deadline.reset(token)

    async def _retry(
        self,
        op: Callable[..., Awaitable[None]],
        args: tuple[Any, ...],
        give_up_after: float,
        budget: float,
        retry_until: float,
    ) -> None:
        redeclared = False
        # BrokerUnavailableError comes from connect(), which has already spent its own
        # retry budget (or met a failure that retrying cannot cure: login, certificate).
        retrying = AsyncRetrying(
            # a nack is retried too: nothing was stored, and the refusal may pass (a leader
            # moving in a cluster, a full queue draining); the publisher takes a new channel
            retry=retry_if_exception_type((*RECOVERABLE, PublishRefusedError))
            & retry_if_not_exception_type((*PERMANENT, BrokerUnavailableError)),
            wait=wait_exponential(multiplier=0.05, max=2.0) + wait_random(0, 0.1),
            # no new attempt (nor the pause before it) past retry_for
            stop=_past(retry_until),
            before_sleep=log_retries(f"{self.name}: publishing to", self.urls),
            reraise=True,
        )
        while True:
            try:
                async for attempt in retrying:
                    with attempt:
                        async with bounded():
                            await self.open()
                            await op(*args)
                return
            except (UnroutableError, PublishError) as exc:
                if redeclared or not self.declare or not _stale_topology(exc):
                    raise
                redeclared = True
                log.warning("%s: %s; declaring the topology again", self.name, exc)
                self.forget_declarations()
            except PERMANENT as exc:
                raise PublishError(f"the broker refused: {describe(exc)}") from None
            except BrokerUnavailableError:
                raise
            except TimeoutError:
                raise PublishTimeoutError(
                    f"the broker at {self.urls} did not answer within {budget:.0f}s (a memory"
                    " or disk alarm blocks publishers: see `rabbitmqctl status`); the job may"
                    " or may not be stored"
                ) from None
            except RECOVERABLE as exc:
                raise BrokerUnavailableError(
                    f"publishing to {self.urls} failed for {give_up_after:.0f}s: {describe(exc)}"
                ) from None


#: How long closing a connection left on a stopped event loop may take.
LEFT_CLOSE_TIMEOUT = 2.0


def _close_on(
    loop: asyncio.AbstractEventLoop, connection: AbstractConnection, publisher: Publisher | None
) -> None:
    """Close a connection (and its publisher) on the stopped loop they belong to, run for
    the purpose in a helper thread (this thread's loop is running), bounded."""

    async def close() -> None:
        if publisher is not None:
            await publisher.close()
        if not connection.is_closed:
            await connection.close()

    def run() -> None:
        try:
            loop.run_until_complete(asyncio.wait_for(close(), LEFT_CLOSE_TIMEOUT))
        except Exception as exc:
            log.debug("closing a connection left on a stopped loop: %r", exc)

    helper = threading.Thread(target=run, name="amqp-jobs close", daemon=True)
    helper.start()
    helper.join(LEFT_CLOSE_TIMEOUT + 1)


def _past(limit: float) -> Callable[[RetryCallState], bool]:
    """A tenacity stop: the next attempt would begin after the loop time ``limit``."""

    def stop(state: RetryCallState) -> bool:
        now = asyncio.get_running_loop().time()
        return now + (state.upcoming_sleep or 0.0) >= limit

    return stop


def _stale_topology(exc: PublishError) -> bool:
    return isinstance(exc, UnroutableError) or isinstance(
        exc.__cause__, aiormq.exceptions.ChannelNotFoundEntity
    )
