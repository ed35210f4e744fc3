"""Awaiting a job's outcome: pushed to the client that waits, the job log as fallback.

A client that awaits outcomes has one reply queue, ``{ns}.reply.{client id}``: classic,
durable (a broker restart keeps its replies) and deleted by the broker once unused for
REPLY_EXPIRES_MS. A job enqueued to be awaited names it in the ``job-reply-to`` header,
which every copy of the job keeps (retries, re-delays); the worker that ends the job
sends its final event there before it acks the delivery. So an outcome is pushed, never
polled, and one sent while the client was reconnecting waits in the queue.

A job this client did not enqueue with ``reply=True`` is looked up in the job log, if
the client has one (``store=``): nothing is pushed to this client for it, so the log is
asked again, at growing intervals, until the job ends or the timeout passes. A job id
the log has never heard of is unknown (UnknownJobError), never "pending".
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential

from amqp_jobs.contract import Job
from amqp_jobs.errors import (
    AmqpJobsError,
    BrokerUnavailableError,
    ConnectionLostError,
    ContractError,
    JobFailedError,
    StoreError,
    UnknownJobError,
    describe,
)
from amqp_jobs.events import TERMINAL, InvalidEventError, JobEvent
from amqp_jobs.transport import Delivery, Session, Transport

if TYPE_CHECKING:
    from amqp_jobs.joblog.log import JobLog
    from amqp_jobs.joblog.store import JobRecord

log = logging.getLogger("amqp_jobs.results")

#: A reply queue outlives its client's last use by this long (a reconnect or a broker
#: restart in between loses nothing).
REPLY_EXPIRES_MS = 10 * 60_000
#: Outcomes a client keeps for ``result()`` calls that come after the reply did.
KEPT = 10_000
#: Replies a client's reply consumer holds unacked at most.
REPLY_PREFETCH = 1000
#: First and longest pause between two looks at the job log for a job ending elsewhere.
LOG_FIRST_PAUSE = 0.05
LOG_MAX_PAUSE = 1.0
#: How long closing may take to delete the reply queue.
CLOSE_TIMEOUT = 5.0


def reply_queue(ns: str, client_id: str) -> str:
    return f"{ns}.reply.{client_id}"


@dataclass(frozen=True)
class Final:
    """How a job ended, from its final event or its job log row."""

    job_id: str
    state: str
    result: Any = None
    error_type: str | None = None
    error_message: str | None = None
    traceback: str | None = None
    dead_reason: str | None = None

    @classmethod
    def of_event(cls, event: JobEvent) -> Final:
        return cls(
            event.job_id,
            str(event.event),
            event.result,
            event.error_type,
            event.error_message,
            event.traceback,
            event.dead_reason,
        )

    @classmethod
    def of_record(cls, record: JobRecord) -> Final:
        return cls(
            record.job_id,
            record.state,
            record.result,
            record.error_type,
            record.error_message,
            record.traceback,
            record.dead_reason,
        )

    def value(self, job: Job[Any] | None = None) -> Any:
        """The result (as ``job``'s result model, if it has one), or JobFailedError."""
        if self.state != "succeeded":
            raise JobFailedError(
                self.job_id,
                state=self.state,
                error_type=self.error_type,
                error_message=self.error_message,
                traceback=self.traceback,
                dead_reason=self.dead_reason,
            )
        if job is not None and job.result_model is not None and self.result is not None:
            return job.result_model.model_validate(self.result)
        return self.result


class Replies:
    """A client's reply queue, the outcomes it heard, and the callers waiting."""

    def __init__(
        self,
        transport: Transport,
        namespace: str,
        *,
        store: str | None,
        name: str,
        connect_timeout: float,
    ) -> None:
        self.transport = transport
        self.namespace = namespace
        self.queue = reply_queue(namespace, os.urandom(8).hex())
        self.store = store
        self.name = f"{name} (replies)"
        self.connect_timeout = connect_timeout
        self._heard: OrderedDict[str, Final] = OrderedDict()
        self._ours: OrderedDict[str, None] = OrderedDict()
        self._waiting: dict[str, set[asyncio.Future[Final]]] = {}
        self._consuming = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failed: BaseException | None = None
        self._log: JobLog | None = None
        self._closed = False
        self.reconnects = 0

    # -- the reply queue -------------------------------------------------------------

    async def start(self) -> None:
        """Consume the reply queue (once per client); raises BrokerUnavailableError if
        that cannot be done within connect_timeout."""
        if self._closed:
            raise ContractError("the client is closed")
        if self._consuming.is_set():
            return
        self.keep_consuming()
        assert self._task is not None
        consuming = asyncio.ensure_future(self._consuming.wait())
        try:
            await asyncio.wait(
                {consuming, self._task},
                timeout=self.connect_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            consuming.cancel()
        if not self._consuming.is_set():
            if self._failed is not None:
                raise self._failed
            raise BrokerUnavailableError(
                f"could not consume reply queue {self.queue} within {self.connect_timeout:g}s"
            )

    def keep_consuming(self) -> None:
        """Have the reply consumer run (it reconnects by itself) without waiting for it:
        a caller waiting on an outcome is bounded by its own timeout alone, and replies
        wait in the durable queue meanwhile."""
        if self._closed:
            raise ContractError("the client is closed")
        if self._task is None or self._task.done():
            self._failed = None
            self._task = asyncio.create_task(self._run(), name=self.name)

    async def _run(self) -> None:
        """Consume; after a lost connection, consume again (with backoff), and ask the
        job log about the callers still waiting."""
        first = True
        try:
            while not self._closed:
                retrying = AsyncRetrying(
                    retry=retry_if_exception_type(BrokerUnavailableError),
                    stop=functools.partial(self._give_up, first),
                    wait=wait_exponential(multiplier=0.1, max=5.0),
                    before_sleep=_log_retry,
                    reraise=True,
                )
                session: Session
                lost: asyncio.Event
                session, lost = await retrying(self._consume)
                if not first:
                    self.reconnects += 1
                    await self._ask_log_for_waiters()
                first = False
                try:
                    await lost.wait()
                finally:
                    self._consuming.clear()
                    if self._closed:  # a clean close: nobody reads this queue again
                        with contextlib.suppress(AmqpJobsError, OSError):
                            await session.delete_queue(self.queue)
                    with contextlib.suppress(AmqpJobsError, OSError):
                        await session.close()
        except Exception as exc:
            self._failed = exc
            log.warning("reply consumer of %s stopped: %s", self.queue, describe(exc))

    def _give_up(self, first: bool, state: RetryCallState) -> bool:
        """Closed; or, for the first connection, connect_timeout passed."""
        waited = state.seconds_since_start or 0.0
        return self._closed or (first and waited > self.connect_timeout)

    async def _consume(self) -> tuple[Session, asyncio.Event]:
        session = await self.transport.session(name=self.name, give_up_after=self.connect_timeout)
        lost = asyncio.Event()
        session.on_lost(lambda reason, _: lost.set())
        try:
            await session.declare_reply_queue(self.queue, expires_ms=REPLY_EXPIRES_MS)
            channel = await session.channel(REPLY_PREFETCH)
            await channel.consume(self.queue, self._on_reply)
        except BaseException:
            with contextlib.suppress(AmqpJobsError, OSError):
                await session.close()
            raise
        self._consuming.set()
        return session, lost

    async def _on_reply(self, delivery: Delivery) -> None:
        try:
            event = JobEvent.from_json(delivery.body)
        except InvalidEventError as exc:
            log.warning("not a reply, in %s: %s", self.queue, exc)
        else:
            if event.event in TERMINAL:
                self._resolve(Final.of_event(event))
        with contextlib.suppress(ConnectionLostError):
            await delivery.ack()  # lost: it comes again, and a second reply is ignored

    def _resolve(self, final: Final) -> None:
        self._heard[final.job_id] = final
        self._heard.move_to_end(final.job_id)
        if len(self._heard) > KEPT:
            self._heard.popitem(last=False)
        for future in self._waiting.pop(final.job_id, ()):
            if not future.done():
                future.set_result(final)

    async def _ask_log_for_waiters(self) -> None:
        """After a reconnect: a reply may have been lost with an expired queue."""
        if self.store is None or not self._waiting:
            return
        try:
            joblog = await self.joblog()
            for job_id in list(self._waiting):
                record = await joblog.get(job_id)
                if record is not None and record.is_final:
                    self._resolve(Final.of_record(record))
        except StoreError as exc:
            log.warning("asking the job log after a reconnect: %s", describe(exc))

    # -- waiting ---------------------------------------------------------------------

    def expect(self, job_id: str) -> None:
        """``job_id`` was enqueued naming this client's reply queue."""
        self._ours[job_id] = None
        if len(self._ours) > KEPT:
            self._ours.popitem(last=False)

    def expects(self, job_id: str) -> bool:
        """Whether ``job_id`` was enqueued naming this client's reply queue."""
        return job_id in self._ours

    async def wait(self, job_id: str, timeout: float) -> Final:
        """The job's outcome, within ``timeout`` seconds (TimeoutError after it)."""
        heard = self._heard.get(job_id)
        if heard is not None:
            return heard
        future: asyncio.Future[Final] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(job_id, set()).add(future)
        try:
            async with asyncio.timeout(timeout):
                if job_id in self._ours:
                    return await future
                return await self._from_log(job_id, future)
        finally:
            waiting = self._waiting.get(job_id)
            if waiting is not None:
                waiting.discard(future)
                if not waiting:
                    del self._waiting[job_id]

    async def _from_log(self, job_id: str, future: asyncio.Future[Final]) -> Final:
        if self.store is None:
            raise UnknownJobError(
                f"job {job_id} was not enqueued by this client with reply=True, and the"
                " client has no job log to ask (JobClient(store=...))"
            )
        joblog = await self.joblog()
        pause = LOG_FIRST_PAUSE
        while True:
            record = await joblog.get(job_id)
            if record is None:
                raise UnknownJobError(f"job {job_id} is unknown to the job log")
            if record.is_final:
                return Final.of_record(record)
            with contextlib.suppress(TimeoutError):
                return await asyncio.wait_for(asyncio.shield(future), pause)
            pause = min(pause * 2, LOG_MAX_PAUSE)

    async def joblog(self) -> JobLog:
        """The client's job log, opened on first use (``store`` must be set)."""
        if self._log is None:
            from amqp_jobs.joblog.log import JobLog

            assert self.store is not None
            joblog = JobLog(self.store, self.namespace)
            await joblog.open()
            self._log = joblog
        return self._log

    async def close(self) -> None:
        self._closed = True
        task = self._task
        if task is not None and not task.done() and task.get_loop() is asyncio.get_running_loop():
            task.cancel()
            with contextlib.suppress(BaseException):
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await task
        for futures in self._waiting.values():
            for future in futures:
                if not future.done():
                    future.cancel()
        if self._log is not None:
            await self._log.close()


def _log_retry(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    log.warning("reply consumer: %s; trying again", describe(exc))
