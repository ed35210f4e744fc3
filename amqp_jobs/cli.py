"""The ``amqp-jobs`` command line.

User errors (a bad argument, an app that does not import, an unreachable broker) print
one line saying what to do and exit 2 or 1; never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence

from amqp_jobs.app import JobApp
from amqp_jobs.connection import DEFAULT_URL, mask_url
from amqp_jobs.errors import AmqpJobsError
from amqp_jobs.worker import BROKER_CONSUMER_TIMEOUT, DEFAULT_CONCURRENCY, DEFAULT_GRACE, Worker

log = logging.getLogger("amqp_jobs.cli")


class UsageError(Exception):
    """A mistake on the command line; printed as one line, exit status 2."""


def load_app(target: str) -> JobApp:
    """Import ``module:attribute`` and return the JobApp it names."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"expected module:app (e.g. myproject.jobs:app), got {target!r}")
    if "" not in sys.path and os.getcwd() not in sys.path:
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
    worker.add_argument(
        "--url",
        default=None,
        help=f"broker URL (default: $AMQP_URL, else {DEFAULT_URL}); amqps:// for TLS",
    )
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "worker":
            return run_worker_command(args)
    except UsageError as exc:
        print(f"amqp-jobs: error: {exc}", file=sys.stderr)
        return 2
    except AmqpJobsError as exc:
        print(f"amqp-jobs: error: {exc}", file=sys.stderr)
        return 1
    parser.error(f"unknown command {args.command!r}")
    return 2  # pragma: no cover


def run_worker_command(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    app = load_app(args.app)
    url = args.url or os.environ.get("AMQP_URL") or DEFAULT_URL
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
    worker = app.worker(url, **options)
    log.info("starting worker for %s on %s", args.app, mask_url(url))
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
