"""Publishing jobs from any Python service: ``JobClient``.

Every publish is confirmed by the broker before the call returns. Arguments are
validated against the job's model before anything leaves the process.
"""

from __future__ import annotations

import asyncio
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
from amqp_jobs.errors import BatchPublishError as BatchPublishError
from amqp_jobs.errors import ContractError, PublishError
from amqp_jobs.message import (
    MAX_ETA_AHEAD_MS,
    NO_ID_PREFIX,
    Envelope,
    check_headers,
)
from amqp_jobs.middleware import Middleware, Publishing, publish_through, stack
from amqp_jobs.transport import Transport, transport_for
from amqp_jobs.urls import BrokerURLs

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
    ) -> None:
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
        self._clock = self.transport.clock
        self._link = self.transport.link(
            self.namespace,
            self.settings,
            name=name,
            declare=declare,
            connect_timeout=retry_for if connect_timeout is None else connect_timeout,
            confirm_timeout=confirm_timeout,
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
    ) -> Envelope:
        """Validate and encode one job without sending it."""
        if not isinstance(job, Job):
            raise ContractError(f"expected a Job contract, got {job!r}")
        if job_id is not None:
            _check_job_id(job_id)
        if headers:
            check_headers(headers)
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
    ) -> str:
        """Publish one job, confirmed; returns its job id.

        Raises ArgsValidationError (naming the field) before publishing, and a
        PublishError or BrokerUnavailableError if the broker did not take it.
        """
        envelope = self.prepare(
            job, args, delay=delay, run_at=run_at, job_id=job_id, headers=headers
        )
        if self.middleware:
            await self._send_through_middleware(job, envelope)
        else:
            link = self._link  # as send() does, one coroutine less per job in flight
            await link.retrying(link.send, envelope, job.queue, give_up_after=self.retry_for)
        return envelope.job_id

    async def _send_through_middleware(self, job: Job[Any], envelope: Envelope) -> None:
        """Publish inside every middleware's ``publish``; headers they add are checked
        like the caller's, and travel with the job."""
        publishing = Publishing(
            job, envelope.job_id, job.queue, envelope.eta_ms, dict(envelope.extra_headers)
        )

        sent = False

        async def send() -> None:
            nonlocal sent
            headers = dict(publishing.headers)
            if headers != envelope.extra_headers:
                check_headers(headers)  # what middleware added or changed, and the total
            await self.send(replace(envelope, extra_headers=headers), job.queue)
            sent = True

        await publish_through(self.middleware, publishing, send)
        if not sent:
            raise PublishError(
                f"job {envelope.job_id} was not published: a middleware's publish() returned"
                " without calling call_next(), or swallowed its error"
            )

    async def enqueue_many(
        self,
        job: Job[ArgsT],
        batch: Iterable[ArgsT | Mapping[str, Any]],
        *,
        delay: timedelta | float | None = None,
        run_at: datetime | None = None,
    ) -> list[str]:
        """Publish many jobs with pipelined confirms; returns their ids in input order.

        Every item is validated before the first is published. If some are not
        confirmed, raises BatchPublishError saying which.
        """
        envelopes = [self.prepare(job, args, delay=delay, run_at=run_at) for args in batch]
        return await self.send_many(job, envelopes)

    async def send_prepared(self, job: Job[Any], envelope: Envelope) -> None:
        """Publish an envelope from ``prepare`` as ``enqueue`` does (middleware included)."""
        if self.middleware:
            await self._send_through_middleware(job, envelope)
        else:
            link = self._link
            await link.retrying(link.send, envelope, job.queue, give_up_after=self.retry_for)

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
        if failed:
            raise BatchPublishError(ids, failed)
        return ids

    async def send(self, envelope: Envelope, queue: str) -> None:
        """Publish a prepared envelope, confirmed, retrying transient failures."""
        await self._link.retrying(self._link.send, envelope, queue, give_up_after=self.retry_for)
