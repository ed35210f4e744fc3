"""Operating a namespace: queue status; listing, replaying and purging dead jobs;
deleting a namespace.

Dead-letter queues are read with basic.get and left unacked; closing the channel hands
every message not deliberately removed back to the broker in its original order. So a
listing never loses, duplicates or reorders dead jobs, and a replay or purge interrupted
half-way (Ctrl-C, kill) leaves every job it had not finished where it was.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import logging
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from amqp_jobs.errors import AmqpJobsError, describe
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
from amqp_jobs.scheduler import describe_state
from amqp_jobs.schedules import State
from amqp_jobs.topology import (
    TopologySettings,
    dead_queue,
    delay_queue,
    due_queue,
    high_queue,
    namespace_plan,
    quarantine_queue,
    scheduler_status_queue,
    unroutable,
    work_queue,
)
from amqp_jobs.transport import Channel, Delivery, Session, Transport
from amqp_jobs.urls import mask_url

log = logging.getLogger("amqp_jobs.ops")

#: Most dead jobs one listing, replay or purge looks at.
DEFAULT_SCAN = 100_000
#: How long a dead-queue command waits at its end for the messages it browsed to be
#: back in the queue (seconds; a quorum queue takes them back asynchronously).
RETURN_WAIT = 3.0


class Broker:
    """What the operations run on: a link (counts, confirmed publishes) and a session
    (browsing queues) of one namespace, on RabbitMQ or in memory.

    Use as ``async with Broker(transport, namespace, settings)``; only our errors come
    out of it (ConnectionLostError when the broker goes away mid-command).
    """

    def __init__(
        self,
        transport: Transport,
        namespace: str,
        settings: TopologySettings,
        *,
        connect_timeout: float = 10.0,
        name: str = "amqp-jobs cli",
    ) -> None:
        self.transport = transport
        self.namespace = namespace
        self.settings = settings
        self.connect_timeout = connect_timeout
        self.name = name
        self.link = transport.link(
            namespace, settings, name=name, declare=False, connect_timeout=connect_timeout
        )
        self._session: Session | None = None

    async def __aenter__(self) -> Broker:
        await self.link.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
        await self.link.close()

    async def session(self) -> Session:
        if self._session is None:
            self._session = await self.transport.session(
                name=self.name, give_up_after=self.connect_timeout
            )
        return self._session


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
    #: ready in the high-priority twin (``ready`` counts normal priority)
    high: int = 0


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


# -- schedules -------------------------------------------------------------------


@dataclass(frozen=True)
class SchedulesStatus:
    """The newest scheduler token of a namespace: its schedules and who leads."""

    namespace: str
    leader: dict[str, Any] | None
    schedules: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return {"namespace": self.namespace, "leader": self.leader, "schedules": self.schedules}


async def schedules(broker: Broker) -> SchedulesStatus | None:
    """What the scheduler's newest token says (None: no scheduler ever ran here). Read
    from the status queue, which keeps a copy of each token: the token itself is held
    by the leader."""
    name = scheduler_status_queue(broker.namespace)
    if await broker.link.counts(name) is None:
        return None
    session = await broker.session()
    channel = await session.channel(1)
    try:
        delivery = await channel.get(name)
        if delivery is None:
            return None
        try:
            state = State.from_json(json.loads(delivery.body))
        finally:
            await delivery.nack(requeue=True)  # it stays for the next reader
    except (ValueError, KeyError, TypeError) as exc:
        raise AmqpJobsError(
            f"{name} holds something that is not a scheduler state: {exc}"
        ) from None
    finally:
        await channel.close()
    rows = describe_state(state, datetime.now(UTC))
    return SchedulesStatus(broker.namespace, state.leader, rows)


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
        names = (q["name"][len(prefix) :] for q in data if q["name"].startswith(prefix))
        return sorted(n for n in names if "." not in n)  # not the high-priority twins


async def status(
    broker: Broker, queues: Iterable[str], management: Management | None = None
) -> Status:
    """Depth of every work, due, quarantine, dead, delay and unroutable queue."""
    counts = broker.link.counts
    namespace = broker.namespace
    rows = []
    for q in sorted(set(queues)):
        work = await counts(work_queue(namespace, q))
        if work is None:
            raise NotFoundError(f"no work queue {work_queue(namespace, q)!r}")
        due = await counts(due_queue(namespace, q))
        quarantined = await counts(quarantine_queue(namespace, q))
        dead = await counts(dead_queue(namespace, q))
        high = await counts(high_queue(namespace, q))
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
                high[0] if high else 0,
            )
        )
    delayed = 0
    for level in range(broker.settings.delay_levels):
        level_counts = await counts(delay_queue(namespace, level))
        # a level is declared once a job first needs it: a missing one holds nothing
        delayed += level_counts[0] if level_counts else 0
    parked = await counts(unroutable(namespace))
    return Status(namespace, rows, delayed, parked[0] if parked else 0)


# -- deleting a namespace ------------------------------------------------------


@dataclass(frozen=True)
class NamespaceContents:
    """What deleting a namespace (for some work queues) removes, as far as AMQP tells:
    the queues of its plan that exist, with their ready messages (jobs waiting, delayed
    or dead; jobs a running worker holds unacked are not counted), the consumers attached
    to them, and the exchanges of its plan (deleting one that is missing is a no-op)."""

    namespace: str
    queues: dict[str, int]
    consumers: int
    exchanges: list[str]

    @property
    def jobs(self) -> int:
        return sum(self.queues.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "queues": self.queues,
            "jobs": self.jobs,
            "consumers": self.consumers,
            "exchanges": self.exchanges,
        }


async def namespace_contents(broker: Broker, queues: Iterable[str]) -> NamespaceContents:
    """Which queues of the namespace's plan for these work queues exist, and what is in them."""
    plan = namespace_plan(broker.namespace, queues, broker.settings)
    found: dict[str, int] = {}
    consumers = 0
    for queue in plan.queues:
        counts = await broker.link.counts(queue.name)
        if counts is not None:
            found[queue.name] = counts[0]
            consumers += counts[1]
    return NamespaceContents(
        broker.namespace, found, consumers, [exchange.name for exchange in plan.exchanges]
    )


