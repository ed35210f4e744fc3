"""Names, arguments and declaration of every exchange and queue of a namespace.

Per namespace ``ns``::

    {ns}.jobs              direct exchange; routing key = job name
    {ns}.q.{queue}         work queue (quorum by default, x-delivery-limit)
    {ns}.due.{queue}       delayed jobs arrive here within one unit of their ETA
    {ns}.quarantine.{queue} jobs delivered twice without being settled, run one at a time
    {ns}.dead              direct exchange; routing key = queue name
    {ns}.dead.{queue}      dead-letter (parking-lot) queue, no TTL, no length limit
    {ns}.delay.{L}         delay level L: topic exchange + quorum queue, TTL unit*2^L
    {ns}.delay.deliver     topic exchange after level 0; routes on the final word
    {ns}.unroutable        fanout exchange + queue: alternate exchange of deliver

A delay is spelt in the routing key as ``levels`` binary words, most significant first,
then the destination queue name as one final word: ``0.0.…1.0.1.emails``. Level L's
exchange sends keys whose bit L is 1 into its queue (which holds them for unit*2^L and
then dead-letters them to level L-1) and keys whose bit L is 0 straight on to level L-1,
exchange to exchange, at no queue hop.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from typing import Any, Literal

import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection, ExchangeType

from amqp_jobs.channels import open_channel
from amqp_jobs.contract import check_namespace, check_queue_name
from amqp_jobs.errors import ContractError, TopologyMismatchError

log = logging.getLogger("amqp_jobs.topology")

QueueType = Literal["quorum", "classic"]

#: RabbitMQ refuses an x-message-ttl above ten years.
MAX_TTL_MS = 315_360_000_000

#: Quorum queues' leaders spread over a cluster's nodes instead of all landing on the node
#: the declaring client happens to use (a no-op on a single node).
LEADER_LOCATOR = {"x-queue-leader-locator": "balanced"}

#: Time allowed per queue hop of the cascade: the publisher aims this much early per hop,
#: and the worker waits out the rest, so broker latency does not make jobs late.
HOP_ALLOWANCE_MS = 25


@dataclass(frozen=True)
class TopologySettings:
    """Queue arguments shared by publishers and workers of one namespace.

    Both sides must agree: the broker refuses a second declaration with other arguments.
    The defaults give a maximum single-pass delay of 621 days (longer delays pass the
    cascade again) and hold at most the last 100 ms (plus hop allowance) in the worker.
    """

    queue_type: QueueType = "quorum"
    delivery_limit: int = 10
    delay_unit_ms: int = 100
    delay_levels: int = 29

    def __post_init__(self) -> None:
        if self.queue_type not in ("quorum", "classic"):
            raise ContractError(
                f"queue_type must be 'quorum' or 'classic', got {self.queue_type!r}"
            )
        if not 1 <= self.delivery_limit <= 1000:
            raise ContractError(f"delivery_limit must be 1..1000, got {self.delivery_limit}")
        if not 1 <= self.delay_unit_ms <= 60_000:
            raise ContractError(f"delay_unit_ms must be 1..60000, got {self.delay_unit_ms}")
        if not 1 <= self.delay_levels <= 40:
            raise ContractError(f"delay_levels must be 1..40, got {self.delay_levels}")
        top = self.delay_unit_ms << (self.delay_levels - 1)
        if top > MAX_TTL_MS:
            raise ContractError(
                f"the top delay level's TTL would be {top} ms, above RabbitMQ's limit of"
                f" {MAX_TTL_MS} ms (ten years): use fewer delay_levels or a smaller delay_unit_ms"
            )

    @property
    def max_units(self) -> int:
        return (1 << self.delay_levels) - 1

    @property
    def max_delay_ms(self) -> int:
        """Longest delay one pass through the cascade can spell."""
        return self.max_units * self.delay_unit_ms

    @property
    def hold_window_ms(self) -> int:
        """A job due within this many ms may be held by the worker instead of re-delayed."""
        return self.delay_unit_ms + HOP_ALLOWANCE_MS * self.delay_levels


# -- names ---------------------------------------------------------------------------


def jobs_exchange(ns: str) -> str:
    return f"{ns}.jobs"


def work_queue(ns: str, queue: str) -> str:
    return f"{ns}.q.{queue}"


def due_queue(ns: str, queue: str) -> str:
    return f"{ns}.due.{queue}"


def quarantine_queue(ns: str, queue: str) -> str:
    return f"{ns}.quarantine.{queue}"


def dead_exchange(ns: str) -> str:
    return f"{ns}.dead"


def dead_queue(ns: str, queue: str) -> str:
    return f"{ns}.dead.{queue}"


def delay_exchange(ns: str, level: int) -> str:
    return f"{ns}.delay.{level}"


def delay_queue(ns: str, level: int) -> str:
    return f"{ns}.delay.{level}"


def deliver_exchange(ns: str) -> str:
    return f"{ns}.delay.deliver"


def unroutable(ns: str) -> str:
    return f"{ns}.unroutable"


def namespace_queues(ns: str, queues: set[str] | frozenset[str], s: TopologySettings) -> list[str]:
    """Every queue name the namespace may hold for these work queues."""
    names = [unroutable(ns)] + [delay_queue(ns, level) for level in range(s.delay_levels)]
    for q in sorted(queues):
        names += [work_queue(ns, q), due_queue(ns, q), quarantine_queue(ns, q), dead_queue(ns, q)]
    return names


def namespace_exchanges(ns: str, s: TopologySettings) -> list[str]:
    """Every exchange name of the namespace."""
    return [jobs_exchange(ns), dead_exchange(ns), deliver_exchange(ns), unroutable(ns)] + [
        delay_exchange(ns, level) for level in range(s.delay_levels)
    ]


# -- delay arithmetic ----------------------------------------------------------------


def delay_units(delay_ms: int, s: TopologySettings) -> int:
    """How many units to route through the cascade for a job due in ``delay_ms``.

    Rounds down, less an allowance per queue hop, so the job reaches the worker a little
    before its ETA (the worker waits out the rest): never early, rarely late.
    Capped at the cascade's maximum; the worker re-delays any remainder.
    """
    if delay_ms <= 0:
        return 0
    units = delay_ms // s.delay_unit_ms
    lead = HOP_ALLOWANCE_MS * units.bit_count()
    units = max(0, delay_ms - lead) // s.delay_unit_ms
    return min(units, s.max_units)


def delay_routing_key(units: int, queue: str, s: TopologySettings) -> str:
    """Spell ``units`` in ``delay_levels`` binary words, most significant first, then queue."""
    if not 0 <= units <= s.max_units:
        raise ValueError(f"units must be 0..{s.max_units}, got {units}")
    bits = format(units, f"0{s.delay_levels}b")
    return ".".join(bits) + "." + queue


def parse_delay_routing_key(key: str, s: TopologySettings) -> tuple[int, str]:
    """Inverse of delay_routing_key (used by tests and the status command)."""
    words = key.split(".")
    if len(words) != s.delay_levels + 1 or any(w not in ("0", "1") for w in words[:-1]):
        raise ValueError(f"not a delay routing key: {key!r}")
    return int("".join(words[:-1]), 2), words[-1]


def level_binding(level: int, bit: Literal["0", "1"], s: TopologySettings) -> str:
    """Topic pattern matching keys whose bit ``level`` is ``bit``."""
    return "*." * (s.delay_levels - 1 - level) + bit + ".#"


def deliver_binding(queue: str, s: TopologySettings) -> str:
    """Topic pattern matching a full-length delay key whose final word is ``queue``."""
    return "*." * s.delay_levels + queue


def delayed_route(ns: str, queue: str, delay_ms: int, s: TopologySettings) -> tuple[str, str]:
    """Exchange and routing key that deliver a job to ``queue``'s due queue after a delay.

    Publishing enters at the highest level whose bit is set (the levels above would only
    pass it on); a delay under one unit goes straight to the deliver exchange.
    """
    units = delay_units(delay_ms, s)
    key = delay_routing_key(units, queue, s)
    if units == 0:
        return deliver_exchange(ns), key
    return delay_exchange(ns, units.bit_length() - 1), key


def level_ttl_ms(level: int, s: TopologySettings) -> int:
    return s.delay_unit_ms << level


# -- arguments -----------------------------------------------------------------------


def work_queue_arguments(ns: str, queue: str, s: TopologySettings) -> dict[str, Any]:
    """Arguments of ``{ns}.q.{queue}``, ``{ns}.due.{queue}`` and ``{ns}.quarantine.{queue}``."""
    args: dict[str, Any] = {
        "x-queue-type": s.queue_type,
        "x-dead-letter-exchange": dead_exchange(ns),
        "x-dead-letter-routing-key": queue,
    }
    if s.queue_type == "quorum":
        args |= LEADER_LOCATOR | {
            "x-delivery-limit": s.delivery_limit,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }
    return args


def parking_queue_arguments(s: TopologySettings) -> dict[str, Any]:
    """Arguments of dead and unroutable queues: nothing expires, nothing overflows."""
    if s.queue_type == "quorum":
        return {"x-queue-type": s.queue_type} | LEADER_LOCATOR
    return {"x-queue-type": s.queue_type}


def delay_queue_arguments(ns: str, level: int, s: TopologySettings) -> dict[str, Any]:
    """Delay levels are always quorum queues with at-least-once dead-lettering."""
    target = delay_exchange(ns, level - 1) if level > 0 else deliver_exchange(ns)
    return LEADER_LOCATOR | {
        "x-queue-type": "quorum",
        "x-message-ttl": level_ttl_ms(level, s),
        "x-dead-letter-exchange": target,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


# -- declaration ---------------------------------------------------------------------

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
        self._channel: AbstractChannel | None = None
        self._lock = asyncio.Lock()
        #: queues declared before leader placement existed keep their arguments
        self._legacy_placement = False

    def args(self, arguments: dict[str, Any]) -> dict[str, Any]:
        """The arguments to declare with: without the leader locator for queues that
        were first declared without it (the broker never changes a queue's arguments)."""
        if self._legacy_placement:
            return {k: v for k, v in arguments.items() if k not in LEADER_LOCATOR}
        return arguments

    async def _chan(self) -> AbstractChannel:
        if self._channel is None or self._channel.is_closed:
            self._channel = await open_channel(self.connection, publisher_confirms=False)
        return self._channel

    async def close(self) -> None:
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()

    async def _once(self, key: str, declare: Any) -> None:
        if key in self.declared:
            return
        async with self._lock:
            if key in self.declared:
                return
            try:
                await declare(await self._chan())
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
                    await declare(await self._chan())
                except aiormq.exceptions.ChannelPreconditionFailed as again:
                    raise explain_mismatch(again) from None
            self.declared.add(key)

    async def base(self) -> None:
        """Exchanges every publisher needs, and the unroutable parking queue."""
        ns, s = self.ns, self.settings

        async def declare(ch: AbstractChannel) -> None:
            await ch.declare_exchange(jobs_exchange(ns), ExchangeType.DIRECT, durable=True)
            await ch.declare_exchange(dead_exchange(ns), ExchangeType.DIRECT, durable=True)
            ux = await ch.declare_exchange(unroutable(ns), ExchangeType.FANOUT, durable=True)
            uq = await ch.declare_queue(
                unroutable(ns), durable=True, arguments=self.args(parking_queue_arguments(s))
            )
            await uq.bind(ux, routing_key="")
            await ch.declare_exchange(
                deliver_exchange(ns),
                ExchangeType.TOPIC,
                durable=True,
                arguments={"alternate-exchange": unroutable(ns)},
            )

        await self._once("base", declare)

    async def queue(self, queue: str, job_names: set[str] | frozenset[str]) -> None:
        """A work queue with its due, quarantine and dead queues, bound for these job names."""
        check_queue_name(queue)
        await self.base()
        ns, s = self.ns, self.settings
        missing = {n for n in job_names if f"bind:{n}" not in self.declared}
        if not missing and f"queue:{queue}" in self.declared:
            return

        async def declare(ch: AbstractChannel) -> None:
            args = self.args(work_queue_arguments(ns, queue, s))
            wq = await ch.declare_queue(work_queue(ns, queue), durable=True, arguments=args)
            dq = await ch.declare_queue(due_queue(ns, queue), durable=True, arguments=args)
            await dq.bind(deliver_exchange(ns), routing_key=deliver_binding(queue, s))
            await ch.declare_queue(quarantine_queue(ns, queue), durable=True, arguments=args)
            dead = await ch.declare_queue(
                dead_queue(ns, queue), durable=True, arguments=self.args(parking_queue_arguments(s))
            )
            await dead.bind(dead_exchange(ns), routing_key=queue)
            for name in sorted(missing):
                await wq.bind(jobs_exchange(ns), routing_key=name)

        self.queues.add(queue)
        key = f"queue:{queue}:" + ",".join(sorted(missing))
        await self._once(key, declare)
        self.declared.update(f"bind:{n}" for n in missing)
        self.declared.add(f"queue:{queue}")

    async def cascade(self) -> None:
        """The delay levels; declared lazily, on the first delayed job or retry."""
        await self.base()
        ns, s = self.ns, self.settings

        async def declare(ch: AbstractChannel) -> None:
            below = await ch.get_exchange(deliver_exchange(ns), ensure=False)
            for level in range(s.delay_levels):
                ex = await ch.declare_exchange(
                    delay_exchange(ns, level), ExchangeType.TOPIC, durable=True
                )
                q = await ch.declare_queue(
                    delay_queue(ns, level),
                    durable=True,
                    arguments=self.args(delay_queue_arguments(ns, level, s)),
                )
                await q.bind(ex, routing_key=level_binding(level, "1", s))
                await below.bind(ex, routing_key=level_binding(level, "0", s))
                below = ex

        await self._once("cascade", declare)


async def delete_namespace(
    connection: AbstractConnection,
    ns: str,
    queues: set[str] | frozenset[str],
    settings: TopologySettings | None = None,
) -> None:
    """Delete every queue and exchange of a namespace (tests, demos). Missing ones are fine."""
    s = settings or TopologySettings()
    channel = await connection.channel(publisher_confirms=False)
    try:
        for name in namespace_queues(ns, queues, s):
            await channel.queue_delete(name)
        for name in namespace_exchanges(ns, s):
            await channel.exchange_delete(name)
    finally:
        await channel.close()
