"""amqp-jobs: typed, durable background jobs on RabbitMQ."""

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
