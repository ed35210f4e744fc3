"""Poison input lands in the dead-letter queue with a reason; the worker keeps serving."""

from typing import Any

import aio_pika
from pydantic import BaseModel, ConfigDict

from amqp_jobs import Job
from amqp_jobs.testing import Namespace, run_until_idle
from amqp_jobs.topology import dead_queue, jobs_exchange
from tests.support import channel, drain


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n: int


GOOD = {"content_type": "application/json", "type": "t.strict"}

#: (case id, body, properties overriding GOOD, headers) -> expected job-dead-reason
CASES: list[tuple[str, bytes, dict[str, Any], dict[str, Any], str]] = [
    ("not-json", b"hello", {}, {}, "invalid-json"),
    ("empty", b"", {}, {}, "invalid-json"),
    ("latin-1", b'{"n": "\xe9"}', {}, {}, "invalid-encoding"),
    ("array", b"[1, 2]", {}, {}, "invalid-args"),
    ("string", b'"n"', {}, {}, "invalid-args"),
    ("nested", b"[" * 5000 + b"]" * 5000, {}, {}, "invalid-json"),
    ("schema", b'{"n": "x"}', {}, {}, "invalid-args"),
    ("extra", b'{"n": 1, "admin": true}', {}, {}, "invalid-args"),
    ("unknown-job", b'{"n": 1}', {"type": "t.nobody"}, {}, "unknown-job"),
    ("no-type", b'{"n": 1}', {"type": None}, {}, "missing-job-name"),
    ("content-type", b'{"n": 1}', {"content_type": "text/plain"}, {}, "wrong-content-type"),
    ("attempt-str", b'{"n": 1}', {}, {"job-attempt": "one"}, "invalid-headers"),
    ("attempt-huge", b'{"n": 1}', {}, {"job-attempt": 10**12}, "invalid-headers"),
    ("eta-garbage", b'{"n": 1}', {}, {"job-eta": "soon"}, "invalid-headers"),
    ("eta-seconds", b'{"n": 1}', {}, {"job-eta": 1_700_000_000}, "invalid-headers"),
    ("eta-far-future", b'{"n": 1}', {}, {"job-eta": 10**17}, "invalid-headers"),
    ("protocol", b'{"n": 1}', {}, {"job-protocol": 99}, "unsupported-protocol"),
    ("too-large", b'{"n": 1, "pad": "' + b"x" * 300_000 + b'"}', {}, {}, "too-large"),
]


async def test_poison_messages_are_dead_lettered_with_a_reason(namespace: Namespace) -> None:
    app = namespace.app()
    job = Job("t.strict", Strict, queue="p")
    ran: list[int] = []
    app.add_handler(job, lambda args: ran.append(args.n))
    async with namespace.client() as client:
        await client.enqueue(job, {"n": 0})  # declares queue and binding
        async with channel(namespace.url) as ch:
            ex = await ch.get_exchange(jobs_exchange(namespace.name), ensure=False)
            for case, body, props, headers, _ in CASES:
                await ex.publish(
                    aio_pika.Message(body, message_id=case, headers=headers, **{**GOOD, **props}),
                    routing_key="t.strict",
                )
        await client.enqueue(job, {"n": 1})  # the worker must still serve this one
    stats = await run_until_idle(namespace.worker(app, max_body=100_000))
    assert ran == [0, 1]
    assert stats.dead == len(CASES)
    dead = await drain(namespace.url, dead_queue(namespace.name, "p"), len(CASES))
    reasons = {m.message_id: m.headers["job-dead-reason"] for m in dead}
    assert reasons == {case: reason for case, _, _, _, reason in CASES}
    by_id = {m.message_id: m for m in dead}
    assert by_id["latin-1"].body == b'{"n": "\xe9"}', "parked exactly as it arrived"
    assert "admin" in by_id["extra"].headers["job-error-message"]
    assert by_id["unknown-job"].headers["job-queue"] == "p"
