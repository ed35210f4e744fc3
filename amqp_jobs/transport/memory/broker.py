"""The in-memory broker itself: exchanges, queues, bindings, routing, TTL and
dead-lettering, with RabbitMQ 3.10's semantics (see the package's docstring)."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from amqp_jobs.clock import WALL, Clock, VirtualClock
from amqp_jobs.contract import MAX_TTL_MS
from amqp_jobs.errors import (
    ContractError,
    PublishError,
    PublishRefusedError,
    TopologyMismatchError,
    UnroutableError,
)
from amqp_jobs.message import Message
from amqp_jobs.topology import (
    Plan,
)
from amqp_jobs.transport.base import Delivery as DeliveryProtocol
from amqp_jobs.urls import check_memory_url

if TYPE_CHECKING:
    from amqp_jobs.transport.memory.session import MemoryChannel, MemorySession

log = logging.getLogger("amqp_jobs.transport.memory")

OnDelivery = Callable[[DeliveryProtocol], Coroutine[Any, Any, None]]
DeathReason = Literal["expired", "rejected", "delivery_limit", "maxlen"]

#: Queue arguments RabbitMQ compares when a queue is declared again (declare_args and the
#: quorum queue type's arguments); a difference in any of them is PRECONDITION_FAILED.
#: Others are stored and never compared, as RabbitMQ does.
COMPARED_QUEUE_ARGUMENTS = (
    "x-expires",
    "x-message-ttl",
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-dead-letter-strategy",
    "x-max-length",
    "x-max-length-bytes",
    "x-max-in-memory-length",
    "x-max-in-memory-bytes",
    "x-max-priority",
    "x-overflow",
    "x-queue-mode",
    "x-single-active-consumer",
    "x-queue-type",
    "x-quorum-initial-group-size",
    "x-max-age",
    "x-max-segment-size",
    "x-initial-cluster-size",
    "x-queue-leader-locator",
    "x-delivery-limit",
)
#: Exchange arguments RabbitMQ compares on a second declaration (besides the type).
COMPARED_EXCHANGE_ARGUMENTS = ("alternate-exchange",)
EXCHANGE_TYPES = ("direct", "topic", "fanout")
#: How long a dead letter that could not be routed waits before it is tried again.
DEAD_LETTER_RETRY_MS = 1000
#: AMQP's prefetch_count is an unsigned short.
MAX_PREFETCH = 65535

#: First and longest pause before a refused publish (a full queue) is tried again.
REFUSED_PAUSE = 0.05
MAX_REFUSED_PAUSE = 2.0
#: Publishes a broker remembers for tests (``published``).
PUBLISHED_KEPT = 100_000

_BROKERS: dict[str, MemoryBroker] = {}
_unnamed = itertools.count(1)


@dataclass(frozen=True, slots=True)
class Published:
    """One publish the broker took (routed to at least one queue), for test assertions.

    Dead-lettering inside the broker is not a publish and is not recorded.
    """

    exchange: str
    routing_key: str
    message: Message
    at_ms: int
    #: a new job from a publisher (not the worker's copy: a retry, re-delay, dead letter)
    fresh: bool = False


# -- values as the wire would carry them ---------------------------------------------


def _wire_time(value: datetime) -> datetime:
    """An AMQP timestamp: whole seconds, read back as UTC (naive means UTC, as pamqp)."""
    if value.tzinfo is None or value.utcoffset() is None:
        value = value.replace(tzinfo=UTC)
    return datetime.fromtimestamp(int(value.timestamp()), tz=UTC)


def _copy_value(value: Any) -> Any:
    """A deep copy of a header value: what the broker stores or hands out never shares
    a mutable table with the publisher or another consumer."""
    if isinstance(value, Mapping):
        return {k: _copy_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy_value(v) for v in value]
    if isinstance(value, bytearray):
        return bytearray(value)
    if isinstance(value, datetime):
        return _wire_time(value)
    return value


_SCALARS = (str, int, bool, float, type(None))


def _copy_headers(headers: Mapping[str, Any] | None) -> dict[str, Any]:
    if not headers:
        return {}
    # scalars (the common case: the contract's own headers) need no copy
    return {k: v if type(v) in _SCALARS else _copy_value(v) for k, v in headers.items()}


def _stored(message: Message) -> Message:
    return Message(
        bytes(message.body),
        message.content_type,
        message.message_id,
        message.type,
        None if message.timestamp is None else _wire_time(message.timestamp),
        _copy_headers(message.headers),
    )


def _type_class(value: Any) -> str:
    """RabbitMQ compares argument values within a type class (any integer width is an
    integer, any string a string)."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str | bytes):
        return "str"
    return type(value).__name__


def _shown(value: Any) -> str:
    return "none" if value is _MISSING else repr(value)


_MISSING: Any = object()


def _same(current: Any, received: Any) -> bool:
    if current is _MISSING or received is _MISSING:
        return current is received
    return _type_class(current) == _type_class(received) and current == received


