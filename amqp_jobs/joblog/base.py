"""What both job log stores share: the records, the query, input checks, and the SQL
that SQLite and PostgreSQL both run.

Applying events is idempotent and order-proof: an event changes a job's row only if it
is not before the event the row holds (``JobEvent.order``), so a duplicate or a late
event never moves a job backwards. The recorder's stream position is written in the
same transaction as the rows it covers, and only if it is still the position the
recorder started from (a fence: a recorder that lost its leadership without knowing
it cannot write over its successor's work).

This module sits below the backends (``sqlite``, ``postgres``); ``joblog.store``, above
them, picks one by URL and re-exports the public names, so imports flow one way.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, get_args
from urllib.parse import parse_qsl, urlencode

from amqp_jobs.errors import ContractError, StoreError
from amqp_jobs.events import TERMINAL, EventKind, JobEvent

#: Default store when none is named: a SQLite file in the working directory.
DEFAULT_STORE = "sqlite:///amqp-jobs.db"
#: Seconds any store call may take before it raises StoreError.
DEFAULT_TIMEOUT = 10.0
#: Rows a list returns at most, and jobs one prune statement deletes at most.
MAX_LIMIT = 10_000

#: The states a job's row can be in: an event's kind, except that a replay puts the
#: job back to ``enqueued`` and a started attempt is ``running``.
JobState = Literal[
    "enqueued",
    "scheduled",
    "quarantined",
    "running",
    "retrying",
    "deferred",
    "succeeded",
    "dead",
    "discarded",
]
STATES: tuple[str, ...] = get_args(JobState)
FINAL_STATES = frozenset({"succeeded", "dead", "discarded"})

_STATE_OF = {
    EventKind.ENQUEUED: "enqueued",
    EventKind.SCHEDULED: "scheduled",
    EventKind.REPLAYED: "enqueued",
    EventKind.QUARANTINED: "quarantined",
    EventKind.STARTED: "running",
    EventKind.RETRYING: "retrying",
    EventKind.DEFERRED: "deferred",
    EventKind.SUCCEEDED: "succeeded",
    EventKind.DEAD: "dead",
    EventKind.DISCARDED: "discarded",
}
#: Events about the job as a whole; every other one is about one attempt.
_JOB_EVENTS = frozenset({EventKind.ENQUEUED, EventKind.SCHEDULED, EventKind.REPLAYED})


class FencedError(StoreError):
    """The recorder's position moved under it: another recorder leads now."""


def _dt(ms: int | None) -> datetime | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, UTC)


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in values.items()}


@dataclass(frozen=True)
class AttemptRecord:
    """One attempt of a job, as the log last heard of it."""

    attempt: int
    replays: int
    state: str
    started_at: datetime | None
    ended_at: datetime | None
    duration_ms: float | None
    worker: str | None
    error_type: str | None
    error_message: str | None
    traceback: str | None
    dead_reason: str | None
    retry_in: float | None

    def to_json(self) -> dict[str, Any]:
        return _jsonable(dict(self.__dict__))


@dataclass(frozen=True)
class JobRecord:
    """A job's row: where it stands, and what it last did.

    The error fields hold the last failure of the job's current life (a retrying job
    that runs again still says why it failed); success and a replay clear them.
    """

    namespace: str
    job_id: str
    job: str
    queue: str
    key: str | None
    state: str
    attempt: int
    replays: int
    enqueued_at: datetime | None
    eta: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    duration_ms: float | None
    worker: str | None
    error_type: str | None
    error_message: str | None
    traceback: str | None
    dead_reason: str | None
    #: the handler's return value, as JSON data (succeeded only)
    result: Any = None
    #: every attempt, oldest first (``get`` fills it; a listing leaves it empty)
    attempts: tuple[AttemptRecord, ...] = field(default=())

    @property
    def is_final(self) -> bool:
        return self.state in FINAL_STATES

    def to_json(self, *, with_attempts: bool = False) -> dict[str, Any]:
        out = _jsonable({k: v for k, v in self.__dict__.items() if k != "attempts"})
        if with_attempts:
            out["attempts"] = [a.to_json() for a in self.attempts]
        return out


