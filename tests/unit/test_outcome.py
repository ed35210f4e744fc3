"""The pure decision core: what follows from an attempt, and whether a delivery may run.

Each table row is one branch of ``decide`` or ``admit``; the worker only carries out
what these functions return, so these rows are the retry and ETA semantics.
"""

import ast
import math
from datetime import timedelta
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import pytest
from tenacity.wait import wait_exponential

import amqp_jobs
from amqp_jobs import ContractError, Discard, JobTimeoutError, Retry, RetryPolicy, registry
from amqp_jobs.contract import MAX_BACKOFF
from amqp_jobs.errors import Defer
from amqp_jobs.message import DeadReason, ErrorInfo
from amqp_jobs.outcome import (
    Admission,
    Bury,
    Decision,
    DeferBy,
    Hold,
    JobContext,
    Outcome,
    OutcomeKind,
    Redelay,
    RetryIn,
    Run,
    Succeed,
    admit,
    decide,
    outcome_of,
)

#: Three attempts, a fixed 7 s backoff: every delay in the table is predictable.
POLICY = RetryPolicy(max_attempts=3, backoff=7)
ONLY_CONNECTION_ERRORS = RetryPolicy(max_attempts=3, backoff=7, retry_on=(ConnectionError,))
GIVE_UP_ON_KEY_ERROR = RetryPolicy(max_attempts=3, backoff=7, give_up_on=(KeyError,))
GIVE_UP_ON_EVERYTHING = RetryPolicy(max_attempts=3, backoff=7, give_up_on=(Exception,))
#: 1, 2, 4, 8 ... seconds after attempts 1, 2, 3, 4 ...
DOUBLING = RetryPolicy(max_attempts=10, backoff=wait_exponential(multiplier=1, exp_base=2))


@pytest.mark.parametrize(
    ("policy", "attempt", "raised", "result", "expected"),
    [
        pytest.param(POLICY, 1, None, {"id": 1}, Succeed({"id": 1}), id="success-with-result"),
        pytest.param(POLICY, 3, None, None, Succeed(None), id="success-on-last-attempt"),
        pytest.param(POLICY, 1, ValueError("x"), None, RetryIn(7, ANY), id="error-mid-way"),
        pytest.param(
            DOUBLING, 3, ValueError("x"), None, RetryIn(4, ANY), id="backoff-of-failed-attempt"
        ),
        pytest.param(POLICY, 2, JobTimeoutError("t"), None, RetryIn(7, ANY), id="timeout"),
        pytest.param(
            POLICY, 3, ValueError("x"), None, Bury(DeadReason.EXHAUSTED, ANY), id="last-attempt"
        ),
        pytest.param(
            POLICY, 5, ValueError("x"), None, Bury(DeadReason.EXHAUSTED, ANY), id="past-last"
        ),
        pytest.param(POLICY, 1, Retry(2.5), None, RetryIn(2.5, ANY), id="retry-explicit-delay"),
        pytest.param(
            POLICY, 1, Retry(timedelta(minutes=1)), None, RetryIn(60, ANY), id="retry-timedelta"
        ),
        pytest.param(
            POLICY,
            1,
            Retry(MAX_BACKOFF * 10),
            None,
            RetryIn(MAX_BACKOFF, ANY),
            id="retry-delay-capped",
        ),
        pytest.param(POLICY, 2, Retry(), None, RetryIn(7, ANY), id="retry-none-uses-backoff"),
        pytest.param(DOUBLING, 4, Retry(), None, RetryIn(8, ANY), id="retry-none-backoff-attempt"),
        pytest.param(
            POLICY, 3, Retry(1), None, Bury(DeadReason.EXHAUSTED, ANY), id="retry-last-attempt"
        ),
        pytest.param(
            ONLY_CONNECTION_ERRORS,
            1,
            Retry(1),
            None,
            RetryIn(1, ANY),
            id="retry-ignores-retry-on",
        ),
        pytest.param(
            POLICY, 1, Discard("bad"), None, Bury(DeadReason.DISCARDED, ANY), id="discard"
        ),
        pytest.param(
            GIVE_UP_ON_KEY_ERROR,
            1,
            KeyError("k"),
            None,
            Bury(DeadReason.NOT_RETRYABLE, ANY),
            id="give-up-on",
        ),
        pytest.param(
            ONLY_CONNECTION_ERRORS,
            1,
            ValueError("x"),
            None,
            Bury(DeadReason.NOT_RETRYABLE, ANY),
            id="not-in-retry-on",
        ),
        pytest.param(
            ONLY_CONNECTION_ERRORS,
            1,
            ConnectionResetError("r"),
            None,
            RetryIn(7, ANY),
            id="in-retry-on",
        ),
        pytest.param(
            GIVE_UP_ON_KEY_ERROR,
            3,
            KeyError("k"),
            None,
            Bury(DeadReason.NOT_RETRYABLE, ANY),
            id="not-retryable-beats-exhausted",
        ),
        pytest.param(POLICY, 3, Defer(5), None, DeferBy(5, ""), id="defer-on-last-attempt"),
        pytest.param(POLICY, 9, Defer(5), None, DeferBy(5, ""), id="defer-past-last-attempt"),
        pytest.param(
            POLICY,
            1,
            Defer(timedelta(seconds=30), "lock taken"),
            None,
            DeferBy(30, "lock taken"),
            id="defer-timedelta",
        ),
        pytest.param(
            POLICY, 1, Defer(MAX_BACKOFF * 10), None, DeferBy(MAX_BACKOFF, ""), id="defer-capped"
        ),
        pytest.param(
            GIVE_UP_ON_EVERYTHING, 1, Defer(1), None, DeferBy(1, ""), id="defer-ignores-give-up"
        ),
    ],
)
def test_decide(
    policy: RetryPolicy,
    attempt: int,
    raised: BaseException | None,
    result: Any,
    expected: Decision,
) -> None:
    decision = decide(policy, attempt, raised, result)
    assert decision == expected
    if isinstance(decision, RetryIn | Bury):
        assert raised is not None
        assert decision.error == ErrorInfo.from_exception(raised)


