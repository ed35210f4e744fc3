"""Child process of the drain benchmark: consume N queued jobs, then print timings as JSON.

    python -m bench.drain_child {worker|worker-events|worker-observed|raw} NAMESPACE N PREFETCH

``worker`` runs an amqp-jobs Worker at the given concurrency with a no-op handler
(``worker-events``: publishing lifecycle events; ``worker-observed``: with Prometheus
metrics and OpenTelemetry tracing);
``raw`` consumes the same queue with plain aio-pika, manual acks, same prefetch.
Both exit once N deliveries are acked.
"""

from __future__ import annotations

import time

STARTED = time.time()  # before the imports: process start-up counts

import asyncio  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from typing import Any  # noqa: E402

import aio_pika  # noqa: E402
from aio_pika.abc import AbstractIncomingMessage  # noqa: E402

from amqp_jobs import JobApp, JobContext, JobHooks, Outcome  # noqa: E402
from amqp_jobs.topology import work_queue  # noqa: E402
from bench.common import URL, Signup, bench_job  # noqa: E402


def observing() -> list[Any]:
    """Metrics and tracing, as production runs them: a Prometheus registry, and an SDK
    tracer provider batching spans to an exporter (one that drops them: exporting is
    the collector's cost, not ours). ``$BENCH_OBSERVE`` picks: ``metrics``,
    ``tracing``, ``sampled`` (tracing with 10 % of traces sampled), ``off`` (a tracer
    that samples nothing), ``noproc`` (spans recorded, no processor); default
    ``metrics,tracing``."""
    import os

    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    from prometheus_client import CollectorRegistry

    from amqp_jobs.metrics import Metrics
    from amqp_jobs.tracing import Tracing

    class Drop(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    which = set((os.environ.get("BENCH_OBSERVE") or "metrics,tracing").split(","))
    out: list[Any] = []
    if which & {"tracing", "sampled", "off", "noproc"}:
        from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

        sampler = ParentBased(TraceIdRatioBased(0.1)) if "sampled" in which else None
        provider = TracerProvider(sampler=ALWAYS_OFF if "off" in which else sampler)
        if "noproc" not in which:
            provider.add_span_processor(BatchSpanProcessor(Drop()))
        out.append(Tracing(provider))
    if "metrics" in which:
        out.append(Metrics(CollectorRegistry()))
    return out


async def run_worker(
    ns: str, n: int, concurrency: int, *, events: bool = False, observed: bool = False
) -> dict[str, float]:
    app = JobApp(ns, middleware=observing() if observed else [])
    times: dict[str, float] = {}
    done = 0

    @app.handler(bench_job())
    async def noop(args: Signup) -> None:
        if "first" not in times:
            times["first"] = time.time()

    class Count(JobHooks):
        async def settled(self, ctx: JobContext, outcome: Outcome) -> None:
            nonlocal done
            done += 1
            if done == n:
                times["done"] = time.time()
                worker.stop()

    worker = app.worker(URL, concurrency=concurrency, hooks=[Count()], events=events)
    await worker.run()
    return times


async def run_raw(ns: str, n: int, prefetch: int) -> dict[str, float]:
    times: dict[str, float] = {}
    finished = asyncio.Event()
    count = 0
    connection = await aio_pika.connect(URL)
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=prefetch)
    queue = await channel.get_queue(work_queue(ns, "bench"), ensure=False)

    async def on_message(message: AbstractIncomingMessage) -> None:
        nonlocal count
        if "first" not in times:
            times["first"] = time.time()
        if message.redelivered:  # none expected: say so if a leftover ever shows up
            times["redelivered"] = times.get("redelivered", 0.0) + 1
        await message.ack()
        count += 1
        if count == n:
            times["done"] = time.time()
            finished.set()

    await queue.consume(on_message)
    await finished.wait()
    # the channel first: its close-ok comes after the broker took every ack before it.
    # Closing the connection alone lost some under load (the queue had them back).
    await channel.close()
    await connection.close()
    return times


def main() -> None:
    mode, ns, n, prefetch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    if mode == "raw":
        times = asyncio.run(run_raw(ns, n, prefetch))
    else:
        times = asyncio.run(
            run_worker(
                ns, n, prefetch, events=mode == "worker-events", observed=mode == "worker-observed"
            )
        )
    print(json.dumps({"started": STARTED, **times}))


if __name__ == "__main__":
    main()