def _optional_str(name: str, value: object) -> None:
    if value is not None and (not isinstance(value, str) or not value):
        raise ContractError(f"{name} must be a non-empty string or None, got {value!r}")


def check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    """``value`` if it is an int in ``low..high``, else ContractError naming it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ContractError(f"{name} must be an int, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"{low}..{high}" if high is not None else f">= {low}"
        raise ContractError(f"{name} must be {bound}, got {value}")
    return value


def check_text(name: str, value: object) -> str:
    """``value`` if it is a non-empty string, else ContractError naming it."""
    if not isinstance(value, str) or not value:
        raise ContractError(f"{name} must be a non-empty string, got {value!r}")
    return value


def check_state(state: object) -> str:
    if state not in STATES:
        raise ContractError(f"unknown state {state!r}; states: {', '.join(STATES)}")
    return str(state)


@dataclass(frozen=True)
class Query:
    """A list of jobs: every filter optional, newest first. Checked when built, so bad
    input never reaches a database."""

    state: str | None = None
    job: str | None = None
    key: str | None = None
    queue: str | None = None
    since_ms: int | None = None
    limit: int = 100

    def __post_init__(self) -> None:
        if self.state is not None:
            check_state(self.state)
        for name in ("job", "key", "queue"):
            _optional_str(name, getattr(self, name))
        if self.since_ms is not None:
            check_int("since_ms", self.since_ms, 0)
        check_int("limit", self.limit, 1, MAX_LIMIT)


def check_apply(namespace: str, offset: int, expected: int | None) -> None:
    check_text("namespace", namespace)
    check_int("offset", offset, 0)
    if expected is not None:
        check_int("expected", expected, 0)


def check_prune(namespace: str, state: str, before_ms: int, batch: int) -> None:
    check_text("namespace", namespace)
    check_state(state)
    check_int("before_ms", before_ms, 0)
    check_int("batch", batch, 1, MAX_LIMIT)


def redact(url: str) -> str:
    """``url`` with its password, in the authority or the query, replaced by ``***``.

    The credentials end at the last ``@`` before the query, so a password with a raw
    ``@`` or ``/`` in it is hidden whole (at worst more than the password is)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    head, question, query = rest.partition("?")
    if "@" in head:
        creds, _, host = head.rpartition("@")
        if ":" in creds:
            head = f"{creds.split(':', 1)[0]}:***@{host}"
    if question:
        pairs = parse_qsl(query, keep_blank_values=True)
        hidden = [(k, "***" if k.lower() == "password" else v) for k, v in pairs]
        query = urlencode(hidden, safe="*")
    return f"{scheme}://{head}{question}{query}"


def secrets_of(url: str) -> list[str]:
    """The passwords a URL carries, to scrub from a driver's error messages."""
    head, _, query = url.partition("://")[2].partition("?")
    creds = head.rpartition("@")[0]
    found = [creds.split(":", 1)[1]] if ":" in creds else []
    found += [v for k, v in parse_qsl(query) if k.lower() == "password"]
    return [s for s in found if s]


def store_error(url: str, secrets: Sequence[str], what: str, exc: BaseException) -> StoreError:
    """A StoreError naming the store by its redacted URL, with the driver's message
    scrubbed of any password."""
    detail = str(exc) or type(exc).__name__
    for secret in secrets:
        detail = detail.replace(secret, "***")
    return StoreError(f"job log store {url}: {what} failed: {detail}")


# -- SQL both databases run ---------------------------------------------------------

