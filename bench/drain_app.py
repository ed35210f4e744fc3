"""The app the process benchmarks run with ``amqp-jobs worker``: one handler on the
bench queue of namespace $BENCH_NS, a no-op unless $BENCH_WORK asks for CPU work."""

import os

from amqp_jobs import JobApp
from bench.common import Signup, bench_job

app = JobApp(os.environ.get("BENCH_NS", "bench"))

#: loop steps of pure-Python work per job (0: none): the CPU-bound jobs that more
#: processes are for
WORK = int(os.environ.get("BENCH_WORK", "0"))


@app.handler(bench_job())
async def run(args: Signup) -> None:
    if WORK:
        sum(range(WORK))
