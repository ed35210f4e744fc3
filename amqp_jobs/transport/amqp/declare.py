"""Declaring a namespace's topology plan on RabbitMQ, and deleting it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection

from amqp_jobs.contract import check_namespace, check_queue_name
from amqp_jobs.errors import TopologyMismatchError, describe
from amqp_jobs.topology import (
    LEADER_LOCATOR,
    Binding,
    Exchange,
    Plan,
    Queue,
    TopologySettings,
    base_plan,
    due_plan,
    events_plan,
    level_exchange_plan,
    level_plan,
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
#: job's wait. Exchanges are deleted over one channel: RabbitMQ 3.10 answered concurrent
#: deletions of exchanges bound to each other with INTERNAL_ERROR.
PARALLEL_CHANNELS = 8

#: Channels a plan's exchanges, and then the bindings between them, are declared over at
#: once (each channel's share pipelined): the cascade's 29 exchange-to-exchange bindings
#: took 40 ms over one channel, 20 ms over four.
EXCHANGE_CHANNELS = 4


async def declare_plan(connection: AbstractConnection, plan: Plan, *, legacy: bool = False) -> None:
    """Declare ``plan`` (idempotent) over channels of its own: the exchanges, then the
    exchange-to-exchange bindings, pipelined over up to EXCHANGE_CHANNELS channels, while
    the queues spread over up to PARALLEL_CHANNELS others; then the queues' bindings,
    pipelined over all of them.

    ``legacy``: the queues were first declared without a leader locator, and keep it so.
    A refusal (PRECONDITION_FAILED) is raised as aiormq reports it.
    """
    chained = [b for b in plan.bindings if b.to_exchange]
    bound = [b for b in plan.bindings if not b.to_exchange]
    exchanging = min(EXCHANGE_CHANNELS, max(len(plan.exchanges), len(chained)))
    queueing = min(PARALLEL_CHANNELS, len(plan.queues))
    async with _channels(connection, exchanging + queueing) as raws:

        async def exchange(raw: aiormq.abc.AbstractChannel, ex: Exchange, wait: bool) -> None:
            await raw.exchange_declare(
                ex.name,
                exchange_type=ex.type,
                durable=True,
                arguments=ex.arguments or None,
                **_nowait(wait),
            )

        async def queue(raw: aiormq.abc.AbstractChannel, q: Queue, wait: bool) -> None:
            args = q.arguments
            if legacy:
                args = {k: v for k, v in args.items() if k not in LEADER_LOCATOR}
            await raw.queue_declare(q.name, durable=True, arguments=args, **_nowait(wait))

        async def binding(raw: aiormq.abc.AbstractChannel, b: Binding, wait: bool) -> None:
            if b.to_exchange:
                await raw.exchange_bind(
                    destination=b.destination, source=b.source, routing_key=b.key, **_nowait(wait)
                )
            else:
                await raw.queue_bind(b.destination, b.source, routing_key=b.key, **_nowait(wait))

        async def exchanges() -> None:
            mine = raws[:exchanging]
            await _spread(mine, plan.exchanges, exchange, pipelined=True)
            await _spread(mine, chained, binding, pipelined=True)

        async def queues() -> None:
            await _spread(raws[exchanging:] or raws, plan.queues, queue)

        await _first_failure(await asyncio.gather(exchanges(), queues(), return_exceptions=True))
        await _spread(raws, bound, binding, pipelined=True)


async def _first_failure(results: Sequence[object]) -> None:
    """Raise the first exception among ``results`` (the others are logged)."""
    failures = [r for r in results if isinstance(r, BaseException)]
    for other in failures[1:]:
        log.debug("declaring: %s (besides %s)", describe(other), describe(failures[0]))
    if failures:
        raise failures[0]


def _nowait(wait: bool) -> dict[str, Any]:
    """aiormq's ``nowait`` flag (its overloads want a literal)."""
    return {"nowait": not wait}


#: What declares (or deletes) one item on a channel; ``wait``: for the broker's answer.
Step = Callable[[aiormq.abc.AbstractChannel, T, bool], Awaitable[None]]


