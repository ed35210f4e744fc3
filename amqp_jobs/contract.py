"""Job contracts: what a job is called, what it takes, where it runs and how it retries.

A contract holds no handler code, so a publishing service imports it without importing
the worker. Everything here is validated when it is built: a typo fails at import time,
not when the first job dead-letters.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Generic, Literal, TypeVar

import pydantic
import pydantic_core
from pydantic_core import PydanticSerializationError
from tenacity import RetryCallState, Retrying
from tenacity.wait import wait_base, wait_exponential_jitter, wait_fixed

from amqp_jobs.durations import seconds as seconds
from amqp_jobs.errors import ArgsValidationError, ContractError, JobTimeoutError, ResultError

ArgsT = TypeVar("ArgsT", bound=pydantic.BaseModel)

#: Job names are routing keys on a direct exchange: AMQP allows 255 bytes.
_JOB_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:\-]{0,199}$")
#: Queue names become one word of a topic routing key, so they may not contain dots.
_QUEUE_NAME = re.compile(r"^[A-Za-z0-9_\-]{1,100}$")
_NAMESPACE = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
_GROUP = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
#: Jobs of one key a critical section lets in at once, at most (one lock each).
MAX_EXCLUSIVE_LIMIT = 100
_MAX_AGE = re.compile(r"^[1-9][0-9]{0,8}[YMDhms]$")

DEFAULT_TIMEOUT = 300.0
#: A handler's result may take this many bytes as JSON: it travels in one event and is
#: kept in the stream and the job log.
MAX_RESULT_BYTES = 64 * 1024
#: A job key (the value of the contract's key field, as text) is at most this long.
MAX_KEY_LENGTH = 256
DEFAULT_MAX_ATTEMPTS = 10
#: ETAs further ahead than this are rejected as absurd (about 100 years): by the worker's
#: decode (message.py re-exports it) and, so that both agree, by publishers and backoffs.
MAX_ETA_AHEAD_MS = 100 * 366 * 86_400_000
#: The longest retry delay a backoff may ask for: a second under that bound, so the ETA
#: computed from it is within the bound whenever the worker reads it.
MAX_BACKOFF = MAX_ETA_AHEAD_MS / 1000 - 1


def check_queue_name(queue: str) -> str:
    """Return ``queue`` or raise ContractError naming the rule it breaks."""
    if not isinstance(queue, str) or not _QUEUE_NAME.match(queue):
        raise ContractError(
            f"invalid queue name {queue!r}: use 1-100 characters of letters, digits, '_' and '-'"
            " (no dots: the queue name is one word of the delay routing key)"
        )
    return queue


def check_namespace(namespace: str) -> str:
    """Return ``namespace`` or raise ContractError naming the rule it breaks."""
    if not isinstance(namespace, str) or not _NAMESPACE.match(namespace):
        raise ContractError(
            f"invalid namespace {namespace!r}: use 1-64 letters, digits, '_' and '-'"
        )
    return namespace


class _WaitState(RetryCallState):
    """The part of tenacity's call state its wait strategies read."""

    def __init__(self, attempt: int) -> None:
        super().__init__(Retrying(), None, (), {})
        self.attempt_number = attempt


