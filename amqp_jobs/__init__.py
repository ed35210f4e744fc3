"""amqp-jobs: typed, durable background jobs on RabbitMQ.

The public names load on first use (PEP 562): a worker process, a publisher and the
command line each import only what they use, which is a fifth of a worker's start-up.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from amqp_jobs.app import JobApp
    from amqp_jobs.client import BatchPublishError, JobClient
    from amqp_jobs.contract import Job, Namespace, RetryPolicy
    from amqp_jobs.errors import (
        AmqpJobsError,
        ArgsValidationError,
        BrokerUnavailableError,
        ConnectionLostError,
        ContractError,
        Defer,
        Discard,
        JobFailedError,
        JobTimeoutError,
        PublishError,
        PublishRefusedError,
        PublishTimeoutError,
        ResultError,
        Retry,
        StoreError,
        TopologyMismatchError,
        UnknownJobError,
        UnroutableError,
    )
    from amqp_jobs.function_jobs import JobFunction
    from amqp_jobs.joblog import JobLog
    from amqp_jobs.joblog.recorder import Recorder
    from amqp_jobs.message import DeadReason
    from amqp_jobs.middleware import Middleware, Publishing
    from amqp_jobs.outcome import JobContext, Outcome, OutcomeKind
    from amqp_jobs.registry import JobHooks
    from amqp_jobs.sync_client import SyncJobClient
    from amqp_jobs.topology import TopologySettings
    from amqp_jobs.worker import Worker, WorkerStats

__version__ = "0.1.0"

#: public name -> the module that defines it
_WHERE = {
    "AmqpJobsError": "amqp_jobs.errors",
    "ArgsValidationError": "amqp_jobs.errors",
    "BatchPublishError": "amqp_jobs.client",
    "BrokerUnavailableError": "amqp_jobs.errors",
    "ConnectionLostError": "amqp_jobs.errors",
    "ContractError": "amqp_jobs.errors",
    "DeadReason": "amqp_jobs.message",
    "Defer": "amqp_jobs.errors",
    "Discard": "amqp_jobs.errors",
    "Job": "amqp_jobs.contract",
    "JobApp": "amqp_jobs.app",
    "JobClient": "amqp_jobs.client",
    "JobContext": "amqp_jobs.outcome",
    "JobFailedError": "amqp_jobs.errors",
    "JobFunction": "amqp_jobs.function_jobs",
    "JobHooks": "amqp_jobs.registry",
    "JobLog": "amqp_jobs.joblog",
    "JobTimeoutError": "amqp_jobs.errors",
    "Middleware": "amqp_jobs.middleware",
    "Namespace": "amqp_jobs.contract",
    "Outcome": "amqp_jobs.outcome",
    "OutcomeKind": "amqp_jobs.outcome",
    "PublishError": "amqp_jobs.errors",
    "PublishRefusedError": "amqp_jobs.errors",
    "PublishTimeoutError": "amqp_jobs.errors",
    "Publishing": "amqp_jobs.middleware",
    "Recorder": "amqp_jobs.joblog.recorder",
    "ResultError": "amqp_jobs.errors",
    "Retry": "amqp_jobs.errors",
    "RetryPolicy": "amqp_jobs.contract",
    "StoreError": "amqp_jobs.errors",
    "SyncJobClient": "amqp_jobs.sync_client",
    "TopologyMismatchError": "amqp_jobs.errors",
    "TopologySettings": "amqp_jobs.topology",
    "UnknownJobError": "amqp_jobs.errors",
    "UnroutableError": "amqp_jobs.errors",
    "Worker": "amqp_jobs.worker",
    "WorkerStats": "amqp_jobs.worker",
}

__all__ = [
    "AmqpJobsError",
    "ArgsValidationError",
    "BatchPublishError",
    "BrokerUnavailableError",
    "ConnectionLostError",
    "ContractError",
    "DeadReason",
    "Defer",
    "Discard",
    "Job",
    "JobApp",
    "JobClient",
    "JobContext",
    "JobFailedError",
    "JobFunction",
    "JobHooks",
    "JobLog",
    "JobTimeoutError",
    "Middleware",
    "Namespace",
    "Outcome",
    "OutcomeKind",
    "PublishError",
    "PublishRefusedError",
    "PublishTimeoutError",
    "Publishing",
    "Recorder",
    "ResultError",
    "Retry",
    "RetryPolicy",
    "StoreError",
    "SyncJobClient",
    "TopologyMismatchError",
    "TopologySettings",
    "UnknownJobError",
    "UnroutableError",
    "Worker",
    "WorkerStats",
    "__version__",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'amqp_jobs' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value  # once: the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
