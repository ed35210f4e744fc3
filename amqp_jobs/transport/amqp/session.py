"""Consuming from RabbitMQ: a session (one connection) and its prefetch-bounded channels.

Deliveries are read below aio-pika (see ``channels.Delivery``). Whatever ends a
consumer is reported through one callback: the connection closing, a channel closing
(with the broker's consumer_timeout when that is the reason), or the broker cancelling
a consumer because its queue was deleted.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection

from amqp_jobs.errors import ConnectionLostError
from amqp_jobs.message import Message
from amqp_jobs.transport.amqp.acks import Acks
from amqp_jobs.transport.amqp.channels import LOST, Delivery, is_alive, open_channel, ours
from amqp_jobs.transport.amqp.connection import TRANSIENT, connect, describe
from amqp_jobs.transport.amqp.link import message_properties
from amqp_jobs.transport.base import Delivery as DeliveryProtocol
from amqp_jobs.transport.base import OnLost
from amqp_jobs.urls import BrokerURLs

log = logging.getLogger("amqp_jobs.transport.amqp")

#: The broker's reason when it closes a channel for a delivery held too long.
_CONSUMER_TIMED_OUT = re.compile(r"delivery acknowledgement .*timed out.*?(\d+) ms", re.S)


class AmqpChannel:
    """A channel that consumes with a prefetch."""

    def __init__(self, session: AmqpSession, channel: AbstractChannel, raw: aiormq.Channel) -> None:
        self._session = session
        self._channel = channel
        self._raw = raw
        self.acks = Acks(raw)

    @property
    def is_closed(self) -> bool:
        return self._raw.is_closed

    async def consume(
        self,
        queue: str,
        on_delivery: Callable[[DeliveryProtocol], Coroutine[Any, Any, None]],
        *,
        arguments: Mapping[str, Any] | None = None,
    ) -> str:
        loop = asyncio.get_running_loop()
        acks = self.acks

        # async def: aiormq wraps a plain function in a coroutine of its own
        async def on_message(message: aiormq.abc.DeliveredMessage) -> None:
            await on_delivery(Delivery(message, queue, loop.time(), self, acks))

        try:
            ok = await self._raw.basic_consume(
                queue, on_message, no_ack=False, arguments=dict(arguments) if arguments else None
            )
        except (*TRANSIENT, *LOST) as exc:
            raise ours(f"consuming {queue}", exc) from exc
        assert ok.consumer_tag is not None
        return ok.consumer_tag

    async def get(self, queue: str) -> DeliveryProtocol | None:
        try:
            message = await self._raw.basic_get(queue, no_ack=False)
        except (*TRANSIENT, *LOST) as exc:
            raise ours(f"getting from {queue}", exc) from exc
        if message.delivery is None or isinstance(message.delivery, aiormq.spec.Basic.GetEmpty):
            return None
        return Delivery(message, queue, asyncio.get_running_loop().time(), self, self.acks)

    async def close(self) -> None:
        if self._channel.is_closed:
            return
        await self.acks.flushed()  # closing drops what is not queued before it
        try:
            await self._channel.close()
        except (*TRANSIENT, *LOST) as exc:
            raise ours("closing a channel", exc) from exc

    async def cancel(self, tag: str) -> None:
        if self._raw.is_closed:
            return
        try:
            await self._raw.basic_cancel(tag)
        except (*TRANSIENT, *LOST) as exc:
            raise ours(f"cancelling consumer {tag}", exc) from exc


#: Idle channels a session keeps for lock operations (a held lock keeps its own).
MAX_SPARES = 64
#: Spare channels being opened at once, at most, for those refused claims cost.
MAX_OPENING = 8
#: How long a lock queue nobody holds lasts before the broker deletes it (ms): a key
#: used again within it costs no declaration. (Its queue is durable: RabbitMQ 4.3
#: refuses transient queues that are not exclusive, closing the connection.)
LOCK_EXPIRES_MS = 60_000
#: Lock queues a session remembers having used, at most.
MAX_RECENT = 10_000
#: How long a transaction's commit may take before the channel counts as lost.
COMMIT_TIMEOUT = 10.0


class AmqpTxChannel(AmqpChannel):
    """A channel in transaction mode (tx.select): publishes and acks take effect at
    commit, or not at all if the channel or connection closes first."""

    async def publish(self, exchange: str, routing_key: str, message: Message) -> None:
        try:
            await self._raw.basic_publish(
                message.body,
                exchange=exchange,
                routing_key=routing_key,
                properties=message_properties(message),
                mandatory=True,
            )
        except (*TRANSIENT, *LOST) as exc:
            raise ours(f"publishing to {exchange!r} / {routing_key!r}", exc) from exc

    async def commit(self) -> None:
        """Commit, bounded by COMMIT_TIMEOUT: a queue that lost its quorum would hold
        the commit, and the caller, forever. (A message the broker returns unroutable
        is logged by aiormq: without publisher confirms, which tx excludes, it has no
        one to hand it to.)"""
        try:
            async with asyncio.timeout(COMMIT_TIMEOUT):
                await self.acks.flushed()  # this transaction's acks go before its commit
                await self._raw.tx_commit()
        except TimeoutError:
            raise ConnectionLostError(
                f"committing a transaction: no answer in {COMMIT_TIMEOUT:g}s"
            ) from None
        except (*TRANSIENT, *LOST) as exc:
            raise ours("committing a transaction", exc) from exc


class AmqpSession:
    """One consuming connection."""

    def __init__(self, connection: AbstractConnection) -> None:
        self._connection = connection
        self._callbacks: list[OnLost] = []
        self._channels: list[AmqpChannel] = []
        #: idle channels for taking and freeing locks
        self._spares: list[tuple[AbstractChannel, aiormq.Channel]] = []
        #: locks held: the channel each one's consumer lives on, and its tag
        self._locks: dict[str, tuple[tuple[AbstractChannel, aiormq.Channel], str]] = {}
        #: spare channels being opened in the background
        self._opening = 0
        #: lock queues this session used lately, and when (the newest MAX_RECENT)
        self._recent: OrderedDict[str, float] = OrderedDict()
        self._background: set[asyncio.Future[None]] = set()
        self._reported = False
        #: close() was called: channels closing now close with the connection, on purpose
        self._closing = False
        connection.close_callbacks.add(self._connection_closed)

    @classmethod
    async def open(
        cls,
        urls: BrokerURLs,
        *,
        name: str,
        give_up_after: float | None,
        ssl_context: ssl.SSLContext | None,
    ) -> AmqpSession:
        connection = await connect(
            urls, name=name, give_up_after=give_up_after, ssl_context=ssl_context
        )
        return cls(connection)

    def on_lost(self, callback: OnLost) -> None:
        self._callbacks.append(callback)

    def _lost(self, reason: str, consumer_timeout: float | None = None) -> None:
        for callback in list(self._callbacks):
            callback(reason, consumer_timeout)

    def _connection_closed(self, _: object, exc: BaseException | None = None) -> None:
        self._lost(f"connection closed: {describe(exc)}" if exc else "connection closed")

    def _channel_closed(self, _: object, exc: BaseException | None = None) -> None:
        match = _CONSUMER_TIMED_OUT.search(str(exc)) if exc is not None else None
        learned = int(match[1]) / 1000 if match else None
        self._lost(f"channel closed: {describe(exc)}", learned)

    def _cancelled(self, frame: Any) -> None:
        tag = getattr(frame, "consumer_tag", None)
        self._lost(f"the broker cancelled consumer {tag} (was its queue deleted?)")

    async def channel(self, prefetch: int) -> AmqpChannel:
        try:
            channel = await open_channel(self._connection, publisher_confirms=False)
            await channel.set_qos(prefetch_count=prefetch)
            raw = await channel.get_underlay_channel()
        except (*TRANSIENT, *LOST) as exc:
            raise ours("opening a channel", exc) from exc
        assert isinstance(raw, aiormq.Channel)
        channel.close_callbacks.add(self._channel_closed)
        raw.on_consumer_cancel_callbacks.add(self._cancelled)
        opened = AmqpChannel(self, channel, raw)
        self._channels.append(opened)
        return opened

    async def _spare(self, *, fresh: bool = False) -> tuple[AbstractChannel, aiormq.Channel]:
        """A channel for one lock operation: an idle one if any, else a new one. Locks
        are taken and freed around every exclusive job: opening and closing a channel
        each time doubled the round trips."""
        while self._spares and not fresh:
            spare = self._spares.pop()
            if not spare[1].is_closed:
                return spare
        opened = await open_channel(self._connection, publisher_confirms=False)
        underlay = await opened.get_underlay_channel()
        assert isinstance(underlay, aiormq.Channel)
        opened.close_callbacks.add(self._lock_channel_closed)
        underlay.on_consumer_cancel_callbacks.add(self._lock_cancelled)
        return opened, underlay

    def _done_with(self, spare: tuple[AbstractChannel, aiormq.Channel]) -> None:
        if not spare[1].is_closed and len(self._spares) < MAX_SPARES:
            self._spares.append(spare)
        else:
            self._discard(spare)

    def _discard(self, spare: tuple[AbstractChannel, aiormq.Channel]) -> None:
        """Close a spare in the background, if the broker has not."""
        if not spare[1].is_closed:
            task = asyncio.ensure_future(spare[0].close())
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    def _replenish(self) -> None:
        """Open a spare in the background for the one a refused claim cost: the next
        claim then takes one round trip, not two. Refusals come in bursts (a busy key
        wanted by several jobs at once), so several are opened at once."""
        if (
            self._opening >= MAX_OPENING
            or len(self._spares) + self._opening >= MAX_SPARES
            or not is_alive(self._connection)
        ):
            return
        self._opening += 1

        async def open_one() -> None:
            try:
                self._done_with(await self._spare(fresh=True))
            except Exception as exc:
                log.debug("opening a spare channel: %s", describe(exc))
            finally:
                self._opening -= 1

        self._background.add(task := asyncio.ensure_future(open_one()))
        task.add_done_callback(self._background.discard)

    def _lock_channel_closed(self, channel: object, exc: BaseException | None = None) -> None:
        """A held lock's channel closed under it. Our own channels close only with the
        connection (reported already) or by a call on them, and a held lock's channel
        takes none: if it happens, the lock is free for others while its holder runs."""
        if self._closing or not is_alive(self._connection):
            return  # closed with the connection: reported as its loss already
        for name, (spare, _) in list(self._locks.items()):
            if spare[0] is channel:
                self._lose(name, f"its channel closed: {describe(exc)}")

    def _lock_cancelled(self, frame: Any) -> None:
        """The broker cancelled a held lock's consumer: its queue was deleted (by hand,
        or with a cluster node). Another may take the lock while its holder runs."""
        tag = getattr(frame, "consumer_tag", None)
        for name, (_, held) in list(self._locks.items()):
            if held == tag:
                self._lose(name, "the broker cancelled it (was its queue deleted?)")

    def _lose(self, name: str, why: str) -> None:
        """A lock lost while held is reported as the session's loss: its holders (a
        worker, a recorder) start again on a new connection rather than run on, unaware,
        beside a new holder."""
        self._locks.pop(name, None)
        log.error("lock %s was lost: %s", name, why)
        self._lost(f"lock {name} was lost: {why}")

    async def claim(self, name: str) -> bool:
        """The lock is an exclusive consumer on the queue ``name`` (a classic queue the
        broker deletes once unused for LOCK_EXPIRES_MS; durable, as RabbitMQ 4.3 refuses
        transient queues that are not exclusive). Consuming and cancelling are
        the queue's own work; declaring and deleting an exclusive queue per job, as
        before, went through the broker's schema database, one at a time for every
        connection, and cost tens of ms under load. The consumer lives on a channel of
        its own: a refused claim closes the channel it was tried on."""
        if name in self._locks:
            if not self._locks[name][0][1].is_closed:
                return True
            del self._locks[name]  # its channel went (with the connection): not held
        declare = not self._known(name)
        gone: BaseException | None = None
        try:
            for _ in range(2):
                spare = await self._spare()
                try:
                    if declare:
                        # unanswered, ahead of the consume on the same channel: the
                        # consume's answer (or the channel's close) says how it went.
                        # A key's first use costs one round trip, as any other.
                        arguments: dict[str, Any] = {"x-expires": LOCK_EXPIRES_MS}
                        await spare[1].queue_declare(
                            name, durable=True, arguments=arguments, nowait=True
                        )
                    ok = await spare[1].basic_consume(name, _nothing, exclusive=True, no_ack=True)
                except (
                    aiormq.exceptions.ChannelAccessRefused,  # held, or a refused declare
                    aiormq.exceptions.ChannelLockedResource,  # an exclusive queue (<= 0.13)
                ) as exc:
                    if not _held_by_another(exc):
                        raise  # refused for itself (permissions, a reserved name): say so
                    self._used(name)
                    self._replenish()
                    return False  # and the broker closed the channel
                except aiormq.exceptions.ChannelNotFoundEntity as exc:
                    gone, declare = exc, True  # expired after all: then again, declared
                    self._replenish()  # the broker closed that channel too
                    continue
                except (Exception, asyncio.CancelledError):
                    # cut off between the declare and the consume (cancelled, say): a
                    # channel a declare may yet fail on goes, not back among the spares
                    self._discard(spare)
                    raise
                assert ok.consumer_tag is not None
                self._locks[name] = (spare, ok.consumer_tag)
                return True
        except (*TRANSIENT, *LOST) as exc:
            raise ours(f"claiming {name}", exc) from exc
        raise ConnectionLostError(
            f"claiming {name}: its queue vanished as it was declared ({describe(gone)})"
        )

    def _known(self, name: str) -> bool:
        """Whether ``name`` was used so recently that it cannot have expired: then it
        needs no declaration (a refused consume costs its channel)."""
        used = self._recent.get(name)
        return used is not None and time.monotonic() - used < LOCK_EXPIRES_MS / 2000

    def _used(self, name: str) -> None:
        self._recent[name] = time.monotonic()
        self._recent.move_to_end(name)
        while len(self._recent) > MAX_RECENT:
            self._recent.popitem(last=False)

    async def release(self, name: str) -> None:
        held = self._locks.pop(name, None)
        if held is None:
            return
        spare, tag = held
        self._used(name)
        if spare[1].is_closed:
            return  # the lock went with its channel
        try:
            # nowait: the lock outlives its holder by the time the broker takes to read
            # this, never the other way round, and the job need not wait for an answer
            await spare[1].basic_cancel(tag, nowait=True)
        except (*TRANSIENT, *LOST) as exc:
            raise ours(f"releasing {name}", exc) from exc
        finally:
            self._done_with(spare)

    async def delete_queue(self, name: str) -> None:
        try:
            spare = await self._spare()
            try:
                await spare[1].queue_delete(name)
            finally:
                self._done_with(spare)
        except (*TRANSIENT, *LOST) as exc:
            raise ours(f"deleting {name}", exc) from exc

    async def declare_reply_queue(self, name: str, *, expires_ms: int) -> None:
        try:
            channel = await open_channel(self._connection, publisher_confirms=False)
            try:
                await channel.declare_queue(name, durable=True, arguments={"x-expires": expires_ms})
            finally:
                if not channel.is_closed:
                    await channel.close()
        except (*TRANSIENT, *LOST) as exc:
            raise ours(f"declaring {name}", exc) from exc

    async def declare_queue(self, name: str, arguments: Mapping[str, Any]) -> None:
        try:
            channel = await open_channel(self._connection, publisher_confirms=False)
            try:
                await channel.declare_queue(name, durable=True, arguments=dict(arguments))
            finally:
                if not channel.is_closed:
                    await channel.close()
        except (*TRANSIENT, *LOST) as exc:
            raise ours(f"declaring {name}", exc) from exc

    async def transactional(self, prefetch: int) -> AmqpTxChannel:
        try:
            channel = await open_channel(self._connection, publisher_confirms=False)
            await channel.set_qos(prefetch_count=prefetch)
            raw = await channel.get_underlay_channel()
            assert isinstance(raw, aiormq.Channel)
            await raw.tx_select()
        except (*TRANSIENT, *LOST) as exc:
            raise ours("opening a transactional channel", exc) from exc
        channel.close_callbacks.add(self._channel_closed)
        raw.on_consumer_cancel_callbacks.add(self._cancelled)
        opened = AmqpTxChannel(self, channel, raw)
        self._channels.append(opened)
        return opened

    async def close(self) -> None:
        """Close the connection: every delivery it holds returns to its queue. Acks
        queued for the writer go out first (closing drops what it has not written)."""
        self._callbacks.clear()
        if self._connection.is_closed:
            return
        # A connection the broker closed (or whose socket died) has nothing to flush:
        # aio-pika still calls it open, and waiting on its writer cost every reconnect
        # FLUSH_TIMEOUT (a worker, a reply consumer, deaf 2 s longer than needed).
        if is_alive(self._connection):
            try:
                async with asyncio.timeout(FLUSH_TIMEOUT):
                    for channel in self._channels:
                        await channel.acks.flushed()
                    await _written(self._connection)
            except TimeoutError:
                log.warning(
                    "closing the connection: settlements not written within %.0f s are"
                    " dropped; the broker delivers those jobs again",
                    FLUSH_TIMEOUT,
                )
        self._closing = True  # the locks' channels now close with it, and free them
        self._locks.clear()
        try:
            await self._connection.close()
        except Exception as exc:
            log.debug("closing connection: %s", describe(exc))


def _held_by_another(exc: BaseException) -> bool:
    """Whether a refused claim was refused because another consumer holds the lock, not
    for itself: a declare refused for want of permission, or for a reserved name, must
    not read as "taken" for ever. RabbitMQ says "ACCESS_REFUSED - queue 'N' in vhost 'V'
    in exclusive use", cut to 255 bytes with "..." when the names are long; its other
    refusals read "... access to queue ..." or "queue name ...", never "queue '"."""
    if isinstance(exc, aiormq.exceptions.ChannelLockedResource):
        return True
    text = str(exc)
    return "in exclusive use" in text or (
        text.startswith("ACCESS_REFUSED - queue '") and text.endswith("...")
    )


async def _nothing(_: object) -> None:
    """A lock queue's consumer: nothing is ever published to it."""


#: How long closing a session waits for queued acks to be written.
FLUSH_TIMEOUT = 2.0


async def _written(connection: AbstractConnection) -> None:
    """Wait until the connection's writer has written every frame queued before now:
    acks are sent without waiting for each (``Delivery.ack``). An empty frame with a
    drain future, queued last, is drained only after them."""
    underlay = getattr(getattr(connection, "transport", None), "connection", None)
    queue = getattr(underlay, "write_queue", None)
    if not isinstance(underlay, aiormq.Connection) or not isinstance(queue, asyncio.Queue):
        return
    if underlay.is_closed:
        return
    written: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    marker = aiormq.abc.ChannelFrame.marshall(0, [], drain_future=written)
    await queue.put(marker)
    # or until the connection closes: a writer that died meanwhile drains nothing more
    closing = underlay.closing
    try:
        await asyncio.wait({written, closing}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        closing.cancel()  # only this observer of the closure
