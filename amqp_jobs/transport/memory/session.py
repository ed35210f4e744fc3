"""Consuming from the in-memory broker: sessions, channels with a prefetch, deliveries."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Literal

from amqp_jobs.errors import (
    ConnectionLostError,
    ContractError,
    UnroutableError,
)
from amqp_jobs.message import Message
from amqp_jobs.transport.base import Delivery as DeliveryProtocol
from amqp_jobs.transport.base import OnLost, TxChannel
from amqp_jobs.transport.memory.broker import (
    MAX_PREFETCH,
    MemoryBroker,
    OnDelivery,
    _Consumer,
    _copy_headers,
    _Entry,
    _Queue,
)

log = logging.getLogger("amqp_jobs.transport.memory")


def open_session(broker: MemoryBroker, name: str) -> MemorySession:
    """A new session (a consuming connection) on ``broker``, in the running loop."""
    session = MemorySession(broker, name, asyncio.get_running_loop())
    broker._add_session(session)
    return session


class MemoryDelivery:
    """One message handed out by a queue, to be acked or returned."""

    __slots__ = (
        "_channel",
        "_consumer",
        "_entry",
        "_queue",
        "body",
        "content_type",
        "delivery_tag",
        "exchange",
        "headers",
        "message_id",
        "queue_name",
        "received",
        "redelivered",
        "routing_key",
        "timestamp",
        "type",
    )

    def __init__(
        self,
        channel: MemoryChannel,
        consumer: _Consumer,
        queue: _Queue,
        entry: _Entry,
        tag: int,
        received: float,
    ) -> None:
        self._channel = channel
        self._consumer = consumer
        self._queue = queue
        self._entry = entry
        message = entry.message
        self.body: bytes = message.body
        self.content_type: str | None = message.content_type
        self.type: str | None = message.type
        self.message_id: str | None = message.message_id
        self.timestamp: datetime | None = message.timestamp
        # a copy: what one consumer does to it never reaches another
        self.headers: dict[str, Any] = _copy_headers(message.headers)
        if queue.quorum and entry.count > 0:
            self.headers["x-delivery-count"] = entry.count
        if queue.stream:
            self.headers["x-stream-offset"] = entry.seq
        self.queue_name: str = queue.name
        self.received: float = received
        self.redelivered: bool = entry.count > 0 if queue.quorum else entry.delivered
        self.exchange: str = entry.exchange
        self.routing_key: str = entry.routing_key
        self.delivery_tag: int = tag

    def __repr__(self) -> str:
        return (
            f"MemoryDelivery({self.message_id!r} from {self.queue_name!r}, tag={self.delivery_tag})"
        )

    @property
    def channel(self) -> MemoryChannel:
        return self._channel

    @property
    def delivery_count(self) -> int:
        """Times a quorum queue handed this message out before, unsettled (0 if unknown)."""
        count = self.headers.get("x-delivery-count")
        return count if isinstance(count, int) and not isinstance(count, bool) else 0

    async def ack(self) -> None:
        self._channel._settle(self, "ack")

    async def nack(self, *, requeue: bool = True) -> None:
        self._channel._settle(self, "requeue" if requeue else "reject")


async def _no_callback(delivery: DeliveryProtocol) -> None:
    """What a basic.get 'consumer' is called with: never."""


class MemoryChannel:
    """A consuming channel; its prefetch applies to each of its consumers."""

    def __init__(self, session: MemorySession, prefetch: int) -> None:
        self._session = session
        self._broker = session._broker
        self.prefetch = prefetch
        self._closed = False
        self._consumers: dict[str, _Consumer] = {}
        #: delivery tag -> delivery, in the order handed out
        self._unacked: dict[int, MemoryDelivery] = {}
        self._tags = itertools.count(1)

    @property
    def is_closed(self) -> bool:
        return self._closed

    async def consume(
        self, queue: str, on_delivery: OnDelivery, *, arguments: Mapping[str, Any] | None = None
    ) -> str:
        """Start consuming ``queue``; a missing queue closes the channel (NOT_FOUND). A
        stream is read from ``x-stream-offset`` in ``arguments`` (default: next), and
        needs a prefetch, as RabbitMQ's do."""
        if self._closed:
            raise ConnectionLostError(f"consuming {queue}: the channel is closed")
        q = self._broker._queues.get(queue)
        if q is None:
            reason = f"NOT_FOUND - no queue '{queue}' in vhost '/'"
            self._close(reason, report=True)
            raise ConnectionLostError(f"consuming {queue}: channel closed: {reason}")
        if q.stream and self.prefetch == 0:
            reason = "PRECONDITION_FAILED - consumer prefetch count is not set for stream queue"
            self._close(reason, report=True)
            raise ConnectionLostError(f"consuming {queue}: channel closed: {reason}")
        tag = f"amq.ctag-{self._session.name}-{next(self._broker._ctags)}"
        consumer = _Consumer(tag, self, q, on_delivery)
        if q.stream:
            consumer.position = self._broker.stream_start(
                q, (arguments or {}).get("x-stream-offset")
            )
        self._consumers[tag] = consumer
        q.consumers.append(consumer)
        self._broker._kick(q)
        return tag

    async def cancel(self, tag: str) -> None:
        """Stop a consumer; what it holds stays held until settled or the channel closes."""
        consumer = self._consumers.pop(tag, None)
        if consumer is not None and consumer in consumer.queue.consumers:
            consumer.queue.consumers.remove(consumer)

    async def close(self) -> None:
        """Close the channel: what it holds returns to its queues."""
        self._close("closed by the client", report=False)

    async def get(self, queue: str) -> MemoryDelivery | None:
        """basic.get without no_ack: the next ready message, held until settled."""
        if self._closed:
            raise ConnectionLostError(f"getting from {queue}: the channel is closed")
        q = self._broker._queues.get(queue)
        if q is None:
            reason = f"NOT_FOUND - no queue '{queue}' in vhost '/'"
            self._close(reason, report=True)
            raise ConnectionLostError(f"getting from {queue}: channel closed: {reason}")
        if q.stream:
            reason = "NOT_IMPLEMENTED - basic.get not supported by stream queues"
            self._close(reason, report=True)
            raise ConnectionLostError(f"getting from {queue}: channel closed: {reason}")
        self._broker._expire(q)
        if q.head() is None:
            return None
        getter = _Consumer("basic.get", self, q, _no_callback)
        entry = q.take()
        delivery = MemoryDelivery(
            self, getter, q, entry, next(self._tags), self._session._loop.time()
        )
        entry.delivered = True
        self._unacked[delivery.delivery_tag] = delivery
        getter.held += 1
        q.held += 1
        self._broker._schedule_expiry(q)
        return delivery

    def _deliver(self, consumer: _Consumer, entry: _Entry) -> None:
        loop = self._session._loop
        q = consumer.queue
        delivery = MemoryDelivery(self, consumer, q, entry, next(self._tags), loop.time())
        entry.delivered = True
        self._unacked[delivery.delivery_tag] = delivery
        consumer.held += 1
        q.held += 1
        task = loop.create_task(self._run(consumer.on_delivery, delivery))
        self._broker._tasks.add(task)
        task.add_done_callback(self._broker._task_done)

    async def _run(self, on_delivery: OnDelivery, delivery: MemoryDelivery) -> None:
        # a delivery whose channel closed before its task began went back to its queue
        if not self._closed:
            await on_delivery(delivery)

    def _settle(self, delivery: MemoryDelivery, how: Literal["ack", "requeue", "reject"]) -> None:
        what = "ack" if how == "ack" else "nack"
        if self._closed:
            raise ConnectionLostError(
                f"{what} of {delivery.message_id} lost: the channel is closed"
            )
        if self._unacked.get(delivery.delivery_tag) is not delivery:
            # RabbitMQ closes the channel on an unknown delivery tag
            reason = f"PRECONDITION_FAILED - unknown delivery tag {delivery.delivery_tag}"
            self._close(reason, report=True)
            raise ConnectionLostError(f"{what} of {delivery.message_id} lost: {reason}")
        del self._unacked[delivery.delivery_tag]
        delivery._consumer.held -= 1
        q = delivery._queue
        if q.deleted:
            return
        q.held -= 1
        broker = self._broker
        if q.stream:
            pass  # a stream keeps every message: settling only makes room under prefetch
        elif how == "requeue":
            broker._return(q, delivery._entry)
        elif how == "reject":
            broker._dead_letter(q, delivery._entry, "rejected")
        broker._kick(q)

    def _close(self, reason: str, *, report: bool) -> None:
        """Close: consumers go, held deliveries return (in the order handed out)."""
        if self._closed:
            return
        self._closed = True
        for consumer in self._consumers.values():
            if consumer in consumer.queue.consumers:
                consumer.queue.consumers.remove(consumer)
        self._consumers.clear()
        held = list(self._unacked.values())
        self._unacked.clear()
        for delivery in held:
            delivery._consumer.held -= 1
            q = delivery._queue
            if not q.deleted:
                q.held -= 1
                self._broker._return(q, delivery._entry)
        if self in self._session._channels:
            self._session._channels.remove(self)
        if report:
            self._session._lost(f"channel closed: {reason}", None)


