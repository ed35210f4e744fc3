"""Connecting to the broker with backoff, and publishing with confirms into typed errors.

Every URL that reaches a log line or an exception passes through ``mask_url``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import math
import ssl
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import unquote, urlsplit

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    retry_if_exception_type,
    stop_after_delay,
    stop_never,
    wait_exponential,
    wait_random,
)

from amqp_jobs.errors import (
    BrokerUnavailableError,
    PublishError,
    PublishRefusedError,
    PublishTimeoutError,
    UnroutableError,
    describe,
)
from amqp_jobs.transport.amqp.channels import open_channel
from amqp_jobs.urls import DEFAULT_URL, BrokerURLs, mask_url, resolve

__all__ = [
    "DEFAULT_URL",
    "TRANSIENT",
    "Publisher",
    "bounded",
    "connect",
    "deadline",
    "describe",
    "mask_url",
    "scrub",
]

log = logging.getLogger("amqp_jobs.connection")

#: Errors after which trying again on a new connection may succeed.
TRANSIENT = (
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
    OSError,
    asyncio.TimeoutError,
)
#: Longest pause between connection attempts: a worker whose broker restarted is back
#: within about this long of the broker (a refused attempt costs the broker nothing).
MAX_CONNECT_PAUSE = 2.0
#: Seconds one connection attempt to one broker node may take.
CONNECT_ATTEMPT_TIMEOUT = 10.0

#: The loop time by which the publishing operation under way must end (set by
#: ``Link.retrying``). Every step that waits on the broker (declaring, opening a channel,
#: the confirm) is bounded by it, so no call outlives its documented bound whatever the
#: broker does: during a resource alarm the broker stops reading a publisher's socket.
deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "amqp_jobs_deadline", default=None
)


def bounded() -> asyncio.Timeout:
    """A timeout at the current operation's deadline (none outside an operation)."""
    return asyncio.timeout_at(deadline.get())


