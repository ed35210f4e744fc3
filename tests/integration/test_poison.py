"""Poison input lands in the dead-letter queue with a reason; the worker keeps serving."""

import asyncio
import logging
from datetime import UTC, datetime
from typing import Any

import pika
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ConfigDict

from amqp_jobs import Job
from amqp_jobs.message import MIN_ETA_MS, NO_ID_PREFIX, Message
from amqp_jobs.testing import Namespace, run_until_idle
from amqp_jobs.topology import dead_queue, jobs_exchange, work_queue
from tests.support import drain, put


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
    ("protocol-str", b'{"n": 1}', {}, {"job-protocol": "1"}, "unsupported-protocol"),
    ("attempt-zero", b'{"n": 1}', {}, {"job-attempt": 0}, "invalid-headers"),
    ("attempt-negative", b'{"n": 1}', {}, {"job-attempt": -3}, "invalid-headers"),
    ("attempt-float", b'{"n": 1}', {}, {"job-attempt": 1.5}, "invalid-headers"),
    ("attempt-bool", b'{"n": 1}', {}, {"job-attempt": True}, "invalid-headers"),
    ("attempt-table", b'{"n": 1}', {}, {"job-attempt": {"n": 1}}, "invalid-headers"),
    ("eta-far-past", b'{"n": 1}', {}, {"job-eta": 1}, "invalid-headers"),
    ("eta-negative", b'{"n": 1}', {}, {"job-eta": -(10**15)}, "invalid-headers"),
    ("eta-list", b'{"n": 1}', {}, {"job-eta": [1, 2]}, "invalid-headers"),
    ("eta-timestamp", b'{"n": 1}', {}, {"job-eta": datetime.now(UTC)}, "invalid-headers"),
    ("too-large", b'{"n": 1, "pad": "' + b"x" * 300_000 + b'"}', {}, {}, "too-large"),
]


async def test_poison_messages_are_dead_lettered_with_a_reason(namespace: Namespace) -> None:
    app = namespace.app()
    job = Job("t.strict", Strict, queue="p")
    ran: list[int] = []
    app.add_handler(job, lambda args: ran.append(args.n))
    async with namespace.client() as client:
        await client.enqueue(job, {"n": 0})  # declares queue and binding
        for case, body, props, headers, _ in CASES:
            fields = {**GOOD, **props}
            message = Message(body, fields["content_type"], case, fields["type"], None, headers)
            await put(namespace.url, "t.strict", message, exchange=jobs_exchange(namespace.name))
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


#: Header values a broker accepts (RabbitMQ's parser refuses NaN and infinities, closing
#: the publisher's connection, so such a message never reaches a worker).
header_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(width=32, allow_nan=False, allow_infinity=False)  # pamqp sends 32-bit
    | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=8,
)
#: ETAs that never put a job in the cascade: garbage, implausible, or already past
etas = st.text(max_size=5) | st.integers(-(2**63), MIN_ETA_MS) | st.just(MIN_ETA_MS + 1000)
messages = st.builds(
    dict,
    body=st.binary(max_size=64) | st.sampled_from([b'{"n": 1}', b'{"n": "x"}', b"[]", b"{}"]),
    content_type=st.none() | st.sampled_from(["application/json", "text/plain"]),
    type=st.none() | st.sampled_from(["t.strict", "t.other", ""]),
    message_id=st.none() | st.text(min_size=1, max_size=8),
    headers=st.fixed_dictionaries(
        {},
        optional={
            "job-protocol": st.integers(0, 2) | header_values,
            "job-attempt": st.integers(-1, 3) | header_values,
            "job-eta": etas,
            "job-queue": header_values,
            "x-delivery-count": st.integers(0, 5),
            "other": header_values,
        },
    ),
)


@settings(
    max_examples=5,
    deadline=None,
    # no shrinking: each example is a worker run against the broker
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batch=st.lists(messages, min_size=30, max_size=30))
async def test_no_generated_message_escapes_the_worker(
    namespace: Namespace, batch: list[dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever arrives ends exactly once, run or parked; the worker never errs or stops.

    Every example uses the same queues (the namespace lives for the whole test) and
    leaves them empty.
    """
    app = namespace.app()
    job = Job("t.strict", Strict, queue="gen")
    ran: list[int] = []
    app.add_handler(job, lambda args: ran.append(args.n))
    caplog.clear()
    async with namespace.client() as client:
        await client.enqueue(job, {"n": -1})  # declares the queue
        for fields in batch:
            message = Message(
                fields["body"],
                fields["content_type"],
                fields["message_id"],
                fields["type"],
                None,
                fields["headers"],
            )
            await put(namespace.url, work_queue(namespace.name, "gen"), message)
        await client.enqueue(job, {"n": -2})  # still served after all of them
    stats = await run_until_idle(namespace.worker(app), timeout=60)
    # -2, enqueued last, is still served; a generated job that claims to have been
    # delivered before (x-delivery-count) is quarantined and may run after it
    assert ran[0] == -1 and -2 in ran
    assert stats.succeeded + stats.dead == len(batch) + 2
    dead = await drain(namespace.url, dead_queue(namespace.name, "gen"), stats.dead)
    assert all(m.headers.get("job-dead-reason") or m.headers.get("x-death") for m in dead)
    escaped = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not escaped, [r.getMessage() for r in escaped]


def pika_publish_without_id(url: str, exchange: str, messages: list[dict[str, Any]]) -> None:
    """pika sends what it is given; aio-pika's aiormq would invent a message_id."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = connection.channel()
        ch.confirm_delivery()
        for props in messages:
            ch.basic_publish(
                exchange=exchange,
                routing_key="t.strict",
                body=b'{"n": 5}',
                properties=pika.BasicProperties(delivery_mode=2, **props),
                mandatory=True,
            )
    finally:
        connection.close()


@pytest.mark.rabbitmq_only  # what aiormq does to a publish without an id
async def test_a_message_without_an_id_is_parked_without_a_real_looking_one(
    namespace: Namespace,
) -> None:
    """It used to be parked under the random uuid aiormq gives every publish without a
    message_id, indistinguishable from a real job id."""
    app = namespace.app()
    job = Job("t.strict", Strict, queue="noid")
    app.add_handler(job, lambda args: None)
    async with namespace.client() as client:
        await client.enqueue(job, {"n": 0})  # declares queue and binding
    await asyncio.get_running_loop().run_in_executor(
        None,
        pika_publish_without_id,
        namespace.url,
        jobs_exchange(namespace.name),
        [
            {"content_type": "application/json", "type": "t.strict"},
            {"content_type": "application/json", "type": "t.strict"},
            {"content_type": "text/plain", "type": "t.strict"},
        ],
    )
    stats = await run_until_idle(namespace.worker(app))
    assert stats.succeeded == 1
    assert stats.dead == 3
    dead = await drain(namespace.url, dead_queue(namespace.name, "noid"), 3)
    assert sorted(m.headers["job-dead-reason"] for m in dead) == [
        "invalid-headers",
        "invalid-headers",
        "wrong-content-type",
    ]
    ids = [m.message_id for m in dead]
    assert all(i is None or i.startswith(NO_ID_PREFIX) for i in ids), ids
    assert len(set(ids)) == 3, "marked ids still differ (aiormq matches returns by id)"