async def delete_namespace(broker: Broker, queues: Iterable[str]) -> NamespaceContents:
    """Delete every queue and exchange of the namespace's plan for these work queues
    (through the transport, which every namespace's teardown uses); returns what there
    was just before."""
    queues = sorted(set(queues))
    contents = await namespace_contents(broker, queues)
    try:
        await broker.transport.delete_namespace(broker.namespace, queues, broker.settings)
    except AmqpJobsError:
        raise
    except Exception as exc:  # the transport's own (a refusal: no configure permission)
        raise AmqpJobsError(
            f"deleting namespace {broker.namespace!r} failed: {describe(exc)}"
        ) from None
    return contents


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
    def from_message(cls, message: Delivery, queue: str) -> DeadJob:
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
    to the queue, in order, when the block ends (however it ends): they are taken with
    basic.get unsettled, on a channel of their own that is closed at the end.

    A quorum queue takes them back a moment after that close has returned; the block's
    end waits (up to RETURN_WAIT s) until the queue holds them again, so that the next
    command (``dead list`` right after ``dead list``) sees them all.
    """

    def __init__(self, broker: Broker, queue: str) -> None:
        self.broker = broker
        self.namespace = broker.namespace
        self.queue = queue
        self.name = dead_queue(broker.namespace, queue)
        self._channel: Channel | None = None
        self.size = 0
        self.removed = 0

    async def __aenter__(self) -> DeadQueue:
        size = await self.broker.link.depth(self.name)
        if size is None:
            raise NotFoundError(
                f"no dead-letter queue {self.name!r}: is {self.queue!r} a queue of namespace"
                f" {self.namespace!r}?"
            )
        self.size = size
        self._channel = await (await self.broker.session()).channel(prefetch=0)
        return self

    async def __aexit__(self, error_type: type[BaseException] | None, *exc: object) -> None:
        # Closing the channel returns every unacked message, in its original order.
        if self._channel is not None:
            await self._channel.close()
            if error_type is None:  # an error is reported at once, not after the wait
                await self._until_returned()

    async def remove(self, delivery: Delivery) -> None:
        """Take a fetched message off the queue for good."""
        await delivery.ack()
        self.removed += 1

    async def _until_returned(self) -> None:
        """Wait, at most RETURN_WAIT s, until the queue holds at least what it held at
        the start less what was removed. Best effort: the messages come back all the
        same; a broker gone ends the wait, another operator's removals make it last."""
        expected = self.size - self.removed
        try:
            async with asyncio.timeout(RETURN_WAIT):
                while True:
                    depth = await self.broker.link.depth(self.name)
                    if depth is None or depth >= expected:
                        return
                    await asyncio.sleep(0.02)
        except (TimeoutError, AmqpJobsError) as exc:
            log.debug("not waiting for %s to take its messages back: %s", self.name, describe(exc))

    async def scan(self, limit: int = DEFAULT_SCAN) -> list[tuple[Delivery, DeadJob]]:
        """Fetch up to ``limit`` messages (at most the count seen on opening), unacked."""
        assert self._channel is not None
        out: list[tuple[Delivery, DeadJob]] = []
        # Only the messages present at the start: jobs that die again while we work
        # (a replayed job failing at once) are left for the next run.
        for _ in range(min(limit, self.size)):
            message = await self._channel.get(self.name)
            if message is None:
                break
            out.append((message, DeadJob.from_message(message, self.queue)))
        return out


