"""The wire contract, protocol version 1: how a job travels as an AMQP message.

Encoding and decoding live only here. Decoding never trusts its input: whatever a
publisher sends, ``decode`` either returns an Envelope or raises PoisonMessage with a
dead-letter reason, never anything else.
"""

from __future__ import annotations

import calendar
import math
import os
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any, Protocol

from amqp_jobs.clock import WALL
from amqp_jobs.contract import MAX_ETA_AHEAD_MS as MAX_ETA_AHEAD_MS
from amqp_jobs.errors import ContractError

PROTOCOL_VERSION = 1
CONTENT_TYPE = "application/json"

H_PROTOCOL = "job-protocol"
H_ATTEMPT = "job-attempt"
H_ETA = "job-eta"
H_QUEUE = "job-queue"
H_ERROR_TYPE = "job-error-type"
H_ERROR_MESSAGE = "job-error-message"
H_ERROR_TRACEBACK = "job-error-traceback"
H_FAILED_AT = "job-failed-at"
H_DEAD_REASON = "job-dead-reason"
H_TRACEPARENT = "traceparent"
#: The job's key (a contract's ``key`` field, as text): what the job log indexes, and
#: what per-key locks and unique jobs are keyed on.
H_KEY = "job-key"
#: Times an operator replayed the job from the dead-letter queue; times middleware or a
#: handler deferred the current attempt. With the attempt they order the job's events.
H_REPLAYS = "job-replays"
H_DEFERRALS = "job-deferrals"
#: The queue a waiting client reads outcomes from (a header: it survives retries).
H_REPLY_TO = "job-reply-to"
#: ``high`` for a job published to the high-priority exchange (absent: normal).
H_PRIORITY = "job-priority"
HIGH, NORMAL = "high", "normal"

#: Headers of the previous failure; replaced on every republish.
ERROR_HEADERS = (H_ERROR_TYPE, H_ERROR_MESSAGE, H_ERROR_TRACEBACK, H_FAILED_AT, H_DEAD_REASON)

MAX_ERROR_MESSAGE = 1024
MAX_TRACEBACK = 8192
DEFAULT_MAX_BODY = 1024 * 1024
MAX_ATTEMPT = 1_000_000
#: ETAs before 2000-01-01 are rejected: most likely seconds sent where milliseconds belong.
MIN_ETA_MS = 946_684_800_000
# MAX_ETA_AHEAD_MS (imported above): later ETAs are rejected as absurd (about 100 years).

#: A parked or moved copy of a message that arrived without a message_id gets an id of
#: this prefix and 16 random hex digits: aiormq would otherwise invent a uuid that looks
#: like a real job id (publishes need distinct ids: aiormq matches returns by them).
#: Publishers may not use job ids of this prefix.
NO_ID_PREFIX = "no-id:"

#: User headers may take this many bytes encoded: a message's properties must fit in one
#: frame (128 KiB by default), next to our headers and a retry's error headers (up to 37
#: KiB). A larger frame makes the broker close the connection.
MAX_USER_HEADERS_BYTES = 64 * 1024
#: Nesting of lists and tables in a header value (deeper is refused, as is a cycle).
MAX_HEADER_DEPTH = 32


class DeadReason(StrEnum):
    """Why a job is in the dead-letter queue (header ``job-dead-reason``)."""

    EXHAUSTED = "exhausted"  # failed on its last allowed attempt
    DISCARDED = "discarded"  # the handler raised Discard
    NOT_RETRYABLE = "not-retryable"  # the error matched give_up_on, or not retry_on
    INVALID_ARGS = "invalid-args"  # body is JSON but fails the args model
    INVALID_JSON = "invalid-json"
    INVALID_ENCODING = "invalid-encoding"  # body is not UTF-8
    WRONG_CONTENT_TYPE = "wrong-content-type"
    MISSING_JOB_NAME = "missing-job-name"  # no `type` property
    UNKNOWN_JOB = "unknown-job"  # no handler for `type` in this worker
    INVALID_HEADERS = "invalid-headers"  # job-attempt / job-eta / headers malformed
    UNSUPPORTED_PROTOCOL = "unsupported-protocol"
    TOO_LARGE = "too-large"
    DELIVERY_LIMIT = "delivery-limit"  # dead-lettered by the broker: worker crashed on it