def _mismatch(kind: str, name: str, arg: str, current: Any, received: Any) -> TopologyMismatchError:
    """PRECONDITION_FAILED as the AMQP transport explains it (declare.explain_mismatch)."""
    return TopologyMismatchError(
        f"{kind} {name!r} already exists with {arg}={_shown(current)}, but this process"
        f" declares {arg}={_shown(received)}. The broker never changes an existing {kind}'s"
        " arguments: give publishers and workers the same TopologySettings, or drain and"
        " delete it so it is declared anew (README: 'Changing queue arguments')."
    )


def _refused(text: str) -> TopologyMismatchError:
    return TopologyMismatchError(f"the broker refused a declaration: {text}")


# -- topic matching ------------------------------------------------------------------


def _words(key: str) -> tuple[str, ...]:
    """A routing or binding key's words; the empty key has none (as RabbitMQ splits it)."""
    return tuple(key.split(".")) if key else ()


def _topic_match(pattern: tuple[str, ...], words: tuple[str, ...]) -> bool:
    """``*`` is exactly one word, ``#`` zero or more; run as a set of pattern positions,
    so a pattern of many ``#`` costs no backtracking."""
    end = len(pattern)

    def closure(positions: set[int]) -> set[int]:
        out = set()
        for i in positions:
            out.add(i)
            while i < end and pattern[i] == "#":
                i += 1
                out.add(i)
        return out

    states = closure({0})
    for word in words:
        nxt = set()
        for i in states:
            if i < end:
                p = pattern[i]
                if p == "#":
                    nxt.add(i)
                elif p == "*" or p == word:
                    nxt.add(i + 1)
        if not nxt:
            return False
        states = closure(nxt)
    return end in states


def topic_matches(binding_key: str, routing_key: str) -> bool:
    """Whether a topic exchange sends ``routing_key`` along a binding of ``binding_key``."""
    return _topic_match(_words(binding_key), _words(routing_key))


# -- the broker's parts --------------------------------------------------------------


class _Exchange:
    __slots__ = ("arguments", "bindings", "direct", "name", "type")

    def __init__(self, name: str, type: str, arguments: dict[str, Any]) -> None:
        self.name = name
        self.type = type
        self.arguments = arguments
        #: (key, destination, to_exchange) -> the key's words (for topic matching)
        self.bindings: dict[tuple[str, str, bool], tuple[str, ...]] = {}
        #: direct exchanges: key -> destinations, so routing is one lookup
        self.direct: dict[str, list[tuple[str, bool]]] = {}

    def bind(self, key: str, destination: str, to_exchange: bool) -> None:
        ident = (key, destination, to_exchange)
        if ident in self.bindings:
            return
        self.bindings[ident] = _words(key)
        self.direct.setdefault(key, []).append((destination, to_exchange))

    def unbind_destination(self, destination: str, to_exchange: bool) -> None:
        for ident in [i for i in self.bindings if i[1] == destination and i[2] == to_exchange]:
            del self.bindings[ident]
            self.direct[ident[0]].remove((destination, to_exchange))
            if not self.direct[ident[0]]:
                del self.direct[ident[0]]

    def route(self, key: str) -> list[tuple[str, bool]]:
        if self.type == "direct":
            return self.direct.get(key, [])
        if self.type == "fanout":
            return [(dest, to_x) for (_, dest, to_x) in self.bindings]
        words = _words(key)
        return [
            (dest, to_x)
            for (_, dest, to_x), pattern in self.bindings.items()
            if _topic_match(pattern, words)
        ]


class _Entry:
    """A message in one queue, with that queue's view of it."""

    __slots__ = (
        "arrived",
        "count",
        "delivered",
        "exchange",
        "expiry",
        "message",
        "routing_key",
        "seq",
    )

    def __init__(
        self, message: Message, exchange: str, routing_key: str, seq: int, expiry: int | None
    ) -> None:
        self.message = message
        #: where it was last published (or dead-lettered) to: x-death's exchange and keys
        self.exchange = exchange
        self.routing_key = routing_key
        #: the queue's order of arrival (classic queues requeue to the original position);
        #: in a stream, the message's offset
        self.seq = seq
        #: epoch ms it entered the queue (a stream's retention by age, timestamp offsets)
        self.arrived = 0
        #: epoch ms at which it expires (x-message-ttl after it entered this queue)
        self.expiry = expiry
        #: quorum queues: returns so far (x-delivery-count)
        self.count = 0
        #: classic queues: handed out before (redelivered)
        self.delivered = False


class _Timer:
    __slots__ = ("at_ms", "cancel", "loop")

    def __init__(
        self, at_ms: int, cancel: Callable[[], None], loop: asyncio.AbstractEventLoop | None
    ) -> None:
        self.at_ms = at_ms
        self.cancel = cancel
        self.loop = loop

    @property
    def alive(self) -> bool:
        """A wall-clock timer dies with its event loop (a test's loop is closed after it)."""
        return self.loop is None or not self.loop.is_closed()


