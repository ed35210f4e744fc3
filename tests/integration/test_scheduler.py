"""Periodic jobs: one scheduler leads per namespace, every tick is enqueued once, a
takeover loses none, and a leader runs schedules its own code does not define. On
RabbitMQ and memory:// alike."""

import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import BaseModel

from amqp_jobs import Job, JobApp, JobContext
from amqp_jobs.cli import main
from amqp_jobs.errors import ArgsValidationError, ContractError
from amqp_jobs.scheduler import Scheduler
from amqp_jobs.schedules import Schedule
from amqp_jobs.testing import Namespace
from amqp_jobs.transport import transport_for
from tests.support import eventually


class Tick(BaseModel):
    n: int


TICK = Job("t.tick", Tick, queue="ticks")


class Ledger:
    """The tick jobs that ran, by job id (a worker of the namespace runs them)."""

    def __init__(self) -> None:
        self.runs: dict[str, int] = {}

    def ticks(self) -> list[datetime]:
        return sorted(datetime.fromisoformat(i.split("@", 1)[1]) for i in self.runs)

    def assert_each_once_and_consecutive(self, step: timedelta) -> None:
        assert all(n == 1 for n in self.runs.values()), {
            i: n for i, n in self.runs.items() if n > 1
        }
        ticks = self.ticks()
        gaps = [b - a for a, b in itertools.pairwise(ticks)]
        assert all(g == step for g in gaps), ticks


@asynccontextmanager
async def tick_worker(ns: Namespace, ledger: Ledger) -> AsyncIterator[None]:
    app = ns.app()

    @app.handler(TICK)
    async def tick(args: Tick, ctx: JobContext) -> None:
        ledger.runs[ctx.job_id] = ledger.runs.get(ctx.job_id, 0) + 1

    worker = ns.worker(app)
    task = asyncio.create_task(worker.run())
    await asyncio.wait_for(worker.started(), 10)
    try:
        yield
    finally:
        worker.stop()
        await asyncio.wait_for(task, 20)


def every_second(ns: Namespace, catch_up: str = "all") -> list[Schedule]:
    app = JobApp(ns.name)
    app.schedule(TICK, {"n": 1}, every=1, catch_up=catch_up, name="each-second")
    return app.schedules


@asynccontextmanager
async def running(scheduler: Scheduler) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(scheduler.run())
    try:
        yield task
    finally:
        scheduler.stop()
        await asyncio.wait_for(task, 10)


async def test_one_leader_enqueues_each_tick_once(namespace: Namespace) -> None:
    namespace.track(TICK)
    ledger = Ledger()
    transport = transport_for(namespace.url)
    candidates = [
        Scheduler(transport, namespace.name, every_second(namespace), name=f"c{i}")
        for i in range(3)
    ]
    async with (
        tick_worker(namespace, ledger),
        running(candidates[0]),
        running(candidates[1]),
        running(candidates[2]),
    ):
        await eventually(lambda: len(ledger.runs) >= 4, timeout=15, what="4 ticks")
        leaders = [c.name for c in candidates if c.leading_since is not None]
        assert len(leaders) == 1, leaders
    ledger.assert_each_once_and_consecutive(timedelta(seconds=1))


async def test_a_takeover_misses_no_tick_and_repeats_none(namespace: Namespace) -> None:
    namespace.track(TICK)
    ledger = Ledger()
    transport = transport_for(namespace.url)
    first = Scheduler(transport, namespace.name, every_second(namespace), name="first")
    second = Scheduler(transport, namespace.name, every_second(namespace), name="second")
    async with tick_worker(namespace, ledger), running(first) as task:
        await eventually(lambda: first.leading_since is not None, timeout=15, what="lead")
        async with running(second):
            await eventually(lambda: len(ledger.runs) >= 2, timeout=15, what="2 ticks")
            assert first.leading_since is not None and second.leading_since is None
            first.stop()
            await asyncio.wait_for(task, 10)
            stopped_at = datetime.now(UTC)  # its connection closed: the 2 s count from here
            await eventually(lambda: second.leading_since is not None, timeout=5, what="takeover")
            assert second.leading_since is not None
            assert second.leading_since - stopped_at < timedelta(seconds=2)
            seen = len(ledger.runs)
            await eventually(lambda: len(ledger.runs) >= seen + 3, timeout=15, what="3 more")
            assert second.ticks_enqueued >= 3
    ledger.assert_each_once_and_consecutive(timedelta(seconds=1))


