"""What the core needs from a broker, as protocols: the transport seam.

The worker, ``settle`` and the clients speak only these. ``transport.amqp`` implements
them on RabbitMQ (aio-pika and aiormq stay inside it, their errors mapped into ours at
that boundary); ``transport.memory`` implements them in process, with RabbitMQ's
semantics, for tests and for apps that want jobs without a broker.

Failures cross the seam as our errors only: ``BrokerUnavailableError`` when the broker
cannot be reached, ``ConnectionLostError`` when a connection or channel dies under an
operation (trying again on a new one may succeed), ``PublishError`` and its kinds for
a message the broker did not take, ``TopologyMismatchError`` for a declaration refused.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol

from amqp_jobs.clock import Clock
from amqp_jobs.contract import TopologySettings
from amqp_jobs.message import Envelope, Message
from amqp_jobs.urls import BrokerURLs


class Channel(Protocol):
    """A consuming channel: its prefetch bounds the deliveries held unsettled on it."""

    @property
    def is_closed(self) -> bool: ...

    async def consume(
        self,
        queue: str,
        on_delivery: Callable[[Delivery], Coroutine[Any, Any, None]],
        *,
        arguments: Mapping[str, Any] | None = None,
    ) -> str:
        """Start consuming ``queue``; returns the consumer tag. ``arguments``: the
        consumer's (``x-stream-offset`` reads a stream from an offset, a time, ``first``
        or ``next``; each delivery's ``x-stream-offset`` header says where it was)."""

    async def cancel(self, tag: str) -> None:
        """Stop a consumer; what it holds stays held until settled or the channel closes."""

    async def get(self, queue: str) -> Delivery | None:
        """Take the next ready message unsettled (basic.get), or None; closing the
        channel returns what was taken and not acked, in order (browsing a queue)."""

    async def close(self) -> None:
        """Close: every delivery it holds returns to its queue."""


class Delivery(Protocol):
    """One message handed out by a queue, to be acked or returned."""

    body: bytes
    content_type: str | None
    type: str | None
    message_id: str | None
    timestamp: datetime | None
    headers: dict[str, Any]
    #: the queue it came from, and the loop time it arrived
    queue_name: str
    received: float

    @property
    def channel(self) -> Channel: ...

    @property
    def delivery_count(self) -> int:
        """Times the queue handed this message out before without a settlement."""

    async def ack(self) -> None: ...

    async def nack(self, *, requeue: bool = True) -> None: ...


#: Told why a session was lost: a reason, and the broker's consumer_timeout (seconds)
#: when it took a delivery back for being held too long.
OnLost = Callable[[str, float | None], None]


class TxChannel(Channel, Protocol):
    """A consuming channel in transaction mode: what it publishes and settles takes
    effect at ``commit()``, all at once, or not at all if the channel or its connection
    closes first. (The scheduler enqueues a tick and replaces its token in one commit.)"""

    async def publish(self, exchange: str, routing_key: str, message: Message) -> None:
        """Stage a message (mandatory: one no queue takes is reported in the log)."""

    async def commit(self) -> None: ...


class Session(Protocol):
    """A consuming connection. Losing it (or a consumer the broker cancels) is reported
    once through ``on_lost``; every delivery it held returns to its queue."""

    def on_lost(self, callback: OnLost) -> None: ...

    async def channel(self, prefetch: int) -> Channel: ...

    async def claim(self, name: str) -> bool:
        """Take the lock ``name``, held while this session lives or until ``release``:
        True if this session holds it now, False if another does. The broker frees it
        the instant the holder's connection closes: a lock with no TTL to tune and
        nothing to reap."""

    async def release(self, name: str) -> None:
        """Give back a lock taken with ``claim``. Not held: nothing happens."""

    async def delete_queue(self, name: str) -> None:
        """Delete a queue (a reply queue the client is done with). Missing: nothing
        happens."""

    async def declare_reply_queue(self, name: str, *, expires_ms: int) -> None:
        """A client's reply queue: classic and durable (a broker restart keeps its
        replies), deleted by the broker once unused for ``expires_ms``."""

    async def declare_queue(self, name: str, arguments: Mapping[str, Any]) -> None:
        """A durable queue with these arguments (the scheduler's: a quorum queue with a
        single active consumer, which holds its token message until its connection
        closes and the next consumer gets it; and one that keeps its newest message)."""

    async def transactional(self, prefetch: int) -> TxChannel: ...

    async def close(self) -> None: ...


