"""Middleware: wraps every attempt and publish, may change outcomes, hears every path."""

import logging
from typing import Any

import pytest
from pydantic import BaseModel

from amqp_jobs import (
    ContractError,
    Defer,
    Job,
    JobContext,
    JobHooks,
    Middleware,
    Outcome,
    OutcomeKind,
    PublishError,
    Publishing,
    RetryPolicy,
)
from amqp_jobs.message import Message, now_ms
from amqp_jobs.middleware import Next
from amqp_jobs.testing import Namespace, run_until_idle
from amqp_jobs.topology import dead_queue, high_queue, work_queue
from tests.support import declare, drain, put


class N(BaseModel):
    n: int


class Recorder(Middleware):
    """Records what it is told; outcomes keyed by job id."""

    def __init__(self) -> None:
        self.attempts: list[tuple[str, int]] = []
        self.outcomes: list[tuple[Outcome, bool]] = []

    async def attempt(self, ctx: JobContext, call_next: Next) -> Any:
        self.attempts.append((ctx.job_id, ctx.attempt))
        return await call_next()

    async def settled(self, outcome: Outcome, ctx: JobContext | None) -> None:
        self.outcomes.append((outcome, ctx is not None))

    def kinds(self) -> list[OutcomeKind]:
        return [o.kind for o, _ in self.outcomes]


async def test_results_retries_and_dead_letters_reach_the_middleware(
    namespace: Namespace,
) -> None:
    rec = Recorder()
    app = namespace.app(middleware=[rec])
    job = Job("t.mw", N, queue="mw", retry=RetryPolicy(max_attempts=2, backoff=0))

    @app.handler(job)
    async def run(args: N, ctx: JobContext) -> dict[str, int]:
        if args.n == 2:
            raise ValueError("never works")
        return {"double": args.n * 2}

    async with namespace.client() as client:
        ok = await client.enqueue(job, {"n": 21})
        bad = await client.enqueue(job, {"n": 2})
    await run_until_idle(namespace.worker(app))
    by_job: dict[str, list[Outcome]] = {}
    for outcome, had_ctx in rec.outcomes:
        assert had_ctx
        by_job.setdefault(outcome.job_id, []).append(outcome)
    [success] = by_job[ok]
    assert success.kind is OutcomeKind.SUCCEEDED
    assert success.result == {"double": 42}  # the handler's return value travels
    assert [o.kind for o in by_job[bad]] == [OutcomeKind.RETRYING, OutcomeKind.DEAD]
    assert by_job[bad][1].dead_reason == "exhausted"
    assert by_job[bad][1].error is not None and by_job[bad][1].error.type == "ValueError"
    assert sorted(rec.attempts) == sorted([(ok, 1), (bad, 1), (bad, 2)])


async def test_middleware_defers_a_job_without_counting_an_attempt(
    namespace: Namespace,
) -> None:
    class Busy(Middleware):
        """Turns the first two tries away, as a taken per-key lock would."""

        def __init__(self) -> None:
            self.refused = 0

        async def attempt(self, ctx: JobContext, call_next: Next) -> Any:
            if self.refused < 2:
                self.refused += 1
                raise Defer(0.2, reason="key busy")
            return await call_next()

    rec = Recorder()
    app = namespace.app(middleware=[rec, Busy()])
    job = Job("t.defer", N, queue="mw", retry=RetryPolicy(max_attempts=1))
    seen: list[int] = []

    @app.handler(job)
    async def run(args: N, ctx: JobContext) -> None:
        seen.append(ctx.attempt)

    async with namespace.client() as client:
        await client.enqueue(job, {"n": 1})
    stats = await run_until_idle(namespace.worker(app))
    # max_attempts=1: had the deferrals counted, the job would be dead before running
    assert seen == [1]
    assert rec.kinds() == [OutcomeKind.DEFERRED, OutcomeKind.DEFERRED, OutcomeKind.SUCCEEDED]
    assert rec.outcomes[0][0].retry_in == pytest.approx(0.2)
    assert (stats.deferred, stats.succeeded, stats.dead) == (2, 1, 0)