def _default_backoff() -> wait_base:
    return wait_exponential_jitter(initial=1, max=3600, exp_base=2, jitter=1)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how soon a failed job runs again.

    ``backoff`` is any tenacity wait strategy (or a fixed number of seconds); it is asked
    for the delay after attempt *n* fails. The default is exponential from 1 s, doubling,
    with up to 1 s of jitter, capped at one hour. ``give_up_on`` wins over ``retry_on``;
    an exception matching neither sends the job to the dead-letter queue at once.
    A handler timeout is retried unless ``give_up_on`` names JobTimeoutError.
    """

    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    backoff: wait_base | float | timedelta = field(default_factory=_default_backoff)
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    give_up_on: tuple[type[BaseException], ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int):
            raise ContractError(f"max_attempts must be an int, got {self.max_attempts!r}")
        if not 1 <= self.max_attempts <= 10_000:
            raise ContractError(f"max_attempts must be 1..10000, got {self.max_attempts}")
        if not isinstance(self.backoff, wait_base):
            object.__setattr__(self, "backoff", wait_fixed(seconds(self.backoff, "backoff")))
        for attr in ("retry_on", "give_up_on"):
            value = getattr(self, attr)
            if isinstance(value, type):
                value = (value,)
                object.__setattr__(self, attr, value)
            if not all(isinstance(t, type) and issubclass(t, BaseException) for t in value):
                raise ContractError(f"{attr} must be a tuple of exception classes, got {value!r}")

    def delay_after(self, attempt: int) -> float:
        """Seconds to wait before running again, after attempt ``attempt`` (1-based) failed.

        Kept within 0..MAX_BACKOFF: a strategy that asks for more (wait_exponential without
        a max passes 100 years by attempt 32) would give an ETA the worker refuses.
        """
        assert isinstance(self.backoff, wait_base)
        delay = float(self.backoff(_WaitState(attempt)))
        return min(delay, MAX_BACKOFF) if delay > 0 else 0.0  # NaN and negatives: 0

    def should_retry(self, exc: BaseException) -> bool:
        """Whether this exception is worth another attempt (ignoring the attempt count)."""
        if isinstance(exc, self.give_up_on):
            return False
        return isinstance(exc, (JobTimeoutError, *self.retry_on))


NO_RETRY = RetryPolicy(max_attempts=1)


class Job(Generic[ArgsT]):
    """A job contract: name, args model, queue, retry policy and timeout.

    Publishers and workers import the same contract; only the worker registers a handler.
    """

    __slots__ = (
        "args_model",
        "exclusive",
        "exclusive_limit",
        "key",
        "name",
        "queue",
        "result_model",
        "retry",
        "timeout",
        "unique",
    )

    def __init__(
        self,
        name: str,
        args_model: type[ArgsT],
        *,
        queue: str = "default",
        retry: RetryPolicy | None = None,
        timeout: float | timedelta | None = DEFAULT_TIMEOUT,
        key: str | None = None,
        result_model: type[pydantic.BaseModel] | None = None,
        exclusive: str | None = None,
        exclusive_limit: int = 1,
        unique: timedelta | float | None = None,
    ) -> None:
        """``key``: an args field that names what the job is about (``"user_id"``); its
        value travels in the ``job-key`` header, the job log indexes it, and per-key
        locks and unique jobs are keyed on it. ``result_model``: what the handler returns;
        its return value is validated against it (a mismatch fails the attempt) and
        recorded, and ``JobClient.result`` returns it as this model.

        ``exclusive``: a critical section's group (``"finance"``). At most
        ``exclusive_limit`` jobs of the group run at once per value of their ``key``,
        across every worker; jobs of several types share a section by naming the same
        group. A job that finds its section full is deferred (README: Critical sections).

        ``unique``: enqueueing this job while one with the same ``key`` value is live
        (queued, delayed, retrying or running), or ended less than ``unique`` seconds
        ago (0: only while live), publishes nothing and returns the live job's id. It
        needs the job log: ``JobClient(store=...)``, and a recorder (README: Unique
        jobs).
        """
        if not isinstance(name, str) or not _JOB_NAME.match(name):
            raise ContractError(
                f"invalid job name {name!r}: use 1-200 characters of letters, digits and"
                " '_', '.', ':', '-', starting with a letter, digit or '_'"
            )
        if not (isinstance(args_model, type) and issubclass(args_model, pydantic.BaseModel)):
            raise ContractError(
                f"job {name!r}: args_model must be a pydantic BaseModel subclass,"
                f" got {args_model!r}"
            )
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise ContractError(f"job {name!r}: retry must be a RetryPolicy, got {retry!r}")
        self.name = name
        self.args_model = args_model
        self.queue = check_queue_name(queue)
        self.retry = retry if retry is not None else RetryPolicy()
        self.timeout = None if timeout is None else seconds(timeout, f"job {name!r} timeout")
        if self.timeout == 0:
            raise ContractError(f"job {name!r}: timeout must be > 0 (or None for no timeout)")
        if key is not None and (not isinstance(key, str) or key not in args_model.model_fields):
            raise ContractError(
                f"job {name!r}: key must name a field of {args_model.__name__}"
                f" ({', '.join(args_model.model_fields) or 'it has none'}), got {key!r}"
            )
        self.key = key
        if result_model is not None and not (
            isinstance(result_model, type) and issubclass(result_model, pydantic.BaseModel)
        ):
            raise ContractError(
                f"job {name!r}: result_model must be a pydantic BaseModel subclass,"
                f" got {result_model!r}"
            )
        self.result_model = result_model
        if exclusive is not None:
            if not isinstance(exclusive, str) or not _GROUP.match(exclusive):
                raise ContractError(
                    f"job {name!r}: exclusive must name a group (1-64 of letters, digits,"
                    f" '_', '.', '-'), got {exclusive!r}"
                )
            if key is None:
                raise ContractError(
                    f"job {name!r}: exclusive={exclusive!r} needs key= (the args field whose"
                    " value the section is per)"
                )
        if (
            isinstance(exclusive_limit, bool)
            or not isinstance(exclusive_limit, int)
            or not (1 <= exclusive_limit <= MAX_EXCLUSIVE_LIMIT)
        ):
            raise ContractError(
                f"job {name!r}: exclusive_limit must be an int from 1 to"
                f" {MAX_EXCLUSIVE_LIMIT}, got {exclusive_limit!r}"
            )
        self.exclusive = exclusive
        self.exclusive_limit = exclusive_limit
        if unique is not None:
            unique = seconds(unique, f"job {name!r} unique")
            if key is None:
                raise ContractError(
                    f"job {name!r}: unique= needs key= (the args field whose value makes a"
                    " job the same as another)"
                )
        self.unique: float | None = unique

    def __repr__(self) -> str:
        return f"Job({self.name!r}, {self.args_model.__name__}, queue={self.queue!r})"

    def validate(self, args: ArgsT | Mapping[str, Any]) -> ArgsT:
        """Return ``args`` as the job's model, or raise ArgsValidationError naming the field."""
        if isinstance(args, self.args_model):
            return args
        if isinstance(args, pydantic.BaseModel):
            raise ArgsValidationError(
                self.name,
                [
                    {
                        "loc": (),
                        "msg": f"expected {self.args_model.__name__}, got {type(args).__name__}",
                    }
                ],
            )
        try:
            return self.args_model.model_validate(args)
        except pydantic.ValidationError as exc:
            raise ArgsValidationError(self.name, _errors(exc)) from None

    def encode_args(self, args: ArgsT | Mapping[str, Any]) -> bytes:
        """Validate and serialise args to the wire body (the model's JSON).

        Raises ArgsValidationError for args that JSON cannot carry: values pydantic cannot
        serialise, and NaN or infinities, which pydantic would write as null (or, if the
        model says so, as NaN or "NaN": not JSON numbers either).
        """
        model = self.validate(args)
        try:
            body = model.model_dump_json()
        except PydanticSerializationError as exc:
            raise ArgsValidationError(self.name, [_unserialisable(model, exc)]) from exc
        # Only a body that holds one of these can carry a non-finite float, so most
        # bodies are never looked at again.
        if "null" in body or "NaN" in body or "Infinity" in body:
            loc = _non_finite(_dumped(model))
            if loc is not None:
                raise ArgsValidationError(self.name, [_not_finite(tuple(reversed(loc)))])
        return body.encode()

    def key_of(self, args: pydantic.BaseModel) -> str | None:
        """The job's key in validated ``args``, as text (None without a key field, or
        when the field is None)."""
        if self.key is None:
            return None
        value = getattr(args, self.key, None)
        if value is None:
            return None
        text = value if isinstance(value, str) else str(getattr(value, "value", value))
        if not text or len(text) > MAX_KEY_LENGTH:
            raise ArgsValidationError(
                self.name,
                [{"loc": (self.key,), "msg": f"a job key must be 1-{MAX_KEY_LENGTH} characters"}],
            )
        return text

    def result_data(self, value: Any) -> Any:
        """The handler's return value as JSON data, for the job log and a waiting caller.

        With a ``result_model`` the value must pass it (a model instance or a mapping);
        without one, anything pydantic can write as JSON is kept as such and anything else
        is recorded as None. Raises ResultError for a value the model refuses, one JSON
        cannot carry, or one larger than ``MAX_RESULT_BYTES`` as JSON.
        """
        if self.result_model is None:
            if value is None:
                return None
            try:
                data = pydantic_core.to_jsonable_python(value)
            except (PydanticSerializationError, ValueError, TypeError):
                return None
        else:
            try:
                model = (
                    value
                    if isinstance(value, self.result_model)
                    else self.result_model.model_validate(value)
                )
                data = model.model_dump(mode="json")
            except pydantic.ValidationError as exc:
                fields = "; ".join(
                    f"{'.'.join(str(p) for p in e['loc']) or '<result>'}: {e['msg']}"
                    for e in exc.errors(include_url=False, include_input=False)
                )
                raise ResultError(
                    f"job {self.name!r} returned a result its {self.result_model.__name__}"
                    f" refuses: {fields}"
                ) from None
            except PydanticSerializationError as exc:
                raise ResultError(f"job {self.name!r}: its result cannot be JSON: {exc}") from None
        size = len(pydantic_core.to_json(data))
        if size > MAX_RESULT_BYTES:
            raise ResultError(
                f"job {self.name!r} returned {size} bytes of JSON; a result may take at most"
                f" {MAX_RESULT_BYTES} (keep large data elsewhere and return a reference)"
            )
        return data

    def decode_args(self, body: bytes) -> ArgsT:
        """Parse a wire body into the model, or raise ArgsValidationError."""
        try:
            return self.args_model.model_validate_json(body)
        except pydantic.ValidationError as exc:
            raise ArgsValidationError(self.name, _errors(exc)) from None

    def json_schema(self) -> dict[str, Any]:
        """The JSON Schema of the job's body, for publishers in other languages."""
        return self.args_model.model_json_schema()


