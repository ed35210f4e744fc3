"""An in-process broker with RabbitMQ 3.10's semantics, behind the transport seam.

Tests and apps that want jobs without a broker run the same worker, settle and client
code against it, so it must not be kinder than RabbitMQ: publishes are mandatory, a
message no queue takes raises, declarations with other arguments are refused, quorum
queues count deliveries and dead-letter past their limit, TTL expires only ready
messages at the head, dead-lettering writes ``x-death`` as RabbitMQ does, prefetch is
per consumer, deliveries run as their own tasks, and a closed channel or session gives
back what it held. Nothing touches the network.

One broker per name per process (``memory://NAME``); ``MemoryBroker.reset(name,
virtual_time=True)`` gives a fresh one on a ``VirtualClock``, on which an hour of delay
cascade drains in milliseconds.

Not emulated: RabbitMQ's ``consumer_timeout`` (a delivery held too long is never taken
back), and use from several threads (one event loop at a time: tests, or one app loop).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from amqp_jobs.clock import Clock
from amqp_jobs.contract import TopologySettings
from amqp_jobs.topology import namespace_plan
from amqp_jobs.transport.memory.broker import MemoryBroker, Published, topic_matches
from amqp_jobs.transport.memory.link import MemoryLink
from amqp_jobs.transport.memory.session import (
    MemoryChannel,
    MemoryDelivery,
    MemorySession,
    open_session,
)
from amqp_jobs.urls import BrokerURLs

if TYPE_CHECKING:
    from amqp_jobs.transport.base import Channel, Link, Session, Transport
    from amqp_jobs.transport.base import Delivery as DeliveryProtocol

__all__ = [
    "MemoryBroker",
    "MemoryChannel",
    "MemoryDelivery",
    "MemoryLink",
    "MemorySession",
    "MemoryTransport",
    "Published",
    "topic_matches",
]


class MemoryTransport:
    """The memory broker behind the transport seam (``memory://NAME``)."""

    def __init__(self, broker: MemoryBroker | None = None) -> None:
        self.broker = broker if broker is not None else MemoryBroker()
        self.urls = BrokerURLs((f"memory://{self.broker.name}",))
        self.clock: Clock = self.broker.clock

    def __repr__(self) -> str:
        return f"MemoryTransport({self.urls})"

    @classmethod
    def named(cls, name: str) -> MemoryTransport:
        """The transport of this process's broker of that name."""
        return cls(MemoryBroker.named(name))

    def link(
        self,
        namespace: str,
        settings: TopologySettings,
        *,
        name: str,
        declare: bool = True,
        connect_timeout: float | None = 30.0,
        confirm_timeout: float | None = 30.0,
    ) -> MemoryLink:
        return MemoryLink(
            self,
            namespace,
            settings,
            name=name,
            declare=declare,
            connect_timeout=connect_timeout,
            confirm_timeout=confirm_timeout,
        )

    async def session(self, *, name: str, give_up_after: float | None) -> MemorySession:
        return open_session(self.broker, name)

    async def delete_namespace(
        self, namespace: str, queues: Iterable[str], settings: TopologySettings
    ) -> None:
        """Delete every queue and exchange of the namespace's plan (missing ones are fine)."""
        plan = namespace_plan(namespace, queues, settings)
        for q in plan.queues:
            self.broker.delete_queue(q.name)
        for ex in plan.exchanges:
            self.broker.delete_exchange(ex.name)


if TYPE_CHECKING:
    # the memory transport implements the seam's protocols (checked by mypy)
    def _as_transport(t: MemoryTransport) -> Transport:
        return t

    def _as_link(link: MemoryLink) -> Link:
        return link

    def _as_session(s: MemorySession) -> Session:
        return s

    def _as_channel(c: MemoryChannel) -> Channel:
        return c

    def _as_delivery(d: MemoryDelivery) -> DeliveryProtocol:
        return d