Style = Literal["qmark", "numeric"]

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS amqp_jobs (
        ns TEXT NOT NULL,
        id TEXT NOT NULL,
        name TEXT NOT NULL,
        queue TEXT NOT NULL,
        key TEXT,
        state TEXT NOT NULL,
        replays INTEGER NOT NULL,
        attempt INTEGER NOT NULL,
        deferrals INTEGER NOT NULL,
        phase INTEGER NOT NULL,
        enqueued_at BIGINT,
        eta BIGINT,
        started_at BIGINT,
        finished_at BIGINT,
        updated_at BIGINT NOT NULL,
        duration_ms DOUBLE PRECISION,
        worker TEXT,
        error_type TEXT,
        error_message TEXT,
        traceback TEXT,
        dead_reason TEXT,
        result TEXT,
        PRIMARY KEY (ns, id)
    )""",
    # Listings are newest first with id as the tie-break: each index ends in both, so
    # a filtered listing reads LIMIT entries of one index backwards and stops.
    "CREATE INDEX IF NOT EXISTS amqp_jobs_by_key ON amqp_jobs (ns, key, updated_at, id)",
    "CREATE INDEX IF NOT EXISTS amqp_jobs_by_state ON amqp_jobs (ns, state, updated_at, id)",
    "CREATE INDEX IF NOT EXISTS amqp_jobs_by_name ON amqp_jobs (ns, name, updated_at, id)",
    "CREATE INDEX IF NOT EXISTS amqp_jobs_by_time ON amqp_jobs (ns, updated_at, id)",
    """CREATE TABLE IF NOT EXISTS amqp_jobs_attempts (
        ns TEXT NOT NULL,
        job_id TEXT NOT NULL,
        replays INTEGER NOT NULL,
        attempt INTEGER NOT NULL,
        deferrals INTEGER NOT NULL,
        phase INTEGER NOT NULL,
        state TEXT NOT NULL,
        started_at BIGINT,
        ended_at BIGINT,
        duration_ms DOUBLE PRECISION,
        worker TEXT,
        error_type TEXT,
        error_message TEXT,
        traceback TEXT,
        dead_reason TEXT,
        retry_in DOUBLE PRECISION,
        PRIMARY KEY (ns, job_id, replays, attempt)
    )""",
    """CREATE TABLE IF NOT EXISTS amqp_jobs_recorder (
        ns TEXT PRIMARY KEY,
        stream_offset BIGINT NOT NULL,
        updated_at BIGINT NOT NULL
    )""",
    # unique jobs: which job holds each uniqueness key (see unique_is_live)
    """CREATE TABLE IF NOT EXISTS amqp_jobs_unique (
        ns TEXT NOT NULL,
        ukey TEXT NOT NULL,
        job_id TEXT NOT NULL,
        claimed_at BIGINT NOT NULL,
        PRIMARY KEY (ns, ukey)
    )""",
)

JOB_COLUMNS = (
    "ns, id, name, queue, key, state, replays, attempt, deferrals, phase, enqueued_at, eta,"
    " started_at, finished_at, updated_at, duration_ms, worker, error_type, error_message,"
    " traceback, dead_reason, result"
)
ATTEMPT_COLUMNS = (
    "ns, job_id, replays, attempt, deferrals, phase, state, started_at, ended_at,"
    " duration_ms, worker, error_type, error_message, traceback, dead_reason, retry_in"
)
#: What an AttemptRecord is read from.
ATTEMPT_FIELDS = (
    "attempt, replays, state, started_at, ended_at, duration_ms, worker, error_type,"
    " error_message, traceback, dead_reason, retry_in"
)

#: The row holds the same try (replays, attempt, deferrals) as the event.
_SAME_TRY = (
    "(amqp_jobs.replays, amqp_jobs.attempt, amqp_jobs.deferrals)"
    " = (excluded.replays, excluded.attempt, excluded.deferrals)"
)
#: The event begins a new life of the job (an operator replayed it).
_NEW_LIFE = "excluded.replays > amqp_jobs.replays"


def _of_try(column: str) -> str:
    """A fact of the current try: kept from an earlier event of the same try if this
    one lacks it, never carried over from an earlier try."""
    return (
        f"{column} = CASE WHEN {_SAME_TRY} THEN COALESCE(excluded.{column}, amqp_jobs.{column})"
        f" ELSE excluded.{column} END"
    )


def _last_error(column: str) -> str:
    """The last failure of the current life: set by a failure, cleared by success or a
    replay, kept otherwise (a job running again still says why it is retrying)."""
    return (
        f"{column} = CASE WHEN excluded.state IN ('retrying', 'dead', 'discarded')"
        f" THEN excluded.{column} WHEN excluded.state = 'succeeded' OR {_NEW_LIFE} THEN NULL"
        f" ELSE amqp_jobs.{column} END"
    )


# In both databases every SET expression reads the row as it was before the update.
_UPSERT_JOB = f"""
INSERT INTO amqp_jobs ({JOB_COLUMNS}) VALUES ({{values}})
ON CONFLICT (ns, id) DO UPDATE SET
    name = COALESCE(NULLIF(excluded.name, ''), amqp_jobs.name),
    queue = COALESCE(NULLIF(excluded.queue, ''), amqp_jobs.queue),
    key = COALESCE(excluded.key, amqp_jobs.key),
    state = excluded.state,
    replays = excluded.replays,
    attempt = excluded.attempt,
    deferrals = excluded.deferrals,
    phase = excluded.phase,
    enqueued_at = COALESCE(amqp_jobs.enqueued_at, excluded.enqueued_at),
    eta = COALESCE(excluded.eta, amqp_jobs.eta),
    {_of_try("started_at")},
    finished_at = excluded.finished_at,
    updated_at = excluded.updated_at,
    {_of_try("duration_ms")},
    {_of_try("worker")},
    {_last_error("error_type")},
    {_last_error("error_message")},
    {_last_error("traceback")},
    dead_reason = excluded.dead_reason,
    result = excluded.result
