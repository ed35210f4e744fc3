"""The supervisor's metrics across children (``ChildrenMetrics``): a dead child's
counters, histograms and summaries are folded into one file, with every count kept, and a scrape
during the folding never counts one twice or misses it."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from amqp_jobs.metrics import ChildrenMetrics

CHILD = """
from prometheus_client import Counter, Gauge, Histogram, Summary
n = {n}
Counter("demo_jobs", "jobs", ["queue"]).labels("q").inc(n)
Histogram("demo_seconds", "durations", ["queue"]).labels("q").observe(n / 100)
Summary("demo_bytes", "sizes", ["queue"]).labels("q").observe(n)
Gauge("demo_running", "running", ["queue"], multiprocess_mode="livesum").labels("q").inc(1)
"""


def children(directory: Path, count: int) -> list[int]:
    """Run ``count`` processes that each count n jobs (n = 1..count); their pids."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    procs = [
        subprocess.Popen([sys.executable, "-c", CHILD.format(n=n)], env=env)
        for n in range(1, count + 1)
    ]
    for proc in procs:
        assert proc.wait(timeout=60) == 0
    return [proc.pid for proc in procs]


def totals(metrics: ChildrenMetrics) -> dict[str, float]:
    text = generate_latest(metrics.registry).decode()
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name
        in {"demo_jobs_total", "demo_seconds_count", "demo_seconds_sum", "demo_bytes_sum"}
        or sample.name == "demo_running"
    }


def test_a_dead_childs_counts_are_folded_into_one_file_and_kept(tmp_path: Path) -> None:
    pids = children(tmp_path, 6)
    metrics = ChildrenMetrics(str(tmp_path))
    before = totals(metrics)
    assert before["demo_jobs_total"] == 21  # 1 + 2 + ... + 6
    assert before["demo_seconds_count"] == 6
    assert before["demo_running"] == 6
    assert before["demo_bytes_sum"] == 21

    for pid in pids:
        metrics.forget(pid)

    after = totals(metrics)
    assert after["demo_jobs_total"] == 21
    assert after["demo_seconds_count"] == 6
    assert after["demo_seconds_sum"] == pytest.approx(before["demo_seconds_sum"])
    assert after["demo_bytes_sum"] == 21
    assert after.get("demo_running", 0) == 0, "a dead child's running jobs are forgotten"
    assert sorted(f.name for f in tmp_path.iterdir()) == [
        "counter_exited.db",
        "histogram_exited.db",
        "summary_exited.db",
    ]
    metrics.forget(pids[0])  # told twice: nothing left to fold, nothing changes
    assert totals(metrics)["demo_jobs_total"] == 21


def test_a_scrape_during_the_folding_sees_every_count_once(tmp_path: Path) -> None:
    pids = children(tmp_path, 12)
    metrics = ChildrenMetrics(str(tmp_path))
    seen: list[float] = []
    errors: list[BaseException] = []
    folding = threading.Event()

    def scrape() -> None:
        while not folding.is_set():
            try:
                seen.append(totals(metrics)["demo_jobs_total"])
            except BaseException as exc:  # a file gone under a scrape
                errors.append(exc)
                return

    scraper = threading.Thread(target=scrape)
    scraper.start()
    try:
        for pid in pids:
            metrics.forget(pid)
    finally:
        folding.set()
        scraper.join(timeout=30)
    assert not errors
    assert seen and set(seen) == {78}  # 1 + 2 + ... + 12, in every scrape