def scrub(text: str, urls: BrokerURLs | str) -> str:
    """``text`` with every URL's password masked, wherever it appears."""
    text = mask_url(text)
    for password in resolve(urls).passwords():
        text = text.replace(password, "***")
    return text


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what caused it: aiormq wraps socket and TLS errors in its own.

    Stops at a repeat: aiormq's AMQPConnectionError and the ConnectionResetError it wraps
    can point at each other, and following them forever hung connect() at full CPU.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _tls_failure(exc: BaseException) -> bool:
    """A certificate problem, which retrying cannot cure."""
    return any(
        isinstance(e, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(e)
        for e in _chain(exc)
    )


def _refused_open(exc: BaseException) -> bool:
    """The broker closed the connection in the handshake's last step (opening the vhost);
    aiormq reports it only as an unexpected Connection.Close frame."""
    return isinstance(exc, aiormq.exceptions.InvalidFrameError) and "Connection.Close" in str(exc)


def _permanent(exc: BaseException) -> bool:
    """A connect failure that trying again (or another node) cannot cure."""
    return (
        isinstance(exc, aiormq.exceptions.ProbableAuthenticationError)
        or _tls_failure(exc)
        or _refused_open(exc)
    )


def _why_not_connected(url: str, exc: BaseException, brokers: BrokerURLs | None = None) -> str:
    where, detail = mask_url(url), scrub(describe(exc), brokers or url)
    if _refused_open(exc):
        vhost = unquote(urlsplit(url).path[1:]) or "/"
        return (
            f"the broker at {where} refused to open vhost {vhost!r} (does it exist, and may"
            " this user use it? `rabbitmqctl list_vhosts`, `list_user_permissions`)"
        )
    if isinstance(exc, aiormq.exceptions.ProbableAuthenticationError):
        return f"cannot log in to {where}: {detail} (check the user name and password)"
    if _tls_failure(exc):
        return (
            f"TLS certificate verification failed for {where}: {detail} (check the CA:"
            " ?cafile=... in the URL or ssl_context=, and the server certificate's name)"
        )
    if any(isinstance(e, ssl.SSLError) for e in _chain(exc)):
        return (
            f"TLS handshake with {where} failed: {detail}"
            " (is it a TLS port? check the CA file and the server's certificate)"
        )
    return f"cannot reach the broker at {brokers or where}: {detail}"


def log_retries(what: str, url: BrokerURLs | str) -> Callable[[RetryCallState], None]:
    """A tenacity ``before_sleep`` that logs each failed attempt, credentials masked."""

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning(
            "%s %s failed (attempt %d): %s; retrying in %.2fs",
            what,
            url if isinstance(url, BrokerURLs) else mask_url(url),
            state.attempt_number,
            scrub(describe(exc), url),
            state.upcoming_sleep,
        )

    return before_sleep


async def connect(
    urls: BrokerURLs | str,
    *,
    name: str,
    give_up_after: float | None = 30.0,
    ssl_context: ssl.SSLContext | None = None,
) -> AbstractConnection:
    """Open a connection to one of the URLs, retrying with capped exponential backoff.

    Each attempt takes the next URL of a shuffled walk, so a dead cluster node costs one
    refused attempt. ``give_up_after`` seconds (None: never) then BrokerUnavailableError
    with the reason. Authentication, TLS verification and vhost failures are not retried:
    they will not heal.
    """
    brokers = resolve(urls)
    walk = brokers.walk()
    tried = brokers.first
    retrying = AsyncRetrying(
        retry=retry_if_exception_type(TRANSIENT) & retry_if_exception(lambda e: not _permanent(e)),
        wait=wait_exponential(multiplier=0.1, max=MAX_CONNECT_PAUSE) + wait_random(0, 0.3),
        stop=stop_never if give_up_after is None else stop_after_delay(give_up_after),
        before_sleep=log_retries("connecting to", brokers),
        reraise=True,
    )
    try:
        async for attempt in retrying:
            with attempt:
                tried = next(walk)
                connection: AbstractConnection = await aio_pika.connect(
                    tried,
                    timeout=CONNECT_ATTEMPT_TIMEOUT,
                    client_properties={"connection_name": name},
                    ssl_context=ssl_context,
                )
                if len(brokers) > 1:
                    log.info("%s connected to %s", name, mask_url(tried))
                _never_drop_frames(connection)
                return connection
    except (*TRANSIENT, aiormq.exceptions.InvalidFrameError) as exc:
        # authentication errors included (aiormq's are ConnectionErrors)
        raise BrokerUnavailableError(_why_not_connected(tried, exc, brokers)) from None
    raise AssertionError("unreachable")  # pragma: no cover


def _never_drop_frames(connection: AbstractConnection) -> None:
    """Lift the bound (10 frames) of aiormq's write queue. Answering the broker's
    channel.close, aiormq drops its close-ok when that queue is full; the next channel
    opened on the same number then makes RabbitMQ close the whole connection
    ("CHANNEL_ERROR - second 'channel.open' seen"), as seen under heavy lock contention
    (a claim found taken closes its channel). Our own frames wait for their confirms
    or acks; the writer drains the queue as fast as the socket takes it."""
    underlay = getattr(getattr(connection, "transport", None), "connection", None)
    queue = getattr(underlay, "write_queue", None)
    if isinstance(queue, asyncio.Queue) and hasattr(queue, "_maxsize"):
        queue._maxsize = 0  # asyncio.Queue: 0 is unbounded


class Publisher:
    """A publisher-confirms channel that turns every broker answer into ours.

    Returns (no queue bound) raise UnroutableError, nacks PublishRefusedError, a missing
    confirm PublishTimeoutError. The channel is reopened if something closed it.
    Frames go straight to the channel below aio-pika's wrappers, with properties built
    once by the caller: publishing is the hot path of every enqueue.
    """

    def __init__(
        self, connection: AbstractConnection, *, confirm_timeout: float | None = 30.0
    ) -> None:
        self.connection = connection
        self.confirm_timeout = confirm_timeout
        self._channel: AbstractChannel | None = None
        self._underlay: aiormq.Channel | None = None
        self._lock = asyncio.Lock()
        #: channels given up for new publishes, closed once their confirms are due
        self._retiring: set[asyncio.Task[None]] = set()
        # Confirm deadlines: one watchdog task instead of a timer per publish, which
        # would cost a tenth of the publish itself.
        self._deadlines: dict[asyncio.Task[Any], float] = {}
        self._expired: set[asyncio.Task[Any]] = set()
        self._watchdog: asyncio.Task[None] | None = None

    async def channel(self) -> aiormq.Channel:
        underlay = self._underlay
        if underlay is None or underlay.is_closed:
            async with bounded(), self._lock:
                if self._underlay is None or self._underlay.is_closed:
                    self._channel = await open_channel(
                        self.connection, publisher_confirms=True, on_return_raises=True
                    )
                    fresh = await self._channel.get_underlay_channel()
                    assert isinstance(fresh, aiormq.Channel)
                    self._underlay = fresh
                underlay = self._underlay
                assert underlay is not None
        return underlay

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: aiormq.spec.Basic.Properties,
    ) -> None:
        """Publish mandatory, wait for the confirm; raise a PublishError if not stored."""
        channel = await self.channel()
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        began = loop.time()
        due = min(
            began + (self.confirm_timeout if self.confirm_timeout is not None else math.inf),
            deadline.get() or math.inf,
        )
        if due < math.inf:
            self._deadlines[task] = due
        if self._watchdog is None or self._watchdog.done():
            self._watchdog = asyncio.create_task(self._watch())
        try:
            await channel.basic_publish(
                body,
                exchange=exchange,
                routing_key=routing_key,
                properties=properties,
                mandatory=True,
                wait=False,
            )
        except asyncio.CancelledError:
            if task not in self._expired:
                raise
            self._expired.discard(task)
            task.uncancel()
            raise PublishTimeoutError(
                f"no publisher confirm within {due - began:.1f}s for {exchange!r} /"
                f" {routing_key!r}; the job may or may not be stored"
            ) from None
        except aiormq.exceptions.PublishError as exc:
            raise UnroutableError(
                f"no queue is bound to {exchange!r} for routing key {routing_key!r}"
                " (is the topology declared, or the queue deleted?)"
            ) from exc
        except aiormq.exceptions.DeliveryError as exc:
            self._retire()
            raise PublishRefusedError(
                f"the broker refused the message for {exchange!r} / {routing_key!r}: {exc}"
            ) from exc
        except aiormq.exceptions.ChannelNotFoundEntity as exc:
            raise PublishError(f"exchange {exchange!r} does not exist: {exc}") from exc
        finally:
            self._deadlines.pop(task, None)

    async def _watch(self) -> None:
        """Cancel publishes whose confirm is overdue; they raise PublishTimeoutError."""
        loop = asyncio.get_running_loop()
        while self._deadlines:
            now = loop.time()
            first = min(
                (due for task, due in self._deadlines.items() if task not in self._expired),
                default=now + 1.0,
            )
            await asyncio.sleep(min(1.0, max(0.0, first - now)) + 0.001)
            now = loop.time()
            for task, due in list(self._deadlines.items()):
                if due <= now and task not in self._expired:
                    self._expired.add(task)
                    task.cancel()

    def _retire(self) -> None:
        """Publish on a fresh channel from now on.

        A nack can come from the channel's own view of a queue: on RabbitMQ before 3.12.5
        a channel whose quorum-queue client first tried a leader that has died refuses
        every publish to that queue until the node returns, while a new channel finds
        the new leader. The old channel is closed once its outstanding confirms are due.
        """
        old, self._channel, self._underlay = self._channel, None, None
        if old is None:
            return

        async def close_later() -> None:
            await asyncio.sleep(self.confirm_timeout or 30.0)
            if not old.is_closed:
                with contextlib.suppress(Exception):
                    await old.close()

        task = asyncio.ensure_future(close_later())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def close(self) -> None:
        for task in list(self._retiring):
            task.cancel()
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._channel is not None and not self._channel.is_closed:
            with contextlib.suppress(Exception):  # a dead connection closes it anyway
                await self._channel.close()
