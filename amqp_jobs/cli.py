"""The ``amqp-jobs`` command line.

User errors (a bad argument, an app that does not import, an unreachable broker) print
one line saying what to do and exit 2 or 1; never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import functools
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Awaitable, Sequence
from typing import Any

from amqp_jobs import __version__, commands
from amqp_jobs.commands import UsageError, load_app, parse_duration, parse_when, plural, scrub
from amqp_jobs.contract import Namespace
from amqp_jobs.errors import AmqpJobsError, ContractError, describe
from amqp_jobs.serving import serve, serve_supervisor
from amqp_jobs.supervised import (
    CHILD_SLOT,
    METRICS_CHILD,
    RECYCLE_EXIT,
    SUPERVISOR_FD,
    Limits,
    Supervised,
)
from amqp_jobs.supervisor import Supervisor
from amqp_jobs.urls import DEFAULT_URL, BrokerURLs, resolve
from amqp_jobs.worker import (
    BROKER_CONSUMER_TIMEOUT,
    DEFAULT_CONCURRENCY,
    DEFAULT_GRACE,
    STARTED_AFTER,
    Worker,
)

log = logging.getLogger("amqp_jobs.cli")

URL_HELP = (
    f"broker URL (default: $AMQP_URL, else {DEFAULT_URL}); amqps:// for TLS. For a cluster,"
    " repeat --url once per node (in $AMQP_URL: separate URLs by commas or spaces)"
)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _option(*flags: str, **kwargs: Any) -> argparse.ArgumentParser:
    """One option, declared once, for every subcommand that takes it (``parents=``).

    Subcommands share the option's action: never ``set_defaults`` one of them on a
    subcommand, or every other subcommand gets that default too.
    """
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(*flags, **kwargs)
    return parent


def _connect_timeout(default: float, note: str = "") -> argparse.ArgumentParser:
    """``--connect-timeout``: workers wait longer for the broker than operators do."""
    return _option(
        "--connect-timeout",
        type=parse_duration,
        default=default,
        metavar="SECONDS",
        help=f"seconds to keep trying to reach the broker before giving up (default"
        f" %(default)g){note}",
    )


def _log_level() -> argparse.ArgumentParser:
    """``--log-level``, for the commands that run until stopped (worker, recorder)."""
    return _option(
        "--log-level",
        default=os.environ.get("AMQP_JOBS_LOG_LEVEL", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        metavar="LEVEL",
        help="DEBUG, INFO, WARNING or ERROR (default INFO, or $AMQP_JOBS_LOG_LEVEL)",
    )


def _show_help(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """A command group given no action (``amqp-jobs dead``): its help, which lists them."""
    print(parser.format_help(), end="")
    return 0


def _group(sub: Any, name: str, **kwargs: Any) -> tuple[argparse.ArgumentParser, Any]:
    """A command with actions (``dead list``, ...); without one it prints its help."""
    group = sub.add_parser(
        name, epilog=f"Run `amqp-jobs {name} ACTION --help` for an action's options.", **kwargs
    )
    actions = group.add_subparsers(dest=f"{name}_command", title="actions", metavar="ACTION")
    group.set_defaults(handler=functools.partial(_show_help, group))
    return group, actions


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="amqp-jobs",
        description="Background jobs on RabbitMQ: run workers and operate queues.",
        epilog="Run `amqp-jobs COMMAND --help` for a command's options.",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"amqp-jobs {__version__}",
        help="print the version and exit",
    )
    # no command: main() prints this help (to stdout, exit 0, as pip does)
    sub = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    url = _option("--url", default=None, action="append", metavar="URL", help=URL_HELP)
    namespace = _option(
        "--namespace",
        default=None,
        metavar="NS",
        help="namespace: the prefix of every exchange and queue (default: the app's, else"
        " $AMQP_JOBS_NAMESPACE)",
    )

    worker = sub.add_parser(
        "worker",
        parents=[
            url,
            namespace,
            _connect_timeout(30.0, "; once connected, it reconnects forever"),
            _log_level(),
        ],
        help="run a worker for an app's queues",
        description=(
            "Consume the app's work queues and run their handlers. SIGTERM or SIGINT stops"
            " consuming and gives in-flight jobs --grace seconds to finish, returning the"
            " rest to the queue (exit 0); a second signal exits at once."
        ),
    )
    worker.add_argument("app", help="the JobApp to run, as module:attribute")
    worker.add_argument(
        "--queue",
        "-q",
        action="append",
        dest="queues",
        metavar="QUEUE",
        help="queue to consume (repeatable; default: every queue the app has handlers for)",
    )
    worker.add_argument(
        "--concurrency",
        "-c",
        type=_positive_int,
        default=DEFAULT_CONCURRENCY,
        metavar="N",
        help=f"jobs run at once, and the prefetch count (twice N with --events; default"
        f" {DEFAULT_CONCURRENCY})",
    )
    worker.add_argument(
        "--grace",
        type=parse_duration,
        default=DEFAULT_GRACE,
        metavar="SECONDS",
        help=f"seconds in-flight jobs get to finish on shutdown (default {DEFAULT_GRACE:.0f})",
    )
    worker.add_argument(
        "--consumer-timeout",
        type=parse_duration,
        default=BROKER_CONSUMER_TIMEOUT,
        metavar="SECONDS",
        help="the broker's consumer_timeout in seconds; job timeouts must stay below it"
        f" (default {BROKER_CONSUMER_TIMEOUT:.0f}, RabbitMQ's default)",
    )
    worker.add_argument(
        "--no-success-log",
        dest="log_success",
        action="store_false",
        help="no INFO line per succeeded job ('job NAME ID succeeded in 12 ms, attempt 1'),"
        " for high throughput; retries, dead letters and deferrals are still logged",
    )
    worker.add_argument(
        "--events",
        action="store_true",
        help="publish a lifecycle event per transition of each job to the {ns}.events"
        " exchange and stream (see the README's 'Lifecycle events')",
    )
    worker.add_argument(
        "--started-after",
        type=parse_duration,
        default=STARTED_AFTER,
        metavar="SECONDS",
        help="with --events, publish an attempt's started event once it has run this long"
        f" (default {STARTED_AFTER:g}; 0: every start); a quicker attempt's end event"
        " carries its start",
    )
    worker.add_argument(
        "--no-scheduler",
        action="store_true",
        help="never run the app's schedules: stand aside from the namespace's scheduler"
        " election (see the README's 'Periodic jobs')",
    )
    worker.add_argument(
        "--store",
        default=None,
        metavar="URL",
        help="also run a job-log recorder in this process, into this store (implies"
        " --events); see `amqp-jobs recorder`",
    )
    worker.add_argument(
        "--processes",
        "-p",
        type=_positive_int,
        default=1,
        metavar="N",
        help="run N worker processes under a supervisor, which restarts one that dies and"
        " passes signals on (default 1: this process is the worker)",
    )
    worker.add_argument(
        "--max-jobs",
        type=_positive_int,
        default=None,
        metavar="N",
        help="recycle a worker process after N jobs: it drains and a fresh one takes over"
        " (runs the supervisor, even for one process)",
    )
    worker.add_argument(
        "--max-memory",
        type=_positive_int,
        default=None,
        metavar="MIB",
        help="recycle a worker process once its resident memory passes MIB mebibytes"
        " (runs the supervisor, even for one process)",
    )
    worker.add_argument(
        "--metrics",
        default=None,
        metavar="[HOST:]PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (host default"
        " 127.0.0.1; with --processes, the supervisor serves every process's); needs"
        " amqp-jobs[metrics]",
    )
    worker.add_argument(
        "--tracing",
        action="store_true",
        help="an OpenTelemetry CONSUMER span per attempt, through the global tracer"
        " provider (configure an SDK, e.g. with opentelemetry-instrument); needs"
        " amqp-jobs[tracing]",
    )
    worker.set_defaults(handler=run_worker_command)
    app = _option(
        "--app",
        default=None,
        metavar="MODULE:APP",
        help="a JobApp, as module:attribute: supplies the namespace, jobs, queues and settings",
    )
    json_out = _option("--json", action="store_true", help="print JSON instead of text")
    _add_operations(sub, url=url, namespace=namespace, app=app, json_out=json_out)
    _add_job_log(sub, url=url, namespace=namespace, app=app, json_out=json_out)
    return parser


def _add_job_log(sub: Any, **common: argparse.ArgumentParser) -> None:
    from amqp_jobs import log_commands as lc

    url, namespace, app, json_out = (common[k] for k in ("url", "namespace", "app", "json_out"))
    store = _option("--store", default=None, metavar="URL", help=lc.STORE_HELP)
    rec = sub.add_parser(
        "recorder",
        parents=[url, namespace, app, store, _connect_timeout(30.0), _log_level()],
        help="keep the job log: record the namespace's lifecycle events into a store",
        description=(
            "Consume the namespace's events stream into the store: one row per job, with its"
            " attempts. Run as many as you like: one leads per namespace (it holds the"
            " lock {ns}.recorder), the others take over within a second of its"
            " connection closing. Workers must run with --events (or --store)."
        ),
    )
    rec.add_argument(
        "--keep",
        action="append",
        type=lc.parse_keep,
        metavar="STATE=DURATION",
        help="how long rows of an ended job are kept, per state (repeatable; default"
        " succeeded=7d, discarded=7d, dead=forever)",
    )
    rec.set_defaults(handler=lc.cmd_recorder)

    _, jsub = _group(
        sub,
        "jobs",
        help="what happened to jobs: the job log",
        description="Query the job log a recorder keeps (amqp-jobs recorder).",
    )
    jl = jsub.add_parser(
        "list",
        parents=[namespace, app, store, json_out],
        help="jobs, most recently updated first",
        description="Jobs matching every filter given, most recently updated first.",
    )
    jl.add_argument("--state", choices=lc.STATES, default=None, help="only jobs in this state")
    jl.add_argument("--job", default=None, metavar="NAME", help="only jobs of this name")
    jl.add_argument("--key", default=None, metavar="KEY", help="only jobs of this job key")
    jl.add_argument(
        "--since",
        type=parse_duration,
        default=None,
        metavar="DURATION",
        help="only jobs updated within this long (e.g. 1h, 7d)",
    )
    jl.add_argument(
        "--limit", type=_positive_int, default=100, metavar="N", help="at most N (default 100)"
    )
    jl.set_defaults(handler=lc.cmd_jobs_list)
    js = jsub.add_parser(
        "show",
        parents=[namespace, app, store, json_out],
        help="one job: state, attempts, error, traceback, result",
        description="One job from the job log; an id it has no record of is 'unknown' (exit 1).",
    )
    js.add_argument("job_id", metavar="JOB_ID", help="the job's id")
    js.set_defaults(handler=lc.cmd_jobs_show)


def _add_operations(sub: Any, **common: argparse.ArgumentParser) -> None:
    url, namespace, app, json_out = (common[k] for k in ("url", "namespace", "app", "json_out"))
    queues = _option(
        "--queue",
        "-q",
        action="append",
        dest="queues",
        metavar="QUEUE",
        help="a work queue (repeatable), besides the app's queues",
    )
    job = _option("--job", default=None, metavar="NAME", help="only jobs of this name")
    # What each kind of command takes: every option offered does something there.
    offline = [namespace, app, json_out]  # reads the app or the schemas, never the broker
    online = [url, *offline, _connect_timeout(10.0)]  # talks to the broker

    status = sub.add_parser(
        "status",
        parents=[*online, queues],
        help="queue depths of a namespace",
        description=(
            "One table for the namespace: each work queue's ready, unacknowledged and"
            " consumer counts, jobs in its due, quarantine and dead-letter queues, jobs waiting"
            " in the delay cascade, and unroutable jobs. Exits 1 if the broker cannot be"
            " reached."
        ),
    )
    status.add_argument(
        "--management-url",
        default=None,
        metavar="URL",
        help="RabbitMQ management API (e.g. http://127.0.0.1:15672) for unacked counts and"
        " queue discovery (default: $AMQP_MANAGEMENT_URL); credentials default to the URL's",
    )
    status.set_defaults(handler=commands.cmd_status)

    schedules = sub.add_parser(
        "schedules",
        parents=online,
        help="periodic jobs: last and next tick, and which process leads",
        description=(
            "The schedules the namespace's scheduler runs (every worker of an app with"
            " schedules stands for it; one leads), each with its last and next tick, and"
            " the leading process. Read from the newest token's copy in"
            " {namespace}.scheduler.status. Exits 1 if the broker cannot be reached."
        ),
    )
    schedules.set_defaults(handler=commands.cmd_schedules)

    _, dsub = _group(
        sub,
        "dead",
        help="inspect, replay and purge dead jobs",
        description="Dead-letter queues: list, show, replay and purge dead jobs.",
    )

    dl = dsub.add_parser(
        "list",
        parents=[*online, job],
        help="list a queue's dead jobs, oldest first",
        description=(
            "List the dead jobs of QUEUE, oldest first: job id, job name, attempts, failed at,"
            " error type and message, dead reason. The queue is left exactly as it was."
        ),
    )
    dl.add_argument("queue", metavar="QUEUE", help="work queue name (not the full dead queue)")
    dl.add_argument(
        "--limit", type=_positive_int, default=None, metavar="N", help="show at most N jobs"
    )
    dl.set_defaults(handler=commands.cmd_dead_list)

    ds = dsub.add_parser(
        "show",
        parents=[*online, queues],
        help="everything about one dead job",
        description=(
            "Everything about one dead job: error, traceback, args and headers. JOB_ID may be"
            " the start of the id (the 8 characters the demo prints) if only one dead job's"
            " id starts so; an ambiguous start lists the candidates (exit 1)."
        ),
    )
    ds.add_argument(
        "job_id", metavar="JOB_ID", help="the job id (message_id) of the dead job, or its start"
    )
    ds.set_defaults(handler=commands.cmd_dead_show)

    dr = dsub.add_parser(
        "replay",
        parents=[*online, job],
        help="send dead jobs back to their work queue",
        description=(
            "Republish dead jobs of QUEUE to its work queue with job-attempt reset to 1 and"
            " the same job id; each copy is confirmed by the broker before the dead one is"
            " removed. Interrupted, nothing is lost: run it again to finish. Exits 1 if an"
            " --id was not found."
        ),
    )
    dr.add_argument("queue", metavar="QUEUE", help="work queue whose dead jobs to replay")
    which = dr.add_mutually_exclusive_group()
    which.add_argument(
        "--id", action="append", dest="ids", metavar="JOB_ID", help="a job to replay (repeatable)"
    )
    which.add_argument("--all", action="store_true", help="replay every dead job of QUEUE")
    dr.set_defaults(handler=commands.cmd_dead_replay)

    dp = dsub.add_parser(
        "purge",
        parents=[*online, job],
        help="delete dead jobs",
        description=(
            "Delete the dead jobs of QUEUE (all, or those matching --job and --older-than)."
            " Asks before deleting unless --yes; says how many it removed."
        ),
    )
    dp.add_argument("queue", metavar="QUEUE", help="work queue whose dead jobs to delete")
    dp.add_argument(
        "--older-than",
        type=parse_duration,
        default=None,
        metavar="DURATION",
        help="only jobs that died longer ago than this (e.g. 7d, 12h, 30m)",
    )
    dp.add_argument("--yes", "-y", action="store_true", help="do not ask")
    dp.set_defaults(handler=commands.cmd_dead_purge)

    enq = sub.add_parser(
        "enqueue",
        parents=online,
        help="publish one job, validated against its contract",
        description=(
            "Publish JOB_NAME with ARGS_JSON, validated first against the job's contract:"
            " the app's pydantic model (--app) or the exported JSON Schema (--schemas DIR)."
            " A validation error names the field and exits 1."
        ),
    )
    enq.add_argument("job", metavar="JOB_NAME", help="the job's name, e.g. emails.send_welcome")
    enq.add_argument("args_json", metavar="ARGS_JSON", help="the args, e.g. '{\"user_id\": 1}'")
    when = enq.add_mutually_exclusive_group()
    when.add_argument(
        "--delay", type=parse_duration, default=None, metavar="DURATION", help="e.g. 30s, 5m, 2h"
    )
    when.add_argument(
        "--at", type=parse_when, default=None, metavar="ISO-8601",
        help="run at this time (UTC unless the time has a zone)",
    )  # fmt: skip
    enq.add_argument("--schemas", default=None, metavar="DIR", help="validate with these schemas")
    enq.set_defaults(handler=commands.cmd_enqueue)

    _, tsub = _group(
        sub,
        "topology",
        help="show, declare or delete the exchanges and queues",
        description=(
            "What the library declares for a namespace, declaring it up front, and deleting it."
        ),
    )
    bind = _option(
        "--job", action="append", dest="jobs", metavar="NAME",
        help="a job name to bind to the one --queue (repeatable)",
    )  # fmt: skip
    for name, handler, text, takes in (
        ("show", commands.cmd_topology_show, "print every exchange, queue and binding", offline),
        ("declare", commands.cmd_topology_declare, "declare them on the broker (idempotent)",
         online),
    ):  # fmt: skip
        t = tsub.add_parser(
            name,
            parents=[*takes, queues, bind],
            help=text,
            description=text[0].upper() + text[1:] + ".",
        )
        t.set_defaults(handler=handler)
    td = tsub.add_parser(
        "delete",
        parents=[*online, queues],
        help="delete every exchange and queue of the namespace",
        description=(
            "Delete every exchange and queue of the namespace for the app's queues and the"
            " --queue ones: work, due, quarantine and dead-letter queues, the delay cascade,"
            " and the jobs in them. Says what it would delete (queues, and the jobs they hold)"
            " and asks first, unless --yes; without a terminal to ask on, refuses (exit 2)."
        ),
    )
    td.add_argument("--yes", "-y", action="store_true", help="do not ask")
    td.set_defaults(handler=commands.cmd_topology_delete)

    _, ssub = _group(
        sub,
        "schemas",
        help="export or check the JSON Schemas of the jobs",
        description="One JSON Schema per job, plus envelope.json (protocol 1 headers).",
    )
    se = ssub.add_parser(
        "export",
        parents=offline,
        help="write the schemas to DIR",
        description="Write the schemas to DIR.",
    )
    se.add_argument("directory", metavar="DIR", help="directory to write (created if missing)")
    se.set_defaults(handler=commands.cmd_schemas_export)
    sc = ssub.add_parser(
        "check",
        parents=offline,
        help="fail if DIR differs from the code",
        description="Exit 1 when the schemas in DIR differ from the code (missing, extra,"
        " changed).",
    )
    sc.add_argument("directory", metavar="DIR", help="directory of checked-in schemas")
    sc.set_defaults(handler=commands.cmd_schemas_check)

    api = sub.add_parser(
        "asyncapi",
        # --url names the server in the document; nothing connects, and it is JSON anyway
        parents=[url, namespace, app],
        help="write an AsyncAPI 3.0 document of the namespace",
        description=(
            "An AsyncAPI 3.0 document: the jobs exchange and routing keys, each job's message"
            " (payload schema and headers), and the work queues; --url names the server."
        ),
    )
    api.add_argument("--output", "-o", default=None, metavar="FILE", help="default: stdout")
    api.set_defaults(handler=commands.cmd_asyncapi)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse already printed
        return int(exc.code or 0)
    if args.command is None:
        print(parser.format_help(), end="")
        return 0
    try:
        if args.command in ("worker", "recorder"):
            return int(args.handler(args))
        # Operations commands speak for themselves: library retries and the AMQP client's
        # own log lines would bury the one-line answer (AMQP_JOBS_LOG_LEVEL shows them).
        logging.basicConfig(
            level=os.environ.get("AMQP_JOBS_LOG_LEVEL", "CRITICAL"),
            format="%(levelname)s %(name)s: %(message)s",
        )
        handler: Any = args.handler
        return int(handler(args))
    except UsageError as exc:
        _error(exc, args)
        return 2
    except AmqpJobsError as exc:
        _error(exc, args)
        return 1
    except OSError as exc:  # a file that cannot be written; a broker lost below the library
        _error(exc, args)
        return 1
    except KeyboardInterrupt:
        print("amqp-jobs: interrupted", file=sys.stderr)
        return 130


def _error(exc: BaseException, args: argparse.Namespace) -> None:
    """``exc`` as one line on stderr, with no password of the command's broker URLs."""
    try:
        urls: BrokerURLs | None = resolve(getattr(args, "url", None))
    except ContractError:
        urls = None
    print(f"amqp-jobs: error: {scrub(str(exc) or type(exc).__name__, urls)}", file=sys.stderr)