async def _spread(
    raws: list[aiormq.abc.AbstractChannel],
    items: Sequence[T],
    step: Step[T],
    *,
    pipelined: bool = False,
) -> None:
    """``step`` every item, the items dealt round-robin over the channels, each channel's
    share in order; the first failure is raised once all have ended.

    ``pipelined``: each share without waiting for each answer (AMQP's no-wait), then the
    last one waiting. RabbitMQ handles a channel's commands in order, so that answer means
    every one before it was done, and a refusal closes the channel, which the wait then
    raises. For exchanges and bindings, which are cheap for the broker: the round trips
    were most of their cost."""

    async def share(raw: aiormq.abc.AbstractChannel, mine: Sequence[T]) -> None:
        try:
            for i, item in enumerate(mine):
                await step(raw, item, not pipelined or i == len(mine) - 1)
        except aiormq.exceptions.ChannelInvalidStateError:
            # the channel closed under the pipeline: raise why the broker closed it
            closing = raw.closing
            if closing.done() and not closing.cancelled() and closing.exception() is not None:
                raise closing.exception() from None  # type: ignore[misc]
            raise

    if items:
        await _first_failure(
            await asyncio.gather(
                *(share(raw, items[i :: len(raws)]) for i, raw in enumerate(raws)),
                return_exceptions=True,
            )
        )


#: How long closing a declaring channel may take (the connection may be dying).
CLOSE_TIMEOUT = 5.0


@contextlib.asynccontextmanager
async def _channels(
    connection: AbstractConnection, wanted: int
) -> AsyncIterator[list[aiormq.abc.AbstractChannel]]:
    """``wanted`` channels (at least one) for one plan, closed at the end, each close
    bounded; errors in closing do not matter here."""
    channels: list[AbstractChannel] = []

    async def one() -> None:
        channels.append(await open_channel(connection, publisher_confirms=False))

    try:
        # opened at once: the opening round trips add up otherwise
        opened = await asyncio.gather(
            *(one() for _ in range(max(1, wanted))),
            return_exceptions=True,
        )
        for failure in opened:
            if isinstance(failure, BaseException):
                raise failure
        yield [await ch.get_underlay_channel() for ch in channels]
    finally:
        for ch in channels:
            if not ch.is_closed:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(CLOSE_TIMEOUT):
                        await ch.close()


#: What the declarer remembers once a piece of a plan is declared, and the piece.
Part = tuple[tuple[str, ...], Plan]

#: The declared-cache keys of the delay levels (TopologySettings allows at most 40).
_LEVEL_KEYS = tuple(f"level:{n}" for n in range(40))
_EXCHANGE_KEYS = tuple(f"exchange:{n}" for n in range(40))


