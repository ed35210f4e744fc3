"""Shared pieces of the benchmarks: namespaces, statistics, broker CPU and RSS readings."""

from __future__ import annotations

import asyncio
import os
import statistics
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from aio_pika.abc import AbstractConnection
from pydantic import BaseModel

from amqp_jobs import Job, TopologySettings
from amqp_jobs.transport import transport_for
from amqp_jobs.urls import resolve

URL = resolve(None).first  # $AMQP_URL, else the local default
CLK_TCK = os.sysconf("SC_CLK_TCK")


class Signup(BaseModel):
    """A realistic small job body (about 80 bytes of JSON)."""

    user_id: int
    email: str
    plan: str = "free"
    referrer: str | None = None


def bench_job(queue: str = "bench") -> Job[Signup]:
    return Job("bench.signup", Signup, queue=queue)


def args(i: int) -> dict[str, object]:
    return {"user_id": i, "email": f"user{i}@example.com", "plan": "pro"}


def namespace(label: str) -> str:
    return f"bench-{label}-{uuid.uuid4().hex[:6]}"


async def cleanup(ns: str, queues: set[str]) -> None:
    await transport_for(URL).delete_namespace(ns, queues, TopologySettings())


async def queue_counts(connection: AbstractConnection, name: str) -> tuple[int, int]:
    """Queue ``name``'s ready messages and consumers (a passive declare)."""
    channel = await connection.channel()
    try:
        queue = await channel.declare_queue(name, passive=True)
        result = queue.declaration_result
        return result.message_count or 0, result.consumer_count or 0
    finally:
        await channel.close()


async def queue_depth(connection: AbstractConnection, name: str) -> int:
    return (await queue_counts(connection, name))[0]


async def left_in(connection: AbstractConnection, name: str, timeout: float = 10.0) -> int:
    """Messages left ready in queue ``name`` once its consumers are gone: a consumer's
    unacked messages return to the queue only when the broker has dropped it, a moment
    after its process exited. Waits at most ``timeout`` s for that."""
    for _ in range(int(timeout / 0.1)):
        ready, consumers = await queue_counts(connection, name)
        if not consumers:
            return ready
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{name} still has {consumers} consumers after {timeout:.0f} s")


def broker_pid() -> int | None:
    """The RabbitMQ node's OS process on this machine (beam.smp), if it runs here."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() == "beam.smp":
                cmdline = (entry / "cmdline").read_bytes()
                if b"rabbit" in cmdline:
                    return int(entry.name)
        except OSError:
            continue
    return None


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds a process has used so far."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


@dataclass(frozen=True)
class Spread:
    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values))

    def fmt(self, unit: str = "", digits: int = 0) -> str:
        return f"{self.median:,.{digits}f}{unit} ({self.low:,.{digits}f}-{self.high:,.{digits}f})"

    def to_json(self) -> dict[str, float]:
        return {"median": self.median, "min": self.low, "max": self.high}