WHERE (amqp_jobs.replays, amqp_jobs.attempt, amqp_jobs.deferrals, amqp_jobs.phase)
    <= (excluded.replays, excluded.attempt, excluded.deferrals, excluded.phase)
"""

_UPSERT_ATTEMPT = f"""
INSERT INTO amqp_jobs_attempts ({ATTEMPT_COLUMNS}) VALUES ({{values}})
ON CONFLICT (ns, job_id, replays, attempt) DO UPDATE SET
    deferrals = excluded.deferrals,
    phase = excluded.phase,
    state = excluded.state,
    started_at = COALESCE(excluded.started_at, amqp_jobs_attempts.started_at),
    ended_at = excluded.ended_at,
    duration_ms = excluded.duration_ms,
    worker = COALESCE(excluded.worker, amqp_jobs_attempts.worker),
    error_type = excluded.error_type,
    error_message = excluded.error_message,
    traceback = excluded.traceback,
    dead_reason = excluded.dead_reason,
    retry_in = excluded.retry_in
WHERE (amqp_jobs_attempts.deferrals, amqp_jobs_attempts.phase)
    <= (excluded.deferrals, excluded.phase)
"""

# Placeholders are numbered in the order they appear, so qmark and numeric styles take
# the same parameter tuple.
_POSITION = "SELECT stream_offset FROM amqp_jobs_recorder WHERE ns = {1}"
_FIRST_POSITION = (
    "INSERT INTO amqp_jobs_recorder (ns, stream_offset, updated_at) VALUES ({1}, {2}, {3})"
    " ON CONFLICT (ns) DO NOTHING"
)
_MOVE_POSITION = (
    "UPDATE amqp_jobs_recorder SET stream_offset = {1}, updated_at = {2}"
    " WHERE ns = {3} AND stream_offset = {4}"
)
_GET_JOB = f"SELECT {JOB_COLUMNS} FROM amqp_jobs WHERE ns = {{1}} AND id = {{2}}"
_GET_ATTEMPTS = (
    f"SELECT {ATTEMPT_FIELDS} FROM amqp_jobs_attempts WHERE ns = {{1}} AND job_id = {{2}}"
    " ORDER BY replays, attempt"
)
_PRUNABLE = (
    "SELECT id FROM amqp_jobs WHERE ns = {1} AND state = {2} AND updated_at < {3}"
    " ORDER BY updated_at LIMIT {4}"
)
_CLAIM_UNIQUE = (
    "INSERT INTO amqp_jobs_unique (ns, ukey, job_id, claimed_at) VALUES ({1}, {2}, {3}, {4})"
    " ON CONFLICT (ns, ukey) DO NOTHING"
)
_UNIQUE_OWNER = "SELECT job_id, claimed_at FROM amqp_jobs_unique WHERE ns = {1} AND ukey = {2}"
_JOB_STATE = "SELECT state, updated_at FROM amqp_jobs WHERE ns = {1} AND id = {2}"
_TAKE_UNIQUE = (
    "UPDATE amqp_jobs_unique SET job_id = {1}, claimed_at = {2}"
    " WHERE ns = {3} AND ukey = {4} AND job_id = {5}"
)
_RELEASE_UNIQUE = "DELETE FROM amqp_jobs_unique WHERE ns = {1} AND ukey = {2} AND job_id = {3}"
#: Checks that an existing table is ours (a missing column fails it).
_PROBE = f"SELECT {JOB_COLUMNS} FROM amqp_jobs WHERE 1 = 0"


def mark(style: Style, i: int) -> str:
    """The ``i``-th (from 1) placeholder in a driver's parameter style."""
    return "?" if style == "qmark" else f"${i}"


