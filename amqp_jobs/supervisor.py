"""``amqp-jobs worker --processes N``: a supervisor that keeps N worker processes.

Each child is a fresh interpreter (spawned, never forked from a running event loop)
running ``amqp-jobs worker`` for one slot. The supervisor:

- restarts only a child that died, at once the first time and then with growing pauses
  while it keeps dying young (a crash loop costs little), and never stops the others;
- starts a fresh child when one recycles itself (``--max-jobs``, ``--max-memory``);
- passes SIGTERM and SIGINT on to every child, which stops gracefully with its grace
  period (a second signal, passed on too, stops them at once), and waits for them;
- gives up, stopping the others, when a child says it cannot run at all (status 2: a
  bad argument or an app that does not import), rather than restart it forever.

Children run in their own session, so a terminal's Ctrl-C reaches them once, through
the supervisor. Each watches a pipe that only the supervisor writes to: if the
supervisor dies, even by SIGKILL, they stop on their own (``supervised``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from amqp_jobs.supervised import CHILD_SLOT, RECYCLE_EXIT, SUPERVISOR_FD

log = logging.getLogger("amqp_jobs.supervisor")

#: A child that ran this long before dying is restarted at once (seconds).
STABLE_AFTER = 10.0
#: Pauses before restarting a child that keeps dying young: the first is none.
FIRST_PAUSE, MAX_PAUSE = 0.5, 30.0
#: What a child's status 2 means: it cannot run as asked (restarting will not help).
USAGE_EXIT = 2
#: How long past their grace period children get before they are killed (seconds).
STOP_MARGIN = 15.0


def pause_after(crashes: int) -> float:
    """Seconds before restarting a slot whose child died young ``crashes`` times in a
    row before this death: none the first time, then 0.5, 1, 2, ... up to 30."""
    if crashes <= 0:
        return 0.0
    return float(min(FIRST_PAUSE * 2 ** (crashes - 1), MAX_PAUSE))


def describe_exit(status: int) -> str:
    if status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"exited with status {status}"


@dataclass
class Slot:
    """One of the N places a child runs in, and its history."""

    index: int
    process: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    #: deaths in a row of children that did not live STABLE_AFTER seconds
    crashes: int = 0
    restarts: int = 0
    pids: list[int] = field(default_factory=list)


class Supervisor:
    """Runs ``amqp-jobs ARGV`` in ``processes`` children until stopped."""

    def __init__(
        self,
        argv: Sequence[str],
        processes: int,
        *,
        grace: float,
        env: Mapping[str, str] | None = None,
        on_exit: Sequence[Callable[[int], None]] = (),
    ) -> None:
        self.argv = list(argv)
        self.slots = [Slot(i) for i in range(processes)]
        self.grace = grace
        self.env = dict(os.environ if env is None else env)
        #: called with a child's pid once it has exited (metrics forget its gauges)
        self.on_exit = list(on_exit)
        self._stopping = asyncio.Event()
        self._signals = 0
        self._status = 0
        self._read_fd, self._write_fd = os.pipe()  # neither is inherited by default

    @property
    def pids(self) -> list[int]:
        """The pids of the children running now, by slot."""
        return [
            s.process.pid
            for s in self.slots
            if s.process is not None and s.process.returncode is None
        ]

    def stop(self) -> None:
        """Pass a stop on to every child: the first graceful, the next at once."""
        self._signals += 1
        self._stopping.set()
        for slot in self.slots:
            self._signal(slot, signal.SIGTERM)

    async def run(self) -> int:
        """Start the children and keep them; returns the exit status once every child
        has stopped (0 after a stop, 2 when a child could not run as asked)."""
        log.info("supervisor %d starting %d worker processes", os.getpid(), len(self.slots))
        try:
            await asyncio.gather(*(self._keep(slot) for slot in self.slots))
        finally:
            for fd in (self._read_fd, self._write_fd):
                with contextlib.suppress(OSError):
                    os.close(fd)
        log.info("supervisor stopped")
        return self._status

    async def _keep(self, slot: Slot) -> None:
        """Run a child in ``slot`` until the supervisor stops, restarting it as needed."""
        while not self._stopping.is_set():
            try:
                await self._start(slot)
            except OSError as exc:  # no process could be made now (EAGAIN, EMFILE)
                pause = pause_after(slot.crashes + 1)
                slot.crashes += 1
                log.error("worker process %d could not be started (%s): trying again in"
                          " %.1fs", slot.index, exc, pause)  # fmt: skip
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), pause)
                continue
            process = slot.process
            assert process is not None
            status = await self._wait(process)
            lived = time.monotonic() - slot.started_at
            for callback in self.on_exit:
                try:
                    callback(process.pid)
                except Exception:
                    log.exception("supervisor: an exit callback failed (ignored)")
            if self._stopping.is_set():
                log.info("worker process %d (pid %d) %s", slot.index, process.pid,
                         describe_exit(status))  # fmt: skip
                return
            if status == USAGE_EXIT:
                log.error(
                    "worker process %d (pid %d) cannot run as asked (status 2, see its"
                    " error above): stopping the others",
                    slot.index,
                    process.pid,
                )
                self._status = USAGE_EXIT
                self.stop()
                return
            if status == RECYCLE_EXIT:
                slot.crashes = 0
                log.info("worker process %d (pid %d) recycled: starting a fresh one",
                         slot.index, process.pid)  # fmt: skip
                continue
            if lived >= STABLE_AFTER:
                slot.crashes = 0
            pause = pause_after(slot.crashes)
            slot.crashes += 1
            log.error(
                "worker process %d (pid %d) %s after %.1fs: restarting it%s",
                slot.index,
                process.pid,
                describe_exit(status),
                lived,
                f" in {pause:.1f}s" if pause else "",
            )
            if pause:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), pause)

    async def _start(self, slot: Slot) -> None:
        env = {**self.env, SUPERVISOR_FD: str(self._read_fd), CHILD_SLOT: str(slot.index)}
        slot.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "amqp_jobs.cli",
            *self.argv,
            env=env,
            pass_fds=(self._read_fd,),
            start_new_session=True,  # a terminal's Ctrl-C comes through us, once
        )
        slot.started_at = time.monotonic()
        slot.pids.append(slot.process.pid)
        if len(slot.pids) > 1:
            slot.restarts += 1
        log.info("worker process %d started: pid %d", slot.index, slot.process.pid)
        if self._stopping.is_set():  # a stop came while it started
            for _ in range(self._signals):
                self._signal(slot, signal.SIGTERM)

    async def _wait(self, process: asyncio.subprocess.Process) -> int:
        """The child's exit status; once stopping, killed if it outlives its grace."""
        waiting = asyncio.ensure_future(process.wait())
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({waiting, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if waiting.done():
                return waiting.result()
            try:
                return await asyncio.wait_for(asyncio.shield(waiting), self.grace + STOP_MARGIN)
            except TimeoutError:
                log.error("worker process (pid %d) outlived its grace period: killing it",
                          process.pid)  # fmt: skip
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                return await waiting
        finally:
            stopping.cancel()

    def _signal(self, slot: Slot, signum: signal.Signals) -> None:
        process = slot.process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signum)
