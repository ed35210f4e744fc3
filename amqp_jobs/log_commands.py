"""The job log's commands: ``jobs list``, ``jobs show`` and ``recorder``."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

from amqp_jobs.commands import (
    Context,
    UsageError,
    emit,
    parse_duration,
    plural,
    table,
    utc_time,
)
from amqp_jobs.errors import ContractError, UnknownJobError
from amqp_jobs.joblog import DEFAULT_STORE, STATES, JobLog, JobRecord, redact
from amqp_jobs.joblog.recorder import PRUNABLE
from amqp_jobs.serving import serve
from amqp_jobs.settle import took

T = TypeVar("T")

STORE_HELP = (
    f"the job log's store: sqlite:///PATH (default: $AMQP_JOBS_STORE, else {DEFAULT_STORE})"
    " or postgresql://user@host/db"
)


def store_url(given: str | None) -> str:
    return given or os.environ.get("AMQP_JOBS_STORE") or DEFAULT_STORE


def parse_keep(text: str) -> tuple[str, timedelta | None]:
    """``succeeded=7d``, ``dead=forever``: how long rows of an ended state are kept."""
    state, sep, keep = text.partition("=")
    if not sep or state not in PRUNABLE:
        raise argparse.ArgumentTypeError(
            f"expected STATE=DURATION with STATE one of {', '.join(sorted(PRUNABLE))}, got {text!r}"
        )
    if keep in ("forever", "none"):
        return state, None
    return state, timedelta(seconds=parse_duration(keep))


def _reading(args: argparse.Namespace, url: str, body: Callable[[JobLog], Awaitable[T]]) -> T:
    """``body`` on the namespace's job log at ``url``, which must exist (a log nobody
    recorded into answers nothing, and that is not "unknown")."""
    ctx = Context(args)
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        path = Path(url.removeprefix("sqlite:///"))
        if not path.exists():
            raise UsageError(
                f"no job log at {path}: run a recorder (amqp-jobs recorder --store {url}, or"
                " amqp-jobs worker --store ...) first, or pass --store"
            )

    async def main() -> T:
        async with JobLog(url, ctx.namespace) as joblog:
            return await body(joblog)

    try:
        return asyncio.run(main())
    except ContractError as exc:
        raise UsageError(str(exc)) from None


def _ms(value: float | None) -> str:
    """A duration in ms as the worker's log lines spell it (``settle.took``)."""
    return "-" if value is None else took(value / 1000)


def _error(record: JobRecord) -> str:
    if record.error_type is None:
        return "-"
    message = (record.error_message or "").replace("\n", " ")
    return f"{record.error_type}: {message[:50]}" if message else record.error_type


def cmd_jobs_list(args: argparse.Namespace) -> int:
    since = None if args.since is None else timedelta(seconds=args.since)
    found = _reading(
        args,
        store_url(args.store),
        lambda joblog: joblog.list(
            state=args.state, job=args.job, key=args.key, since=since, limit=args.limit
        ),
    )
    rows = [
        (
            r.job_id,
            r.job,
            r.key,
            r.state,
            r.attempt,
            utc_time(r.updated_at),
            _ms(r.duration_ms),
            _error(r),
        )
        for r in found
    ]
    text = table(
        ("job id", "job", "key", "state", "attempt", "updated (UTC)", "took", "error"), rows
    )
    more = " (the --limit)" if len(found) == args.limit else ""
    emit(
        Context(args), [r.to_json() for r in found], f"{text}\n\n{plural(len(found), 'job')}{more}"
    )
    return 0


def cmd_jobs_show(args: argparse.Namespace) -> int:
    url = store_url(args.store)
    record = _reading(args, url, lambda joblog: joblog.get(args.job_id))
    if record is None:
        raise UnknownJobError(
            f"job {args.job_id} is unknown: the job log at {redact(url)} has no"
            " record of it (never enqueued with events on, or pruned)"
        )
    if Context(args).json:
        print(json.dumps(record.to_json(with_attempts=True), indent=2, default=str))
        return 0
    fields = [
        ("job", record.job),
        ("id", record.job_id),
        ("queue", record.queue),
        ("key", record.key),
        ("state", record.state),
        ("attempt", record.attempt),
        ("replays", record.replays or None),
        ("enqueued", utc_time(record.enqueued_at)),
        ("eta", utc_time(record.eta) if record.eta else None),
        ("started", utc_time(record.started_at)),
        ("finished", utc_time(record.finished_at) if record.finished_at else None),
        ("took", _ms(record.duration_ms)),
        ("worker", record.worker),
        ("dead reason", record.dead_reason),
        ("error", _error(record) if record.error_type else None),
        ("result", None if record.result is None else json.dumps(record.result)),
    ]
    lines = [f"{name:<12} {value}" for name, value in fields if value is not None]
    if record.traceback:
        lines += ["", "traceback:", record.traceback.rstrip()]
    if record.attempts:
        rows = [
            (
                a.attempt,
                a.state,
                utc_time(a.started_at),
                _ms(a.duration_ms),
                a.worker,
                f"{a.error_type}: {(a.error_message or '')[:50]}" if a.error_type else "-",
            )
            for a in record.attempts
        ]
        attempts = table(("attempt", "state", "started (UTC)", "took", "worker", "error"), rows)
        lines += ["", "attempts:", attempts]
    print("\n".join(lines))
    return 0


def cmd_recorder(args: argparse.Namespace) -> int:
    """Run a recorder until SIGTERM/SIGINT (one leads per namespace; others stand by)."""
    from amqp_jobs.joblog.recorder import Recorder

    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s"
    )
    ctx = Context(args)
    recorder = Recorder(
        store_url(args.store),
        namespace=ctx.namespace,
        url=ctx.urls,
        settings=ctx.settings,
        retention=dict(args.keep or []),
        connect_timeout=ctx.connect_timeout,
    )
    asyncio.run(serve(recorder.run(), recorder.stop))
    return 0


__all__ = ["STATES", "STORE_HELP", "cmd_jobs_list", "cmd_jobs_show", "cmd_recorder", "parse_keep"]