def _render(template: str, style: Style, count: int) -> str:
    return template.format(*[""] + [mark(style, i) for i in range(1, count + 1)])


@dataclass(frozen=True)
class Statements:
    """The shared statements in one driver's parameter style."""

    upsert_job: str
    upsert_attempt: str
    position: str
    first_position: str
    move_position: str
    get_job: str
    get_attempts: str
    prunable: str
    probe: str
    claim_unique: str
    unique_owner: str
    job_state: str
    take_unique: str
    release_unique: str

    @classmethod
    def of(cls, style: Style) -> Statements:
        values = ", ".join(mark(style, i) for i in range(1, 23))
        attempt_values = ", ".join(mark(style, i) for i in range(1, 17))
        return cls(
            upsert_job=_UPSERT_JOB.format(values=values),
            upsert_attempt=_UPSERT_ATTEMPT.format(values=attempt_values),
            position=_render(_POSITION, style, 1),
            first_position=_render(_FIRST_POSITION, style, 3),
            move_position=_render(_MOVE_POSITION, style, 4),
            get_job=_render(_GET_JOB, style, 2),
            get_attempts=_render(_GET_ATTEMPTS, style, 2),
            prunable=_render(_PRUNABLE, style, 4),
            probe=_PROBE,
            claim_unique=_render(_CLAIM_UNIQUE, style, 4),
            unique_owner=_render(_UNIQUE_OWNER, style, 2),
            job_state=_render(_JOB_STATE, style, 2),
            take_unique=_render(_TAKE_UNIQUE, style, 5),
            release_unique=_render(_RELEASE_UNIQUE, style, 3),
        )


def unique_is_live(
    claimed_at: int,
    job: Sequence[Any] | None,
    now_ms: int,
    period_ms: int,
    grace_ms: int,
) -> bool:
    """Whether the job holding a uniqueness key still holds it: it is in the log and not
    ended, or ended less than ``period_ms`` ago; or it is not in the log yet but was
    claimed less than ``grace_ms`` ago (its publisher is publishing, or the recorder has
    not written its ``enqueued`` event yet). A claim older than that with no row was
    never published (its publisher died): the key is free."""
    if job is None:
        return claimed_at >= now_ms - grace_ms
    state, updated_at = job[0], int(job[1])
    return state not in FINAL_STATES or updated_at > now_ms - period_ms


def list_sql(namespace: str, query: Query, style: Style) -> tuple[str, list[Any]]:
    """The ``SELECT`` of the jobs a query names, and its parameters."""
    params: list[Any] = [namespace]
    clauses = [f"ns = {mark(style, 1)}"]
    for column, value in (
        ("state", query.state),
        ("name", query.job),
        ("key", query.key),
        ("queue", query.queue),
    ):
        if value is not None:
            params.append(value)
            clauses.append(f"{column} = {mark(style, len(params))}")
    if query.since_ms is not None:
        params.append(query.since_ms)
        clauses.append(f"updated_at >= {mark(style, len(params))}")
    sql = (
        f"SELECT {JOB_COLUMNS} FROM amqp_jobs WHERE {' AND '.join(clauses)}"
        f" ORDER BY updated_at DESC, id DESC LIMIT {query.limit:d}"
    )
    return sql, params


