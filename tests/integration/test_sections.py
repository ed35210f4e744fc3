"""Critical sections: at most N jobs of a group run at once per key, across job types and
workers; a job turned away is deferred without counting an attempt; a holder whose
connection closes frees its section at once. On RabbitMQ and memory:// alike."""

import asyncio
import logging
import random
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from pydantic import BaseModel

from amqp_jobs import Job, JobApp, JobClient, JobContext, RetryPolicy, Worker
from amqp_jobs.errors import AmqpJobsError, ConnectionLostError, ContractError, Defer
from amqp_jobs.sections import MAX_HAND_OVERS, CriticalSections, lock_names
from amqp_jobs.testing import Namespace
from amqp_jobs.transport import Session, transport_for
from tests.support import eventually, running


class UserArgs(BaseModel):
    user_id: int
    n: int


RECONCILE = Job("finance.reconcile", UserArgs, queue="finance", key="user_id", exclusive="finance")
IMPORT = Job("finance.import", UserArgs, queue="finance", key="user_id", exclusive="finance")
PAIRS = Job(
    "finance.pairs", UserArgs, queue="pairs", key="user_id", exclusive="pairs", exclusive_limit=2
)


class Ledger:
    """Who ran, and how many of one key ran at once at most."""

    def __init__(self) -> None:
        self.running: Counter[str] = Counter()
        self.most: Counter[str] = Counter()
        self.ran: list[tuple[str, int, int]] = []  # (key, n, attempt)

    async def run(self, ctx: JobContext, n: int) -> None:
        key = ctx.key or "?"
        self.running[key] += 1
        self.most[key] = max(self.most[key], self.running[key])
        try:
            await asyncio.sleep(random.uniform(0.005, 0.03))  # the job's work
        finally:
            self.running[key] -= 1
        self.ran.append((key, n, ctx.attempt))


async def run_jobs(
    ns: Namespace,
    app: JobApp,
    enqueue: Callable[[JobClient], Awaitable[None]],
    ledger: Ledger,
    n: int,
) -> Worker:
    """A worker at concurrency 16 runs what ``enqueue`` publishes, until ``n`` ran."""
    async with running(ns.worker(app, concurrency=16), start_within=10) as worker:
        async with ns.client() as client:
            await enqueue(client)
        await eventually(lambda: len(ledger.ran) == n, timeout=60, what=f"{n} jobs")
    return worker


