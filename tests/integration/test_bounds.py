"""Every publishing call returns or raises within its bound, whatever the broker does.

A "broker" that accepts connections and never answers is the worst case: before the fix,
concurrent enqueues queued behind one connect attempt on the link's lock, with no
deadline of their own, and waited far past ``retry_for``.
"""

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from pydantic import BaseModel

from amqp_jobs import AmqpJobsError, Job, JobClient

#: fake AMQP servers that never answer
pytestmark = pytest.mark.rabbitmq_only

RETRY_FOR = 2.0
SLACK = 1.5


class N(BaseModel):
    n: int


@pytest.fixture
async def silent_broker() -> AsyncIterator[str]:
    """A TCP server that accepts and never says a word."""
    held: list[asyncio.StreamWriter] = []

    async def accept(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"amqp://guest:guest@127.0.0.1:{port}/"
    for writer in held:
        writer.close()
    server.close()


async def test_concurrent_enqueues_each_end_within_retry_for(silent_broker: str) -> None:
    job = Job("t.bounded", N, queue="b")
    client = JobClient(silent_broker, namespace="bounds", retry_for=RETRY_FOR, confirm_timeout=1)
    began = time.monotonic()
    results = await asyncio.gather(
        *(client.enqueue(job, {"n": i}) for i in range(10)), return_exceptions=True
    )
    took = time.monotonic() - began
    await client.close()
    assert all(isinstance(r, AmqpJobsError) for r in results), results
    assert took < RETRY_FOR + SLACK, f"10 concurrent enqueues took {took:.1f}s"


async def test_a_dead_node_in_the_list_costs_one_refused_attempt(silent_broker: str) -> None:
    """Several URLs: the silent one is skipped once it fails; a refused port at once."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]  # nothing listens here once the socket closes
    job = Job("t.bounded", N, queue="b")
    client = JobClient(
        [f"amqp://guest:guest@127.0.0.1:{closed}/", silent_broker],
        namespace="bounds",
        retry_for=RETRY_FOR,
        confirm_timeout=1,
    )
    began = time.monotonic()
    with pytest.raises(AmqpJobsError):
        await client.enqueue(job, {"n": 1})
    assert time.monotonic() - began < RETRY_FOR + SLACK
    await client.close()
