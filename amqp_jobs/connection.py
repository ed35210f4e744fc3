"""Connecting to the broker with backoff, and publishing with confirms into typed errors.

Every URL that reaches a log line or an exception passes through ``mask_url``.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange
from tenacity import (
    AsyncRetrying,
    RetryCallState,
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
        & retry_if_not_exception_type(
            (aiormq.exceptions.ProbableAuthenticationError, ssl.SSLCertVerificationError)
        ),
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
    except aiormq.exceptions.ProbableAuthenticationError as exc:
        raise BrokerUnavailableError(
            f"cannot log in to {mask_url(url)}: {scrub(describe(exc), url)}"
            " (check the user name and password)"
        ) from None
    except ssl.SSLError as exc:
        raise BrokerUnavailableError(
            f"TLS handshake with {mask_url(url)} failed: {scrub(describe(exc), url)}"
            " (check the CA file and the server's certificate)"
        ) from None
    except TRANSIENT as exc:
        raise BrokerUnavailableError(
            f"cannot reach the broker at {mask_url(url)}: {scrub(describe(exc), url)}"
        ) from None
    raise AssertionError("unreachable")  # pragma: no cover


class Publisher:
    """A publisher-confirms channel that turns every broker answer into ours.

    Returns (no queue bound) raise UnroutableError, nacks PublishRefusedError, a missing
    confirm PublishTimeoutError. The channel is reopened if something closed it.
    """

    def __init__(self, connection: AbstractConnection, *, confirm_timeout: float = 30.0) -> None:
        self.connection = connection
        self.confirm_timeout = confirm_timeout
        self._channel: AbstractChannel | None = None
        self._exchanges: dict[str, AbstractExchange] = {}
        self._lock = asyncio.Lock()

    async def channel(self) -> AbstractChannel:
        if self._channel is None or self._channel.is_closed:
            async with self._lock:
                if self._channel is None or self._channel.is_closed:
                    self._exchanges = {}
                    self._channel = await open_channel(
                        self.connection, publisher_confirms=True, on_return_raises=True
                    )
        return self._channel

    async def _exchange(self, name: str) -> AbstractExchange:
        channel = await self.channel()
        exchange = self._exchanges.get(name)
        if exchange is None:
            exchange = await channel.get_exchange(name, ensure=False)
            self._exchanges[name] = exchange
        return exchange

    async def publish(self, exchange: str, routing_key: str, message: aio_pika.Message) -> None:
        """Publish mandatory, wait for the confirm; raise a PublishError if not stored."""
        ex = await self._exchange(exchange)
        try:
            await ex.publish(message, routing_key, mandatory=True, timeout=self.confirm_timeout)
        except aio_pika.exceptions.PublishError as exc:
            raise UnroutableError(
                f"no queue is bound to {exchange!r} for routing key {routing_key!r}"
                " (is the topology declared, or the queue deleted?)"
            ) from exc
        except aiormq.exceptions.DeliveryError as exc:
            raise PublishRefusedError(
                f"the broker refused the message for {exchange!r} / {routing_key!r}: {exc}"
            ) from exc
        except TimeoutError as exc:
            raise PublishTimeoutError(
                f"no publisher confirm within {self.confirm_timeout}s for {exchange!r} /"
                f" {routing_key!r}; the job may or may not be stored"
            ) from exc
        except aiormq.exceptions.ChannelNotFoundEntity as exc:
            raise PublishError(f"exchange {exchange!r} does not exist: {exc}") from exc

    async def close(self) -> None:
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()
