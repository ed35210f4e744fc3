"""Security: no credential in logs, errors or CLI output; only JSON is ever decoded."""

from __future__ import annotations

import ast
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from amqp_jobs import BrokerUnavailableError, Job, JobClient
from amqp_jobs.testing import Namespace

ROOT = Path(__file__).resolve().parents[2]
SECRET = "s3cr3t-Pa55"


class N(BaseModel):
    n: int


async def test_no_password_in_logs_or_errors_of_a_failing_client(
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = f"amqp://guest:{SECRET}@127.0.0.1:1/"
    caplog.set_level(logging.DEBUG)
    with pytest.raises(BrokerUnavailableError) as info:
        await JobClient(url, namespace="sec", retry_for=0.5).enqueue(Job("a", N), {"n": 1})
    text = str(info.value) + repr(info.value) + caplog.text
    assert SECRET not in text
    assert "guest:***@" in text


async def test_no_password_in_logs_of_a_wrong_login(
    namespace: Namespace, caplog: pytest.LogCaptureFixture
) -> None:
    url = namespace.url.replace("guest:guest@", f"guest:{SECRET}@")
    caplog.set_level(logging.DEBUG)
    with pytest.raises(BrokerUnavailableError, match="cannot log in") as info:
        await JobClient(url, namespace=namespace.name, retry_for=60).enqueue(Job("a", N), {"n": 1})
    assert SECRET not in str(info.value) + caplog.text
    assert "retrying" not in caplog.text  # a wrong password stays wrong: raised at once


def test_no_password_in_cli_output() -> None:
    url = f"amqp://guest:{SECRET}@127.0.0.1:1/"
    for args in (
        ["status", "--namespace", "x", "--queue", "q"],
        ["dead", "list", "q", "--namespace", "x"],
        ["worker", "examples.shop.worker:app", "--connect-timeout", "0.5"],
    ):
        result = subprocess.run(
            [sys.executable, "-m", "amqp_jobs.cli", *args, "--url", url, "--connect-timeout", "0.5"]
            if args[0] != "worker" else [sys.executable, "-m", "amqp_jobs.cli", *args, "--url", url],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "AMQP_JOBS_LOG_LEVEL": "DEBUG"},
        )  # fmt: skip
        assert result.returncode != 0
        assert SECRET not in result.stdout + result.stderr, args
        assert "guest:***@127.0.0.1:1" in result.stderr, args


def test_only_json_is_decoded() -> None:
    """No pickle, marshal, eval or exec anywhere in the package."""
    banned_modules = {"pickle", "cPickle", "marshal", "shelve", "dill"}
    banned_calls = {"eval", "exec"}
    for path in (ROOT / "amqp_jobs").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert not {a.name.split(".")[0] for a in node.names} & banned_modules, path
            if isinstance(node, ast.ImportFrom):
                assert (node.module or "").split(".")[0] not in banned_modules, path
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id not in banned_calls, f"{path}: {node.func.id}()"