def run_worker_command(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    supervising = args.processes > 1 or args.max_jobs or args.max_memory
    if supervising and SUPERVISOR_FD not in os.environ:
        return _supervise(args)
    app = load_app(args.app)
    try:
        urls = resolve(args.url)
    except ContractError as exc:
        raise UsageError(str(exc)) from None
    namespace = Namespace(args.namespace, app.settings) if args.namespace else app.ns
    limits = Limits(args.max_jobs, args.max_memory * 2**20 if args.max_memory else None)
    supervised = Supervised(lambda: worker.stop(), limits, shorten_grace=lambda s: shorten(s))
    middleware = [*app.worker_middleware]
    if limits.max_jobs is not None:
        middleware.append(supervised.counting())
    metrics = _worker_metrics(args.metrics)
    if metrics is not None:
        middleware.insert(0, metrics)
    if args.tracing:
        middleware.insert(0, _tracing())
    worker = Worker(
        app.registry,
        namespace=namespace,
        url=urls,
        hooks=app.hooks,
        middleware=middleware,
        queues=args.queues,
        concurrency=args.concurrency,
        grace=args.grace,
        consumer_timeout=args.consumer_timeout,
        connect_timeout=args.connect_timeout,
        name=f"amqp-jobs worker {os.getpid()}",
        log_success=args.log_success,
        events=args.events or args.store is not None,
        started_after=args.started_after,
        scheduler=not args.no_scheduler,
    )

    def shorten(most: float) -> None:
        worker.grace = min(worker.grace, most)

    log.info("starting worker for %s on %s", args.app, urls)
    if args.store is None:
        asyncio.run(serve(_sampling(worker.run(), worker, metrics), worker.stop, supervised))
    else:
        from amqp_jobs.joblog.recorder import Recorder
        from amqp_jobs.log_commands import store_url

        recorder = Recorder(
            store_url(args.store),
            namespace=namespace,
            url=urls,
            connect_timeout=args.connect_timeout,
        )
        main = _sampling(_together(worker, recorder), worker, metrics)
        asyncio.run(serve(main, worker.stop, supervised))
    _exit_if_handlers_linger(worker, RECYCLE_EXIT if supervised.recycling else 0)
    return RECYCLE_EXIT if supervised.recycling else 0


def _worker_metrics(address: str | None) -> Any:
    """The Metrics middleware of a worker process, if asked for: served here when this
    process is the only one; written for the supervisor to serve when it is a child."""
    child = os.environ.get(METRICS_CHILD) == "1"
    if address is None and not child:
        return None
    m = _metrics_module()
    if child:
        return m.Metrics()
    assert address is not None
    from prometheus_client import REGISTRY

    found = m.Metrics(REGISTRY)  # with the process's own CPU and memory metrics
    m.serve(_metrics_address(address), REGISTRY)
    return found


def _metrics_module() -> Any:
    """``amqp_jobs.metrics``, or a usage error naming the extra it needs."""
    try:
        from amqp_jobs import metrics
    except ImportError:
        raise UsageError(
            "--metrics needs prometheus-client: pip install 'amqp-jobs[metrics]'"
        ) from None
    return metrics


def _tracing() -> Any:
    try:
        from amqp_jobs.tracing import Tracing
    except ImportError:
        raise UsageError(
            "--tracing needs opentelemetry-api: pip install 'amqp-jobs[tracing]'"
        ) from None
    return Tracing()


def _metrics_address(text: str) -> tuple[str, int]:
    from amqp_jobs.metrics import parse_address

    try:
        return parse_address(text)
    except ContractError as exc:
        raise UsageError(str(exc)) from None


async def _sampling(main: Awaitable[None], worker: Worker, metrics: Any) -> None:
    """``main``, and with metrics the queue depths sampled alongside it by one process:
    the only worker, or a supervisor's first child."""
    if metrics is None or os.environ.get(CHILD_SLOT, "0") != "0":
        await main
        return
    link = worker.transport.link(
        worker.namespace, worker.settings, name=f"{worker.name} (metrics)", declare=False
    )
    stop = asyncio.Event()
    sampler = asyncio.ensure_future(
        metrics.sample_depths(link, worker.namespace, worker.queues, stop)
    )
    try:
        await main
    finally:
        stop.set()
        sampler.cancel()  # it may be reconnecting: shutdown does not wait for that
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await sampler
        with contextlib.suppress(Exception):
            await link.close()


def _supervise(args: argparse.Namespace) -> int:
    """``--processes N`` (or a recycling limit): a supervisor of N children, each an
    ``amqp-jobs worker`` of one process given the same options. The broker URLs reach
    them through the environment, not their command lines."""
    try:
        urls = resolve(args.url)
    except ContractError as exc:
        raise UsageError(str(exc)) from None
    argv = ["worker", args.app, "--concurrency", str(args.concurrency)]
    argv += ["--grace", repr(args.grace), "--consumer-timeout", repr(args.consumer_timeout)]
    argv += ["--connect-timeout", repr(args.connect_timeout), "--log-level", args.log_level]
    argv += ["--started-after", repr(args.started_after)]
    argv += [x for q in args.queues or () for x in ("--queue", q)]
    argv += ["--namespace", args.namespace] if args.namespace else []
    argv += [] if args.log_success else ["--no-success-log"]
    argv += ["--events"] if args.events else []
    argv += ["--no-scheduler"] if args.no_scheduler else []
    argv += ["--store", args.store] if args.store else []
    argv += ["--max-jobs", str(args.max_jobs)] if args.max_jobs else []
    argv += ["--max-memory", str(args.max_memory)] if args.max_memory else []
    argv += ["--tracing"] if args.tracing else []
    env = {**os.environ, "AMQP_URL": ",".join(urls.urls)}
    if args.metrics is None:
        supervisor = Supervisor(argv, args.processes, grace=args.grace, env=env)
        return asyncio.run(serve_supervisor(supervisor))
    address = _metrics_address(args.metrics)
    m = _metrics_module()
    directory = tempfile.mkdtemp(prefix="amqp-jobs-metrics-")
    try:
        env |= {"PROMETHEUS_MULTIPROC_DIR": directory, METRICS_CHILD: "1"}
        children = m.ChildrenMetrics(directory)
        m.serve(address, children.registry)
        supervisor = Supervisor(
            argv, args.processes, grace=args.grace, env=env, on_exit=[children.forget]
        )
        return asyncio.run(serve_supervisor(supervisor))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def _together(worker: Worker, recorder: Any) -> None:
    """A worker and a recorder in one process: the recorder stops when the worker has.
    A recorder that fails (its lock refused, its store unreachable at start) stops the
    worker, and says why at once: never a worker running on with nothing recorded."""
    recording = asyncio.ensure_future(recorder.run())

    def ended(task: asyncio.Future[None]) -> None:
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("the job log's recorder failed: %s; stopping the worker", describe(exc))
            worker.stop()

    recording.add_done_callback(ended)
    try:
        await worker.run()
    finally:
        recorder.stop()
        await recording


def _exit_if_handlers_linger(worker: Worker, status: int = 0) -> None:
    """A plain handler still running once the worker stopped (past its job's timeout, or
    cut off by the grace period) cannot be stopped, and Python would wait for its thread
    at exit: run the atexit hooks (exporters flush), then exit without it. Otherwise
    return: the pool's idle threads end by themselves, and the exit is a normal one."""
    running = worker.handlers_running()
    if not running:
        return
    jobs = ", ".join(f"{name} {job_id}" for name, job_id in running[:5])
    log.warning(
        "%s still running (%s%s); exiting without waiting for %s",
        plural(len(running), "handler thread"),
        jobs,
        ", …" if len(running) > 5 else "",
        "it" if len(running) == 1 else "them",
    )
    atexit._run_exitfuncs()  # what a normal exit runs (logging.shutdown among them)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    sys.exit(main())