class _Queue:
    __slots__ = (
        "arguments",
        "at_least_once",
        "bytes",
        "consumers",
        "deleted",
        "dlrk",
        "dlx",
        "expiry_timer",
        "held",
        "limit",
        "max_age_ms",
        "max_bytes",
        "max_length",
        "name",
        "next_offset",
        "overflow",
        "pending",
        "pending_timer",
        "quorum",
        "ready",
        "returns",
        "rr",
        "stream",
        "ttl",
    )

    def __init__(self, name: str, arguments: dict[str, Any]) -> None:
        self.name = name
        self.arguments = arguments
        self.quorum = arguments.get("x-queue-type", "classic") == "quorum"
        #: a stream keeps every message (in ``ready``, oldest first) until its retention
        #: drops it; each consumer reads from its own offset, and nothing is taken
        self.stream = arguments.get("x-queue-type") == "stream"
        self.next_offset = 0
        self.bytes = 0
        self.max_bytes: int | None = arguments.get("x-max-length-bytes") if self.stream else None
        age = arguments.get("x-max-age") if self.stream else None
        self.max_age_ms: int | None = _age_ms(age) if isinstance(age, str) else None
        self.ttl: int | None = arguments.get("x-message-ttl")
        self.dlx: str | None = arguments.get("x-dead-letter-exchange")
        self.dlrk: str | None = arguments.get("x-dead-letter-routing-key")
        self.limit: int | None = arguments.get("x-delivery-limit") if self.quorum else None
        self.max_length: int | None = arguments.get("x-max-length")
        self.overflow: str = arguments.get("x-overflow", "drop-head")
        # RabbitMQ falls back to at-most-once unless all three hold
        self.at_least_once = (
            self.quorum
            and arguments.get("x-dead-letter-strategy") == "at-least-once"
            and arguments.get("x-overflow") == "reject-publish"
        )
        #: quorum queues serve returned messages first, in the order they came back
        self.returns: deque[_Entry] = deque()
        self.ready: deque[_Entry] = deque()
        self.consumers: list[_Consumer] = []
        self.rr = 0
        #: deliveries handed out and not settled
        self.held = 0
        self.deleted = False
        #: dead letters that found no exchange (or, at-least-once, no queue): tried again
        self.pending: deque[tuple[_Entry, DeathReason]] = deque()
        self.pending_timer: _Timer | None = None
        self.expiry_timer: _Timer | None = None

    @property
    def full(self) -> bool:
        """At x-max-length (ready messages): a publish is refused or drops the oldest."""
        return (
            self.max_length is not None and len(self.returns) + len(self.ready) >= self.max_length
        )

    @property
    def full_over(self) -> bool:
        return self.max_length is not None and len(self.returns) + len(self.ready) > self.max_length

    def head(self) -> _Entry | None:
        if self.returns:
            return self.returns[0]
        return self.ready[0] if self.ready else None

    def take(self) -> _Entry:
        return self.returns.popleft() if self.returns else self.ready.popleft()

    def in_order(self) -> list[_Entry]:
        return [*self.returns, *self.ready]


class _Consumer:
    __slots__ = ("channel", "held", "on_delivery", "position", "prefetch", "queue", "tag")

    def __init__(
        self, tag: str, channel: MemoryChannel, queue: _Queue, on_delivery: OnDelivery
    ) -> None:
        self.tag = tag
        self.channel = channel
        self.queue = queue
        self.on_delivery = on_delivery
        #: basic.qos with global=false: the limit applies to each consumer on its own
        self.prefetch = channel.prefetch
        self.held = 0
        #: on a stream: the offset of the next message to deliver
        self.position = 0

    def has_room(self) -> bool:
        return self.prefetch == 0 or self.held < self.prefetch


# -- the broker ----------------------------------------------------------------------