def _errors(exc: pydantic.ValidationError) -> list[dict[str, object]]:
    return [
        {"loc": tuple(e["loc"]), "msg": e["msg"], "type": e["type"]}
        for e in exc.errors(include_url=False, include_input=False)
    ]


def _unserialisable(
    model: pydantic.BaseModel, exc: PydanticSerializationError
) -> dict[str, object]:
    """The error for args pydantic cannot write as JSON, naming the field if one alone fails."""
    names = [*type(model).model_fields, *(model.__pydantic_extra__ or ())]
    failing = []
    for name in names:
        try:
            model.model_dump_json(include={name})
        except Exception:
            failing.append(name)
    # every field failing alone means the model's own serialiser fails, not one field
    loc = (failing[0],) if failing and (len(failing) < len(names) or len(names) == 1) else ()
    msg = f"cannot be serialised to JSON: {exc}"
    if "utf-8" in msg.lower():
        msg += " (bytes are sent as UTF-8 text; base64-encode binary data)"
    return {"loc": loc, "msg": msg, "type": "serialization_error"}


def _dumped(model: pydantic.BaseModel) -> object:
    """What the model serialises, as Python (the model itself if that fails)."""
    try:
        return model.model_dump()
    except Exception:  # a serialiser that works only for JSON
        return model


