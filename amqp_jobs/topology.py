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
    {ns}.events            topic exchange of lifecycle events (key: event.queue.job),
                           bound with "#" to the stream {ns}.events, which keeps them

A delay is spelt in the routing key as ``levels`` binary words, most significant first,
then the destination queue name as one final word: ``0.0.…1.0.1.emails``. Level L's
exchange sends keys whose bit L is 1 into its queue (which holds them for unit*2^L and
then dead-letters them to level L-1) and keys whose bit L is 0 straight on to level L-1,
exchange to exchange, at no queue hop.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from amqp_jobs.contract import (
    HOP_ALLOWANCE_MS as HOP_ALLOWANCE_MS,
)
from amqp_jobs.contract import (
    MAX_TTL_MS as MAX_TTL_MS,
)
from amqp_jobs.contract import (
    PUBLISH_ALLOWANCE_MS as PUBLISH_ALLOWANCE_MS,
)
from amqp_jobs.contract import (
    QueueType as QueueType,
)
from amqp_jobs.contract import (
    TopologySettings as TopologySettings,
)
from amqp_jobs.contract import check_queue_name
from amqp_jobs.message import H_PRIORITY, HIGH, Envelope

#: Quorum queues' leaders spread over a cluster's nodes instead of all landing on the node
#: the declaring client happens to use (a no-op on a single node).
LEADER_LOCATOR = {"x-queue-leader-locator": "balanced"}


# -- names ---------------------------------------------------------------------------


def jobs_exchange(ns: str) -> str:
    return f"{ns}.jobs"


def jobs_high_exchange(ns: str) -> str:
    """Where high-priority jobs are published, keyed by job name like the jobs exchange."""
    return f"{ns}.jobs.high"


def work_queue(ns: str, queue: str) -> str:
    return f"{ns}.q.{queue}"


def high_queue(ns: str, queue: str) -> str:
    """A work queue's high-priority twin (quorum queues before RabbitMQ 4.0 refuse
    x-max-priority): the worker gives its jobs the next free slot, two times in three
    while normal jobs wait too. Queue names hold no dot, so this is no user's queue."""
    return f"{ns}.q.{queue}.high"


def fresh_route(ns: str, envelope: Envelope) -> tuple[str, str]:
    """Exchange and routing key of a job due now: its priority's jobs exchange, by name."""
    if envelope.extra_headers.get(H_PRIORITY) == HIGH:
        return jobs_high_exchange(ns), envelope.job_name
    return jobs_exchange(ns), envelope.job_name


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


def events_exchange(ns: str) -> str:
    return f"{ns}.events"


def scheduler_queue(ns: str) -> str:
    """The scheduler's token queue (quorum, single active consumer): see scheduler.py."""
    return f"{ns}.scheduler"


def scheduler_status_queue(ns: str) -> str:
    """A copy of the newest scheduler token, for ``amqp-jobs schedules`` to read."""
    return f"{ns}.scheduler.status"


def events_stream(ns: str) -> str:
    return f"{ns}.events"


# -- delay arithmetic ----------------------------------------------------------------


def delay_units(delay_ms: int, s: TopologySettings) -> int:
    """How many units to route through the cascade for a job due in ``delay_ms``.

    Rounds down, less an allowance per queue hop and one for the publish, so the job
    reaches the worker a little before its ETA (the worker waits out the rest): never
    early, rarely late.
    Capped at the cascade's maximum; the worker re-delays any remainder.
    """
    if delay_ms <= 0:
        return 0
    units = delay_ms // s.delay_unit_ms
    lead = PUBLISH_ALLOWANCE_MS + HOP_ALLOWANCE_MS * units.bit_count()
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


