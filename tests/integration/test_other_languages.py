"""Publishers that are not aio-pika, following only the README and schemas/, feed a worker."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pika
import pytest
from pydantic import BaseModel

from amqp_jobs import Job, JobContext
from amqp_jobs.testing import Namespace, run_until_idle
from tests.support import unavailable

#: publishers in other languages speak AMQP
pytestmark = pytest.mark.rabbitmq_only

ROOT = Path(__file__).resolve().parents[2]
NODE_DIR = ROOT / "examples" / "node-publisher"


class Welcome(BaseModel):
    user_id: int
    email: str


welcome = Job("emails.send_welcome", Welcome, queue="emails")


def app_with_log(namespace: Namespace) -> tuple[object, list[tuple[int, str, int, int | None]]]:
    app = namespace.app()
    ran: list[tuple[int, str, int, int | None]] = []

    @app.handler(welcome)
    async def handle(args: Welcome, ctx: JobContext) -> None:
        eta = None if ctx.eta is None else round(ctx.eta.timestamp() * 1000)
        ran.append((args.user_id, ctx.job_id, ctx.attempt, eta))

    return app, ran


async def declare(namespace: Namespace, app: object) -> None:
    """Workers declare their topology on start; run one until idle to do so."""
    await run_until_idle(namespace.worker(app))  # type: ignore[arg-type]


def pika_publish(
    url: str, namespace: str, body: dict[str, object], headers: dict[str, object]
) -> str:
    """Exactly what the README's wire contract says, with pika's blocking client."""
    job_id = uuid.uuid4().hex
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish(
            exchange=f"{namespace}.jobs",
            routing_key="emails.send_welcome",
            body=json.dumps(body).encode("utf-8"),
            properties=pika.BasicProperties(
                content_type="application/json",
                delivery_mode=2,
                message_id=job_id,
                type="emails.send_welcome",
                timestamp=int(time.time()),
                headers={"job-protocol": 1, "job-attempt": 1, "job-queue": "emails", **headers},
            ),
            mandatory=True,
        )
    finally:
        connection.close()
    return job_id


async def test_pika_publisher(namespace: Namespace) -> None:
    app, ran = app_with_log(namespace)
    await declare(namespace, app)
    loop = asyncio.get_running_loop()
    now_id = await loop.run_in_executor(
        None, pika_publish, namespace.url, namespace.name, {"user_id": 1, "email": "a@b.c"}, {}
    )
    eta = int(time.time() * 1000) + 800
    later_id = await loop.run_in_executor(
        None,
        pika_publish,
        namespace.url,
        namespace.name,
        {"user_id": 2, "email": "d@e.f"},
        {"job-eta": eta},
    )
    stats = await run_until_idle(namespace.worker(app))  # type: ignore[arg-type]
    assert stats.succeeded == 2
    assert sorted(ran) == sorted([(1, now_id, 1, None), (2, later_id, 1, eta)])


def node_available() -> str | None:
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        return "node and npm are needed for the Node.js publisher test"
    if not (NODE_DIR / "node_modules" / "amqplib").is_dir():
        result = subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--silent"],
            cwd=NODE_DIR, capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        if result.returncode != 0:
            return f"npm install failed: {result.stderr.strip()[-500:]}"
    return None


async def test_node_publisher(namespace: Namespace) -> None:
    problem = node_available()
    if problem:
        unavailable(problem)
    app, ran = app_with_log(namespace)
    await declare(namespace, app)
    env = {**os.environ, "AMQP_URL": namespace.url, "AMQP_JOBS_NAMESPACE": namespace.name}

    def publish(*args: str) -> str:
        result = subprocess.run(
            ["node", "publish.js", "emails.send_welcome", *args],
            cwd=NODE_DIR, env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    loop = asyncio.get_running_loop()
    now_id = await loop.run_in_executor(
        None, publish, '{"user_id": 3, "email": "n@o.de"}', "emails"
    )
    later_id = await loop.run_in_executor(
        None, publish, '{"user_id": 4, "email": "j@s.io"}', "emails", "700"
    )
    stats = await run_until_idle(namespace.worker(app))  # type: ignore[arg-type]
    assert stats.succeeded == 2
    by_user = {user: (job_id, attempt, eta) for user, job_id, attempt, eta in ran}
    assert by_user[3][:2] == (now_id, 1)
    assert by_user[4][0] == later_id
    assert by_user[4][2] is not None, "job-eta arrived as an integer"
