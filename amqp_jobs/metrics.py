"""Prometheus metrics (``pip install amqp-jobs[metrics]``): a middleware that counts and
times jobs on both sides, a sampler of queue depths, and the endpoint.

Names follow Prometheus conventions (``_total`` counters, ``_seconds`` histograms, base
units). Under ``--processes N`` every child writes its samples to files in the
supervisor's ``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's multiprocess mode) and
the supervisor alone serves them, summed (``ChildrenMetrics``): counters keep a dead
child's counts, folded into one file, and the running gauge forgets a dead child's jobs
(``mark_process_dead``), so it cannot drift.
Queue depths are read by one process (the only worker, or slot 0), never by every one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client import multiprocess as prometheus_multiprocess
from prometheus_client.metrics_core import Metric

from amqp_jobs.errors import AmqpJobsError, ContractError, describe
from amqp_jobs.middleware import Middleware, Next, Publishing
from amqp_jobs.outcome import RAN, JobContext, Outcome, OutcomeKind
from amqp_jobs.topology import dead_queue, high_queue, work_queue
from amqp_jobs.transport import Link

log = logging.getLogger("amqp_jobs.metrics")

#: Where the endpoint listens unless told otherwise: loopback, never every interface.
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9464
#: How often queue depths are read (seconds).
DEPTH_EVERY = 5.0
#: Job durations from 1 ms to 10 min; waits from 1 ms to an hour.
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 600)
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600)
CONFIRM_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5)
#: The multiprocess files whose samples add up across processes, and so can be folded
#: into one when a process dies (gauges are per process, or live-only and dropped).
_SUMMED = ("counter", "histogram", "summary")


def multiprocess_dir() -> str | None:
    """The directory of multiprocess samples, if this process writes there."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def parse_address(text: str) -> tuple[str, int]:
    """``--metrics``: ``PORT``, ``HOST:PORT`` or ``[::1]:PORT``; the host defaults to
    loopback."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = DEFAULT_HOST, text
    host = host.strip("[]") or DEFAULT_HOST
    try:
        number = int(port)
    except ValueError:
        number = -1
    if not 0 < number < 65536:
        raise ContractError(f"--metrics wants PORT or HOST:PORT, got {text!r}")
    return host, number


@dataclass
class _Family:
    jobs: Counter
    duration: Histogram
    wait: Histogram
    running: Gauge
    published: Counter
    publish_errors: Counter
    confirm: Histogram
    depth: Gauge


def _families(reg: CollectorRegistry) -> _Family:
    """The metrics, registered in ``reg`` (the multiprocess files are written whatever
    the registry)."""
    labels = ("queue", "job")
    return _Family(
        jobs=Counter(
            "amqp_jobs_jobs",
            "Deliveries of jobs that ended, by outcome.",
            (*labels, "outcome"),
            registry=reg,
        ),
        duration=Histogram(
            "amqp_jobs_job_duration_seconds",
            "How long attempts ran (handler and middleware).",
            labels,
            buckets=DURATION_BUCKETS,
            registry=reg,
        ),
        wait=Histogram(
            "amqp_jobs_job_wait_seconds",
            "From when a job was due (enqueued, or its ETA) to its attempt's start.",
            labels,
            buckets=WAIT_BUCKETS,
            registry=reg,
        ),
        running=Gauge(
            "amqp_jobs_jobs_running",
            "Attempts running now.",
            labels,
            multiprocess_mode="livesum",
            registry=reg,
        ),
        published=Counter(
            "amqp_jobs_published", "Jobs published and confirmed.", labels, registry=reg
        ),
        publish_errors=Counter(
            "amqp_jobs_publish_errors",
            "Publishes that raised (not confirmed, refused or timed out).",
            labels,
            registry=reg,
        ),
        confirm=Histogram(
            "amqp_jobs_publish_confirm_seconds",
            "From publishing a job to the broker's confirm.",
            ("queue",),
            buckets=CONFIRM_BUCKETS,
            registry=reg,
        ),
        depth=Gauge(
            "amqp_jobs_queue_messages",
            "Messages ready in a namespace's queues (read every few seconds by one process).",
            ("queue", "kind"),
            multiprocess_mode="livemostrecent",
            registry=reg,
        ),
    )


class Metrics(Middleware):
    """Counts and times every job: add it to a worker's middleware (``--metrics`` does)
    and a client's (``JobClient(middleware=[metrics])``) for the publishing side."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        #: the registry the metrics are in (serve it, or read it in tests)
        self.registry = registry if registry is not None else CollectorRegistry()
        self._m = _families(self.registry)
        # a metric's child per label values, looked up once: labels() costs a lock
        self._children: dict[tuple[str, str], tuple[Gauge, Histogram]] = {}
        self._ended: dict[tuple[str, str, OutcomeKind], tuple[Counter, Histogram]] = {}

    async def attempt(self, ctx: JobContext, call_next: Next) -> Any:
        running, wait = self._of(ctx.queue, ctx.job.name)
        due = ctx.eta or (ctx.enqueued_at if ctx.attempt == 1 else None)
        if due is not None:
            wait.observe(max(0.0, time.time() - due.timestamp()))
        running.inc()
        try:
            return await call_next()
        finally:
            running.dec()

    def _of(self, queue: str, job: str) -> tuple[Gauge, Histogram]:
        found = self._children.get((queue, job))
        if found is None:
            found = self._m.running.labels(queue, job), self._m.wait.labels(queue, job)
            self._children[(queue, job)] = found
        return found

    async def settled(self, outcome: Outcome, ctx: JobContext | None) -> None:
        key = (outcome.queue, outcome.job_name or "?", outcome.kind)
        found = self._ended.get(key)
        if found is None:
            queue, job, kind = key
            found = self._m.jobs.labels(queue, job, kind.value), self._m.duration.labels(queue, job)
            self._ended[key] = found
        found[0].inc()
        if ctx is not None and outcome.kind in RAN:
            found[1].observe(outcome.duration)

    async def publish(self, publishing: Publishing, call_next: Next) -> Any:
        began = time.perf_counter()
        try:
            result = await call_next()
        except BaseException:
            self._m.publish_errors.labels(publishing.queue, publishing.job.name).inc()
            raise
        if not publishing.transactional:  # a scheduler's tick: staged, not yet confirmed
            self._m.confirm.labels(publishing.queue).observe(time.perf_counter() - began)
        self._m.published.labels(publishing.queue, publishing.job.name).inc()
        return result

    async def sample_depths(
        self, link: Link, namespace: str, queues: Sequence[str], stop: asyncio.Event
    ) -> None:
        """Read the depth of each queue's work, high-priority and dead queue every
        DEPTH_EVERY seconds until ``stop``; a failed read is logged and tried again."""
        kinds: list[tuple[str, str, Callable[[str, str], str]]] = [
            (q, kind, name)
            for q in queues
            for kind, name in (
                ("ready", work_queue),
                ("ready_high", high_queue),
                ("dead", dead_queue),
            )
        ]
        while not stop.is_set():
            for queue, kind, name in kinds:
                try:
                    depth = await link.depth(name(namespace, queue))
                except AmqpJobsError as exc:
                    log.warning("metrics: reading the depth of %s: %s", queue, describe(exc))
                    break
                self._m.depth.labels(queue, kind).set(depth or 0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), DEPTH_EVERY)


