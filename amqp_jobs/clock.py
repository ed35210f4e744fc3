"""Time as the job system sees it: epoch milliseconds for ETAs, and waiting until one.

A transport owns its clock. RabbitMQ's is the wall clock. The in-memory broker can run on
a ``VirtualClock`` that a test advances, so a job delayed by an hour and retried with
backoff drains in milliseconds: the broker's TTL timers and the worker's ETA waits both
run on it, in time order.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable


class Clock:
    """The wall clock."""

    virtual = False

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000

    def ms_after(self, seconds: float) -> int:
        """The time ``seconds`` from now in epoch ms, rounded up: a job due at a whole
        millisecond that has begun is never early."""
        return -(-(self.now_ns() + round(seconds * 1_000_000_000)) // 1_000_000)

    def now_ns(self) -> int:
        return time.time_ns()

    async def sleep_until(self, at_ms: int) -> None:
        """Return at (or just after) ``at_ms``."""
        while (left := at_ms - self.now_ms()) > 0:  # noqa: ASYNC110 - sleep wakes early by rounding
            await asyncio.sleep(left / 1000)

    def call_at(self, at_ms: int, callback: Callable[[], None]) -> Callable[[], None]:
        """Run ``callback`` in the running loop at ``at_ms``; returns a canceller."""
        loop = asyncio.get_running_loop()
        handle = loop.call_later(max(0.0, (at_ms - self.now_ms()) / 1000), callback)
        return handle.cancel


WALL = Clock()


class VirtualClock(Clock):
    """A clock that stands still until ``advance`` moves it, firing what falls due in order.

    It starts at the wall clock's time, so ETAs stay plausible epoch times.
    """

    virtual = True

    def __init__(self) -> None:
        # a whole millisecond: ETAs computed on it are exact
        self._now_ns = time.time_ns() // 1_000_000 * 1_000_000
        self._timers: list[tuple[int, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._cancelled: set[int] = set()
        #: tasks waiting in sleep_until (the idle detector knows they wait on time)
        self.sleepers = 0

    def now_ns(self) -> int:
        return self._now_ns

    def now_ms(self) -> int:
        return self._now_ns // 1_000_000

    def call_at(self, at_ms: int, callback: Callable[[], None]) -> Callable[[], None]:
        seq = next(self._seq)
        heapq.heappush(self._timers, (at_ms, seq, callback))
        return lambda: self._cancelled.add(seq)

    async def sleep_until(self, at_ms: int) -> None:
        if at_ms <= self.now_ms():
            return
        woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def wake() -> None:
            if not woken.done():
                woken.set_result(None)

        cancel = self.call_at(at_ms, wake)
        self.sleepers += 1
        try:
            await woken
        finally:
            self.sleepers -= 1
            cancel()

    def next_due(self) -> int | None:
        """When the next timer fires, or None."""
        while self._timers and self._timers[0][1] in self._cancelled:
            self._cancelled.discard(heapq.heappop(self._timers)[1])
        return self._timers[0][0] if self._timers else None

    def advance(self, seconds: float) -> None:
        """Move time forward, firing every timer that falls due, in time order."""
        self.advance_to(self._now_ns + round(seconds * 1_000_000_000))

    def advance_to(self, at_ns: int) -> None:
        while (due := self.next_due()) is not None and due * 1_000_000 <= at_ns:
            _, _, callback = heapq.heappop(self._timers)
            self._now_ns = max(self._now_ns, due * 1_000_000)
            callback()
        self._now_ns = max(self._now_ns, at_ns)
