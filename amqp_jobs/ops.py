"""Operating a namespace: queue status, and listing, replaying and purging dead jobs.

Dead-letter queues are read with basic.get and left unacked; closing the channel hands
every message not deliberately removed back to the broker in its original order. So a
listing never loses, duplicates or reorders dead jobs, and a replay or purge interrupted
half-way (Ctrl-C, kill) leaves every job it had not finished where it was.
"""

from __future__ import annotations

import base64
import json
import logging
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeAlias
from urllib.parse import quote, unquote, urlsplit

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

from amqp_jobs.errors import AmqpJobsError
from amqp_jobs.errors import NotFoundError as NotFoundError
from amqp_jobs.message import (
    H_ATTEMPT,
    H_DEAD_REASON,
    H_ERROR_MESSAGE,
    H_ERROR_TRACEBACK,
    H_ERROR_TYPE,
    H_FAILED_AT,
    replay_message,
)
from amqp_jobs.topology import (
    TopologySettings,
    dead_queue,
    delay_queue,
    due_queue,
    quarantine_queue,
    unroutable,
    work_queue,
)
from amqp_jobs.transport.amqp.channels import open_channel
from amqp_jobs.transport.amqp.connection import Publisher
from amqp_jobs.transport.amqp.link import message_properties
from amqp_jobs.urls import mask_url

log = logging.getLogger("amqp_jobs.ops")

#: The connection the operations run on: the commands open it and never name the client
#: library's type themselves.
Connection: TypeAlias = AbstractConnection

#: Most dead jobs one listing, replay or purge looks at.
DEFAULT_SCAN = 100_000

#: What the AMQP client and the socket raise when the broker goes away under an
#: operation: aiormq's connection errors are OSErrors (ConnectionError), and a channel of
#: a dead connection raises ChannelInvalidStateError (a RuntimeError).
BROKER_LOST: tuple[type[BaseException], ...] = (
    OSError,
    aiormq.exceptions.ChannelInvalidStateError,
)
#: What it raises when the broker refuses an operation (closes the channel with
#: ACCESS_REFUSED, say): the rest of aiormq's errors.
BROKER_REFUSED: tuple[type[BaseException], ...] = (aiormq.exceptions.AMQPError,)


# -- status ----------------------------------------------------------------------


@dataclass(frozen=True)
class QueueStatus:
    """Counts for one work queue; ``unacked`` is None without the management API."""

    queue: str
    ready: int
    unacked: int | None
    consumers: int
    due: int
    quarantined: int
    dead: int


@dataclass(frozen=True)
class Status:
    namespace: str
    queues: list[QueueStatus]
    delayed: int
    unroutable: int

    def to_json(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "queues": [q.__dict__ for q in self.queues],
            "delayed": self.delayed,
            "unroutable": self.unroutable,
        }


