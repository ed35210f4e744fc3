"""Publishing: confirmed, validated, on the wire as the contract says, typed errors."""

import asyncio
import json
import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import BaseModel

from amqp_jobs import (
    ArgsValidationError,
    BrokerUnavailableError,
    ContractError,
    Job,
    JobClient,
    PublishRefusedError,
    TopologyMismatchError,
    TopologySettings,
    UnroutableError,
)
from amqp_jobs.message import Message
from amqp_jobs.testing import Namespace
from amqp_jobs.topology import jobs_exchange, work_queue
from tests.support import Admin, drain, eventually, put, queue_count


class Email(BaseModel):
    user_id: int
    subject: str = "hi"


send = Job("emails.send", Email, queue="emails")


async def test_enqueue_is_confirmed_and_follows_the_wire_contract(namespace: Namespace) -> None:
    async with namespace.client() as client:
        job_id = await client.enqueue(send, Email(user_id=1))
    [msg] = await drain(namespace.url, work_queue(namespace.name, "emails"), 1)
    assert json.loads(msg.body) == {"user_id": 1, "subject": "hi"}
    assert msg.content_type == "application/json"
    assert msg.message_id == job_id
    assert msg.type == "emails.send"
    assert msg.timestamp is not None
    assert msg.headers["job-protocol"] == 1
    assert msg.headers["job-attempt"] == 1
    assert msg.headers["job-queue"] == "emails"
    assert "job-eta" not in msg.headers


async def test_enqueue_many_returns_ids_in_order(namespace: Namespace) -> None:
    async with namespace.client() as client:
        ids = await client.enqueue_many(send, [{"user_id": i} for i in range(500)])
    assert len(set(ids)) == 500
    msgs = await drain(namespace.url, work_queue(namespace.name, "emails"), 500)
    assert {m.message_id for m in msgs} == set(ids)


async def test_invalid_args_raise_before_anything_is_published(namespace: Namespace) -> None:
    async with namespace.client() as client:
        with pytest.raises(ArgsValidationError) as info:
            await client.enqueue(send, {"user_id": "nope"})
        assert info.value.fields == ["user_id"]
        with pytest.raises(ArgsValidationError):
            await client.enqueue_many(send, [{"user_id": 1}, {"subject": "no user"}])
        await client.enqueue(send, {"user_id": 9})  # declares the queue
    assert await queue_count(namespace.url, work_queue(namespace.name, "emails")) == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"delay": timedelta(seconds=1), "run_at": datetime.now(UTC)},
        {"delay": -1},
        {"run_at": datetime(2030, 1, 1)},  # naive
        {"job_id": ""},
    ],
)
async def test_bad_arguments_raise_typed_errors(
    namespace: Namespace, kwargs: dict[str, object]
) -> None:
    async with namespace.client() as client:
        with pytest.raises(ContractError):
            await client.enqueue(send, {"user_id": 1}, **kwargs)  # type: ignore[arg-type]


async def test_unroutable_publish_raises(namespace: Namespace) -> None:
    await Admin(namespace.url).declare_exchange(jobs_exchange(namespace.name))
    async with namespace.client(declare=False, retry_for=1) as client:
        with pytest.raises(UnroutableError, match=r"emails\.send"):
            await client.enqueue(send, {"user_id": 1})


async def test_refused_publish_raises(
    namespace: Namespace, caplog: pytest.LogCaptureFixture
) -> None:
    """A queue that rejects publishes (full, reject-publish) makes the broker nack."""
    admin = Admin(namespace.url)
    await admin.declare_exchange(jobs_exchange(namespace.name))
    await admin.declare_queue(
        work_queue(namespace.name, "emails"),
        {"x-max-length": 0, "x-overflow": "reject-publish"},
        bind=(jobs_exchange(namespace.name), "emails.send"),
    )
    namespace.track("emails")
    caplog.set_level(logging.WARNING)
    async with namespace.client(declare=False, retry_for=1) as client:
        began = time.monotonic()
        with pytest.raises(PublishRefusedError):
            await client.enqueue(send, {"user_id": 1})
        # nothing was stored, so the refusal was retried within retry_for, then raised
        assert time.monotonic() - began < 1 + 1
    assert any("PublishRefusedError" in r.getMessage() for r in caplog.records)


