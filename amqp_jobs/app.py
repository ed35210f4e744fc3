"""``JobApp``: the worker side of a namespace, where handlers are registered."""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from typing import Any, TypedDict, Unpack, overload

from amqp_jobs.contract import DEFAULT_TIMEOUT, ArgsT, Job, Namespace, RetryPolicy, TopologySettings
from amqp_jobs.function_jobs import JobFunction, P, R
from amqp_jobs.middleware import Middleware, stack
from amqp_jobs.outcome import JobContext
from amqp_jobs.registry import Handler, JobHooks, Registry
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
    ) -> None:
        ns = Namespace.of(namespace, settings)
        #: the namespace and its settings (replace it whole to move the app)
        self.ns = ns
        self.hooks = list(hooks)
        self.middleware = list(stack(middleware))  # checked now, not at worker start
        self.registry = Registry()

    def handler(self, job: Job[ArgsT]) -> Callable[[TypedHandler[ArgsT]], TypedHandler[ArgsT]]:
        """Register the decorated function (``async def`` or plain ``def``) for ``job``;
        it takes ``(args)`` or ``(args, ctx)``, args being the job's model (checked by
        a type checker)."""

        def register(func: TypedHandler[ArgsT]) -> TypedHandler[ArgsT]:
            self.registry.add(job, func)
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
    ) -> Callable[[Callable[P, R]], JobFunction[P, R]]: ...

    def job(
        self,
        func: Callable[..., Any] | None = None,
        *,
        name: str | None = None,
        queue: str = "default",
        retry: RetryPolicy | None = None,
        timeout: float | timedelta | None = DEFAULT_TIMEOUT,
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
            return job

        return define if func is None else define(func)

    def add_handler(self, job: Job[ArgsT], func: TypedHandler[ArgsT]) -> None:
        """Register ``func`` for ``job`` without a decorator."""
        self.registry.add(job, func)

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
        options.setdefault("middleware", self.middleware)
        return Worker(self.registry, namespace=self.ns, url=url, **options)


__all__ = ["Handler", "JobApp", "WorkerOptions"]
