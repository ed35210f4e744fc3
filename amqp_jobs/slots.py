"""The worker's handler slots, granted by priority without starving anyone.

A semaphore of ``concurrency`` slots whose waiters queue by priority: a freed slot goes
to a waiting high-priority delivery first, except that while normal ones wait too,
every ``NORMAL_EVERY``-th grant goes to them. So a high-priority job starts as soon as
a slot frees (within one running job's duration), and under a flood of high-priority
jobs normal ones still get a third of the slots.

A slot may also be reserved: the next one freed goes to the reservation ahead of every
waiter. A critical section's lock handed over in the worker takes its holder's slot
with it this way, rather than wait behind the queue while it holds the lock.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

#: While both wait, one grant in this many goes to normal work.
NORMAL_EVERY = 3


class Slots:
    """``asyncio.Semaphore``'s acquire and release, with priorities."""

    def __init__(self, n: int) -> None:
        self._free = n
        self._waiting: dict[bool, deque[asyncio.Future[None]]] = {True: deque(), False: deque()}
        #: grants to high-priority waiters since the last to a normal one
        self._high_run = 0
        #: grants so far, by priority (read by tests and, later, metrics)
        self.granted = {True: 0, False: 0}
        self._reserved: deque[asyncio.Future[None]] = deque()

    def locked(self) -> bool:
        """Whether an acquire would wait."""
        reserved = any(not reservation.done() for reservation in self._reserved)
        return self._free == 0 or reserved or any(self._waiting.values())

    def reserve(self) -> asyncio.Future[None]:
        """The next slot to be free, ahead of every waiter: done once it is granted.
        Cancel it to give up; one done already is a slot held (``release`` it)."""
        reservation = asyncio.get_running_loop().create_future()
        self._reserved.append(reservation)
        self._hand_out()
        return reservation

    def give_up(self, reservation: asyncio.Future[None]) -> None:
        """A reservation no longer wanted: cancelled, or its slot released if granted."""
        if reservation.done() and not reservation.cancelled():
            self.release()
        else:
            reservation.cancel()

    async def acquire(self, high: bool = False) -> None:
        if not self.locked():
            self._free -= 1
            self._grant(high)
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiting[high].append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # granted as it was cancelled: hand the slot on
            else:
                with contextlib.suppress(ValueError):  # unless a release dropped it
                    self._waiting[high].remove(waiter)
            raise

    def release(self) -> None:
        self._free += 1
        self._hand_out()

    def _hand_out(self) -> None:
        while self._free > 0 and self._reserved:
            reservation = self._reserved.popleft()
            if not reservation.done():  # else cancelled: given up
                self._free -= 1
                reservation.set_result(None)
        while self._free > 0:
            picked = self._pick()
            if picked is None:
                return
            waiter, high = picked
            self._free -= 1
            self._grant(high)
            waiter.set_result(None)

    def _grant(self, high: bool) -> None:
        self.granted[high] += 1
        self._high_run = self._high_run + 1 if high else 0

    def _pick(self) -> tuple[asyncio.Future[None], bool] | None:
        high, normal = self._waiting[True], self._waiting[False]
        for queue in (high, normal):
            while queue and queue[0].done():  # cancelled while waiting
                queue.popleft()
        if high and (not normal or self._high_run < NORMAL_EVERY - 1):
            return high.popleft(), True
        if normal:
            return normal.popleft(), False
        return None
