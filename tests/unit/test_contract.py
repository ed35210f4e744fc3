"""Job contracts and retry policies: validated when built, explicit when they fail."""

from datetime import timedelta

import pydantic
import pytest
from tenacity.wait import wait_fixed

from amqp_jobs import ArgsValidationError, ContractError, Job, JobTimeoutError, RetryPolicy


class Signup(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    user_id: int
    email: str


def test_job_holds_its_contract() -> None:
    job = Job("users.signup", Signup, queue="users", timeout=timedelta(seconds=5))
    assert (job.name, job.args_model, job.queue, job.timeout) == (
        "users.signup",
        Signup,
        "users",
        5.0,
    )
    assert job.retry.max_attempts == RetryPolicy().max_attempts == 10


@pytest.mark.parametrize("name", ["", " x", ".starts-with-dot", "a" * 201, "has space", "ü"])
def test_bad_job_names_are_refused(name: str) -> None:
    with pytest.raises(ContractError, match="invalid job name"):
        Job(name, Signup)


@pytest.mark.parametrize("queue", ["", "with.dot", "a b", "x" * 101])
def test_bad_queue_names_are_refused(queue: str) -> None:
    with pytest.raises(ContractError, match="invalid queue name"):
        Job("a", Signup, queue=queue)


def test_args_model_must_be_pydantic() -> None:
    with pytest.raises(ContractError, match="pydantic BaseModel"):
        Job("a", dict)  # type: ignore[type-var]


@pytest.mark.parametrize("timeout", [0, -1, "30"])
def test_bad_timeouts_are_refused(timeout: object) -> None:
    with pytest.raises(ContractError, match="timeout"):
        Job("a", Signup, timeout=timeout)  # type: ignore[arg-type]


def test_validation_error_names_the_field() -> None:
    job = Job("users.signup", Signup)
    with pytest.raises(ArgsValidationError) as info:
        job.encode_args({"user_id": "not a number", "email": "a@b"})
    assert info.value.fields == ["user_id"]
    assert "user_id" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_extra_fields_fail_when_the_model_forbids_them() -> None:
    with pytest.raises(ArgsValidationError) as info:
        Job("a", Signup).encode_args({"user_id": 1, "email": "x", "admin": True})
    assert info.value.fields == ["admin"]


def test_wrong_model_instance_is_refused() -> None:
    class Other(pydantic.BaseModel):
        user_id: int

    with pytest.raises(ArgsValidationError, match="expected Signup, got Other"):
        Job("a", Signup).encode_args(Other(user_id=1))  # type: ignore[arg-type]


def test_encode_is_the_models_json_and_decodes_back() -> None:
    job = Job("a", Signup)
    body = job.encode_args(Signup(user_id=7, email="e@x"))
    assert body == b'{"user_id":7,"email":"e@x"}'
    assert job.decode_args(body) == Signup(user_id=7, email="e@x")


def test_default_backoff_is_exponential_with_jitter_and_a_cap() -> None:
    policy = RetryPolicy()
    for attempt, base in [(1, 1), (2, 2), (3, 4), (5, 16)]:
        delays = {policy.delay_after(attempt) for _ in range(20)}
        assert all(base <= d <= base + 1 for d in delays), (attempt, delays)
        assert len(delays) > 1, "jitter spreads the delays"
    assert policy.delay_after(40) <= 3600


def test_backoff_takes_seconds_timedelta_or_tenacity() -> None:
    assert RetryPolicy(backoff=2).delay_after(5) == 2
    assert RetryPolicy(backoff=timedelta(milliseconds=250)).delay_after(1) == 0.25
    assert RetryPolicy(backoff=wait_fixed(3)).delay_after(9) == 3


def test_retry_filters() -> None:
    policy = RetryPolicy(retry_on=(ConnectionError,), give_up_on=(ConnectionRefusedError,))
    assert policy.should_retry(ConnectionResetError())
    assert not policy.should_retry(ConnectionRefusedError()), "give_up_on wins"
    assert not policy.should_retry(ValueError()), "not in retry_on"
    assert policy.should_retry(JobTimeoutError()), "timeouts are retryable"
    assert not RetryPolicy(give_up_on=(JobTimeoutError,)).should_retry(JobTimeoutError())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_attempts": 0},
        {"max_attempts": True},
        {"backoff": -1},
        {"retry_on": (int,)},
        {"give_up_on": ("ValueError",)},
    ],
)
def test_bad_policies_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ContractError):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_single_exception_class_is_accepted() -> None:
    assert RetryPolicy(retry_on=OSError).retry_on == (OSError,)  # type: ignore[arg-type]
