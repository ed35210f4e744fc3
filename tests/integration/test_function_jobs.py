"""A job defined by one decorated function runs like any job, on both brokers."""

from typing import Any

from amqp_jobs import JobContext, Middleware, Outcome, OutcomeKind, RetryPolicy
from amqp_jobs.testing import Namespace, run_until_idle


class Results(Middleware):
    def __init__(self) -> None:
        self.results: list[Any] = []

    async def settled(self, outcome: Outcome, ctx: JobContext | None) -> None:
        if outcome.kind is OutcomeKind.SUCCEEDED:
            self.results.append(outcome.result)


async def test_a_decorated_function_is_enqueued_run_and_retried(namespace: Namespace) -> None:
    results = Results()
    app = namespace.app(middleware=[results])
    attempts: list[int] = []

    @app.job(name="t.fn.add", queue="fn", retry=RetryPolicy(max_attempts=2, backoff=0))
    async def add(a: int, b: int = 10, *, ctx: JobContext) -> int:
        attempts.append(ctx.attempt)
        if a < 0 and ctx.attempt == 1:
            raise RuntimeError("first attempt fails")
        return a + b

    @app.job(name="t.fn.shout", queue="fn")
    def shout(text: str) -> str:  # plain def: runs in a thread
        return text.upper()

    async with namespace.client() as client:
        await client.enqueue(add, {"a": 1, "b": 2})
        await client.enqueue(add, {"a": -5})
        await client.enqueue(shout, {"text": "hi"})
    stats = await run_until_idle(namespace.worker(app))
    assert stats.succeeded == 3
    assert sorted(attempts) == [1, 1, 2]
    assert sorted(map(str, results.results)) == ["3", "5", "HI"]
