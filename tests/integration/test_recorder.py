"""The recorder: the job log equals what the jobs did; one recorder leads, another takes
over from where it stopped; a client asks the log for jobs it did not enqueue."""

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from pydantic import BaseModel

from amqp_jobs import Job, JobContext, RetryPolicy
from amqp_jobs.cli import _together, main
from amqp_jobs.errors import AmqpJobsError, JobFailedError, UnknownJobError
from amqp_jobs.joblog import JobLog
from amqp_jobs.joblog.recorder import Recorder
from amqp_jobs.testing import Namespace, run_until_idle

WAIT = 20.0


class Order(BaseModel):
    user_id: int
    amount: int


class Receipt(BaseModel):
    charged: int


@asynccontextmanager
async def recording(recorder: Recorder) -> AsyncIterator[Recorder]:
    task = asyncio.create_task(recorder.run())
    try:
        yield recorder
    finally:
        recorder.stop()
        async with asyncio.timeout(WAIT):
            await task


def charge_app(namespace: Namespace) -> tuple[object, Job[Order]]:
    app = namespace.app()
    job = Job(
        "t.rec.charge",
        Order,
        queue="rec",
        key="user_id",
        result_model=Receipt,
        retry=RetryPolicy(2, backoff=0),
    )

    @app.handler(job)
    async def charge(args: Order, ctx: JobContext) -> Receipt:
        if args.amount < 0:
            raise ValueError(f"refund of {-args.amount} on attempt {ctx.attempt}")
        return Receipt(charged=args.amount)

    return app, job


async def test_the_log_holds_every_job_with_its_attempts(
    namespace: Namespace, tmp_path: Path
) -> None:
    store = f"sqlite:///{tmp_path / 'log.db'}"
    app, job = charge_app(namespace)
    async with namespace.client() as client:
        ok = [await client.enqueue(job, {"user_id": 1042, "amount": i}) for i in range(1, 4)]
        other = await client.enqueue(job, {"user_id": 7, "amount": 5})
        bad = await client.enqueue(job, {"user_id": 1042, "amount": -3})
    await run_until_idle(namespace.worker(app, events=True, started_after=0))  # type: ignore[arg-type]
    # 5 jobs: started + succeeded each, and the bad one retried once: 12 events
    async with recording(Recorder(store, namespace=namespace.name, url=namespace.url)) as rec:
        async with asyncio.timeout(WAIT):
            await rec.applied(12)
    assert rec.stats.leads == 1 and rec.stats.skipped == 0

    async with JobLog(store, namespace.name) as joblog:
        mine = await joblog.list(key="1042")
        assert {r.job_id for r in mine} == {*ok, bad}
        assert all(r.key == "1042" for r in mine)
        assert [r.job_id for r in await joblog.list(key="7")] == [other]
        done = await joblog.get(ok[1])
        assert done is not None and done.state == "succeeded" and done.result == {"charged": 2}
        assert done.job == "t.rec.charge" and done.queue == "rec" and done.attempt == 1
        assert [a.state for a in done.attempts] == ["succeeded"]
        dead = await joblog.get(bad)
        assert dead is not None and dead.state == "dead" and dead.dead_reason == "exhausted"
        assert dead.error_type == "ValueError" and dead.error_message == "refund of 3 on attempt 2"
        assert dead.traceback and "refund of 3" in dead.traceback
        assert [(a.attempt, a.state) for a in dead.attempts] == [(1, "retrying"), (2, "dead")]
        assert {r.job_id for r in await joblog.list(state="dead")} == {bad}
        assert await joblog.get("no-such-job") is None

    # a client that did not enqueue them asks the log
    async with namespace.client(store=store) as client:
        assert await client.result(ok[2], timeout=WAIT, job=job) == Receipt(charged=3)
        with pytest.raises(JobFailedError, match="refund of 3"):
            await client.result(bad, timeout=WAIT)
        with pytest.raises(UnknownJobError, match="unknown to the job log"):
            await client.result("no-such-job", timeout=WAIT)


async def test_one_recorder_leads_and_the_next_goes_on_from_its_position(
    namespace: Namespace, tmp_path: Path
) -> None:
    store = f"sqlite:///{tmp_path / 'log.db'}"
    app, job = charge_app(namespace)
    first = Recorder(store, namespace=namespace.name, url=namespace.url, poll=0.05)
    second = Recorder(store, namespace=namespace.name, url=namespace.url, poll=0.05)
    async with recording(first):
        async with asyncio.timeout(WAIT):
            await first.leading.wait()
        async with recording(second):
            async with namespace.client() as client:
                ids = [await client.enqueue(job, {"user_id": i, "amount": i}) for i in range(10)]
            await run_until_idle(namespace.worker(app, events=True, started_after=0))  # type: ignore[arg-type]
            async with asyncio.timeout(WAIT):
                await first.applied(20)
            assert not second.leading.is_set()
            first.stop()
            async with asyncio.timeout(WAIT):
                await second.leading.wait()
            async with namespace.client() as client:
                more = [await client.enqueue(job, {"user_id": 99, "amount": i}) for i in range(5)]
            await run_until_idle(namespace.worker(app, events=True, started_after=0))  # type: ignore[arg-type]
            async with asyncio.timeout(WAIT):
                await second.applied(10)
    # the second read on from where the first stopped: nothing again, nothing missed
    assert second.stats.applied == 10 and first.stats.applied == 20
    async with JobLog(store, namespace.name) as joblog:
        rows = await joblog.list(limit=100)
    assert sorted(r.job_id for r in rows) == sorted(ids + more)
    assert {r.state for r in rows} == {"succeeded"}


