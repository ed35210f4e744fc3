"""TLS: ``amqps://`` verifies the broker's certificate; a wrong CA fails at once, clearly.

The node behind ``tls_broker`` has no plain-TCP listener, so anything that works here
went through TLS with certificate verification against the test CA.
"""

from __future__ import annotations

import logging
import ssl
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from pydantic import BaseModel

from amqp_jobs import BrokerUnavailableError, Job, JobClient, JobContext
from amqp_jobs.testing import Namespace, run_until_idle
from tests.reliability.tls_node import TLSNode

ROOT = Path(__file__).resolve().parents[2]
SECRET = "tls-s3cret"


class Greeting(BaseModel):
    name: str


@pytest.fixture
async def tls_namespace(tls_broker: TLSNode) -> AsyncIterator[Namespace]:
    """A namespace on the TLS node, deleted afterwards."""
    namespace = Namespace(tls_broker.url(tls_broker.ca_file), f"t-tls-{uuid.uuid4().hex[:8]}")
    yield namespace
    await namespace.delete()


async def test_amqps_with_the_test_ca_publishes_and_runs_a_job(tls_namespace: Namespace) -> None:
    app = tls_namespace.app()
    greet = Job("greet", Greeting, queue="tls")
    seen: list[tuple[str, str]] = []

    @app.handler(greet)
    async def handle(args: Greeting, ctx: JobContext) -> None:
        seen.append((args.name, ctx.job_id))

    async with tls_namespace.client() as client:
        job_id = await client.enqueue(greet, {"name": "ada"})
    stats = await run_until_idle(tls_namespace.worker(app), timeout=30)
    assert seen == [("ada", job_id)]
    assert stats.succeeded == 1


async def test_amqps_with_an_ssl_context(tls_broker: TLSNode, tls_namespace: Namespace) -> None:
    """The CA can come as an SSLContext instead of ``?cafile=`` in the URL."""
    context = ssl.create_default_context(cafile=str(tls_broker.ca_file))
    greet = Job("greet", Greeting, queue="tls")
    async with tls_namespace.client(tls_broker.url(), ssl_context=context) as client:
        await client.enqueue(greet, {"name": "grace"})
        assert client.declared_queues == {"tls"}


@pytest.mark.parametrize("which", ["other CA", "system CAs"])
async def test_a_wrong_ca_fails_at_once_with_a_clear_error(
    tls_broker: TLSNode, which: str, caplog: pytest.LogCaptureFixture
) -> None:
    ca_file = tls_broker.other_ca_file if which == "other CA" else None
    url = tls_broker.url(ca_file, password=SECRET)
    caplog.set_level(logging.DEBUG, logger="amqp_jobs")
    client = JobClient(url, namespace="tls-wrong-ca", retry_for=60)
    with pytest.raises(BrokerUnavailableError, match="TLS certificate verification failed") as info:
        await client.enqueue(Job("greet", Greeting), {"name": "eve"})
    message = str(info.value)
    assert "check the CA" in message and "certificate verify failed" in message
    assert "guest:***@localhost" in message and SECRET not in message + caplog.text
    # Not retried: a certificate does not get better by waiting for it.
    assert "retrying" not in caplog.text


def test_worker_cli_with_a_wrong_ca_prints_one_line_and_exits(tls_broker: TLSNode) -> None:
    url = tls_broker.url(tls_broker.other_ca_file, password=SECRET)
    result = subprocess.run(
        [sys.executable, "-m", "amqp_jobs.cli", "worker", "examples.shop.worker:app", "--url", url],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert "TLS certificate verification failed" in result.stderr
    assert "Traceback" not in result.stderr and SECRET not in result.stderr + result.stdout


async def test_amqps_to_a_plain_listener_says_tls_handshake(amqp_url: str) -> None:
    parts = urlsplit(amqp_url)
    url = f"amqps://guest:{SECRET}@{parts.hostname}:{parts.port or 5672}/"
    client = JobClient(url, namespace="tls-plain", retry_for=0.5)
    with pytest.raises(BrokerUnavailableError, match=r"TLS handshake with .* failed") as info:
        await client.enqueue(Job("greet", Greeting), {"name": "eve"})
    assert "is it a TLS port?" in str(info.value) and SECRET not in str(info.value)
