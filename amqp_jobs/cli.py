"""The ``amqp-jobs`` command line.

User errors (a bad argument, an app that does not import, an unreachable broker) print
one line saying what to do and exit 2 or 1; never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

from amqp_jobs import commands
from amqp_jobs.commands import UsageError, load_app, parse_duration, parse_when
from amqp_jobs.errors import AmqpJobsError, ContractError
from amqp_jobs.urls import DEFAULT_URL, resolve
from amqp_jobs.worker import BROKER_CONSUMER_TIMEOUT, DEFAULT_CONCURRENCY, DEFAULT_GRACE, Worker

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


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="amqp-jobs",
        description="Background jobs on RabbitMQ: run workers and operate queues.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    worker = sub.add_parser(
        "worker",
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
        help=f"jobs run at once, and the prefetch count (default {DEFAULT_CONCURRENCY})",
    )
    worker.add_argument(
        "--grace",
        type=_seconds,
        default=DEFAULT_GRACE,
        help=f"seconds in-flight jobs get to finish on shutdown (default {DEFAULT_GRACE:.0f})",
    )
    worker.add_argument("--url", default=None, action="append", metavar="URL", help=URL_HELP)
    worker.add_argument(
        "--namespace",
        default=None,
        help="override the app's namespace (prefix of every exchange and queue)",
    )
    worker.add_argument(
        "--consumer-timeout",
        type=_seconds,
        default=BROKER_CONSUMER_TIMEOUT,
        help="the broker's consumer_timeout in seconds; job timeouts must stay below it"
        f" (default {BROKER_CONSUMER_TIMEOUT:.0f}, RabbitMQ's default)",
    )
    worker.add_argument(
        "--connect-timeout",
        type=_seconds,
        default=30.0,
        help="seconds to keep trying the first connection before giving up (default 30)",
    )

    worker.add_argument(
        "--log-level",
        default=os.environ.get("AMQP_JOBS_LOG_LEVEL", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging level (default INFO, or $AMQP_JOBS_LOG_LEVEL)",
    )
    _add_operations(sub)
    return parser


def _common(p: argparse.ArgumentParser, *, app: bool = True, json_out: bool = True) -> None:
    p.add_argument("--url", default=None, action="append", metavar="URL", help=URL_HELP)
    p.add_argument(
        "--namespace",
        default=None,
        help="namespace (default: the app's, else $AMQP_JOBS_NAMESPACE)",
    )
    if app:
        p.add_argument("--app", default=None, help="a JobApp, as module:attribute")
    if json_out:
        p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument(
        "--connect-timeout",
        type=_seconds,
        default=10.0,
        help="seconds to keep trying to reach the broker (default 10)",
    )


def _add_operations(sub: Any) -> None:
    status = sub.add_parser(
        "status",
        help="queue depths of a namespace",
        description=(
            "One table for the namespace: each work queue's ready, unacknowledged and"
            " consumer counts, jobs in its due, quarantine and dead-letter queues, jobs waiting"
            " in the delay cascade, and unroutable jobs. Exits 1 if the broker cannot be"
            " reached."
        ),
    )
    _common(status)
    status.add_argument(
        "--queue", "-q", action="append", dest="queues", metavar="QUEUE",
        help="a work queue to show (repeatable; default: the app's queues)",
    )  # fmt: skip
    status.add_argument(
        "--management-url",
        default=None,
        help="RabbitMQ management API (e.g. http://127.0.0.1:15672) for unacked counts and"
        " queue discovery (default: $AMQP_MANAGEMENT_URL); credentials default to the URL's",
    )
    status.set_defaults(handler=commands.cmd_status)

    dead = sub.add_parser(
        "dead",
        help="inspect, replay and purge dead jobs",
        description="Dead-letter queues: list, show, replay and purge dead jobs.",
    )
    dsub = dead.add_subparsers(dest="dead_command", metavar="ACTION")
    dsub.required = True

    dl = dsub.add_parser(
        "list",
        help="list a queue's dead jobs, oldest first",
        description=(
            "List the dead jobs of QUEUE, oldest first: job id, job name, attempts, failed at,"
            " error type and message, dead reason. The queue is left exactly as it was."
        ),
    )
    dl.add_argument("queue", metavar="QUEUE", help="work queue name (not the full dead queue)")
    dl.add_argument("--limit", type=_positive_int, default=None, help="show at most N jobs")
    dl.add_argument("--job", default=None, metavar="NAME", help="only jobs of this name")
    _common(dl)
    dl.set_defaults(handler=commands.cmd_dead_list)

    ds = dsub.add_parser(
        "show",
        help="everything about one dead job",
        description="Everything about one dead job: error, traceback, args and headers.",
    )
    ds.add_argument("job_id", metavar="JOB_ID", help="the job id (message_id) of the dead job")
    ds.add_argument(
        "--queue", "-q", action="append", dest="queues", metavar="QUEUE",
        help="queue(s) to search (default: the app's queues)",
    )  # fmt: skip
    _common(ds)
    ds.set_defaults(handler=commands.cmd_dead_show)

    dr = dsub.add_parser(
        "replay",
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
    dr.add_argument("--job", default=None, metavar="NAME", help="only jobs of this name")
    _common(dr)
    dr.set_defaults(handler=commands.cmd_dead_replay)

    dp = dsub.add_parser(
        "purge",
        help="delete dead jobs",
        description=(
            "Delete the dead jobs of QUEUE (all, or those matching --job and --older-than)."
            " Asks before deleting unless --yes; says how many it removed."
        ),
    )
    dp.add_argument("queue", metavar="QUEUE", help="work queue whose dead jobs to delete")
    dp.add_argument("--job", default=None, metavar="NAME", help="only jobs of this name")
    dp.add_argument(
        "--older-than",
        type=parse_duration,
        default=None,
        metavar="DURATION",
        help="only jobs that died longer ago than this (e.g. 7d, 12h, 30m)",
    )
    dp.add_argument("--yes", "-y", action="store_true", help="do not ask")
    _common(dp)
    dp.set_defaults(handler=commands.cmd_dead_purge)

    enq = sub.add_parser(
        "enqueue",
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
    _common(enq)
    enq.set_defaults(handler=commands.cmd_enqueue)

    topo = sub.add_parser(
        "topology",
        help="show or declare the exchanges and queues",
        description="What the library declares for a namespace, and declaring it up front.",
    )
    tsub = topo.add_subparsers(dest="topology_command", metavar="ACTION")
    tsub.required = True
    for name, handler, text in (
        ("show", commands.cmd_topology_show, "print every exchange, queue and binding"),
        ("declare", commands.cmd_topology_declare, "declare them on the broker (idempotent)"),
    ):
        t = tsub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        t.add_argument(
            "--queue", "-q", action="append", dest="queues", metavar="QUEUE",
            help="a work queue (repeatable; default: the app's)",
        )  # fmt: skip
        t.add_argument(
            "--job", action="append", dest="jobs", metavar="NAME",
            help="a job name to bind to the one --queue (repeatable)",
        )  # fmt: skip
        _common(t)
        t.set_defaults(handler=handler)

    sch = sub.add_parser(
        "schemas",
        help="export or check the JSON Schemas of the jobs",
        description="One JSON Schema per job, plus envelope.json (protocol 1 headers).",
    )
    ssub = sch.add_subparsers(dest="schemas_command", metavar="ACTION")
    ssub.required = True
    se = ssub.add_parser(
        "export", help="write the schemas to DIR", description="Write the schemas to DIR."
    )
    se.add_argument("directory", metavar="DIR", help="directory to write (created if missing)")
    _common(se)
    se.set_defaults(handler=commands.cmd_schemas_export)
    sc = ssub.add_parser(
        "check",
        help="fail if DIR differs from the code",
        description="Exit 1 when the schemas in DIR differ from the code (missing, extra,"
        " changed).",
    )
    sc.add_argument("directory", metavar="DIR", help="directory of checked-in schemas")
    _common(sc)
    sc.set_defaults(handler=commands.cmd_schemas_check)

    api = sub.add_parser(
        "asyncapi",
        help="write an AsyncAPI 3.0 document of the namespace",
        description=(
            "An AsyncAPI 3.0 document: the jobs exchange and routing keys, each job's message"
            " (payload schema and headers), and the work queues."
        ),
    )
    api.add_argument("--output", "-o", default=None, metavar="FILE", help="default: stdout")
    _common(api, json_out=False)
    api.set_defaults(handler=commands.cmd_asyncapi)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse already printed
        return int(exc.code or 0)
    try:
        if args.command == "worker":
            return run_worker_command(args)
        # Operations commands speak for themselves: library retries and the AMQP client's
        # own log lines would bury the one-line answer (AMQP_JOBS_LOG_LEVEL shows them).
        logging.basicConfig(
            level=os.environ.get("AMQP_JOBS_LOG_LEVEL", "CRITICAL"),
            format="%(levelname)s %(name)s: %(message)s",
        )
        handler: Any = args.handler
        return int(handler(args))
    except UsageError as exc:
        print(f"amqp-jobs: error: {exc}", file=sys.stderr)
        return 2
    except AmqpJobsError as exc:
        print(f"amqp-jobs: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("amqp-jobs: interrupted", file=sys.stderr)
        return 130


def run_worker_command(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    app = load_app(args.app)
    try:
        urls = resolve(args.url)
    except ContractError as exc:
        raise UsageError(str(exc)) from None
    options: dict[str, object] = {
        "queues": args.queues,
        "concurrency": args.concurrency,
        "grace": args.grace,
        "consumer_timeout": args.consumer_timeout,
        "connect_timeout": args.connect_timeout,
        "name": f"amqp-jobs worker {os.getpid()}",
    }
    if args.namespace:
        options["namespace"] = args.namespace
    worker = app.worker(urls, **options)
    log.info("starting worker for %s on %s", args.app, urls)
    asyncio.run(_serve(worker))
    _exit_if_threads_linger()
    return 0


async def _serve(worker: Worker) -> None:
    """Run the worker; first SIGTERM/SIGINT stops it gracefully, the second exits now."""
    loop = asyncio.get_running_loop()
    signals = 0

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            log.info("%s received: stopping gracefully", signal.Signals(signum).name)
            worker.stop()
        else:
            log.warning("second signal: exiting at once; unfinished jobs return to the queue")
            logging.shutdown()
            os._exit(1)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    await worker.run()


def _exit_if_threads_linger() -> None:
    """A sync handler past its timeout cannot be killed; do not wait on it at exit."""
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    if others:
        log.warning("%d handler threads still running; exiting without them", len(others))
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
