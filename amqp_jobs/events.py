"""Lifecycle events: one small JSON message per transition of a job.

Workers publish an event when an attempt starts and when it ends (succeeded, retrying,
deferred, dead, discarded), and when a delivery is quarantined; publishers may add
``enqueued`` or ``scheduled``, and a replay of a dead job adds ``replayed``. Events go
to the topic exchange ``{ns}.events`` with the routing key ``{event}.{queue}.{job}``, so
another service binds to ``succeeded.emails.#`` to hear of finished jobs, and a stream
keeps them for the job log's recorder to replay from any position.

Events of one job can arrive out of order (two workers, a retry racing its own event);
``order`` gives each a place in the job's life, so a log never moves a job backwards.
A job's life is counted in replays (an operator replayed it from the dead-letter
queue), then attempts, then deferrals (middleware ran the same attempt again later),
then the phase within that try.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from enum import StrEnum
from functools import cache
from typing import Any

from amqp_jobs.message import (
    CONTENT_TYPE,
    H_DEFERRALS,
    H_KEY,
    H_REPLAYS,
    ErrorInfo,
    Message,
    header_count,
)

EVENT_VERSION = 1
#: The AMQP ``type`` property of an event message.
EVENT_TYPE = "job-event"


class EventKind(StrEnum):
    ENQUEUED = "enqueued"
    SCHEDULED = "scheduled"  # enqueued with an ETA
    REPLAYED = "replayed"  # an operator replayed it from the dead-letter queue
    DEFERRED = "deferred"  # the same attempt runs again later (not counted)
    QUARANTINED = "quarantined"  # delivered twice unsettled: it will run alone
    STARTED = "started"
    RETRYING = "retrying"  # the attempt failed; another follows after retry_in seconds
    SUCCEEDED = "succeeded"
    DEAD = "dead"  # parked in the dead-letter queue (dead_reason says why)
    DISCARDED = "discarded"  # the handler raised Discard: parked, by its own choice


#: Where a job ends: nothing follows but a replay.
TERMINAL = frozenset({EventKind.SUCCEEDED, EventKind.DEAD, EventKind.DISCARDED})

#: The phase of an event within one try (replays, attempt, deferrals): later phases win.
_PHASE = {
    EventKind.ENQUEUED: 0,
    EventKind.SCHEDULED: 0,
    EventKind.REPLAYED: 0,
    EventKind.QUARANTINED: 1,
    EventKind.STARTED: 2,
    EventKind.DEFERRED: 3,
    EventKind.RETRYING: 3,
    EventKind.SUCCEEDED: 4,
    EventKind.DEAD: 4,
    EventKind.DISCARDED: 4,
}


class InvalidEventError(ValueError):
    """An event message that is not one of ours (the recorder skips it, logged)."""


@dataclass(frozen=True)
class JobEvent:
    """One transition of one job. Times are epoch milliseconds."""

    event: EventKind
    job_id: str
    job: str
    queue: str
    at: int
    attempt: int = 1
    replays: int = 0
    deferrals: int = 0
    key: str | None = None
    enqueued_at: int | None = None
    eta: int | None = None
    started_at: int | None = None
    duration_ms: float | None = None
    worker: str | None = None
    error_type: str | None = None
    error_message: str | None = None
    traceback: str | None = None
    dead_reason: str | None = None
    retry_in: float | None = None
    #: the handler's return value as JSON (succeeded only)
    result: Any = None

    @property
    def routing_key(self) -> str:
        return f"{self.event}.{self.queue}.{self.job}"

    @property
    def order(self) -> tuple[int, int, int, int]:
        """This event's place in its job's life: a log applies it only if it is not
        before the one it holds."""
        return (self.replays, self.attempt, self.deferrals, _PHASE[self.event])

    @property
    def is_terminal(self) -> bool:
        return self.event in TERMINAL

    def with_error(self, error: ErrorInfo | None) -> JobEvent:
        if error is None:
            return self
        return _replace(
            self,
            error_type=error.type,
            error_message=error.message,
            traceback=error.traceback or None,
        )

    def to_message(self) -> Message:
        """The event as a message: JSON, typed ``job-event``, with an id naming the job's
        transition (the same event published twice has the same id)."""
        return Message(
            self.to_json(),
            CONTENT_TYPE,
            f"{self.job_id}/{self.replays}.{self.attempt}.{self.deferrals}/{self.event}",
            EVENT_TYPE,
            None,
            {},
        )

    def to_json(self) -> bytes:
        # the fields as they are (asdict deep-copies every value: a third of an event's
        # cost), the enum as its text
        out: dict[str, Any] = {"v": EVENT_VERSION, "event": self.event.value}
        for name, value in self.__dict__.items():
            if value is not None and name != "event":
                out[name] = value
        return _encode(out).encode()

    @classmethod
    def from_json(cls, body: bytes) -> JobEvent:
        """Parse an event, or raise InvalidEventError saying what is wrong."""
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidEventError(f"not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise InvalidEventError("not a JSON object")
        if data.get("v") != EVENT_VERSION:
            raise InvalidEventError(f"event version {data.get('v')!r}; this reads {EVENT_VERSION}")
        try:
            kind = EventKind(str(data.get("event")))
        except ValueError:
            raise InvalidEventError(f"unknown event {data.get('event')!r}") from None
        fields: dict[str, Any] = {"event": kind}
        for name, types, required in _FIELDS:
            value = data.get(name)
            if value is None:
                if required:
                    raise InvalidEventError(f"{name} is missing")
                continue
            if isinstance(value, bool) or not isinstance(value, types):
                raise InvalidEventError(f"{name} has the wrong type: {value!r}")
            fields[name] = value
        if "result" in data:
            fields["result"] = data["result"]
        for name in ("attempt", "replays", "deferrals"):
            if fields.get(name, 0) < 0:
                raise InvalidEventError(f"{name} is negative")
        return cls(**fields)


_FIELDS: tuple[tuple[str, type | tuple[type, ...], bool], ...] = (
    ("job_id", str, True),
    ("job", str, True),
    ("queue", str, True),
    ("at", int, True),
    ("attempt", int, False),
    ("replays", int, False),
    ("deferrals", int, False),
    ("key", str, False),
    ("enqueued_at", int, False),
    ("eta", int, False),
    ("started_at", int, False),
    ("duration_ms", (int, float), False),
    ("worker", str, False),
    ("error_type", str, False),
    ("error_message", str, False),
    ("traceback", str, False),
    ("dead_reason", str, False),
    ("retry_in", (int, float), False),
)


_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def _replace(event: JobEvent, **changes: Any) -> JobEvent:
    return JobEvent(**(asdict(event) | changes))


@cache
def worker_identity() -> str:
    """``host:pid`` of this process: which worker an event came from."""
    return f"{socket.gethostname()}:{os.getpid()}"


def header_key(headers: Mapping[str, Any]) -> str | None:
    value = headers.get(H_KEY)
    return value if isinstance(value, str) and value else None


def tries(headers: Mapping[str, Any]) -> tuple[int, int]:
    """(replays, deferrals) a message's headers count."""
    return header_count(headers.get(H_REPLAYS)), header_count(headers.get(H_DEFERRALS))
