"""Publishing jobs from any Python service: ``JobClient``.

Every publish is confirmed by the broker before the call returns. Arguments are
validated against the job's model before anything leaves the process.
"""

from __future__ import annotations

import asyncio
import logging
import math
import ssl
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, Self

from amqp_jobs.clock import WALL, Clock
from amqp_jobs.contract import ArgsT, Job, Namespace, TopologySettings
from amqp_jobs.durations import seconds
from amqp_jobs.errors import AmqpJobsError, ContractError
from amqp_jobs.errors import BatchPublishError as BatchPublishError
from amqp_jobs.events import EventKind, header_key
from amqp_jobs.lifecycle import job_event
from amqp_jobs.message import (
    H_KEY,
    H_PRIORITY,
    H_REPLY_TO,
    HIGH,
    MAX_ETA_AHEAD_MS,
    NO_ID_PREFIX,
    NORMAL,
    Envelope,
    check_headers,
)
from amqp_jobs.middleware import Middleware, Publishing, publish_envelope, stack
from amqp_jobs.results import Replies
from amqp_jobs.transport import Transport, transport_for
from amqp_jobs.urls import BrokerURLs

log = logging.getLogger("amqp_jobs.client")

#: Publishes in flight at once in enqueue_many (confirms are pipelined within it).
BATCH_WINDOW = 2000


#: The longest delay: 1 ms under the bound the worker's decode applies to ETAs, which
#: covers eta_after's rounding up, so the worker always accepts the ETA it gets.
MAX_DELAY = (MAX_ETA_AHEAD_MS - 1) / 1000


def _too_far(what: str) -> ContractError:
    return ContractError(
        f"{what} is too far ahead: at most {MAX_ETA_AHEAD_MS} ms (about 100 years) from now,"
        " the bound workers accept (MAX_ETA_AHEAD_MS)"
    )


def resolve_eta(
    delay: timedelta | float | None, run_at: datetime | None, clock: Clock = WALL
) -> int | None:
    """Absolute ETA in epoch milliseconds, or None to run now.

    Raises ContractError for a NaN or infinite delay, and for an ETA further ahead than
    workers accept (MAX_ETA_AHEAD_MS), which they would park as invalid-headers.
    """
    if delay is not None and run_at is not None:
        raise ContractError("pass either delay= or run_at=, not both")
    if delay is not None:
        delay = seconds(delay, "delay")
        if delay > MAX_DELAY:  # checked before ms_after would overflow
            raise _too_far(f"delay={delay!r} s")
        return clock.ms_after(delay) if delay > 0 else None
    if run_at is not None:
        if not isinstance(run_at, datetime):
            raise ContractError(f"run_at must be a datetime, got {run_at!r}")
        if run_at.tzinfo is None or run_at.utcoffset() is None:
            raise ContractError("run_at must be timezone-aware (e.g. datetime.now(UTC))")
        try:
            eta = math.ceil(run_at.timestamp() * 1000)
        except (OverflowError, ValueError, OSError) as exc:
            raise ContractError(f"run_at={run_at!r} is out of range: {exc}") from None
        now = clock.now_ms()
        if eta > now + MAX_ETA_AHEAD_MS:  # what the worker's decode checks, a bit later
            raise _too_far(f"run_at={run_at.isoformat()}")
        return eta if eta > now else None
    return None


def _check_job_id(job_id: str) -> None:
    """At most 200 characters and 255 bytes of UTF-8 (an AMQP short string)."""
    if (
        not isinstance(job_id, str)
        or not job_id
        or len(job_id) > 200
        or not (job_id.isascii() or _utf8_len(job_id) <= 255)
    ):
        raise ContractError(
            "job_id must be a non-empty string of at most 200 chars and 255 bytes of UTF-8:"
            f" {job_id!r}"
        )
    if job_id.startswith(NO_ID_PREFIX):
        raise ContractError(
            f"job_id {job_id!r}: ids starting with {NO_ID_PREFIX!r} mark parked messages"
            " that arrived without one"
        )


def _utf8_len(text: str) -> int:
    try:
        return len(text.encode())
    except UnicodeEncodeError:  # a lone surrogate: pamqp could not send it
        return 256


#: A uniqueness key claimed for a job the job log has not heard of is held this long: the
#: publisher is publishing, or the recorder has not written the job's ``enqueued`` event
#: yet. Longer than that with no row, the job was never published (its publisher died).
UNIQUE_GRACE = 30.0


