"""A broker restarts (``rabbitmqctl stop_app`` / ``start_app``) under load and with jobs
parked in the cascade: on a private node, never the shared broker at $AMQP_URL.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from amqp_jobs import AmqpJobsError
from amqp_jobs.testing import Namespace
from tests.reliability import rel_app
from tests.reliability.harness import Harness
from tests.reliability.nodes import PrivateNode
from tests.reliability.test_faults import CONCURRENCY, finish, start

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def node(private_broker: PrivateNode) -> PrivateNode:
    return private_broker


@pytest.fixture
def harness(ns: Namespace, tmp_path: Path) -> Harness:
    return Harness(ns, tmp_path / "events.log")


async def restart_broker(node: PrivateNode, down_for: float = 2.0) -> None:
    """stop_app, stay down a while, start_app; returns once the broker accepts work."""
    loop = asyncio.get_running_loop()
    try:
        await loop.run_in_executor(None, node.ctl, "stop_app")
        await asyncio.sleep(down_for)  # the outage being injected
    finally:
        await loop.run_in_executor(None, node.ctl, "start_app")
        await loop.run_in_executor(None, node.ctl, "await_startup")


async def test_broker_restart_while_publishing_and_consuming(
    harness: Harness, private_broker: PrivateNode
) -> None:
    await harness.publish(rel_app.work, [{"n": -1}])  # declare before the worker starts
    worker = start(harness)
    refused: list[str] = []
    try:
        async with harness.namespace.client(settings=rel_app.settings, retry_for=60) as client:

            async def publisher() -> None:
                for i in range(200):
                    try:
                        job_id = await client.enqueue(
                            rel_app.work, {"n": i, "fail_first": i % 4 == 0, "seconds": 0.01}
                        )
                    except AmqpJobsError as exc:  # a typed error, never a silent loss
                        refused.append(type(exc).__name__)
                        continue
                    harness.confirmed[job_id] = None
                    await asyncio.sleep(0.01)

            publishing = asyncio.create_task(publisher())
            await asyncio.sleep(0.5)  # restart while the publisher and the worker are busy
            await restart_broker(private_broker)
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
        await restart_broker(private_broker, down_for=1.0)
        await harness.wait_all(timeout=90)
    finally:
        await finish(worker)
    report = await harness.report(
        f"delays and retries parked across a restart ({time.time() - began:.0f}s)"
    )
    assert report.lost == 0
    assert report.early == 0, "late is allowed, early never"
