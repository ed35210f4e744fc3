"""Helpers shared by the integration and reliability suites (fixtures: amqp_jobs.testing)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, NoReturn

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from amqp_jobs.testing import Namespace

ROOT = Path(__file__).resolve().parents[1]


async def eventually(
    check: Callable[[], Awaitable[bool]] | Callable[[], bool],
    *,
    timeout: float = 15.0,
    interval: float = 0.05,
    what: str = "condition",
) -> None:
    """Poll ``check`` until true; fail with ``what`` after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


@asynccontextmanager
async def channel(url: str) -> AsyncIterator[AbstractChannel]:
    connection = await aio_pika.connect(url, client_properties={"connection_name": "test helper"})
    try:
        yield await connection.channel()
    finally:
        await connection.close()


async def queue_count(url: str, name: str) -> int:
    async with channel(url) as ch:
        q = await ch.declare_queue(name, passive=True)
        return q.declaration_result.message_count or 0


async def drain(
    url: str, name: str, expected: int, timeout: float = 15.0
) -> list[AbstractIncomingMessage]:
    """Take ``expected`` messages off a queue (acked), waiting for them to arrive."""
    got: list[AbstractIncomingMessage] = []
    async with channel(url) as ch:
        q = await ch.declare_queue(name, passive=True)

        async def take() -> bool:
            while len(got) < expected:
                msg = await q.get(no_ack=True, fail=False)
                if msg is None:
                    return False
                got.append(msg)
            return True

        await eventually(take, timeout=timeout, what=f"{expected} messages in {name}")
        assert await q.get(no_ack=True, fail=False) is None, f"more than {expected} in {name}"
    return got


class WorkerProcess:
    """``amqp-jobs worker`` in a child process, for signal and crash tests."""

    def __init__(
        self,
        ns: Namespace,
        log_path: Path,
        *extra: str,
        env: dict[str, str] | None = None,
        app: str = "tests.integration.sample_app:app",
    ) -> None:
        self.log_path = log_path
        full_env = {
            **os.environ,
            "AMQP_URL": ns.url,
            "SAMPLE_NS": ns.name,
            "SAMPLE_LOG": str(log_path),
            "REL_NS": ns.name,
            "REL_LOG": str(log_path),
            "PYTHONPATH": str(ROOT),
            **(env or {}),
        }
        # Output goes to a file, not a pipe: a chatty worker (reconnects, say) fills a pipe
        # nobody reads until the end, then blocks on its next log line.
        self.output_path = log_path.with_name(log_path.name + f".worker-{id(self)}.out")
        with open(self.output_path, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "amqp_jobs.cli", "worker", app, *extra],
                env=full_env,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
            )

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.proc.send_signal(signum)

    def kill(self) -> None:
        self.proc.kill()  # SIGKILL

    async def wait(self, timeout: float = 30.0) -> int:
        loop = asyncio.get_running_loop()
        return await asyncio.wait_for(loop.run_in_executor(None, self.proc.wait), timeout)

    def output(self) -> str:
        if self.proc.poll() is None:
            return ""
        return self.output_path.read_text()

    def stop_now(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def read_log(path: Path) -> list[dict[str, Any]]:
    import json

    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


MANAGEMENT = os.environ.get("AMQP_MANAGEMENT_URL", "http://127.0.0.1:15672")


def require_management() -> None:
    """Skip (fail under CI) unless the RabbitMQ management API answers."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(MANAGEMENT + "/api/overview", timeout=3):
            return
    except urllib.error.HTTPError:
        return  # it answers (401 without credentials)
    except OSError:
        pass
    message = (
        f"no RabbitMQ management API at {MANAGEMENT} (rabbitmq-plugins enable rabbitmq_management)"
    )
    unavailable(message)


def unavailable(reason: str) -> NoReturn:
    """Skip a test whose requirement this machine lacks; under CI=true, fail it instead."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)