async def list_dead(
    broker: Broker,
    queue: str,
    *,
    limit: int | None = None,
    selector: Selector | None = None,
    scan: int = DEFAULT_SCAN,
) -> list[DeadJob]:
    """Dead jobs of one queue, oldest first; the queue is left exactly as it was."""
    async with DeadQueue(broker, queue) as dq:
        found = [dead for _, dead in await dq.scan(scan) if selector is None or selector(dead)]
    return found if limit is None else found[:limit]


async def find_dead(broker: Broker, queues: Iterable[str], job_id: str) -> list[DeadJob]:
    """The dead jobs, in any of the queues, whose id is ``job_id`` or starts with it (the
    short ids the demo prints): those with exactly this id if there are any, else every
    one the prefix matches, oldest first. Several with the same id are copies of one job
    (at least once); several ids mean the prefix is ambiguous."""
    if not job_id:
        return []

    def matches(dead: DeadJob) -> bool:
        return dead.job_id is not None and dead.job_id.startswith(job_id)

    found: list[DeadJob] = []
    for queue in sorted(set(queues)):
        found += await list_dead(broker, queue, selector=matches)
    exact = [dead for dead in found if dead.job_id == job_id]
    return exact or found


@dataclass
class Progress:
    done: int = 0
    total: int = 0
    job_ids: list[str] = field(default_factory=list)


async def replay_dead(
    broker: Broker,
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
    target = work_queue(broker.namespace, queue)
    link = broker.link
    progress = Progress()
    async with DeadQueue(broker, queue) as dq:
        batch = [(m, d) for m, d in await dq.scan(scan) if selector(d)]
        progress.total = len(batch)
        if on_progress:
            on_progress(progress)
        for message, dead in batch:
            copy = replay_message(message, queue)
            await link.retrying(
                functools.partial(link.send_to_queue, target, copy),
                give_up_after=broker.connect_timeout,
            )
            await dq.remove(message)
            progress.done += 1
            progress.job_ids.append(dead.job_id or "")
            if on_progress:
                on_progress(progress)
    return progress


async def purge_dead(
    broker: Broker,
    queue: str,
    selector: Selector,
    *,
    scan: int = DEFAULT_SCAN,
) -> int:
    """Delete matching dead jobs; returns how many were removed."""
    removed = 0
    async with DeadQueue(broker, queue) as dq:
        for message, dead in await dq.scan(scan):
            if selector(dead):
                await dq.remove(message)
                removed += 1
    return removed
