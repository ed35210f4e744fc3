"""Settling a delivery: the one function that acks, republishes, parks or releases.

The rule it keeps: a delivery is acked only after the copy that replaces it (a retry,
a re-delay, a dead letter, a quarantined copy) is confirmed by the broker. If that copy
cannot be stored, the delivery is kept (the handler does not run again) and storing is
retried with backoff until ``hold_until``, the last moment before the broker's
consumer_timeout would take the delivery back; only then is it released. Nothing is
lost; at worst a job runs twice, which is why job ids stay stable across copies.

A living worker returns a delivery without spending its delivery count: RabbitMQ counts
every nack as a failed delivery, and the count is how a job that kills workers is told
apart from its neighbours. So a release re-publishes the delivery, unchanged, to the
queue it came from and acks it; only if that fails is it nacked (``Fate.RETURNED``: the
worker then vouches for it, see ``worker``).
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from amqp_jobs.clock import Clock
from amqp_jobs.errors import ConnectionLostError, UnroutableError, describe
from amqp_jobs.events import JobEvent
from amqp_jobs.message import Envelope, Message, dead_message, moved_message
from amqp_jobs.outcome import Bury, Decision, DeferBy, RetryIn, Succeed
from amqp_jobs.transport.base import Delivery, Link

log = logging.getLogger("amqp_jobs.settle")

#: After this long without a confirm for a replacement copy, the wait is logged.
SLOW_STORE = 5.0
#: First and longest pause between tries at storing a replacement copy.
HOLD_PAUSE = 1.0
MAX_HOLD_PAUSE = 15.0
#: How long a release may try to re-publish before it falls back to a nack.
RELEASE_RETRY_FOR = 2.0


class Fate(enum.Enum):
    """What became of a delivery once ``settle`` is done with it."""

    #: acked, its replacement (if any) stored first: done with
    ACKED = "acked"
    #: given back as an unchanged copy, the original acked: its count starts again
    COPIED = "copied"
    #: left with the broker unsettled (nacked, or its channel or ack lost): delivered
    #: again, and a quorum queue counts it
    RETURNED = "returned"


@dataclass(frozen=True)
class Ack:
    """The job succeeded."""


@dataclass(frozen=True)
class Republish:
    """Replace the delivery by this envelope in the delay cascade (retry or re-delay)."""

    envelope: Envelope


@dataclass(frozen=True)
class Park:
    """Replace the delivery by this message in the dead-letter queue."""

    message: Message


@dataclass(frozen=True)
class Quarantine:
    """Move the delivery, as it is, to its queue's quarantine queue (run it alone)."""

    message: Message


@dataclass(frozen=True)
class Release:
    """Give the delivery back to the broker unsettled (shutdown, or a failed republish)."""


Action = Ack | Republish | Park | Quarantine | Release


@dataclass(frozen=True)
class Reply:
    """A job's final event, for the client waiting on it (its reply queue)."""

    queue: str
    event: JobEvent


def took(seconds: float) -> str:
    """A job's duration as its log line spells it: ``0.4 ms``, ``12 ms``, ``3.2 s``."""
    ms = seconds * 1000
    if ms < 10:
        return f"{ms:.1f} ms"
    if ms < 10_000:
        return f"{ms:.0f} ms"
    return f"{seconds:.1f} s"


def action_for(
    decision: Decision,
    env: Envelope,
    delivery: Delivery,
    queue: str,
    clock: Clock,
    *,
    duration: float,
    log_success: bool = True,
) -> Action:
    """The settlement that carries out ``decide()``'s decision, logged: one line per
    attempt, ``job NAME ID succeeded in 12 ms, attempt 1`` (INFO, unless
    ``log_success`` is False), retrying (INFO), dead (WARNING) or deferred (INFO).
    ``duration``: the attempt's, in seconds."""
    match decision:
        case Succeed():
            if log_success and log.isEnabledFor(logging.INFO):
                log.info(
                    "job %s %s succeeded in %s, attempt %d",
                    env.job_name,
                    env.job_id,
                    took(duration),
                    env.attempt,
                )
            return Ack()
        case RetryIn(delay, error):
            log.info(
                "job %s %s failed in %s, attempt %d (%s); retrying in %.2fs",
                env.job_name,
                env.job_id,
                took(duration),
                env.attempt,
                error.type,
                delay,
            )
            return Republish(env.next_attempt(error, clock.ms_after(delay)))
        case Bury(reason, error):
            log.warning(
                "job %s %s is dead (%s) after %s, attempt %d: %s",
                env.job_name,
                env.job_id,
                reason,
                took(duration),
                env.attempt,
                f"{error.type}: {error.message}" if error.message else error.type,
            )
            return Park(dead_message(delivery, reason, error, queue))
        case DeferBy(delay, reason):
            log.info(
                "job %s %s deferred by %.2fs after %s, attempt %d%s (not counted as an attempt)",
                env.job_name,
                env.job_id,
                delay,
                took(duration),
                env.attempt,
                f": {reason}" if reason else "",
            )
            return Republish(env.deferred(clock.ms_after(delay), counted=True))
    raise AssertionError(decision)  # pragma: no cover


