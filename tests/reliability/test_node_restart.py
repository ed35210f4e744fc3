"""A private node restarts (kill -9, or a graceful stop) with delayed jobs in the cascade.

Every delayed job must run once the node is back: none lost, none early, and none later
than ``LATE_LIMIT`` seconds after max(its ETA, the moment the node was back up).

The delay cascade's quorum queues dead-letter with the at-least-once strategy. A booting
node recovers its queues before its exchanges: a delay level whose leader is up while the
rest of the node's queues are still recovering expires its messages to an exchange that
does not exist yet ("Cannot forward any dead-letter messages ... does not exist" in the
node's log), and the broker's dead-letter worker resends them only after
``dead_letter_worker_publisher_confirm_timeout`` (RabbitMQ's default: 180 s). The window
is short on an empty node, so the node here also holds ``BALLAST`` other quorum queues,
as a broker in use does. The private nodes set the timeout to ``DLX_CONFIRM_TIMEOUT_MS``;
``AMQP_JOBS_SOAK=1`` also runs the scenario on RabbitMQ's defaults, to show the stall
this setting removes (about 3 minutes).
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from amqp_jobs.testing import Namespace
from tests.reliability import rel_app
from tests.reliability.harness import REPORTS, Harness
from tests.reliability.nodes import (
    DLX_CONFIRM_TIMEOUT_MS,
    PrivateNode,
    missing_requirement,
    private_node,
)
from tests.reliability.test_faults import CONCURRENCY, finish, start
from tests.support import channel, unavailable

#: A job may run at most this long after max(its ETA, the node being back up). Measured
#: here: worst 5.3-9.8 s in most runs, and 13.4 s (before the transport seam, 17a3b25)
#: and 13.6 s (after it) when three or four delay levels' dead letters found no exchange:
#: a block of jobs then runs late by the same amount, the time the node took to recover
#: behind its listener, which no client setting shortens. RabbitMQ's default DLX confirm
#: timeout makes it about 185 s, which this bound still catches.
LATE_LIMIT = 20.0
JOBS = 200
#: Delays spread over this range (seconds) sit in levels 4..8 of the cascade at the restart.
DELAYS = (2.0, 30.0)
#: The restart happens this long after the last publish.
RESTART_AFTER = 3.0
#: Other quorum queues on the node; recovering them keeps the window open about a second.
BALLAST = 300
#: What the broker logs (once per delay level) when a dead-letter target is missing.
MISSING_DLX = "Cannot forward any dead-letter messages from source quorum queue"

SOAK = os.environ.get("AMQP_JOBS_SOAK", "").lower() in ("1", "true", "yes")


@dataclass
class Outage:
    down_at: float  # epoch seconds: the restart began
    up_at: float  # the node accepted connections and had booted again


@dataclass
class Lateness:
    worst: float
    worst_n: int
    over_limit: list[tuple[int, float]]  # (job n, seconds late) beyond LATE_LIMIT


def lateness(h: Harness, outage: Outage) -> Lateness:
    """How late each job's first start was against max(ETA, up_at) (its ETA if it ran before)."""
    first: dict[str, dict[str, float]] = {}
    for event in h.events("start"):
        if event["id"] not in first or event["t"] < first[event["id"]]["t"]:
            first[event["id"]] = event
    worst, worst_n, over = float("-inf"), -1, []
    for event in first.values():
        due = event["eta"] if event["t"] < outage.down_at else max(event["eta"], outage.up_at)
        late = event["t"] - due
        if late > worst:
            worst, worst_n = late, int(event["n"])
        if late > LATE_LIMIT:
            over.append((int(event["n"]), round(late, 1)))
    return Lateness(worst, worst_n, sorted(over, key=lambda item: -item[1]))


def _kill9_and_start(node: PrivateNode) -> None:
    node.kill9()
    node.start()


def _stop_and_start(node: PrivateNode) -> None:
    node.stop()
    node.start()


RESTARTS: dict[str, Callable[[PrivateNode], None]] = {
    "kill -9": _kill9_and_start,
    "rabbitmqctl stop": _stop_and_start,
}


async def declare_ballast(url: str, count: int = BALLAST) -> None:
    async with channel(url) as ch:
        for i in range(count):
            await ch.declare_queue(
                f"ballast.{i}", durable=True, arguments={"x-queue-type": "quorum"}
            )