async def test_a_refusal_that_passes_is_retried_and_stored(
    namespace: Namespace, caplog: pytest.LogCaptureFixture
) -> None:
    """A full queue (reject-publish) that drains within retry_for takes the job."""
    name = work_queue(namespace.name, "emails")
    admin = Admin(namespace.url)
    await admin.declare_exchange(jobs_exchange(namespace.name))
    await admin.declare_queue(
        name,
        {"x-max-length": 1, "x-overflow": "reject-publish"},
        bind=(jobs_exchange(namespace.name), "emails.send"),
    )
    await put(namespace.url, name, Message(b"{}", None, "filler", None, None, {}))
    namespace.track("emails")
    caplog.set_level(logging.WARNING)
    async with namespace.client(declare=False, retry_for=20) as client:
        sending = asyncio.create_task(client.enqueue(send, {"user_id": 1}))
        await eventually(
            lambda: any("PublishRefusedError" in r.getMessage() for r in caplog.records),
            what="a refused attempt",
        )
        await admin.purge(name)
        await asyncio.wait_for(sending, 25)
    assert await queue_count(namespace.url, name) == 1


async def test_unreachable_broker_raises_with_password_masked() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"amqp://guest:s3cret-pw@127.0.0.1:{port}/"
    client = JobClient(url, namespace="nowhere", retry_for=0.5)
    with pytest.raises(BrokerUnavailableError) as info:
        await client.enqueue(send, {"user_id": 1})
    assert "s3cret-pw" not in str(info.value)
    assert "***" in str(info.value)


async def test_settings_mismatch_says_which_argument(namespace: Namespace) -> None:
    async with namespace.client(settings=TopologySettings(queue_type="classic")) as client:
        await client.enqueue(send, {"user_id": 1})
    async with namespace.client() as client:
        with pytest.raises(TopologyMismatchError, match="x-queue-type") as info:
            await client.enqueue(send, {"user_id": 1})
    assert "already exists with x-queue-type='classic'" in str(info.value)
    assert "'quorum'" in str(info.value)


async def test_concurrent_enqueues_share_one_connection(namespace: Namespace) -> None:
    async with namespace.client() as client:
        ids = await asyncio.gather(*(client.enqueue(send, {"user_id": i}) for i in range(200)))
    assert len(set(ids)) == 200
    assert await queue_count(namespace.url, work_queue(namespace.name, "emails")) == 200


class Reading(BaseModel):
    sensor: str
    value: float
    history: list[float] = []
    extra: Any = None


record = Job("sensors.record", Reading, queue="sensors")


@pytest.mark.parametrize(
    ("args", "kwargs", "error"),
    [
        ({"value": float("nan")}, {}, ArgsValidationError),
        ({"value": 1.0, "history": [float("inf")]}, {}, ArgsValidationError),
        ({"value": 1.0, "extra": object()}, {}, ArgsValidationError),
        ({"value": 1.0, "extra": b"\xff"}, {}, ArgsValidationError),
        ({"value": 1.0}, {"delay": float("nan")}, ContractError),
        ({"value": 1.0}, {"delay": float("inf")}, ContractError),
        ({"value": 1.0}, {"delay": timedelta(days=200 * 366)}, ContractError),
        ({"value": 1.0}, {"run_at": datetime(2300, 1, 1, tzinfo=UTC)}, ContractError),
        ({"value": 1.0}, {"headers": {"h": object()}}, ContractError),
        ({"value": 1.0}, {"headers": {"big": "x" * 140_000}}, ContractError),
    ],
)
async def test_what_the_wire_cannot_carry_is_refused_before_sending(
    namespace: Namespace, args: dict[str, Any], kwargs: dict[str, Any], error: type[Exception]
) -> None:
    """Each of these used to be confirmed and then parked by the worker (NaN as null,
    200 years as invalid-headers), to run at once (delay NaN), or to raise an untyped
    error from pydantic, aiormq or the clock; a header too large for the broker's frame
    closed the connection. Now each raises our error and nothing is sent."""
    async with namespace.client(retry_for=2) as client:
        await client.enqueue(record, {"sensor": "s", "value": 0.5})  # declares the queue
        with pytest.raises(error):
            await client.enqueue(record, {"sensor": "s", **args}, **kwargs)
        batch_kwargs = {k: v for k, v in kwargs.items() if k != "headers"}
        if batch_kwargs or not kwargs:
            with pytest.raises(error):
                await client.enqueue_many(
                    record,
                    [{"sensor": "s", "value": 2.0}, {"sensor": "s", **args}],
                    **batch_kwargs,
                )
        await client.enqueue(record, {"sensor": "s", "value": 0.75})  # the link still works
    msgs = await drain(namespace.url, work_queue(namespace.name, "sensors"), 2)
    assert sorted(json.loads(m.body)["value"] for m in msgs) == [0.5, 0.75]
