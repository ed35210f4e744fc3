"""The no-job-lost harness: publish with confirms, inject a fault, account for every job.

Every confirmed job id is remembered with its ETA; the worker's handlers append
(event, job id, attempt, time, eta) to a durable log. At the end a Report counts what
was confirmed, succeeded, lost, duplicated, run early and dead-lettered.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from amqp_jobs import Job
from amqp_jobs.testing import Namespace
from amqp_jobs.topology import dead_queue
from tests.reliability import rel_app
from tests.support import drain, eventually, queue_count

REPORTS: list[str] = []


@dataclass
class Report:
    scenario: str
    confirmed: int
    succeeded: int
    lost: int
    duplicates: int
    early: int
    dead: int
    seconds: float

    def line(self) -> str:
        return (
            f"{self.scenario:<48} confirmed {self.confirmed:>5}  succeeded {self.succeeded:>5}"
            f"  lost {self.lost}  duplicates {self.duplicates:>3}  early {self.early}"
            f"  dead {self.dead}  {self.seconds:6.1f}s"
        )


@dataclass
class Harness:
    namespace: Namespace
    log_path: Path
    began: float = field(default_factory=time.monotonic)
    confirmed: dict[str, float | None] = field(default_factory=dict)  # id -> eta (epoch s)

    def __post_init__(self) -> None:
        self.namespace.settings = rel_app.settings
        self.namespace.track("rel")

    async def publish(
        self, job: Job[Any], items: list[dict[str, Any]], *, delay: float | None = None
    ) -> list[str]:
        """Publish with confirms; remember every id the broker confirmed."""
        async with self.namespace.client(settings=rel_app.settings) as client:
            ids = await client.enqueue_many(job, items, delay=delay)
        eta = None if delay is None else time.time() + delay
        for job_id in ids:
            self.confirmed[job_id] = eta
        return ids

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        if not self.log_path.exists():
            return []
        text = self.log_path.read_text()
        # a worker may be writing the last line right now: only whole lines count
        lines = text.splitlines() if text.endswith("\n") else text.splitlines()[:-1]
        events = [json.loads(line) for line in lines if line.strip()]
        return [e for e in events if kind is None or e["event"] == kind]

    def succeeded_ids(self) -> set[str]:
        return {e["id"] for e in self.events("success")}

    async def wait_all(self, *, dead: set[str] = frozenset(), timeout: float = 45) -> None:  # type: ignore[assignment]
        """Until every confirmed job that is not meant to die has succeeded."""
        wanted = set(self.confirmed) - set(dead)

        def done() -> bool:
            return wanted <= self.succeeded_ids()

        await eventually(done, timeout=timeout, interval=0.1, what="every confirmed job to succeed")
        if dead:
            name = dead_queue(self.namespace.name, "rel")
            await eventually(
                lambda: _at_least(queue_count(self.namespace.url, name), len(dead)),
                timeout=timeout,
                what=f"{len(dead)} dead jobs",
            )

    async def report(self, scenario: str, *, dead: set[str] = frozenset()) -> Report:  # type: ignore[assignment]
        """Account for every job; the dead queue must hold exactly ``dead``."""
        successes: dict[str, int] = {}
        early = 0
        for event in self.events("start"):
            eta = self.confirmed.get(event["id"])
            if eta is not None and event["t"] < event["eta"]:
                early += 1
        for event in self.events("success"):
            successes[event["id"]] = successes.get(event["id"], 0) + 1
        parked = await drain(
            self.namespace.url,
            dead_queue(self.namespace.name, "rel"),
            len(dead),
        ) if dead else []  # fmt: skip
        assert {m.message_id for m in parked} == set(dead), (
            "the dead queue holds exactly the doomed"
        )
        confirmed = set(self.confirmed)
        report = Report(
            scenario=scenario,
            confirmed=len(confirmed),
            succeeded=len(confirmed & set(successes)),
            lost=len(confirmed - set(successes) - set(dead)),
            duplicates=sum(count - 1 for count in successes.values()),
            early=early,
            dead=len(parked),
            seconds=time.monotonic() - self.began,
        )
        REPORTS.append(report.line())
        print(report.line())
        return report


async def _at_least(value: Any, expected: int) -> bool:
    return bool((await value) >= expected)
