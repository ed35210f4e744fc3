"""What JobClient.prepare refuses before anything is sent (no broker needed)."""

import math
import time
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pamqp import encode
from pydantic import BaseModel

from amqp_jobs import ContractError, Job, JobClient
from amqp_jobs.client import resolve_eta
from amqp_jobs.message import (
    MAX_ETA_AHEAD_MS,
    MAX_USER_HEADERS_BYTES,
    NO_ID_PREFIX,
    check_headers,
    decode,
    now_ms,
)
from amqp_jobs.transport.amqp.link import envelope_properties


class Ping(BaseModel):
    n: int = 0


ping = Job("t.ping", Ping, queue="q")
client = JobClient("amqp://guest:guest@127.0.0.1:1/", namespace="unit")
NAN, INF = float("nan"), float("inf")
YEAR = 365.25 * 86_400
MAX_DELAY = MAX_ETA_AHEAD_MS / 1000


# --- delay and run_at ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"delay": NAN}, "nan"),
        ({"delay": INF}, "inf"),
        ({"delay": -INF}, "negative"),
        ({"delay": 200 * YEAR}, "100 years"),
        ({"delay": 10**30}, "100 years"),
        ({"delay": 1e308}, "100 years"),
        ({"delay": timedelta(days=200 * 366)}, "100 years"),
        ({"delay": timedelta.max}, "100 years"),
        ({"run_at": datetime(2500, 1, 1, tzinfo=UTC)}, "100 years"),
        ({"run_at": datetime.max.replace(tzinfo=UTC)}, "100 years"),
        ({"run_at": datetime.max.replace(tzinfo=timezone(timedelta(hours=-12)))}, "run_at"),
    ],
)
def test_absurd_delays_are_refused_before_sending(kwargs: dict[str, Any], match: str) -> None:
    """NaN used to run the job at once, inf raised OverflowError, and 200 years was sent
    and then parked by the worker as invalid-headers."""
    with pytest.raises(ContractError, match=match) as info:
        client.prepare(ping, {}, **kwargs)
    if "100 years" in match:
        assert str(MAX_ETA_AHEAD_MS) in str(info.value), "the bound is in the message"


@pytest.mark.parametrize(
    ("delay", "run_at"),
    [
        (MAX_DELAY - 1, None),
        (timedelta(milliseconds=MAX_ETA_AHEAD_MS - 1), None),
        (None, "max"),
    ],
)
def test_the_longest_delay_accepted_is_one_the_worker_accepts(
    delay: float | timedelta | None, run_at: str | None
) -> None:
    """Publisher and worker apply the same bound (message.MAX_ETA_AHEAD_MS)."""
    when = None
    if run_at == "max":
        when = datetime.fromtimestamp((now_ms() + MAX_ETA_AHEAD_MS - 5) / 1000, UTC)
    env = client.prepare(ping, {}, delay=delay, run_at=when)
    assert env.eta_ms is not None
    assert decode(env.to_message()).eta_ms == env.eta_ms  # type: ignore[arg-type]


def test_just_past_the_bound_is_refused() -> None:
    with pytest.raises(ContractError):
        resolve_eta(MAX_DELAY + 1, None)
    with pytest.raises(ContractError):
        resolve_eta(None, datetime.fromtimestamp(time.time() + MAX_DELAY + 60, UTC))


# --- headers ------------------------------------------------------------------------------

GOOD_HEADERS: dict[str, Any] = {
    "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "tenant": "ünïcode ✓",
    "flag": True,
    "small": -5,
    "big": 2**63 - 1,
    "low": -(2**63),
    "ratio": 0.25,
    "none": None,
    "when": datetime(2024, 5, 1, tzinfo=UTC),
    "naive": datetime(2024, 5, 1),
    "price": Decimal("19.99"),
    "raw": bytearray(b"\x00\xff"),
    "list": [1, "two", [3.5, None], {"k": "v"}],
    "table": {"a": {"b": {"c": [True]}}},
    "k" * 128: "longest name",
}


def test_good_headers_pass_and_encode() -> None:
    env = client.prepare(ping, {}, headers=GOOD_HEADERS)
    assert encode.field_table(env.headers())  # pamqp takes every one of them
    assert env.headers()["tenant"] == "ünïcode ✓"


