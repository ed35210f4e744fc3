"""An app for tests that run a real worker process.

Namespace from $SAMPLE_NS; $SAMPLE_FAST makes sleepy jobs skip their sleep. Every
handler appends one JSON line to $SAMPLE_LOG when it starts and when it ends, so the
test sees what ran even if the process is killed.
"""

from __future__ import annotations

import json
import os
import time

from pydantic import BaseModel

from amqp_jobs import Job, JobApp, JobContext, RetryPolicy, TopologySettings

settings = TopologySettings(delivery_limit=int(os.environ.get("SAMPLE_DELIVERY_LIMIT", "10")))
app = JobApp(os.environ.get("SAMPLE_NS", "sample"), settings=settings)


class Work(BaseModel):
    n: int
    seconds: float = 0.0


def record(event: str, args: Work, ctx: JobContext) -> None:
    line = {
        "event": event,
        "n": args.n,
        "id": ctx.job_id,
        "attempt": ctx.attempt,
        "pid": os.getpid(),
        "t": time.time(),
    }
    with open(os.environ["SAMPLE_LOG"], "a") as f:
        f.write(json.dumps(line) + "\n")
        f.flush()
        os.fsync(f.fileno())


sleepy = Job("sample.sleepy", Work, queue="work", retry=RetryPolicy(max_attempts=3, backoff=0.1))
crash = Job("sample.crash", Work, queue="work")


@app.handler(sleepy)
def run_sleepy(args: Work, ctx: JobContext) -> None:
    record("start", args, ctx)
    time.sleep(0 if os.environ.get("SAMPLE_FAST") else args.seconds)
    record("end", args, ctx)


@app.handler(crash)
def run_crash(args: Work, ctx: JobContext) -> None:
    record("start", args, ctx)
    os._exit(3)
