"""The operations commands of ``amqp-jobs``: status, dead, enqueue, topology, schemas, asyncapi.

Each takes the parsed arguments and returns an exit status. User mistakes raise
UsageError (exit 2) or an AmqpJobsError (exit 1); cli.main prints them as one line.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import re
import sys
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from amqp_jobs import durations, ops, schemas
from amqp_jobs.app import JobApp
from amqp_jobs.client import JobClient, resolve_eta
from amqp_jobs.contract import Job, check_namespace, check_queue_name
from amqp_jobs.errors import AmqpJobsError, ConnectionLostError, ContractError, NotFoundError
from amqp_jobs.message import H_ERROR_TRACEBACK, H_KEY, Envelope
from amqp_jobs.topology import (
    TopologySettings,
    dead_queue,
    namespace_plan,
    scheduler_plan,
    work_queue,
)
from amqp_jobs.transport import transport_for
from amqp_jobs.urls import BrokerURLs, mask_url, resolve

T = TypeVar("T")


class UsageError(Exception):
    """A mistake on the command line; printed as one line, exit status 2."""


# -- shared plumbing -----------------------------------------------------------------


def load_app(target: str) -> JobApp:
    """Import ``module:attribute`` and return the JobApp it names."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"expected module:app (e.g. myproject.jobs:app), got {target!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"cannot import {module_name!r}: {exc}") from None
    app = getattr(module, attr, None)
    if app is None:
        raise UsageError(f"module {module_name!r} has no attribute {attr!r}")
    if not isinstance(app, JobApp):
        raise UsageError(f"{target} is a {type(app).__name__}, not a JobApp")
    return app


def parse_duration(text: str) -> float:
    """An argparse type: seconds in '90', '90s', '5m', '1h30m', '2d', '500ms' (see
    durations.parse_duration)."""
    try:
        return durations.parse_duration(text)
    except ContractError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_when(text: str) -> datetime:
    """An ISO-8601 time; without a zone it is taken as UTC."""
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not an ISO-8601 time: {text!r} (example: 2027-01-01T09:00:00+01:00)"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


class Context:
    """What every operations command needs: URL, namespace, settings, the app if any."""

    def __init__(self, args: argparse.Namespace) -> None:
        self._urls: BrokerURLs | None = None
        if hasattr(args, "url"):  # only commands that take --url need a broker's URL
            try:
                self._urls = resolve(args.url)
            except ContractError as exc:
                raise UsageError(str(exc)) from None
        self.app = load_app(args.app) if getattr(args, "app", None) else None
        namespace = (
            args.namespace
            or (self.app.namespace if self.app else None)
            or os.environ.get("AMQP_JOBS_NAMESPACE")
        )
        if not namespace:
            raise UsageError("which namespace? pass --namespace NS or --app module:app")
        try:
            self.namespace = check_namespace(namespace)
        except ContractError as exc:
            raise UsageError(str(exc)) from None
        self.settings = self.app.settings if self.app else TopologySettings()
        self.connect_timeout: float = getattr(args, "connect_timeout", 10.0)
        self.json: bool = getattr(args, "json", False)

    def queues(self, explicit: Sequence[str] | None) -> list[str]:
        names = set(explicit or [])
        if self.app:
            names |= set(self.app.queues)
        for name in names:
            try:
                check_queue_name(name)
            except ContractError as exc:
                raise UsageError(str(exc)) from None
        return sorted(names)

    @property
    def urls(self) -> BrokerURLs:
        """--url, else $AMQP_URL, else the local default (``urls.resolve``)."""
        assert self._urls is not None, "this command takes no --url"
        return self._urls

    def run(self, body: Callable[[ops.Broker], Awaitable[T]]) -> T:
        """``body`` on the broker (a link and a session of the namespace). A broker that
        goes away mid-command raises ConnectionLostError, password masked."""

        async def main() -> T:
            transport = transport_for(self.urls)
            async with ops.Broker(
                transport, self.namespace, self.settings, connect_timeout=self.connect_timeout
            ) as broker:
                return await body(broker)

        try:
            return asyncio.run(main())
        except ConnectionLostError as exc:
            raise ConnectionLostError(
                f"lost the connection to the broker at {self.urls}: {self._scrub(exc)}"
                " (run the command again once it is back)"
            ) from None

    def _scrub(self, exc: BaseException) -> str:
        """The error in one line, without any password of ours."""
        text = str(exc) or type(exc).__name__
        if type(exc).__name__ not in text:
            text = f"{type(exc).__name__}: {text}"
        return scrub(text, self.urls)


