"""An app for tests of how a worker process ends: a plain (sync) handler that appends a
line to $SAMPLE_LOG when it is done, and an atexit hook, as a user's trace or metric
exporter registers one, that appends a line to $EXIT_APP_MARK. Namespace from $SAMPLE_NS
(tests.support.WorkerProcess sets both)."""

from __future__ import annotations

import atexit
import os
import time

from pydantic import BaseModel

from amqp_jobs import Job, JobApp, JobContext, RetryPolicy

app = JobApp(os.environ.get("SAMPLE_NS", "exit"))


class Nap(BaseModel):
    seconds: float = 0.0


#: one attempt of at most a second; its thread sleeps on past that if told to
nap = Job("exit.nap", Nap, queue="naps", retry=RetryPolicy(max_attempts=1), timeout=1)


@app.handler(nap)
def take_nap(args: Nap, ctx: JobContext) -> None:
    time.sleep(args.seconds)
    with open(os.environ["SAMPLE_LOG"], "a") as f:
        f.write(f"done {ctx.job_id}\n")


@atexit.register
def flush_exporters() -> None:
    path = os.environ.get("EXIT_APP_MARK")
    if path:
        with open(path, "a") as f:
            f.write("atexit ran\n")