def _started(e: JobEvent) -> int | None:
    if e.started_at is not None:
        return e.started_at
    return e.at if e.event is EventKind.STARTED else None


def _float(value: float | None) -> float | None:
    return None if value is None else float(value)


def job_row(namespace: str, e: JobEvent) -> tuple[Any, ...]:
    """The values of ``amqp_jobs`` an event writes, in JOB_COLUMNS order."""
    result = None if e.result is None else json.dumps(e.result, separators=(",", ":"))
    return (
        namespace,
        e.job_id,
        e.job,
        e.queue,
        e.key,
        _STATE_OF[e.event],
        *e.order,
        e.enqueued_at,
        e.eta,
        _started(e),
        e.at if e.event in TERMINAL else None,
        e.at,
        _float(e.duration_ms),
        e.worker,
        e.error_type,
        e.error_message,
        e.traceback,
        e.dead_reason,
        result,
    )


def attempt_row(namespace: str, e: JobEvent) -> tuple[Any, ...] | None:
    """The values of ``amqp_jobs_attempts`` an event writes (ATTEMPT_COLUMNS order), or
    None if it is not about an attempt."""
    if e.event in _JOB_EVENTS:
        return None
    ended = None if e.event in (EventKind.STARTED, EventKind.QUARANTINED) else e.at
    return (
        namespace,
        e.job_id,
        *e.order,
        _STATE_OF[e.event],
        _started(e),
        ended,
        _float(e.duration_ms),
        e.worker,
        e.error_type,
        e.error_message,
        e.traceback,
        e.dead_reason,
        _float(e.retry_in),
    )


def rows_of(
    namespace: str, events: Sequence[JobEvent]
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """The job rows and attempt rows a batch of events writes."""
    jobs = [job_row(namespace, e) for e in events]
    attempts = [row for e in events if (row := attempt_row(namespace, e)) is not None]
    return jobs, attempts


def record_of(row: Sequence[Any], attempts: Sequence[AttemptRecord] = ()) -> JobRecord:
    """A JobRecord from a row of ``SELECT {JOB_COLUMNS}``."""
    (
        ns, job_id, name, queue, key, state, replays, attempt, _deferrals, _phase,
        enqueued_at, eta, started_at, finished_at, updated_at, duration_ms, worker,
        error_type, error_message, traceback, dead_reason, result,
    ) = row  # fmt: skip
    return JobRecord(
        namespace=ns,
        job_id=job_id,
        job=name,
        queue=queue,
        key=key,
        state=state,
        attempt=attempt,
        replays=replays,
        enqueued_at=_dt(enqueued_at),
        eta=_dt(eta),
        started_at=_dt(started_at),
        finished_at=_dt(finished_at),
        updated_at=datetime.fromtimestamp(updated_at / 1000, UTC),
        duration_ms=duration_ms,
        worker=worker,
        error_type=error_type,
        error_message=error_message,
        traceback=traceback,
        dead_reason=dead_reason,
        result=None if result is None else json.loads(result),
        attempts=tuple(attempts),
    )


def attempt_of(row: Sequence[Any]) -> AttemptRecord:
    """An AttemptRecord from a row of ``SELECT {ATTEMPT_FIELDS}``."""
    (
        attempt, replays, state, started_at, ended_at, duration_ms, worker, error_type,
        error_message, traceback, dead_reason, retry_in,
    ) = row  # fmt: skip
    return AttemptRecord(
        attempt=attempt,
        replays=replays,
        state=state,
        started_at=_dt(started_at),
        ended_at=_dt(ended_at),
        duration_ms=duration_ms,
        worker=worker,
        error_type=error_type,
        error_message=error_message,
        traceback=traceback,
        dead_reason=dead_reason,
        retry_in=retry_in,
    )


def fenced(url: str, namespace: str, current: int | None, expected: int | None) -> FencedError:
    def show(offset: int | None) -> str:
        return "none" if offset is None else str(offset)

    return FencedError(
        f"job log store {url}: the recorder position of namespace {namespace!r} is"
        f" {show(current)}, not {show(expected)}: another recorder moved it; nothing written"
    )