def scrub(text: str, urls: BrokerURLs | None) -> str:
    """``text`` on one line, with the password of every URL in it masked, and the
    passwords of ``urls`` masked wherever they appear (but a user name that happens to
    equal its password stays readable in ``user:***@``)."""
    text = mask_url(" ".join(text.split()))
    for password in urls.passwords() if urls is not None else ():
        text = re.sub(re.escape(password) + r"(?!:\*\*\*@)", "***", text)
    return text


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """``1 dead job``, ``2 dead jobs``: a count with its noun in the right number."""
    return f"{count} {noun if count == 1 else nouns or noun + 's'}"


def confirm(question: str, refusal: str) -> bool:
    """Ask ``question`` on the terminal (True for yes). Without a terminal to ask on,
    refuse with ``refusal`` and how to confirm (--yes), exit status 2."""
    if not sys.stdin.isatty():
        raise UsageError(f"{refusal}; confirm with --yes (no terminal to ask on)")
    answer = input(f"{question} [y/N] ")
    return answer.strip().lower() in ("y", "yes")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[("-" if v is None else str(v)) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [line.format(*headers), line.format(*("-" * w for w in widths))]
    out += [line.format(*r) for r in cells]
    return "\n".join(s.rstrip() for s in out)


def emit(ctx: Context, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2, default=str) if ctx.json else text)


# -- status --------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    ctx = Context(args)
    management_url = args.management_url or os.environ.get("AMQP_MANAGEMENT_URL")
    management = ops.Management(management_url, ctx.urls.first) if management_url else None
    queues = ctx.queues(args.queues)
    if not queues and management:
        queues = management.work_queues(ctx.namespace)
    if not queues:
        raise UsageError(
            "which queues? pass --app module:app or --queue Q (or --management-url to discover)"
        )
    result = ctx.run(lambda b: ops.status(b, queues, management))
    rows = [
        (q.queue, q.high, q.ready, q.unacked, q.consumers, q.due, q.quarantined, q.dead)
        for q in result.queues
    ]
    headers = ("queue", "ready high", "ready normal", "unacked", "consumers", "due")
    text = table((*headers, "quarantine", "dead"), rows)
    text += f"\n\ndelay cascade: {result.delayed} waiting   unroutable: {result.unroutable}"
    if management is None:
        text += "\n(unacked needs the management API: --management-url http://host:15672)"
    emit(ctx, result.to_json(), f"namespace {ctx.namespace} on {ctx.urls}\n\n{text}")
    return 0


# -- schedules -----------------------------------------------------------------------


def cmd_schedules(args: argparse.Namespace) -> int:
    ctx = Context(args)
    result = ctx.run(ops.schedules)
    if result is None:
        emit(
            ctx,
            {"namespace": ctx.namespace, "leader": None, "schedules": []},
            f"namespace {ctx.namespace}: no scheduler has run here yet (a worker of an app"
            " with schedules runs one)",
        )
        return 0
    rows = [
        (r["name"], r["job"], r["when"], r["catch_up"], utc_time(r["last"]), utc_time(r["next"]))
        for r in result.schedules
    ]
    text = table(("schedule", "job", "when", "catch-up", "last tick (UTC)", "next (UTC)"), rows)
    leader = result.leader
    led = (
        f"led by {leader.get('name')} since {utc_time(datetime.fromisoformat(leader['since']))}"
        f" (token of {utc_time(datetime.fromisoformat(leader['at']))})"
        if leader and leader.get("since") and leader.get("at")
        else "no leader has stepped yet"
    )
    emit(ctx, result.to_json(), f"namespace {ctx.namespace}: {led}\n\n{text}")
    return 0


# -- dead ----------------------------------------------------------------------------


def utc_time(value: datetime | None) -> str:
    """A time as the commands print it: UTC, to the second (``-`` for none)."""
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def _short(text: str | None, width: int = 60) -> str:
    text = (text or "").replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def cmd_dead_list(args: argparse.Namespace) -> int:
    ctx = Context(args)
    queue = _one_queue(args.queue)
    selector = ops.select(job=args.job)
    found = ctx.run(lambda b: ops.list_dead(b, queue, limit=args.limit, selector=selector))
    rows = [
        (
            d.job_id,
            d.job_name,
            d.attempts,
            utc_time(d.failed_at),
            d.error_type,
            _short(d.error_message, 50),
            d.reason,
        )
        for d in found
    ]
    text = table(
        ("job id", "job", "attempts", "failed at (UTC)", "error", "message", "reason"), rows
    )
    emit(
        ctx, [d.summary() for d in found], f"{text}\n\n{plural(len(found), 'dead job')} in {queue}"
    )
    return 0


