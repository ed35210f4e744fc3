"""The worker's slots: high priority first, and a share kept for normal work."""

import asyncio

from amqp_jobs.slots import NORMAL_EVERY, Slots


async def test_slots_prefer_high_and_keep_a_share_for_normal() -> None:
    slots = Slots(1)
    await slots.acquire()
    order: list[str] = []

    async def take(high: bool) -> None:
        await slots.acquire(high)
        order.append("high" if high else "normal")
        slots.release()

    tasks = [asyncio.create_task(take(high)) for high in [False] * 4 + [True] * 8]
    await asyncio.sleep(0)  # they all queue up
    cancelled = tasks[5]
    cancelled.cancel()  # a waiter that gives up is skipped, its turn not lost
    slots.release()
    await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
    assert len(order) == 11
    # while both wait, every NORMAL_EVERY-th grant is normal work
    assert order[:NORMAL_EVERY] == ["high"] * (NORMAL_EVERY - 1) + ["normal"]
    assert order.count("normal") == 4 and slots.granted[True] == 7


async def test_a_reserved_slot_goes_ahead_of_every_waiter() -> None:
    """A section's lock handed over takes its holder's slot: the next one freed goes
    to the reservation, not to a waiter queued before it; a reservation given up is
    skipped."""
    slots = Slots(1)
    await slots.acquire()
    waiter = asyncio.create_task(slots.acquire(high=True))
    await asyncio.sleep(0)  # queued first
    given_up, reserved = slots.reserve(), slots.reserve()
    assert slots.locked()
    given_up.cancel()
    slots.release()  # the holder's slot frees
    assert reserved.done() and not waiter.done()
    slots.release()  # the reserved slot's job is done with it
    await asyncio.wait_for(waiter, 5)
    slots.release()
    assert not slots.locked()
    now = slots.reserve()  # with a slot free, granted at once
    assert now.done() and slots.locked()
