"""Brokers behind one seam: ``transport_for(url)`` picks RabbitMQ or the in-memory broker.

``amqp://``/``amqps://`` URLs (one or several: a cluster) get ``AmqpTransport``;
``memory://NAME`` gets that process-wide in-memory broker's ``MemoryTransport``.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence

from amqp_jobs.transport.base import Channel, Delivery, Link, Session, Transport, TxChannel
from amqp_jobs.urls import BrokerURLs, resolve

__all__ = [
    "Channel",
    "Delivery",
    "Link",
    "Session",
    "Transport",
    "TxChannel",
    "transport_for",
]


def transport_for(
    url: str | Sequence[str] | BrokerURLs | Transport | None,
    *,
    ssl_context: ssl.SSLContext | None = None,
) -> Transport:
    """The transport for a broker URL (given, else ``$AMQP_URL``, else the local one)."""
    if url is None or isinstance(url, str | Sequence | BrokerURLs):
        urls = resolve(url)
    else:
        return url  # already a transport
    if urls.memory_name is not None:
        from amqp_jobs.transport.memory import MemoryTransport

        memory: Transport = MemoryTransport.named(urls.memory_name)
        return memory
    from amqp_jobs.transport.amqp import AmqpTransport

    return AmqpTransport(urls, ssl_context=ssl_context)