def _one_queue(name: str) -> str:
    try:
        return check_queue_name(name)
    except ContractError as exc:
        raise UsageError(str(exc)) from None


def cmd_dead_show(args: argparse.Namespace) -> int:
    ctx = Context(args)
    queues = ctx.queues(args.queues)
    if not queues:
        raise UsageError("which queues to search? pass --queue Q or --app module:app")
    found = ctx.run(lambda b: ops.find_dead(b, queues, args.job_id))
    if not found:
        searched = ", ".join(dead_queue(ctx.namespace, q) for q in queues)
        raise NotFoundError(
            f"no dead job {args.job_id!r} (nor one whose id starts with it) in {searched}"
        )
    first: dict[str | None, ops.DeadJob] = {}
    for dead in found:
        first.setdefault(dead.job_id, dead)
    if len(first) > 1:
        shown = [f"{d.job_id} ({d.job_name}, {d.queue})" for d in list(first.values())[:10]]
        more = f" and {len(first) - 10} more" if len(first) > 10 else ""
        raise AmqpJobsError(
            f"job id prefix {args.job_id!r} is ambiguous: {plural(len(first), 'dead job')}"
            f" match: {', '.join(shown)}{more}; give more of the id"
        )
    info = found[0].details()
    lines = [f"{k:>14}: {v}" for k, v in info.items() if k not in ("traceback", "headers", "args")]
    lines += ["", "args:", f"  {info['args']}", "", "traceback:", info["traceback"] or "  -"]
    lines += ["", "headers:"] + [
        f"  {k}: {'(the traceback above)' if k == H_ERROR_TRACEBACK else v}"
        for k, v in sorted(info["headers"].items())
    ]
    if len(found) > 1:
        lines += ["", f"({len(found)} dead copies of this job; this is the oldest)"]
    emit(ctx, info, "\n".join(lines))
    return 0


def cmd_dead_replay(args: argparse.Namespace) -> int:
    ctx = Context(args)
    queue = _one_queue(args.queue)
    if not args.all and not args.ids:
        raise UsageError("say which dead jobs to replay: --id JOB_ID (repeatable) or --all")
    selector = ops.select(ids=None if args.all else args.ids, job=args.job)
    bar = _progress_bar(sys.stderr) if not ctx.json else None
    result = ctx.run(lambda b: ops.replay_dead(b, queue, selector, on_progress=bar))
    if bar is not None and sys.stderr.isatty():
        print(file=sys.stderr)
    missing = sorted(set(args.ids or []) - set(result.job_ids))
    text = (
        f"replayed {plural(result.done, 'dead job')} from {queue}"
        f" to {work_queue(ctx.namespace, queue)}"
    )
    if missing:
        text += f"\nnot found in {dead_queue(ctx.namespace, queue)}: {', '.join(missing)}"
    emit(ctx, {"replayed": result.job_ids, "not_found": missing}, text)
    return 1 if missing else 0


def _progress_bar(stream: Any) -> Callable[[ops.Progress], None]:
    def show(progress: ops.Progress) -> None:
        if not stream.isatty() or progress.total == 0:
            return
        width = 30
        filled = width * progress.done // progress.total
        stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {progress.done}/{progress.total}")
        stream.flush()

    return show


def cmd_dead_purge(args: argparse.Namespace) -> int:
    ctx = Context(args)
    queue = _one_queue(args.queue)
    selector = ops.select(job=args.job, older_than=args.older_than)
    if not args.yes:
        matching = ctx.run(lambda b: ops.list_dead(b, queue, selector=selector))
        if not matching:
            emit(ctx, {"removed": 0}, f"no matching dead jobs in {queue}")
            return 0
        jobs = plural(len(matching), "dead job")
        if not confirm(f"Delete {jobs} from {queue}?", f"{jobs} would be deleted"):
            print("nothing deleted")
            return 1
    removed = ctx.run(lambda b: ops.purge_dead(b, queue, selector))
    emit(ctx, {"removed": removed}, f"removed {plural(removed, 'dead job')} from {queue}")
    return 0


# -- enqueue -------------------------------------------------------------------------


