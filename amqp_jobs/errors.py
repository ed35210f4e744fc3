"""Every error amqp-jobs raises, and the two exceptions a handler raises to steer its job.

Errors of the AMQP layer below (aiormq, aio-pika) are mapped into this tree at the
boundary, so callers catch ours and never need to import theirs::

    AmqpJobsError
    ├── ContractError            a job, policy or setting is defined wrongly
    ├── ArgsValidationError      job arguments fail the job's pydantic model
    ├── BrokerUnavailableError   the broker cannot be reached (after retries)
    ├── TopologyMismatchError    a queue or exchange exists with other arguments
    ├── PublishError             the broker did not take a message
    │   ├── UnroutableError      no queue is bound for it (returned)
    │   ├── PublishRefusedError  the broker nacked it
    │   └── PublishTimeoutError  no confirm arrived in time
    └── JobTimeoutError          a handler ran longer than its job's timeout

    Retry, Discard               raised by handlers; not errors of the library
"""

from __future__ import annotations

from datetime import timedelta


class AmqpJobsError(Exception):
    """Base class of every error amqp-jobs raises."""


class ContractError(AmqpJobsError, ValueError):
    """A job contract, retry policy or setting is invalid."""


class ArgsValidationError(AmqpJobsError, ValueError):
    """Job arguments do not satisfy the job's args model."""

    def __init__(self, job_name: str, errors: list[dict[str, object]]) -> None:
        self.job_name = job_name
        self.errors = errors
        parts = []
        for err in errors:
            loc = ".".join(str(p) for p in err.get("loc", ())) or "<args>"  # type: ignore[attr-defined]
            parts.append(f"{loc}: {err.get('msg', 'invalid')}")
        super().__init__(f"invalid args for job {job_name!r}: " + "; ".join(parts))

    @property
    def fields(self) -> list[str]:
        """The dotted paths of the offending fields."""
        return [".".join(str(p) for p in e.get("loc", ())) for e in self.errors]  # type: ignore[attr-defined]


class BrokerUnavailableError(AmqpJobsError, ConnectionError):
    """The broker could not be reached, even after retrying with backoff."""


class TopologyMismatchError(AmqpJobsError):
    """An exchange or queue already exists with arguments other than ours."""


class PublishError(AmqpJobsError):
    """The broker did not accept a published job."""


class UnroutableError(PublishError):
    """The broker returned the message: no queue is bound for its routing key."""


class PublishRefusedError(PublishError):
    """The broker nacked the message (for example a full queue with reject-publish)."""


class PublishTimeoutError(PublishError):
    """No publisher confirm arrived in time; the job may or may not have been stored."""


class JobTimeoutError(AmqpJobsError, TimeoutError):
    """A handler exceeded its job's timeout; retried like any failure."""


class Retry(Exception):
    """Raise in a handler to retry the job after ``delay`` (counts as an attempt)."""

    def __init__(self, delay: timedelta | float | None = None, reason: str = "") -> None:
        if isinstance(delay, timedelta):
            delay = delay.total_seconds()
        if delay is not None and not 0 <= delay < float("inf"):  # NaN fails both
            raise ContractError(f"Retry delay must be a finite number >= 0 seconds, got {delay}")
        self.delay: float | None = delay
        self.reason = reason
        super().__init__(reason or f"retry requested (delay={delay})")


class Discard(Exception):
    """Raise in a handler to send the job straight to the dead-letter queue."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)
