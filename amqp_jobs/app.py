"""``JobApp``: the worker side of a namespace, where handlers are registered."""

from __future__ import annotations

import json
import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any, TypedDict, Unpack, overload

from amqp_jobs.contract import DEFAULT_TIMEOUT, ArgsT, Job, Namespace, RetryPolicy, TopologySettings
from amqp_jobs.durations import seconds
from amqp_jobs.errors import ContractError
from amqp_jobs.function_jobs import JobFunction, P, R
from amqp_jobs.middleware import FinalOutcomes, Middleware, OutcomeHook, stack
from amqp_jobs.outcome import JobContext
from amqp_jobs.registry import Handler, JobHooks, Registry
from amqp_jobs.schedules import DEFAULT_WINDOW, CatchUp, Schedule, catch_up_of
from amqp_jobs.transport import Transport
from amqp_jobs.urls import BrokerURLs
from amqp_jobs.worker import Worker

#: What a handler for a job with args model ``ArgsT`` may be: async or plain, taking
#: ``(args)`` or ``(args, ctx)``.
TypedHandler = (
    Callable[[ArgsT], Awaitable[Any]]
    | Callable[[ArgsT, JobContext], Awaitable[Any]]
    | Callable[[ArgsT], Any]
    | Callable[[ArgsT, JobContext], Any]
)


class WorkerOptions(TypedDict, total=False):
    """The options of ``JobApp.worker`` (as ``Worker``'s)."""

    queues: Sequence[str]
    concurrency: int
    grace: float
    hooks: Sequence[JobHooks]
    middleware: Sequence[Middleware]
    ssl_context: ssl.SSLContext | None
    max_body: int
    connect_timeout: float
    consumer_timeout: float
    name: str
    log_success: bool
    events: bool
    started_after: float
    scheduler: bool


