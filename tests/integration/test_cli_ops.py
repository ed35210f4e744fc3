"""Operations commands against the real broker: status, dead, enqueue, topology."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import pytest

from amqp_jobs import ops
from amqp_jobs.cli import main
from amqp_jobs.message import Message, now_ms
from amqp_jobs.testing import Namespace, memory_broker_of
from amqp_jobs.topology import (
    TopologySettings,
    dead_queue,
    namespace_plan,
    quarantine_queue,
    work_queue,
)
from amqp_jobs.transport import transport_for
from tests.support import (
    MANAGEMENT,
    count_once_settled,
    drain,
    eventually,
    put,
    queue_count,
    require_management,
)
from tests.support import declare as declare_queue

APP = "examples.shop.worker:app"
#: the work queues of APP
QUEUES = {"billing", "crm", "emails", "fulfilment"}


def cli(
    capsys: pytest.CaptureFixture[str], ns: Namespace, *args: str, broker: bool = True
) -> tuple[int, str, str]:
    """Run a command in the test's namespace; ``broker``: it takes --url (talks to one)."""
    code = main([*args, *(["--url", ns.url] if broker else []), "--namespace", ns.name])
    out, err = capsys.readouterr()
    return code, out, err


async def declare(ns: Namespace, queues: dict[str, set[str]]) -> None:
    for queue, jobs in queues.items():
        await declare_queue(ns, queue, jobs)


async def park(
    ns: Namespace, queue: str, jobs: list[tuple[str, str]], failed_ago_ms: int = 0
) -> None:
    """Put dead jobs (job id, job name) into ``queue``'s dead-letter queue, as a worker would."""
    await declare(ns, {queue: set()})
    link = transport_for(ns.url).link(ns.name, TopologySettings(), name="test park")
    for job_id, name in jobs:
        headers: dict[str, Any] = {
            "job-protocol": 1,
            "job-attempt": 3,
            "job-queue": queue,
            "job-error-type": "ValueError",
            "job-error-message": f"{name} broke",
            "job-error-traceback": 'Traceback (most recent call last):\n  File "x.py", line 1\nValueError',
            "job-failed-at": now_ms() - failed_ago_ms,
            "job-dead-reason": "exhausted",
            "x-death": [{"reason": "rejected"}],
        }
        message = Message(
            body=json.dumps({"user_id": 7, "amount_cents": 5}).encode(),
            content_type="application/json",
            message_id=job_id,
            type=name,
            timestamp=None,
            headers=headers,
        )
        await link.retrying(functools.partial(link.send_dead, message, queue), give_up_after=10)
    await link.close()


