"""Publishing from sync code: SyncJobClient from threads, across fork and at exit; and a
JobClient reused across asyncio.run() calls."""

import asyncio
import gc
import logging
import os
import select
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import pytest
from pydantic import BaseModel

from amqp_jobs import (
    AmqpJobsError,
    ArgsValidationError,
    BrokerUnavailableError,
    ContractError,
    Job,
    JobClient,
    Middleware,
    Publishing,
    PublishTimeoutError,
    SyncJobClient,
    TopologySettings,
)
from amqp_jobs import Namespace as JobNamespace
from amqp_jobs.middleware import Next
from amqp_jobs.testing import Namespace
from amqp_jobs.topology import delay_queue, due_queue, work_queue
from amqp_jobs.transport import transport_for
from tests.support import ROOT, drain, eventually

#: what a client used across event loops or left open at exit must never print
NOISE = ("Task was destroyed", "Event loop is closed", "was never awaited", "Traceback")


class Email(BaseModel):
    user_id: int
    subject: str = "hi"


send = Job("emails.send", Email, queue="emails")


@pytest.fixture
def jobs(namespace: Namespace) -> Iterator[SyncJobClient]:
    namespace.track(send)
    client = SyncJobClient(
        namespace.url, namespace=JobNamespace(namespace.name, namespace.settings), retry_for=10
    )
    yield client
    client.close()


def depth(url: str, name: str) -> int | None:
    """Messages ready in a queue, None if it does not exist (RabbitMQ or memory://)."""

    async def read() -> int | None:
        link = transport_for(url).link("test", TopologySettings(), name="test", declare=False)
        try:
            return await link.depth(name)
        finally:
            await link.close()

    return asyncio.run(read())


def wait_for_depth(url: str, name: str, expected: int, timeout: float = 15.0) -> None:
    async def arrived() -> bool:
        return await asyncio.to_thread(depth, url, name) == expected

    asyncio.run(eventually(arrived, timeout=timeout, what=f"{expected} messages in {name}"))


def client_threads(client: SyncJobClient) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("amqp-jobs sync client")]