async def settle(
    delivery: Delivery,
    action: Action,
    link: Link,
    queue: str,
    *,
    hold_until: float,
    event: JobEvent | None = None,
    reply: Reply | None = None,
) -> Fate:
    """Carry out ``action`` for ``delivery`` consumed from ``queue``'s queues; ``event``,
    the lifecycle event that records it, and ``reply``, the outcome a client waits for,
    are confirmed before the ack, like a copy.

    ACKED when the action was carried out. Otherwise the delivery is given back: COPIED
    (a Release, or a replacement copy or event not confirmed by ``hold_until``, loop
    time, then released) or RETURNED (its channel gone, or nacked when not even an
    unchanged copy could be stored).
    """
    if delivery.channel.is_closed:
        log.info(
            "channel of job %s closed before settling; the broker delivers it again",
            delivery.message_id,
        )
        return Fate.RETURNED
    match action:
        case Release():
            return await release(delivery, link, queue)
        case Ack() if event is None and reply is None:
            pass
        case _:
            if (
                given_back := await _store(delivery, action, link, queue, hold_until, event, reply)
            ) is not None:
                return given_back
    try:
        await delivery.ack()
    except ConnectionLostError as exc:
        log.warning(
            "ack of job %s lost (%s); the broker delivers it again",
            delivery.message_id,
            describe(exc),
        )
        return Fate.RETURNED
    return Fate.ACKED


async def _store(
    delivery: Delivery,
    action: Ack | Republish | Park | Quarantine,
    link: Link,
    queue: str,
    until: float,
    event: JobEvent | None,
    reply: Reply | None = None,
) -> Fate | None:
    """Store the copy that replaces ``delivery``, the event that records it and the reply
    to a waiting client, each once, together, trying again with backoff until
    ``until``: None once stored; if they could not be, how the delivery went back."""
    parts: dict[str, Callable[[], Awaitable[None]]] = {}
    match action:
        case Republish(envelope):
            parts["copy"] = functools.partial(link.send, envelope, queue, via_jobs_exchange=False)
        case Park(message):
            parts["copy"] = functools.partial(link.send_dead, message, queue)
        case Quarantine(message):
            parts["copy"] = functools.partial(link.send_quarantine, message, queue)
    if event is not None:
        parts["event"] = functools.partial(link.send_event, event.routing_key, event.to_message())
    if reply is not None:
        parts["reply"] = functools.partial(_send_reply, link, reply)

    async def store() -> None:
        # All in flight at once, and none sent again once confirmed: a copy stored
        # twice would run the job twice.
        pending = list(parts.items())
        if len(pending) == 1:
            await pending[0][1]()
            parts.clear()
            return
        results = await asyncio.gather(*(send() for _, send in pending), return_exceptions=True)
        failures = []
        for (name, _), result in zip(pending, results, strict=True):
            if isinstance(result, BaseException):
                failures.append(result)
            else:
                del parts[name]
        if failures:
            raise failures[0]

    what = {
        Park: "dead letter",
        Quarantine: "quarantined copy",
        Ack: "event",
        Republish: "next copy",
    }[type(action)]
    loop = asyncio.get_running_loop()
    pause = HOLD_PAUSE
    while True:
        # One copy, confirmed when the broker can (a resource alarm may hold it for
        # minutes): publishing again on a missing confirm would store it twice.
        storing = asyncio.ensure_future(
            link.retrying(store, give_up_after=max(0.0, until - loop.time()))
        )
        try:
            done, _ = await asyncio.wait({storing}, timeout=SLOW_STORE)
        except asyncio.CancelledError:
            storing.cancel()
            raise
        if not done:
            log.warning(
                "the broker has not confirmed the %s of job %s after %.0fs (a resource"
                " alarm?); keeping the job until it does",
                what,
                delivery.message_id,
                SLOW_STORE,
            )
        try:
            await storing
            return None
        except Exception as exc:
            left = until - loop.time()
            if delivery.channel.is_closed:
                log.warning(
                    "could not store the %s of job %s (%s), and its channel closed;"
                    " the broker delivers it again",
                    what,
                    delivery.message_id,
                    describe(exc),
                )
                return Fate.RETURNED
            if left <= pause:
                log.error(
                    "could not store the %s of job %s: %s; giving it back to the broker",
                    what,
                    delivery.message_id,
                    describe(exc),
                )
                return await release(delivery, link, queue)
            log.warning(
                "could not store the %s of job %s: %s; keeping the job, trying again in %.0fs",
                what,
                delivery.message_id,
                describe(exc),
                pause,
            )
        await asyncio.sleep(pause)
        pause = min(pause * 2, MAX_HOLD_PAUSE)


async def _send_reply(link: Link, reply: Reply) -> None:
    """The final event to the waiting client's queue; a queue gone (the client left long
    ago) is no failure: the job log answers it, if it comes back."""
    try:
        await link.send_to_queue(reply.queue, reply.event.to_message())
    except UnroutableError:
        log.debug("reply queue %s of job %s is gone", reply.queue, reply.event.job_id)


async def release(delivery: Delivery, link: Link, queue: str) -> Fate:
    """Give a delivery back without spending its delivery count: re-publish it unchanged
    to the queue it came from, then ack (COPIED); nack it only if that copy cannot be
    stored (RETURNED)."""
    if delivery.channel.is_closed:
        return Fate.RETURNED
    copy = moved_message(delivery, queue)

    async def back() -> None:
        await link.send_to_queue(delivery.queue_name, copy)

    try:
        await link.retrying(back, give_up_after=RELEASE_RETRY_FOR)
    except Exception as exc:
        log.warning(
            "could not give job %s back unchanged (%s); returning it by nack",
            delivery.message_id,
            describe(exc),
        )
        await _nack(delivery)
        return Fate.RETURNED
    try:
        await delivery.ack()
    except ConnectionLostError as exc:
        # the copy is stored and the original comes back too: a duplicate, never a loss
        log.debug("ack of released %s lost: %s", delivery.message_id, describe(exc))
        return Fate.RETURNED
    return Fate.COPIED


async def _nack(delivery: Delivery) -> None:
    if delivery.channel.is_closed:
        return
    try:
        await delivery.nack(requeue=True)
    except ConnectionLostError as exc:
        log.debug("nack of %s lost: %s", delivery.message_id, describe(exc))
