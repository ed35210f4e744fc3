"""A broker restarts (``rabbitmqctl stop_app`` / ``start_app``) under load and with jobs
parked in the cascade: on a private node, never the shared broker at $AMQP_URL.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path

import pytest

from amqp_jobs import AmqpJobsError
from amqp_jobs.testing import Namespace
from tests.reliability import rel_app
from tests.reliability.harness import Harness
from tests.reliability.nodes import PrivateNode, listening
from tests.reliability.test_faults import CONCURRENCY, finish, start
from tests.support import WorkerProcess, eventually

pytestmark = pytest.mark.timeout(180)

#: The publisher stops by itself even if the outage never ends.
MAX_PUBLISHED = 5000


@pytest.fixture
def node(private_broker: PrivateNode) -> PrivateNode:
    return private_broker


@pytest.fixture
def harness(ns: Namespace, tmp_path: Path) -> Harness:
    return Harness(ns, tmp_path / "events.log")


#: How long the worker, the node and the publisher each get to show the outage.
NOTICE_TIMEOUT = 30.0


def reconnects(worker: WorkerProcess) -> int:
    """How often the worker has logged that it lost the broker and is reconnecting."""
    try:
        return worker.output_path.read_text().count("reconnecting")
    except FileNotFoundError:
        return 0


async def connected(node: PrivateNode, worker: WorkerProcess) -> bool:
    """Whether the node lists a connection of the worker's (they are named after its PID)."""
    loop = asyncio.get_running_loop()
    listed = await loop.run_in_executor(
        None, partial(node.ctl, "list_connections", "client_properties", "--formatter", "json")
    )
    return f"amqp-jobs worker {worker.proc.pid}" in listed.stdout


async def restart_broker(
    node: PrivateNode,
    worker: WorkerProcess,
    *,
    also: Mapping[str, Callable[[], bool]] | None = None,
) -> None:
    """Once the worker is connected, stop_app; start_app once the node no longer listens,
    the worker has noticed the lost connection, and each of ``also`` (what to wait for: a
    check) holds while the node is down; returns once the broker accepts work again."""
    loop = asyncio.get_running_loop()
    await eventually(
        lambda: connected(node, worker),
        timeout=NOTICE_TIMEOUT,
        interval=0.5,
        what="the worker to connect",
    )
    before = reconnects(worker)
    waits = {
        "the node to stop listening": lambda: not listening(node.port),
        "the worker to notice the lost connection": lambda: reconnects(worker) > before,
        **(also or {}),
    }
    try:
        await loop.run_in_executor(None, node.ctl, "stop_app")
        for what, check in waits.items():
            await eventually(check, timeout=NOTICE_TIMEOUT, what=what)
    finally:
        await loop.run_in_executor(None, node.ctl, "start_app")
        await loop.run_in_executor(None, node.ctl, "await_startup")


async def test_broker_restart_while_publishing_and_consuming(
    harness: Harness, private_broker: PrivateNode
) -> None:
    await harness.publish(rel_app.work, [{"n": -1}])  # declare before the worker starts
    worker = start(harness)
    refused: list[str] = []
    in_flight = 0  # enqueues under way: once the node is down, they wait out the outage
    back = asyncio.Event()  # the broker accepts work again
    try:
        async with harness.namespace.client(settings=rel_app.settings, retry_for=60) as client:

            async def publisher() -> None:
                """Publish before, during and after the outage: until 50 after it."""
                nonlocal in_flight
                after = 0
                for i in range(MAX_PUBLISHED):
                    if back.is_set():
                        after += 1
                        if after > 50:
                            break
                    in_flight += 1
                    try:
                        job_id = await client.enqueue(
                            rel_app.work, {"n": i, "fail_first": i % 4 == 0, "seconds": 0.01}
                        )
                    except AmqpJobsError as exc:  # a typed error, never a silent loss
                        refused.append(type(exc).__name__)
                        continue
                    finally:
                        in_flight -= 1
                    harness.confirmed[job_id] = None
                    await asyncio.sleep(0.01)

            publishing = asyncio.create_task(publisher())
            # restart while the publisher and the worker are busy
            await eventually(
                lambda: len(harness.confirmed) > 20 and len(harness.succeeded_ids()) > 5,
                what="publishing and consuming under way",
            )
            await restart_broker(
                private_broker,
                worker,
                also={"a publish during the outage": lambda: in_flight > 0},
            )
            back.set()
            await asyncio.wait_for(publishing, 120)
        await harness.wait_all(timeout=90)
        assert worker.proc.poll() is None, "the worker reconnected without a restart"
    finally:
        await finish(worker)
    report = await harness.report(f"broker restart under load ({len(refused)} refused)")
    assert report.lost == 0
    assert report.early == 0
    assert report.duplicates <= 2 * CONCURRENCY


async def test_parked_delays_and_retries_survive_a_broker_restart(
    harness: Harness, private_broker: PrivateNode
) -> None:
    worker = start(harness)
    try:
        for i, delay in enumerate([2.0, 3.0, 4.0, 5.0, 6.0] * 6):
            await harness.publish(rel_app.work, [{"n": i}], delay=delay)
        await harness.publish(rel_app.work, [{"n": 100 + i, "fail_first": True} for i in range(30)])
        began = time.time()
        await restart_broker(private_broker, worker)
        await harness.wait_all(timeout=90)
    finally:
        await finish(worker)
    report = await harness.report(
        f"delays and retries parked across a restart ({time.time() - began:.0f}s)"
    )
    assert report.lost == 0
    assert report.early == 0, "late is allowed, early never"
