"""What lifecycle events and the job log cost: the same drain with events off, with
events on, and with events on while a recorder writes them to a store.

    python -m bench.events_cost [--jobs N] [--runs R] [--store sqlite|postgres]

Each run drains N queued no-op jobs with a worker process (the drain benchmark's child,
at the default concurrency), in alternating order; ``events + recorder`` runs a
recorder process into a fresh store beside the worker and also reports how long after
the drain the log held every job (the recorder's lag). Prints jobs/s and the ratio to
events off. The issue's bar: events must not double the cost of a job.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from amqp_jobs.worker import DEFAULT_CONCURRENCY
from bench.common import URL, cleanup, namespace
from bench.run import ROOT, drain_child, fill

PG_URL = os.environ.get("AMQP_JOBS_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def start_recorder(ns: str, store: str, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "amqp_jobs.cli", "recorder", "--store", store,
         "--namespace", ns, "--url", URL, "--log-level", "WARNING"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )  # fmt: skip


async def succeeded(store: str, ns: str) -> int:
    """Succeeded jobs of ``ns`` in the store (its table, read directly)."""
    sql = "SELECT count(*) FROM amqp_jobs WHERE ns = {} AND state = 'succeeded'"
    if store.startswith("sqlite:///"):
        return _sqlite_count(store.removeprefix("sqlite:///"), sql.format("?"), ns)
    import asyncpg

    conn = await asyncpg.connect(store, timeout=10)
    try:
        return int(await conn.fetchval(sql.format("$1"), ns))
    except asyncpg.UndefinedTableError:
        return 0
    finally:
        await conn.close()


def _sqlite_count(path: str, sql: str, ns: str) -> int:
    if not Path(path).exists():
        return 0
    with sqlite3.connect(path, timeout=10) as db:
        try:
            return int(db.execute(sql, (ns,)).fetchone()[0])
        except sqlite3.OperationalError:  # no table yet
            return 0


async def recorded(store: str, ns: str, n: int, timeout: float = 120.0) -> float:
    """Seconds until the store holds ``n`` succeeded jobs of ``ns``."""
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        if await succeeded(store, ns) >= n:
            return time.monotonic() - began
        await asyncio.sleep(0.1)
    raise TimeoutError(f"the recorder did not record {n} jobs within {timeout:.0f}s")


async def pg_database() -> tuple[str, str]:
    import asyncpg

    name = f"amqp_jobs_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(PG_URL, timeout=10)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return PG_URL.rsplit("/", 1)[0] + f"/{name}", name


async def drop_pg(name: str) -> None:
    import asyncpg

    admin = await asyncpg.connect(PG_URL, timeout=10)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def one_run(mode: str, n: int, kind: str, tmp: Path) -> dict[str, Any]:
    ns = namespace("events")
    recorder = None
    pg_name = None
    try:
        await fill(ns, n)
        store = ""
        if mode == "events+recorder":
            if kind == "postgres":
                store, pg_name = await pg_database()
            else:
                store = f"sqlite:///{tmp / (ns + '.db')}"
            recorder = start_recorder(ns, store, tmp / "recorder.log")
        child = "worker" if mode == "off" else "worker-events"
        loop = asyncio.get_running_loop()
        times = await loop.run_in_executor(None, drain_child, child, ns, n, DEFAULT_CONCURRENCY)
        out: dict[str, Any] = {"rate": n / (times["done"] - times["spawned"])}
        if recorder is not None:
            out["lag"] = await recorded(store, ns, n)
        return out
    finally:
        if recorder is not None:
            recorder.send_signal(signal.SIGTERM)
            try:
                recorder.wait(30)
            except subprocess.TimeoutExpired:
                recorder.kill()
        await cleanup(ns, {"bench"})
        if pg_name is not None:
            await drop_pg(pg_name)


async def bench_events(n: int, runs: int, kind: str = "sqlite") -> dict[str, Any]:
    """Drain rates with events off, on, and on with a recorder; ratios to off."""
    modes = ["off", "events", "events+recorder"]
    rates: dict[str, list[float]] = {m: [] for m in modes}
    lags: list[float] = []
    with tempfile.TemporaryDirectory(prefix="amqp-jobs-events-") as tmp:
        for run in range(runs):
            order = modes if run % 2 == 0 else list(reversed(modes))
            for mode in order:
                got = await one_run(mode, n, kind, Path(tmp))
                rates[mode].append(got["rate"])
                if "lag" in got:
                    lags.append(got["lag"])
    base = statistics.median(rates["off"])
    return {
        "jobs": n,
        "store": kind,
        "rates": rates,
        "ratio_events": statistics.median(rates["events"]) / base,
        "ratio_recorder": statistics.median(rates["events+recorder"]) / base,
        "recorder_lag_s": lags,
    }


def report_line(r: dict[str, Any]) -> str:
    rates = {mode: statistics.median(values) for mode, values in r["rates"].items()}
    return (
        f"events: drain {r['jobs']:,} jobs {rates['off']:,.0f} jobs/s off, {rates['events']:,.0f}"
        f" with events ({r['ratio_events']:.2f}x), {rates['events+recorder']:,.0f} with a"
        f" recorder into {r['store']} ({r['ratio_recorder']:.2f}x); the log complete"
        f" {statistics.median(r['recorder_lag_s']):.2f} s after the drain"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--store", choices=["sqlite", "postgres"], default="sqlite")
    options = parser.parse_args()
    result = asyncio.run(bench_events(options.jobs, options.runs, options.store))
    print(report_line(result))


if __name__ == "__main__":
    main()