class JobApp:
    """Handlers for the jobs of one namespace, and the settings their worker uses.

    ::

        app = JobApp(Namespace("shop"))

        @app.handler(send_welcome)
        async def send(args: WelcomeEmail, ctx: JobContext) -> None: ...
    """

    def __init__(
        self,
        namespace: Namespace | str,
        *,
        settings: TopologySettings | None = None,
        hooks: Sequence[JobHooks] = (),
        middleware: Sequence[Middleware] = (),
        on_success: OutcomeHook | None = None,
        on_dead: OutcomeHook | None = None,
    ) -> None:
        """``on_success`` / ``on_dead``: called with ``(outcome, ctx)`` once any job of
        the app succeeded, or was parked (retries exhausted, discarded, or poison: ``ctx``
        is None then), after the broker confirmed it; a job's own hooks run first."""
        ns = Namespace.of(namespace, settings)
        #: the namespace and its settings (replace it whole to move the app)
        self.ns = ns
        self.hooks = list(hooks)
        self.middleware = list(stack(middleware))  # checked now, not at worker start
        self.registry = Registry()
        self._on_success: dict[str | None, list[OutcomeHook]] = {}
        self._on_dead: dict[str | None, list[OutcomeHook]] = {}
        self._add_final(None, on_success, on_dead)

    def _add_final(
        self, job: str | None, on_success: OutcomeHook | None, on_dead: OutcomeHook | None
    ) -> None:
        for hooks, hook, what in ((self._on_success, on_success, "on_success"),
                                  (self._on_dead, on_dead, "on_dead")):  # fmt: skip
            if hook is None:
                continue
            if not callable(hook):
                raise ContractError(f"{what} must be callable, got {hook!r}")
            hooks.setdefault(job, []).append(hook)

    def handler(
        self,
        job: Job[ArgsT],
        *,
        on_success: OutcomeHook | None = None,
        on_dead: OutcomeHook | None = None,
    ) -> Callable[[TypedHandler[ArgsT]], TypedHandler[ArgsT]]:
        """Register the decorated function (``async def`` or plain ``def``) for ``job``;
        it takes ``(args)`` or ``(args, ctx)``, args being the job's model (checked by
        a type checker). ``on_success`` / ``on_dead``: as JobApp's, for this job."""

        def register(func: TypedHandler[ArgsT]) -> TypedHandler[ArgsT]:
            self.registry.add(job, func)
            self._add_final(job.name, on_success, on_dead)
            return func

        return register

    @overload
    def job(self, func: Callable[P, R]) -> JobFunction[P, R]: ...

    @overload
    def job(
        self,
        *,
        name: str | None = None,
        queue: str = "default",
        retry: RetryPolicy | None = None,
        timeout: float | timedelta | None = DEFAULT_TIMEOUT,
        on_success: OutcomeHook | None = None,
        on_dead: OutcomeHook | None = None,
    ) -> Callable[[Callable[P, R]], JobFunction[P, R]]: ...

    def job(
        self,
        func: Callable[..., Any] | None = None,
        *,
        name: str | None = None,
        queue: str = "default",
        retry: RetryPolicy | None = None,
        timeout: float | timedelta | None = DEFAULT_TIMEOUT,
        on_success: OutcomeHook | None = None,
        on_dead: OutcomeHook | None = None,
    ) -> Any:
        """Define a job by one typed function and register it as the job's handler::

            @app.job(queue="emails", retry=RetryPolicy(max_attempts=5))
            async def send_welcome(user_id: int, email: str, ctx: JobContext) -> None: ...

            await client.enqueue(send_welcome, {"user_id": 1, "email": "a@example.com"})

        The args model comes from the parameters (each annotated; one annotated
        ``JobContext`` gets the context); unknown args are refused. The name defaults to
        ``module.function`` (``name=`` wins; keep it once jobs are in flight). Returns a
        ``JobFunction``: a ``Job`` to enqueue, still callable as the plain function.
        """

        def define(f: Callable[..., Any]) -> JobFunction[..., Any]:
            job = JobFunction(f, name=name, queue=queue, retry=retry, timeout=timeout)
            self.registry.add(job, job.handler())
            self._add_final(job.name, on_success, on_dead)
            return job

        return define if func is None else define(func)

    def schedule(
        self,
        job: Job[ArgsT],
        args: ArgsT | Mapping[str, Any] | None = None,
        *,
        cron: str | None = None,
        every: timedelta | float | None = None,
        tz: str = "UTC",
        name: str | None = None,
        catch_up: CatchUp | str = CatchUp.LATEST,
        window: timedelta | float = DEFAULT_WINDOW,
    ) -> Schedule:
        """Enqueue ``job`` with ``args`` periodically: at each time of the ``cron``
        expression, read in time zone ``tz``, or ``every`` interval (counted from the
        epoch, so every process agrees). One scheduler per namespace runs the schedules,
        elected among the workers of apps that have some (README: Periodic jobs).

        ``name`` (default: the job's name) identifies the schedule for good: each tick's
        job id is built from it. ``catch_up`` says what happens to ticks missed while no
        scheduler ran, within ``window``: ``"all"``, only the ``"latest"``, or ``"none"``.
        Ticks late by a leader's takeover (a few seconds) always run.

        The args are validated now, as ``enqueue`` would: a bad schedule fails at start.
        """
        if not isinstance(job, Job):
            raise ContractError(f"expected a Job contract, got {job!r}")
        body = job.encode_args(args if args is not None else {})
        name = name if name is not None else job.name
        return self.registry.add_schedule(
            Schedule(
                name=name,
                job_name=job.name,
                queue=job.queue,
                args=json.loads(body),
                cron=cron,
                every=timedelta(seconds=seconds(every, "every")) if every is not None else None,
                tz=tz,
                catch_up=catch_up_of(catch_up, name),
                window=timedelta(seconds=seconds(window, "window")),
            ),
            job,
        )

    @property
    def schedules(self) -> list[Schedule]:
        return list(self.registry.schedules.values())

    def add_handler(self, job: Job[ArgsT], func: TypedHandler[ArgsT]) -> None:
        """Register ``func`` for ``job`` without a decorator."""
        self.registry.add(job, func)

    @property
    def worker_middleware(self) -> list[Middleware]:
        """What a worker of this app runs: its middleware, then the on_success /
        on_dead hooks (if any: a middleware more is a cost per job)."""
        if not (self._on_success or self._on_dead):
            return list(self.middleware)
        return [*self.middleware, FinalOutcomes(self._on_success, self._on_dead)]

    @property
    def namespace(self) -> str:
        return self.ns.name

    @property
    def settings(self) -> TopologySettings:
        return self.ns.settings

    @property
    def jobs(self) -> list[Job[Any]]:
        return [spec.job for spec in self.registry]

    @property
    def queues(self) -> list[str]:
        return sorted(self.registry.queues)

    def worker(
        self,
        url: str | Sequence[str] | BrokerURLs | Transport | None = None,
        **options: Unpack[WorkerOptions],
    ) -> Worker:
        """A Worker for this app's namespace; options as Worker's."""
        options.setdefault("hooks", self.hooks)
        options.setdefault("middleware", self.worker_middleware)
        return Worker(self.registry, namespace=self.ns, url=url, **options)


__all__ = ["Handler", "JobApp", "WorkerOptions"]