def cmd_enqueue(args: argparse.Namespace) -> int:
    ctx = Context(args)
    try:
        payload = json.loads(args.args_json)
    except ValueError as exc:
        raise UsageError(f"ARGS_JSON is not JSON: {exc}") from None
    if ctx.app is None and args.schemas is None:
        raise UsageError("validate against what? pass --app module:app or --schemas DIR")
    delay = args.delay
    run_at = args.at
    if ctx.app is not None:
        spec = ctx.app.registry.get(args.job)
        if spec is None:
            known = ", ".join(sorted(j.name for j in ctx.app.jobs))
            raise UsageError(f"unknown job {args.job!r}; the app's jobs: {known}")
        job: Job[Any] = spec.job
        model = job.validate(payload)  # ArgsValidationError names the field
        body = job.encode_args(model)
        queue = job.queue
        key = job.key_of(model)
    else:
        known_job = schemas.load_job(Path(args.schemas), args.job)
        problems = schemas.validate_args(known_job, payload)
        if problems:
            raise ContractError(f"invalid args for job {args.job!r}: " + "; ".join(problems))
        body = json.dumps(payload, separators=(",", ":")).encode()
        queue = known_job.queue
        key = known_job.key_of(payload)
    headers = {H_KEY: key} if key is not None else None
    envelope = Envelope.new(
        args.job, body, queue, eta_ms=resolve_eta(delay, run_at), headers=headers
    )

    async def send(_: ops.Broker) -> None:
        async with JobClient(
            ctx.urls, namespace=ctx.namespace, settings=ctx.settings, retry_for=ctx.connect_timeout
        ) as client:
            await client.send(envelope, queue)

    ctx.run(send)
    due = (
        f", due {datetime.fromtimestamp(envelope.eta_ms / 1000, UTC).isoformat()}"
        if envelope.eta_ms
        else ""
    )
    emit(
        ctx,
        {"job_id": envelope.job_id, "job": args.job, "queue": queue, "eta_ms": envelope.eta_ms},
        f"enqueued {args.job} as {envelope.job_id} on {queue}{due}",
    )
    return 0


# -- topology ------------------------------------------------------------------------


def topology_plan(ns: str, queues: dict[str, set[str]], s: TopologySettings) -> dict[str, Any]:
    """Every exchange, queue and binding the library declares for these queues: the
    topology module's plan, which the declarer and namespace deletion read too."""
    plan = namespace_plan(ns, queues, s, jobs=queues)
    return {
        "namespace": ns,
        "exchanges": [asdict(e) for e in plan.exchanges],
        "queues": [asdict(q) for q in plan.queues],
        # as RabbitMQ's management API spells a binding
        "bindings": [
            {
                "source": b.source,
                "destination": b.destination,
                "destination_type": "exchange" if b.to_exchange else "queue",
                "key": b.key,
            }
            for b in plan.bindings
        ],
    }


def _queue_jobs(
    ctx: Context, queues: Sequence[str] | None, jobs: Sequence[str] | None
) -> dict[str, set[str]]:
    plan: dict[str, set[str]] = {q: set() for q in ctx.queues(queues)}
    if ctx.app:
        for job in ctx.app.jobs:
            plan.setdefault(job.queue, set()).add(job.name)
    if jobs:
        if len(plan) != 1:
            raise UsageError("--job binds job names to one queue: give exactly one --queue")
        next(iter(plan.values())).update(jobs)
    if not plan:
        raise UsageError("which queues? pass --app module:app or --queue Q")
    return plan


def cmd_topology_show(args: argparse.Namespace) -> int:
    ctx = Context(args)
    plan = topology_plan(ctx.namespace, _queue_jobs(ctx, args.queues, args.jobs), ctx.settings)
    lines = ["exchanges:"]
    lines += [
        f"  {e['name']}  ({e['type']}{', ' + _args(e['arguments']) if e['arguments'] else ''})"
        for e in plan["exchanges"]
    ]
    lines += ["", "queues:"] + [f"  {q['name']}  {_args(q['arguments'])}" for q in plan["queues"]]
    lines += ["", "bindings:"] + [
        f"  {b['source']} -> {b['destination']}  key {b['key']!r}" for b in plan["bindings"]
    ]
    emit(ctx, plan, "\n".join(lines))
    return 0


def _args(arguments: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in arguments.items())


