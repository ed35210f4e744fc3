"""Every error amqp-jobs raises, and the two exceptions a handler raises to steer its job.

Errors of the AMQP layer below (aiormq, aio-pika) are mapped into this tree at the
boundary, so callers catch ours and never need to import theirs::

    AmqpJobsError
    ├── ContractError            a job, policy or setting is defined wrongly
    ├── ArgsValidationError      job arguments fail the job's pydantic model
    ├── BrokerUnavailableError   the broker cannot be reached (after retries)
    │   └── ConnectionLostError  a connection or channel died under an operation
    ├── TopologyMismatchError    a queue or exchange exists with other arguments
    ├── PublishError             the broker did not take a message
    │   ├── UnroutableError      no queue is bound for it (returned)
    │   ├── PublishRefusedError  the broker nacked it
    │   ├── PublishTimeoutError  no confirm arrived in time
    │   └── BatchPublishError    jobs of an enqueue_many batch were not confirmed
    ├── JobTimeoutError          a handler ran longer than its job's timeout
    ├── ResultError              a handler's return value fails its job's result model
    ├── JobFailedError           an awaited job ended dead or discarded
    ├── UnknownJobError          an awaited or looked-up job id is known to nobody
    ├── StoreError               the job log's store cannot be reached or is not ours
    ├── NotFoundError            a queue or dead job an operator named does not exist
    └── SchemaError              a job schema file is missing or not one of ours

    TimeoutError (the builtin)   an awaited job did not end within the timeout

    Retry, Discard, Defer        raised by handlers; not errors of the library
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


class ConnectionLostError(BrokerUnavailableError):
    """A connection or channel died under an operation; a new one may succeed.

    Raised at the transport seam for what the AMQP client reports in a dozen ways
    (a closed channel, a reset socket, a frame on a dead connection).
    """


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


class BatchPublishError(PublishError):
    """Some jobs of an ``enqueue_many`` batch were not confirmed.

    ``job_ids`` lists every job's id in input order; ``failed`` maps the index of each job
    that was not confirmed to its error. The others were confirmed.
    """

    def __init__(self, job_ids: list[str], failed: dict[int, BaseException]) -> None:
        self.job_ids = job_ids
        self.failed = failed
        first = failed[min(failed)]
        super().__init__(
            f"{len(failed)} of {len(job_ids)} jobs were not confirmed; first error: {first}"
        )


class JobTimeoutError(AmqpJobsError, TimeoutError):
    """A handler exceeded its job's timeout; retried like any failure."""


class ResultError(AmqpJobsError, ValueError):
    """A handler returned what its job's result model refuses, or what JSON cannot
    carry, or more than an event holds; the attempt counts as failed."""


class JobFailedError(AmqpJobsError):
    """The job an awaiting caller waited for is dead: it failed for good, or was
    discarded. Carries what the job log holds of its last error."""

    def __init__(
        self,
        job_id: str,
        *,
        state: str,
        error_type: str | None,
        error_message: str | None,
        traceback: str | None,
        dead_reason: str | None,
    ) -> None:
        self.job_id = job_id
        self.state = state
        self.error_type = error_type
        self.error_message = error_message
        self.traceback = traceback
        self.dead_reason = dead_reason
        what = f"{error_type}: {error_message}" if error_message else (error_type or "no error")
        super().__init__(f"job {job_id} is {state} ({dead_reason or 'no reason'}): {what}")


class UnknownJobError(AmqpJobsError, LookupError):
    """No job of this id was ever enqueued, as far as the job log (and this client)
    knows: never mistaken for a job still pending."""


class StoreError(AmqpJobsError):
    """The job log's store cannot be reached, refused a statement, or is not a job log."""


class NotFoundError(AmqpJobsError):
    """A queue or job the operator named does not exist."""


class SchemaError(AmqpJobsError):
    """A schema directory or file is missing, or is not an amqp-jobs job schema."""


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


class Defer(Exception):
    """Raise in a handler or middleware to run the job again after ``delay`` seconds
    without counting an attempt (a per-key lock that is taken, say).

    Being turned away is not a failure, so a deferred job is never exhausted by it.
    """

    def __init__(self, delay: timedelta | float, reason: str = "") -> None:
        if isinstance(delay, timedelta):
            delay = delay.total_seconds()
        if not 0 <= delay < float("inf"):  # NaN fails both
            raise ContractError(f"Defer delay must be a finite number >= 0 seconds, got {delay}")
        self.delay: float = float(delay)
        self.reason = reason
        super().__init__(reason or f"deferred (delay={delay})")


def describe(exc: BaseException | None) -> str:
    """``Type: message`` for logs and errors (just the message if it names the type)."""
    if exc is None:
        return "unknown error"
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if type(exc).__name__ not in text else text