async def test_one_job_per_key_runs_at_once_across_job_types(namespace: Namespace) -> None:
    ledger = Ledger()
    app = namespace.app()

    @app.handler(RECONCILE)
    async def reconcile(args: UserArgs, ctx: JobContext) -> None:
        await ledger.run(ctx, args.n)

    @app.handler(IMPORT)
    async def import_(args: UserArgs, ctx: JobContext) -> None:
        await ledger.run(ctx, args.n)

    async def enqueue(client: JobClient) -> None:
        # each key shared by both job types; a batch each, so that they contend
        # however slowly this machine publishes
        for job, first in ((IMPORT, 0), (RECONCILE, 1)):
            await client.enqueue_many(
                job, [{"user_id": (n // 2) % 4, "n": n} for n in range(first, 40, 2)]
            )

    worker = await run_jobs(namespace, app, enqueue, ledger, 40)
    assert sorted(n for _, n, _ in ledger.ran) == list(range(40))  # each once
    assert max(ledger.most.values()) == 1, ledger.most
    assert all(attempt == 1 for _, _, attempt in ledger.ran)  # waiting is not an attempt
    assert worker.sections is not None and worker.sections.turned_away > 0  # contention
    assert worker.stats.deferred == worker.sections.turned_away


async def test_a_limit_of_two_lets_two_in_and_never_three(namespace: Namespace) -> None:
    ledger = Ledger()
    app = namespace.app()

    @app.handler(PAIRS)
    async def pairs(args: UserArgs, ctx: JobContext) -> None:
        await ledger.run(ctx, args.n)

    async def enqueue(client: JobClient) -> None:
        await client.enqueue_many(PAIRS, [{"user_id": 7, "n": n} for n in range(30)])

    await run_jobs(namespace, app, enqueue, ledger, 30)
    assert ledger.most["7"] == 2, ledger.most


async def test_a_section_this_worker_holds_is_handed_over_without_a_deferral(
    namespace: Namespace,
) -> None:
    """User 1's second job arrives while the worker runs the first: it waits its turn
    in the worker (not in a slot), and the first hands it the lock as it ends, with no
    deferral and no broker round trip for either."""
    ran: list[str] = []
    first_running = asyncio.Event()
    app = namespace.app()

    @app.handler(RECONCILE)
    async def reconcile(args: UserArgs) -> None:
        ran.append(f"start {args.n}")
        if args.n == 0:
            first_running.set()
            await eventually(lambda: sections.waiting == 1, timeout=15, what="the 2nd waiting")
        ran.append(f"end {args.n}")

    worker = namespace.worker(app, concurrency=4)
    sections = worker.sections
    assert sections is not None
    sections.local_wait = 30  # however slow this machine, the test's own gate decides
    async with running(worker, start_within=10):
        async with namespace.client() as client:
            await client.enqueue(RECONCILE, {"user_id": 1, "n": 0})
            await asyncio.wait_for(first_running.wait(), 15)
            await client.enqueue(RECONCILE, {"user_id": 1, "n": 1})
        await eventually(lambda: len(ran) == 4, timeout=15, what="both jobs")
    assert ran == ["start 0", "end 0", "start 1", "end 1"]
    assert (sections.entered, sections.handed_over, sections.turned_away) == (2, 1, 0)
    assert worker.stats.deferred == 0
    await assert_nothing_left(sections)


async def test_a_lock_handed_over_takes_its_holders_slot_ahead_of_the_queue(
    namespace: Namespace,
) -> None:
    """One slot: user 1's first job runs, its second waits its turn, and a
    high-priority job waits for the slot. The second is handed the lock and the slot
    with it; the high-priority job runs after (given the slot first, it would have
    left the lock held and idle)."""
    note = Job("finance.note", UserArgs, queue="finance")
    ran: list[str] = []
    first_running = asyncio.Event()
    app = namespace.app()

    @app.handler(RECONCILE)
    async def reconcile(args: UserArgs) -> None:
        if args.n == 0:
            first_running.set()
            await eventually(
                lambda: sections.waiting == 1 and worker.stats.received == 3,
                timeout=15,
                what="the 2nd waiting its turn, the high-priority job for the slot",
            )
        ran.append(f"reconcile {args.n}")

    @app.handler(note)
    async def take_note(args: UserArgs) -> None:
        ran.append("note")

    # with events, twice as many deliveries as slots: the second job gets here
    worker = namespace.worker(app, concurrency=1, events=True)
    sections = worker.sections
    assert sections is not None
    sections.local_wait = 30
    async with running(worker, start_within=10):
        async with namespace.client() as client:
            await client.enqueue(RECONCILE, {"user_id": 1, "n": 0})
            await asyncio.wait_for(first_running.wait(), 15)
            await client.enqueue(RECONCILE, {"user_id": 1, "n": 1})
            await client.enqueue(note, {"user_id": 2, "n": 2}, priority="high")
        await eventually(lambda: len(ran) == 3, timeout=15, what="all three")
    assert ran == ["reconcile 0", "reconcile 1", "note"]
    assert (sections.handed_over, sections.turned_away) == (1, 0)
    await assert_nothing_left(sections)


async def assert_nothing_left(sections: CriticalSections) -> None:
    """No lock is held, handed over or waited for once every job is done (and the
    locks its jobs were done with are freed: that happens in the background)."""
    await sections.freed(timeout=10)
    assert not sections._held and not sections._granted and not sections._chains
    assert not sections._aside and sections.waiting == 0


def job_context(job: Job[UserArgs], n: int, key: str) -> JobContext:
    log = logging.LoggerAdapter(logging.getLogger("test"), {})
    return JobContext(job, f"job-{n}", 1, job.queue, None, None, log, key=key)


@asynccontextmanager
async def two_sessions(
    namespace: Namespace, first: str = "a", second: str = "b"
) -> AsyncIterator[tuple[Session, Session]]:
    """Two sessions (connections) on the namespace's broker, closed on the way out."""
    transport = transport_for(namespace.url)
    one = await transport.session(name=first, give_up_after=10)
    try:
        two = await transport.session(name=second, give_up_after=10)
        try:
            yield one, two
        finally:
            await two.close()
    finally:
        await one.close()


@asynccontextmanager
async def sections_and_another(
    namespace: Namespace,
) -> AsyncIterator[tuple[CriticalSections, Session]]:
    """A worker's sections on a session of their own (hand-overs waited for up to 30 s,
    however slow this machine), and another session to try its locks from."""
    async with two_sessions(namespace, "worker", "other") as (session, other):
        sections = CriticalSections(namespace.name)
        sections.local_wait = 30
        sections.attach(session)
        yield sections, other


async def hand_on(
    sections: CriticalSections, holder: JobContext, waiter: JobContext | None
) -> asyncio.Task[None] | None:
    """``holder``'s attempt, during which ``waiter`` (if any) comes to wait its turn:
    the waiter's wait, done, once the attempt is."""
    waiting = None

    async def work() -> None:
        nonlocal waiting
        if waiter is not None:
            waiting = asyncio.create_task(sections.wait_turn(waiter))
            await eventually(lambda: sections.waiting == 1, timeout=10, what="waiting")

    await asyncio.wait_for(sections.attempt(holder, work), 15)
    if waiting is not None:
        await asyncio.wait_for(waiting, 10)
    return waiting


async def test_a_lock_handed_to_a_job_that_never_runs_is_given_back(
    namespace: Namespace,
) -> None:
    """Handed over to a job whose attempt never came (its worker stopping): ``forfeit``
    frees it for everyone else; until then it stays held."""
    first, second = job_context(RECONCILE, 0, "9"), job_context(RECONCILE, 1, "9")
    (lock,) = lock_names(namespace.name, "finance", "9", 1)
    async with sections_and_another(namespace) as (sections, other):
        await hand_on(sections, first, second)
        assert sections.is_granted(second)
        assert not await other.claim(lock), "handed over, so still held"
        sections.forfeit(second)
        await eventually(lambda: other.claim(lock), timeout=5, what="the lock given back")
        await assert_nothing_left(sections)


async def test_a_job_does_not_wait_for_its_section_to_be_freed(
    namespace: Namespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The attempt returns (its job settles, its slot frees) while the lock's free is
    still on its way; until it is through, the lock stays held for everyone."""
    job = job_context(RECONCILE, 0, "12")
    (lock,) = lock_names(namespace.name, "finance", "12", 1)
    async with sections_and_another(namespace) as (sections, other):
        session = sections._session
        assert session is not None
        real_release = session.release
        let_go = asyncio.Event()

        async def slow_release(name: str) -> None:
            await let_go.wait()
            await real_release(name)

        monkeypatch.setattr(session, "release", slow_release)
        ran = asyncio.Event()

        async def run() -> None:
            ran.set()

        try:
            await asyncio.wait_for(sections.attempt(job, run), 10)
            assert ran.is_set()
            assert not await other.claim(lock), "held until its free is through"
        finally:
            let_go.set()
        await eventually(lambda: other.claim(lock), timeout=5, what="the lock freed")
        await assert_nothing_left(sections)


async def test_a_lock_goes_back_to_the_broker_after_a_run_of_hand_overs(
    namespace: Namespace,
) -> None:
    """However many jobs of a key a worker has, MAX_HAND_OVERS of them hold its lock in
    a row; then it is freed, and the job waiting its turn steps aside (is deferred), so
    that other workers' jobs of the key get a chance."""
    n = MAX_HAND_OVERS + 1
    jobs = [job_context(RECONCILE, i, "3") for i in range(n)]
    (lock,) = lock_names(namespace.name, "finance", "3", 1)
    async with sections_and_another(namespace) as (sections, other):
        for i in range(n - 1):
            await hand_on(sections, jobs[i], jobs[i + 1])
        assert (sections.entered, sections.handed_over) == (MAX_HAND_OVERS, MAX_HAND_OVERS - 1)
        # freed in the background: sent before this, but another connection's claim
        # may reach the broker first
        await eventually(lambda: other.claim(lock), timeout=5, what="freed after the run")
        with pytest.raises(Defer):
            await sections.attempt(jobs[-1], asyncio.Event().wait)  # never let in
        assert sections.turned_away == 1
        await assert_nothing_left(sections)


async def test_a_lock_is_never_handed_across_limits(namespace: Namespace) -> None:
    """Two job types share a group with limits 2 and 1: the limit-2 jobs hold both
    locks, a limit-1 job waits, and is handed neither (one would let two limit-1 jobs
    run at once): it takes its lock from the broker once they are free."""
    wide = Job(
        "finance.wide",
        UserArgs,
        queue="finance",
        key="user_id",
        exclusive="finance",
        exclusive_limit=2,
    )
    a, b = job_context(wide, 0, "4"), job_context(wide, 1, "4")
    narrow = job_context(RECONCILE, 2, "4")
    inside = asyncio.Event()
    let_go = asyncio.Event()

    async def hold() -> None:
        inside.set()
        await let_go.wait()

    async with sections_and_another(namespace) as (sections, _):
        first = asyncio.create_task(sections.attempt(a, hold))
        await asyncio.wait_for(inside.wait(), 10)
        inside.clear()
        second = asyncio.create_task(sections.attempt(b, hold))
        await asyncio.wait_for(inside.wait(), 10)
        waiting = asyncio.create_task(sections.wait_turn(narrow))
        await eventually(lambda: sections.waiting == 1, timeout=10, what="the narrow waiting")
        let_go.set()
        await asyncio.wait_for(asyncio.gather(first, second, waiting), 10)
        assert not sections.is_granted(narrow)
        ran = asyncio.Event()

        async def run() -> None:
            ran.set()

        await asyncio.wait_for(sections.attempt(narrow, run), 10)
        assert ran.is_set()
        assert (sections.entered, sections.handed_over) == (3, 0)
        await assert_nothing_left(sections)


async def test_a_closed_holder_frees_its_section_at_once(namespace: Namespace) -> None:
    """Another connection holds user 5's section: its job waits, deferred, and runs
    promptly once that connection closes (as a killed worker's does)."""
    ran = asyncio.Event()
    app = namespace.app()

    @app.handler(RECONCILE)
    async def reconcile(args: UserArgs) -> None:
        ran.set()

    holder = await transport_for(namespace.url).session(name="holder", give_up_after=10)
    (lock,) = lock_names(namespace.name, "finance", "5", 1)
    assert await holder.claim(lock)
    try:
        async with running(namespace.worker(app), start_within=10) as worker:
            async with namespace.client() as client:
                await client.enqueue(RECONCILE, {"user_id": 5, "n": 0})
            sections = worker.sections
            assert sections is not None
            await eventually(lambda: sections.turned_away >= 2, timeout=15, what="turned away")
            assert not ran.is_set()
            await holder.close()
            loop = asyncio.get_running_loop()
            closed = loop.time()
            await asyncio.wait_for(ran.wait(), 5)
            # the lock went with the connection (within 1 s); what remains is the
            # deferral's pause, twice if a claim came just before the broker dropped it
            assert loop.time() - closed < 1.0 + 2 * max(sections.retry_after)
    finally:
        await holder.close()


async def test_locks_hold_through_refusals_and_come_back_when_their_queue_is_gone(
    namespace: Namespace,
) -> None:
    """The transport's lock: a refused claim costs the refused session nothing it holds
    (on RabbitMQ the refusal closes a channel), a release lets the other in, and a lock
    whose queue vanished (expired, or deleted) is taken again."""
    x, y = lock_names(namespace.name, "locks", "x", 2)
    async with two_sessions(namespace) as (a, b):
        assert await a.claim(x)
        assert await a.claim(y)
        assert await a.claim(x), "a holder claiming again holds it still"
        assert not await b.claim(x)
        assert not await b.claim(y), "a session still claims after a refusal"
        await a.release(x)
        await eventually(lambda: b.claim(x), timeout=5, what="b taking x once a let go")
        assert not await a.claim(x)
        assert not await b.claim(y), "a's other lock outlived the refusals"
        await a.release(y)
        await a.delete_queue(y)
        assert await a.claim(y), "a lock whose queue is gone is taken on a new one"
        assert not await b.claim(y)


@pytest.mark.rabbitmq_only
async def test_a_keys_first_claim_waits_for_one_answer(
    namespace: Namespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lock queue not used lately is declared unanswered, ahead of the consume on the
    same channel: a key's first claim waits for the broker once, as any other does."""
    import aiormq

    warm, first = lock_names(namespace.name, "locks", "first", 2)
    answered: list[str] = []
    rpc = aiormq.Channel.rpc

    async def counting(channel: aiormq.Channel, frame: Any, timeout: Any = None) -> Any:
        if frame.synchronous and not getattr(frame, "nowait", False):
            answered.append(type(frame).__name__)
        return await rpc(channel, frame, timeout)

    async with two_sessions(namespace) as (session, other):
        assert await session.claim(warm)  # opens a channel for it ...
        await session.release(warm)  # ... kept as a spare: the next claim opens none
        monkeypatch.setattr(aiormq.Channel, "rpc", counting)
        assert await session.claim(first)
        assert answered == ["Consume"], answered
        monkeypatch.undo()
        assert not await other.claim(first), "its queue was declared, and it is held"


@pytest.mark.rabbitmq_only
async def test_a_claim_the_broker_refuses_for_itself_is_an_error_not_taken(
    namespace: Namespace,
) -> None:
    """A lock queue the broker will not declare (a reserved name here; no permission, in
    life), or one declared with other arguments: the claim raises the broker's refusal,
    never reads as "another holds it" (a job would be turned away for ever), and the
    session claims other locks after it."""
    clashing, fine = lock_names(namespace.name, "locks", "refused", 2)
    async with two_sessions(namespace) as (session, other):
        try:
            with pytest.raises(AmqpJobsError, match="refused") as refused:
                await session.claim(f"amq.{namespace.name}.lock")
            assert not isinstance(refused.value, ConnectionLostError)
            await other.declare_queue(clashing, {"x-expires": 120_000})  # not a lock's
            with pytest.raises(AmqpJobsError, match="PRECONDITION_FAILED") as clash:
                await session.claim(clashing)
            assert not isinstance(clash.value, ConnectionLostError)
            assert await session.claim(fine), "the session claims on after both"
            assert not await other.claim(fine)
        finally:
            await other.delete_queue(clashing)


@pytest.mark.rabbitmq_only
async def test_a_lock_lost_while_held_is_reported_as_the_sessions_loss(
    namespace: Namespace,
) -> None:
    """Its queue deleted under it (by hand, or with a cluster node): the holder hears of
    it through on_lost, never runs on unaware beside the next holder."""
    lost: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    (lock,) = lock_names(namespace.name, "locks", "gone", 1)
    async with two_sessions(namespace, "holder", "other") as (holder, other):
        holder.on_lost(lambda reason, _: lost.done() or lost.set_result(reason))
        assert await holder.claim(lock)
        await other.delete_queue(lock)
        reason = await asyncio.wait_for(lost, 10)
        assert lock in reason and "cancelled" in reason
        assert await other.claim(lock), "the lock is free for the next holder"


@pytest.mark.rabbitmq_only
async def test_closing_a_session_that_holds_locks_reports_no_loss(
    namespace: Namespace, caplog: pytest.LogCaptureFixture
) -> None:
    """A holder closing on purpose (a worker or a recorder stopping) frees its locks
    without an error: "lock ... was lost" is kept for losses. (Its lock channels close
    with the connection; the log is what told of a loss that was none.)"""
    session = await transport_for(namespace.url).session(name="holder", give_up_after=10)
    locks = lock_names(namespace.name, "locks", "closing", 3)
    try:
        for lock in locks:
            assert await session.claim(lock)
    finally:
        with caplog.at_level("ERROR"):
            await session.close()
    assert not [r for r in caplog.records if "was lost" in r.getMessage()], caplog.text
    other = await transport_for(namespace.url).session(name="other", give_up_after=10)
    try:
        for lock in locks:
            await eventually(lambda lock=lock: other.claim(lock), timeout=5, what=lock)
    finally:
        await other.close()


SLOW = Job(
    "finance.slow",
    UserArgs,
    queue="slow",
    key="user_id",
    exclusive="slow",
    timeout=0.3,
    retry=RetryPolicy(max_attempts=2, backoff=0),
)


async def test_a_timed_out_plain_handler_keeps_its_section_until_its_thread_ends(
    namespace: Namespace,
) -> None:
    """A thread cannot be stopped: the attempt times out, but the section stays taken
    until the thread ends, so the retry of the same key never runs beside it."""
    app = namespace.app()
    runs: list[tuple[int, float, float]] = []
    done = threading.Event()

    @app.handler(SLOW)
    def slow(args: UserArgs, ctx: JobContext) -> None:
        began = time.monotonic()
        if ctx.attempt == 1:
            time.sleep(1.0)  # past the job's 0.3 s timeout
        runs.append((ctx.attempt, began, time.monotonic()))
        if ctx.attempt == 2:
            done.set()

    async with running(namespace.worker(app)):
        async with namespace.client() as client:
            await client.enqueue(SLOW, {"user_id": 9, "n": 0})
        await asyncio.wait_for(asyncio.to_thread(done.wait, 20), 25)
    (first,) = [r for r in runs if r[0] == 1]
    (second,) = [r for r in runs if r[0] == 2]
    assert second[1] >= first[2], "the retry began before the timed-out thread ended"


def test_a_section_needs_a_key_and_a_sane_limit() -> None:
    with pytest.raises(ContractError, match="needs key="):
        Job("t.x", UserArgs, exclusive="finance")
    with pytest.raises(ContractError, match="exclusive must name a group"):
        Job("t.x", UserArgs, key="user_id", exclusive="no spaces")
    with pytest.raises(ContractError, match="exclusive_limit"):
        Job("t.x", UserArgs, key="user_id", exclusive="g", exclusive_limit=0)
    # the same section for every worker and job type of the group; N slots for a limit N
    assert lock_names("ns", "finance", "5", 1) == lock_names("ns", "finance", "5", 1)
    assert lock_names("ns", "finance", "5", 1) != lock_names("ns", "finance", "6", 1)
    assert len(set(lock_names("ns", "g", "5", 3))) == 3
