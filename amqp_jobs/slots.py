"""The worker's handler slots, granted by priority without starving anyone.

A semaphore of ``concurrency`` slots whose waiters queue by priority: a freed slot goes
to a waiting high-priority delivery first, except that while normal ones wait too,
every ``NORMAL_EVERY``-th grant goes to them. So a high-priority job starts as soon as
a slot frees (within one running job's duration), and under a flood of high-priority
jobs normal ones still get a third of the slots.
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

    def locked(self) -> bool:
        """Whether an acquire would wait."""
        return self._free == 0 or any(self._waiting.values())

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