class MemoryBroker:
    """Exchanges, queues and bindings, with the semantics of RabbitMQ 3.10.

    Every operation is synchronous and completes before it returns (a publish is
    confirmed when the call returns); deliveries are dispatched later by the event loop,
    each to its own task, never inside the caller's call.
    """

    def __init__(self, clock: Clock = WALL, *, name: str | None = None) -> None:
        self.clock = clock
        self.name = name or f"unnamed-{next(_unnamed)}"
        check_memory_url(f"memory://{self.name}")
        #: every publish the broker took, in order (tests assert on it)
        #: the last PUBLISHED_KEPT publishes (a long-running app must not grow forever)
        self.published: deque[Published] = deque(maxlen=PUBLISHED_KEPT)
        self._exchanges: dict[str, _Exchange] = {}
        self._queues: dict[str, _Queue] = {}
        self._seq = itertools.count()
        self._ctags = itertools.count(1)
        self._sessions: list[MemorySession] = []
        #: exclusive queues and the session that owns each (deleted when it closes)
        self._owners: dict[str, MemorySession] = {}
        #: bumped by drop_connections: links opened before it must reconnect
        self._generation = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dirty: dict[str, _Queue] = {}
        self._dispatch_handle: asyncio.Handle | None = None
        self._dispatch_loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._warned: set[tuple[str, str]] = set()

    def __repr__(self) -> str:
        return f"MemoryBroker({self.name!r}, queues={len(self._queues)})"

    # -- the process-wide brokers by name --------------------------------------------

    @classmethod
    def named(cls, name: str) -> MemoryBroker:
        """The broker of ``memory://NAME`` in this process, made on first use (wall clock)."""
        broker = _BROKERS.get(name)
        if broker is None:
            broker = _BROKERS[name] = cls(WALL, name=name)
        return broker

    @classmethod
    def reset(cls, name: str, *, virtual_time: bool = False) -> MemoryBroker:
        """Replace the broker of that name by an empty one (on a VirtualClock if asked).

        The old one is left as it is: sessions on it belong to whoever opened them.
        """
        broker = _BROKERS[name] = cls(VirtualClock() if virtual_time else WALL, name=name)
        return broker

    # -- declaring -------------------------------------------------------------------

    def declare(self, plan: Plan) -> None:
        """Declare a plan's exchanges, queues and bindings in order, idempotently.

        A second declaration with other arguments raises TopologyMismatchError naming the
        argument (RabbitMQ's PRECONDITION_FAILED); what was declared before it stays.
        """
        for ex in plan.exchanges:
            self.declare_exchange(ex.name, ex.type, ex.arguments)
        for q in plan.queues:
            self.declare_queue(q.name, q.arguments)
        for b in plan.bindings:
            self.bind(b.source, b.destination, b.key, to_exchange=b.to_exchange)

    def declare_exchange(
        self, name: str, type: str, arguments: Mapping[str, Any] | None = None
    ) -> None:
        if name == "" or name.startswith("amq."):
            raise ContractError(
                f"ACCESS_REFUSED - exchange name {name!r} contains reserved prefix 'amq.'"
                if name
                else "ACCESS_REFUSED - operation not permitted on the default exchange"
            )
        if type not in EXCHANGE_TYPES:
            raise ContractError(
                f"exchange type {type!r}: the memory broker has direct, topic and fanout"
            )
        args = _copy_headers(arguments)
        current = self._exchanges.get(name)
        if current is None:
            self._exchanges[name] = _Exchange(name, type, args)
            return
        if current.type != type:
            raise _mismatch("exchange", name, "type", current.type, type)
        for arg in COMPARED_EXCHANGE_ARGUMENTS:
            have, want = current.arguments.get(arg, _MISSING), args.get(arg, _MISSING)
            if not _same(have, want):
                raise _mismatch("exchange", name, arg, have, want)

    def declare_queue(self, name: str, arguments: Mapping[str, Any] | None = None) -> None:
        if not name:
            raise ContractError("the memory broker does not name queues: give a name")
        if name.startswith("amq."):
            raise ContractError(f"ACCESS_REFUSED - queue name {name!r} contains reserved prefix")
        args = _copy_headers(arguments)
        _check_queue_arguments(name, args)
        current = self._queues.get(name)
        if current is None:
            self._queues[name] = _Queue(name, args)
            return
        for arg in COMPARED_QUEUE_ARGUMENTS:
            have, want = current.arguments.get(arg, _MISSING), args.get(arg, _MISSING)
            if not _same(have, want):
                raise _mismatch("queue", name, arg, have, want)

    def bind(self, source: str, destination: str, key: str, *, to_exchange: bool = False) -> None:
        if source == "" or (to_exchange and destination == ""):
            raise ContractError("ACCESS_REFUSED - operation not permitted on the default exchange")
        if source not in self._exchanges:
            raise _refused(f"NOT_FOUND - no exchange {source!r} in vhost '/'")
        if to_exchange and destination not in self._exchanges:
            raise _refused(f"NOT_FOUND - no exchange {destination!r} in vhost '/'")
        if not to_exchange and destination not in self._queues:
            raise _refused(f"NOT_FOUND - no queue {destination!r} in vhost '/'")
        self._exchanges[source].bind(key, destination, to_exchange)

    def delete_queue(self, name: str) -> None:
        """Delete a queue (missing is fine): its messages go, its bindings go, and its
        consumers are cancelled, which their sessions hear through on_lost."""
        q = self._queues.pop(name, None)
        if q is None:
            return
        self._owners.pop(name, None)
        q.deleted = True
        for timer in (q.expiry_timer, q.pending_timer):
            if timer is not None:
                timer.cancel()
        q.returns.clear()
        q.ready.clear()
        q.pending.clear()
        self._dirty.pop(name, None)
        for x in self._exchanges.values():
            x.unbind_destination(name, to_exchange=False)
        consumers, q.consumers = q.consumers, []
        for c in consumers:
            c.channel._consumers.pop(c.tag, None)
            c.channel._session._lost(
                f"the broker cancelled consumer {c.tag} (was its queue deleted?)", None
            )

    def delete_exchange(self, name: str) -> None:
        """Delete an exchange (missing is fine) and every binding from or to it."""
        if self._exchanges.pop(name, None) is None:
            return
        for x in self._exchanges.values():
            x.unbind_destination(name, to_exchange=True)

    def purge(self, name: str) -> int:
        """Drop a queue's ready messages; returns how many."""
        q = self._queues.get(name)
        if q is None:
            return 0
        count = len(q.returns) + len(q.ready)
        q.returns.clear()
        q.ready.clear()
        return count

    # -- publishing and routing ------------------------------------------------------

    def publish(
        self, exchange: str, routing_key: str, message: Message, *, fresh: bool = False
    ) -> None:
        """Publish mandatory and confirmed: returns once every queue it routes to holds it.

        Raises UnroutableError if no queue takes it (alternate exchanges included) and
        PublishError if the exchange does not exist.
        """
        if exchange != "" and exchange not in self._exchanges:
            raise PublishError(
                f"exchange {exchange!r} does not exist: NOT_FOUND - no exchange"
                f" {exchange!r} in vhost '/'"
            )
        queues = self._route(exchange, routing_key)
        if not queues:
            raise UnroutableError(
                f"no queue is bound to {exchange!r} for routing key {routing_key!r}"
                " (is the topology declared, or the queue deleted?)"
            )
        full = [q.name for q in queues if q.full and q.overflow.startswith("reject-publish")]
        if full:
            # one queue refusing makes the broker nack the whole publish
            raise PublishRefusedError(
                f"the broker refused the message for {exchange!r} / {routing_key!r}:"
                f" {', '.join(full)} is full (x-max-length, reject-publish)"
            )
        stored = _stored(message)
        for q in queues:
            self._enqueue(q, stored, exchange, routing_key)
            while q.full_over:
                self._dead_letter(q, q.take(), "maxlen")  # drop-head: the oldest goes
        self.published.append(Published(exchange, routing_key, stored, self.clock.now_ms(), fresh))

    def _route(self, exchange: str, key: str) -> list[_Queue]:
        """The queues a message reaches, each once, as RabbitMQ's rabbit_exchange:route:
        exchange-to-exchange bindings are followed, each exchange visited once (so cycles
        end), and an exchange that routes nowhere hands it to its alternate exchange."""
        if exchange == "":
            q = self._queues.get(key)
            return [q] if q is not None else []
        work = [self._exchanges[exchange]]
        seen = {exchange}
        out: dict[str, _Queue] = {}
        while work:
            x = work.pop()
            dests = x.route(key)
            if not dests:
                alternate = x.arguments.get("alternate-exchange")
                dests = [(alternate, True)] if isinstance(alternate, str) else []
            for name, to_exchange in dests:
                if to_exchange:
                    if name not in seen:
                        seen.add(name)
                        if name in self._exchanges:
                            work.append(self._exchanges[name])
                elif name in self._queues:
                    out[name] = self._queues[name]
        return list(out.values())

    def _enqueue(self, q: _Queue, message: Message, exchange: str, routing_key: str) -> None:
        if q.stream:
            self._append(q, message, exchange, routing_key)
            return
        expiry = None if q.ttl is None else self.clock.now_ms() + q.ttl
        q.ready.append(_Entry(message, exchange, routing_key, next(self._seq), expiry))
        if q.ttl is not None:
            self._schedule_expiry(q)
        self._kick(q)

    def _append(self, q: _Queue, message: Message, exchange: str, routing_key: str) -> None:
        """A stream keeps the message at the next offset, then drops the oldest beyond
        its retention (RabbitMQ drops whole segments; here, single messages)."""
        entry = _Entry(message, exchange, routing_key, q.next_offset, None)
        entry.arrived = now = self.clock.now_ms()
        q.next_offset += 1
        q.ready.append(entry)
        q.bytes += len(message.body)
        while len(q.ready) > 1 and (
            (q.max_bytes is not None and q.bytes > q.max_bytes)
            or (q.max_age_ms is not None and q.ready[0].arrived < now - q.max_age_ms)
        ):
            q.bytes -= len(q.ready.popleft().message.body)
        self._kick(q)

    def stream_start(self, q: _Queue, spec: Any) -> int:
        """The offset an ``x-stream-offset`` consumer argument names: first, last (the
        last message), next (the default), an offset, or a time (the first message that
        arrived then or later)."""
        first = q.ready[0].seq if q.ready else q.next_offset
        if spec is None or spec == "next":
            return q.next_offset
        if spec == "first":
            return first
        if spec == "last":
            return q.ready[-1].seq if q.ready else q.next_offset
        if isinstance(spec, int) and not isinstance(spec, bool):
            return max(first, min(spec, q.next_offset))
        if isinstance(spec, datetime):
            at = int(spec.timestamp() * 1000)
            return next((e.seq for e in q.ready if e.arrived >= at), q.next_offset)
        raise ContractError(
            f"x-stream-offset {spec!r}: use first, last, next, an int or a datetime"
        )

    # -- expiry and dead-lettering ---------------------------------------------------

    def _call_at(self, at_ms: int, callback: Callable[[], None]) -> _Timer:
        """A timer on the broker's clock; a wall-clock one outside a running loop goes on
        the loop the broker last ran in."""
        if self.clock.virtual:
            return _Timer(at_ms, self.clock.call_at(at_ms, callback), None)
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            return _Timer(at_ms, self.clock.call_at(at_ms, callback), running)
        loop = self._current_loop()
        if loop is None:
            raise ContractError(
                "the memory broker's timers (x-message-ttl) need a running event loop,"
                " or a VirtualClock"
            )
        delay = max(0.0, (at_ms - self.clock.now_ms()) / 1000)
        return _Timer(at_ms, loop.call_later(delay, callback).cancel, loop)

    def _schedule_expiry(self, q: _Queue) -> None:
        """Keep one timer per queue, at its head's expiry: only the head expires."""
        if q.ttl is None or q.deleted:
            return
        head = q.head()
        timer = q.expiry_timer
        if head is None or head.expiry is None:
            if timer is not None:
                timer.cancel()
                q.expiry_timer = None
            return
        if timer is not None and timer.alive and timer.at_ms <= head.expiry:
            return  # fires no later than needed; it looks again then
        if timer is not None:
            timer.cancel()
        q.expiry_timer = self._call_at(head.expiry, lambda: self._expiry_due(q))

    def _expiry_due(self, q: _Queue) -> None:
        q.expiry_timer = None
        if q.deleted:
            return
        self._expire(q)
        self._schedule_expiry(q)

    def _expire(self, q: _Queue) -> None:
        """Dead-letter expired messages at the head (returns first, as a quorum queue
        serves them). Delivered messages are not in the queue and do not expire."""
        if q.ttl is None:
            return
        now = self.clock.now_ms()
        while (head := q.head()) is not None and head.expiry is not None and head.expiry <= now:
            self._dead_letter(q, q.take(), "expired")

    def _dead_letter(self, q: _Queue, entry: _Entry, reason: DeathReason) -> None:
        """Republish to the queue's x-dead-letter-exchange with an x-death record, as
        rabbit_dead_letter does; without a dead-letter exchange the message is dropped, and
        one whose exchange is missing or routes nowhere is kept and tried again only with
        at-least-once dead-lettering (quorum queues), as RabbitMQ 3.10."""
        dlx = q.dlx
        if dlx is None:
            return
        if dlx != "" and dlx not in self._exchanges:
            why = f"its dead-letter exchange {dlx!r} does not exist"
            if q.at_least_once:
                self._retain(q, entry, reason, why)
            else:  # at-most-once (classic queues): RabbitMQ drops it
                log.warning(
                    "dead letter %s from %s dropped: %s", entry.message.message_id, q.name, why
                )
            return
        key = q.dlrk if q.dlrk is not None else entry.routing_key
        message = _with_death(entry, reason, q.name, self.clock.now_ms())
        targets = self._route(dlx, key)
        if not targets:
            if q.at_least_once:
                self._retain(q, entry, reason, f"no queue is bound to {dlx!r} for {key!r}")
            return
        if reason != "rejected":
            deaths = message.headers["x-death"]
            cycling = [t for t in targets if _is_cycle(t.name, deaths)]
            if cycling:
                log.debug(
                    "dead letter %s from %s dropped for %s: it went round without a reject",
                    message.message_id,
                    q.name,
                    [t.name for t in cycling],
                )
                targets = [t for t in targets if t not in cycling]
        for target in targets:
            self._enqueue(target, message, dlx, key)

    def _retain(self, q: _Queue, entry: _Entry, reason: DeathReason, why: str) -> None:
        """Keep a dead letter that could not go anywhere and try again a second later
        (at-least-once dead-lettering). It is not ready: no consumer gets it."""
        q.pending.append((entry, reason))
        if (q.name, why) not in self._warned:
            self._warned.add((q.name, why))
            log.warning(
                "queue %r cannot dead-letter: %s; keeping its dead letters and trying again",
                q.name,
                why,
            )
        timer = q.pending_timer
        if timer is None or not timer.alive:
            at = self.clock.now_ms() + DEAD_LETTER_RETRY_MS
            q.pending_timer = self._call_at(at, lambda: self._retry_dead_letters(q))

    def _retry_dead_letters(self, q: _Queue) -> None:
        q.pending_timer = None
        if q.deleted:
            return
        waiting = list(q.pending)
        q.pending.clear()
        for entry, reason in waiting:
            self._dead_letter(q, entry, reason)

    def _return(self, q: _Queue, entry: _Entry) -> None:
        """A delivery comes back unsettled (nack with requeue, or its channel closed).

        Quorum: the delivery count rises, past x-delivery-limit the message is
        dead-lettered (delivery_limit), else it joins the returns, served first.
        Classic: back to its original position, marked redelivered.
        """
        if q.deleted or q.stream:
            return  # a stream never gave it away
        if q.quorum:
            entry.count += 1
            if q.limit is not None and entry.count > q.limit:
                self._dead_letter(q, entry, "delivery_limit")
                return
            q.returns.append(entry)
        else:
            later = (i for i, other in enumerate(q.ready) if other.seq > entry.seq)
            q.ready.insert(next(later, len(q.ready)), entry)
        self._schedule_expiry(q)
        self._kick(q)

    # -- dispatching -----------------------------------------------------------------

    def _current_loop(self) -> asyncio.AbstractEventLoop | None:
        loop: asyncio.AbstractEventLoop | None
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = self._loop
        else:
            self._loop = loop
        return None if loop is None or loop.is_closed() else loop

    def _kick(self, q: _Queue) -> None:
        """Dispatch from ``q`` soon (never inside the caller: aiormq hands deliveries to
        callbacks from its reader, after the publish or ack has returned)."""
        if not q.consumers:
            return
        self._dirty[q.name] = q
        if self._dispatch_handle is not None:
            if self._dispatch_loop is not None and not self._dispatch_loop.is_closed():
                return
            self._dispatch_handle = None
        loop = self._current_loop()
        if loop is None:
            return
        self._dispatch_loop = loop
        self._dispatch_handle = loop.call_soon(self._dispatch)

    def _dispatch(self) -> None:
        try:
            while self._dirty:
                name = next(iter(self._dirty))
                self._deliver(self._dirty.pop(name))
        finally:
            self._dispatch_handle = None

    def _deliver(self, q: _Queue) -> None:
        if q.deleted:
            return
        for c in list(q.consumers):
            if c.channel._session._loop.is_closed():
                # its event loop is gone: the client is gone, as a dead TCP connection
                c.channel._session._abandon()
        if q.stream:
            self._deliver_stream(q)
            return
        while True:
            self._expire(q)
            if q.head() is None:
                break
            consumer = self._next_consumer(q)
            if consumer is None:
                break
            consumer.channel._deliver(consumer, q.take())
        self._schedule_expiry(q)

    def _deliver_stream(self, q: _Queue) -> None:
        """Every consumer reads on from its own offset, as far as its prefetch allows."""
        for consumer in list(q.consumers):
            first = q.ready[0].seq if q.ready else q.next_offset
            consumer.position = max(consumer.position, first)
            while consumer.position < q.next_offset and consumer.has_room():
                entry = q.ready[consumer.position - first]
                consumer.position += 1
                consumer.channel._deliver(consumer, entry)

    def _next_consumer(self, q: _Queue) -> _Consumer | None:
        """Round-robin among the consumers with room under their prefetch; with a single
        active consumer, the oldest consumer alone (the next once it is gone)."""
        if q.arguments.get("x-single-active-consumer") is True:
            if not q.consumers:
                return None
            active = q.consumers[0]
            return active if active.has_room() else None
        n = len(q.consumers)
        for i in range(n):
            index = (q.rr + i) % n
            consumer = q.consumers[index]
            if consumer.has_room():
                q.rr = (index + 1) % n
                return consumer
        return None

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("a delivery callback raised", exc_info=exc)

    # -- sessions --------------------------------------------------------------------

    def _add_session(self, session: MemorySession) -> None:
        self._loop = session._loop
        self._sessions.append(session)

    def claim(self, name: str, session: MemorySession) -> bool:
        """Declare ``name`` exclusive to ``session``; False (RESOURCE_LOCKED) if another
        session owns it, or it exists and is not exclusive."""
        owner = self._owners.get(name)
        if owner is session:
            return True
        if owner is not None or name in self._queues:
            return False
        self.declare_queue(name)
        self._owners[name] = session
        return True

    def release(self, name: str, session: MemorySession) -> None:
        """Delete a queue ``session`` may delete: one it owns (what closing its
        connection does), or one nobody owns; another's is left (RESOURCE_LOCKED)."""
        owner = self._owners.get(name)
        if owner is None or owner is session:
            self._owners.pop(name, None)
            self.delete_queue(name)

    def drop_connections(self, reason: str = "connection lost") -> None:
        """Close every session as a lost connection would: their deliveries return to
        their queues, their on_lost callbacks hear ``reason``, and links reconnect."""
        self._generation += 1
        for session in list(self._sessions):
            session._drop(reason)

    # -- inspection ------------------------------------------------------------------

    def queue_names(self) -> list[str]:
        return sorted(self._queues)

    def exchange_names(self) -> list[str]:
        return sorted(self._exchanges)

    def has_queue(self, name: str) -> bool:
        return name in self._queues

    def has_exchange(self, name: str) -> bool:
        return name == "" or name in self._exchanges

    def ready(self, name: str) -> int:
        """Messages ready in a queue (0 if it does not exist)."""
        q = self._queues.get(name)
        return 0 if q is None else len(q.returns) + len(q.ready)

    def depth(self, name: str) -> int | None:
        """Messages ready in a queue, or None if it does not exist (a passive declare)."""
        q = self._queues.get(name)
        return None if q is None else len(q.returns) + len(q.ready)

    def unacked(self, name: str | None = None) -> int:
        """Deliveries handed out and not settled, of one queue or of all."""
        if name is None:
            return sum(q.held for q in self._queues.values())
        q = self._queues.get(name)
        return 0 if q is None else q.held

    def consumer_count(self, name: str) -> int:
        q = self._queues.get(name)
        return 0 if q is None else len(q.consumers)

    def messages(self, name: str) -> list[Message]:
        """A peek at a queue's ready messages, in the order they would be delivered."""
        q = self._queues.get(name)
        return [] if q is None else [_as_delivered(q, e) for e in q.in_order()]

    def get(self, name: str) -> Message | None:
        """Take the next ready message (basic.get with no_ack); None if none (or no queue)."""
        q = self._queues.get(name)
        if q is None:
            return None
        self._expire(q)
        if q.head() is None:
            return None
        message = _as_delivered(q, q.take())
        self._schedule_expiry(q)
        return message

    def busy(self) -> bool:
        """Whether a dispatch is scheduled or a delivery callback has not finished."""
        return self.dispatching() or self.callbacks_running() > 0

    def dispatching(self) -> bool:
        """Whether a dispatch (handing out ready messages) is scheduled."""
        handle_loop = self._dispatch_loop
        if self._dispatch_handle is not None:
            if handle_loop is not None and not handle_loop.is_closed():
                return True
            self._dispatch_handle = None
        return False

    def callbacks_running(self) -> int:
        """Delivery callbacks (consumers' tasks) not finished, started or not."""
        for task in [t for t in self._tasks if t.get_loop().is_closed()]:
            self._tasks.discard(task)
        return len(self._tasks)