def test_the_jobs_commands_read_the_log(
    namespace: Namespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = f"sqlite:///{tmp_path / 'log.db'}"
    app, job = charge_app(namespace)

    async def record() -> tuple[str, str]:
        async with namespace.client() as client:
            ok = await client.enqueue(job, {"user_id": 1042, "amount": 9})
            bad = await client.enqueue(job, {"user_id": 5, "amount": -1})
        await run_until_idle(namespace.worker(app, events=True, started_after=0))  # type: ignore[arg-type]
        async with recording(Recorder(store, namespace=namespace.name, url=namespace.url)) as r:
            async with asyncio.timeout(WAIT):
                await r.applied(6)
        return ok, bad

    ok, bad = asyncio.run(record())
    common = ["--store", store, "--namespace", namespace.name]
    assert main(["jobs", "list", *common, "--key", "1042", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(r["job_id"], r["state"], r["result"]) for r in listed] == [
        (ok, "succeeded", {"charged": 9})
    ]
    assert main(["jobs", "list", *common, "--state", "dead"]) == 0
    out = capsys.readouterr().out
    assert bad in out and ok not in out and "1 job" in out
    assert main(["jobs", "show", *common, bad]) == 0
    out = capsys.readouterr().out
    assert "dead reason  exhausted" in out and "refund of 1 on attempt 2" in out
    assert "traceback:" in out and "attempts:" in out
    assert main(["jobs", "show", *common, "no-such-job"]) == 1
    err = capsys.readouterr().err
    assert "job no-such-job is unknown" in err and "pending" not in err
    missing = f"sqlite:///{tmp_path / 'nothing-here.db'}"
    assert main(["jobs", "list", "--store", missing, "--namespace", namespace.name]) == 2
    assert "no job log at" in capsys.readouterr().err


async def test_a_queued_job_is_in_the_log_before_it_runs(
    namespace: Namespace, tmp_path: Path
) -> None:
    store = f"sqlite:///{tmp_path / 'log.db'}"
    app, job = charge_app(namespace)
    recorder = Recorder(store, namespace=namespace.name, url=namespace.url)
    async with recording(recorder) as rec, namespace.client(events=True, store=store) as client:
        now = await client.enqueue(job, {"user_id": 3, "amount": 4})
        later = await client.enqueue(job, {"user_id": 3, "amount": 5}, delay=3600)
        async with asyncio.timeout(WAIT):
            await rec.applied(2)
        async with JobLog(store, namespace.name) as joblog:
            queued = await joblog.get(now)
            scheduled = await joblog.get(later)
        assert queued is not None and queued.state == "enqueued" and queued.key == "3"
        assert scheduled is not None and scheduled.state == "scheduled"
        assert scheduled.eta is not None
        # known and queued: the log says so, and waiting for it times out
        with pytest.raises(TimeoutError):
            await client.result(now, timeout=0.3)
        worker = namespace.worker(app, events=True, started_after=0)  # type: ignore[arg-type]
        running = asyncio.create_task(worker.run())
        try:
            assert await client.result(now, timeout=WAIT) == {"charged": 4}
        finally:
            worker.stop()
            async with asyncio.timeout(WAIT):
                await running


async def test_a_worker_whose_recorder_fails_stops_and_says_why(
    namespace: Namespace, caplog: pytest.LogCaptureFixture
) -> None:
    """``worker --store``: a recorder that fails for good (its lock refused, say) stops
    the worker at once, logged as the recorder's failure, not at the worker's next stop."""

    class Refused:
        async def run(self) -> None:
            raise AmqpJobsError("the broker refused claiming the recorder's lock")

        def stop(self) -> None:
            pass

    app, _ = charge_app(namespace)
    worker = namespace.worker(app, events=True, started_after=0)  # type: ignore[arg-type]
    with caplog.at_level(logging.ERROR, "amqp_jobs.cli"), pytest.raises(AmqpJobsError):
        async with asyncio.timeout(WAIT):
            await _together(worker, Refused())
    assert "the job log's recorder failed" in caplog.text, caplog.text