class MemoryTxChannel(MemoryChannel):
    """A channel in transaction mode: publishes and settlements wait for ``commit()``
    and are dropped if the channel closes first, as RabbitMQ's tx.select."""

    def __init__(self, session: MemorySession, prefetch: int) -> None:
        super().__init__(session, prefetch)
        self._staged_settles: list[tuple[MemoryDelivery, Literal["ack", "requeue", "reject"]]] = []
        self._staged_publishes: list[tuple[str, str, Message]] = []

    def _settle(self, delivery: MemoryDelivery, how: Literal["ack", "requeue", "reject"]) -> None:
        if self._closed:
            raise ConnectionLostError(f"settling {delivery.message_id}: the channel is closed")
        self._staged_settles.append((delivery, how))

    async def publish(self, exchange: str, routing_key: str, message: Message) -> None:
        if self._closed:
            raise ConnectionLostError("publishing: the channel is closed")
        self._staged_publishes.append((exchange, routing_key, message))

    async def commit(self) -> None:
        if self._closed:
            raise ConnectionLostError("committing a transaction: the channel is closed")
        settles, self._staged_settles = self._staged_settles, []
        publishes, self._staged_publishes = self._staged_publishes, []
        for exchange, routing_key, message in publishes:
            try:
                self._broker.publish(exchange, routing_key, message)
            except UnroutableError as exc:  # RabbitMQ returns it and commits the rest
                log.error("the broker returned a message of a transaction: %s", exc)
        for delivery, how in settles:
            super()._settle(delivery, how)

    def _close(self, reason: str, *, report: bool) -> None:
        self._staged_settles.clear()
        self._staged_publishes.clear()
        super()._close(reason, report=report)