def _not_finite(loc: tuple[str | int, ...]) -> dict[str, object]:
    return {
        "loc": loc,
        "msg": "Input should be a finite number (NaN and infinities are not JSON)",
        "type": "finite_number",
    }


def _non_finite(value: Any) -> list[str | int] | None:
    """The path, innermost key first, to the first NaN or infinity in ``value`` (what a
    model dumps to: dicts, lists, tuples, sets and scalars), or None."""
    items: Any
    if isinstance(value, float):
        return None if math.isfinite(value) else []
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list | tuple | set | frozenset):
        if all(type(v) is int or (type(v) is float and math.isfinite(v)) for v in value):
            return None
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        path = _non_finite(item)
        if path is not None:
            path.append(key if isinstance(key, str | int) else str(key))
            return path
    return None


# -- a namespace and its settings -----------------------------------------------------

QueueType = Literal["quorum", "classic"]

#: RabbitMQ refuses an x-message-ttl above ten years.
MAX_TTL_MS = 315_360_000_000

#: Time allowed per queue hop of the cascade: the publisher aims this much early per hop,
#: and the worker waits out the rest, so broker latency does not make jobs late.
HOP_ALLOWANCE_MS = 25
#: And this much early once per job: between the publisher computing a route and the
#: broker routing the message, a burst of publishes waits in the client's and the
#: broker's queues (1,000 gathered enqueues: up to 0.3 s here), which only makes jobs
#: late. Arriving early costs nothing but a longer wait in the worker's memory.
PUBLISH_ALLOWANCE_MS = 150


