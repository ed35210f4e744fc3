"""The app the process benchmarks run with ``amqp-jobs worker``: a no-op handler on the
bench queue of namespace $BENCH_NS."""

import os

from amqp_jobs import JobApp
from bench.common import Signup, bench_job

app = JobApp(os.environ.get("BENCH_NS", "bench"))


@app.handler(bench_job())
async def noop(args: Signup) -> None:
    return None
