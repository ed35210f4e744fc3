"""A real worker process: SIGTERM, a second signal, kill -9, and a job that kills it."""

import signal
from pathlib import Path

import pytest

from amqp_jobs import ops
from amqp_jobs.testing import Namespace
from amqp_jobs.topology import TopologySettings, dead_queue, quarantine_queue, work_queue
from amqp_jobs.transport import transport_for
from amqp_jobs.worker import SUSPECT_AFTER
from tests.support import (
    WorkerProcess,
    count_once_settled,
    drain,
    eventually,
    exit_or_parked,
    queue_count,
    read_log,
)

from . import sample_app

#: worker processes and signals
pytestmark = pytest.mark.rabbitmq_only


def events(log: Path, kind: str) -> list[int]:
    return [e["n"] for e in read_log(log) if e["event"] == kind]


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "jobs.log"


async def publish(namespace: Namespace, *seconds: float, job=sample_app.sleepy) -> None:  # type: ignore[no-untyped-def]
    async with namespace.client(settings=sample_app.settings) as client:
        for n, s in enumerate(seconds):
            await client.enqueue(job, {"n": n, "seconds": s})


async def test_sigterm_finishes_in_flight_jobs_and_leaves_the_rest(
    namespace: Namespace, log_path: Path
) -> None:
    namespace.track("work")
    await publish(namespace, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
    worker = WorkerProcess(namespace, log_path, "--concurrency", "2", "--grace", "20")
    try:
        await eventually(lambda: len(events(log_path, "start")) == 2, what="2 jobs started")
        worker.signal(signal.SIGTERM)
        assert await worker.wait(30) == 0, worker.output()
    finally:
        worker.stop_now()
    started, ended = events(log_path, "start"), events(log_path, "end")
    assert sorted(ended) == sorted(started), "every job that started finished"
    assert len(started) == 2
    assert await count_once_settled(namespace.url, work_queue(namespace.name, "work"), 4) == 4


async def test_grace_expiry_returns_unfinished_jobs(namespace: Namespace, log_path: Path) -> None:
    namespace.track("work")
    await publish(namespace, 60.0)
    worker = WorkerProcess(namespace, log_path, "--grace", "0.5")
    try:
        await eventually(lambda: events(log_path, "start") == [0], what="the job started")
        worker.signal(signal.SIGTERM)
        assert await worker.wait(15) == 0, worker.output()
    finally:
        worker.stop_now()
    assert events(log_path, "end") == []
    await eventually(
        lambda: queue_count(namespace.url, work_queue(namespace.name, "work")),
        what="the unfinished job back in the queue",
    )


async def test_second_signal_exits_at_once(namespace: Namespace, log_path: Path) -> None:
    namespace.track("work")
    await publish(namespace, 60.0)
    worker = WorkerProcess(namespace, log_path, "--grace", "60")
    try:
        await eventually(lambda: events(log_path, "start") == [0], what="the job started")
        worker.signal(signal.SIGTERM)
        worker.signal(signal.SIGINT)
        assert await worker.wait(10) != 0
    finally:
        worker.stop_now()
    await eventually(
        lambda: queue_count(namespace.url, work_queue(namespace.name, "work")),
        what="the job back in the queue",
    )


async def test_kill_9_loses_nothing(namespace: Namespace, log_path: Path) -> None:
    namespace.track("work")
    await publish(namespace, 30.0, 30.0, 30.0, 0.0)
    first = WorkerProcess(namespace, log_path, "--concurrency", "3")
    try:
        await eventually(lambda: len(events(log_path, "start")) == 3, what="3 jobs running")
        first.kill()
        await first.wait(10)
    finally:
        first.stop_now()
    assert events(log_path, "end") == []
    # the three unacked deliveries come back; the fourth never left
    await eventually(
        lambda: _equals(queue_count(namespace.url, work_queue(namespace.name, "work")), 4),
        what="all 4 jobs back in the queue",
    )
    second = WorkerProcess(namespace, log_path, "--concurrency", "4", env={"SAMPLE_FAST": "1"})
    try:
        await eventually(lambda: len(events(log_path, "end")) == 4, what="all 4 jobs done")
        second.signal(signal.SIGTERM)
        assert await second.wait(15) == 0
    finally:
        second.stop_now()
    log = read_log(log_path)
    killed = {e["id"] for e in log[:3]}
    done = {e["id"] for e in log if e["event"] == "end"}
    assert len(done) == 4
    assert killed <= done, "the jobs in flight at kill -9 ran again, same ids"


async def _equals(value, expected: int) -> bool:  # type: ignore[no-untyped-def]
    return (await value) == expected


async def test_a_job_that_kills_its_worker_is_dead_lettered_by_the_delivery_limit(
    namespace: Namespace, log_path: Path
) -> None:
    namespace.track("work")
    limit = 2
    namespace.settings = TopologySettings(delivery_limit=limit)
    env = {"SAMPLE_DELIVERY_LIMIT": str(limit)}
    async with namespace.client(settings=namespace.settings) as client:
        await client.enqueue(sample_app.crash, {"n": 99})
    dead = dead_queue(namespace.name, "work")
    for _ in range(2 * limit + 3):
        worker = WorkerProcess(namespace, log_path, env=env)
        try:
            status = await exit_or_parked(worker, namespace.url, dead)
        finally:
            worker.stop_now()
        if status is None:
            break
        assert status == 3, "the crash job kills the process"
    assert await count_once_settled(namespace.url, dead, 1) == 1
    transport = transport_for(namespace.url)
    async with ops.Broker(transport, namespace.name, namespace.settings) as broker:
        [listed] = await ops.list_dead(broker, "work")
    assert listed.reason == "delivery-limit", "the operator sees why the broker parked it"
    assert listed.job_name == "sample.crash"
    [msg] = await drain(namespace.url, dead, 1)
    assert msg.type == "sample.crash"
    assert msg.headers["x-death"][0]["reason"] == "delivery_limit"
    # twice in the work queue, then limit + 1 times alone from the quarantine queue
    assert msg.headers["x-death"][0]["queue"] == quarantine_queue(namespace.name, "work")
    assert len(events(log_path, "start")) == SUSPECT_AFTER + limit + 1
    # the worker serves other jobs again
    async with namespace.client(settings=namespace.settings) as client:
        await client.enqueue(sample_app.sleepy, {"n": 7, "seconds": 0})
    worker = WorkerProcess(namespace, log_path, env=env)
    try:
        await eventually(lambda: events(log_path, "end") == [7], what="a good job after the poison")
        worker.signal(signal.SIGTERM)
        assert await worker.wait(15) == 0
    finally:
        worker.stop_now()


async def test_a_worker_with_a_store_keeps_the_job_log_itself(
    namespace: Namespace, log_path: Path, tmp_path: Path
) -> None:
    from amqp_jobs.joblog import JobLog

    namespace.track("work")
    store = f"sqlite:///{tmp_path / 'log.db'}"
    await publish(namespace, 0.0, 0.0, 0.0)
    worker = WorkerProcess(namespace, log_path, "--store", store)
    try:
        await eventually(lambda: len(events(log_path, "end")) == 3, what="3 jobs ran")

        async def recorded() -> bool:
            async with JobLog(store, namespace.name) as joblog:
                rows = await joblog.list(state="succeeded")
            return len(rows) == 3

        # --store implies --events, and its recorder leads (the only one)
        await eventually(recorded, what="the worker's own recorder to record 3 jobs")
        worker.signal(signal.SIGTERM)
        assert await worker.wait(30) == 0, worker.output()
    finally:
        worker.stop_now()
    assert "recorder leads" in worker.output()