@pytest.mark.parametrize(
    "delay",
    [math.nan, math.inf, -math.inf, -1, -0.001, timedelta(seconds=-1)],
    ids=["nan", "inf", "-inf", "-1", "-1ms", "-timedelta"],
)
def test_defer_refuses_delays_that_are_not_finite_and_non_negative(
    delay: float | timedelta,
) -> None:
    with pytest.raises(ContractError, match="Defer delay"):
        Defer(delay)


def test_defer_keeps_its_delay_in_seconds_and_its_reason() -> None:
    exc = Defer(timedelta(milliseconds=1500), "lock taken")
    assert (exc.delay, exc.reason, str(exc)) == (1.5, "lock taken", "lock taken")
    assert isinstance(Defer(0).delay, float)
    assert "deferred" in str(Defer(2))
    assert not isinstance(exc, amqp_jobs.AmqpJobsError), "steers a job; not an error"


NOW = 1_700_000_000_000
WINDOW = 125


@pytest.mark.parametrize(
    ("eta_ms", "from_due_queue", "expected"),
    [
        pytest.param(None, False, Run(), id="no-eta"),
        pytest.param(None, True, Run(), id="no-eta-due-queue"),
        pytest.param(NOW - 5_000, False, Run(), id="past-eta"),
        pytest.param(NOW, True, Run(), id="eta-is-now"),
        pytest.param(NOW + 1, False, Redelay(), id="future-from-work-queue"),
        pytest.param(NOW + 60_000, False, Redelay(), id="far-future-from-work-queue"),
        pytest.param(NOW + 1, True, Hold(NOW + 1), id="just-early-from-due-queue"),
        pytest.param(NOW + WINDOW, True, Hold(NOW + WINDOW), id="at-window-from-due-queue"),
        pytest.param(NOW + WINDOW + 1, True, Redelay(), id="beyond-window-from-due-queue"),
    ],
)
def test_admit(eta_ms: int | None, from_due_queue: bool, expected: Admission) -> None:
    assert admit(eta_ms, NOW, from_due_queue=from_due_queue, hold_window_ms=WINDOW) == expected


ERROR = ErrorInfo("ValueError", "boom")


@pytest.mark.parametrize(
    ("decision", "kind", "fields"),
    [
        pytest.param(Succeed(42), OutcomeKind.SUCCEEDED, {"result": 42}, id="succeed"),
        pytest.param(
            RetryIn(7.0, ERROR), OutcomeKind.RETRYING, {"error": ERROR, "retry_in": 7.0}, id="retry"
        ),
        pytest.param(
            Bury(DeadReason.EXHAUSTED, ERROR),
            OutcomeKind.DEAD,
            {"error": ERROR, "dead_reason": DeadReason.EXHAUSTED},
            id="bury",
        ),
        pytest.param(
            DeferBy(3.0, "lock taken"), OutcomeKind.DEFERRED, {"retry_in": 3.0}, id="defer"
        ),
    ],
)
def test_outcome_of(decision: Decision, kind: OutcomeKind, fields: dict[str, Any]) -> None:
    outcome = outcome_of(
        decision, duration=0.5, job_id="j-1", job_name="users.signup", queue="users", attempt=2
    )
    assert outcome == Outcome(
        kind,
        duration=0.5,
        job_id="j-1",
        job_name="users.signup",
        queue="users",
        attempt=2,
        **fields,
    )


def test_outcome_keeps_its_old_shape() -> None:
    outcome = Outcome(OutcomeKind.SUCCEEDED, duration=1.0)
    assert (outcome.error, outcome.retry_in, outcome.dead_reason, outcome.result) == (
        None,
        None,
        None,
        None,
    )
    assert (outcome.job_id, outcome.job_name, outcome.queue, outcome.attempt) == ("", "", "", 0)
    with pytest.raises(AttributeError):
        outcome.kind = OutcomeKind.DEAD  # type: ignore[misc]


def test_old_imports_still_work() -> None:
    assert registry.JobContext is JobContext is amqp_jobs.JobContext
    assert registry.Outcome is Outcome is amqp_jobs.Outcome
    assert registry.OutcomeKind is OutcomeKind is amqp_jobs.OutcomeKind


def test_the_core_does_no_io() -> None:
    """outcome.py may import only the stdlib's plain modules and the layers below it."""
    allowed = {
        "__future__",
        "collections.abc",
        "dataclasses",
        "datetime",
        "enum",
        "logging",  # for JobContext's logger type only
        "typing",
        "amqp_jobs.contract",
        "amqp_jobs.errors",
        "amqp_jobs.message",
    }
    source = Path(amqp_jobs.__file__).parent.joinpath("outcome.py").read_text()
    imported: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    assert imported <= allowed, imported - allowed