async def test_poison_and_redelays_reach_the_middleware_without_a_context(
    namespace: Namespace,
) -> None:
    rec = Recorder()
    told: list[Outcome] = []

    class Hooks(JobHooks):
        async def not_run(self, outcome: Outcome) -> None:
            told.append(outcome)

    app = namespace.app(middleware=[rec], hooks=[Hooks()])
    job = Job("t.poisoned", N, queue="mw")

    @app.handler(job)
    async def run(args: N) -> None:
        pass

    await declare(namespace, "mw", {job.name})
    bad = Message(b'{"n": "x"}', "application/json", "poison-1", job.name, None, {})
    # due in a moment, but put straight into the work queue: the worker sends it back
    # into the delay cascade (a re-delay), then runs it
    early = Message(
        b'{"n": 1}', "application/json", "early-1", job.name, None, {"job-eta": now_ms() + 400}
    )
    worker = namespace.worker(app)
    await put(namespace.url, work_queue(namespace.name, "mw"), bad)
    await put(namespace.url, work_queue(namespace.name, "mw"), early)
    await run_until_idle(worker)
    outcomes = {(o.job_id, o.kind): had_ctx for o, had_ctx in rec.outcomes}
    assert outcomes == {
        ("poison-1", OutcomeKind.DEAD): False,
        ("early-1", OutcomeKind.REDELAYED): False,
        ("early-1", OutcomeKind.SUCCEEDED): True,
    }
    [poison] = [o for o, _ in rec.outcomes if o.job_id == "poison-1"]
    assert poison.dead_reason == "invalid-args"
    assert sorted((o.job_id, o.kind) for o in told) == [
        ("early-1", OutcomeKind.REDELAYED),
        ("poison-1", OutcomeKind.DEAD),
    ]  # JobHooks.not_run hears them too
    [parked] = await drain(namespace.url, dead_queue(namespace.name, "mw"), 1)
    assert parked.message_id == "poison-1"


async def run_three(
    namespace: Namespace, middleware: Middleware, name: str
) -> tuple[list[int], Any]:
    """Three jobs through one slot with ``middleware``: the attempts the handler saw, and
    the worker's stats."""
    app = namespace.app(middleware=[middleware])
    job = Job(name, N, queue="mw", retry=RetryPolicy(max_attempts=3, backoff=0))
    runs: list[int] = []

    @app.handler(job)
    async def run(args: N, ctx: JobContext) -> None:
        runs.append(ctx.attempt)

    async with namespace.client() as client:
        await client.enqueue_many(job, [{"n": i} for i in range(3)])
    return runs, await run_until_idle(namespace.worker(app, concurrency=1))


