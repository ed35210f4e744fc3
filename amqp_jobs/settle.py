"""Settling a delivery: the one function that acks, republishes, parks or releases.

The rule it keeps: a delivery is acked only after the copy that replaces it (a retry,
a re-delay, a dead letter, a quarantined copy) is confirmed by the broker. If that copy
cannot be stored the delivery is released back to the broker, never acked, so nothing is
lost; at worst a job runs twice, which is why job ids stay stable across copies.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import aio_pika
import aiormq

from amqp_jobs.channels import Delivery
from amqp_jobs.connection import describe
from amqp_jobs.link import Link
from amqp_jobs.message import Envelope

log = logging.getLogger("amqp_jobs.settle")

#: How long a republish may retry transient failures before the delivery is released.
REPUBLISH_RETRY_FOR = 10.0
#: Pause before releasing a delivery whose replacement could not be stored, so that a
#: lasting fault (a refused declaration, say) is not a hot redelivery loop.
RELEASE_PAUSE = 1.0


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

    message: aio_pika.Message


@dataclass(frozen=True)
class Quarantine:
    """Move the delivery, as it is, to its queue's quarantine queue (run it alone)."""

    message: aio_pika.Message


@dataclass(frozen=True)
class Release:
    """Give the delivery back to the broker unsettled (shutdown, or a failed republish)."""


Action = Ack | Republish | Park | Quarantine | Release


async def settle(delivery: Delivery, action: Action, link: Link, queue: str) -> bool:
    """Carry out ``action`` for ``delivery`` consumed from ``queue``.

    Returns True when the delivery was acked, False when it stays with the broker (to be
    delivered again): its channel is gone, the action was Release, or the replacement
    copy could not be confirmed.
    """
    if delivery.channel.is_closed:
        log.info(
            "channel of job %s closed before settling; the broker delivers it again",
            delivery.message_id,
        )
        return False
    try:
        match action:
            case Republish(envelope):

                async def republish() -> None:
                    await link.send(envelope, queue, via_jobs_exchange=False)

                await link.retrying(republish, give_up_after=REPUBLISH_RETRY_FOR)
            case Park(message):

                async def park() -> None:
                    await link.send_dead(message, queue)

                await link.retrying(park, give_up_after=REPUBLISH_RETRY_FOR)
            case Quarantine(message):

                async def move() -> None:
                    await link.send_quarantine(message, queue)

                await link.retrying(move, give_up_after=REPUBLISH_RETRY_FOR)
            case Release():
                await _release(delivery)
                return False
            case Ack():
                pass
    except Exception as exc:
        log.error(
            "could not store the %s of job %s: %s; not acking it, the broker keeps it",
            {Park: "dead letter", Quarantine: "quarantined copy"}.get(type(action), "next copy"),
            delivery.message_id,
            describe(exc),
        )
        await asyncio.sleep(RELEASE_PAUSE)
        await _release(delivery)
        return False
    try:
        await delivery.ack()
    except (aiormq.exceptions.AMQPError, RuntimeError, ConnectionError) as exc:
        log.warning(
            "ack of job %s lost (%s); the broker delivers it again",
            delivery.message_id,
            describe(exc),
        )
        return False
    return True


async def _release(delivery: Delivery) -> None:
    if delivery.channel.is_closed:
        return
    try:
        await delivery.nack(requeue=True)
    except (aiormq.exceptions.AMQPError, RuntimeError, ConnectionError) as exc:
        log.debug("nack of %s lost: %s", delivery.message_id, describe(exc))
