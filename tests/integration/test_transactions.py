"""What the scheduler builds on, through the transport, on RabbitMQ and memory:// alike:
a token queue hands its one message to a single active consumer, and the next one gets
it when that consumer's connection closes; a transactional channel's publishes and acks
take effect together at commit, or not at all."""

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime

import pytest

from amqp_jobs.message import Message
from amqp_jobs.testing import Namespace
from amqp_jobs.topology import TOKEN_QUEUE_ARGUMENTS
from amqp_jobs.transport import transport_for
from amqp_jobs.transport.base import Delivery, Session
from tests.support import Admin, count_once_settled, eventually, queue_count


def _message(body: bytes) -> Message:
    return Message(
        body=body,
        content_type="application/json",
        type="t.token",
        message_id=body.decode(),
        timestamp=datetime.now(UTC).replace(microsecond=0),
        headers={},
    )


async def _session(ns: Namespace, name: str) -> Session:
    return await transport_for(ns.url).session(name=name, give_up_after=10)


TokenQueue = Callable[[str], Awaitable[str]]


@pytest.fixture
async def token_queue(namespace: Namespace) -> AsyncIterator[TokenQueue]:
    """Declares token queues of the test's namespace, deleted when it ends."""
    made: list[str] = []

    async def declare(suffix: str) -> str:
        name = f"{namespace.name}.{suffix}"
        made.append(name)
        setup = await _session(namespace, "test setup")
        try:
            await setup.declare_queue(name, TOKEN_QUEUE_ARGUMENTS)
        finally:
            await setup.close()
        return name

    yield declare
    for name in made:
        await Admin(namespace.url).delete_queue(name)


async def test_the_token_goes_to_one_consumer_and_then_to_the_next(
    namespace: Namespace, token_queue: TokenQueue
) -> None:
    queue = await token_queue("token")
    sessions = [await _session(namespace, f"candidate {i}") for i in range(3)]
    held: dict[int, list[Delivery]] = {i: [] for i in range(3)}
    try:
        for i, session in enumerate(sessions):
            channel = await session.transactional(1)

            async def on_delivery(delivery: Delivery, i: int = i) -> None:
                held[i].append(delivery)

            await channel.consume(queue, on_delivery)
        first = sessions[0]
        tx = await first.transactional(1)
        await tx.publish("", queue, _message(b"token-1"))
        await tx.commit()
        await eventually(lambda: held[0] != [], timeout=10, what="the first consumer's token")
        await sessions[0].close()  # the leader dies holding the token
        await eventually(lambda: held[1] != [], timeout=10, what="the next consumer's token")
        assert held[1][0].message_id == "token-1"
        assert held[1][0].redelivered
        assert held[2] == []  # single active consumer: never two holders
    finally:
        for session in sessions:
            await session.close()


async def test_a_commit_publishes_and_acks_together_and_a_close_undoes_both(
    namespace: Namespace, token_queue: TokenQueue
) -> None:
    queue = await token_queue("state")
    out = await token_queue("out")
    session = await _session(namespace, "leader")
    got: list[Delivery] = []
    try:
        tx = await session.transactional(1)
        await tx.publish("", queue, _message(b"v1"))
        assert await queue_count(namespace.url, queue) == 0  # staged, not published
        await tx.commit()

        async def on_delivery(delivery: Delivery) -> None:
            got.append(delivery)

        await tx.consume(queue, on_delivery)
        await eventually(lambda: len(got) == 1, timeout=10, what="v1")
        # one step: a tick out, the next state in, the old state acked
        await tx.publish("", out, _message(b"tick-1"))
        await tx.publish("", queue, _message(b"v2"))
        await got[0].ack()
        await asyncio.sleep(0)  # let anything that is not staged go out
        assert await queue_count(namespace.url, out) == 0
        await tx.commit()
        await eventually(lambda: len(got) == 2, timeout=10, what="v2")
        assert got[1].message_id == "v2"
        assert await queue_count(namespace.url, out) == 1
        # a step cut short: nothing of it happens, and v2 goes back to its queue
        await tx.publish("", out, _message(b"tick-2"))
        await tx.publish("", queue, _message(b"v3"))
        await got[1].ack()
        await session.close()
    finally:
        await session.close()
    assert await queue_count(namespace.url, out) == 1
    assert await count_once_settled(namespace.url, queue, 1) == 1  # v2, back; no v3