class Declarer:
    """Declares a namespace's topology on one connection, each piece once.

    Declarations are idempotent on the broker; the cache only saves round trips. Each plan
    uses channels of its own, because a refused declaration closes the channel it was on.
    """

    def __init__(self, connection: AbstractConnection, ns: str, settings: TopologySettings) -> None:
        self.connection = connection
        self.ns = check_namespace(ns)
        self.settings = settings
        self.declared: set[str] = set()
        self.queues: set[str] = set()
        self._lock = asyncio.Lock()
        #: queues declared before leader placement existed keep their arguments (logged once)
        self._told_legacy = False

    async def _declare(self, missing: Callable[[], list[Part]]) -> None:
        """Declare, as one plan, the parts ``missing()`` lists (looked at again under the
        lock: another task may have declared them meanwhile); then remember their keys."""
        if not missing():
            return
        async with self._lock:
            parts = missing()
            if not parts:
                return
            plan = Plan()
            for _, piece in parts:
                plan += piece
            try:
                await declare_plan(self.connection, plan)
            except aiormq.exceptions.ChannelPreconditionFailed as exc:
                if not _predates_leader_locator(exc):
                    raise explain_mismatch(exc) from None
                await self._queue_by_queue(plan)
            for keys, _ in parts:
                self.declared.update(keys)

    async def _queue_by_queue(self, plan: Plan) -> None:
        """Declare ``plan`` when some of its queues predate leader placement: each queue
        alone, those that refuse the locator again without it (the broker never changes
        an existing queue's arguments); then the exchanges and bindings."""
        if not self._told_legacy:
            self._told_legacy = True
            log.info(
                "%s: queues declared before leader placement keep their leaders where they"
                " are (set a queue-leader-locator policy to move new ones)",
                self.ns,
            )
        for q in plan.queues:
            try:
                try:
                    await declare_plan(self.connection, Plan(queues=(q,)))
                except aiormq.exceptions.ChannelPreconditionFailed as exc:
                    if not _predates_leader_locator(exc):
                        raise
                    await declare_plan(self.connection, Plan(queues=(q,)), legacy=True)
            except aiormq.exceptions.ChannelPreconditionFailed as exc:
                raise explain_mismatch(exc) from None
        try:
            await declare_plan(self.connection, Plan(plan.exchanges, (), plan.bindings))
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            raise explain_mismatch(exc) from None

    def _base(self) -> list[Part]:
        return [] if "base" in self.declared else [(("base",), base_plan(self.ns, self.settings))]

    def _queue(self, queue: str, job_names: set[str]) -> list[Part]:
        missing = sorted(n for n in job_names if f"bind:{n}" not in self.declared)
        if not missing and f"queue:{queue}" in self.declared:
            return []
        keys = (f"queue:{queue}", f"due:{queue}", *(f"bind:{n}" for n in missing))
        return [(keys, queue_plan(self.ns, queue, missing, self.settings))]

    def has_due(self, queue: str) -> bool:
        """Whether a job can end its delay in ``queue``'s due queue now."""
        return f"due:{queue}" in self.declared

    def _due(self, queue: str) -> list[Part]:
        if self.has_due(queue):
            return []
        return [((f"due:{queue}",), due_plan(self.ns, queue, self.settings))]

    def _levels(self, levels: Iterable[int]) -> list[Part]:
        """The queues of ``levels``, and the exchanges up to the highest of them."""
        declared, s = self.declared, self.settings
        wanted = sorted(set(levels))
        parts: list[Part] = []
        for n in range(wanted[-1] + 1 if wanted else 0):
            if _EXCHANGE_KEYS[n] not in declared:
                parts.append(((_EXCHANGE_KEYS[n],), level_exchange_plan(self.ns, n, s)))
        for n in wanted:
            if _LEVEL_KEYS[n] not in declared:
                parts.append(((_LEVEL_KEYS[n],), level_plan(self.ns, n, s)))
        return parts

    async def base(self) -> None:
        """Exchanges every publisher needs, and the unroutable parking queue."""
        await self._declare(self._base)

    async def events(self) -> None:
        """The events exchange and the stream that keeps what it routes."""
        await self._declare(
            lambda: (
                []
                if "events" in self.declared
                else [(("events",), events_plan(self.ns, self.settings))]
            )
        )

    async def queue(self, queue: str, job_names: Iterable[str]) -> None:
        """A work queue with its due, quarantine and dead queues, bound for these job names."""
        await self.publishing(queue, job_names, None)

    def has_levels(self, levels: Sequence[int]) -> bool:
        """Whether a job waiting in these delay levels can be published now."""
        declared = self.declared
        return not levels or (
            _EXCHANGE_KEYS[max(levels)] in declared  # declared with all below it
            and all(_LEVEL_KEYS[n] in declared for n in levels)
        )

    async def cascade(self, levels: Iterable[int] | None = None) -> None:
        """The delay cascade's exchanges and the queues of ``levels`` (every level by
        default)."""
        wanted = range(self.settings.delay_levels) if levels is None else tuple(levels)
        await self._declare(lambda: self._base() + self._levels(wanted))

    async def publishing(
        self, queue: str, job_names: Iterable[str], levels: Sequence[int] | None
    ) -> None:
        """What one publish to ``queue`` needs, as one plan, with the namespace's
        exchanges: for a job due now (``levels`` None), the work queue bound for
        ``job_names``; for a delayed job or a retry, the due queue the cascade ends in, and
        the cascade's exchanges up to the highest of ``levels`` and those levels' queues
        only (the set bits of its delay). The first delayed job waits for a few quorum
        queues, not 33, and for one plan, not four; a worker declares the rest."""
        check_queue_name(queue)
        self.queues.add(queue)
        names = set(job_names)

        def missing() -> list[Part]:
            if levels is None:
                return self._base() + self._queue(queue, names)
            return self._base() + self._due(queue) + self._levels(levels)

        await self._declare(missing)


async def delete_namespace(
    connection: AbstractConnection,
    ns: str,
    queues: Iterable[str],
    settings: TopologySettings | None = None,
) -> None:
    """Delete every queue and exchange of a namespace's plan. Missing ones are fine."""
    plan = namespace_plan(ns, queues, settings or TopologySettings())
    async with _channels(connection, min(PARALLEL_CHANNELS, len(plan.queues))) as raws:

        async def delete_queue(raw: aiormq.abc.AbstractChannel, q: Queue, wait: bool) -> None:
            await raw.queue_delete(q.name, **_nowait(wait))

        async def delete_exchange(
            raw: aiormq.abc.AbstractChannel, ex: Exchange, wait: bool
        ) -> None:
            await raw.exchange_delete(ex.name, **_nowait(wait))

        await _spread(raws, plan.queues, delete_queue)
        await _spread(raws[:1], plan.exchanges, delete_exchange)
