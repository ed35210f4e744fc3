"""An app for the worker-process tests: each job appends its start and end, with its
process, to the ledger file $REL_LOG (unbuffered, one write per line)."""

import asyncio
import os
import time

from pydantic import BaseModel

from amqp_jobs import Job, JobApp, JobContext, Outcome
from tests.support import ledger_write


class Item(BaseModel):
    n: int
    ms: int = 20


WORK = Job("proc.work", Item, queue="proc")


def _succeeded(outcome: Outcome, ctx: JobContext | None) -> None:
    """After the broker confirmed the ack: the ledger the metrics tests count against."""
    ledger_write({"e": "ok", "id": outcome.job_id, "pid": os.getpid()})


app = JobApp(os.environ.get("REL_NS", "proc"), on_success=_succeeded)


@app.handler(WORK)
async def work(args: Item) -> None:
    ledger_write({"e": "start", "n": args.n, "pid": os.getpid(), "t": time.time()})
    await asyncio.sleep(args.ms / 1000)
    ledger_write({"e": "end", "n": args.n, "pid": os.getpid(), "t": time.time()})
