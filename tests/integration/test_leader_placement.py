"""Quorum queues spread their leaders over a cluster; queues declared before keep working."""

import pytest
from pydantic import BaseModel

from amqp_jobs import Job
from amqp_jobs.testing import Namespace
from amqp_jobs.topology import LEADER_LOCATOR, work_queue, work_queue_arguments
from tests.support import channel, queue_count

#: quorum queue leaders of RabbitMQ
pytestmark = pytest.mark.rabbitmq_only


class N(BaseModel):
    n: int


async def test_a_queue_declared_before_leader_placement_still_takes_jobs(
    namespace: Namespace,
) -> None:
    """The broker refuses to redeclare a queue with a new argument; the declarer falls back
    to the queue's old arguments instead of failing every publish after an upgrade."""
    job = Job("t.legacy", N, queue="legacy")
    namespace.track(job)
    old = {
        k: v
        for k, v in work_queue_arguments(namespace.name, "legacy", namespace.settings).items()
        if k not in LEADER_LOCATOR
    }
    async with channel(namespace.url) as ch:
        await ch.declare_queue(work_queue(namespace.name, "legacy"), durable=True, arguments=old)
    async with namespace.client() as client:
        await client.enqueue(job, {"n": 1})
        await client.enqueue(job, {"n": 2}, delay=30)  # declares the cascade too
    assert await queue_count(namespace.url, work_queue(namespace.name, "legacy")) == 1
