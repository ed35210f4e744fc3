"""Declaring a namespace's topology plan on RabbitMQ, and deleting it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import TypeVar

import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection

from amqp_jobs.contract import check_namespace
from amqp_jobs.errors import TopologyMismatchError, describe
from amqp_jobs.topology import (
    LEADER_LOCATOR,
    Binding,
    Exchange,
    Plan,
    Queue,
    TopologySettings,
    base_plan,
    cascade_plan,
    namespace_plan,
    queue_plan,
)
from amqp_jobs.transport.amqp.channels import open_channel

log = logging.getLogger("amqp_jobs.topology")

T = TypeVar("T")

_INEQUIVALENT = re.compile(
    r"inequivalent arg '(?P<arg>[^']+)' for (?P<kind>queue|exchange) '(?P<name>[^']+)'"
    r".*?received (?P<received>.+?) but current is (?P<current>.+?)$"
)


def explain_mismatch(exc: aiormq.exceptions.ChannelPreconditionFailed) -> TopologyMismatchError:
    """Turn the broker's PRECONDITION_FAILED into which argument differs and what to do."""
    text = str(exc.args[0] if exc.args else exc)
    m = _INEQUIVALENT.search(text)
    if not m:
        return TopologyMismatchError(f"the broker refused a declaration: {text}")
    return TopologyMismatchError(
        f"{m['kind']} {m['name']!r} already exists with {m['arg']}={m['current']}, but this"
        f" process declares {m['arg']}={m['received']}. The broker never changes an existing"
        f" {m['kind']}'s arguments: give publishers and workers the same TopologySettings, or"
        " drain and delete it so it is declared anew (README: 'Changing queue arguments')."
    )


def _predates_leader_locator(exc: aiormq.exceptions.ChannelPreconditionFailed) -> bool:
    text = str(exc.args[0] if exc.args else exc)
    m = _INEQUIVALENT.search(text)
    return m is not None and m["arg"] in LEADER_LOCATOR and m["current"].strip() == "none"


#: Channels a plan's queues are declared (and deleted) over at once. RabbitMQ answers one
#: channel's commands in order, and a quorum queue takes tens of milliseconds to start:
#: the delay cascade's 29 levels took about a second over one channel, the first delayed
#: job's wait. Exchanges and bindings stay on one channel: RabbitMQ 3.10 answered
#: concurrent deletions of exchanges bound to each other with INTERNAL_ERROR.
PARALLEL_CHANNELS = 8


async def declare_plan(connection: AbstractConnection, plan: Plan, *, legacy: bool = False) -> None:
    """Declare every exchange, then every queue, then every binding of ``plan``
    (idempotent); the queues spread over up to PARALLEL_CHANNELS channels of its own.

    ``legacy``: queues were first declared without a leader locator, and keep it so.
    A refusal (PRECONDITION_FAILED) is raised as aiormq reports it.
    """
    async with _channels(connection, len(plan.queues)) as raws:

        async def exchange(raw: aiormq.abc.AbstractChannel, ex: Exchange) -> None:
            await raw.exchange_declare(
                ex.name, exchange_type=ex.type, durable=True, arguments=ex.arguments or None
            )

        async def queue(raw: aiormq.abc.AbstractChannel, q: Queue) -> None:
            args = q.arguments
            if legacy:
                args = {k: v for k, v in args.items() if k not in LEADER_LOCATOR}
            await raw.queue_declare(q.name, durable=True, arguments=args)

        async def binding(raw: aiormq.abc.AbstractChannel, b: Binding) -> None:
            if b.to_exchange:
                await raw.exchange_bind(
                    destination=b.destination, source=b.source, routing_key=b.key
                )
            else:
                await raw.queue_bind(b.destination, b.source, routing_key=b.key)

        await _spread(raws[:1], plan.exchanges, exchange)
        # the first queue alone: if it predates leader placement, it fails before any
        # other is created with the locator (the legacy fallback declares all without)
        await _spread(raws[:1], plan.queues[:1], queue)
        await _spread(raws, plan.queues[1:], queue)
        await _spread(raws[:1], plan.bindings, binding)


