"""Job contracts and retry policies: validated when built, explicit when they fail."""

import json
from datetime import timedelta
from typing import Any

import pydantic
import pytest
from tenacity import RetryCallState
from tenacity.wait import wait_base, wait_exponential, wait_fixed

from amqp_jobs import ArgsValidationError, ContractError, Job, JobTimeoutError, RetryPolicy
from amqp_jobs.message import MAX_ETA_AHEAD_MS


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


# --- args that JSON cannot carry (issue 9, items 5 and 7) -----------------------------


class Point(pydantic.BaseModel):
    x: float


class Shape(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="allow")
    label: str | None = None
    scale: float = 1.0
    points: list[Point] = []
    weights: dict[str, float] = {}
    values: list[float] = []
    meta: Any = None


shape = Job("shapes.draw", Shape)
NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ({"scale": NAN}, "scale"),
        ({"scale": INF}, "scale"),
        ({"scale": -INF}, "scale"),
        ({"scale": "nan"}, "scale"),  # pydantic parses the string into a float NaN
        ({"values": [1.0, 2.0, NAN]}, "values.2"),
        ({"weights": {"a": 1.0, "b": -INF}}, "weights.b"),
        ({"points": [{"x": 0.0}, {"x": NAN}]}, "points.1.x"),
        ({"meta": NAN}, "meta"),
        ({"meta": {"deep": [1, {"er": INF}]}}, "meta.deep.1.er"),
        ({"meta": (1.0, NAN)}, "meta.1"),
        ({"extra_field": NAN}, "extra_field"),
    ],
)
def test_non_finite_floats_are_refused_naming_the_field(args: dict[str, Any], field: str) -> None:
    """NaN and infinities are not JSON: pydantic would write them as null, which the worker
    then parks as invalid-args. They are refused before anything is sent."""
    with pytest.raises(ArgsValidationError, match="finite") as info:
        shape.encode_args(args)
    assert info.value.fields == [field]
    with pytest.raises(ArgsValidationError):
        shape.encode_args(Shape.model_validate(args))  # a model instance is checked too


@pytest.mark.parametrize("mode", ["null", "constants", "strings"])
def test_non_finite_floats_are_refused_whatever_the_models_json_config(mode: str) -> None:
    class Configured(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(ser_json_inf_nan=mode)  # type: ignore[typeddict-item]
        v: float

    with pytest.raises(ArgsValidationError) as info:
        Job("c", Configured).encode_args({"v": INF})
    assert info.value.fields == ["v"]


def test_non_finite_floats_from_serialisers_and_computed_fields_are_refused() -> None:
    class Computed(pydantic.BaseModel):
        n: int
        note: str | None = None

        @pydantic.computed_field  # type: ignore[prop-decorator]
        @property
        def ratio(self) -> float:
            return 1 / self.n if self.n else INF

    class Serialised(pydantic.BaseModel):
        n: int
        note: str | None = None

        @pydantic.field_serializer("n")
        def as_float(self, n: int) -> float:
            return n if n else NAN

    for model in (Computed, Serialised):
        job = Job("c", model)
        assert json.loads(job.encode_args({"n": 2}))["n"] == 2
        with pytest.raises(ArgsValidationError) as info:
            job.encode_args({"n": 0})
        assert info.value.fields == ["ratio" if model is Computed else "n"]


def test_a_subclass_instance_with_float_fields_is_checked() -> None:
    class Base(pydantic.BaseModel):
        name: str | None = None

    class Derived(Base):
        f: float

    class Poly(Base):
        model_config = pydantic.ConfigDict(polymorphic_serialization=True)  # type: ignore[typeddict-unknown-key, unused-ignore]

    class PolyDerived(Poly):
        f: float

    class Outer(pydantic.BaseModel):
        item: pydantic.SerializeAsAny[Base] | None = None
        poly: Poly | None = None

    with pytest.raises(ArgsValidationError) as info:
        Job("b", Base).encode_args(Derived(f=NAN))
    assert info.value.fields == ["f"]
    outer = Job("o", Outer)
    with pytest.raises(ArgsValidationError) as info:
        outer.encode_args(Outer(item=Derived(f=NAN)))
    assert info.value.fields == ["item.f"]
    with pytest.raises(ArgsValidationError) as info:
        outer.encode_args(Outer(poly=PolyDerived(f=INF)))
    assert info.value.fields == ["poly.f"]


def test_finite_floats_nulls_and_lookalike_text_still_encode() -> None:
    """The check looks closer only when the JSON holds null, NaN or Infinity; text that
    merely says so, None values and excluded fields are sent as before."""

    class Excluded(pydantic.BaseModel):
        v: float
        cache: float = pydantic.Field(default=NAN, exclude=True)

    args = {
        "label": "null NaN Infinity",
        "scale": 1e308,
        "values": [0.0, -0.0, 5e-324],
        "meta": {"NaN": None, "s": "Infinity"},
        "points": [{"x": -1.5}],
    }
    body = shape.encode_args(args)
    assert Shape.model_validate_json(body) == Shape.model_validate(args)
    assert Job("e", Excluded).encode_args({"v": 1.0}) == b'{"v":1.0}'


class Blob(pydantic.BaseModel):
    data: bytes = b""
    anything: Any = None


@pytest.mark.parametrize(
    ("args", "field", "why"),
    [
        ({"anything": object()}, "anything", "unknown type"),
        ({"anything": b"\xff\xfe"}, "anything", "utf-8"),
        ({"data": b"\xff\xfe"}, "data", "utf-8"),
    ],
)
def test_args_json_cannot_encode_raise_args_validation_error(
    args: dict[str, Any], field: str, why: str
) -> None:
    with pytest.raises(ArgsValidationError) as info:
        Job("blobs.store", Blob).encode_args(args)
    assert info.value.fields == [field]
    assert why in str(info.value).lower()


def test_a_failing_serialiser_raises_args_validation_error() -> None:
    class Broken(pydantic.BaseModel):
        n: int

        @pydantic.field_serializer("n")
        def explode(self, n: int) -> int:
            raise TypeError("boom")

    with pytest.raises(ArgsValidationError, match="boom") as info:
        Job("b", Broken).encode_args({"n": 1})
    assert info.value.fields == ["n"]


@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_non_finite_durations_are_refused(value: object) -> None:
    with pytest.raises(ContractError, match="timeout"):
        Job("a", Signup, timeout=value)  # type: ignore[arg-type]
    with pytest.raises(ContractError, match="backoff"):
        RetryPolicy(backoff=value)  # type: ignore[arg-type]


class Answer(wait_base):
    """A wait strategy that answers whatever it is told to."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __call__(self, retry_state: RetryCallState) -> float:
        return self.seconds


@pytest.mark.parametrize(
    "backoff", [Answer(INF), Answer(1e300), Answer(-INF), Answer(NAN), wait_exponential()]
)
def test_a_backoff_never_asks_for_more_than_workers_accept(backoff: wait_base) -> None:
    """A strategy's answer is kept within what the worker's decode accepts as an ETA
    (wait_exponential without a max doubles past 100 years by attempt 32), and is never
    NaN, which would raise when the worker computes the retry's ETA."""
    delay = RetryPolicy(backoff=backoff, max_attempts=100).delay_after(80)
    assert 0 <= delay < MAX_ETA_AHEAD_MS / 1000


@pytest.mark.parametrize("delay", [float("nan"), float("inf"), -1.0])
def test_retry_refuses_a_delay_that_is_not_a_finite_number_of_seconds(delay: float) -> None:
    from amqp_jobs import Retry

    with pytest.raises(ContractError, match="finite"):
        Retry(delay=delay)
