"""Events, job keys and results: their wire form, their order, and what they refuse."""

import asyncio
import json
from datetime import UTC, datetime

import pydantic
import pytest

from amqp_jobs import ContractError, Job
from amqp_jobs.contract import MAX_RESULT_BYTES
from amqp_jobs.errors import ArgsValidationError, ResultError
from amqp_jobs.events import EventKind, InvalidEventError, JobEvent
from amqp_jobs.message import H_DEFERRALS, H_REPLAYS, Envelope, Message, replay_message
from amqp_jobs.topology import Plan, Queue
from amqp_jobs.transport.memory import MemoryTransport
from amqp_jobs.transport.memory.broker import MemoryBroker


class Account(pydantic.BaseModel):
    user_id: int
    note: str | None = None


class Total(pydantic.BaseModel):
    total: int


def event(kind: EventKind, **fields: object) -> JobEvent:
    return JobEvent(kind, "id1", "job", "q", 1_700_000_000_000, **fields)  # type: ignore[arg-type]


def test_an_event_round_trips_and_spells_its_routing_key() -> None:
    e = event(EventKind.SUCCEEDED, key="1042", result={"total": 3}, duration_ms=1.5)
    assert JobEvent.from_json(e.to_json()) == e
    assert e.routing_key == "succeeded.q.job"
    assert json.loads(e.to_json())["v"] == 1


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"{nope", "not JSON"),
        (b"[]", "not a JSON object"),
        (b'{"v": 2, "event": "started"}', "version"),
        (b'{"v": 1, "event": "exploded"}', "unknown event"),
        (b'{"v": 1, "event": "started", "job": "j", "queue": "q", "at": 1}', "job_id"),
        (
            b'{"v": 1, "event": "started", "job_id": 5, "job": "j", "queue": "q", "at": 1}',
            "wrong type",
        ),
        (
            b'{"v": 1, "event": "started", "job_id": "i", "job": "j", "queue": "q", "at": 1,'
            b' "attempt": -1}',
            "negative",
        ),
    ],
)
def test_a_malformed_event_is_refused_saying_why(body: bytes, problem: str) -> None:
    with pytest.raises(InvalidEventError, match=problem):
        JobEvent.from_json(body)


def test_order_puts_replays_then_attempts_then_deferrals_then_phase() -> None:
    life = [
        event(EventKind.ENQUEUED),
        event(EventKind.STARTED),
        event(EventKind.DEFERRED),
        event(EventKind.STARTED, deferrals=1),
        event(EventKind.RETRYING, deferrals=1),
        event(EventKind.STARTED, attempt=2),
        event(EventKind.DEAD, attempt=2),
        event(EventKind.REPLAYED, replays=1),
        event(EventKind.STARTED, replays=1),
        event(EventKind.SUCCEEDED, replays=1),
    ]
    orders = [e.order for e in life]
    assert orders == sorted(orders) and len(set(orders)) == len(orders)


def test_replays_and_deferrals_are_counted_in_headers() -> None:
    env = Envelope.new("job", b"{}", "q")
    assert env.deferred(1).extra_headers.get(H_DEFERRALS) is None  # a re-delay: not counted
    twice = env.deferred(1, counted=True).deferred(2, counted=True)
    assert twice.extra_headers[H_DEFERRALS] == 2
    dead = Message(b"{}", "application/json", "id", "job", None, {H_REPLAYS: 1, H_DEFERRALS: 3})
    replayed = replay_message(dead, "q")
    assert replayed.headers[H_REPLAYS] == 2 and H_DEFERRALS not in replayed.headers


def test_a_key_names_a_field_and_travels_as_text() -> None:
    job = Job("j", Account, key="user_id")
    assert job.key_of(Account(user_id=1042)) == "1042"
    assert Job("k", Account, key="note").key_of(Account(user_id=1)) is None
    with pytest.raises(ContractError, match="key must name a field of Account"):
        Job("j", Account, key="email")
    with pytest.raises(ArgsValidationError, match="1-256 characters"):
        Job("k", Account, key="note").key_of(Account(user_id=1, note="x" * 300))


def test_a_result_is_validated_by_its_model_and_bounded() -> None:
    job = Job("j", Account, result_model=Total)
    assert job.result_data(Total(total=3)) == {"total": 3}
    assert job.result_data({"total": "4"}) == {"total": 4}
    with pytest.raises(ResultError, match="Total refuses: total"):
        job.result_data({"total": "many"})
    free = Job("f", Account)
    assert free.result_data({"a": [1, 2]}) == {"a": [1, 2]}
    assert free.result_data(object()) is None  # not JSON: not recorded
    with pytest.raises(ResultError, match=f"at most {MAX_RESULT_BYTES}"):
        free.result_data("x" * (MAX_RESULT_BYTES + 1))
    with pytest.raises(ContractError, match="result_model"):
        Job("j", Account, result_model=dict)  # type: ignore[arg-type]


STREAM = {"x-queue-type": "stream", "x-max-length-bytes": 30, "x-max-age": "1D"}


def message(n: int) -> Message:
    return Message(b"0123456789", None, f"m{n}", None, datetime.now(UTC), {})


async def read(broker: MemoryBroker, offset: object, count: int) -> list[tuple[str, int]]:
    session = await MemoryTransport(broker).session(name="t", give_up_after=1)
    got: list[tuple[str, int]] = []
    enough = asyncio.Event()

    async def on_delivery(delivery: object) -> None:
        got.append((delivery.message_id, delivery.headers["x-stream-offset"]))  # type: ignore[attr-defined]
        await delivery.ack()  # type: ignore[attr-defined]
        if len(got) >= count:
            enough.set()

    channel = await session.channel(2)
    await channel.consume("s", on_delivery, arguments={"x-stream-offset": offset})
    async with asyncio.timeout(5):
        await enough.wait()
    await session.close()
    return got


async def test_the_memory_stream_keeps_messages_for_every_reader_within_its_retention() -> None:
    broker = MemoryBroker()
    broker.declare(Plan(queues=(Queue("s", STREAM),)))
    for n in range(5):
        broker.publish("", "s", message(n))
    # 30 bytes kept: the three newest of five 10-byte messages
    assert await read(broker, "first", 3) == [("m2", 2), ("m3", 3), ("m4", 4)]
    assert await read(broker, 3, 2) == [("m3", 3), ("m4", 4)]
    assert await read(broker, "first", 3) == [("m2", 2), ("m3", 3), ("m4", 4)]  # not taken
    assert broker.depth("s") == 3
