"""The wire contract: what encode writes and what decode accepts or dead-letters."""

import time
from datetime import UTC, datetime
from typing import Any

import aio_pika
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amqp_jobs.message import (
    H_ATTEMPT,
    H_DEAD_REASON,
    H_ERROR_MESSAGE,
    H_ERROR_TRACEBACK,
    H_ERROR_TYPE,
    H_ETA,
    H_FAILED_AT,
    H_PROTOCOL,
    H_QUEUE,
    MAX_TRACEBACK,
    NO_ID_PREFIX,
    DeadReason,
    Envelope,
    ErrorInfo,
    PoisonMessage,
    check_body,
    dead_message,
    decode,
    eta_after,
    now_ms,
    replay_message,
)
from amqp_jobs.transport.amqp.link import envelope_properties


def make(body: bytes = b"{}", **props: Any) -> aio_pika.Message:
    base: dict[str, Any] = {
        "content_type": "application/json",
        "type": "a.job",
        "message_id": "id-1",
        "headers": {},
    }
    base.update(props)
    return aio_pika.Message(body, **base)


def test_encode_follows_protocol_1() -> None:
    env = Envelope.new("emails.send", b'{"x":1}', "emails", eta_ms=now_ms() + 5000)
    msg = env.to_message()
    assert msg.content_type == "application/json"
    assert envelope_properties(env).delivery_mode == 2  # persistent on the wire
    assert msg.message_id == env.job_id
    assert len(env.job_id) == 32
    assert msg.type == "emails.send"
    assert isinstance(msg.timestamp, datetime)
    assert msg.headers[H_PROTOCOL] == 1
    assert msg.headers[H_ATTEMPT] == 1
    assert msg.headers[H_QUEUE] == "emails"
    assert msg.headers[H_ETA] == env.eta_ms
    assert not any(k.startswith("x-") for k in msg.headers)


def test_round_trip() -> None:
    env = Envelope.new(
        "a.job", b'{"x":1}', "q", eta_ms=now_ms() + 1000, headers={"traceparent": "00-abc"}
    )
    back = decode(env.to_message())  # type: ignore[arg-type]
    assert (back.job_name, back.job_id, back.body, back.queue, back.attempt, back.eta_ms) == (
        env.job_name,
        env.job_id,
        env.body,
        "q",
        1,
        env.eta_ms,
    )
    assert back.extra_headers == {"traceparent": "00-abc"}


def test_next_attempt_keeps_the_id_and_records_the_error() -> None:
    env = Envelope.new("a.job", b"{}", "q", headers={"x-death": [{"count": 1}], "traceparent": "t"})
    try:
        raise ValueError("bad thing")
    except ValueError as exc:
        error = ErrorInfo.from_exception(exc)
    retry = env.next_attempt(error, eta_ms=now_ms() + 100)
    headers = retry.to_message().headers
    assert retry.job_id == env.job_id
    assert headers[H_ATTEMPT] == 2
    assert headers[H_ERROR_TYPE] == "ValueError"
    assert headers[H_ERROR_MESSAGE] == "bad thing"
    assert "Traceback" in headers[H_ERROR_TRACEBACK]
    assert "x-death" not in headers, "broker headers never travel on"
    assert headers["traceparent"] == "t"
    again = retry.next_attempt(ErrorInfo("E", "m"), eta_ms=now_ms())
    assert again.attempt == 3
    assert again.to_message().headers[H_ERROR_TYPE] == "E"
    replay = replay_message(again.to_message(), "q")  # type: ignore[arg-type]
    assert replay.message_id == env.job_id
    assert replay.headers[H_ATTEMPT] == 1
    assert H_ERROR_TYPE not in replay.headers
    assert H_ETA not in replay.headers


def test_error_info_is_bounded() -> None:
    def deep(n: int) -> None:
        if n == 0:
            raise RuntimeError("x" * 5000)
        [deep(n - 1) for _ in range(1)]  # distinct frames: Python does not fold them

    try:
        deep(60)
    except RuntimeError as exc:
        info = ErrorInfo.from_exception(exc)
    assert len(info.message) <= 1024
    assert len(info.traceback) <= MAX_TRACEBACK
    assert info.traceback.startswith("…"), "the oldest frames are cut, the newest kept"
    assert "RuntimeError: xxx" in info.traceback
    assert "in deep" in info.traceback