class Peeker:
    """Passive declarations on a channel that is reopened after each 404."""

    def __init__(self, connection: AbstractConnection) -> None:
        self.connection = connection
        self._channel: AbstractChannel | None = None

    async def counts(self, name: str) -> tuple[int, int] | None:
        """(ready messages, consumers) of a queue, or None if it does not exist."""
        if self._channel is None or self._channel.is_closed:
            self._channel = await open_channel(self.connection, publisher_confirms=False)
        try:
            queue = await self._channel.declare_queue(name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            self._channel = None
            return None
        result = queue.declaration_result
        return result.message_count or 0, result.consumer_count or 0

    async def close(self) -> None:
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()


class Management:
    """The RabbitMQ management HTTP API, used only for what AMQP cannot tell (unacked counts)."""

    def __init__(self, url: str, amqp_url: str) -> None:
        parts = urlsplit(url)
        amqp = urlsplit(amqp_url)
        self.base = f"{parts.scheme}://{parts.hostname}:{parts.port or 15672}"
        user = unquote(parts.username or amqp.username or "guest")
        password = unquote(parts.password or amqp.password or "guest")
        self.auth = base64.b64encode(f"{user}:{password}".encode()).decode()
        vhost = unquote(amqp.path[1:]) if len(amqp.path) > 1 else "/"
        self.vhost = quote(vhost, safe="")
        self.display = mask_url(url)

    def _get(self, path: str) -> Any:
        request = urllib.request.Request(
            self.base + path, headers={"Authorization": f"Basic {self.auth}"}
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return json.load(response)
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise AmqpJobsError(f"management API {self.display}: HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise AmqpJobsError(f"management API {self.display} unreachable: {exc}") from None

    def unacked(self, queue: str) -> int | None:
        data = self._get(f"/api/queues/{self.vhost}/{quote(queue, safe='')}")
        return None if data is None else int(data.get("messages_unacknowledged", 0))

    def work_queues(self, namespace: str) -> list[str]:
        prefix = work_queue(namespace, "")
        data = self._get(f"/api/queues/{self.vhost}?columns=name") or []
        return sorted(q["name"][len(prefix) :] for q in data if q["name"].startswith(prefix))


async def status(
    connection: AbstractConnection,
    namespace: str,
    queues: Iterable[str],
    settings: TopologySettings,
    management: Management | None = None,
) -> Status:
    """Depth of every work, due, quarantine, dead, delay and unroutable queue."""
    peek = Peeker(connection)
    try:
        rows = []
        for q in sorted(set(queues)):
            work = await peek.counts(work_queue(namespace, q))
            if work is None:
                raise NotFoundError(f"no work queue {work_queue(namespace, q)!r}")
            due = await peek.counts(due_queue(namespace, q))
            quarantined = await peek.counts(quarantine_queue(namespace, q))
            dead = await peek.counts(dead_queue(namespace, q))
            unacked = management.unacked(work_queue(namespace, q)) if management else None
            rows.append(
                QueueStatus(
                    q,
                    work[0],
                    unacked,
                    work[1],
                    due[0] if due else 0,
                    quarantined[0] if quarantined else 0,
                    dead[0] if dead else 0,
                )
            )
        delayed = 0
        for level in range(settings.delay_levels):
            counts = await peek.counts(delay_queue(namespace, level))
            if counts is None:
                break  # the cascade is declared whole or not at all
            delayed += counts[0]
        parked = await peek.counts(unroutable(namespace))
        return Status(namespace, rows, delayed, parked[0] if parked else 0)
    finally:
        await peek.close()


# -- dead jobs -------------------------------------------------------------------


@dataclass(frozen=True)
class DeadJob:
    """One dead job as an operator sees it."""

    job_id: str | None
    job_name: str | None
    queue: str
    attempts: int | None
    failed_at: datetime | None
    error_type: str | None
    error_message: str | None
    reason: str
    traceback: str | None = None
    body: bytes = b""
    headers: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_message(cls, message: AbstractIncomingMessage, queue: str) -> DeadJob:
        headers = dict(message.headers or {})
        reason = headers.get(H_DEAD_REASON)
        failed_at = _epoch_ms(headers.get(H_FAILED_AT))
        deaths = headers.get("x-death")
        if not isinstance(reason, str):
            # dead-lettered by the broker itself (delivery limit), not by a worker
            first = deaths[0] if isinstance(deaths, list) and deaths else {}
            broker = _text(first.get("reason")) if isinstance(first, dict) else None
            broker = broker or "unknown"
            reason = "delivery-limit" if broker == "delivery_limit" else f"broker-{broker}"
            when = first.get("time") if isinstance(first, dict) else None
            failed_at = when if isinstance(when, datetime) else failed_at
        if failed_at is not None and failed_at.tzinfo is None:
            failed_at = failed_at.replace(tzinfo=UTC)
        attempt = headers.get(H_ATTEMPT, 1)
        return cls(
            job_id=message.message_id,
            job_name=message.type,
            queue=queue,
            attempts=None if isinstance(attempt, bool) or not isinstance(attempt, int) else attempt,
            failed_at=failed_at,
            error_type=_text(headers.get(H_ERROR_TYPE)),
            error_message=_text(headers.get(H_ERROR_MESSAGE)),
            reason=reason,
            traceback=_text(headers.get(H_ERROR_TRACEBACK)),
            body=message.body,
            headers=headers,
        )

    @property
    def args_text(self) -> str:
        try:
            return self.body.decode("utf-8")
        except UnicodeDecodeError:
            return repr(self.body)

    def summary(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "job": self.job_name,
            "queue": self.queue,
            "attempts": self.attempts,
            "failed_at": self.failed_at.isoformat() if self.failed_at else None,
            "error_type": self.error_type,
            "error_message": self.error_message,
            "reason": self.reason,
        }

    def details(self) -> dict[str, Any]:
        return {
            **self.summary(),
            "traceback": self.traceback,
            "args": self.args_text,
            "headers": {k: _jsonable(v) for k, v in self.headers.items()},
        }


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None


def _epoch_ms(value: Any) -> datetime | None:
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return datetime.fromtimestamp(value / 1000, UTC)
        except (OverflowError, OSError, ValueError):
            return None
    return None


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, int | float | str | bool) or value is None:
        return value
    return str(value)


Selector = Callable[[DeadJob], bool]


def select(
    *,
    ids: Iterable[str] | None = None,
    job: str | None = None,
    older_than: float | None = None,
    now: datetime | None = None,
) -> Selector:
    """A predicate over dead jobs: all the given conditions must hold."""
    wanted = set(ids) if ids is not None else None
    cutoff = None
    if older_than is not None:
        cutoff = (now or datetime.now(UTC)).timestamp() - older_than

    def matches(dead: DeadJob) -> bool:
        if wanted is not None and dead.job_id not in wanted:
            return False
        if job is not None and dead.job_name != job:
            return False
        if cutoff is not None:
            return dead.failed_at is not None and dead.failed_at.timestamp() <= cutoff
        return True

    return matches


class DeadQueue:
    """Browse one dead-letter queue without losing or reordering anything.

    Use as ``async with DeadQueue(...) as dq``: messages fetched and not removed go back
    to the queue, in order, when the block ends (however it ends).
    """

    def __init__(self, connection: AbstractConnection, namespace: str, queue: str) -> None:
        self.connection = connection
        self.namespace = namespace
        self.queue = queue
        self.name = dead_queue(namespace, queue)
        self._channel: AbstractChannel | None = None
        self._queue: aio_pika.abc.AbstractQueue | None = None
        self.size = 0

    async def __aenter__(self) -> DeadQueue:
        channel = await open_channel(self.connection, publisher_confirms=False)
        try:
            self._queue = await channel.declare_queue(self.name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            raise NotFoundError(
                f"no dead-letter queue {self.name!r}: is {self.queue!r} a queue of namespace"
                f" {self.namespace!r}?"
            ) from None
        self._channel = channel
        self.size = self._queue.declaration_result.message_count or 0
        return self

    async def __aexit__(self, *exc: object) -> None:
        # Closing the channel returns every unacked message, in its original order.
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()

    async def scan(
        self, limit: int = DEFAULT_SCAN
    ) -> list[tuple[AbstractIncomingMessage, DeadJob]]:
        """Fetch up to ``limit`` messages (at most the count seen on opening), unacked."""
        assert self._queue is not None
        out: list[tuple[AbstractIncomingMessage, DeadJob]] = []
        # Only the messages present at the start: jobs that die again while we work
        # (a replayed job failing at once) are left for the next run.
        for _ in range(min(limit, self.size)):
            message = await self._queue.get(no_ack=False, fail=False)
            if message is None:
                break
            out.append((message, DeadJob.from_message(message, self.queue)))
        return out


async def list_dead(
    connection: AbstractConnection,
    namespace: str,
    queue: str,
    *,
    limit: int | None = None,
    selector: Selector | None = None,
    scan: int = DEFAULT_SCAN,
) -> list[DeadJob]:
    """Dead jobs of one queue, oldest first; the queue is left exactly as it was."""
    async with DeadQueue(connection, namespace, queue) as dq:
        found = [dead for _, dead in await dq.scan(scan) if selector is None or selector(dead)]
    return found if limit is None else found[:limit]


async def find_dead(
    connection: AbstractConnection, namespace: str, queues: Iterable[str], job_id: str
) -> DeadJob | None:
    """The dead job with this id in any of the queues, or None."""
    for queue in sorted(set(queues)):
        matches = await list_dead(connection, namespace, queue, selector=select(ids=[job_id]))
        if matches:
            return matches[0]
    return None


@dataclass
class Progress:
    done: int = 0
    total: int = 0
    job_ids: list[str] = field(default_factory=list)


async def replay_dead(
    connection: AbstractConnection,
    namespace: str,
    queue: str,
    selector: Selector,
    *,
    on_progress: Callable[[Progress], None] | None = None,
    scan: int = DEFAULT_SCAN,
) -> Progress:
    """Republish matching dead jobs to their work queue, each confirmed before removal.

    Each copy goes to ``{ns}.q.{queue}`` through the default exchange, so it arrives
    even if the job's binding changed. Interrupted, every job not yet confirmed stays in
    the dead queue; one confirmed but not yet removed is replayed again by a re-run
    (same job id: at least once, as everywhere).
    """
    target = work_queue(namespace, queue)
    publisher = Publisher(connection)
    progress = Progress()
    try:
        async with DeadQueue(connection, namespace, queue) as dq:
            batch = [(m, d) for m, d in await dq.scan(scan) if selector(d)]
            progress.total = len(batch)
            if on_progress:
                on_progress(progress)
            for message, dead in batch:
                copy = replay_message(message, queue)
                await publisher.publish("", target, copy.body, message_properties(copy))
                await message.ack()
                progress.done += 1
                progress.job_ids.append(dead.job_id or "")
                if on_progress:
                    on_progress(progress)
    finally:
        await publisher.close()
    return progress


async def purge_dead(
    connection: AbstractConnection,
    namespace: str,
    queue: str,
    selector: Selector,
    *,
    scan: int = DEFAULT_SCAN,
) -> int:
    """Delete matching dead jobs; returns how many were removed."""
    removed = 0
    async with DeadQueue(connection, namespace, queue) as dq:
        for message, dead in await dq.scan(scan):
            if selector(dead):
                await message.ack()
                removed += 1
    return removed
