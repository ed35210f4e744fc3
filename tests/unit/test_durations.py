"""Durations: one conversion to seconds for the API, one parser for the command line."""

from datetime import timedelta

import pytest
from pydantic import BaseModel

from amqp_jobs.contract import Job, RetryPolicy
from amqp_jobs.durations import parse_duration, seconds
from amqp_jobs.errors import ContractError

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("value", "expected"),
    [(0, 0.0), (1, 1.0), (2.5, 2.5), (timedelta(minutes=2), 120.0), (timedelta(0), 0.0)],
)
def test_seconds_takes_numbers_and_timedeltas(value: float | timedelta, expected: float) -> None:
    result = seconds(value, "grace")
    assert result == expected
    assert type(result) is float


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (-1, "grace must not be negative, got -1"),
        (timedelta(seconds=-1), "grace must not be negative"),
        (-INF, "grace must not be negative"),
        (NAN, "grace must be a finite number of seconds, got nan"),
        (INF, "grace must be a finite number of seconds, got inf"),
        (True, "grace must be seconds or a timedelta, got True"),
        ("5", "grace must be seconds or a timedelta, got '5'"),
        (None, "grace must be seconds or a timedelta, got None"),
    ],
)
def test_seconds_refuses_what_is_not_a_duration_naming_it(value: object, message: str) -> None:
    with pytest.raises(ContractError) as info:
        seconds(value, "grace")  # type: ignore[arg-type]
    assert str(info.value) == message or str(info.value).startswith(message)


def test_seconds_can_allow_negative_but_never_infinite() -> None:
    assert seconds(-1.5, "offset", allow_negative=True) == -1.5
    assert seconds(timedelta(seconds=-3), "offset", allow_negative=True) == -3.0
    for value in (-INF, INF, NAN):
        with pytest.raises(ContractError, match="offset must be a finite number"):
            seconds(value, "offset", allow_negative=True)


class A(BaseModel):
    n: int


def test_the_contract_uses_it() -> None:
    with pytest.raises(ContractError, match="job 'a' timeout must not be negative"):
        Job("a", A, timeout=-1)
    assert RetryPolicy(backoff=timedelta(milliseconds=250)).delay_after(1) == 0.25


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # plain numbers are seconds (what --grace and --connect-timeout always took)
        ("90", 90.0),
        ("1.5", 1.5),
        (" 30 ", 30.0),
        ("0", 0.0),
        ("-0", 0.0),
        ("1e3", 1000.0),
        # units, combined, any case (what --delay and --older-than always took)
        ("90s", 90.0),
        ("5m", 300.0),
        ("2h", 7200.0),
        ("2d", 172800.0),
        ("1w", 604800.0),
        ("500ms", 0.5),
        ("1h30m", 5400.0),
        ("1H30M", 5400.0),
        ("1.5h", 5400.0),
        ("1m30s250ms", 90.25),
    ],
)
def test_parse_duration_takes_what_the_command_line_always_took(text: str, expected: float) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "not a duration: ''"),
        ("soon", "not a duration: 'soon' (examples: 30, 30s, 5m, 1h30m, 2d, 500ms)"),
        ("5 m", "not a duration: '5 m'"),
        ("5y", "not a duration: '5y'"),
        ("m5", "not a duration: 'm5'"),
        ("1h-30m", "not a duration: '1h-30m'"),
        ("-5", "delay must not be negative: '-5'"),
        ("-5m", "delay must not be negative: '-5m'"),
        ("nan", "delay must be a finite number of seconds"),
        ("inf", "delay must be a finite number of seconds"),
        ("1" * 400 + "w", "delay must be a finite number of seconds"),
    ],
)
def test_parse_duration_says_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ContractError) as info:
        parse_duration(text, "delay")
    assert str(info.value).startswith(message), str(info.value)
