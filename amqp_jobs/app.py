"""``JobApp``: the worker side of a namespace, where handlers are registered."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from amqp_jobs.contract import Job, check_namespace
from amqp_jobs.registry import Handler, JobHooks, Registry
from amqp_jobs.topology import TopologySettings
from amqp_jobs.urls import BrokerURLs
from amqp_jobs.worker import Worker

F = TypeVar("F", bound=Handler)


class JobApp:
    """Handlers for the jobs of one namespace, and the settings their worker uses.

    ::

        app = JobApp(namespace="shop")

        @app.handler(send_welcome)
        async def send(args: WelcomeEmail, ctx: JobContext) -> None: ...
    """

    def __init__(
        self,
        namespace: str,
        *,
        settings: TopologySettings | None = None,
        hooks: Sequence[JobHooks] = (),
    ) -> None:
        self.namespace = check_namespace(namespace)
        self.settings = settings or TopologySettings()
        self.hooks = list(hooks)
        self.registry = Registry()

    def handler(self, job: Job[Any]) -> Callable[[F], F]:
        """Register the decorated function (``async def`` or plain ``def``) for ``job``."""

        def register(func: F) -> F:
            self.registry.add(job, func)
            return func

        return register

    def add_handler(self, job: Job[Any], func: Handler) -> None:
        """Register ``func`` for ``job`` without a decorator."""
        self.registry.add(job, func)

    @property
    def jobs(self) -> list[Job[Any]]:
        return [spec.job for spec in self.registry]

    @property
    def queues(self) -> list[str]:
        return sorted(self.registry.queues)

    def worker(self, url: str | Sequence[str] | BrokerURLs | None = None, **options: Any) -> Worker:
        """A Worker for this app; options as Worker's (queues, concurrency, grace, ...)."""
        options.setdefault("hooks", self.hooks)
        options.setdefault("settings", self.settings)
        options.setdefault("namespace", self.namespace)
        return Worker(
            self.registry,
            url=url,
            **options,
        )