def serve(address: tuple[str, int], registry: CollectorRegistry) -> bool:
    """Serve ``registry`` at http://HOST:PORT/metrics, in a thread. A port in use (or any
    refusal) is logged as an error and the caller runs on without metrics: False."""
    host, port = address
    try:
        start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        log.error(
            "metrics: cannot serve on %s:%d (%s); running without a metrics endpoint",
            host,
            port,
            exc.strerror or exc,
        )
        return False
    log.info("metrics: serving http://%s:%d/metrics", host, port)
    return True


class ChildrenMetrics:
    """What a supervisor serves: its children's sample files in ``directory``, summed.

    A dead child's live gauges (its running jobs, its depth readings) are dropped, and
    its counters, histograms and summaries are added into one file per type
    (``counter_exited.db``) and its own files removed: a supervisor that recycles
    children for weeks would otherwise read one more file per child at every scrape.
    (An app's own gauges in other multiprocess modes stay per process, as
    prometheus_client keeps them.) Folding and scraping take one lock, so a scrape
    never sees a dead child's counts twice or not at all."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        #: serve this (``serve(address, children.registry)``)
        self.registry = CollectorRegistry()
        self._files = prometheus_multiprocess.MultiProcessCollector(None, path=directory)  # type: ignore[no-untyped-call]
        self._lock = threading.Lock()
        self.registry.register(self)

    def collect(self) -> list[Metric]:
        with self._lock:
            return list(self._files.collect())  # type: ignore[no-untyped-call]

    def forget(self, pid: int) -> None:
        """A supervisor's exit callback: ``pid`` has exited."""
        with self._lock:
            prometheus_multiprocess.mark_process_dead(pid, path=self.directory)  # type: ignore[no-untyped-call]
            for kind in _SUMMED:
                dead = os.path.join(self.directory, f"{kind}_{pid}.db")
                if os.path.exists(dead):
                    self._fold(dead, os.path.join(self.directory, f"{kind}_exited.db"))

    @staticmethod
    def _fold(dead: str, exited: str) -> None:
        """Add ``dead``'s samples into ``exited``, then remove ``dead``. The sum is written
        to a file the collector does not read and renamed over ``exited``: a fold that
        fails half-way leaves both files as they were, never a count in both."""
        from prometheus_client import mmap_dict

        samples: Any = mmap_dict.MmapedDict  # untyped
        adding = list(samples.read_all_values_from_file(dead))
        sums: dict[str, float] = {}
        if os.path.exists(exited):
            sums = {key: value for key, value, _, _ in samples.read_all_values_from_file(exited)}
        for key, value, _, _ in adding:
            sums[key] = sums.get(key, 0.0) + value
        partial = exited + ".partial"
        with contextlib.suppress(FileNotFoundError):
            os.remove(partial)
        out = samples(partial)
        try:
            for key, value in sums.items():
                out.write_value(key, value, 0.0)
        finally:
            out.close()
        os.replace(partial, exited)
        os.remove(dead)