def _check_queue_arguments(name: str, args: dict[str, Any]) -> None:
    """The checks RabbitMQ makes of the arguments the memory broker honours."""

    def invalid(arg: str, why: str) -> TopologyMismatchError:
        return _refused(f"PRECONDITION_FAILED - invalid arg '{arg}' for queue '{name}': {why}")

    kind = args.get("x-queue-type", "classic")
    if kind not in ("classic", "quorum", "stream"):
        raise invalid("x-queue-type", f"unsupported queue type {kind!r}")
    age = args.get("x-max-age")
    if age is not None and (not isinstance(age, str) or _age_ms(age) is None):
        raise invalid("x-max-age", f"invalid max age {age!r}")
    size = args.get("x-max-length-bytes")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
        raise invalid("x-max-length-bytes", f"expected a non-negative integer, got {size!r}")
    for arg in ("x-message-ttl", "x-delivery-limit"):
        value = args.get(arg)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise invalid(arg, f"expected integer, got {value!r}")
        if value is not None and value < 0:
            raise invalid(arg, f"value_negative {value}")
    ttl = args.get("x-message-ttl")
    if ttl is not None and ttl > MAX_TTL_MS:
        raise invalid("x-message-ttl", f"value_too_large {ttl}")
    for arg in ("x-dead-letter-exchange", "x-dead-letter-routing-key"):
        if arg in args and not isinstance(args[arg], str):
            raise invalid(arg, f"unacceptable_type {args[arg]!r}")
    if "x-dead-letter-routing-key" in args and "x-dead-letter-exchange" not in args:
        raise invalid("x-dead-letter-routing-key", "routing_key_but_no_dlx_defined")
    strategy = args.get("x-dead-letter-strategy")
    if strategy is not None and strategy not in ("at-most-once", "at-least-once"):
        raise invalid("x-dead-letter-strategy", "invalid_dlx_strategy")
    overflow = args.get("x-overflow")
    if overflow is not None and overflow not in (
        "drop-head",
        "reject-publish",
        "reject-publish-dlx",
    ):
        raise invalid("x-overflow", "invalid_overflow")


