"""The benchmark suite still runs (at tiny sizes); it measures, this only checks it works."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

#: benchmarks against raw aio-pika
pytestmark = pytest.mark.rabbitmq_only

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)
def test_bench_runs_at_tiny_sizes(tmp_path: Path, amqp_url: str) -> None:
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench.run", "--runs", "1", "--jobs", "300", "--retry-jobs", "50",
         "--delay-jobs", "20", "--memory-jobs", "500", "--joblog-rows", "2000",
         "--output", str(out)],
        cwd=ROOT, env={**os.environ, "AMQP_URL": amqp_url}, capture_output=True, text=True,
        timeout=280, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["retry"]["all_succeeded_exactly_once"] is True
    assert data["delay"]["min_ms"] >= 0
    assert data["memory"]["jobs_in_work_queue"] == 0
    assert "enqueue_many" in data["comparisons"]
    assert "drain, metrics + every trace (raw: neither)" in data["comparisons"]
    assert "enqueue, awaited one by one: client CPU per job" in data["comparisons"]
    assert data["processes"]["noop"]["steady"] > 0
    assert data["processes"]["work"]["steady"] > 0
    assert "amqp-jobs vs raw aio-pika" in result.stdout
    assert data["events"]["ratio_events"] > 0
    assert set(data["joblog"]) == {"sqlite", "postgres"}