async def _spread(
    raws: list[aiormq.abc.AbstractChannel],
    items: Sequence[T],
    declare: Callable[[aiormq.abc.AbstractChannel, T], Awaitable[None]],
) -> None:
    """``declare`` every item, the items dealt round-robin over the channels, each
    channel's share in order; the first failure is raised once all have ended."""

    async def share(raw: aiormq.abc.AbstractChannel, mine: Sequence[T]) -> None:
        for item in mine:
            await declare(raw, item)

    results = await asyncio.gather(
        *(share(raw, items[i :: len(raws)]) for i, raw in enumerate(raws)),
        return_exceptions=True,
    )
    failures = [r for r in results if isinstance(r, BaseException)]
    for other in failures[1:]:
        log.debug("declaring: %s (besides %s)", describe(other), describe(failures[0]))
    if failures:
        raise failures[0]


#: How long closing a declaring channel may take (the connection may be dying).
CLOSE_TIMEOUT = 5.0


@contextlib.asynccontextmanager
async def _channels(
    connection: AbstractConnection, queues: int
) -> AsyncIterator[list[aiormq.abc.AbstractChannel]]:
    """Up to PARALLEL_CHANNELS channels (one per queue) for one plan, closed at the end,
    each close bounded; errors in closing do not matter here."""
    channels: list[AbstractChannel] = []
    try:
        for _ in range(max(1, min(PARALLEL_CHANNELS, queues))):
            channels.append(await open_channel(connection, publisher_confirms=False))
        yield [await ch.get_underlay_channel() for ch in channels]
    finally:
        for ch in channels:
            if not ch.is_closed:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(CLOSE_TIMEOUT):
                        await ch.close()


class Declarer:
    """Declares a namespace's topology on one connection, each piece once.

    Declarations are idempotent on the broker; the cache only saves round trips. It uses
    a channel of its own, because a refused declaration closes the channel it was on.
    """

    def __init__(self, connection: AbstractConnection, ns: str, settings: TopologySettings) -> None:
        self.connection = connection
        self.ns = check_namespace(ns)
        self.settings = settings
        self.declared: set[str] = set()
        self.queues: set[str] = set()
        self._lock = asyncio.Lock()
        #: queues declared before leader placement existed keep their arguments
        self._legacy_placement = False

    async def _once(self, key: str, plan: Plan) -> None:
        if key in self.declared:
            return
        async with self._lock:
            if key in self.declared:
                return
            try:
                await declare_plan(self.connection, plan, legacy=self._legacy_placement)
            except aiormq.exceptions.ChannelPreconditionFailed as exc:
                if self._legacy_placement or not _predates_leader_locator(exc):
                    raise explain_mismatch(exc) from None
                log.info(
                    "%s: queues declared before leader placement keep their leaders where they"
                    " are (set a queue-leader-locator policy to move new ones)",
                    self.ns,
                )
                self._legacy_placement = True
                try:
                    await declare_plan(self.connection, plan, legacy=True)
                except aiormq.exceptions.ChannelPreconditionFailed as again:
                    raise explain_mismatch(again) from None
            self.declared.add(key)

    async def base(self) -> None:
        """Exchanges every publisher needs, and the unroutable parking queue."""
        await self._once("base", base_plan(self.ns, self.settings))

    async def queue(self, queue: str, job_names: Iterable[str]) -> None:
        """A work queue with its due, quarantine and dead queues, bound for these job names."""
        plan = queue_plan(self.ns, queue, (), self.settings)  # checks the name
        await self.base()
        missing = {n for n in job_names if f"bind:{n}" not in self.declared}
        if not missing and f"queue:{queue}" in self.declared:
            return
        self.queues.add(queue)
        key = f"queue:{queue}:" + ",".join(sorted(missing))
        await self._once(
            key, queue_plan(self.ns, queue, missing, self.settings) if missing else plan
        )
        self.declared.update(f"bind:{n}" for n in missing)
        self.declared.add(f"queue:{queue}")

    async def cascade(self) -> None:
        """The delay levels; declared lazily, on the first delayed job or retry."""
        await self.base()
        await self._once("cascade", cascade_plan(self.ns, self.settings))


async def delete_namespace(
    connection: AbstractConnection,
    ns: str,
    queues: Iterable[str],
    settings: TopologySettings | None = None,
) -> None:
    """Delete every queue and exchange of a namespace's plan. Missing ones are fine."""
    plan = namespace_plan(ns, queues, settings or TopologySettings())
    async with _channels(connection, len(plan.queues)) as raws:

        async def delete_queue(raw: aiormq.abc.AbstractChannel, q: Queue) -> None:
            await raw.queue_delete(q.name)

        async def delete_exchange(raw: aiormq.abc.AbstractChannel, ex: Exchange) -> None:
            await raw.exchange_delete(ex.name)

        await _spread(raws, plan.queues, delete_queue)
        await _spread(raws[:1], plan.exchanges, delete_exchange)