async def test_failing_middleware_never_loses_a_job(
    namespace: Namespace, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken(Middleware):
        async def attempt(self, ctx: JobContext, call_next: Next) -> Any:
            if ctx.attempt == 1:
                raise RuntimeError("middleware bug")
            return await call_next()

        async def settled(self, outcome: Outcome, ctx: JobContext | None) -> None:
            raise RuntimeError("settled bug")

    caplog.set_level(logging.ERROR, logger="amqp_jobs")
    runs, stats = await run_three(namespace, Broken(), "t.broken")
    assert runs == [2, 2, 2]  # each attempt 1 failed in the middleware and was retried
    assert (stats.retried, stats.succeeded, stats.dead) == (3, 3, 0)
    text = caplog.text
    assert "middleware failed around job t.broken" in text
    assert "settled failed (ignored)" in text


async def test_a_plain_def_attempt_that_raises_fails_the_attempt_not_the_worker(
    namespace: Namespace, caplog: pytest.LogCaptureFixture
) -> None:
    """An ``attempt`` written without ``async`` raises as it is called, not when awaited:
    still a failed attempt, retried, with its slot given back (one slot: the next job
    could not start otherwise)."""

    class Plain(Middleware):
        def attempt(self, ctx: JobContext, call_next: Next) -> Any:  # type: ignore[override]
            if ctx.attempt == 1:
                raise RuntimeError("middleware bug")
            return call_next()

    caplog.set_level(logging.ERROR, logger="amqp_jobs")
    runs, stats = await run_three(namespace, Plain(), "t.plain")
    assert runs == [2, 2, 2]
    assert (stats.retried, stats.succeeded, stats.dead) == (3, 3, 0)
    assert "middleware failed around job t.plain" in caplog.text


async def test_publish_middleware_adds_headers_the_handler_sees(namespace: Namespace) -> None:
    class Stamp(Middleware):
        async def publish(self, publishing: Publishing, call_next: Next) -> Any:
            publishing.headers["traceparent"] = f"00-{publishing.job_id:0>32}-0000000000000001-01"
            publishing.headers["tenant"] = "acme"
            return await call_next()

    app = namespace.app()
    job = Job("t.stamped", N, queue="mw")
    seen: list[dict[str, Any]] = []

    @app.handler(job)
    async def run(args: N, ctx: JobContext) -> None:
        seen.append(dict(ctx.headers))

    async with namespace.client(middleware=[Stamp()]) as client:
        job_id = await client.enqueue(job, {"n": 1}, headers={"origin": "test"})
        await client.enqueue_many(job, [{"n": 2}])
    await run_until_idle(namespace.worker(app))
    assert len(seen) == 2
    first = next(h for h in seen if h.get("origin") == "test")
    assert first["traceparent"] == f"00-{job_id:0>32}-0000000000000001-01"
    assert all(h["tenant"] == "acme" for h in seen)


class Keyed(BaseModel):
    user_id: int


async def test_a_keyed_high_priority_job_passes_a_header_adding_middleware(
    namespace: Namespace,
) -> None:
    """amqp-jobs's own job-key and job-priority headers are not the middleware's to
    answer for: adding a header (as tracing adds traceparent) must not fail the enqueue
    of a keyed or high-priority job. Setting one of them is still refused."""

    class Stamp(Middleware):
        async def publish(self, publishing: Publishing, call_next: Next) -> Any:
            publishing.headers["tenant"] = "acme"
            return await call_next()

    class Forger(Middleware):
        async def publish(self, publishing: Publishing, call_next: Next) -> Any:
            publishing.headers["job-key"] = "someone else"
            return await call_next()

    class Eraser(Middleware):
        async def publish(self, publishing: Publishing, call_next: Next) -> Any:
            del publishing.headers["job-key"]
            return await call_next()

    job = Job("t.keyed", Keyed, queue="mw", key="user_id")
    namespace.track(job)
    async with namespace.client(middleware=[Stamp()]) as client:
        await client.enqueue(job, {"user_id": 7}, priority="high")
        await client.enqueue_many(job, [{"user_id": 8}])
    for bad in (Forger(), Eraser()):
        async with namespace.client(middleware=[bad]) as client:
            with pytest.raises(ContractError, match="job-key"):
                await client.enqueue(job, {"user_id": 9})
    high = await drain(namespace.url, high_queue(namespace.name, "mw"), 1)
    normal = await drain(namespace.url, work_queue(namespace.name, "mw"), 1)
    assert high[0].headers["job-key"] == "7" and high[0].headers["job-priority"] == "high"
    assert normal[0].headers["job-key"] == "8"
    assert all(m.headers["tenant"] == "acme" for m in (*high, *normal))


def test_middleware_must_subclass_middleware(namespace: Namespace) -> None:
    from amqp_jobs import ContractError

    with pytest.raises(ContractError, match=r"subclass amqp_jobs\.Middleware"):
        namespace.app(middleware=[object()])  # type: ignore[list-item]


async def test_a_publish_middleware_that_does_not_publish_raises(namespace: Namespace) -> None:
    class Forgetful(Middleware):
        async def publish(self, publishing: Publishing, call_next: Next) -> Any:
            return None  # never calls call_next()

    job = Job("t.lost", N, queue="mw")
    namespace.track(job)
    async with namespace.client(middleware=[Forgetful()]) as client:
        with pytest.raises(PublishError, match="was not published"):
            await client.enqueue(job, {"n": 1})


async def test_a_hung_settled_hook_is_given_up_on(
    namespace: Namespace, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import asyncio

    from amqp_jobs import middleware

    monkeypatch.setattr(middleware, "SETTLED_TIMEOUT", 0.2)

    class Hung(Middleware):
        async def settled(self, outcome: Outcome, ctx: JobContext | None) -> None:
            await asyncio.Event().wait()  # never returns

    app = namespace.app(middleware=[Hung()])
    job = Job("t.hung", N, queue="mw")
    app.add_handler(job, lambda args: None)
    async with namespace.client() as client:
        await client.enqueue(job, {"n": 1})
    stats = await run_until_idle(namespace.worker(app), timeout=10)
    assert stats.succeeded == 1
    assert "settled took more than" in caplog.text