def test_dead_message_keeps_the_original_and_adds_the_reason() -> None:
    raw = make(b"\xff\xfe", headers={"x-death": [], "x-first-death-queue": "q", "mine": "kept"})
    dead = dead_message(
        raw, DeadReason.INVALID_ENCODING, ErrorInfo("InvalidMessage", "not utf-8"), "work"
    )  # type: ignore[arg-type]
    assert dead.body == b"\xff\xfe"
    assert dead.message_id == "id-1"
    assert dead.type == "a.job"
    assert dead.headers[H_DEAD_REASON] == "invalid-encoding"
    assert dead.headers[H_ERROR_MESSAGE] == "not utf-8"
    assert dead.headers[H_QUEUE] == "work"
    assert isinstance(dead.headers[H_FAILED_AT], int)
    assert dead.headers["mine"] == "kept"
    assert not any(str(k).startswith("x-") for k in dead.headers)


@pytest.mark.parametrize(
    ("props", "reason"),
    [
        ({"content_type": "text/plain"}, DeadReason.WRONG_CONTENT_TYPE),
        ({"content_type": None}, DeadReason.WRONG_CONTENT_TYPE),
        ({"type": None}, DeadReason.MISSING_JOB_NAME),
        ({"type": ""}, DeadReason.MISSING_JOB_NAME),
        ({"message_id": None}, DeadReason.INVALID_HEADERS),
        ({"headers": {H_PROTOCOL: 2}}, DeadReason.UNSUPPORTED_PROTOCOL),
        ({"headers": {H_ATTEMPT: "2"}}, DeadReason.INVALID_HEADERS),
        ({"headers": {H_ATTEMPT: 0}}, DeadReason.INVALID_HEADERS),
        ({"headers": {H_ATTEMPT: 10**9}}, DeadReason.INVALID_HEADERS),
        ({"headers": {H_ATTEMPT: True}}, DeadReason.INVALID_HEADERS),
        ({"headers": {H_ETA: "tomorrow"}}, DeadReason.INVALID_HEADERS),
        ({"headers": {H_ETA: 1_700_000_000}}, DeadReason.INVALID_HEADERS),  # seconds, not ms
        ({"headers": {H_ETA: 10**16}}, DeadReason.INVALID_HEADERS),
    ],
)
def test_poison_properties(props: dict[str, Any], reason: DeadReason) -> None:
    with pytest.raises(PoisonMessage) as info:
        decode(make(**props))  # type: ignore[arg-type]
    assert info.value.reason is reason


def test_too_large() -> None:
    with pytest.raises(PoisonMessage) as info:
        decode(make(b"x" * 101), max_body=100)  # type: ignore[arg-type]
    assert info.value.reason is DeadReason.TOO_LARGE


def test_content_type_parameters_are_accepted() -> None:
    assert decode(make(content_type="application/json; charset=utf-8")).job_name == "a.job"  # type: ignore[arg-type]


def test_eta_in_the_recent_past_is_accepted() -> None:
    past = now_ms() - 86_400_000
    assert decode(make(headers={H_ETA: past})).eta_ms == past  # type: ignore[arg-type]


def test_non_utf8_body() -> None:
    with pytest.raises(PoisonMessage) as info:
        check_body(b'{"a": "\xff"}')
    assert info.value.reason is DeadReason.INVALID_ENCODING


header_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text() | st.binary(),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(
    body=st.binary(max_size=200),
    content_type=st.none()
    | st.sampled_from(["application/json", "text/plain"])
    | st.text(max_size=20),
    job_type=st.none() | st.text(max_size=30),
    message_id=st.none() | st.text(max_size=30),
    headers=st.dictionaries(
        st.sampled_from([H_PROTOCOL, H_ATTEMPT, H_ETA, H_QUEUE, "x-death", "other"])
        | st.text(max_size=8),
        header_values,
        max_size=6,
    ),
)
def test_decode_never_raises_anything_but_poison(
    body: bytes,
    content_type: str | None,
    job_type: str | None,
    message_id: str | None,
    headers: dict[str, Any],
) -> None:
    raw = make(
        body, content_type=content_type, type=job_type, message_id=message_id, headers=headers
    )
    try:
        env = decode(raw)  # type: ignore[arg-type]
    except PoisonMessage as exc:
        reason = exc.reason
    else:
        reason = None
    if reason is not None:
        assert isinstance(reason, DeadReason)
        return
    assert env.attempt >= 1
    assert env.job_name
    assert not any(k.startswith("x-") for k in env.extra_headers)
    # whatever decoded also encodes again
    assert env.to_message().headers[H_ATTEMPT] == env.attempt
    assert (
        env.enqueued_at is None
        or env.enqueued_at.tzinfo is not None
        or env.enqueued_at <= datetime.now(UTC).replace(tzinfo=None)
    )


