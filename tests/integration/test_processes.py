"""``amqp-jobs worker --processes N``: a supervisor keeps N worker processes. Only a
child that dies is restarted, at once, and nothing it held is lost; children go when
the supervisor goes, even by SIGKILL; signals reach every child; children recycle
after --max-jobs; a crash loop backs off; a child that cannot run stops the lot."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from amqp_jobs.supervisor import pause_after
from amqp_jobs.testing import Namespace
from amqp_jobs.topology import work_queue
from tests.integration.process_app import WORK
from tests.support import WorkerProcess, _link, eventually

APP = "tests.integration.process_app:app"

pytestmark = [pytest.mark.timeout(180), pytest.mark.rabbitmq_only]


class Ledger:
    def __init__(self, path: Path) -> None:
        self.path = path

    def lines(self) -> list[dict[str, object]]:
        if not self.path.exists():
            return []
        text = self.path.read_text()
        return [json.loads(x) for x in text[: text.rfind("\n") + 1].splitlines()]

    def ended(self) -> set[object]:
        return {x["n"] for x in self.lines() if x["e"] == "end"}

    def pids(self) -> set[object]:
        return {x["pid"] for x in self.lines()}


def children(out: Path) -> dict[int, list[int]]:
    """Slot -> the pids started in it, in order, from the supervisor's log."""
    found: dict[int, list[int]] = {}
    text = out.read_text() if out.exists() else ""
    for slot, pid in re.findall(r"worker process (\d+) started: pid (\d+)", text):
        found.setdefault(int(slot), []).append(int(pid))
    return found


