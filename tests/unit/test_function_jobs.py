"""``@app.job``: a job contract built from one typed function."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime

import pytest
from pydantic import BaseModel

from amqp_jobs import (
    ArgsValidationError,
    ContractError,
    Job,
    JobApp,
    JobContext,
    JobFunction,
    RetryPolicy,
)
from amqp_jobs.schemas import job_schema


class Address(BaseModel):
    city: str


app = JobApp("fnjobs")


@app.job(queue="emails", retry=RetryPolicy(max_attempts=5), timeout=30)
async def send_welcome(user_id: int, email: str, address: Address | None = None) -> str:
    return f"{user_id}:{email}"


@app.job
def count_words(text: str, ctx: JobContext) -> int:
    return len(text.split()) + ctx.attempt * 0


def test_the_contract_comes_from_the_signature() -> None:
    assert isinstance(send_welcome, Job)
    assert isinstance(send_welcome, JobFunction)
    assert send_welcome.name == "tests.unit.test_function_jobs.send_welcome"
    assert send_welcome.queue == "emails"
    assert send_welcome.retry.max_attempts == 5
    assert send_welcome.timeout == 30
    model = send_welcome.validate({"user_id": "7", "email": "a@example.com"})
    assert model.model_dump() == {"user_id": 7, "email": "a@example.com", "address": None}
    schema = send_welcome.json_schema()
    assert schema["title"] == "SendWelcomeArgs"
    assert schema["required"] == ["user_id", "email"]
    assert schema["additionalProperties"] is False
    assert job_schema(send_welcome, "fnjobs")["properties"]["address"]  # as any job's


def test_the_context_parameter_is_not_an_arg() -> None:
    assert set(count_words.args_model.model_fields) == {"text"}
    assert count_words.queue == "default"
    assert count_words.name.endswith(".count_words")


def test_bad_args_are_refused_naming_the_field() -> None:
    with pytest.raises(ArgsValidationError) as info:
        send_welcome.encode_args({"user_id": "x", "email": "a@example.com"})
    assert info.value.fields == ["user_id"]
    with pytest.raises(ArgsValidationError) as info:
        send_welcome.encode_args({"user_id": 1, "email": "a@example.com", "extra": 1})
    assert info.value.fields == ["extra"]


def test_it_is_still_the_plain_function() -> None:
    assert asyncio.run(send_welcome(1, "a@example.com")) == "1:a@example.com"
    assert send_welcome.__wrapped__.__name__ == "send_welcome"


def test_the_registered_handler_gets_the_fields_and_the_context() -> None:
    spec = app.registry.get(count_words.name)
    assert spec is not None and spec.job is count_words and not spec.is_async
    args = count_words.validate({"text": "one two three"})
    ctx = JobContext(
        job=count_words, job_id="j", attempt=1, queue="default", enqueued_at=datetime.now(),
        eta=None, logger=logging.LoggerAdapter(logging.getLogger("t")),
    )  # fmt: skip
    assert spec.call(args, ctx) == 3
    spec = app.registry.get(send_welcome.name)
    assert spec is not None and spec.is_async
    out = asyncio.run(spec.call(send_welcome.validate({"user_id": 2, "email": "b@x.org"}), ctx))
    assert out == "2:b@x.org"


def test_an_explicit_name_wins() -> None:
    local = JobApp("fnjobs")

    @local.job(name="billing.charge")
    def charge(cents: int) -> None: ...

    assert charge.name == "billing.charge"


@pytest.mark.parametrize(
    ("source", "problem"),
    [
        ("def f(x): ...", "needs a type annotation"),
        ("def f(*xs: int): ...", "ordinary named parameter"),
        ("def f(**kw: int): ...", "ordinary named parameter"),
        ("def f(x: int, /): ...", "ordinary named parameter"),
        ("def f(_x: int): ...", "cannot be an arg"),
        ("def f(model_config: int): ...", "cannot form an args model"),
    ],
)
def test_unusable_signatures_are_refused(source: str, problem: str) -> None:
    scope: dict[str, object] = {}
    exec(source, scope)
    with pytest.raises(ContractError, match=problem):
        JobApp("fnjobs").job(name="t.f")(scope["f"])  # type: ignore[arg-type]


def test_a_nested_function_needs_a_name() -> None:
    def inner(x: int) -> None: ...

    with pytest.raises(ContractError, match="no stable default name"):
        JobApp("fnjobs").job(inner)


def test_one_name_one_handler() -> None:
    local = JobApp("fnjobs")
    local.job(name="t.once")(lambda_free)
    with pytest.raises(ContractError, match="already has a handler"):
        local.job(name="t.once")(lambda_free)


def lambda_free(x: int) -> None: ...
