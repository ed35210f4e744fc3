"""Running a long-lived command (a worker, a recorder) under SIGTERM and SIGINT."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Awaitable, Callable

log = logging.getLogger("amqp_jobs.cli")


async def serve(main: Awaitable[None], stop: Callable[[], None]) -> None:
    """Run ``main``; the first SIGTERM/SIGINT calls ``stop`` (a graceful stop), the
    second exits at once."""
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
    await main