def cmd_topology_declare(args: argparse.Namespace) -> int:
    ctx = Context(args)
    plan = _queue_jobs(ctx, args.queues, args.jobs)

    async def declare(broker: ops.Broker) -> None:
        link = broker.transport.link(ctx.namespace, ctx.settings, name="amqp-jobs cli (declare)")
        try:
            for queue, jobs in sorted(plan.items()):
                await link.declare_queue(queue, jobs)
            await link.declare_cascade()
            await link.declare_events()
            session = await broker.session()  # the scheduler's queues (schedulers
            for token in scheduler_plan(ctx.namespace).queues:  # declare them too)
                await session.declare_queue(token.name, token.arguments)
        finally:
            await link.close()

    ctx.run(declare)
    emit(
        ctx,
        {"namespace": ctx.namespace, "queues": sorted(plan)},
        f"declared namespace {ctx.namespace}: {_queue_names(plan)} and the"
        f" delay cascade ({plural(ctx.settings.delay_levels, 'level')})",
    )
    return 0


def cmd_topology_delete(args: argparse.Namespace) -> int:
    ctx = Context(args)
    queues = ctx.queues(args.queues)
    if not queues:
        raise UsageError("which queues? pass --app module:app or --queue Q")
    # The namespace's exchanges and delay cascade serve every queue of it, named or not:
    # say so, since a queue left out would lose its delayed jobs and its routes.
    where = (
        f"namespace {ctx.namespace} (work {_queue_names(queues)}, and what every queue of"
        " the namespace shares: its exchanges and the delay cascade)"
    )
    if not args.yes:
        contents = ctx.run(lambda b: ops.namespace_contents(b, queues))
        what = _contents(contents, deleting=False)
        if not confirm(f"Delete {where}: {what}?", f"would delete {where}: {what}"):
            print("nothing deleted")
            return 1
    deleted = ctx.run(lambda b: ops.delete_namespace(b, queues))
    emit(ctx, deleted.to_json(), f"deleted {where}: {_contents(deleted, deleting=True)}")
    return 0


def _queue_names(queues: Iterable[str]) -> str:
    """``queue mail`` or ``queues billing, crm``."""
    names = sorted(queues)
    return f"{'queue' if len(names) == 1 else 'queues'} {', '.join(names)}"


def _contents(contents: ops.NamespaceContents, *, deleting: bool) -> str:
    """What deleting a namespace removes (``deleting``: removed), in words."""
    exchanges = plural(len(contents.exchanges), "exchange")
    if not contents.queues:
        text = f"none of its queues existed; its {exchanges}, if any were left"
    else:
        jobs = plural(contents.jobs, "job")
        if not contents.jobs:
            held = " (empty)"
        elif deleting:
            held = f" ({jobs} discarded)"
        else:
            held = f" holding {jobs}, which would be discarded"
        text = f"{plural(len(contents.queues), 'queue')}{held}, and its {exchanges}"
    consumers = plural(contents.consumers, "consumer")
    if contents.consumers and deleting:
        were = "was" if contents.consumers == 1 else "were"
        text += f"; {consumers} {were} attached: their workers declare the queues again"
    elif contents.consumers:
        text += f"; {consumers} attached: stop the workers first, or they declare the queues again"
    return text


# -- schemas and asyncapi -------------------------------------------------------------


def _app_required(ctx: Context) -> JobApp:
    if ctx.app is None:
        raise UsageError("this command reads the job contracts: pass --app module:app")
    return ctx.app


def cmd_schemas_export(args: argparse.Namespace) -> int:
    ctx = Context(args)
    app = _app_required(ctx)
    written = schemas.export(Path(args.directory), app.jobs, ctx.namespace)
    emit(ctx, [str(p) for p in written], "\n".join(f"wrote {p}" for p in written))
    return 0


def cmd_schemas_check(args: argparse.Namespace) -> int:
    ctx = Context(args)
    app = _app_required(ctx)
    drift = schemas.check(Path(args.directory), app.jobs, ctx.namespace)
    if drift.clean:
        emit(ctx, {"clean": True}, f"{args.directory}: schemas match the code")
        return 0
    emit(
        ctx,
        {"clean": False, **drift.__dict__},
        f"{args.directory}: schemas differ from the code ({drift.describe()});"
        f" run `amqp-jobs schemas export {args.directory} --app {args.app}`",
    )
    return 1


def cmd_asyncapi(args: argparse.Namespace) -> int:
    ctx = Context(args)
    app = _app_required(ctx)
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(ctx.urls.first)
    server = f"{parts.hostname}:{parts.port or 5672}" if parts.hostname else None
    vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    doc = schemas.asyncapi(app.jobs, ctx.namespace, ctx.settings, server=server, vhost=vhost)
    text = json.dumps(doc, indent=2) + "\n"
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
