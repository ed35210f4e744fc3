"""The in-memory broker behaves as RabbitMQ 3.10 does for everything amqp-jobs relies on."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

import pytest

from amqp_jobs.clock import VirtualClock
from amqp_jobs.contract import HOP_ALLOWANCE_MS, PUBLISH_ALLOWANCE_MS, TopologySettings
from amqp_jobs.errors import (
    ConnectionLostError,
    PublishError,
    TopologyMismatchError,
    UnroutableError,
)
from amqp_jobs.message import CONTENT_TYPE, Envelope, Message
from amqp_jobs.topology import (
    Binding,
    Exchange,
    Plan,
    Queue,
    base_plan,
    cascade_plan,
    dead_queue,
    delay_queue,
    delay_units,
    delayed_route,
    deliver_exchange,
    due_queue,
    jobs_exchange,
    queue_plan,
    unroutable,
    work_queue,
)
from amqp_jobs.transport.base import Delivery
from amqp_jobs.transport.memory import (
    MemoryBroker,
    MemoryDelivery,
    MemorySession,
    MemoryTransport,
    topic_matches,
)

NS = "t"
S = TopologySettings()


@pytest.fixture
def broker() -> MemoryBroker:
    return MemoryBroker(VirtualClock())


@pytest.fixture
def transport(broker: MemoryBroker) -> MemoryTransport:
    return MemoryTransport(broker)


def message(
    body: bytes = b"{}", *, job: str = "send_email", mid: str = "m1", **headers: Any
) -> Message:
    return Message(body, CONTENT_TYPE, mid, job, None, headers)


def declare_queue(
    broker: MemoryBroker,
    queue: str = "emails",
    jobs: tuple[str, ...] = ("send_email",),
    s: TopologySettings = S,
) -> None:
    broker.declare(base_plan(NS, s) + queue_plan(NS, queue, jobs, s))


async def idle(broker: MemoryBroker) -> None:
    """Let dispatches and delivery callbacks run until nothing is under way."""
    for _ in range(1000):
        await asyncio.sleep(0)
        if not broker.busy():
            break
    await asyncio.sleep(0)


class Collector:
    """A consumer callback that keeps what it is handed, settling nothing itself."""

    def __init__(self) -> None:
        self.got: list[MemoryDelivery] = []

    async def __call__(self, delivery: Delivery) -> None:
        assert isinstance(delivery, MemoryDelivery)
        self.got.append(delivery)

    @property
    def ids(self) -> list[str | None]:
        return [d.message_id for d in self.got]


class Lost:
    def __init__(self) -> None:
        self.reports: list[tuple[str, float | None]] = []

    def __call__(self, reason: str, consumer_timeout: float | None) -> None:
        self.reports.append((reason, consumer_timeout))


async def consuming(
    transport: MemoryTransport, queue: str, prefetch: int = 10
) -> tuple[MemorySession, Collector, Lost]:
    session = await transport.session(name="test", give_up_after=None)
    lost = Lost()
    session.on_lost(lost)
    channel = await session.channel(prefetch)
    collector = Collector()
    await channel.consume(queue, collector)
    return session, collector, lost


# -- routing --------------------------------------------------------------------------


async def test_direct_routing_by_job_name(broker: MemoryBroker) -> None:
    declare_queue(broker, "emails", ("send_email",))
    declare_queue(broker, "sms", ("send_sms",))
    broker.publish(jobs_exchange(NS), "send_email", message())
    broker.publish(jobs_exchange(NS), "send_sms", message(job="send_sms", mid="m2"))
    broker.publish(jobs_exchange(NS), "send_email", message(mid="m3"))
    assert [m.message_id for m in broker.messages(work_queue(NS, "emails"))] == ["m1", "m3"]
    assert [m.message_id for m in broker.messages(work_queue(NS, "sms"))] == ["m2"]
    assert [(p.exchange, p.routing_key) for p in broker.published] == [
        (jobs_exchange(NS), "send_email"),
        (jobs_exchange(NS), "send_sms"),
        (jobs_exchange(NS), "send_email"),
    ]


@pytest.mark.parametrize(
    ("pattern", "key", "matches"),
    [
        ("a.*.c", "a.b.c", True),
        ("a.*.c", "a.c", False),
        ("a.*.c", "a.b.b.c", False),
        ("*", "a", True),
        ("*", "", False),
        ("*", "a.b", False),
        ("#", "", True),
        ("#", "a.b.c", True),
        ("a.#", "a", True),
        ("a.#", "a.b.c", True),
        ("a.#", "b.a", False),
        ("a.#.c", "a.c", True),
        ("a.#.c", "a.x.y.c", True),
        ("a.#.c", "a.x.y.d", False),
        ("#.c", "c", True),
        ("*.#", "a", True),
        ("*.#", "", False),
        ("#.#", "", True),
        ("a.b", "a.b", True),
        ("a.b", "a.bb", False),
        ("*.*.1.#", "0.0.1.0.emails", True),
        ("*.*.1.#", "0.1.0.0.emails", False),
    ],
)
def test_topic_matching(pattern: str, key: str, matches: bool) -> None:
    assert topic_matches(pattern, key) is matches


async def test_topic_exchange_routes_by_pattern(broker: MemoryBroker) -> None:
    broker.declare(
        Plan(
            exchanges=(Exchange("x", "topic"),),
            queues=(Queue("one"), Queue("many"), Queue("exact")),
            bindings=(
                Binding("x", "one", "jobs.*"),
                Binding("x", "many", "jobs.#"),
                Binding("x", "exact", "jobs.email.sent"),
            ),
        )
    )
    broker.publish("x", "jobs.email", message(mid="a"))
    broker.publish("x", "jobs.email.sent", message(mid="b"))
    broker.publish("x", "jobs", message(mid="c"))
    assert [m.message_id for m in broker.messages("one")] == ["a"]
    assert [m.message_id for m in broker.messages("many")] == ["a", "b", "c"]
    assert [m.message_id for m in broker.messages("exact")] == ["b"]
    with pytest.raises(UnroutableError):
        broker.publish("x", "other.email", message())


async def test_alternate_exchange_catches_what_deliver_cannot_route(broker: MemoryBroker) -> None:
    broker.declare(base_plan(NS, S) + cascade_plan(NS, S) + queue_plan(NS, "emails", (), S))
    _, key = delayed_route(NS, "nobody", 0, S)
    broker.publish(deliver_exchange(NS), key, message(mid="lost"))
    _, key = delayed_route(NS, "emails", 0, S)
    broker.publish(deliver_exchange(NS), key, message(mid="found"))
    assert [m.message_id for m in broker.messages(unroutable(NS))] == ["lost"]
    assert [m.message_id for m in broker.messages(due_queue(NS, "emails"))] == ["found"]


async def test_unroutable_and_missing_exchange(broker: MemoryBroker) -> None:
    declare_queue(broker)
    with pytest.raises(
        UnroutableError, match=r"no queue is bound to 't\.jobs' for routing key 'nope'"
    ):
        broker.publish(jobs_exchange(NS), "nope", message())
    with pytest.raises(UnroutableError):
        broker.publish("", "no-such-queue", message())
    with pytest.raises(PublishError, match=r"exchange 'missing' does not exist"):
        broker.publish("missing", "k", message())
    assert list(broker.published) == []
    broker.publish("", work_queue(NS, "emails"), message())  # the default exchange
    assert broker.ready(work_queue(NS, "emails")) == 1


async def test_a_message_reaching_a_queue_twice_is_stored_once_and_cycles_end(
    broker: MemoryBroker,
) -> None:
    broker.declare(
        Plan(
            exchanges=(Exchange("a", "fanout"), Exchange("b", "fanout")),
            queues=(Queue("q"),),
            bindings=(
                Binding("a", "q", ""),
                Binding("a", "b", "", to_exchange=True),
                Binding("b", "a", "", to_exchange=True),
                Binding("b", "q", ""),
            ),
        )
    )
    broker.publish("a", "k", message())
    assert broker.ready("q") == 1


async def test_redeclaring_with_other_arguments_is_refused(broker: MemoryBroker) -> None:
    declare_queue(broker)
    declare_queue(broker)  # the same again: fine
    with pytest.raises(TopologyMismatchError, match=r"x-delivery-limit=10.*x-delivery-limit=20"):
        declare_queue(broker, s=TopologySettings(delivery_limit=20))
    with pytest.raises(TopologyMismatchError, match="x-queue-type"):
        declare_queue(broker, s=TopologySettings(queue_type="classic"))
    with pytest.raises(TopologyMismatchError, match=r"'t\.jobs' already exists with type='direct'"):
        broker.declare(Plan(exchanges=(Exchange(jobs_exchange(NS), "topic"),)))
    with pytest.raises(TopologyMismatchError, match="alternate-exchange"):
        broker.declare(Plan(exchanges=(Exchange(deliver_exchange(NS), "topic"),)))
    # an argument present on one side only differs too (RabbitMQ: "received none")
    broker.declare(Plan(queues=(Queue("plain"),)))
    with pytest.raises(TopologyMismatchError, match="x-message-ttl=none"):
        broker.declare(Plan(queues=(Queue("plain", {"x-message-ttl": 5}),)))


# -- the delay cascade -----------------------------------------------------------------


async def test_the_delay_cascade_delivers_on_time_with_x_death(broker: MemoryBroker) -> None:
    assert isinstance(broker.clock, VirtualClock)
    clock = broker.clock
    broker.declare(base_plan(NS, S) + cascade_plan(NS, S) + queue_plan(NS, "emails", (), S))
    delay = 3_600_000
    exchange, key = delayed_route(NS, "emails", delay, S)
    units = delay_units(delay, S)
    arrives = units * S.delay_unit_ms
    # early by at most the hop allowance delay_units takes off, plus rounding down to a unit
    allowance = PUBLISH_ALLOWANCE_MS + HOP_ALLOWANCE_MS * (delay // S.delay_unit_ms).bit_count()
    assert delay - allowance - S.delay_unit_ms < arrives <= delay

    broker.publish(exchange, key, message(mid="later"))
    clock.advance((arrives - 1) / 1000)
    assert broker.ready(due_queue(NS, "emails")) == 0
    assert sum(broker.ready(delay_queue(NS, level)) for level in range(S.delay_levels)) == 1
    clock.advance(0.001)
    [arrived] = broker.messages(due_queue(NS, "emails"))
    assert sum(broker.ready(delay_queue(NS, level)) for level in range(S.delay_levels)) == 0

    hops = [level for level in range(S.delay_levels) if units >> level & 1]
    deaths = arrived.headers["x-death"]
    assert [d["queue"] for d in deaths] == [
        delay_queue(NS, level) for level in hops
    ]  # newest first
    assert {d["reason"] for d in deaths} == {"expired"}
    assert {d["count"] for d in deaths} == {1}
    assert all(d["routing-keys"] == [key] for d in deaths)
    assert all(isinstance(d["time"], datetime) for d in deaths)
    assert deaths[-1]["exchange"] == exchange  # where it was published
    assert arrived.headers["x-first-death-queue"] == delay_queue(NS, hops[-1])
    assert arrived.headers["x-first-death-reason"] == "expired"


async def test_a_link_sends_a_delayed_job_through_the_cascade(transport: MemoryTransport) -> None:
    broker, clock = transport.broker, transport.clock
    assert isinstance(clock, VirtualClock)
    link = transport.link(NS, S, name="test")
    await link.open()
    envelope = Envelope.new("send_email", b"{}", "emails", eta_ms=clock.now_ms() + 10_000)
    await link.retrying(
        lambda: link.send(envelope, "emails", via_jobs_exchange=True), give_up_after=1
    )
    assert broker.ready(work_queue(NS, "emails")) == 0
    assert link.known_queues == {"emails"}
    clock.advance(10)
    [arrived] = broker.messages(due_queue(NS, "emails"))
    assert arrived.message_id == envelope.job_id
    # due now: straight to the jobs exchange, by job name
    now = Envelope.new("send_email", b"{}", "emails")
    await link.send(now, "emails", via_jobs_exchange=True)
    assert broker.published[-1].exchange == jobs_exchange(NS)
    assert broker.ready(work_queue(NS, "emails")) == 1


async def test_a_link_declares_again_when_its_queue_was_deleted(transport: MemoryTransport) -> None:
    broker = transport.broker
    link = transport.link(NS, S, name="test")
    await link.open()
    envelope = Envelope.new("send_email", b"{}", "emails")
    await link.retrying(
        lambda: link.send(envelope, "emails", via_jobs_exchange=True), give_up_after=1
    )
    await transport.delete_namespace(NS, {"emails"}, S)
    assert broker.queue_names() == []
    assert broker.exchange_names() == []
    await link.retrying(
        lambda: link.send(envelope, "emails", via_jobs_exchange=True), give_up_after=1
    )
    assert broker.ready(work_queue(NS, "emails")) == 1


# -- consuming --------------------------------------------------------------------------


async def test_prefetch_limits_deliveries_per_consumer(
    broker: MemoryBroker, transport: MemoryTransport
) -> None:
    declare_queue(broker)
    for i in range(5):
        broker.publish(jobs_exchange(NS), "send_email", message(mid=f"m{i}"))
    session, got, _ = await consuming(transport, work_queue(NS, "emails"), prefetch=2)
    await idle(broker)
    assert got.ids == ["m0", "m1"]
    assert broker.unacked(work_queue(NS, "emails")) == 2
    await got.got[0].ack()
    await idle(broker)
    assert got.ids == ["m0", "m1", "m2"]
    # a second consumer on the same channel gets a prefetch of its own
    channel = got.got[0].channel
    second = Collector()
    await channel.consume(work_queue(NS, "emails"), second)
    await idle(broker)
    assert second.ids == ["m3", "m4"]
    assert broker.unacked() == 4
    await session.close()


async def test_consumers_of_a_queue_take_turns(
    broker: MemoryBroker, transport: MemoryTransport
) -> None:
    declare_queue(broker)
    _, first, _ = await consuming(transport, work_queue(NS, "emails"))
    _, second, _ = await consuming(transport, work_queue(NS, "emails"))
    for i in range(4):
        broker.publish(jobs_exchange(NS), "send_email", message(mid=f"m{i}"))
    await idle(broker)
    assert first.ids == ["m0", "m2"]
    assert second.ids == ["m1", "m3"]


async def test_dispatch_never_runs_inside_the_publisher(
    broker: MemoryBroker, transport: MemoryTransport
) -> None:
    declare_queue(broker)
    _, got, _ = await consuming(transport, work_queue(NS, "emails"))
    broker.publish(jobs_exchange(NS), "send_email", message())
    assert got.got == []
    assert broker.busy()
    await idle(broker)
    assert got.ids == ["m1"]
    assert not broker.busy()


async def test_nack_requeue_counts_and_serves_the_message_first(
    broker: MemoryBroker, transport: MemoryTransport
) -> None:
    declare_queue(broker)
    for mid in ("a", "b", "c"):
        broker.publish(jobs_exchange(NS), "send_email", message(mid=mid))
    _, got, _ = await consuming(transport, work_queue(NS, "emails"), prefetch=1)
    await idle(broker)
    [first] = got.got
    assert (first.message_id, first.delivery_count, first.redelivered) == ("a", 0, False)
    assert "x-delivery-count" not in first.headers
    await first.nack(requeue=True)
    await idle(broker)
    again = got.got[1]
    assert (again.message_id, again.delivery_count, again.redelivered) == ("a", 1, True)
    assert again.headers["x-delivery-count"] == 1
    await again.ack()
    await idle(broker)
    assert got.got[2].message_id == "b"


async def test_classic_queues_requeue_in_place_without_a_count(
    broker: MemoryBroker, transport: MemoryTransport
) -> None:
    classic = TopologySettings(queue_type="classic")
    declare_queue(broker, s=classic)
    for mid in ("a", "b"):
        broker.publish(jobs_exchange(NS), "send_email", message(mid=mid))
    _, got, _ = await consuming(transport, work_queue(NS, "emails"), prefetch=1)
    await idle(broker)
    await got.got[0].nack(requeue=True)
    await idle(broker)
    again = got.got[1]
    assert (again.message_id, again.redelivered, again.delivery_count) == ("a", True, 0)
    assert "x-delivery-count" not in again.headers


async def test_past_the_delivery_limit_a_message_is_dead_lettered(
    broker: MemoryBroker, transport: MemoryTransport
) -> None:
    s = TopologySettings(delivery_limit=2)
    declare_queue(broker, s=s)
    broker.publish(jobs_exchange(NS), "send_email", message())
    _, got, _ = await consuming(transport, work_queue(NS, "emails"), prefetch=1)
    for _ in range(5):
        await idle(broker)
        if got.got and broker.unacked() == 1:
            await got.got[-1].nack(requeue=True)
    await idle(broker)
    assert [d.delivery_count for d in got.got] == [0, 1, 2]  # limit + 1 deliveries
    assert broker.ready(work_queue(NS, "emails")) == 0
    [dead] = broker.messages(dead_queue(NS, "emails"))
    [death] = dead.headers["x-death"]
    assert death["reason"] == "delivery_limit"
    assert death["queue"] == work_queue(NS, "emails")
    assert death["exchange"] == jobs_exchange(NS)
    assert death["routing-keys"] == ["send_email"]
    assert death["count"] == 1
    assert "x-delivery-count" not in dead.headers


async def test_reject_dead_letters_and_x_death_counts_per_queue_and_reason(
    broker: MemoryBroker, transport: MemoryTransport
) -> None:
    # q dead-letters to an exchange that routes back to q: rejected twice, one record
    broker.declare(
        Plan(
            exchanges=(Exchange("dlx", "fanout"),),
            queues=(Queue("q", {"x-queue-type": "quorum", "x-dead-letter-exchange": "dlx"}),),
            bindings=(Binding("dlx", "q", ""),),
        )
    )
    broker.publish("", "q", message())
    _, got, _ = await consuming(transport, "q", prefetch=1)
    await idle(broker)
    await got.got[0].nack(requeue=False)
    await idle(broker)
    await got.got[1].nack(requeue=False)
    await idle(broker)
    [death] = got.got[2].headers["x-death"]
    assert (death["reason"], death["queue"], death["count"]) == ("rejected", "q", 2)
    assert death["exchange"] == ""  # the first record's fields stay
    assert got.got[2].delivery_count == 0  # a new message in the queue's eyes


async def test_a_held_message_does_not_expire(
    broker: MemoryBroker, transport: MemoryTransport
) -> None:
    clock = broker.clock
    assert isinstance(clock, VirtualClock)
    broker.declare(
        Plan(
            exchanges=(Exchange("dlx", "fanout"),),
            queues=(
                Queue(
                    "q",
                    {
                        "x-queue-type": "quorum",
                        "x-message-ttl": 1000,
                        "x-dead-letter-exchange": "dlx",
                    },
                ),
                Queue("dead"),
            ),
            bindings=(Binding("dlx", "dead", ""),),
        )
    )
    broker.publish("", "q", message(mid="held"))
    broker.publish("", "q", message(mid="waiting"))
    _, got, _ = await consuming(transport, "q", prefetch=1)
    await idle(broker)
    clock.advance(5)
    assert [m.message_id for m in broker.messages("dead")] == ["waiting"]
    await got.got[0].nack(requeue=True)  # back, long past its TTL: expires at the head
    await idle(broker)
    assert [m.message_id for m in broker.messages("dead")] == ["waiting", "held"]
    assert broker.messages("dead")[1].headers["x-death"][0]["reason"] == "expired"


async def test_at_most_once_dead_letters_to_a_missing_exchange_are_dropped(
    broker: MemoryBroker,
) -> None:
    clock = broker.clock
    assert isinstance(clock, VirtualClock)
    args = {"x-queue-type": "quorum", "x-message-ttl": 100, "x-dead-letter-exchange": "later"}
    broker.declare(Plan(queues=(Queue("q", args), Queue("dead"))))
    broker.publish("", "q", message())
    clock.advance(0.1)
    broker.declare(
        Plan(exchanges=(Exchange("later", "fanout"),), bindings=(Binding("later", "dead", ""),))
    )
    clock.advance(1)
    assert (broker.ready("q"), broker.ready("dead")) == (0, 0)  # as RabbitMQ: gone


async def test_dead_letters_wait_for_a_missing_exchange(broker: MemoryBroker) -> None:
    """At-least-once dead-lettering (what the delay cascade uses) keeps and retries."""
    clock = broker.clock
    assert isinstance(clock, VirtualClock)
    args = {
        "x-queue-type": "quorum",
        "x-message-ttl": 100,
        "x-dead-letter-exchange": "later",
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }
    broker.declare(Plan(queues=(Queue("q", args), Queue("dead"))))
    broker.publish("", "q", message())
    clock.advance(0.1)
    assert broker.ready("q") == 0  # expired, waiting to be dead-lettered
    broker.declare(
        Plan(exchanges=(Exchange("later", "fanout"),), bindings=(Binding("later", "dead", ""),))
    )
    assert broker.ready("dead") == 0
    clock.advance(1)
    assert broker.ready("dead") == 1


async def test_closing_a_session_returns_its_deliveries(
    broker: MemoryBroker, transport: MemoryTransport
) -> None:
    declare_queue(broker)
    for mid in ("a", "b", "c"):
        broker.publish(jobs_exchange(NS), "send_email", message(mid=mid))
    session, got, lost = await consuming(transport, work_queue(NS, "emails"), prefetch=2)
    await idle(broker)
    assert got.ids == ["a", "b"]
    await session.close()
    assert broker.unacked() == 0
    returned = broker.messages(work_queue(NS, "emails"))
    assert [(m.message_id, m.headers.get("x-delivery-count")) for m in returned] == [
        ("a", 1),
        ("b", 1),
        ("c", None),
    ]
    broker.publish(jobs_exchange(NS), "send_email", message(mid="d"))
    await idle(broker)
    assert got.ids == ["a", "b"]
    assert lost.reports == []
    with pytest.raises(ConnectionLostError):
        await got.got[0].ack()


async def test_a_delivery_not_yet_begun_is_not_run_after_close(
    broker: MemoryBroker, transport: MemoryTransport
) -> None:
    declare_queue(broker)
    session, got, _ = await consuming(transport, work_queue(NS, "emails"))
    broker.publish(jobs_exchange(NS), "send_email", message())
    await asyncio.sleep(0)  # dispatched: its task is scheduled, not begun
    await session.close()
    await idle(broker)
    assert got.got == []
    assert broker.get(work_queue(NS, "emails")) is not None


async def test_deleting_a_consumed_queue_reports_the_loss(
    broker: MemoryBroker, transport: MemoryTransport
) -> None:
    declare_queue(broker)
    _, _, lost = await consuming(transport, work_queue(NS, "emails"))
    broker.delete_queue(work_queue(NS, "emails"))
    [(reason, timeout)] = lost.reports
    assert "the broker cancelled consumer amq.ctag-" in reason
    assert "(was its queue deleted?)" in reason
    assert timeout is None
    assert not broker.has_queue(work_queue(NS, "emails"))


async def test_a_second_ack_closes_the_channel(
    broker: MemoryBroker, transport: MemoryTransport
) -> None:
    declare_queue(broker)
    for mid in ("a", "b"):
        broker.publish(jobs_exchange(NS), "send_email", message(mid=mid))
    _, got, lost = await consuming(transport, work_queue(NS, "emails"))
    await idle(broker)
    first, second = got.got
    await first.ack()
    with pytest.raises(ConnectionLostError, match="unknown delivery tag"):
        await first.ack()
    assert first.channel.is_closed
    [(reason, _)] = lost.reports
    assert "PRECONDITION_FAILED - unknown delivery tag 1" in reason
    # the channel's other delivery went back
    assert [m.message_id for m in broker.messages(work_queue(NS, "emails"))] == ["b"]
    with pytest.raises(ConnectionLostError):
        await second.nack()


async def test_consuming_a_missing_queue_loses_the_channel(transport: MemoryTransport) -> None:
    session = await transport.session(name="test", give_up_after=None)
    lost = Lost()
    session.on_lost(lost)
    channel = await session.channel(1)
    with pytest.raises(ConnectionLostError, match="NOT_FOUND"):
        await channel.consume("nope", Collector())
    assert channel.is_closed
    assert "NOT_FOUND - no queue 'nope'" in lost.reports[0][0]


async def test_dropping_connections_reports_loss_and_links_reconnect(
    broker: MemoryBroker, transport: MemoryTransport
) -> None:
    declare_queue(broker)
    broker.publish(jobs_exchange(NS), "send_email", message())
    link = transport.link(NS, S, name="test")
    await link.open()
    session, got, lost = await consuming(transport, work_queue(NS, "emails"))
    await idle(broker)
    broker.drop_connections("test drop")
    assert lost.reports == [("connection closed: test drop", None)]
    assert broker.ready(work_queue(NS, "emails")) == 1
    assert got.got[0].channel.is_closed
    with pytest.raises(ConnectionLostError):
        await session.channel(1)
    assert not link.is_open
    envelope = Envelope.new("send_email", b"{}", "emails")
    with pytest.raises(ConnectionLostError):
        await link.send(envelope, "emails", via_jobs_exchange=True)
    await link.retrying(
        lambda: link.send(envelope, "emails", via_jobs_exchange=True), give_up_after=1
    )
    assert link.is_open
    assert broker.ready(work_queue(NS, "emails")) == 2


# -- copies, names -----------------------------------------------------------------------


async def test_headers_are_copied_in_and_out(
    broker: MemoryBroker, transport: MemoryTransport
) -> None:
    declare_queue(broker)
    headers: dict[str, Any] = {"tags": ["a"], "k": "v"}
    broker.publish(
        jobs_exchange(NS),
        "send_email",
        Message(b"{}", CONTENT_TYPE, "m1", "send_email", None, headers),
    )
    headers["tags"].append("b")
    headers["k"] = "changed"
    _, got, _ = await consuming(transport, work_queue(NS, "emails"))
    await idle(broker)
    delivered = got.got[0]
    assert delivered.headers == {"tags": ["a"], "k": "v"}
    delivered.headers["tags"].append("c")
    await delivered.nack(requeue=True)
    await idle(broker)
    assert got.got[1].headers["tags"] == ["a"]


def test_named_brokers_are_one_per_name() -> None:
    fresh = MemoryBroker.reset("unit-test", virtual_time=True)
    assert MemoryBroker.named("unit-test") is fresh
    assert isinstance(fresh.clock, VirtualClock)
    transport = MemoryTransport.named("unit-test")
    assert transport.broker is fresh
    assert transport.clock is fresh.clock
    assert str(transport.urls) == "memory://unit-test"
    assert MemoryBroker.reset("unit-test") is not fresh