@given(seconds=st.floats(0.0005, 10.0))
def test_an_eta_is_never_before_the_instant_it_names(seconds: float) -> None:
    """ETAs are whole milliseconds, rounded up: waiting for one never ends early."""
    before = time.time_ns()
    eta = eta_after(seconds)
    assert eta * 1_000_000 >= before + round(seconds * 1_000_000_000)
    assert eta * 1_000_000 <= time.time_ns() + round(seconds * 1_000_000_000) + 1_000_000


# --- error info never raises (issue 9, item 7) ---------------------------------------------


class StrRaises(ValueError):
    def __str__(self) -> str:
        raise RuntimeError("no text for you")


class StrReturnsInt(ValueError):
    def __str__(self) -> str:
        return 42  # type: ignore[return-value]


class StrReturnsSubclass(ValueError):
    class Text(str):
        def __len__(self) -> int:
            raise RuntimeError("weird str")

    def __str__(self) -> str:
        return self.Text("odd")


@pytest.mark.parametrize(
    ("exc", "message"),
    [
        (StrRaises(), "<unprintable {type}: __str__ raised RuntimeError>"),
        (StrReturnsInt(), "<unprintable {type}: __str__ raised TypeError>"),
        (StrReturnsSubclass(), "odd"),
        (ValueError("caf\udce9 ok"), "caf\\udce9 ok"),
    ],
)
def test_error_info_from_an_unprintable_exception(exc: BaseException, message: str) -> None:
    """A handler's odd exception still gives a type and a message that headers can carry."""
    try:
        raise exc
    except Exception as caught:
        info = ErrorInfo.from_exception(caught)
    kind = type(exc)
    assert info.type == (
        kind.__qualname__ if kind is ValueError else f"{__name__}.{kind.__qualname__}"
    )
    assert message.format(type=info.type) in info.message
    assert type(info.message) is str
    assert "Traceback (most recent call last)" in info.traceback
    assert info.traceback.endswith(f"{info.type}: {info.message}\n")
    for text in (info.type, info.message, info.traceback):
        text.encode("utf-8")  # no lone surrogates: pamqp would raise at publish time


def test_error_info_when_the_traceback_cannot_be_formatted() -> None:
    """linecache lets a module loader's get_source error through format_tb."""

    class Loader:
        def get_source(self, name: str) -> str:
            raise RuntimeError("no source")

    scope: dict[str, Any] = {"__name__": "vanished_module", "__loader__": Loader()}
    code = "def boom():\n    raise ValueError('broken')\n"
    exec(compile(code, "/nonexistent/vanished_module.py", "exec"), scope)
    raised = None
    try:
        scope["boom"]()
    except ValueError as exc:
        try:
            info = ErrorInfo.from_exception(exc)
        except Exception as error:
            raised = repr(error)  # not re-raised: pytest's report would trip on that frame too
    assert raised is None, f"from_exception raised {raised}"
    assert info.type == "ValueError"
    assert info.message == "broken"
    assert "RuntimeError" in info.traceback
    assert info.traceback.endswith("ValueError: broken\n")


# --- parked copies of messages that arrived without an id (issue 9, item 5) ----------------


def test_a_message_without_an_id_is_parked_under_a_marked_one() -> None:
    """aiormq gives every publish without message_id a random uuid; a parked copy must not
    look like a real job id, and two of them must still differ (aiormq matches returns to
    publishes by message_id)."""
    copies = [
        dead_message(
            make(message_id=None), DeadReason.INVALID_HEADERS, ErrorInfo("E", "no id"), "q"
        )  # type: ignore[arg-type]
        for _ in range(2)
    ]
    ids = [c.message_id for c in copies]
    assert all(i is not None and i.startswith(NO_ID_PREFIX) for i in ids)
    assert ids[0] != ids[1]
    assert dead_message(
        make(message_id=""), DeadReason.INVALID_HEADERS, ErrorInfo("E", "no id"), "q"
    ).message_id.startswith(NO_ID_PREFIX)  # type: ignore[arg-type, union-attr]
    kept = dead_message(make(), DeadReason.INVALID_HEADERS, ErrorInfo("E", "x"), "q")  # type: ignore[arg-type]
    assert kept.message_id == "id-1"
