"""Connection loss: workers reconnect and resume; publishers retry, then raise."""

import asyncio
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import pytest
from pydantic import BaseModel

from amqp_jobs import BrokerUnavailableError, Job
from amqp_jobs.testing import Namespace, run_until_idle
from amqp_jobs.topology import work_queue
from tests.support import eventually, queue_count

from .proxy import Proxy

#: a TCP proxy cuts real connections
pytestmark = pytest.mark.rabbitmq_only


class N(BaseModel):
    n: int


job = Job("t.conn", N, queue="c")


@pytest.fixture
async def proxy(amqp_url: str) -> AsyncIterator[Proxy]:
    parts = urlsplit(amqp_url)
    p = Proxy(parts.hostname or "127.0.0.1", parts.port or 5672)
    await p.start()
    yield p
    await p.close()


def via(url: str, proxy: Proxy) -> str:
    parts = urlsplit(url)
    netloc = f"{parts.username}:{parts.password}@127.0.0.1:{proxy.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


async def test_worker_reconnects_and_resumes(namespace: Namespace, proxy: Proxy) -> None:
    app = namespace.app()
    ran: list[int] = []
    app.add_handler(job, lambda args: ran.append(args.n))
    worker = app.worker(via(namespace.url, proxy), grace=5)
    task = asyncio.create_task(worker.run())
    try:
        async with namespace.client() as client:
            await client.enqueue(job, {"n": 1})
            await eventually(lambda: ran == [1], what="the first job")
            proxy.cut()
            await client.enqueue(job, {"n": 2})
            await eventually(lambda: ran == [1, 2], what="the job after reconnecting")
        assert worker.stats.connections >= 2
    finally:
        worker.stop()
        await asyncio.wait_for(task, 15)


async def test_publisher_rides_out_a_short_outage(namespace: Namespace, proxy: Proxy) -> None:
    async with namespace.client() as direct:
        await direct.enqueue(job, {"n": 0})  # declare
    client = namespace.client(via(namespace.url, proxy), retry_for=20)
    async with client:
        await client.enqueue(job, {"n": 1})
        await proxy.stop_listening()
        proxy.cut()
        publish = asyncio.create_task(client.enqueue(job, {"n": 2}))
        await asyncio.sleep(0.5)  # the outage being simulated, not a synchronisation
        assert not publish.done()
        await proxy.start()
        await asyncio.wait_for(publish, 20)
    assert await queue_count(namespace.url, work_queue(namespace.name, "c")) == 3


async def test_publisher_gives_up_after_its_bound(namespace: Namespace, proxy: Proxy) -> None:
    client = namespace.client(via(namespace.url, proxy), retry_for=1.0)
    async with client:
        await client.enqueue(job, {"n": 1})
        await proxy.stop_listening()
        proxy.cut()
        loop = asyncio.get_running_loop()
        began = loop.time()
        with pytest.raises(BrokerUnavailableError, match=r"\*\*\*"):
            await client.enqueue(job, {"n": 2})
        assert loop.time() - began < 10


async def test_worker_gives_up_on_first_connect_with_a_clear_error(
    namespace: Namespace, proxy: Proxy
) -> None:
    await proxy.stop_listening()
    app = namespace.app()
    app.add_handler(job, lambda args: None)
    worker = app.worker(via(namespace.url, proxy), connect_timeout=0.5)
    with pytest.raises(BrokerUnavailableError, match="cannot reach the broker"):
        await asyncio.wait_for(run_until_idle(worker), 15)


async def test_missing_confirm_raises_publish_timeout(namespace: Namespace, proxy: Proxy) -> None:
    """The broker stops answering: the publish gives up after confirm_timeout, typed."""
    from amqp_jobs import PublishTimeoutError

    client = namespace.client(via(namespace.url, proxy), retry_for=0, confirm_timeout=1.0)
    async with client:
        await client.enqueue(job, {"n": 1})
        proxy.flowing.clear()
        loop = asyncio.get_running_loop()
        began = loop.time()
        with pytest.raises(PublishTimeoutError, match="may or may not be stored"):
            await client.enqueue(job, {"n": 2})
        assert 1.0 <= loop.time() - began < 5
        proxy.flowing.set()
