"""Connecting to the broker with backoff, and publishing with confirms into typed errors.

Every URL that reaches a log line or an exception passes through ``mask_url``.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    retry_if_exception_type,
    retry_if_not_exception_type,
    stop_after_delay,
    stop_never,
    wait_exponential,
    wait_random,
)

from amqp_jobs.channels import open_channel
from amqp_jobs.errors import (
    BrokerUnavailableError,
    PublishError,
    PublishRefusedError,
    PublishTimeoutError,
    UnroutableError,
)

log = logging.getLogger("amqp_jobs.connection")

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/"

#: Errors after which trying again on a new connection may succeed.
TRANSIENT = (
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
    OSError,
    asyncio.TimeoutError,
)


def mask_url(url: str) -> str:
    """The URL with its password replaced by ``***``; safe to print."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def scrub(text: str, url: str) -> str:
    """``text`` with the URL's password (and the URL itself) masked out."""
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    text = text.replace(url, mask_url(url))
    if password:
        text = text.replace(password, "***")
    return text


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what caused it: aiormq wraps socket and TLS errors in its own."""
    seen: BaseException | None = exc
    while seen is not None:
        yield seen
        seen = seen.__cause__ or seen.__context__


def _tls_failure(exc: BaseException) -> bool:
    """A certificate problem, which retrying cannot cure."""
    return any(
        isinstance(e, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(e)
        for e in _chain(exc)
    )


def _why_not_connected(url: str, exc: BaseException) -> str:
    where, detail = mask_url(url), scrub(describe(exc), url)
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
    return f"cannot reach the broker at {where}: {detail}"


def log_retries(what: str, url: str) -> Callable[[RetryCallState], None]:
    """A tenacity ``before_sleep`` that logs each failed attempt, credentials masked."""

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning(
            "%s %s failed (attempt %d): %s; retrying in %.2fs",
            what,
            mask_url(url),
            state.attempt_number,
            scrub(describe(exc), url),
            state.upcoming_sleep,
        )

    return before_sleep


def describe(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown error"
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if type(exc).__name__ not in text else text


async def connect(
    url: str,
    *,
    name: str,
    give_up_after: float | None = 30.0,
    ssl_context: ssl.SSLContext | None = None,
) -> AbstractConnection:
    """Open a connection, retrying with capped exponential backoff.

    ``give_up_after`` seconds (None: never) then BrokerUnavailableError with the reason.
    Authentication and TLS verification failures are not retried: they will not heal.
    """
    retrying = AsyncRetrying(
        retry=retry_if_exception_type(TRANSIENT)
        & retry_if_not_exception_type(aiormq.exceptions.ProbableAuthenticationError)
        & retry_if_exception(lambda exc: not _tls_failure(exc)),
        wait=wait_exponential(multiplier=0.1, max=5.0) + wait_random(0, 0.2),
        stop=stop_never if give_up_after is None else stop_after_delay(give_up_after),
        before_sleep=log_retries("connecting to", url),
        reraise=True,
    )
    try:
        async for attempt in retrying:
            with attempt:
                connection: AbstractConnection = await aio_pika.connect(
                    url,
                    timeout=10,
                    client_properties={"connection_name": name},
                    ssl_context=ssl_context,
                )
                return connection
    except TRANSIENT as exc:  # authentication errors included (aiormq's are ConnectionErrors)
        raise BrokerUnavailableError(_why_not_connected(url, exc)) from None
    raise AssertionError("unreachable")  # pragma: no cover


class Publisher:
    """A publisher-confirms channel that turns every broker answer into ours.

    Returns (no queue bound) raise UnroutableError, nacks PublishRefusedError, a missing
    confirm PublishTimeoutError. The channel is reopened if something closed it.
    Frames go straight to the channel below aio-pika's wrappers, with properties built
    once by the caller: publishing is the hot path of every enqueue.
    """

    def __init__(self, connection: AbstractConnection, *, confirm_timeout: float = 30.0) -> None:
        self.connection = connection
        self.confirm_timeout = confirm_timeout
        self._channel: AbstractChannel | None = None
        self._underlay: aiormq.Channel | None = None
        self._lock = asyncio.Lock()
        # Confirm deadlines: one watchdog task instead of a timer per publish, which
        # would cost a tenth of the publish itself.
        self._deadlines: dict[asyncio.Task[Any], float] = {}
        self._expired: set[asyncio.Task[Any]] = set()
        self._watchdog: asyncio.Task[None] | None = None

    async def channel(self) -> aiormq.Channel:
        underlay = self._underlay
        if underlay is None or underlay.is_closed:
            async with self._lock:
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
        message: aio_pika.Message | tuple[bytes, aiormq.spec.Basic.Properties],
    ) -> None:
        """Publish mandatory, wait for the confirm; raise a PublishError if not stored."""
        if isinstance(message, aio_pika.Message):
            body, properties = message.body, message.properties
        else:
            body, properties = message
        channel = await self.channel()
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        self._deadlines[task] = loop.time() + self.confirm_timeout
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
                f"no publisher confirm within {self.confirm_timeout}s for {exchange!r} /"
                f" {routing_key!r}; the job may or may not be stored"
            ) from None
        except aiormq.exceptions.PublishError as exc:
            raise UnroutableError(
                f"no queue is bound to {exchange!r} for routing key {routing_key!r}"
                " (is the topology declared, or the queue deleted?)"
            ) from exc
        except aiormq.exceptions.DeliveryError as exc:
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
            await asyncio.sleep(min(1.0, self.confirm_timeout / 4))
            now = loop.time()
            for task, deadline in list(self._deadlines.items()):
                if deadline <= now and task not in self._expired:
                    self._expired.add(task)
                    task.cancel()

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()
