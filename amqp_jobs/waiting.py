"""Waiting for one thing unless asked to stop first."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


class Stopped(Exception):
    """Asked to stop before what was awaited was done (it was cancelled)."""


async def unless_stopped(awaitable: Awaitable[T], stop: asyncio.Event) -> T:
    """``awaitable``'s result; raises Stopped (having cancelled it) if ``stop`` is set
    first. Connecting with backoff can take long: a worker asked to stop must not wait."""
    task = asyncio.ensure_future(awaitable)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
    if task.cancelled():
        raise Stopped("asked to stop")
    return task.result()