async def test_a_leader_runs_schedules_its_own_code_does_not_define(
    namespace: Namespace,
) -> None:
    """The peers' failure: a leader with an empty crontab silenced every schedule."""
    namespace.track(TICK)
    ledger = Ledger()
    transport = transport_for(namespace.url)
    bare = Scheduler(transport, namespace.name, [], name="no schedules")
    full = Scheduler(transport, namespace.name, every_second(namespace), name="with schedules")
    async with tick_worker(namespace, ledger), running(bare):
        await eventually(lambda: bare.leading_since is not None, timeout=10, what="bare leads")
        async with running(full):
            await eventually(lambda: len(ledger.runs) >= 3, timeout=15, what="3 ticks")
            assert bare.leading_since is not None and full.leading_since is None
            assert bare.ticks_enqueued >= 3
    ledger.assert_each_once_and_consecutive(timedelta(seconds=1))


async def test_a_worker_of_an_app_with_schedules_runs_them(namespace: Namespace) -> None:
    ledger = Ledger()
    app = namespace.app()
    app.schedule(TICK, {"n": 2}, every=timedelta(seconds=1), name="from-the-app")

    @app.handler(TICK)
    async def tick(args: Tick, ctx: JobContext) -> None:
        assert args.n == 2
        ledger.runs[ctx.job_id] = ledger.runs.get(ctx.job_id, 0) + 1

    worker = namespace.worker(app)
    task = asyncio.create_task(worker.run())
    try:
        await eventually(lambda: len(ledger.runs) >= 2, timeout=15, what="2 ticks")
        assert worker.scheduler is not None and worker.scheduler.leading_since is not None
        assert all(i.startswith("schedule:from-the-app@") for i in ledger.runs)
    finally:
        worker.stop()
        await asyncio.wait_for(task, 20)


def test_bad_schedules_fail_when_defined() -> None:
    app = JobApp("ns")
    with pytest.raises(ArgsValidationError, match="n: Input should be a valid integer"):
        app.schedule(TICK, {"n": "not a number"}, every=60)
    app.schedule(TICK, {"n": 1}, every=60)
    with pytest.raises(ContractError, match="already defined"):
        app.schedule(TICK, {"n": 1}, cron="* * * * *")
    with pytest.raises(ContractError, match="catch_up"):
        app.schedule(TICK, {"n": 1}, every=60, name="other", catch_up="sometimes")


def test_the_schedules_command_shows_ticks_and_the_leader(
    namespace: Namespace, capsys: pytest.CaptureFixture[str]
) -> None:
    where = ["--url", namespace.url, "--namespace", namespace.name]
    assert main(["schedules", *where]) == 0
    assert "no scheduler has run here yet" in capsys.readouterr().out

    async def lead() -> None:
        leader = Scheduler(
            transport_for(namespace.url), namespace.name, every_second(namespace), name="the one"
        )
        async with running(leader):
            await eventually(lambda: leader.ticks_enqueued >= 2, timeout=15, what="2 ticks")

    namespace.track(TICK)
    asyncio.run(lead())
    assert main(["schedules", *where]) == 0
    out = capsys.readouterr().out
    assert "led by the one since" in out
    row = next(line for line in out.splitlines() if line.startswith("each-second"))
    assert "t.tick" in row and "every 1s" in row and "all" in row
    assert main(["schedules", *where, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    (entry,) = data["schedules"]
    assert entry["last"] is not None and entry["next"] > entry["last"]
    assert data["leader"]["name"] == "the one"