_AGE_UNITS_MS = {
    "Y": 365 * 86_400_000,
    "M": 30 * 86_400_000,
    "D": 86_400_000,
    "h": 3_600_000,
    "m": 60_000,
    "s": 1000,
}


def _age_ms(age: str) -> int | None:
    """RabbitMQ's x-max-age (``7D``, ``12h``) in ms, or None if it is not one."""
    number, unit = age[:-1], age[-1:]
    if not number.isdigit() or unit not in _AGE_UNITS_MS:
        return None
    return int(number) * _AGE_UNITS_MS[unit]


def _as_delivered(q: _Queue, entry: _Entry) -> Message:
    """The message as a consumer would see it: a copy, and on a quorum queue the
    x-delivery-count once it has come back at least once."""
    m = entry.message
    headers = _copy_headers(m.headers)
    if q.quorum and entry.count > 0:
        headers["x-delivery-count"] = entry.count
    return Message(m.body, m.content_type, m.message_id, m.type, m.timestamp, headers)


def _with_death(entry: _Entry, reason: DeathReason, queue: str, now_ms: int) -> Message:
    """The message with its x-death updated, as rabbit_dead_letter:make_msg does: newest
    first; a second death in the same queue for the same reason raises that record's
    count (its other fields stay those of the first) and moves it to the front."""
    m = entry.message
    headers = dict(m.headers)
    info: dict[str, Any] = {
        "count": 1,
        "reason": reason,
        "queue": queue,
        "time": datetime.fromtimestamp(now_ms // 1000, tz=UTC),
        "exchange": entry.exchange,
        "routing-keys": [entry.routing_key],
    }
    deaths = headers.get("x-death")
    if "x-death" not in headers:
        headers["x-first-death-reason"] = reason
        headers["x-first-death-queue"] = queue
        headers["x-first-death-exchange"] = entry.exchange
        headers["x-death"] = [info]
    elif not isinstance(deaths, list):
        # a client rewrote it (to a string, say): RabbitMQ starts it afresh
        headers["x-death"] = [info]
    else:
        match = next(
            (
                d
                for d in deaths
                if isinstance(d, Mapping) and d.get("queue") == queue and d.get("reason") == reason
            ),
            None,
        )
        if match is None:
            first = info
        else:
            first = dict(match)
            count = first.get("count")
            first["count"] = count + 1 if isinstance(count, int) else 1
        headers["x-death"] = [first, *(d for d in deaths if d is not match)]
    return Message(m.body, m.content_type, m.message_id, m.type, m.timestamp, headers)


def _is_cycle(queue: str, deaths: list[Any]) -> bool:
    """RabbitMQ drops a dead letter (other than a reject) that would reach a queue it
    already died in, unless a reject happened on the way round (rabbit_dead_letter)."""
    for index, death in enumerate(deaths):
        if isinstance(death, Mapping) and death.get("queue") == queue:
            way_round = deaths[: index + 1]
            return all(isinstance(d, Mapping) and d.get("reason") != "rejected" for d in way_round)
    return False


# -- consuming -----------------------------------------------------------------------