class PoisonMessage(Exception):
    """A delivery that can never run; carries the dead-letter reason."""

    def __init__(self, reason: DeadReason, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


class RawMessage(Protocol):
    """What decode reads from a delivery (aio-pika's IncomingMessage fits)."""

    @property
    def body(self) -> bytes: ...
    @property
    def content_type(self) -> str | None: ...
    @property
    def type(self) -> str | None: ...
    @property
    def message_id(self) -> str | None: ...
    @property
    def timestamp(self) -> datetime | None: ...
    @property
    def headers(self) -> Mapping[str, Any]: ...


now_ms = WALL.now_ms
#: The ETA ``seconds`` from now (wall clock) in epoch ms, rounded up.
eta_after = WALL.ms_after


@dataclass(frozen=True, slots=True)
class Message:
    """A message to publish, in the contract's terms; each transport turns it into its
    client library's frames. It reads like a delivery (RawMessage), so a copy of a copy
    is built the same way."""

    body: bytes
    content_type: str | None
    message_id: str | None
    type: str | None
    timestamp: datetime | None
    headers: Mapping[str, Any]


@dataclass(frozen=True)
class ErrorInfo:
    """A failure as recorded in the error headers (bounded in size)."""

    type: str
    message: str
    traceback: str = ""

    @classmethod
    def from_exception(cls, exc: BaseException) -> ErrorInfo:
        """The error headers' view of ``exc``; never raises, whatever ``exc`` does.

        An exception whose ``__str__`` fails gets ``<unprintable Name: __str__ raised E>``;
        text that UTF-8 cannot encode (lone surrogates) is escaped, as headers need.
        """
        name = _type_name(exc)
        try:
            text = str(exc)
            # a str subclass may override anything; the exact str is what headers carry
            message = text if type(text) is str else str.__str__(text)
        except Exception as why:
            message = f"<unprintable {name}: __str__ raised {_type_name(why)}>"
        message = _bounded(_encodable(message), MAX_ERROR_MESSAGE)
        last = f"{name}: {message}\n" if message else f"{name}\n"
        try:
            frames = "Traceback (most recent call last):\n" + _encodable(
                "".join(traceback.format_tb(exc.__traceback__))
            )
        except Exception as why:
            frames = f"<traceback unavailable: formatting it raised {_type_name(why)}>\n"
        return cls(name, message, _tail(frames, MAX_TRACEBACK - len(last)) + last)


def _type_name(exc: BaseException) -> str:
    """``Name`` for builtins, ``module.Qual.Name`` otherwise; never raises."""
    kind = type(exc)
    try:
        module, qualname = kind.__module__, kind.__qualname__
        name = qualname if module == "builtins" else f"{module}.{qualname}"
        return _encodable(name) if type(name) is str else "<unnamed exception>"
    except Exception:
        return "<unnamed exception>"


def _encodable(text: str) -> str:
    """``text`` with lone surrogates escaped, so that UTF-8 (and so pamqp) can encode it."""
    if text.isascii():
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _bounded(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _tail(text: str, limit: int) -> str:
    return text if len(text) <= limit else "…" + text[-(limit - 1) :]


@dataclass(frozen=True)
class Envelope:
    """One job message: the args body plus the properties and headers of the contract."""

    job_name: str
    job_id: str
    body: bytes
    queue: str | None = None
    attempt: int = 1
    eta_ms: int | None = None
    enqueued_at: datetime | None = None
    #: headers this version does not interpret (error headers, traceparent, others' own)
    extra_headers: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def new(
        cls,
        job_name: str,
        body: bytes,
        queue: str,
        *,
        eta_ms: int | None = None,
        job_id: str | None = None,
        headers: Mapping[str, Any] | None = None,
    ) -> Envelope:
        return cls(
            job_name=job_name,
            # 128 random bits as 32 hex digits; uuid4() costs four times as much
            job_id=job_id or os.urandom(16).hex(),
            body=body,
            queue=queue,
            eta_ms=eta_ms,
            enqueued_at=datetime.now(UTC).replace(microsecond=0),
            extra_headers=dict(headers or {}),
        )

    @property
    def dead_reason(self) -> str | None:
        value = self.extra_headers.get(H_DEAD_REASON)
        return value if isinstance(value, str) else None

    def headers(self) -> dict[str, Any]:
        headers: dict[str, Any] = {
            k: v for k, v in self.extra_headers.items() if not _is_broker_header(k)
        }
        headers[H_PROTOCOL] = PROTOCOL_VERSION
        headers[H_ATTEMPT] = self.attempt
        if self.queue is not None:
            headers[H_QUEUE] = self.queue
        if self.eta_ms is not None:
            headers[H_ETA] = self.eta_ms
        else:
            headers.pop(H_ETA, None)
        return headers

    def to_message(self) -> Message:
        return Message(
            self.body, CONTENT_TYPE, self.job_id, self.job_name, self.enqueued_at, self.headers()
        )

    def deferred(self, eta_ms: int, *, counted: bool = False) -> Envelope:
        """The same attempt again at ``eta_ms``: a re-delay (arrived early), or, when
        ``counted``, a deferral by middleware or the handler (counted in H_DEFERRALS, so
        that the job's events keep their order; never towards its attempts)."""
        if not counted:
            return replace(self, eta_ms=eta_ms)
        headers = dict(self.extra_headers)
        headers[H_DEFERRALS] = header_count(headers.get(H_DEFERRALS)) + 1
        return replace(self, eta_ms=eta_ms, extra_headers=headers)

    def next_attempt(self, error: ErrorInfo, eta_ms: int) -> Envelope:
        """The copy that retries this job: same id, attempt + 1, last error recorded."""
        return replace(
            self,
            attempt=self.attempt + 1,
            eta_ms=eta_ms,
            extra_headers=_with_error(self.extra_headers, error, None),
        )


def _with_error(
    headers: Mapping[str, Any], error: ErrorInfo, reason: DeadReason | None
) -> dict[str, Any]:
    out = {k: v for k, v in headers.items() if k not in ERROR_HEADERS}
    out[H_ERROR_TYPE] = error.type
    out[H_ERROR_MESSAGE] = error.message
    if error.traceback:
        out[H_ERROR_TRACEBACK] = error.traceback
    out[H_FAILED_AT] = now_ms()
    if reason is not None:
        out[H_DEAD_REASON] = str(reason)
    return out


def _is_broker_header(name: str) -> bool:
    """x-death and friends belong to the broker's last hop; never carried forward."""
    return name.startswith("x-")


def check_headers(headers: Mapping[str, Any]) -> None:
    """Refuse, with a ContractError naming the header, what a publish could not carry.

    Names are non-empty strings of at most 128 bytes (pamqp would cut longer ones),
    not ``x-`` (the broker's) nor ``job-`` (the contract's, set by amqp-jobs). Values are
    what pamqp encodes into an AMQP table and RabbitMQ accepts: None, bool, int (signed
    64-bit), float (finite; sent as 32-bit), str, Decimal (scale 0..255, 32-bit
    mantissa), datetime (1970 or later; whole seconds), bytearray, and lists and dicts
    (str keys) of these. Not bytes or tuples: pamqp refuses them. Together at most
    MAX_USER_HEADERS_BYTES encoded.
    """
    if type(headers) is not dict and not isinstance(headers, Mapping):
        raise ContractError(f"headers must be a mapping of names to values, got {headers!r}")
    size = 0
    # the common cases inline: this runs on every enqueue that passes headers
    for name, value in headers.items():
        if (
            type(name) is str
            and 0 < len(name) <= 128
            and name.isascii()
            and not name.startswith(_RESERVED_PREFIXES)
        ):
            size += 1 + len(name)
        else:
            size += _header_name_size(name)
        kind = type(value)
        if kind is str and value.isascii():
            size += 5 + len(value)
        elif kind is int and -(2**63) <= value < 2**63:
            size += 9
        else:
            size += _value_size(value, name, 0)
    if size > MAX_USER_HEADERS_BYTES:
        raise ContractError(
            f"headers take {size} bytes encoded; at most {MAX_USER_HEADERS_BYTES} fit"
            " (MAX_USER_HEADERS_BYTES): put large data in the args"
        )


_RESERVED_PREFIXES = ("x-", "job-")


def check_middleware_headers(headers: Mapping[str, Any], before: Mapping[str, Any]) -> None:
    """``check_headers`` of what a publish middleware left in a job's headers, less the
    contract's own that amqp-jobs set (``job-key``, ``job-priority``, ``job-reply-to``)
    and it left as they were: a middleware may add headers of its own, not set, change
    or remove those."""
    for name in before:
        if isinstance(name, str) and name.startswith(_RESERVED_PREFIXES) and name not in headers:
            raise ContractError(
                f"header {name!r} was removed by a publish middleware: names starting with"
                " job- belong to the job contract (amqp-jobs sets them)"
            )
    check_headers(
        {
            name: value
            for name, value in headers.items()
            if not (
                isinstance(name, str)
                and name.startswith(_RESERVED_PREFIXES)
                and name in before
                and before[name] == value
            )
        }
    )


def _header_name_size(name: object) -> int:
    size = _name_size(name, "header")
    assert isinstance(name, str)
    if name.startswith("x-"):
        raise ContractError(f"header {name!r}: names starting with x- belong to the broker")
    if name.startswith("job-"):
        raise ContractError(
            f"header {name!r}: names starting with job- belong to the job contract"
            " (amqp-jobs sets them)"
        )
    return size


def _name_size(name: object, what: str) -> int:
    if type(name) is not str or not name:
        raise ContractError(f"{what} names must be non-empty strings, got {name!r}")
    size = len(name) if name.isascii() else _utf8_size(name, f"{what} name {name!r}")
    if size > 128:
        raise ContractError(f"{what} name {name[:40]!r}…: at most 128 bytes of UTF-8")
    return 1 + size


def _utf8_size(text: str, where: str) -> int:
    try:
        return len(text.encode())
    except UnicodeEncodeError:
        raise ContractError(f"{where}: text UTF-8 cannot encode (a lone surrogate)") from None


def _value_size(value: object, where: str, depth: int) -> int:
    """The encoded size of one table value (an upper bound), or ContractError if pamqp or
    the broker would refuse it."""
    if value is None:
        return 1
    if isinstance(value, bool):
        return 2
    if isinstance(value, int):
        if not -(2**63) <= value < 2**63:
            raise ContractError(f"header {where!r}: {value} does not fit a signed 64-bit int")
        return 9
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ContractError(f"header {where!r}: {value} is not finite (RabbitMQ refuses it)")
        if abs(value) > _FLOAT32_MAX:
            raise ContractError(f"header {where!r}: {value} does not fit a 32-bit float")
        return 5
    if isinstance(value, str):
        return 5 + _utf8_size(value, f"header {where!r}")
    if isinstance(value, Decimal):
        _check_decimal(value, where)
        return 6
    if isinstance(value, datetime):
        _check_timestamp(value, where)
        return 9
    if isinstance(value, time.struct_time):
        if calendar.timegm(value) < 0:
            raise ContractError(f"header {where!r}: timestamps before 1970 cannot be sent")
        return 9
    if isinstance(value, bytearray):
        return 5 + len(value)
    if isinstance(value, list | dict):
        if depth >= MAX_HEADER_DEPTH:
            raise ContractError(
                f"header {where!r}: nested more than {MAX_HEADER_DEPTH} deep (or contains itself)"
            )
        if isinstance(value, list):
            return 5 + sum(
                _value_size(item, f"{where}[{i}]", depth + 1) for i, item in enumerate(value)
            )
        return 5 + sum(
            _name_size(key, f"header {where!r} table")
            + _value_size(item, f"{where}.{key}", depth + 1)
            for key, item in value.items()
        )
    hint = ": use bytearray" if isinstance(value, bytes) else ""
    hint = ": use a list" if isinstance(value, tuple) else hint
    raise ContractError(
        f"header {where!r}: an AMQP table cannot carry {type(value).__name__}{hint}"
        " (None, bool, int, float, str, Decimal, datetime, bytearray, list and dict can)"
    )


_FLOAT32_MAX = 3.4028234663852886e38


def _check_decimal(value: Decimal, where: str) -> None:
    """What pamqp's decimal encoder accepts: finite, scale 0..255, 32-bit mantissa."""
    _, digits, exponent = value.as_tuple()
    if not isinstance(exponent, int):
        raise ContractError(f"header {where!r}: Decimal {value} is not finite")
    scale = max(0, -exponent)
    if scale > 255:
        raise ContractError(f"header {where!r}: Decimal {value} has more than 255 decimals")
    # a mantissa of more than 10 digits cannot fit; checked before 1E+999999999 is expanded
    fits = len(digits) + max(0, exponent) <= 10
    if not fits or not -(2**31) <= int(value.scaleb(scale)) < 2**31:
        raise ContractError(f"header {where!r}: Decimal {value} needs more than 32 bits of digits")


def _check_timestamp(value: datetime, where: str) -> None:
    """pamqp sends whole seconds since 1970 as unsigned 64-bit (naive means UTC)."""
    if value.tzinfo is None or value.utcoffset() is None:
        value = value.replace(tzinfo=UTC)
    try:
        seconds = value.timestamp()
    except (OverflowError, ValueError, OSError):
        seconds = -1.0
    if seconds < 0:
        raise ContractError(f"header {where!r}: timestamps before 1970 cannot be sent")


def dead_message(raw: RawMessage, reason: DeadReason, error: ErrorInfo, queue: str) -> Message:
    """A copy of ``raw`` for the dead-letter queue, carrying the reason and the error.

    Built from the raw delivery, not an Envelope, so that messages which never decoded
    are parked exactly as they arrived (body and properties), plus our headers.
    """
    clean = _own_headers(raw)
    clean.setdefault(H_QUEUE, queue)
    return _copy(raw, _with_error(clean, error, reason))


def moved_message(raw: RawMessage, queue: str) -> Message:
    """A copy of ``raw`` as it arrived, minus the broker's headers (for the quarantine)."""
    headers = _own_headers(raw)
    headers.setdefault(H_QUEUE, queue)
    return _copy(raw, headers)


def replay_message(raw: RawMessage, queue: str) -> Message:
    """The copy that replays a dead job: same id and args, attempt 1, errors dropped,
    one more replay counted (its events then come after the dead one's)."""
    headers = {k: v for k, v in _own_headers(raw).items() if k not in ERROR_HEADERS}
    headers.pop(H_ETA, None)
    headers.pop(H_DEFERRALS, None)
    headers[H_ATTEMPT] = 1
    headers[H_REPLAYS] = header_count(headers.get(H_REPLAYS)) + 1
    headers.setdefault(H_QUEUE, queue)
    return _copy(raw, headers)


def header_count(value: Any) -> int:
    """A counting header's value, 0 when absent or not a non-negative int."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return 0
    return value


def _own_headers(raw: RawMessage) -> dict[str, Any]:
    headers = raw.headers if isinstance(raw.headers, Mapping) else {}
    return {k: v for k, v in headers.items() if isinstance(k, str) and not _is_broker_header(k)}


def _copy(raw: RawMessage, headers: dict[str, Any]) -> Message:
    """A persistent copy of a delivery's body and properties with new headers.

    A delivery without a message_id gets a marked one (NO_ID_PREFIX), never a real-looking
    one: aiormq invents a uuid for every publish without an id.
    """
    return Message(
        raw.body,
        raw.content_type,
        raw.message_id or NO_ID_PREFIX + os.urandom(8).hex(),
        raw.type,
        raw.timestamp,
        headers,
    )


def decode(raw: RawMessage, *, max_body: int = DEFAULT_MAX_BODY) -> Envelope:
    """Read the contract's properties and headers, or raise PoisonMessage saying why not.

    The body is only size-checked here: its JSON is parsed once, by the job's model.
    """
    body = raw.body
    if len(body) > max_body:
        raise PoisonMessage(DeadReason.TOO_LARGE, f"body of {len(body)} bytes > {max_body}")
    content_type = raw.content_type
    if content_type != CONTENT_TYPE and (
        not content_type or content_type.split(";")[0].strip().lower() != CONTENT_TYPE
    ):
        raise PoisonMessage(
            DeadReason.WRONG_CONTENT_TYPE,
            f"content_type must be {CONTENT_TYPE!r}, got {content_type!r}",
        )
    job_name = raw.type
    if not job_name:
        raise PoisonMessage(DeadReason.MISSING_JOB_NAME, "the `type` property must name the job")
    headers = raw.headers
    if type(headers) is not dict and not isinstance(headers, Mapping):
        raise PoisonMessage(DeadReason.INVALID_HEADERS, "headers are not a table")
    protocol = headers.get(H_PROTOCOL, PROTOCOL_VERSION)
    if protocol != PROTOCOL_VERSION or isinstance(protocol, bool):
        raise PoisonMessage(
            DeadReason.UNSUPPORTED_PROTOCOL, f"{H_PROTOCOL}={protocol!r}; this worker speaks 1"
        )
    attempt = headers.get(H_ATTEMPT, 1)
    if isinstance(attempt, bool) or not isinstance(attempt, int):
        raise PoisonMessage(
            DeadReason.INVALID_HEADERS, f"{H_ATTEMPT} must be an integer, got {attempt!r}"
        )
    if not 1 <= attempt <= MAX_ATTEMPT:
        raise PoisonMessage(
            DeadReason.INVALID_HEADERS, f"{H_ATTEMPT} must be 1..{MAX_ATTEMPT}, got {attempt}"
        )
    eta_ms = headers.get(H_ETA)
    if eta_ms is not None:
        if isinstance(eta_ms, bool) or not isinstance(eta_ms, int):
            raise PoisonMessage(
                DeadReason.INVALID_HEADERS,
                f"{H_ETA} must be integer epoch milliseconds, got {eta_ms!r}",
            )
        if eta_ms < MIN_ETA_MS or eta_ms > now_ms() + MAX_ETA_AHEAD_MS:
            raise PoisonMessage(
                DeadReason.INVALID_HEADERS,
                f"{H_ETA}={eta_ms} is not a plausible epoch time in milliseconds",
            )
    queue = headers.get(H_QUEUE)
    job_id = raw.message_id or ""
    if not job_id:
        raise PoisonMessage(
            DeadReason.INVALID_HEADERS, "the `message_id` property (job id) is missing"
        )
    timestamp = raw.timestamp
    return Envelope(
        job_name=job_name,
        job_id=job_id,
        body=body,
        queue=queue if isinstance(queue, str) else None,
        attempt=attempt,
        eta_ms=eta_ms,
        enqueued_at=timestamp if isinstance(timestamp, datetime) else None,
        extra_headers={
            k: v
            for k, v in headers.items()
            if k not in _OWN_HEADERS and type(k) is str and not _is_broker_header(k)
        },
    )


_OWN_HEADERS = frozenset({H_PROTOCOL, H_ATTEMPT, H_ETA, H_QUEUE})


def check_body(body: bytes) -> None:
    """Reject non-UTF-8 bodies before JSON parsing, so the reason says which it is."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PoisonMessage(
            DeadReason.INVALID_ENCODING, f"body is not UTF-8 (byte {exc.start})"
        ) from None
