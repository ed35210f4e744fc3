"""The RabbitMQ transport: the only place aio-pika and aiormq are imported."""

from __future__ import annotations

import ssl
from collections.abc import Iterable

from amqp_jobs.clock import WALL
from amqp_jobs.contract import TopologySettings
from amqp_jobs.transport.amqp.connection import connect
from amqp_jobs.transport.amqp.declare import delete_namespace
from amqp_jobs.transport.amqp.link import Link
from amqp_jobs.transport.amqp.session import AmqpSession
from amqp_jobs.urls import BrokerURLs

__all__ = ["AmqpTransport"]


class AmqpTransport:
    """RabbitMQ 3.10+ at one or several URLs (a cluster), over AMQP 0-9-1."""

    def __init__(self, urls: BrokerURLs, *, ssl_context: ssl.SSLContext | None = None) -> None:
        self.urls = urls
        self.ssl_context = ssl_context
        self.clock = WALL

    def __repr__(self) -> str:
        return f"AmqpTransport({self.urls})"

    def link(
        self,
        namespace: str,
        settings: TopologySettings,
        *,
        name: str,
        declare: bool = True,
        connect_timeout: float | None = 30.0,
        confirm_timeout: float | None = 30.0,
    ) -> Link:
        return Link(
            self.urls,
            namespace,
            settings,
            name=name,
            declare=declare,
            ssl_context=self.ssl_context,
            connect_timeout=connect_timeout,
            confirm_timeout=confirm_timeout,
        )

    async def session(self, *, name: str, give_up_after: float | None) -> AmqpSession:
        return await AmqpSession.open(
            self.urls, name=name, give_up_after=give_up_after, ssl_context=self.ssl_context
        )

    async def delete_namespace(
        self, namespace: str, queues: Iterable[str], settings: TopologySettings
    ) -> None:
        """Delete every queue and exchange of the namespace's plan (missing ones are fine)."""
        connection = await connect(
            self.urls, name=f"delete {namespace}", give_up_after=10, ssl_context=self.ssl_context
        )
        try:
            await delete_namespace(connection, namespace, queues, settings)
        finally:
            await connection.close()
