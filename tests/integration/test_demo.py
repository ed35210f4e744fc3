"""The README's first command: the demo runs every job to its end on the real broker."""

import os
import subprocess
import sys

import pytest

from tests.support import ROOT


@pytest.mark.rabbitmq_only
def test_the_demo_runs_every_job_to_its_outcome(amqp_url: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "examples.demo"],
        cwd=ROOT,
        env={**os.environ, "AMQP_URL": amqp_url, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "not every job finished" not in out
    assert out.count("succeeded") >= 4, out
    assert "dead (exhausted)" in out
    assert "deleted" in out