@dataclass(frozen=True)
class TopologySettings:
    """Queue arguments shared by publishers and workers of one namespace.

    Both sides must agree: the broker refuses a second declaration with other arguments.
    The defaults give a maximum single-pass delay of 621 days (longer delays pass the
    cascade again) and hold at most the last 100 ms (plus the allowances) in the worker.
    """

    queue_type: QueueType = "quorum"
    delivery_limit: int = 10
    delay_unit_ms: int = 100
    delay_levels: int = 29
    #: The events stream keeps events this long (RabbitMQ's x-max-age: a number and one
    #: of Y, M, D, h, m, s) and at most this many bytes, whichever comes first; it drops
    #: whole segments of at most a tenth of that.
    events_max_age: str = "7D"
    events_max_bytes: int = 1_000_000_000

    def __post_init__(self) -> None:
        if self.queue_type not in ("quorum", "classic"):
            raise ContractError(
                f"queue_type must be 'quorum' or 'classic', got {self.queue_type!r}"
            )
        if not 1 <= self.delivery_limit <= 1000:
            raise ContractError(f"delivery_limit must be 1..1000, got {self.delivery_limit}")
        if not 1 <= self.delay_unit_ms <= 60_000:
            raise ContractError(f"delay_unit_ms must be 1..60000, got {self.delay_unit_ms}")
        if not 1 <= self.delay_levels <= 40:
            raise ContractError(f"delay_levels must be 1..40, got {self.delay_levels}")
        if not isinstance(self.events_max_age, str) or not _MAX_AGE.match(self.events_max_age):
            raise ContractError(
                f"events_max_age must be a number and one of Y, M, D, h, m, s (RabbitMQ's"
                f" x-max-age, e.g. '7D'), got {self.events_max_age!r}"
            )
        if not 1_000_000 <= self.events_max_bytes <= 10**13:
            raise ContractError(
                f"events_max_bytes must be 1e6..1e13, got {self.events_max_bytes!r}"
            )
        top = self.delay_unit_ms << (self.delay_levels - 1)
        if top > MAX_TTL_MS:
            raise ContractError(
                f"the top delay level's TTL would be {top} ms, above RabbitMQ's limit of"
                f" {MAX_TTL_MS} ms (ten years): use fewer delay_levels or a smaller delay_unit_ms"
            )

    @property
    def max_units(self) -> int:
        return (1 << self.delay_levels) - 1

    @property
    def max_delay_ms(self) -> int:
        """Longest delay one pass through the cascade can spell."""
        return self.max_units * self.delay_unit_ms

    @property
    def hold_window_ms(self) -> int:
        """A job due within this many ms may be held by the worker instead of re-delayed."""
        return self.delay_unit_ms + PUBLISH_ALLOWANCE_MS + HOP_ALLOWANCE_MS * self.delay_levels


@dataclass(frozen=True)
class Namespace:
    """A namespace's name and topology settings, in one object that publishers
    (``JobClient``) and workers (``JobApp``) both take, so they cannot disagree on
    settings by accident: the broker refuses a queue declared twice with other arguments.
    """

    name: str
    settings: TopologySettings = field(default_factory=TopologySettings)

    def __post_init__(self) -> None:
        check_namespace(self.name)
        if not isinstance(self.settings, TopologySettings):
            raise ContractError(f"settings must be TopologySettings, got {self.settings!r}")

    def __str__(self) -> str:
        return self.name

    @classmethod
    def of(cls, namespace: Namespace | str, settings: TopologySettings | None = None) -> Namespace:
        """``namespace`` as a Namespace; ``settings`` may only be given with a name (or
        be the namespace's own), never contradict it."""
        if isinstance(namespace, Namespace):
            if settings is not None and settings != namespace.settings:
                raise ContractError(
                    f"namespace {namespace.name!r} has its own settings; do not pass other"
                    " settings= with it"
                )
            return namespace
        return cls(namespace, settings or TopologySettings())
