"""The app the reliability scenarios run in real worker processes.

Namespace from $REL_NS. Every attempt appends one line to $REL_LOG, flushed and fsynced
before the handler returns: (event, job id, attempt, time, eta). A job's args say how it
behaves: ``fail_first`` fails attempt 1; ``seconds`` sleeps (async); ``block`` sleeps in a
plain thread; ``crash`` ends the process with os._exit on every attempt.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

from pydantic import BaseModel

from amqp_jobs import Job, JobApp, JobContext, RetryPolicy, TopologySettings

settings = TopologySettings(delivery_limit=int(os.environ.get("REL_DELIVERY_LIMIT", "10")))
app = JobApp(os.environ.get("REL_NS", "rel"), settings=settings)


class Work(BaseModel):
    n: int
    fail_first: bool = False
    seconds: float = 0.0


class Block(BaseModel):
    n: int
    seconds: float


def log(event: str, ctx: JobContext, n: int) -> None:
    eta = None if ctx.eta is None else ctx.eta.timestamp()
    line = {
        "event": event,
        "id": ctx.job_id,
        "n": n,
        "attempt": ctx.attempt,
        "t": time.time(),
        "eta": eta,
        "pid": os.getpid(),
    }
    with open(os.environ["REL_LOG"], "a") as f:
        f.write(json.dumps(line) + "\n")
        f.flush()
        os.fsync(f.fileno())


#: A retry's delay: long enough to pass through the cascade's lowest level (a shorter one
#: goes straight to the due queue and waits in the worker), which the fault tests break.
RETRY_BACKOFF = 0.33
work = Job(
    "rel.work",
    Work,
    queue="rel",
    retry=RetryPolicy(max_attempts=5, backoff=RETRY_BACKOFF),
    timeout=60,
)
block = Job(
    "rel.block", Block, queue="rel", retry=RetryPolicy(max_attempts=2, backoff=0), timeout=0.5
)
block_long = Job("rel.block_long", Block, queue="rel", timeout=60)
crash = Job("rel.crash", Work, queue="rel")


@app.handler(work)
async def run_work(args: Work, ctx: JobContext) -> None:
    log("start", ctx, args.n)
    if args.fail_first and ctx.attempt == 1:
        log("fail", ctx, args.n)
        raise ConnectionError("first attempt fails")
    if args.seconds:
        await asyncio.sleep(args.seconds)
    log("success", ctx, args.n)


@app.handler(block)
def run_block(args: Block, ctx: JobContext) -> None:
    log("start", ctx, args.n)
    time.sleep(args.seconds if ctx.attempt == 1 else 0)  # a thread cannot be cancelled
    log("success", ctx, args.n)


@app.handler(block_long)
def run_block_long(args: Block, ctx: JobContext) -> None:
    log("start", ctx, args.n)
    time.sleep(args.seconds)
    log("success", ctx, args.n)


@app.handler(crash)
def run_crash(args: Work, ctx: JobContext) -> None:
    log("start", ctx, args.n)
    os._exit(7)
