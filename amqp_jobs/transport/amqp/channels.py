"""Channels on connections that may have died under us.

aio-pika marks its connection closed a moment after the socket dies, and opening a
channel in that moment raises a bare RuntimeError; here it becomes a transient
AMQPConnectionError that the retry logic above understands.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection

from amqp_jobs.errors import AmqpJobsError, ConnectionLostError, describe

if TYPE_CHECKING:
    from amqp_jobs.transport.amqp.acks import Acks
    from amqp_jobs.transport.base import Channel

#: What aiormq raises for a channel or connection that died under a call.
LOST = (aiormq.exceptions.AMQPError, RuntimeError, ConnectionError, OSError)
#: ... and what it raises when the broker refuses the call itself.
REFUSED = (
    aiormq.exceptions.ChannelAccessRefused,
    aiormq.exceptions.ChannelPreconditionFailed,
)


def ours(what: str, exc: BaseException) -> AmqpJobsError:
    """An error of the AMQP client as ours: a refusal, or a lost connection or channel."""
    if isinstance(exc, REFUSED):
        return AmqpJobsError(f"the broker refused {what}: {describe(exc)}")
    return ConnectionLostError(f"{what}: {describe(exc)}")


def is_alive(connection: AbstractConnection | None) -> bool:
    """Whether the connection can still open channels.

    aio-pika marks its connection closed a moment after the socket dies; the transport
    below knows at once, so look at both.
    """
    if connection is None or connection.is_closed:
        return False
    underlay = getattr(connection, "transport", None)
    amqp = getattr(underlay, "connection", None)
    return amqp is not None and not amqp.is_closed


async def open_channel(
    connection: AbstractConnection, *, publisher_confirms: bool, on_return_raises: bool = False
) -> AbstractChannel:
    """A new channel; a connection that died under us raises a transient error."""
    if not is_alive(connection):
        raise aiormq.exceptions.AMQPConnectionError("the connection to the broker is closed")
    try:
        return await connection.channel(
            publisher_confirms=publisher_confirms, on_return_raises=on_return_raises
        )
    except RuntimeError as exc:  # aiormq: "<Connection ...> closed"
        raise aiormq.exceptions.AMQPConnectionError(
            "the connection to the broker is closed"
        ) from exc


class Delivery:
    """One delivery, read straight off the channel below aio-pika.

    aio-pika wraps every delivery in an IncomingMessage, which costs about a tenth of a
    no-op job; the worker needs only these fields, an ack and a nack.
    """

    __slots__ = (
        "_acks",
        "body",
        "channel",
        "content_type",
        "delivery_tag",
        "headers",
        "message_id",
        "queue_name",
        "received",
        "redelivered",
        "timestamp",
        "type",
    )

    def __init__(
        self,
        message: aiormq.abc.DeliveredMessage,
        queue_name: str,
        received: float,
        channel: Channel,
        acks: Acks,
    ) -> None:
        #: the queue it was consumed from, and the loop time it arrived
        self.queue_name = queue_name
        self.received = received
        properties = message.header.properties
        self.channel = channel
        self._acks = acks
        self.body: bytes = message.body
        self.content_type: str | None = properties.content_type
        self.type: str | None = properties.message_type
        self.message_id: str | None = properties.message_id
        self.timestamp: datetime | None = properties.timestamp
        self.headers: dict[str, Any] = dict(properties.headers or {})
        delivery = message.delivery
        assert isinstance(delivery, aiormq.spec.Basic.Deliver | aiormq.spec.Basic.GetOk)
        self.delivery_tag: int = delivery.delivery_tag or 0
        self.redelivered: bool = bool(delivery.redelivered)
        acks.delivered(self.delivery_tag)

    @property
    def delivery_count(self) -> int:
        """Times a quorum queue handed this message out before, unsettled (0 if unknown)."""
        count = self.headers.get("x-delivery-count")
        return count if isinstance(count, int) and not isinstance(count, bool) else 0

    async def ack(self) -> None:
        # Batched with the channel's other settlements of this loop turn (see acks.py),
        # not waited for until written: written is not received, and a lost ack means a
        # redelivery either way.
        if self.channel.is_closed:
            raise ConnectionLostError(f"ack of {self.message_id} lost: the channel is closed")
        if not self._acks.ack(self.delivery_tag):
            raise ConnectionLostError(
                f"ack of {self.message_id} refused: unknown delivery tag {self.delivery_tag}"
            )

    async def nack(self, *, requeue: bool = True) -> None:
        if self.channel.is_closed:
            raise ConnectionLostError(f"nack of {self.message_id} lost: the channel is closed")
        if not self._acks.nack(self.delivery_tag, requeue=requeue):
            raise ConnectionLostError(
                f"nack of {self.message_id} refused: unknown delivery tag {self.delivery_tag}"
            )
