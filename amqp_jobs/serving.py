"""Running a long-lived command (a worker, a recorder, a supervisor) under SIGTERM and
SIGINT."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from amqp_jobs.supervised import Supervised
    from amqp_jobs.supervisor import Supervisor

log = logging.getLogger("amqp_jobs.cli")


async def serve(
    main: Awaitable[None], stop: Callable[[], None], supervised: Supervised | None = None
) -> None:
    """Run ``main``; the first SIGTERM/SIGINT calls ``stop`` (a graceful stop), the
    second exits at once. ``supervised`` watches for a supervisor's end and for
    recycling limits while it runs."""
    loop = asyncio.get_running_loop()
    signals = 0

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            log.info("%s received: stopping gracefully", signal.Signals(signum).name)
            stop()
        else:
            log.warning("second signal: exiting at once; unfinished jobs return to the queue")
            logging.shutdown()
            os._exit(1)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    if supervised is not None:
        supervised.start()
    try:
        await main
    finally:
        if supervised is not None:
            supervised.close()


async def serve_supervisor(supervisor: Supervisor) -> int:
    """Run a supervisor; every SIGTERM/SIGINT is passed on to its children (the first
    stops them gracefully, the next at once). Returns its exit status."""
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        log.info("%s received: passing it on to the worker processes", signal.Signals(signum).name)
        supervisor.stop()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    return await supervisor.run()
