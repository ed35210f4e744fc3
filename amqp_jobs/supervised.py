"""A worker process's side of ``--processes``: it ends when its supervisor does, and it
recycles itself after ``--max-jobs`` jobs or past ``--max-memory``.

The supervisor hands each child the read end of a pipe whose write end only the
supervisor holds. The pipe reads end-of-file the moment the supervisor is gone, however
it died (SIGKILL included), so a child never outlives it: it stops gracefully, with at
most ORPHAN_GRACE seconds for its jobs (the rest return to their queues), and exits.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
from collections.abc import Callable
from dataclasses import dataclass

from amqp_jobs.middleware import Middleware
from amqp_jobs.outcome import RAN, JobContext, Outcome

log = logging.getLogger("amqp_jobs.supervisor")

#: The environment variable naming the pipe a supervised child watches.
SUPERVISOR_FD = "AMQP_JOBS_SUPERVISOR_FD"
#: A child's slot (0..N-1), for its logs and its connection's name.
CHILD_SLOT = "AMQP_JOBS_CHILD"
#: Set (to 1) for a child whose metrics the supervisor serves.
METRICS_CHILD = "AMQP_JOBS_METRICS_CHILD"
#: A child that recycles itself exits with this status (EX_TEMPFAIL): start another.
RECYCLE_EXIT = 75
#: At most this long for an orphan's jobs to finish before it exits (seconds).
ORPHAN_GRACE = 3.0
#: How often the memory limit is checked (seconds).
CHECK_EVERY = 0.5


@dataclass
class Limits:
    """When a child hands over to a fresh one: after this many jobs, or once its
    resident memory passes this many bytes (None: no limit)."""

    max_jobs: int | None = None
    max_memory: int | None = None


def resident_bytes() -> int:
    """This process's resident memory now (Linux), else its peak."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Supervised:
    """Watches, in a child's event loop, for its supervisor's end and for its limits;
    either calls ``stop`` (the worker's graceful stop). ``recycling`` says which."""

    def __init__(
        self,
        stop: Callable[[], None],
        limits: Limits,
        *,
        shorten_grace: Callable[[float], None],
    ) -> None:
        self._stop = stop
        self.jobs_done = 0
        self.limits = limits
        self._shorten_grace = shorten_grace
        self.recycling = False
        self.orphaned = False
        self._fd: int | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        fd = os.environ.get(SUPERVISOR_FD)
        if fd is not None:
            self._fd = int(fd)
            os.set_blocking(self._fd, False)
            loop.add_reader(self._fd, self._supervisor_readable)
        if self.limits.max_memory is not None:
            self._task = asyncio.ensure_future(self._watch_memory())

    def close(self) -> None:
        if self._fd is not None:
            asyncio.get_running_loop().remove_reader(self._fd)
        if self._task is not None:
            self._task.cancel()

    def _supervisor_readable(self) -> None:
        assert self._fd is not None
        try:
            if os.read(self._fd, 64):
                return  # nothing is ever written; ignore it
        except BlockingIOError:
            return
        except OSError:
            pass
        asyncio.get_running_loop().remove_reader(self._fd)
        if self.orphaned:
            return
        self.orphaned = True
        log.warning(
            "the supervisor is gone: stopping, with at most %.0fs for running jobs",
            ORPHAN_GRACE,
        )
        self._shorten_grace(ORPHAN_GRACE)
        self._stop()

    def counting(self) -> Middleware:
        """A middleware that counts jobs as they end, for ``--max-jobs``."""
        return _Counting(self)

    def job_done(self) -> None:
        self.jobs_done += 1
        limit = self.limits.max_jobs
        if limit is not None and self.jobs_done == limit:
            self._recycle(f"{limit} jobs (--max-jobs)")

    async def _watch_memory(self) -> None:
        limit = self.limits.max_memory
        assert limit is not None
        while True:  # memory grows without an event to wait on: sample it
            await asyncio.sleep(CHECK_EVERY)
            if (rss := resident_bytes()) > limit:
                break
        mib = f"{rss / 2**20:.0f} MiB resident (--max-memory {limit / 2**20:.0f})"
        self._recycle(f"reaching {mib}")

    def _recycle(self, reason: str) -> None:
        if self.recycling or self.orphaned:
            return
        self.recycling = True
        log.info("recycling this worker process after %s: draining", reason)
        self._stop()


class _Counting(Middleware):
    def __init__(self, supervised: Supervised) -> None:
        self.supervised = supervised

    async def settled(self, outcome: Outcome, ctx: JobContext | None) -> None:
        if ctx is not None and outcome.kind in RAN:  # not deferrals, re-delays, poison
            self.supervised.job_done()
