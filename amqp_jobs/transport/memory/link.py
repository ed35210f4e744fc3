"""Publishing to the in-memory broker: the link of one namespace."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from amqp_jobs.contract import TopologySettings, check_namespace
from amqp_jobs.errors import (
    ConnectionLostError,
    PublishError,
    PublishRefusedError,
    UnroutableError,
    describe,
)
from amqp_jobs.message import Envelope, Message
from amqp_jobs.topology import (
    base_plan,
    cascade_plan,
    dead_exchange,
    delayed_route,
    events_exchange,
    events_plan,
    fresh_route,
    quarantine_queue,
    queue_plan,
)
from amqp_jobs.transport.memory.broker import MAX_REFUSED_PAUSE, REFUSED_PAUSE

if TYPE_CHECKING:
    from amqp_jobs.transport.memory import MemoryTransport

log = logging.getLogger("amqp_jobs.transport.memory")


_MISSING_EXCHANGE = re.compile(r"^exchange '.*' does not exist")


def _stale_topology(exc: PublishError) -> bool:
    return isinstance(exc, UnroutableError) or bool(_MISSING_EXCHANGE.match(str(exc)))


class MemoryLink:
    """A publishing link of one namespace, as the AMQP Link: declares what a publish
    needs (once per connection), routes job messages the same way, and reconnects."""

    def __init__(
        self,
        transport: MemoryTransport,
        namespace: str,
        settings: TopologySettings,
        *,
        name: str,
        declare: bool = True,
        connect_timeout: float | None = 30.0,
        confirm_timeout: float | None = 30.0,
    ) -> None:
        self.broker = transport.broker
        self.clock = transport.clock
        self.urls = transport.urls
        self.namespace = check_namespace(namespace)
        self.settings = settings
        self.name = name
        self.declare = declare
        self.connect_timeout = connect_timeout
        self.confirm_timeout = confirm_timeout
        #: the broker's connection generation this link is open on (None: closed)
        self._generation: int | None = None
        #: what is known declared on this connection: "base", "cascade", ("queue", q),
        #: (q, job name)
        self._ready: set[str | tuple[str, str]] = set()
        self._queues: set[str] = set()

    def __repr__(self) -> str:
        return f"MemoryLink({self.name!r}, {self.namespace!r}, {self.urls})"

    @property
    def known_queues(self) -> set[str]:
        """Every work queue declared through this link (for cleanup)."""
        return self._queues

    @property
    def is_open(self) -> bool:
        return self._generation is not None and self._generation == self.broker._generation

    async def open(self) -> None:
        if not self.is_open:
            self._generation = self.broker._generation
            self._ready = set()  # a new connection knows nothing declared

    async def close(self) -> None:
        self._generation = None

    def forget_declarations(self) -> None:
        self._ready = set()

    def _connected(self, what: str) -> None:
        if not self.is_open:
            raise ConnectionLostError(f"{what}: the connection to {self.urls} is closed")

    # -- declaring -------------------------------------------------------------------

    def _declare_queue(self, queue: str, job_names: Iterable[str]) -> None:
        ns, s, ready = self.namespace, self.settings, self._ready
        if ("queue", queue) in ready and all((queue, n) in ready for n in job_names):
            return  # the common case: declared before, through this link
        plan = queue_plan(ns, queue, (), s)  # checks the name
        if "base" not in ready:
            self.broker.declare(base_plan(ns, s))
            ready.add("base")
        missing = {n for n in job_names if (queue, n) not in ready}
        self._queues.add(queue)
        if not missing and ("queue", queue) in ready:
            return
        self.broker.declare(queue_plan(ns, queue, missing, s) if missing else plan)
        ready.update((queue, n) for n in missing)
        ready.add(("queue", queue))

    def _declare_cascade(self) -> None:
        ns, s, ready = self.namespace, self.settings, self._ready
        if "base" not in ready:
            self.broker.declare(base_plan(ns, s))
            ready.add("base")
        if "cascade" not in ready:
            self.broker.declare(cascade_plan(ns, s))
            ready.add("cascade")

    async def declare_queue(self, queue: str, job_names: Iterable[str]) -> None:
        await self.open()
        self._declare_queue(queue, set(job_names))

    async def declare_cascade(self) -> None:
        await self.open()
        self._declare_cascade()

    # -- sending ---------------------------------------------------------------------

    async def send(self, envelope: Envelope, queue: str, *, via_jobs_exchange: bool = True) -> None:
        """Publish one job message to where its ETA says (as the AMQP Link.send): due now
        and ``via_jobs_exchange``, the jobs exchange keyed by job name; else the delay
        cascade towards ``queue``'s due queue."""
        self._connected("publishing")
        now_ms = self.clock.now_ms
        due_now = envelope.eta_ms is None or envelope.eta_ms <= now_ms()
        if self.declare:
            self._declare_queue(queue, (envelope.job_name,))
            if not due_now:
                self._declare_cascade()
        delay_ms = 0 if envelope.eta_ms is None else envelope.eta_ms - now_ms()
        if delay_ms <= 0 and via_jobs_exchange:
            exchange, key = fresh_route(self.namespace, envelope)
        else:
            exchange, key = delayed_route(self.namespace, queue, delay_ms, self.settings)
        self.broker.publish(exchange, key, envelope.to_message(), fresh=via_jobs_exchange)

    async def send_batch(
        self, envelopes: Sequence[Envelope], queue: str, *, give_up_after: float
    ) -> list[BaseException | None]:
        """One after the other: the broker confirms each as it takes it."""
        out: list[BaseException | None] = []
        for envelope in envelopes:
            try:
                await self.retrying(self.send, envelope, queue, give_up_after=give_up_after)
                out.append(None)
            except Exception as exc:
                out.append(exc)
        return out

    async def send_dead(self, message: Message, queue: str) -> None:
        """Park a message in ``queue``'s dead-letter queue."""
        self._connected("publishing")
        if self.declare:
            self._declare_queue(queue, ())
        self.broker.publish(dead_exchange(self.namespace), queue, message)

    async def send_quarantine(self, message: Message, queue: str) -> None:
        """Move a message to ``queue``'s quarantine queue (default exchange)."""
        self._connected("publishing")
        if self.declare:
            self._declare_queue(queue, ())
        await self.send_to_queue(quarantine_queue(self.namespace, queue), message)

    async def declare_events(self) -> None:
        await self.open()
        if "events" not in self._ready:
            self.broker.declare(events_plan(self.namespace, self.settings))
            self._ready.add("events")

    async def send_event(self, routing_key: str, message: Message) -> None:
        """A lifecycle event to the events exchange (and so its stream)."""
        self._connected("publishing")
        if self.declare:
            await self.declare_events()
        self.broker.publish(events_exchange(self.namespace), routing_key, message)

    async def send_to_queue(self, queue_name: str, message: Message) -> None:
        await self.publish("", queue_name, message)

    async def publish(self, exchange: str, routing_key: str, message: Message) -> None:
        self._connected("publishing")
        self.broker.publish(exchange, routing_key, message)

    async def depth(self, queue_name: str) -> int | None:
        await self.open()
        return self.broker.depth(queue_name)

    async def counts(self, queue_name: str) -> tuple[int, int] | None:
        await self.open()
        depth = self.broker.depth(queue_name)
        return None if depth is None else (depth, self.broker.consumer_count(queue_name))

    async def take(self, queue_name: str) -> Message | None:
        """Take one ready message (basic.get, no ack); a missing queue is NOT_FOUND,
        which the AMQP link reports as a lost channel too."""
        await self.open()
        if not self.broker.has_queue(queue_name):
            raise ConnectionLostError(
                f"taking from {queue_name}: NOT_FOUND - no queue '{queue_name}' in vhost '/'"
            )
        return self.broker.get(queue_name)

    async def retrying(
        self, op: Callable[..., Awaitable[None]], *args: Any, give_up_after: float
    ) -> None:
        """Run a publishing operation, connecting first if needed. The memory broker is
        never unavailable, so only what the AMQP link also retries is tried again: once,
        a connection dropped under it and (declaring) a stale declaration cache; with
        backoff until ``give_up_after``, a refused publish (a full queue may drain)."""
        reconnected = redeclared = False
        loop = asyncio.get_running_loop()
        until = loop.time() + give_up_after
        pause = REFUSED_PAUSE
        while True:
            await self.open()
            try:
                await op(*args)
                return
            except PublishRefusedError as exc:
                if loop.time() + pause >= until:
                    raise
                log.warning(
                    "%s: publishing to %s failed: %s; retrying in %.2fs",
                    self.name,
                    self.urls,
                    describe(exc),
                    pause,
                )
                await asyncio.sleep(pause)
                pause = min(pause * 2, MAX_REFUSED_PAUSE)
            except ConnectionLostError:
                if reconnected:
                    raise
                reconnected = True
            except PublishError as exc:
                if redeclared or not self.declare or not _stale_topology(exc):
                    raise
                redeclared = True
                log.warning("%s: %s; declaring the topology again", self.name, exc)
                self.forget_declarations()