class MemorySession:
    """A consuming connection to the memory broker."""

    def __init__(self, broker: MemoryBroker, name: str, loop: asyncio.AbstractEventLoop) -> None:
        self._broker = broker
        self.name = name
        self._loop = loop
        self._callbacks: list[OnLost] = []
        self._channels: list[MemoryChannel] = []
        self._closed = False

    @property
    def is_closed(self) -> bool:
        return self._closed

    def on_lost(self, callback: OnLost) -> None:
        self._callbacks.append(callback)

    def _lost(self, reason: str, consumer_timeout: float | None) -> None:
        for callback in list(self._callbacks):
            callback(reason, consumer_timeout)

    async def channel(self, prefetch: int) -> MemoryChannel:
        if self._closed:
            raise ConnectionLostError("opening a channel: the connection is closed")
        if isinstance(prefetch, bool) or not isinstance(prefetch, int):
            raise ContractError(f"prefetch must be an int, got {prefetch!r}")
        if not 0 <= prefetch <= MAX_PREFETCH:
            raise ContractError(f"prefetch must be 0..{MAX_PREFETCH}, got {prefetch}")
        channel = MemoryChannel(self, prefetch)
        self._channels.append(channel)
        return channel

    async def claim(self, name: str) -> bool:
        if self._closed:
            raise ConnectionLostError(f"claiming {name}: the connection is closed")
        return self._broker.claim(name, self)

    async def release(self, name: str) -> None:
        if self._closed:
            raise ConnectionLostError(f"releasing {name}: the connection is closed")
        self._broker.release(name, self)

    async def delete_queue(self, name: str) -> None:
        if self._closed:
            raise ConnectionLostError(f"deleting {name}: the connection is closed")
        self._broker.release(name, self)

    async def declare_reply_queue(self, name: str, *, expires_ms: int) -> None:
        if self._closed:
            raise ConnectionLostError(f"declaring {name}: the connection is closed")
        # x-expires is kept and compared on a redeclare, not enforced: a process's memory
        # broker ends with its clients
        self._broker.declare_queue(name, {"x-expires": expires_ms})

    async def declare_queue(self, name: str, arguments: Mapping[str, Any]) -> None:
        if self._closed:
            raise ConnectionLostError(f"declaring {name}: the connection is closed")
        self._broker.declare_queue(name, dict(arguments))

    async def transactional(self, prefetch: int) -> TxChannel:
        channel = await self.channel(prefetch)  # checks the session and the prefetch
        self._channels.remove(channel)
        tx = MemoryTxChannel(self, prefetch)
        self._channels.append(tx)
        return tx

    async def close(self) -> None:
        """Close the connection: every delivery it holds returns to its queue; nothing
        is reported, and no callback of it runs again."""
        self._callbacks.clear()
        self._abandon()

    def _abandon(self) -> None:
        if self._closed:
            return
        self._closed = True
        for channel in list(self._channels):
            channel._close("connection closed", report=False)
        for name in [n for n, owner in self._broker._owners.items() if owner is self]:
            self._broker.release(name, self)
        if self in self._broker._sessions:
            self._broker._sessions.remove(self)

    def _drop(self, reason: str) -> None:
        if self._closed:
            return
        callbacks = list(self._callbacks)
        self._abandon()
        for callback in callbacks:
            callback(f"connection closed: {reason}", None)


# -- publishing ----------------------------------------------------------------------