class JobClient:
    """Publishes jobs of one namespace; use as ``async with JobClient(url, namespace=...)``.

    With ``declare=True`` (the default) the client declares each job's queue and binding
    before its first publish, so jobs published before any worker starts wait in the
    queue. Transient broker failures are retried for ``retry_for`` seconds, then raised.
    Connecting gives up after ``connect_timeout`` seconds (default ``retry_for``).
    """

    def __init__(
        self,
        url: str | Sequence[str] | BrokerURLs | Transport | None = None,
        *,
        namespace: Namespace | str,
        settings: TopologySettings | None = None,
        declare: bool = True,
        ssl_context: ssl.SSLContext | None = None,
        retry_for: float = 30.0,
        confirm_timeout: float = 30.0,
        connect_timeout: float | None = None,
        name: str = "amqp-jobs client",
        middleware: Sequence[Middleware] = (),
        store: str | None = None,
        events: bool = False,
    ) -> None:
        """``store``: the job log (a URL, as the recorder's) that ``result()`` asks about
        jobs this client did not enqueue with ``reply=True``.

        ``events``: after each job is confirmed, publish its ``enqueued`` (or, delayed,
        ``scheduled``) lifecycle event, so the job log knows a job from the moment it
        is queued (and ``result()`` never calls a queued job unknown). A job is never
        failed for its event: one that cannot be published is logged."""
        retry_for = seconds(retry_for, "retry_for")
        if connect_timeout is not None:
            connect_timeout = seconds(connect_timeout, "connect_timeout")
        if seconds(confirm_timeout, "confirm_timeout") == 0:
            raise ContractError("confirm_timeout must be > 0 seconds, got 0")
        ns = Namespace.of(namespace, settings)
        self.namespace = ns.name
        self.settings = ns.settings
        #: the broker (RabbitMQ at the URLs given, else $AMQP_URL, else local; or memory://)
        self.transport = transport_for(url, ssl_context=ssl_context)
        self.urls = self.transport.urls
        self.retry_for = retry_for
        self.middleware = stack(middleware)
        self.events = bool(events)
        self._clock = self.transport.clock
        self._link = self.transport.link(
            self.namespace,
            self.settings,
            name=name,
            declare=declare,
            connect_timeout=retry_for if connect_timeout is None else connect_timeout,
            confirm_timeout=confirm_timeout,
        )
        self._replies = Replies(
            self.transport,
            self.namespace,
            store=store,
            name=name,
            connect_timeout=retry_for if connect_timeout is None else connect_timeout,
        )

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect now rather than on the first enqueue; raises BrokerUnavailableError."""
        await self._link.open()

    async def close(self) -> None:
        await self._replies.close()
        await self._link.close()

    @property
    def declared_queues(self) -> set[str]:
        """Work queues this client declared (tests use it to clean up)."""
        link = self._link
        return set(link.known_queues)

    def prepare(
        self,
        job: Job[ArgsT],
        args: ArgsT | Mapping[str, Any],
        *,
        delay: timedelta | float | None = None,
        run_at: datetime | None = None,
        job_id: str | None = None,
        headers: Mapping[str, Any] | None = None,
        priority: str | None = None,
    ) -> Envelope:
        """Validate and encode one job without sending it."""
        if not isinstance(job, Job):
            raise ContractError(f"expected a Job contract, got {job!r}")
        if job_id is not None:
            _check_job_id(job_id)
        if headers:
            check_headers(headers)
        if priority is not None and priority != NORMAL:
            if priority != HIGH:
                raise ContractError(f"priority must be {HIGH!r} or {NORMAL!r}, got {priority!r}")
            headers = {**(headers or {}), H_PRIORITY: HIGH}
        if job.key is not None:
            model = job.validate(args)
            key = job.key_of(model)
            if key is not None:
                headers = {**(headers or {}), H_KEY: key}
            args = model
        return Envelope.new(
            job.name,
            job.encode_args(args),
            job.queue,
            eta_ms=resolve_eta(delay, run_at, self._clock),
            job_id=job_id,
            headers=headers,
        )

    async def enqueue(
        self,
        job: Job[ArgsT],
        args: ArgsT | Mapping[str, Any],
        *,
        delay: timedelta | float | None = None,
        run_at: datetime | None = None,
        job_id: str | None = None,
        headers: Mapping[str, Any] | None = None,
        reply: bool = False,
        priority: str | None = None,
    ) -> str:
        """Publish one job, confirmed; returns its job id.

        ``reply``: the worker that ends the job sends its outcome to this client, for
        ``result()`` to hear (pushed, not polled).

        ``priority``: ``"high"`` goes ahead of queued normal jobs of its queue (README:
        Priorities); ``"normal"`` (or None) is the default.

        Raises ArgsValidationError (naming the field) before publishing, and a
        PublishError or BrokerUnavailableError if the broker did not take it.
        """
        envelope = self.prepare(
            job, args, delay=delay, run_at=run_at, job_id=job_id, headers=headers,
            priority=priority,
        )  # fmt: skip
        if job.unique is not None:
            holder = await self._claim_unique(job, envelope)
            if holder != envelope.job_id:
                return holder  # a live job has this key: nothing is published
            try:
                await self.send_prepared(job, await self._awaited(envelope) if reply else envelope)
            except BaseException:
                await self._release_unique(job, envelope)
                raise
            if not self.events:
                await self._record(envelope)  # the log must know it: it holds the key
            return envelope.job_id
        if reply:
            envelope = await self._awaited(envelope)
        if self.middleware:
            await self._send_through_middleware(job, envelope)
        else:
            link = self._link  # as send() does, one coroutine less per job in flight
            await link.retrying(link.send, envelope, job.queue, give_up_after=self.retry_for)
        if self.events:
            await self._record(envelope)
        return envelope.job_id

    async def _record(self, envelope: Envelope) -> None:
        """The ``enqueued``/``scheduled`` event of a job the broker confirmed."""
        kind = EventKind.ENQUEUED if envelope.eta_ms is None else EventKind.SCHEDULED
        queue = envelope.queue or ""
        event = job_event(
            kind, envelope, queue, self._clock.now_ms(), header_key(envelope.extra_headers)
        )
        link = self._link
        try:
            await link.retrying(
                link.send_event,
                event.routing_key,
                event.to_message(),
                give_up_after=self.retry_for,
            )
        except AmqpJobsError as exc:
            log.warning("job %s is enqueued, but not its %s event: %s", envelope.job_id, kind, exc)

    async def _awaited(self, envelope: Envelope) -> Envelope:
        """``envelope`` naming this client's reply queue, which is consumed from now."""
        await self._replies.start()
        self._replies.expect(envelope.job_id)
        headers = {**envelope.extra_headers, H_REPLY_TO: self._replies.queue}
        return replace(envelope, extra_headers=headers)

    async def result(
        self, job_id: str, *, timeout: float | timedelta, job: Job[Any] | None = None
    ) -> Any:
        """Wait for a job's outcome: its handler's result (as ``job``'s result model if
        given), or JobFailedError (error type, message, traceback) if it died or was
        discarded; UnknownJobError for an id nobody knows; TimeoutError once ``timeout``
        seconds pass, never later.

        Jobs this client enqueued with ``reply=True`` are pushed to it; others are looked
        up in the job log (``JobClient(store=...)``).
        """
        if not isinstance(job_id, str) or not job_id:
            raise ContractError(f"job_id must be a non-empty string, got {job_id!r}")
        bound = seconds(timeout, "timeout")
        if self._replies.expects(job_id):
            self._replies.keep_consuming()  # never waits: the timeout below bounds it all
        final = await self._replies.wait(job_id, bound)
        return final.value(job)

    async def enqueue_and_wait(
        self,
        job: Job[ArgsT],
        args: ArgsT | Mapping[str, Any],
        *,
        timeout: float | timedelta,
        delay: timedelta | float | None = None,
        run_at: datetime | None = None,
        job_id: str | None = None,
        headers: Mapping[str, Any] | None = None,
    ) -> Any:
        """Enqueue a job and wait for its result, as ``result()`` (the timeout counts
        from the call, publishing included)."""
        bound = seconds(timeout, "timeout")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + bound
        async with asyncio.timeout(bound):
            sent = await self.enqueue(
                job, args, delay=delay, run_at=run_at, job_id=job_id, headers=headers, reply=True
            )
        return await self.result(sent, timeout=max(0.0, deadline - loop.time()), job=job)

    async def _send_through_middleware(self, job: Job[Any], envelope: Envelope) -> None:
        """Publish inside every middleware's ``publish``; headers they add are checked
        like the caller's, and travel with the job."""
        publishing = Publishing(
            job, envelope.job_id, job.queue, envelope.eta_ms, dict(envelope.extra_headers)
        )
        await publish_envelope(
            self.middleware, publishing, envelope, lambda sent: self.send(sent, job.queue)
        )

    async def enqueue_many(
        self,
        job: Job[ArgsT],
        batch: Iterable[ArgsT | Mapping[str, Any]],
        *,
        delay: timedelta | float | None = None,
        run_at: datetime | None = None,
        priority: str | None = None,
    ) -> list[str]:
        """Publish many jobs with pipelined confirms; returns their ids in input order.

        Every item is validated before the first is published. If some are not
        confirmed, raises BatchPublishError saying which.
        """
        envelopes = [
            self.prepare(job, args, delay=delay, run_at=run_at, priority=priority) for args in batch
        ]
        if job.unique is None:
            return await self.send_many(job, envelopes)
        holders = [await self._claim_unique(job, e) for e in envelopes]
        won = [i for i, e in enumerate(envelopes) if holders[i] == e.job_id]
        mine = [envelopes[i] for i in won]
        try:
            await self.send_many(job, mine)
        except BatchPublishError as exc:
            for index in exc.failed:
                await self._release_unique(job, mine[index])
            failed = {won[index]: error for index, error in exc.failed.items()}
            raise BatchPublishError(holders, failed) from exc
        if not self.events:
            await asyncio.gather(*(self._record(e) for e in mine))
        return holders

    async def _claim_unique(self, job: Job[Any], envelope: Envelope) -> str:
        """The id of the job that holds ``envelope``'s uniqueness key: its own if it
        won (then it must be published), or a live one's."""
        key = header_key(envelope.extra_headers)
        if key is None:
            raise ContractError(
                f"unique job {job.name!r}: its {job.key} is None, so it has no key to be unique on"
            )
        if self._replies.store is None:
            raise ContractError(
                f"unique job {job.name!r} needs JobClient(store=...): the job log's store"
                " holds which job has each key"
            )
        joblog = await self._replies.joblog()
        assert job.unique is not None
        return await joblog.store.claim_unique(
            self.namespace,
            f"{job.name}|{key}",
            envelope.job_id,
            period_ms=int(job.unique * 1000),
            grace_ms=int(UNIQUE_GRACE * 1000),
        )

    async def _release_unique(self, job: Job[Any], envelope: Envelope) -> None:
        key = header_key(envelope.extra_headers)
        joblog = await self._replies.joblog()
        try:
            await joblog.store.release_unique(self.namespace, f"{job.name}|{key}", envelope.job_id)
        except AmqpJobsError as exc:  # it frees itself after UNIQUE_GRACE
            log.warning("could not give up unique key of job %s: %s", envelope.job_id, exc)

    async def send_prepared(self, job: Job[Any], envelope: Envelope) -> None:
        """Publish an envelope from ``prepare`` as ``enqueue`` does (middleware included)."""
        if self.middleware:
            await self._send_through_middleware(job, envelope)
        else:
            link = self._link
            await link.retrying(link.send, envelope, job.queue, give_up_after=self.retry_for)
        if self.events:
            await self._record(envelope)

    async def send_many(self, job: Job[Any], envelopes: Sequence[Envelope]) -> list[str]:
        """Publish envelopes from ``prepare`` as ``enqueue_many`` does; their ids."""
        ids = [e.job_id for e in envelopes]
        failed: dict[int, BaseException] = {}
        for start in range(0, len(envelopes), BATCH_WINDOW):
            window = envelopes[start : start + BATCH_WINDOW]
            if self.middleware:
                results = await asyncio.gather(
                    *(self._send_through_middleware(job, e) for e in window),
                    return_exceptions=True,
                )
            else:
                results = await self._link.send_batch(
                    window, job.queue, give_up_after=self.retry_for
                )
            for offset, result in enumerate(results):
                if isinstance(result, BaseException):
                    if not isinstance(result, Exception):
                        raise result
                    failed[start + offset] = result
            if self.events:
                sent = [e for i, e in enumerate(window, start) if i not in failed]
                await asyncio.gather(*(self._record(e) for e in sent))
        if failed:
            raise BatchPublishError(ids, failed)
        return ids

    async def send(self, envelope: Envelope, queue: str) -> None:
        """Publish a prepared envelope, confirmed, retrying transient failures."""
        await self._link.retrying(self._link.send, envelope, queue, give_up_after=self.retry_for)