def alive(pid: int) -> bool:
    """Running, and not a zombie waiting to be reaped."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


async def stopped(proc: WorkerProcess, timeout: float = 60.0) -> int:
    """SIGTERM, then the exit status (a graceful stop is 0)."""
    proc.signal(signal.SIGTERM)
    return await proc.wait(timeout)


def consuming(ns: Namespace, n: int) -> Callable[[], Awaitable[bool]]:
    """Whether the work queue has ``n`` consumers."""

    async def check() -> bool:
        link = _link(ns.url)
        try:
            counts = await link.counts(work_queue(ns.name, WORK.queue))
        finally:
            await link.close()
        return counts is not None and counts[1] == n

    return check


def supervisor(ns: Namespace, tmp_path: Path, *extra: str) -> tuple[WorkerProcess, Ledger]:
    ledger = Ledger(tmp_path / "ledger.jsonl")
    ns.track(WORK)
    proc = WorkerProcess(ns, ledger.path, *extra, app=APP)
    return proc, ledger


async def test_a_killed_child_alone_restarts_at_once_and_loses_nothing(
    namespace: Namespace, tmp_path: Path
) -> None:
    sup, ledger = supervisor(namespace, tmp_path, "--processes", "2", "-c", "8")
    try:
        await eventually(lambda: len(children(sup.output_path)) == 2, timeout=30, what="2 children")
        jobs = 600
        async with namespace.client() as client:
            await client.enqueue_many(WORK, [{"n": n, "ms": 20} for n in range(jobs)])
        await eventually(lambda: len(ledger.ended()) >= jobs // 4, timeout=60, what="progress")
        before = children(sup.output_path)
        victim, other = before[0][-1], before[1][-1]
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        await eventually(
            lambda: len(children(sup.output_path)[0]) == 2, timeout=10, what="slot 0 restarted"
        )
        restarted_in = time.monotonic() - killed
        await eventually(lambda: len(ledger.ended()) == jobs, timeout=120, what="every job's end")
        # the new child consumes: more jobs reach it (the survivor may have run all of the
        # first batch while it started, on a busy machine)
        await eventually(consuming(namespace, 2), timeout=30, what="2 children consuming")
        async with namespace.client() as client:
            await client.enqueue_many(WORK, [{"n": n, "ms": 20} for n in range(jobs, jobs + 100)])
        await eventually(lambda: len(ledger.ended()) == jobs + 100, timeout=60, what="100 more")
        after = children(sup.output_path)
        assert after[1] == [other], "only the killed child is restarted"
        assert alive(other)
        assert restarted_in < 1.0, f"restarted {restarted_in:.2f}s after the kill"
        new = after[0][-1]
        assert new in ledger.pids(), "the new child took jobs"
        print(f"child restarted {restarted_in * 1000:.0f} ms after SIGKILL; {jobs} of {jobs} ran")
    finally:
        assert await stopped(sup) == 0


async def test_children_end_when_the_supervisor_is_killed(
    namespace: Namespace, tmp_path: Path
) -> None:
    sup, ledger = supervisor(namespace, tmp_path, "--processes", "2", "-c", "1")
    try:
        await eventually(lambda: len(children(sup.output_path)) == 2, timeout=30, what="2 children")
        async with namespace.client() as client:  # and busy: a job of 1 s each
            await client.enqueue_many(WORK, [{"n": n, "ms": 1000} for n in range(4)])
        await eventually(lambda: len(ledger.pids()) == 2, timeout=30, what="both children busy")
        pids = [p for ps in children(sup.output_path).values() for p in ps]
        sup.kill()
        killed = time.monotonic()
        await eventually(
            lambda: not any(alive(p) for p in pids), timeout=5, what="every child gone"
        )
        print(f"children gone {time.monotonic() - killed:.2f}s after the supervisor's SIGKILL")
    finally:
        sup.stop_now()


async def test_sigterm_reaches_every_child_and_running_jobs_finish(
    namespace: Namespace, tmp_path: Path
) -> None:
    sup, ledger = supervisor(namespace, tmp_path, "--processes", "2", "-c", "1", "--grace", "10")
    await eventually(lambda: len(children(sup.output_path)) == 2, timeout=30, what="2 children")
    async with namespace.client() as client:
        await client.enqueue_many(WORK, [{"n": n, "ms": 1500} for n in range(4)])
    await eventually(lambda: len(ledger.pids()) == 2, timeout=30, what="both children busy")
    started = {x["n"] for x in ledger.lines() if x["e"] == "start"}
    sup.signal(signal.SIGTERM)
    assert await sup.wait(30) == 0
    assert started <= ledger.ended(), "a job running at SIGTERM finished first"
    pids = [p for ps in children(sup.output_path).values() for p in ps]
    assert not any(alive(p) for p in pids)
    assert "restarting" not in sup.output_path.read_text()


async def test_a_child_recycles_after_max_jobs(namespace: Namespace, tmp_path: Path) -> None:
    sup, ledger = supervisor(namespace, tmp_path, "--max-jobs", "40", "-c", "4")
    try:
        async with namespace.client() as client:
            await client.enqueue_many(WORK, [{"n": n, "ms": 5} for n in range(150)])
        await eventually(lambda: len(ledger.ended()) == 150, timeout=90, what="every job's end")
        assert len(ledger.pids()) >= 3, "150 jobs at 40 a process take 3 processes or more"
        assert "recycled: starting a fresh one" in sup.output_path.read_text()
    finally:
        assert await stopped(sup) == 0


async def test_a_crash_loop_backs_off_and_a_stop_ends_it(
    namespace: Namespace, tmp_path: Path
) -> None:
    sup = WorkerProcess(
        namespace,
        tmp_path / "ledger.jsonl",
        "--processes", "2", "--connect-timeout", "0.2",
        app=APP,
        env={"AMQP_URL": "amqp://guest:guest@127.0.0.1:9/"},  # nothing listens there
    )  # fmt: skip
    try:
        await eventually(
            lambda: "restarting it in 1.0s" in sup.output_path.read_text(),
            timeout=60,
            what="a growing pause",
        )
        text = sup.output_path.read_text()
        assert "restarting it in 0.5s" in text
        assert "guest:guest" not in text, "no password in the log"
        sup.signal(signal.SIGTERM)
        assert await sup.wait(15) == 0
    finally:
        sup.stop_now()


async def test_a_child_that_cannot_run_stops_the_supervisor(
    namespace: Namespace, tmp_path: Path
) -> None:
    sup = WorkerProcess(
        namespace, tmp_path / "ledger.jsonl", "--processes", "2", app="no_such_module:app"
    )
    try:
        assert await sup.wait(60) == 2
        assert "cannot run as asked" in sup.output_path.read_text()
    finally:
        sup.stop_now()


def test_the_pause_before_a_restart_grows_and_is_capped() -> None:
    assert [pause_after(n) for n in range(5)] == [0.0, 0.5, 1.0, 2.0, 4.0]
    assert pause_after(100) == 30.0


async def test_a_child_recycles_past_max_memory(namespace: Namespace, tmp_path: Path) -> None:
    """Every Python process is past 1 MiB: each child drains and hands over in turn."""
    sup, ledger = supervisor(namespace, tmp_path, "--max-memory", "1", "-c", "2")
    try:
        async with namespace.client() as client:
            await client.enqueue_many(WORK, [{"n": n, "ms": 5} for n in range(30)])
        await eventually(lambda: len(ledger.ended()) == 30, timeout=90, what="every job's end")
        await eventually(
            lambda: sup.output_path.read_text().count("recycled: starting a fresh one") >= 2,
            timeout=30,
            what="two recycles",
        )
        assert "MiB resident (--max-memory 1)" in sup.output_path.read_text()
    finally:
        assert await stopped(sup) == 0
