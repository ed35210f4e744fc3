"""What becomes of a delivery, decided without touching the broker.

Whether a job runs now, waits or goes back into the delay cascade (``admit``), and
whether a finished attempt succeeded, retries, is deferred or is buried (``decide``),
are pure functions of the job's policy, its attempt, the clock reading and what the
handler raised. Kept free of I/O and asyncio they are tested as tables, one row per
branch, and the worker only carries decisions out (acks, republishes, parks, counts).

``JobContext``, ``OutcomeKind`` and ``Outcome`` live here because they are the
vocabulary of those decisions; registry re-exports them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from amqp_jobs.contract import MAX_BACKOFF, Job, RetryPolicy
from amqp_jobs.errors import Defer, Discard, Retry
from amqp_jobs.message import DeadReason, ErrorInfo


@dataclass(frozen=True)
class JobContext:
    """What a running handler may know about its job."""

    job: Job[Any]
    job_id: str
    attempt: int
    queue: str
    enqueued_at: datetime | None
    eta: datetime | None
    logger: logging.LoggerAdapter[logging.Logger]
    #: the message's own headers (``traceparent``, a publisher's), not the contract's
    headers: Mapping[str, Any] = field(default_factory=dict)
    #: the value of the job's ``key`` field (None if the contract names none)
    key: str | None = None
    #: headers the job's next copy (a retry, a deferral) carries: middleware may set
    #: them (tracing links the next attempt to this one); they replace the job's own
    carry: dict[str, Any] = field(default_factory=dict)

    @property
    def max_attempts(self) -> int:
        return self.job.retry.max_attempts

    @property
    def is_last_attempt(self) -> bool:
        return self.attempt >= self.job.retry.max_attempts


class OutcomeKind(StrEnum):
    SUCCEEDED = "succeeded"
    RETRYING = "retrying"  # a copy with attempt + 1 is in the delay cascade
    DEAD = "dead"  # parked in the dead-letter queue
    ABANDONED = "abandoned"  # not settled: the broker will deliver it again
    DEFERRED = "deferred"  # re-delayed by middleware or handler; no attempt counted
    REDELAYED = "redelayed"  # arrived before its ETA: sent back into the delay cascade
    QUARANTINED = "quarantined"  # moved to the quarantine queue


#: The outcomes of an attempt its handler ran (not a deferral, re-delay, poison or
#: quarantine): what metrics time and ``--max-jobs`` counts.
RAN = frozenset({OutcomeKind.SUCCEEDED, OutcomeKind.RETRYING, OutcomeKind.DEAD})


@dataclass(frozen=True)
class Outcome:
    """How one delivery of a job ended.

    The job's identity is carried here too, so an outcome means something without a
    JobContext (a poison message never gets one).
    """

    kind: OutcomeKind
    error: ErrorInfo | None = None
    retry_in: float | None = None
    dead_reason: DeadReason | None = None
    duration: float = 0.0
    result: Any = None  # the handler's return value, on success
    job_id: str = ""
    job_name: str = ""
    queue: str = ""
    attempt: int = 0


# -- after an attempt -----------------------------------------------------------------


@dataclass(frozen=True)
class Succeed:
    """The handler returned ``result``: ack."""

    result: Any


@dataclass(frozen=True)
class RetryIn:
    """Run a new attempt (attempt + 1) after ``delay`` seconds."""

    delay: float
    error: ErrorInfo


@dataclass(frozen=True)
class Bury:
    """Dead-letter the job: it will not run again by itself."""

    reason: DeadReason
    error: ErrorInfo


@dataclass(frozen=True)
class DeferBy:
    """Run the same attempt again after ``delay`` seconds (nothing failed)."""

    delay: float
    reason: str


Decision = Succeed | RetryIn | Bury | DeferBy


def decide(
    policy: RetryPolicy, attempt: int, raised: BaseException | None, result: Any = None
) -> Decision:
    """What follows from attempt ``attempt`` (1-based) ending with ``raised`` (None: it
    returned ``result``), by the job's retry policy.

    Discard buries at once; Retry retries after its own delay (or the backoff's) but
    counts, so it can exhaust the job; Defer never counts, so it is never exhausted.
    Every delay is kept within MAX_BACKOFF, the ETA bound the worker accepts.
    """
    if raised is None:
        return Succeed(result)
    if isinstance(raised, Defer):
        return DeferBy(min(raised.delay, MAX_BACKOFF), raised.reason)
    error = ErrorInfo.from_exception(raised)
    if isinstance(raised, Discard):
        return Bury(DeadReason.DISCARDED, error)
    if isinstance(raised, Retry):
        delay = (
            min(raised.delay, MAX_BACKOFF)
            if raised.delay is not None
            else policy.delay_after(attempt)
        )
    elif policy.should_retry(raised):
        delay = policy.delay_after(attempt)
    else:
        return Bury(DeadReason.NOT_RETRYABLE, error)
    if attempt >= policy.max_attempts:
        return Bury(DeadReason.EXHAUSTED, error)
    return RetryIn(delay, error)


def outcome_of(
    decision: Decision, *, duration: float, job_id: str, job_name: str, queue: str, attempt: int
) -> Outcome:
    """The Outcome that hooks are told once ``decision`` has been carried out."""
    kind: OutcomeKind
    error: ErrorInfo | None = None
    retry_in: float | None = None
    dead_reason: DeadReason | None = None
    result: Any = None
    if isinstance(decision, Succeed):
        kind, result = OutcomeKind.SUCCEEDED, decision.result
    elif isinstance(decision, RetryIn):
        kind, error, retry_in = OutcomeKind.RETRYING, decision.error, decision.delay
    elif isinstance(decision, Bury):
        kind, error, dead_reason = OutcomeKind.DEAD, decision.error, decision.reason
    else:
        kind, retry_in = OutcomeKind.DEFERRED, decision.delay
    return Outcome(
        kind,
        error,
        retry_in,
        dead_reason,
        duration,
        result=result,
        job_id=job_id,
        job_name=job_name,
        queue=queue,
        attempt=attempt,
    )


# -- before an attempt: the ETA ---------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """Due (or no ETA): run it now."""


@dataclass(frozen=True)
class Hold:
    """Nearly due, from the due queue: wait in memory until ``until_ms`` (epoch ms)."""

    until_ms: int


@dataclass(frozen=True)
class Redelay:
    """Early: send it back into the delay cascade rather than hold a delivery for long."""


Admission = Run | Hold | Redelay


def admit(
    eta_ms: int | None, now_ms: int, *, from_due_queue: bool, hold_window_ms: int
) -> Admission:
    """Whether a delivery with ETA ``eta_ms`` (epoch ms) may run at ``now_ms``.

    The cascade rounds to its unit, so a delivery from the due queue may be a little
    early: at most ``hold_window_ms`` early, it is waited out in memory, which is cheaper
    and more precise than another pass. Anything earlier, or from a work queue (whose
    slots belong to running jobs), goes back into the cascade: never run early, and never
    hold a delivery for long.
    """
    if eta_ms is None or eta_ms <= now_ms:
        return Run()
    if not from_due_queue or eta_ms - now_ms > hold_window_ms:
        return Redelay()
    return Hold(eta_ms)
