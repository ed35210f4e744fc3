"""Which refusals of a lock's claim mean "another holds it" (RabbitMQ's own texts):
any other is the claim's own fault and must be raised, never read as "taken"."""

from __future__ import annotations

import aiormq
import pytest

from amqp_jobs.transport.amqp.session import _held_by_another

HELD = "ACCESS_REFUSED - queue 'ns.lock.ab12.0' in vhost '/' in exclusive use"
#: RabbitMQ cuts a reply text to 252 bytes and "..." (a long vhost, say)
CUT = ("ACCESS_REFUSED - queue 'ns.lock.ab12.0' in vhost '" + "v" * 300)[:252] + "..."
NO_PERMISSION = (
    "ACCESS_REFUSED - configure access to queue 'ns.lock.ab12.0' in vhost '/' refused"
    " for user 'jobs'"
)
RESERVED = "ACCESS_REFUSED - queue name 'amq.x' contains reserved prefix 'amq.*'"


@pytest.mark.parametrize("text", [HELD, CUT])
def test_a_consumer_in_exclusive_use_holds_the_lock(text: str) -> None:
    assert _held_by_another(aiormq.exceptions.ChannelAccessRefused(text))


def test_an_exclusive_queue_of_another_connection_holds_the_lock() -> None:
    locked = "RESOURCE_LOCKED - cannot obtain exclusive access to locked queue 'x'"
    assert _held_by_another(aiormq.exceptions.ChannelLockedResource(locked))


@pytest.mark.parametrize("text", [NO_PERMISSION, RESERVED])
def test_a_claim_refused_for_itself_is_not_taken(text: str) -> None:
    assert not _held_by_another(aiormq.exceptions.ChannelAccessRefused(text))