class Recorder(Middleware):
    """Records every publish it sees, and the thread it ran on."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    async def publish(self, publishing: Publishing, call_next: Next) -> None:
        self.seen.append((publishing.job_id, threading.current_thread().name))
        await call_next()


# -- publishing -------------------------------------------------------------------------


def test_enqueue_and_enqueue_many_arrive(namespace: Namespace, jobs: SyncJobClient) -> None:
    one = jobs.enqueue(send, Email(user_id=1))
    many = jobs.enqueue_many(send, [{"user_id": i} for i in range(2, 12)])
    assert jobs.enqueue_many(send, []) == []
    assert len(set(many)) == 10 and one not in many
    messages = asyncio.run(drain(namespace.url, work_queue(namespace.name, "emails"), 11))
    assert {m.message_id for m in messages} == {one, *many}


def test_bad_input_raises_in_the_callers_thread_before_anything_is_sent(
    namespace: Namespace,
) -> None:
    namespace.track(send)
    recorder = Recorder()
    with SyncJobClient(namespace.url, namespace=namespace.name, middleware=[recorder]) as jobs:
        with pytest.raises(ArgsValidationError) as info:
            jobs.enqueue(send, {"user_id": "nope"})
        assert info.value.fields == ["user_id"]
        with pytest.raises(ArgsValidationError):
            jobs.enqueue_many(send, [{"user_id": 1}, {"subject": "no user"}])
        with pytest.raises(ContractError):
            jobs.enqueue(send, {"user_id": 1}, delay=1, run_at=datetime.now(UTC))
        with pytest.raises(ContractError):
            jobs.enqueue(send, {"user_id": 1}, job_id="")
        # nothing was sent, declared or even started
        assert recorder.seen == []
        assert client_threads(jobs) == []
        assert depth(namespace.url, work_queue(namespace.name, "emails")) is None

        job_id = jobs.enqueue(send, {"user_id": 9}, headers={"tenant": "a"})
    assert recorder.seen == [(job_id, f"amqp-jobs sync client ({namespace.name})")]
    [message] = asyncio.run(drain(namespace.url, work_queue(namespace.name, "emails"), 1))
    assert message.message_id == job_id and message.headers["tenant"] == "a"


def test_delay_lands_in_the_delay_cascade(namespace: Namespace, jobs: SyncJobClient) -> None:
    jobs.enqueue(send, {"user_id": 1}, delay=timedelta(hours=1))
    jobs.enqueue(send, {"user_id": 2}, run_at=datetime.now(UTC) + timedelta(hours=2))
    jobs.close()
    levels = [depth(namespace.url, delay_queue(namespace.name, level)) for level in range(40)]
    assert sum(d or 0 for d in levels) == 2
    assert not depth(namespace.url, due_queue(namespace.name, "emails"))
    assert not depth(namespace.url, work_queue(namespace.name, "emails"))  # or not declared


def test_sixteen_threads_at_once(namespace: Namespace, jobs: SyncJobClient) -> None:
    threads, per = 16, 25
    start = threading.Barrier(threads)
    ids: list[list[str]] = [[] for _ in range(threads)]
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            start.wait(timeout=10)
            ids[t].extend(jobs.enqueue(send, {"user_id": t * per + i}) for i in range(per))
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    assert not errors, errors
    every = [i for chunk in ids for i in chunk]
    assert len(every) == len(set(every)) == threads * per
    wait_for_depth(namespace.url, work_queue(namespace.name, "emails"), threads * per)
    assert len(client_threads(jobs)) == 1


async def test_called_from_an_event_loops_thread_it_blocks_but_works(
    namespace: Namespace, jobs: SyncJobClient
) -> None:
    job_id = jobs.enqueue(send, {"user_id": 1})  # no await: this loop waits meanwhile
    [message] = await drain(namespace.url, work_queue(namespace.name, "emails"), 1)
    assert message.message_id == job_id


# -- lifecycle --------------------------------------------------------------------------


def test_close_is_idempotent_and_later_calls_say_it_is_closed(
    namespace: Namespace, caplog: pytest.LogCaptureFixture
) -> None:
    namespace.track(send)
    caplog.set_level(logging.DEBUG, logger="asyncio")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        jobs = SyncJobClient(namespace.url, namespace=namespace.name)
        jobs.enqueue(send, {"user_id": 1})
        [thread] = client_threads(jobs)
        began = time.monotonic()
        jobs.close()
        jobs.close()
        assert time.monotonic() - began < 5
        assert not thread.is_alive() and jobs.closed
        with pytest.raises(ContractError, match="closed"):
            jobs.enqueue(send, {"user_id": 2})
        with pytest.raises(ContractError, match="closed"):
            jobs.enqueue_many(send, [{"user_id": 3}])
        with pytest.raises(ContractError, match="closed"):
            jobs.connect()
        with jobs:  # a context manager over a closed client closes nothing more
            pass
        gc.collect()
    assert depth(namespace.url, work_queue(namespace.name, "emails")) == 1
    said = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [s for s in said if any(n in s for n in NOISE)], said


def test_a_client_left_open_closes_cleanly_at_exit(namespace: Namespace) -> None:
    namespace.track(send)
    script = textwrap.dedent(
        f"""
        import logging, sys
        logging.basicConfig(level=logging.WARNING)
        from amqp_jobs import SyncJobClient
        from tests.integration.test_sync_client import send
        jobs = SyncJobClient({namespace.url!r}, namespace={namespace.name!r})
        jobs.enqueue(send, {{"user_id": 1}})
        print("enqueued", flush=True)
        """
    )
    result = subprocess.run(
        [sys.executable, "-X", "dev", "-c", script],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "enqueued"
    assert result.stderr == "", result.stderr  # no warning, no error, nothing pending
    if not namespace.url.startswith("memory://"):  # a memory broker dies with its process
        assert depth(namespace.url, work_queue(namespace.name, "emails")) == 1


# -- fork ---------------------------------------------------------------------------


def wait_child(pid: int, timeout: float = 30.0) -> int:
    """The exit status of a forked child, waiting at most ``timeout`` seconds."""
    pidfd = os.pidfd_open(pid)
    try:
        ready, _, _ = select.select([pidfd], [], [], timeout)
    finally:
        os.close(pidfd)
    if not ready:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail(f"the forked child did not exit within {timeout}s")
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@pytest.mark.rabbitmq_only  # a memory broker is not shared with a child process
def test_a_client_used_before_fork_works_in_the_child_and_the_parent(
    namespace: Namespace, jobs: SyncJobClient
) -> None:
    before = jobs.enqueue(send, {"user_id": 1})
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report through the pipe and the exit status only
        status = 1
        try:
            os.close(read)
            os.write(write, jobs.enqueue(send, {"user_id": 2}).encode())
            status = 0 if len(client_threads(jobs)) == 1 else 2  # its own thread
        finally:
            os._exit(status)
    os.close(write)
    try:
        assert wait_child(pid) == 0
        child_id = os.read(read, 100).decode()
    finally:
        os.close(read)
    after = jobs.enqueue(send, {"user_id": 3})  # the parent's connection is intact
    messages = asyncio.run(drain(namespace.url, work_queue(namespace.name, "emails"), 3))
    assert [m.message_id for m in messages] == [before, child_id, after]


@pytest.mark.rabbitmq_only
def test_forked_children_that_exit_normally_close_only_their_own_client(
    namespace: Namespace,
) -> None:
    """As gunicorn's workers: the client is made (and used) in the parent, every child
    publishes and exits through atexit, and the parent publishes after them."""
    namespace.track(send)
    script = textwrap.dedent(
        f"""
        import os, sys
        from amqp_jobs import SyncJobClient
        from tests.integration.test_sync_client import send
        jobs = SyncJobClient({namespace.url!r}, namespace={namespace.name!r})
        jobs.enqueue(send, {{"user_id": 0}})
        children = []
        for n in range(1, 4):
            pid = os.fork()
            if pid == 0:
                jobs.enqueue(send, {{"user_id": n}})
                sys.exit(0)
            children.append(pid)
        codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children]
        assert codes == [0, 0, 0], codes
        jobs.enqueue(send, {{"user_id": 4}})
        print("done", flush=True)
        """
    )
    result = subprocess.run(
        [sys.executable, "-X", "dev", "-c", script],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "done"
    assert result.stderr == "", result.stderr
    assert depth(namespace.url, work_queue(namespace.name, "emails")) == 5


# -- bounds -------------------------------------------------------------------------


@pytest.fixture
def silent_broker() -> Iterator[str]:
    """A port that accepts connections (the kernel's backlog) and never says a word."""
    with socket.create_server(("127.0.0.1", 0), backlog=64) as server:
        yield f"amqp://guest:guest@127.0.0.1:{server.getsockname()[1]}/"


@pytest.mark.rabbitmq_only  # a fake AMQP server
def test_calls_to_a_silent_broker_end_within_their_bound(silent_broker: str) -> None:
    with SyncJobClient(silent_broker, namespace="bounds", retry_for=1, confirm_timeout=1) as jobs:
        outcomes: list[tuple[float, BaseException | None]] = []

        def call() -> None:
            began = time.monotonic()
            try:
                jobs.enqueue(send, {"user_id": 1})
            except BaseException as exc:
                outcomes.append((time.monotonic() - began, exc))
            else:
                outcomes.append((time.monotonic() - began, None))

        threads = [threading.Thread(target=call) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert len(outcomes) == 4
        for took, exc in outcomes:
            assert isinstance(exc, AmqpJobsError), exc
            assert took < jobs.bound + 1, f"a call took {took:.1f}s, bound {jobs.bound}s"
        began = time.monotonic()
        with pytest.raises(BrokerUnavailableError):
            jobs.connect()
        assert time.monotonic() - began < jobs.bound + 1


def test_nothing_listening_raises_broker_unavailable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    with SyncJobClient(f"amqp://guest:guest@127.0.0.1:{port}/", namespace="b", retry_for=1) as jobs:
        began = time.monotonic()
        with pytest.raises(BrokerUnavailableError):
            jobs.enqueue(send, {"user_id": 1})
        assert time.monotonic() - began < jobs.bound + 1


class Stuck(Middleware):
    """Blocks the client's event loop (a sync call inside a publish middleware)."""

    def __init__(self) -> None:
        self.release = threading.Event()

    async def publish(self, publishing: Publishing, call_next: Next) -> None:
        self.release.wait(30)
        await call_next()


def test_a_stuck_loop_cannot_hold_a_caller_past_its_bound(namespace: Namespace) -> None:
    namespace.track(send)
    stuck = Stuck()
    jobs = SyncJobClient(
        namespace.url, namespace=namespace.name, retry_for=0.5, confirm_timeout=0.5,
        middleware=[stuck],
    )  # fmt: skip
    try:
        began = time.monotonic()
        with pytest.raises(PublishTimeoutError, match="may or may not be stored"):
            jobs.enqueue(send, {"user_id": 1})
        assert jobs.bound <= time.monotonic() - began < jobs.bound + 1
    finally:
        stuck.release.set()
        jobs.close()


# -- JobClient across asyncio.run() calls --------------------------------------------------


def test_a_job_client_reused_across_asyncio_runs(
    namespace: Namespace, caplog: pytest.LogCaptureFixture
) -> None:
    """Each asyncio.run() closes its loop; the client reconnects in the next one and
    leaves the dead loop's connection, tasks and locks alone."""
    namespace.track(send)
    caplog.set_level(logging.DEBUG)
    client = JobClient(namespace.url, namespace=namespace.name)

    async def publish(first: int) -> list[str]:
        # concurrent calls contend for the link's locks, binding them to this loop
        ids = await asyncio.gather(
            *(client.enqueue(send, {"user_id": first + i}) for i in range(20))
        )
        ids.append(await client.enqueue(send, {"user_id": first}, delay=timedelta(hours=1)))
        return ids

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = []
        for run in range(3):
            ids += asyncio.run(publish(run * 100))
            gc.collect()  # whatever the dead loop left behind is collected here
        asyncio.run(client.close())
        gc.collect()
    assert len(set(ids)) == 63
    assert depth(namespace.url, work_queue(namespace.name, "emails")) == 60
    said = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [s for s in said if any(n in s for n in NOISE)], said


@pytest.mark.rabbitmq_only  # connections, as the broker lists them
@pytest.mark.skipif(
    shutil.which("rabbitmqctl") is None, reason="lists connections with rabbitmqctl"
)
def test_a_job_client_moved_off_stopped_loops_leaves_no_connection(namespace: Namespace) -> None:
    """A loop per call, stopped but never closed (``run_until_complete``): the client
    closes the connection it made on the previous loop before connecting on the next."""
    if urlsplit(namespace.url).hostname not in ("127.0.0.1", "localhost"):
        pytest.skip("rabbitmqctl reads the local broker")
    namespace.track(send)
    name = f"moved {namespace.name}"
    client = JobClient(namespace.url, namespace=namespace.name, name=name)
    loops = [asyncio.new_event_loop() for _ in range(4)]
    try:
        for n, loop in enumerate(loops):
            loop.run_until_complete(client.enqueue(send, {"user_id": n}))
        listed = subprocess.run(
            ["rabbitmqctl", "list_connections", "client_properties", "-q"],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout  # fmt: skip
        assert listed.count(name) == 1  # the last loop's, not one per loop
        loops[-1].run_until_complete(client.close())
    finally:
        for loop in loops:
            loop.close()
    assert depth(namespace.url, work_queue(namespace.name, "emails")) == 4


@pytest.mark.rabbitmq_only  # the memory link holds nothing of a loop
def test_a_job_client_in_use_by_another_running_loop_says_so(namespace: Namespace) -> None:
    namespace.track(send)
    client = JobClient(namespace.url, namespace=namespace.name)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(client.enqueue(send, {"user_id": 1}), loop).result(30)
        with pytest.raises(ContractError, match="one event loop at a time"):
            asyncio.run(client.enqueue(send, {"user_id": 2}))
        asyncio.run(client.close())  # closed by the loop it runs in
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
