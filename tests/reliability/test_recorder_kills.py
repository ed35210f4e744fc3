"""The job log's recorder is SIGKILLed over and over while jobs run: the log still equals
what the handlers did. 0 jobs missing, 0 doubled, 0 in a wrong state or attempt.

Worker processes (``amqp-jobs worker --events``) run JOBS jobs of four kinds: most succeed
at once, some fail once and succeed on attempt 2, some fail both attempts and end dead,
some are discarded; every handler appends (job id, attempt, outcome) to its own ledger
before it returns or raises. Recorders run as their own processes (``amqp-jobs
recorder``) into a SQLite file, or a PostgreSQL database the test creates and drops.

The jobs are published in KILLS + 1 chunks, one per round; in each round the leading
recorder is SIGKILLed once the log holds a random share (KILL_AT) of that chunk's
events, so every leader has written part of the log and dies while events flow in,
wherever it is (between batches, in a transaction, acking). In every other round a
standby is already waiting and takes over; in the others a fresh recorder starts after
the kill. Once the workers are done, a marker closes the stream and a last recorder
catches up with it; then every job of the ledger must be in the log exactly once, in
the state and at the attempt its ledger says, with one attempts row per attempt that
ran, in that attempt's state.

It runs on a private node, not the shared broker: 10,000 jobs with events (2.4 events a
job, into a stream) keep a 2-core machine busy for half a minute, which would skew the
timing of whatever else runs on the shared broker, and the node, stream included, is
thrown away afterwards. Only recorder processes are killed, never a broker.

The full run (FULL_JOBS jobs, FULL_KILLS kills: 30-50 s a store, plus the node's start)
runs with ``AMQP_JOBS_SOAK=1``; without it, a shorter run (SHORT_JOBS jobs, SHORT_KILLS
kills) proves the same on a smaller scale.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from pydantic import BaseModel

from amqp_jobs import Discard, Job, JobApp, JobContext, RetryPolicy
from amqp_jobs.joblog import JobLog
from amqp_jobs.testing import Namespace
from amqp_jobs.topology import events_exchange, events_stream, work_queue
from tests.reliability.harness import REPORTS
from tests.reliability.nodes import PrivateNode
from tests.support import ROOT, WorkerProcess, channel, eventually, queue_count

SOAK = os.environ.get("AMQP_JOBS_SOAK", "").lower() in ("1", "true", "yes")
#: The full proof (AMQP_JOBS_SOAK=1), and the shorter run of every `make test`.
FULL_JOBS, FULL_KILLS = 10_000, 20
SHORT_JOBS, SHORT_KILLS = 2_000, 6
JOBS, KILLS = (FULL_JOBS, FULL_KILLS) if SOAK else (SHORT_JOBS, SHORT_KILLS)
WORKERS = 2
CONCURRENCY = 16
MAX_ATTEMPTS = 2
#: Out of every 20 jobs: how many of each kind (the rest succeed at once).
RETRIED, DEAD, DISCARDED = 3, 1, 1
#: Bounds: a recorder to lead or stand by; the stream to reach a kill's step; the end.
LEAD_TIMEOUT = 30.0
STEP_TIMEOUT = 120.0
DRAIN_TIMEOUT = 300.0 if SOAK else 120.0
CATCH_UP_TIMEOUT = 120.0
#: Where in its round's chunk of events a leader is killed (a random share, seeded).
KILL_AT = (0.2, 0.8)
SEED = 20
#: How many job rows to read back one by one through JobLog.get (with attempts).
SAMPLE = 200

pytestmark = pytest.mark.timeout(900 if SOAK else 300)

APP = "tests.reliability.test_recorder_kills:app"

# -- the app the worker processes run (namespace from $REL_NS, ledger at $REL_LOG) -----

app = JobApp(os.environ.get("REL_NS", "rk"))


class Step(BaseModel):
    n: int
    kind: str  # "ok", "retried", "dead" or "discarded"


step = Job(
    "rk.step", Step, queue="rk", retry=RetryPolicy(max_attempts=MAX_ATTEMPTS, backoff=0), timeout=30
)
_ledger: int | None = None


def note(ctx: JobContext, outcome: str) -> None:
    """One ledger line per attempt, written (O_APPEND, one write) before the handler ends."""
    global _ledger
    if _ledger is None:
        _ledger = os.open(os.environ["REL_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(_ledger, f"{ctx.job_id} {ctx.attempt} {outcome}\n".encode())


@app.handler(step)
async def run_step(args: Step, ctx: JobContext) -> dict[str, int]:
    if args.kind == "discarded":
        note(ctx, "discarded")
        raise Discard("not wanted")
    if args.kind == "dead" or (args.kind == "retried" and ctx.attempt == 1):
        note(ctx, "failed")
        raise RuntimeError(f"attempt {ctx.attempt} of job {args.n} fails")
    note(ctx, "ok")
    return {"n": args.n}


def kind_of(n: int) -> str:
    i = n % 20
    if i < RETRIED:
        return "retried"
    if i < RETRIED + DEAD:
        return "dead"
    if i < RETRIED + DEAD + DISCARDED:
        return "discarded"
    return "ok"


#: (final state, attempts) of each kind, and the events a job of it publishes.
PLANNED = {
    "ok": ("succeeded", 1),
    "retried": ("succeeded", 2),
    "dead": ("dead", 2),
    "discarded": ("discarded", 1),
}


def events_of(kind: str) -> int:
    return 2 * PLANNED[kind][1]  # started (--started-after 0) and the end, per attempt


# -- the ledger: what the handlers did ------------------------------------------------


def read_ledger(path: Path) -> dict[str, dict[int, list[str]]]:
    """job id -> attempt -> outcomes written for it (more than one: it ran twice)."""
    runs: dict[str, dict[int, list[str]]] = {}
    if not path.exists():
        return runs
    for line in path.read_text().splitlines():
        job_id, attempt, outcome = line.split()
        runs.setdefault(job_id, {}).setdefault(int(attempt), []).append(outcome)
    return runs


def attempt_state(attempt: int, outcome: str) -> str:
    if outcome == "ok":
        return "succeeded"
    if outcome == "discarded":
        return "discarded"
    return "retrying" if attempt < MAX_ATTEMPTS else "dead"


@dataclass(frozen=True)
class Expected:
    state: str
    attempt: int
    attempts: dict[int, str]  # attempt -> its state


def expected_of(runs: dict[int, list[str]]) -> Expected:
    attempts = {a: attempt_state(a, outcomes[-1]) for a, outcomes in runs.items()}
    last = max(attempts)
    return Expected(attempts[last], last, attempts)


def finished(runs: dict[int, list[str]]) -> bool:
    return expected_of(runs).state != "retrying"


# -- the store, read behind the recorders' backs ----------------------------------------

FINAL = ("succeeded", "dead", "discarded")


class Peek:
    """Reads a store's tables directly, behind the recorders' backs: the position, every
    job row, every attempts row."""

    def __init__(self, store_url: str, namespace: str) -> None:
        self.url = store_url
        self.ns = namespace
        self._pg: Any = None  # one asyncpg connection, kept for the polls

    async def _query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        """Rows of ``sql`` (parameters as $1); none while the tables do not exist yet."""
        if self.url.startswith("sqlite:///"):
            path = Path(self.url.removeprefix("sqlite:///"))
            query = sql.replace("$1", "?")
            return await asyncio.get_running_loop().run_in_executor(
                None, _sqlite_rows, path, query, params
            )
        import asyncpg

        if self._pg is None:
            self._pg = await asyncpg.connect(self.url, timeout=10)
        try:
            return [tuple(r) for r in await self._pg.fetch(sql, *params, timeout=10)]
        except asyncpg.UndefinedTableError:
            return []

    async def close(self) -> None:
        if self._pg is not None:
            await self._pg.close()
            self._pg = None

    async def position(self) -> int | None:
        rows = await self._query(
            "SELECT stream_offset FROM amqp_jobs_recorder WHERE ns = $1", self.ns
        )
        return None if not rows else int(rows[0][0])

    async def jobs(self) -> list[tuple[Any, ...]]:
        """(id, state, attempt, replays) of every job row of the namespace."""
        return await self._query(
            "SELECT id, state, attempt, replays FROM amqp_jobs WHERE ns = $1", self.ns
        )

    async def attempts(self) -> list[tuple[Any, ...]]:
        """(job id, replays, attempt, state) of every attempts row of the namespace."""
        return await self._query(
            "SELECT job_id, replays, attempt, state FROM amqp_jobs_attempts WHERE ns = $1",
            self.ns,
        )


def _sqlite_rows(path: Path, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    if not path.exists():
        return []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return db.execute(sql, params).fetchall()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return []
        raise
    finally:
        db.close()


# -- recorder processes -------------------------------------------------------------


#: What a recorder logs when it takes the lead (standing by, it logs "another recorder
#: leads ...; standing by").
LEADS = "amqp_jobs.recorder: recorder leads "


class RecorderProcess:
    """``amqp-jobs recorder`` in a child process, its log in a file."""

    def __init__(self, number: int, store_url: str, ns: Namespace, directory: Path) -> None:
        self.number = number
        self.output_path = directory / f"recorder-{number}.out"
        with open(self.output_path, "w") as out:
            command = [sys.executable, "-m", "amqp_jobs.cli", "recorder", "--store", store_url]
            command += ["--url", ns.url, "--namespace", ns.name, "--log-level", "INFO"]
            self.proc = subprocess.Popen(
                command,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def output(self) -> str:
        try:
            return self.output_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def leads(self) -> int:
        """How often it took the lead (its log says so each time)."""
        return self.output().count(LEADS)

    def lead_offset(self) -> int:
        """The stream offset its latest lead read from (what the log held then)."""
        line = self.output().rpartition(LEADS)[2]
        offset = line.split("from stream offset ", 1)[1].split()[0]
        return 0 if offset == "first" else int(offset)

    def standing_by(self) -> bool:
        return "standing by" in self.output()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(15)

    async def stop(self) -> None:
        """SIGTERM (a clean stop); SIGKILL if it does not end within 20 s."""
        if not self.alive():
            return
        self.proc.send_signal(signal.SIGTERM)
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.run_in_executor(None, self.proc.wait), 20)
        except TimeoutError:
            self.proc.kill()
            self.proc.wait(10)

    def stop_now(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait(10)


@dataclass
class Recorders:
    store_url: str
    ns: Namespace
    directory: Path
    all: list[RecorderProcess] = field(default_factory=list)
    kills: int = 0
    #: leads taken by a recorder that was standing by when the leader was killed
    standby_takeovers: int = 0
    #: seconds from a kill to the next recorder leading
    takeover_seconds: list[float] = field(default_factory=list)
    #: events each killed leader wrote while it led (its successor read on from there)
    written: list[int] = field(default_factory=list)

    def start(self) -> RecorderProcess:
        recorder = RecorderProcess(len(self.all), self.store_url, self.ns, self.directory)
        self.all.append(recorder)
        return recorder

    def alive(self) -> list[RecorderProcess]:
        return [r for r in self.all if r.alive()]

    def leader(self) -> RecorderProcess | None:
        leading = [r for r in self.alive() if r.leads() > 0]
        assert len(leading) <= 1, f"two live recorders say they lead: {leading}"
        return leading[0] if leading else None

    async def until_one_leads(self) -> RecorderProcess:
        await eventually(
            lambda: self.leader() is not None,
            timeout=LEAD_TIMEOUT,
            what=f"a recorder to lead ({self.tail()})",
        )
        leader = self.leader()
        assert leader is not None
        return leader

    def tail(self) -> str:
        dead = [r for r in self.all if not r.alive() and r.proc.returncode != -signal.SIGKILL]
        if dead:
            return f"recorder {dead[0].number} exited: {dead[0].output()[-3000:]}"
        return "no recorder exited by itself"

    def leads(self) -> int:
        return sum(r.leads() for r in self.all)

    async def stop(self) -> None:
        for recorder in self.all:
            await recorder.stop()

    def stop_now(self) -> None:
        for recorder in self.all:
            recorder.stop_now()


# -- the scenario -------------------------------------------------------------------


@pytest.fixture
def node(private_broker: PrivateNode) -> PrivateNode:
    return private_broker


PG_URL = os.environ.get("AMQP_JOBS_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


@dataclass
class Figures:
    store: str
    jobs: int
    events: int
    kills: int
    leads: int
    standby_takeovers: int
    worst_takeover: float
    per_lead: str
    missing: int
    doubled: int
    wrong: int
    seconds: float

    def line(self) -> str:
        return (
            f"{'recorder SIGKILLed under load (' + self.store + ')':<48} jobs {self.jobs:>5}"
            f"  events {self.events:>5}  kills {self.kills}  leads {self.leads}"
            f"  standby takeovers {self.standby_takeovers}"
            f"  worst takeover {self.worst_takeover:.1f}s  events per lead {self.per_lead}"
            f"  missing {self.missing}"
            f"  doubled {self.doubled}  wrong {self.wrong}  {self.seconds:6.1f}s"
        )


MARKER = b"the end of the test's events"


async def mark_the_end(ns: Namespace, near: int) -> int:
    """Publish MARKER (not an event: a recorder skips it) after the last event, and
    return its stream offset: the number of events before it. ``near``: where to start
    reading the stream (the stream resumes at the start of the chunk holding it)."""
    async with channel(ns.url) as ch:
        exchange = await ch.get_exchange(events_exchange(ns.name))
        await exchange.publish(aio_pika.Message(MARKER, message_id="marker"), routing_key="end")
        await ch.set_qos(prefetch_count=1000)
        stream = await ch.get_queue(events_stream(ns.name), ensure=False)
        async with asyncio.timeout(30):
            async with stream.iterator(arguments={"x-stream-offset": max(0, near)}) as deliveries:
                async for delivery in deliveries:
                    await delivery.ack()
                    if delivery.body == MARKER:
                        return int(delivery.headers["x-stream-offset"])  # type: ignore[arg-type]
    raise AssertionError("the stream ended before the marker")


async def test_recorder_killed_again_and_again_under_load(
    node: PrivateNode, ns: Namespace, store_url: str, tmp_path: Path
) -> None:
    began = time.monotonic()
    store = "sqlite" if store_url.startswith("sqlite") else "postgres"
    ledger_path = tmp_path / "ledger.txt"
    peek = Peek(store_url, ns.name)
    loop = asyncio.get_running_loop()
    ns.track(step)
    kinds = [kind_of(n) for n in range(JOBS)]
    size = -(-JOBS // (KILLS + 1))
    chunks = [range(start, min(start + size, JOBS)) for start in range(0, JOBS, size)]
    assert len(chunks) == KILLS + 1
    events_in = [sum(events_of(kinds[n]) for n in chunk) for chunk in chunks]
    events_before = [sum(events_in[:i]) for i in range(len(chunks))]

    recorders = Recorders(store_url, ns, tmp_path)
    workers: list[WorkerProcess] = []
    rng = random.Random(SEED)
    ids: list[str] = []
    try:
        recorders.start()
        await recorders.until_one_leads()  # it declares the events exchange and stream
        for _ in range(WORKERS):
            options = ["--events", "--started-after", "0", "--no-success-log"]
            options += ["--concurrency", str(CONCURRENCY)]
            workers.append(WorkerProcess(ns, ledger_path, *options, app=APP))
        async with ns.client() as client:

            async def publish(chunk: range) -> None:
                items = [{"n": n, "kind": kinds[n]} for n in chunk]
                ids.extend(await client.enqueue_many(step, items))

            # Round i publishes chunk i - 1, and kills the leader once the log holds a
            # random share (KILL_AT) of that chunk's events: while events flow in.
            for i, chunk in enumerate(chunks[:-1], start=1):
                leader = await recorders.until_one_leads()
                standby = None
                if i % 2 == 0:
                    standby = recorders.start()
                    await eventually(
                        standby.standing_by,
                        timeout=LEAD_TIMEOUT,
                        what=f"recorder {standby.number} to stand by ({recorders.tail()})",
                    )
                await publish(chunk)
                target = events_before[i - 1] + int(rng.uniform(*KILL_AT) * events_in[i - 1])

                async def reached(target: int = target) -> bool:
                    position = await peek.position()
                    return position is not None and position + 1 >= target

                await eventually(
                    reached,
                    timeout=STEP_TIMEOUT,
                    interval=0.01,
                    what=f"the log to reach event {target} before kill {i} ({recorders.tail()})",
                )
                await loop.run_in_executor(None, leader.kill)
                killed_at = time.monotonic()
                recorders.kills += 1
                if standby is None:
                    recorders.start()
                successor = await recorders.until_one_leads()
                recorders.takeover_seconds.append(time.monotonic() - killed_at)
                recorders.written.append(successor.lead_offset() - leader.lead_offset())
                if successor is standby:
                    recorders.standby_takeovers += 1
            await publish(chunks[-1])
        planned = {job_id: kinds[n] for n, job_id in enumerate(ids)}

        # the workers finish every job; then they stop, so the stream is complete
        def all_done() -> bool:
            runs = read_ledger(ledger_path)
            return len(runs) == JOBS and all(finished(r) for r in runs.values())

        await eventually(all_done, timeout=DRAIN_TIMEOUT, interval=0.5, what="every job to end")
        await eventually(
            lambda: _equals(queue_count(ns.url, work_queue(ns.name, "rk")), 0),
            timeout=30,
            what="the work queue to empty",
        )
        for worker in workers:
            worker.signal(signal.SIGTERM)
        for worker in workers:
            assert await worker.wait(30) == 0, worker.output()[-3000:]
        # the stream is complete: mark its end, and let the last recorder reach the mark
        ran = sum(len(o) for r in read_ledger(ledger_path).values() for o in r.values())
        length = await mark_the_end(ns, 2 * ran - 100)
        await recorders.until_one_leads()

        async def caught_up() -> bool:
            return await peek.position() == length

        await eventually(
            caught_up,
            timeout=CATCH_UP_TIMEOUT,
            interval=0.1,
            what=f"the log to reach the end of the stream at offset {length}",
        )
        await recorders.stop()
    finally:
        for worker in workers:
            worker.stop_now()
        recorders.stop_now()
        await peek.close()

    runs = read_ledger(ledger_path)
    expected = {job_id: expected_of(r) for job_id, r in runs.items()}
    # the workers did what the plan says (else the ledger, not the log, is off)
    assert set(runs) == set(ids), "every job ran"
    not_planned = {
        job_id: (e.state, e.attempt)
        for job_id, e in expected.items()
        if (e.state, e.attempt) != PLANNED[planned[job_id]]
    }
    assert not not_planned, f"jobs that did not run as planned: {list(not_planned.items())[:5]}"
    ran_twice = [job_id for job_id, r in runs.items() if any(len(o) > 1 for o in r.values())]

    try:
        jobs, attempts = await peek.jobs(), await peek.attempts()
    finally:
        await peek.close()
    listed = Counter(job_id for job_id, *_ in jobs)
    rows = {job_id: (state, attempt, replays) for job_id, state, attempt, replays in jobs}
    attempt_rows: dict[str, dict[int, str]] = {}
    doubled_attempts = 0
    for job_id, _replays, attempt, state in attempts:
        per_job = attempt_rows.setdefault(job_id, {})
        doubled_attempts += attempt in per_job
        per_job[attempt] = state

    missing = [job_id for job_id in expected if job_id not in rows]
    doubled = [job_id for job_id, count in listed.items() if count > 1]
    doubled += [job_id for job_id in rows if job_id not in expected]  # never ran
    doubled += [
        job_id
        for job_id, per_job in attempt_rows.items()
        if job_id in expected and set(per_job) - set(expected[job_id].attempts)
    ]  # an attempt recorded that no handler ran
    wrong = [
        job_id
        for job_id, e in expected.items()
        if job_id in rows
        and (rows[job_id] != (e.state, e.attempt, 0) or attempt_rows.get(job_id, {}) != e.attempts)
    ]
    figures = Figures(
        store=store,
        jobs=len(expected),
        events=length,
        kills=recorders.kills,
        leads=recorders.leads(),
        standby_takeovers=recorders.standby_takeovers,
        worst_takeover=max(recorders.takeover_seconds, default=0.0),
        per_lead=f"{min(recorders.written, default=0)}-{max(recorders.written, default=0)}",
        missing=len(missing),
        doubled=len(doubled) + doubled_attempts,
        wrong=len(wrong),
        seconds=time.monotonic() - began,
    )
    REPORTS.append(figures.line())
    print(figures.line())
    if ran_twice:
        print(f"{len(ran_twice)} attempts ran twice (a redelivery), e.g. {ran_twice[:3]}")
    assert length == 2 * ran, "every attempt published its two events, once"
    assert recorders.kills == KILLS
    assert min(recorders.written) > 0, "every leader was killed at work"
    assert recorders.standby_takeovers == KILLS // 2, "every standby took over"
    assert not missing, f"missing from the log: {missing[:5]}"
    assert not doubled and not doubled_attempts, f"doubled in the log: {doubled[:5]}"
    assert not wrong, "wrong in the log: " + ", ".join(
        f"{j} has {rows[j]} {attempt_rows.get(j)}, expected {expected[j]}" for j in wrong[:5]
    )

    # JobLog, as users read it, agrees with the tables on a sample
    async with JobLog(store_url, ns.name) as joblog:
        for state in FINAL:
            listed_ids = {r.job_id for r in await joblog.list(state=state, limit=10_000)}
            assert listed_ids == {j for j, e in expected.items() if e.state == state}, state
        for job_id in list(expected)[:: max(1, JOBS // SAMPLE)]:
            record = await joblog.get(job_id)
            assert record is not None, job_id
            e = expected[job_id]
            assert (record.state, record.attempt) == (e.state, e.attempt), job_id
            assert {a.attempt: a.state for a in record.attempts} == e.attempts, job_id


async def _equals(value: Any, expected: int) -> bool:
    return bool((await value) == expected)
