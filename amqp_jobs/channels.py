"""Channels on connections that may have died under us.

aio-pika marks its connection closed a moment after the socket dies, and opening a
channel in that moment raises a bare RuntimeError; here it becomes a transient
AMQPConnectionError that the retry logic above understands.
"""

from __future__ import annotations

import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection


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