@pytest.mark.parametrize(
    ("headers", "match"),
    [
        ({"h": object()}, "'h'.*object"),
        ({"h": b"bytes"}, "'h'.*bytearray"),
        ({"h": (1, 2)}, "'h'.*list"),
        ({"h": {1, 2}}, "'h'"),
        ({"h": 2**63}, "'h'.*64-bit"),
        ({"h": -(2**63) - 1}, "'h'.*64-bit"),
        ({"h": NAN}, "'h'.*finite"),
        ({"h": INF}, "'h'.*finite"),
        ({"h": 1e39}, "'h'.*32-bit"),
        ({"h": Decimal("NaN")}, "'h'.*Decimal"),
        ({"h": Decimal("1E+10")}, "'h'.*Decimal"),
        ({"h": Decimal("1E-300")}, "'h'.*Decimal"),
        ({"h": datetime(1960, 1, 1, tzinfo=UTC)}, "'h'.*1970"),
        ({"h": "\udcff"}, "'h'.*UTF-8"),
        ({"h": [1, object()]}, r"'h\[1\]'"),
        ({"h": {"a": {"b": object()}}}, "'h.a.b'"),
        ({"h": {1: "x"}}, "'h'.*names"),
        ({"h": {"": "x"}}, "'h'.*names"),
        ({"": "x"}, "names"),
        ({1: "x"}, "names"),
        ({"x-delay": 5}, "'x-delay'.*broker"),
        ({"job-attempt": 5}, "'job-attempt'.*job-"),
        ({"job-dead-reason": "exhausted"}, "'job-dead-reason'.*job-"),
        ({"k" * 129: 1}, "128 bytes"),
        ({"é" * 65: 1}, "128 bytes"),
        ({"\udcff": 1}, "UTF-8"),
        ({"h": "x" * MAX_USER_HEADERS_BYTES}, str(MAX_USER_HEADERS_BYTES)),
        ({f"h{i}": "x" * 1000 for i in range(70)}, str(MAX_USER_HEADERS_BYTES)),
    ],
)
def test_bad_headers_are_refused_naming_the_header(headers: dict[Any, Any], match: str) -> None:
    """object() used to raise aiormq's TypeError at publish time, and a header too large
    for the broker's frame closed the connection (retried until retry_for ran out)."""
    with pytest.raises(ContractError, match=match):
        client.prepare(ping, {}, headers=headers)


def test_self_containing_headers_are_refused() -> None:
    loop: dict[str, Any] = {}
    loop["again"] = loop
    with pytest.raises(ContractError, match="deep"):
        check_headers({"h": loop})
    with pytest.raises(ContractError, match="mapping"):
        check_headers([("h", 1)])  # type: ignore[arg-type]


table_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text()
    | st.binary(max_size=4)
    | st.decimals(allow_nan=True, places=None)
    | st.datetimes(timezones=st.none() | st.just(UTC)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(headers=st.dictionaries(st.text(max_size=6), table_values, max_size=4))
def test_headers_that_pass_the_check_always_encode(headers: dict[str, Any]) -> None:
    """Whatever check_headers accepts, pamqp encodes (and no NaN/Infinity, which RabbitMQ
    refuses); whatever it refuses raises ContractError, never anything else."""
    try:
        check_headers(headers)
    except ContractError:
        return
    encode.field_table(headers)
    floats: list[float] = []

    def collect(value: Any) -> None:
        if isinstance(value, float):
            floats.append(value)
        elif isinstance(value, list):
            for item in value:
                collect(item)
        elif isinstance(value, dict):
            for item in value.values():
                collect(item)

    collect(headers)
    assert all(math.isfinite(f) for f in floats)


# --- job ids ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "job_id",
    ["", "x" * 201, "é" * 150, "\udcff", f"{NO_ID_PREFIX}0123456789abcdef", 5],
)
def test_bad_job_ids_are_refused(job_id: object) -> None:
    """An id over 255 bytes of UTF-8 used to raise pamqp's TypeError at publish time;
    ids with the no-id marker belong to parked messages that arrived without one."""
    with pytest.raises(ContractError, match="job_id"):
        client.prepare(ping, {}, job_id=job_id)  # type: ignore[arg-type]


def test_unicode_job_ids_within_255_bytes_are_fine() -> None:
    env = client.prepare(ping, {}, job_id="é" * 100)
    assert envelope_properties(env).message_id == "é" * 100
    assert env.job_id == "é" * 100