class Link(Protocol):
    """A publishing connection of one namespace: declares what a publish needs, publishes
    mandatory and confirmed, reconnects when lost."""

    urls: BrokerURLs
    namespace: str
    settings: TopologySettings

    @property
    def known_queues(self) -> set[str]:
        """Every work queue declared through this link (for cleanup)."""

    @property
    def is_open(self) -> bool: ...

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    def forget_declarations(self) -> None:
        """Declare afresh from now on (a queue may have been deleted under us)."""

    async def declare_queue(self, queue: str, job_names: Iterable[str]) -> None: ...

    async def declare_cascade(self) -> None:
        """The delay levels (declared lazily by ``send`` otherwise)."""

    async def declare_events(self) -> None:
        """The events exchange and its stream (declared lazily by ``send_event``
        otherwise)."""

    async def send(self, envelope: Envelope, queue: str, *, via_jobs_exchange: bool = True) -> None:
        """A job message to the jobs exchange (due now, ``via_jobs_exchange``) or into
        the delay cascade towards ``queue``'s due queue."""

    async def send_batch(
        self, envelopes: Sequence[Envelope], queue: str, *, give_up_after: float
    ) -> list[BaseException | None]:
        """Fresh jobs (as ``send`` via the jobs exchange), each retried as ``retrying``
        does, confirms pipelined where the broker allows; each one's error (or None), in
        order."""

    async def send_dead(self, message: Message, queue: str) -> None: ...

    async def send_quarantine(self, message: Message, queue: str) -> None: ...

    async def send_event(self, routing_key: str, message: Message) -> None:
        """A lifecycle event to the namespace's events exchange (declared with its stream
        the first time), confirmed."""

    async def send_to_queue(self, queue_name: str, message: Message) -> None:
        """Straight into one queue (the default exchange), confirmed."""

    async def publish(self, exchange: str, routing_key: str, message: Message) -> None:
        """A message as it is, mandatory and confirmed (operations, tests)."""

    async def retrying(
        self, op: Callable[..., Awaitable[None]], *args: Any, give_up_after: float
    ) -> None:
        """Run ``op(*args)``, a publishing operation, within one bound, reconnecting and
        retrying what may pass; raises our errors only. (Arguments rather than a closure:
        on the hot path every object alive per job in flight costs garbage collection.)"""

    async def depth(self, queue_name: str) -> int | None:
        """Messages ready in a queue, or None if it does not exist."""

    async def counts(self, queue_name: str) -> tuple[int, int] | None:
        """(messages ready, consumers) of a queue, or None if it does not exist."""

    async def take(self, queue_name: str) -> Message | None:
        """Take one ready message off a queue, removed (operations, tests); None if empty."""


class Transport(Protocol):
    """One broker (or cluster): makes links and sessions, and owns the clock."""

    urls: BrokerURLs
    clock: Clock

    def link(
        self,
        namespace: str,
        settings: TopologySettings,
        *,
        name: str,
        declare: bool = True,
        connect_timeout: float | None = 30.0,
        confirm_timeout: float | None = 30.0,
    ) -> Link: ...

    async def session(self, *, name: str, give_up_after: float | None) -> Session: ...

    async def delete_namespace(
        self, namespace: str, queues: Iterable[str], settings: TopologySettings
    ) -> None:
        """Delete every queue and exchange of the namespace's plan (missing ones are fine)."""
