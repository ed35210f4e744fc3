"""Handlers: which function runs which job, and how it is called.

JobContext (what a handler is told) and Outcome (what became of a job) live in
amqp_jobs.outcome, next to the decisions that produce them, and are re-exported here.

Also ``JobHooks``: told when a job starts and how every delivery ended; a convenience
on top of the middleware seam (amqp_jobs.middleware), which can also change outcomes.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from amqp_jobs.contract import Job
from amqp_jobs.errors import ContractError
from amqp_jobs.outcome import JobContext as JobContext
from amqp_jobs.outcome import Outcome as Outcome
from amqp_jobs.outcome import OutcomeKind as OutcomeKind
from amqp_jobs.schedules import Schedule

Handler = Callable[..., Awaitable[Any]] | Callable[..., Any]


class JobHooks:
    """Subclass and pass to JobApp(hooks=[...]) to observe every job's lifecycle.

    Hooks run in the worker's event loop and must not block; an exception in a hook
    is logged and otherwise ignored (it never changes how a job is settled).
    """

    async def started(self, ctx: JobContext) -> None:
        """The handler is about to run (after args validated, ETA reached)."""

    async def settled(self, ctx: JobContext, outcome: Outcome) -> None:
        """The attempt ended and the broker confirmed what follows from it."""

    async def not_run(self, outcome: Outcome) -> None:
        """A delivery ended without reaching its handler, and the broker confirmed what
        follows: parked as poison (``outcome.dead_reason``), re-delayed before its ETA, or
        quarantined."""


@dataclass(frozen=True)
class HandlerSpec:
    job: Job[Any]
    func: Handler
    is_async: bool
    wants_ctx: bool
    logger: logging.Logger

    @classmethod
    def build(cls, job: Job[Any], func: Handler) -> HandlerSpec:
        if not callable(func):
            raise ContractError(f"handler for {job.name!r} must be callable, got {func!r}")
        is_async = inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(
            getattr(func, "__call__", None)  # noqa: B004 - callable objects with async __call__
        )
        try:
            params = [
                p
                for p in inspect.signature(func).parameters.values()
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            ]
        except (TypeError, ValueError):
            params = []
        if len(params) not in (1, 2):
            raise ContractError(
                f"handler {getattr(func, '__qualname__', func)!r} for {job.name!r} must take"
                " (args) or (args, ctx)"
            )
        logger = logging.getLogger(f"amqp_jobs.job.{job.name}")
        return cls(job, func, is_async, wants_ctx=len(params) == 2, logger=logger)

    def call(self, args: Any, ctx: JobContext) -> Any:
        return self.func(args, ctx) if self.wants_ctx else self.func(args)


class Registry:
    """Job name -> handler. One job name has one handler and runs on one queue."""

    def __init__(self) -> None:
        self._specs: dict[str, HandlerSpec] = {}
        #: periodic jobs by schedule name (run by the worker's scheduler)
        self.schedules: dict[str, Schedule] = {}
        #: the contracts of the scheduled jobs, by job name (what publish middleware is
        #: shown for each tick)
        self.scheduled_jobs: dict[str, Job[Any]] = {}

    def add_schedule(self, schedule: Schedule, job: Job[Any] | None = None) -> Schedule:
        if schedule.name in self.schedules:
            raise ContractError(
                f"schedule {schedule.name!r} is already defined: give each a name= of its own"
            )
        self.schedules[schedule.name] = schedule
        if job is not None:
            self.scheduled_jobs[job.name] = job
        return schedule

    def add(self, job: Job[Any], func: Handler) -> HandlerSpec:
        if not isinstance(job, Job):
            raise ContractError(f"expected a Job contract, got {job!r}")
        if job.name in self._specs:
            raise ContractError(f"job {job.name!r} already has a handler")
        spec = HandlerSpec.build(job, func)
        self._specs[job.name] = spec
        return spec

    def get(self, name: str) -> HandlerSpec | None:
        return self._specs.get(name)

    def __iter__(self) -> Iterator[HandlerSpec]:
        return iter(self._specs.values())

    def __len__(self) -> int:
        return len(self._specs)

    @property
    def queues(self) -> set[str]:
        return {s.job.queue for s in self._specs.values()}

    def jobs_for(self, queue: str) -> set[str]:
        return {s.job.name for s in self._specs.values() if s.job.queue == queue}