async def publish_raw(url: str, queue: str, body: bytes) -> None:
    await put(url, queue, Message(body, None, None, None, None, {}))


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_status_shows_every_kind_of_queue(
    namespace: Namespace, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = cli(capsys, namespace, "topology", "declare", "--app", APP)
    assert code == 0, err
    namespace.track("crm", "billing", "emails", "fulfilment")
    code, _, err = cli(
        capsys, namespace, "enqueue", "crm.create_record",
        '{"user_id": 1, "email": "a@b.c", "postcode": "E1 6AN"}', "--app", APP,
    )  # fmt: skip
    assert code == 0, err
    code, _, _ = cli(
        capsys, namespace, "enqueue", "emails.send_reminder", '{"user_id": 1, "text": "hi"}',
        "--app", APP, "--delay", "1h",
    )  # fmt: skip
    assert code == 0
    run(park(namespace, "billing", [("d1", "billing.sync_invoice")]))
    run(publish_raw(namespace.url, quarantine_queue(namespace.name, "fulfilment"), b"{}"))
    code, out, _ = cli(capsys, namespace, "status", "--app", APP, "--json")
    assert code == 0
    data = json.loads(out)
    rows = {q["queue"]: q for q in data["queues"]}
    assert rows["crm"]["ready"] == 1
    assert rows["billing"]["dead"] == 1
    assert rows["fulfilment"]["quarantined"] == 1
    assert rows["emails"]["ready"] == 0
    assert data["delayed"] == 1
    assert data["unroutable"] == 0
    code, out, _ = cli(capsys, namespace, "status", "--app", APP)
    assert "queue" in out and "quarantine" in out and "delay cascade: 1 waiting" in out


def test_status_unreachable_broker_is_one_line_with_masked_password(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(
        ["status", "--url", "amqp://guest:hunter2@127.0.0.1:1/", "--namespace", "x",
         "--queue", "q", "--connect-timeout", "0.3"]
    )  # fmt: skip
    _, err = capsys.readouterr()
    assert code == 1
    assert "hunter2" not in err
    assert "guest:***@127.0.0.1:1" in err
    assert len(err.strip().splitlines()) == 1


def test_status_of_unknown_queue(namespace: Namespace, capsys: pytest.CaptureFixture[str]) -> None:
    run(declare(namespace, {"real": set()}))
    code, _, err = cli(capsys, namespace, "status", "--queue", "nope")
    assert code == 1
    assert f"no work queue '{namespace.name}.q.nope'" in err


def test_dead_list_filters_and_leaves_the_queue_as_it_was(
    namespace: Namespace, capsys: pytest.CaptureFixture[str]
) -> None:
    jobs = [(f"id-{i}", "billing.sync_invoice" if i % 2 else "crm.create_record") for i in range(6)]
    run(park(namespace, "billing", jobs))
    code, out, _ = cli(capsys, namespace, "dead", "list", "billing", "--json")
    assert code == 0
    assert [d["job_id"] for d in json.loads(out)] == [j for j, _ in jobs]
    code, out, _ = cli(
        capsys,
        namespace,
        "dead",
        "list",
        "billing",
        "--job",
        "crm.create_record",
        "--limit",
        "2",
        "--json",
    )
    listed = json.loads(out)
    assert [d["job_id"] for d in listed] == ["id-0", "id-2"]
    assert listed[0]["attempts"] == 3
    assert listed[0]["reason"] == "exhausted"
    assert listed[0]["error_type"] == "ValueError"
    code, out, _ = cli(capsys, namespace, "dead", "list", "billing")
    assert "id-5" in out and "6 dead jobs in billing" in out
    code, out, _ = cli(capsys, namespace, "dead", "list", "billing", "--limit", "1")
    assert "1 dead job in billing" in out
    # nothing lost, duplicated or reordered
    msgs = run(drain(namespace.url, dead_queue(namespace.name, "billing"), 6))
    assert [m.message_id for m in msgs] == [j for j, _ in jobs]


def test_dead_show(namespace: Namespace, capsys: pytest.CaptureFixture[str]) -> None:
    run(park(namespace, "billing", [("a", "billing.sync_invoice"), ("b", "billing.sync_invoice")]))
    code, out, _ = cli(capsys, namespace, "dead", "show", "b", "--queue", "billing", "--json")
    assert code == 0
    info = json.loads(out)
    assert info["job_id"] == "b"
    assert "Traceback" in info["traceback"]
    assert json.loads(info["args"]) == {"user_id": 7, "amount_cents": 5}
    code, out, _ = cli(capsys, namespace, "dead", "show", "b", "--queue", "billing")
    assert "traceback:" in out and "billing.sync_invoice broke" in out
    assert out.count("Traceback (most recent call last)") == 1, "the traceback, once"
    assert "job-error-traceback: (the traceback above)" in out
    code, _, err = cli(capsys, namespace, "dead", "show", "zzz", "--queue", "billing")
    assert code == 1
    assert "no dead job 'zzz'" in err
    assert run(count_once_settled(namespace.url, dead_queue(namespace.name, "billing"), 2)) == 2


def test_dead_show_takes_the_start_of_an_id(
    namespace: Namespace, capsys: pytest.CaptureFixture[str]
) -> None:
    """The demo prints 8 characters of each id; the worker log prints whole ids."""
    ids = ["594ed247292048bd8920bceee1b096b2", "594ed2479f0c4c7f9d6c1d7be2cbb7a1", "dec67507"]
    run(park(namespace, "billing", [(i, "billing.sync_invoice") for i in ids]))
    run(park(namespace, "crm", [("dec67507d9ca4cdfb80bc386158fde3c", "crm.create_record")]))
    show = ("dead", "show")
    queues = ("--queue", "billing", "--queue", "crm")
    code, out, err = cli(capsys, namespace, *show, "594ed247292", *queues, "--json")
    assert code == 0, err
    assert json.loads(out)["job_id"] == ids[0]
    # ambiguous: an error naming every candidate (and their queues), nothing shown
    code, out, err = cli(capsys, namespace, *show, "594ed247", *queues)
    assert code == 1 and out == ""
    assert "ambiguous" in err and "2 dead jobs" in err and len(err.strip().splitlines()) == 1
    assert f"{ids[0]} (billing.sync_invoice, billing)" in err and ids[1] in err
    # an id that is also the start of another id is that job, not ambiguous
    code, out, _ = cli(capsys, namespace, *show, "dec67507", *queues, "--json")
    assert code == 0 and json.loads(out)["job_id"] == "dec67507"
    code, out, err = cli(capsys, namespace, *show, "dec67507d", *queues, "--json")
    assert code == 0 and json.loads(out)["queue"] == "crm"
    code, _, err = cli(capsys, namespace, *show, "ffff", *queues)
    assert code == 1 and "no dead job 'ffff'" in err
    # nothing was taken off the dead queues
    assert run(count_once_settled(namespace.url, dead_queue(namespace.name, "billing"), 3)) == 3
    assert run(count_once_settled(namespace.url, dead_queue(namespace.name, "crm"), 1)) == 1


def test_dead_replay_by_id_and_all(
    namespace: Namespace, capsys: pytest.CaptureFixture[str]
) -> None:
    jobs = [
        ("r1", "billing.sync_invoice"),
        ("r2", "crm.create_record"),
        ("r3", "billing.sync_invoice"),
    ]
    run(park(namespace, "billing", jobs))
    code, out, _ = cli(capsys, namespace, "dead", "replay", "billing", "--id", "r2", "--id", "nope")
    assert code == 1, "an id that was not found is an error"
    assert "replayed 1" in out and "not found" in out and "nope" in out
    [copy] = run(drain(namespace.url, work_queue(namespace.name, "billing"), 1))
    assert copy.message_id == "r2"
    assert copy.type == "crm.create_record"
    assert copy.headers["job-attempt"] == 1
    assert not any(
        k.startswith(("job-error", "job-dead", "job-failed", "x-death")) for k in copy.headers
    )
    assert json.loads(copy.body) == {"user_id": 7, "amount_cents": 5}
    code, out, _ = cli(
        capsys, namespace, "dead", "replay", "billing", "--all", "--job", "billing.sync_invoice"
    )
    assert code == 0
    assert "replayed 2" in out
    assert run(queue_count(namespace.url, dead_queue(namespace.name, "billing"))) == 0
    code, _, err = cli(capsys, namespace, "dead", "replay", "billing")
    assert code == 2 and "--id JOB_ID" in err


def test_interrupted_replay_loses_nothing(namespace: Namespace) -> None:
    jobs = [(f"j{i}", "billing.sync_invoice") for i in range(6)]
    run(park(namespace, "billing", jobs))

    class Stop(Exception):
        pass

    def stop_after_two(progress: ops.Progress) -> None:
        if progress.done == 2:
            raise Stop

    async def replay(on_progress: Any = None) -> ops.Progress:
        transport = transport_for(namespace.url)
        async with ops.Broker(transport, namespace.name, namespace.settings) as broker:
            return await ops.replay_dead(broker, "billing", ops.select(), on_progress=on_progress)

    with pytest.raises(Stop):
        run(replay(stop_after_two))
    assert run(count_once_settled(namespace.url, dead_queue(namespace.name, "billing"), 4)) == 4
    assert run(count_once_settled(namespace.url, work_queue(namespace.name, "billing"), 2)) == 2
    again = run(replay())
    assert again.job_ids == ["j2", "j3", "j4", "j5"], "the rest, in order"
    replayed = run(drain(namespace.url, work_queue(namespace.name, "billing"), 6))
    assert [m.message_id for m in replayed] == [j for j, _ in jobs]


def test_dead_purge(namespace: Namespace, capsys: pytest.CaptureFixture[str]) -> None:
    run(
        park(
            namespace,
            "billing",
            [("old1", "billing.sync_invoice"), ("old2", "crm.create_record")],
            failed_ago_ms=3 * 86_400_000,
        )
    )
    run(park(namespace, "billing", [("new1", "billing.sync_invoice")]))
    code, _, err = cli(capsys, namespace, "dead", "purge", "billing")
    assert code == 2 and "--yes" in err, "no terminal to ask on: refuse"
    assert run(count_once_settled(namespace.url, dead_queue(namespace.name, "billing"), 3)) == 3
    code, out, _ = cli(
        capsys,
        namespace,
        "dead",
        "purge",
        "billing",
        "--older-than",
        "2d",
        "--job",
        "billing.sync_invoice",
        "--yes",
    )
    assert code == 0 and "removed 1 dead job from billing" in out
    code, out, _ = cli(
        capsys, namespace, "dead", "purge", "billing", "--older-than", "1h", "--yes", "--json"
    )
    assert json.loads(out) == {"removed": 1}
    left = run(drain(namespace.url, dead_queue(namespace.name, "billing"), 1))
    assert [m.message_id for m in left] == ["new1"]


def test_dead_commands_on_unknown_queue(
    namespace: Namespace, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = cli(capsys, namespace, "dead", "list", "ghost")
    assert code == 1
    assert "no dead-letter queue" in err and "ghost" in err
    code, _, err = cli(capsys, namespace, "dead", "list", "bad.name")
    assert code == 2 and "invalid queue name" in err


def test_enqueue_validates_against_the_app(
    namespace: Namespace, capsys: pytest.CaptureFixture[str]
) -> None:
    namespace.track("billing")
    code, out, _ = cli(
        capsys,
        namespace,
        "enqueue",
        "billing.sync_invoice",
        '{"user_id": 1, "amount_cents": 10}',
        "--app",
        APP,
        "--json",
    )
    assert code == 0
    job_id = json.loads(out)["job_id"]
    [msg] = run(drain(namespace.url, work_queue(namespace.name, "billing"), 1))
    assert msg.message_id == job_id
    assert msg.headers["job-key"] == "1"  # the contract's key field, as the client sends it
    code, _, err = cli(
        capsys,
        namespace,
        "enqueue",
        "billing.sync_invoice",
        '{"user_id": 1, "amount_cents": -5}',
        "--app",
        APP,
    )
    assert code == 1 and "amount_cents" in err
    code, _, err = cli(capsys, namespace, "enqueue", "billing.nope", "{}", "--app", APP)
    assert code == 2 and "unknown job 'billing.nope'" in err
    code, _, err = cli(
        capsys, namespace, "enqueue", "billing.sync_invoice", "{not json", "--app", APP
    )
    assert code == 2 and "not JSON" in err
    code, _, err = cli(capsys, namespace, "enqueue", "x", "{}", "--app", APP, "--delay", "soon")
    assert code == 2


def test_enqueue_with_schemas_only(
    namespace: Namespace, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    namespace.track("billing")
    code, _, _ = cli(
        capsys, namespace, "schemas", "export", str(tmp_path), "--app", APP, broker=False
    )
    assert code == 0
    code, _out, err = cli(
        capsys,
        namespace,
        "enqueue",
        "billing.sync_invoice",
        '{"user_id": 2, "amount_cents": 3}',
        "--schemas",
        str(tmp_path),
        "--at",
        "2000-01-01T00:00:00Z",
    )
    assert code == 0, err
    [msg] = run(drain(namespace.url, work_queue(namespace.name, "billing"), 1))
    assert json.loads(msg.body) == {"user_id": 2, "amount_cents": 3}
    assert msg.type == "billing.sync_invoice"
    assert msg.headers["job-key"] == "2"  # named by the schema's x-amqp-jobs.key_field
    code, _, err = cli(
        capsys,
        namespace,
        "enqueue",
        "billing.sync_invoice",
        '{"user_id": "x", "amount_cents": 3}',
        "--schemas",
        str(tmp_path),
    )
    assert code == 1 and "user_id" in err
    code, _, err = cli(capsys, namespace, "enqueue", "nobody", "{}", "--schemas", str(tmp_path))
    assert code == 1 and "no schema for job 'nobody'" in err


def test_topology_show_and_declare(
    namespace: Namespace, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = cli(
        capsys, namespace, "topology", "show", "--queue", "mail", "--job", "mail.send", "--json",
        broker=False,
    )  # fmt: skip
    assert code == 0
    plan = json.loads(out)
    names = {q["name"] for q in plan["queues"]}
    assert {
        f"{namespace.name}.q.mail",
        f"{namespace.name}.dead.mail",
        f"{namespace.name}.delay.28",
    } <= names
    assert {
        "source": f"{namespace.name}.jobs",
        "destination": f"{namespace.name}.q.mail",
        "destination_type": "queue",
        "key": "mail.send",
    } in plan["bindings"]
    namespace.track("mail")
    code, out, _ = cli(
        capsys, namespace, "topology", "declare", "--queue", "mail", "--job", "mail.send"
    )
    assert code == 0

    async def check() -> None:
        for q in plan["queues"]:
            assert await queue_count(namespace.url, q["name"]) == 0

    run(check())


async def exists(url: str, kind: str, name: str) -> bool:
    """Whether a queue or exchange exists (RabbitMQ: a passive declare; or memory://)."""
    memory = memory_broker_of(url)
    if memory is not None:
        return memory.has_queue(name) if kind == "queue" else memory.has_exchange(name)
    connection = await aio_pika.connect(url)
    try:
        ch = await connection.channel()
        try:
            if kind == "queue":
                await ch.declare_queue(name, passive=True)
            else:
                await ch.declare_exchange(name, passive=True)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            return False
        return True
    finally:
        await connection.close()


async def present(ns: Namespace, queues: set[str]) -> tuple[set[str], set[str]]:
    """The namespace's queues and exchanges (for these work queues) that exist."""
    plan = namespace_plan(ns.name, queues, ns.settings)
    found_queues = {q.name for q in plan.queues if await exists(ns.url, "queue", q.name)}
    found_exchanges = {e.name for e in plan.exchanges if await exists(ns.url, "exchange", e.name)}
    return found_queues, found_exchanges


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_topology_delete_removes_one_namespace(
    namespace: Namespace, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    other = Namespace(namespace.url, f"{namespace.name}-other")
    other.track("mail")
    try:
        code, _, err = cli(capsys, other, "topology", "declare", "-q", "mail", "--job", "mail.send")
        assert code == 0, err
        theirs = run(present(other, {"mail"}))
        namespace.track("mail", "crm")
        code, _, err = cli(
            capsys, namespace, "topology", "declare", "--app", APP, "--queue", "mail"
        )
        assert code == 0, err
        run(park(namespace, "mail", [("d1", "mail.send")]))
        everything = run(present(namespace, {"mail", *QUEUES}))
        plan = namespace_plan(namespace.name, {"mail", *QUEUES}, namespace.settings)
        assert len(everything[1]) == len(plan.exchanges) == 35
        assert {work_queue(namespace.name, q) for q in QUEUES} <= everything[0]
        queues = len(everything[0])

        # no terminal to ask on, no --yes: refused, with what it would delete
        code, out, err = cli(capsys, namespace, "topology", "delete", "--app", APP, "-q", "mail")
        assert code == 2 and "--yes" in err and "1 job, which would be discarded" in err
        assert run(present(namespace, {"mail", *QUEUES})) == everything
        # asked on a terminal: the question says jobs would be discarded; no is no
        questions: list[str] = []
        monkeypatch.setattr("sys.stdin", Terminal())
        monkeypatch.setattr("builtins.input", lambda q: questions.append(q) or "n")
        code, out, _ = cli(capsys, namespace, "topology", "delete", "--app", APP, "-q", "mail")
        assert code == 1 and "nothing deleted" in out
        [question] = questions
        assert question.startswith(f"Delete namespace {namespace.name} (work queues billing,")
        assert (
            f"{queues} queues holding 1 job, which would be discarded, and its 35 exchanges"
            in question
        )
        assert run(present(namespace, {"mail", *QUEUES})) == everything

        code, out, err = cli(
            capsys, namespace, "topology", "delete", "--app", APP, "-q", "mail", "--yes"
        )
        assert code == 0, err
        assert f"deleted namespace {namespace.name}" in out
        assert f"{queues} queues (1 job discarded), and its 35 exchanges" in out
        assert run(present(namespace, {"mail", *QUEUES})) == (set(), set())
        # the other namespace is untouched
        assert run(present(other, {"mail"})) == theirs
        assert len(theirs[0]) > 4 and len(theirs[1]) == 35
        # again: nothing left, and it says so
        code, out, _ = cli(capsys, namespace, "topology", "delete", "-q", "mail", "-y", "--json")
        assert code == 0 and json.loads(out)["queues"] == {}
    finally:
        run(other.delete())


@pytest.mark.rabbitmq_only  # RabbitMQ's management API
async def test_status_unacked_and_discovery_from_the_management_api(namespace: Namespace) -> None:
    require_management()
    from pydantic import BaseModel

    from amqp_jobs import Job

    class N(BaseModel):
        n: int

    app = namespace.app()
    job = Job("t.hold", N, queue="held")
    release = asyncio.Event()

    @app.handler(job)
    async def hold(args: N) -> None:
        await release.wait()

    async with namespace.client() as client:
        await client.enqueue_many(job, [{"n": 1}, {"n": 2}, {"n": 3}])
    worker = namespace.worker(app, concurrency=2)
    task = asyncio.create_task(worker.run())
    loop = asyncio.get_running_loop()

    def status() -> dict[str, Any]:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main(
                [
                    "status",
                    "--url",
                    namespace.url,
                    "--namespace",
                    namespace.name,
                    "--management-url",
                    MANAGEMENT,
                    "--json",
                ]
            )
        assert code == 0
        data: dict[str, Any] = json.loads(out.getvalue())
        return data

    try:
        await worker.started()

        async def two_unacked() -> bool:
            data = await loop.run_in_executor(None, status)
            return bool(
                data["queues"]
                == [
                    {
                        "queue": "held",
                        "ready": 1,
                        "unacked": 2,
                        "consumers": 1,
                        "due": 0,
                        "quarantined": 0,
                        "dead": 0,
                        "high": 0,
                    }
                ]
            )

        # the management API refreshes queue statistics every few seconds
        await eventually(two_unacked, timeout=30, interval=0.5, what="2 unacked jobs in the status")
    finally:
        release.set()
        worker.stop()
        await asyncio.wait_for(task, 15)


# -- a broker that goes away mid-command ------------------------------------------------


class Tripwire:
    """A TCP proxy to the broker that cuts a connection the moment the client sends a
    frame naming ``marker`` (a queue or job name): the broker is lost mid-command, after
    the handshake, with the command's request unanswered."""

    def __init__(self, target: tuple[str, int], marker: bytes) -> None:
        self.target = target
        self.marker = marker
        self.cuts = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Tripwire:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    def url(self, url: str) -> str:
        parts = urlsplit(url)
        netloc = f"{parts.username}:{parts.password}@127.0.0.1:{self.port}"
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, watch: bool) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    if watch and self.marker in data:
                        self.cuts += 1
                        break
                    dst.write(data)
                    await dst.drain()
            writer.transport.abort()
            up_writer.transport.abort()

        await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))


@pytest.mark.parametrize(
    ("command", "marker"),
    [
        pytest.param(["status", "--queue", "billing"], "{ns}.q.billing", id="status"),
        pytest.param(["dead", "list", "billing"], "{ns}.dead.billing", id="dead-list"),
        pytest.param(
            ["dead", "show", "d1", "--queue", "billing"], "{ns}.dead.billing", id="dead-show"
        ),
        # cut at the first copy's publish: the dead job was fetched, not yet replayed
        pytest.param(["dead", "replay", "billing", "--all"], "{ns}.q.billing", id="dead-replay"),
        pytest.param(["dead", "purge", "billing", "--yes"], "{ns}.dead.billing", id="dead-purge"),
        pytest.param(
            ["topology", "declare", "--queue", "billing"], "{ns}.q.billing", id="topology-declare"
        ),
        pytest.param(
            ["enqueue", "billing.sync_invoice", '{"user_id": 1, "amount_cents": 2}', "--app", APP],
            "billing.sync_invoice",
            id="enqueue",
        ),
    ],
)
@pytest.mark.rabbitmq_only  # a TCP proxy cuts the connection
async def test_a_broker_lost_mid_command_is_one_line(
    namespace: Namespace, capsys: pytest.CaptureFixture[str], command: list[str], marker: str
) -> None:
    await park(namespace, "billing", [("d1", "billing.sync_invoice")])
    parts = urlsplit(namespace.url)
    target = (parts.hostname or "127.0.0.1", parts.port or 5672)
    loop = asyncio.get_running_loop()
    async with Tripwire(target, marker.format(ns=namespace.name).encode()) as proxy:
        args = [*command, "--url", proxy.url(namespace.url), "--namespace", namespace.name]
        code = await loop.run_in_executor(None, main, [*args, "--connect-timeout", "1"])
    out, err = capsys.readouterr()
    assert proxy.cuts >= 1, "the connection was cut mid-command"
    assert code == 1, out + err
    assert err.startswith("amqp-jobs: error: ") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    assert f"{parts.username}:{parts.password}@" not in err, "password masked"
    # nothing was lost: the dead job is back (the broker requeues what the lost
    # connection held), and nothing reached the work queue
    dead = dead_queue(namespace.name, "billing")
    assert await count_once_settled(namespace.url, dead, 1, timeout=15) == 1, "the dead job back"
    assert await queue_count(namespace.url, work_queue(namespace.name, "billing")) == 0