def events_stream_arguments(s: TopologySettings) -> dict[str, Any]:
    """The events stream: retention by age and size, in segments of a tenth of the size
    (RabbitMQ drops whole segments), at most RabbitMQ's default of 500 MB."""
    return LEADER_LOCATOR | {
        "x-queue-type": "stream",
        "x-max-age": s.events_max_age,
        "x-max-length-bytes": s.events_max_bytes,
        "x-stream-max-segment-size-bytes": min(500_000_000, s.events_max_bytes // 10),
    }


# -- the plan: what a namespace consists of, as data ---------------------------------

ExchangeType = Literal["direct", "topic", "fanout"]


@dataclass(frozen=True)
class Exchange:
    name: str
    type: ExchangeType
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Queue:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Binding:
    """``source`` exchange sends messages whose key matches ``key`` to ``destination``
    (a queue, or an exchange when ``to_exchange``)."""

    source: str
    destination: str
    key: str
    to_exchange: bool = False


@dataclass(frozen=True)
class Plan:
    """Exchanges, queues and bindings, in the order they must be declared."""

    exchanges: tuple[Exchange, ...] = ()
    queues: tuple[Queue, ...] = ()
    bindings: tuple[Binding, ...] = ()

    def __add__(self, other: Plan) -> Plan:
        return Plan(
            self.exchanges + other.exchanges,
            self.queues + other.queues,
            self.bindings + other.bindings,
        )


def base_plan(ns: str, s: TopologySettings) -> Plan:
    """What every publisher needs: the jobs and dead exchanges, the cascade's deliver
    exchange, and where messages it cannot route go."""
    return Plan(
        exchanges=(
            Exchange(jobs_exchange(ns), "direct"),
            Exchange(jobs_high_exchange(ns), "direct"),
            Exchange(dead_exchange(ns), "direct"),
            Exchange(unroutable(ns), "fanout"),
            Exchange(deliver_exchange(ns), "topic", {"alternate-exchange": unroutable(ns)}),
        ),
        queues=(Queue(unroutable(ns), parking_queue_arguments(s)),),
        bindings=(Binding(unroutable(ns), unroutable(ns), ""),),
    )


def events_plan(ns: str, s: TopologySettings) -> Plan:
    """The events exchange and the stream that keeps every event it routes."""
    return Plan(
        exchanges=(Exchange(events_exchange(ns), "topic"),),
        queues=(Queue(events_stream(ns), events_stream_arguments(s)),),
        bindings=(Binding(events_exchange(ns), events_stream(ns), "#"),),
    )


#: A token queue: the broker delivers to one consumer at a time (a leader election).
TOKEN_QUEUE_ARGUMENTS: dict[str, Any] = {"x-queue-type": "quorum", "x-single-active-consumer": True}
#: Keeps the newest message only.
STATUS_QUEUE_ARGUMENTS: dict[str, Any] = {"x-max-length": 1, "x-overflow": "drop-head"}


def scheduler_plan(ns: str) -> Plan:
    """The scheduler's token and status queues (declared by the schedulers themselves)."""
    return Plan(
        queues=(
            Queue(scheduler_queue(ns), dict(TOKEN_QUEUE_ARGUMENTS)),
            Queue(scheduler_status_queue(ns), dict(STATUS_QUEUE_ARGUMENTS)),
        )
    )


def queue_plan(ns: str, queue: str, job_names: Iterable[str], s: TopologySettings) -> Plan:
    """A work queue with its due, quarantine and dead queues, bound for these job names."""
    check_queue_name(queue)
    args = work_queue_arguments(ns, queue, s)
    return Plan(
        queues=(
            Queue(work_queue(ns, queue), args),
            Queue(high_queue(ns, queue), args),
            Queue(due_queue(ns, queue), args),
            Queue(quarantine_queue(ns, queue), args),
            Queue(dead_queue(ns, queue), parking_queue_arguments(s)),
        ),
        bindings=(
            Binding(deliver_exchange(ns), due_queue(ns, queue), deliver_binding(queue, s)),
            Binding(dead_exchange(ns), dead_queue(ns, queue), queue),
            *(Binding(jobs_exchange(ns), work_queue(ns, queue), n) for n in sorted(job_names)),
            *(Binding(jobs_high_exchange(ns), high_queue(ns, queue), n) for n in sorted(job_names)),
        ),
    )


def level_exchange_plan(ns: str, level: int, s: TopologySettings) -> Plan:
    """Delay level ``level``'s exchange, passing keys without its bit on to the level
    below (exchange to exchange). Cheap: no queue."""
    ex = delay_exchange(ns, level)
    below = delay_exchange(ns, level - 1) if level > 0 else deliver_exchange(ns)
    return Plan(
        exchanges=(Exchange(ex, "topic"),),
        bindings=(Binding(ex, below, level_binding(level, "0", s), to_exchange=True),),
    )


def due_plan(ns: str, queue: str, s: TopologySettings) -> Plan:
    """Where the cascade ends for ``queue``: its due queue, bound to the deliver exchange.
    All a delayed job needs of its queue's plan (the worker declares the rest)."""
    check_queue_name(queue)
    return Plan(
        queues=(Queue(due_queue(ns, queue), work_queue_arguments(ns, queue, s)),),
        bindings=(Binding(deliver_exchange(ns), due_queue(ns, queue), deliver_binding(queue, s)),),
    )


def cascade_exchanges_plan(ns: str, s: TopologySettings) -> Plan:
    """Every delay level's exchange, highest last."""
    plan = Plan()
    for level in range(s.delay_levels):
        plan += level_exchange_plan(ns, level, s)
    return plan


def level_plan(ns: str, level: int, s: TopologySettings) -> Plan:
    """Delay level ``level``'s TTL queue, which its exchange sends keys with bit ``level``
    set to (a quorum queue: tens of milliseconds to start)."""
    ex, q = delay_exchange(ns, level), delay_queue(ns, level)
    return Plan(
        queues=(Queue(q, delay_queue_arguments(ns, level, s)),),
        bindings=(Binding(ex, q, level_binding(level, "1", s)),),
    )


def cascade_plan(ns: str, s: TopologySettings) -> Plan:
    """The whole delay cascade: its exchanges, then every level's queue."""
    plan = cascade_exchanges_plan(ns, s)
    for level in range(s.delay_levels):
        plan += level_plan(ns, level, s)
    return plan


def route_levels(delay_ms: int, s: TopologySettings) -> tuple[int, ...]:
    """The levels whose queues a job delayed ``delay_ms`` (as delayed_route sends it)
    waits in: the set bits of its units. It enters at the highest and passes only the
    exchanges below it, so these queues and the exchanges up to the highest are all that
    must exist when it is published."""
    units = delay_units(delay_ms, s)
    return tuple(level for level in range(units.bit_length()) if units >> level & 1)


def namespace_plan(
    ns: str, queues: Iterable[str], s: TopologySettings, jobs: dict[str, set[str]] | None = None
) -> Plan:
    """The whole namespace for these work queues (``jobs``: job names bound per queue)."""
    plan = base_plan(ns, s) + events_plan(ns, s) + scheduler_plan(ns) + cascade_plan(ns, s)
    for q in sorted(set(queues)):
        plan += queue_plan(ns, q, (jobs or {}).get(q, ()), s)
    return plan


def namespace_queues(ns: str, queues: set[str] | frozenset[str], s: TopologySettings) -> list[str]:
    """Every queue name the namespace may hold for these work queues."""
    return [q.name for q in namespace_plan(ns, queues, s).queues]


def namespace_exchanges(ns: str, s: TopologySettings) -> list[str]:
    """Every exchange name of the namespace."""
    return [e.name for e in namespace_plan(ns, (), s).exchanges]