def stalled_levels(node: PrivateNode, namespace: str) -> list[str]:
    """The delay levels whose dead letters found no exchange (from the node's log)."""
    marker = f"'{namespace}."
    return sorted(
        line.split(marker)[1].split("'")[0]
        for path in node.log_dir.glob("*.log")
        for line in path.read_text(errors="replace").splitlines()
        if MISSING_DLX in line and marker in line
    )


async def restart_with_delayed_jobs(
    node: PrivateNode, tmp_path: Path, how: str, *, wait_for: float
) -> tuple[Harness, Outage]:
    """Publish JOBS delayed jobs, restart the node ``how``, wait until every job has run."""
    namespace = Namespace(node.url(), f"t-restart-{uuid.uuid4().hex[:8]}", rel_app.settings)
    harness = Harness(namespace, tmp_path / "events.log")
    low, high = DELAYS
    delays = [low + (high - low) * i / (JOBS - 1) for i in range(JOBS)]
    await declare_ballast(node.url())
    worker = start(harness)
    try:
        async with namespace.client(settings=rel_app.settings) as client:
            ids = await asyncio.gather(
                *(client.enqueue(rel_app.work, {"n": i}, delay=d) for i, d in enumerate(delays))
            )
        for job_id, delay in zip(ids, delays, strict=True):
            harness.confirmed[job_id] = time.time() + delay
        await asyncio.sleep(RESTART_AFTER)
        loop = asyncio.get_running_loop()
        down_at = time.time()
        await loop.run_in_executor(None, RESTARTS[how], node)
        outage = Outage(down_at, time.time())
        await harness.wait_all(timeout=wait_for)
        assert worker.proc.poll() is None, "the worker reconnected by itself"
    finally:
        await finish(worker)
    return harness, outage


async def check(
    node: PrivateNode, tmp_path: Path, how: str, config: str, *, wait_for: float
) -> tuple[Lateness, list[str]]:
    """Run the scenario, add its report lines; return the lateness and the stalled levels."""
    harness, outage = await restart_with_delayed_jobs(node, tmp_path, how, wait_for=wait_for)
    late = lateness(harness, outage)
    stalled = stalled_levels(node, harness.namespace.name)
    report = await harness.report(
        f"node {how}, {JOBS} delayed ({config}, down {outage.up_at - outage.down_at:.0f}s)"
    )
    REPORTS.append(
        f"{'':<48} worst lateness {late.worst:.1f}s (job {late.worst_n}),"
        f" {len(late.over_limit)} over {LATE_LIMIT:.0f}s; dead letters with no exchange"
        f" yet in {', '.join(stalled) or 'no level'}"
    )
    assert report.lost == 0
    assert report.early == 0, "late is allowed, early never"
    assert report.duplicates <= 2 * CONCURRENCY  # at most what was in flight at the restart
    return late, stalled


@pytest.mark.timeout(150)
@pytest.mark.parametrize("how", list(RESTARTS))
async def test_delayed_jobs_run_promptly_after_a_node_restart(
    private_broker: PrivateNode, tmp_path: Path, how: str
) -> None:
    config = f"dlx confirm timeout {DLX_CONFIRM_TIMEOUT_MS} ms"
    late, stalled = await check(private_broker, tmp_path, how, config, wait_for=60)
    assert not late.over_limit, (
        f"jobs ran more than {LATE_LIMIT}s after max(ETA, node back up): {late.over_limit[:10]};"
        f" levels whose dead letters found no exchange after the restart: {stalled}"
    )


@pytest.fixture
def default_broker() -> Iterator[PrivateNode]:
    """A private node on RabbitMQ's default advanced settings (180 s DLX confirm timeout)."""
    if not SOAK:
        pytest.skip("the 3-minute stall on RabbitMQ's defaults runs with AMQP_JOBS_SOAK=1")
    reason = missing_requirement()
    if reason is not None:
        unavailable(reason)
    with private_node(advanced=None, role="defaults") as node:
        yield node


@pytest.mark.timeout(420)
@pytest.mark.parametrize("how", list(RESTARTS))
async def test_on_rabbitmq_defaults_delayed_jobs_stall_after_a_restart(
    default_broker: PrivateNode, tmp_path: Path, how: str
) -> None:
    """The reproduction: without the setting, jobs are minutes late (but still not lost).

    Whether a level loses the race is timing (16 runs of 17 here with ``BALLAST``); when
    one does, its jobs wait out RabbitMQ's 180 s.
    """
    late, stalled = await check(default_broker, tmp_path, how, "RabbitMQ defaults", wait_for=300)
    if not stalled:
        pytest.skip("no delay level expired before its exchange was back this time")
    assert late.worst > 60, f"levels {stalled} lost the race but nothing stalled"
