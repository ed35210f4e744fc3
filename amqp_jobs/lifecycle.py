"""The events a worker publishes, built from what it knows at each transition.

Pure builders: the worker calls them and ``settle`` publishes the one that ends an
attempt before it acks, so no outcome goes unrecorded (a ``started`` event goes out
while the handler runs, and the attempt's end waits for its confirm).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from amqp_jobs.events import EventKind, JobEvent, header_key, tries, worker_identity
from amqp_jobs.message import (
    H_ATTEMPT,
    DeadReason,
    Envelope,
    ErrorInfo,
    RawMessage,
    header_count,
)
from amqp_jobs.outcome import Bury, Decision, DeferBy, RetryIn, Succeed


def _ms(value: datetime | None) -> int | None:
    return None if value is None else int(value.timestamp() * 1000)


def job_event(
    kind: EventKind, env: Envelope, queue: str, now_ms: int, key: str | None, **fields: Any
) -> JobEvent:
    """An event of a decoded job; ``key``: the contract's (header or args)."""
    replays, deferrals = tries(env.extra_headers)
    return JobEvent(
        kind,
        env.job_id,
        env.job_name,
        queue,
        now_ms,
        attempt=env.attempt,
        replays=replays,
        deferrals=deferrals,
        key=key,
        enqueued_at=_ms(env.enqueued_at),
        eta=env.eta_ms,
        worker=worker_identity(),
        **fields,
    )


def ended(
    decision: Decision,
    env: Envelope,
    queue: str,
    now_ms: int,
    key: str | None,
    *,
    started_ms: int,
    duration: float,
    result: Any = None,
) -> JobEvent:
    """The event that ends an attempt: succeeded (with ``result``, the return value as
    JSON data), retrying, deferred, dead or discarded (with the error)."""
    common: dict[str, Any] = {"started_at": started_ms, "duration_ms": round(duration * 1000, 3)}
    match decision:
        case Succeed():
            return job_event(EventKind.SUCCEEDED, env, queue, now_ms, key, result=result, **common)
        case RetryIn(delay, error):
            event = job_event(EventKind.RETRYING, env, queue, now_ms, key, retry_in=delay, **common)
            return event.with_error(error)
        case Bury(reason, error):
            kind = EventKind.DISCARDED if reason is DeadReason.DISCARDED else EventKind.DEAD
            event = job_event(kind, env, queue, now_ms, key, dead_reason=str(reason), **common)
            return event.with_error(error)
        case DeferBy(delay, _):
            return job_event(EventKind.DEFERRED, env, queue, now_ms, key, retry_in=delay, **common)
    raise AssertionError(decision)  # pragma: no cover


def not_run(
    kind: EventKind,
    raw: RawMessage,
    queue: str,
    now_ms: int,
    *,
    error: ErrorInfo | None = None,
    dead_reason: DeadReason | None = None,
) -> JobEvent:
    """An event of a delivery that reached no handler (poison, quarantine), from what
    its properties and headers say; nothing of it is trusted to be well formed."""
    headers: Mapping[str, Any] = raw.headers if isinstance(raw.headers, Mapping) else {}
    replays, deferrals = tries(headers)
    attempt = header_count(headers.get(H_ATTEMPT)) or 1
    return JobEvent(
        kind,
        raw.message_id or "",
        raw.type or "",
        queue,
        now_ms,
        attempt=attempt,
        replays=replays,
        deferrals=deferrals,
        key=header_key(headers),
        enqueued_at=_ms(raw.timestamp),
        worker=worker_identity(),
        dead_reason=None if dead_reason is None else str(dead_reason),
    ).with_error(error)
