"""The worker's log: one line per finished attempt, and a stop that ends the process
the way Python normally ends (atexit hooks run), unless a handler's thread outlives it."""

from __future__ import annotations

import logging
import re
import signal
from pathlib import Path

import pytest
from pydantic import BaseModel

from amqp_jobs import Job, JobContext, RetryPolicy
from amqp_jobs.testing import Namespace, run_until_idle
from amqp_jobs.topology import dead_queue
from tests.support import WorkerProcess, eventually, queue_count

from . import exit_app


class N(BaseModel):
    n: int


def job_lines(caplog: pytest.LogCaptureFixture, job_id: str) -> list[tuple[int, str]]:
    return [
        (r.levelno, r.getMessage())
        for r in caplog.records
        if r.name.startswith("amqp_jobs") and job_id in r.getMessage()
    ]


@pytest.mark.parametrize("log_success", [True, False])
async def test_one_line_per_attempt(
    namespace: Namespace, caplog: pytest.LogCaptureFixture, log_success: bool
) -> None:
    caplog.set_level(logging.INFO, logger="amqp_jobs")
    app = namespace.app()
    ok = Job("t.ok", N, queue="log")
    flaky = Job("t.flaky", N, queue="log", retry=RetryPolicy(max_attempts=3, backoff=0))
    bad = Job("t.bad", N, queue="log", retry=RetryPolicy(max_attempts=2, backoff=0))
    failed_once: set[str] = set()

    @app.handler(ok)
    async def run_ok(args: N) -> None:
        pass

    @app.handler(flaky)
    def run_flaky(args: N, ctx: JobContext) -> None:
        if ctx.job_id not in failed_once:
            failed_once.add(ctx.job_id)
            raise ConnectionError("try again")

    @app.handler(bad)
    async def run_bad(args: N) -> None:
        raise ValueError("never")

    async with namespace.client() as client:
        ok_id = await client.enqueue(ok, {"n": 1})
        flaky_id = await client.enqueue(flaky, {"n": 2})
        bad_id = await client.enqueue(bad, {"n": 3})
    stats = await run_until_idle(namespace.worker(app, log_success=log_success))
    assert (stats.succeeded, stats.retried, stats.dead) == (2, 2, 1)

    def succeeded(name: str, job_id: str, attempt: int) -> list[tuple[int, str]]:
        if not log_success:
            return []
        return [(logging.INFO, f"job {name} {job_id} succeeded in <ms>, attempt {attempt}")]

    def shape(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
        return [
            (level, re.sub(r"(in|after) [0-9.]+ m?s\b", r"\1 <ms>", text)) for level, text in lines
        ]

    assert shape(job_lines(caplog, ok_id)) == succeeded("t.ok", ok_id, 1)
    assert shape(job_lines(caplog, flaky_id)) == [
        (
            logging.INFO,
            f"job t.flaky {flaky_id} failed in <ms>, attempt 1 (ConnectionError);"
            " retrying in 0.00s",
        ),
        *succeeded("t.flaky", flaky_id, 2),
    ]
    assert shape(job_lines(caplog, bad_id)) == [
        (logging.INFO, f"job t.bad {bad_id} failed in <ms>, attempt 1 (ValueError); retrying in 0.00s"),
        (logging.WARNING, f"job t.bad {bad_id} is dead (exhausted) after <ms>, attempt 2: ValueError: never"),
    ]  # fmt: skip


# -- a worker process ---------------------------------------------------------------

#: worker processes and signals
process = pytest.mark.rabbitmq_only


@process
@pytest.mark.parametrize("log_success", [True, False])
async def test_a_stop_after_sync_jobs_is_a_normal_exit(
    namespace: Namespace, tmp_path: Path, log_success: bool
) -> None:
    """Idle pool threads are not handlers: no warning, and the app's atexit hooks run."""
    namespace.track("naps")
    mark = tmp_path / "atexit.mark"
    async with namespace.client() as client:
        ids = [await client.enqueue(exit_app.nap, {"seconds": 0.05}) for _ in range(4)]
    done = tmp_path / "jobs.log"
    worker = WorkerProcess(
        namespace,
        done,
        "--concurrency", "4",
        *([] if log_success else ["--no-success-log"]),
        app="tests.integration.exit_app:app",
        env={"EXIT_APP_MARK": str(mark)},
    )  # fmt: skip
    try:
        await eventually(
            lambda: done.exists() and len(done.read_text().splitlines()) == 4, what="4 jobs done"
        )
        worker.signal(signal.SIGTERM)
        assert await worker.wait(20) == 0, worker.output()
    finally:
        worker.stop_now()
    output = worker.output()
    assert "still running" not in output and "WARNING" not in output, output
    assert mark.read_text() == "atexit ran\n", "the app's atexit hook ran"
    for job_id in ids:
        assert (f"job exit.nap {job_id} succeeded in " in output) is log_success, output


@process
async def test_a_handler_thread_past_its_timeout_does_not_hold_the_exit(
    namespace: Namespace, tmp_path: Path
) -> None:
    """Its thread cannot be stopped: the process says so and exits at once (0), after
    running the atexit hooks, instead of waiting 60 s for it."""
    namespace.track("naps")
    mark = tmp_path / "atexit.mark"
    async with namespace.client() as client:
        job_id = await client.enqueue(exit_app.nap, {"seconds": 60})
    worker = WorkerProcess(
        namespace,
        tmp_path / "jobs.log",
        app="tests.integration.exit_app:app",
        env={"EXIT_APP_MARK": str(mark)},
    )
    try:
        # timed out after 1 s, one attempt allowed: dead, while its thread sleeps on
        await eventually(
            lambda: _equals(queue_count(namespace.url, dead_queue(namespace.name, "naps")), 1),
            what="the job dead after its timeout",
        )
        worker.signal(signal.SIGTERM)
        assert await worker.wait(15) == 0, worker.output()
    finally:
        worker.stop_now()
    output = worker.output()
    assert (
        f"1 handler thread still running (exit.nap {job_id}); exiting without waiting for it"
        in output
    )
    assert f"job exit.nap {job_id} is dead (exhausted)" in output
    assert mark.read_text() == "atexit ran\n"


async def _equals(value, expected: int) -> bool:  # type: ignore[no-untyped-def]
    return (await value) == expected
