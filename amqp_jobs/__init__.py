"""amqp-jobs: typed, durable background jobs on RabbitMQ."""

from amqp_jobs.app import JobApp
from amqp_jobs.client import BatchPublishError, JobClient
from amqp_jobs.contract import Job, RetryPolicy
from amqp_jobs.errors import (
    AmqpJobsError,
    ArgsValidationError,
    BrokerUnavailableError,
    ContractError,
    Discard,
    JobTimeoutError,
    PublishError,
    PublishRefusedError,
    PublishTimeoutError,
    Retry,
    TopologyMismatchError,
    UnroutableError,
)
from amqp_jobs.message import DeadReason
from amqp_jobs.registry import JobContext, JobHooks, Outcome, OutcomeKind
from amqp_jobs.topology import TopologySettings
from amqp_jobs.worker import Worker, WorkerStats

__version__ = "0.1.0"

__all__ = [
    "AmqpJobsError",
    "ArgsValidationError",
    "BatchPublishError",
    "BrokerUnavailableError",
    "ContractError",
    "DeadReason",
    "Discard",
    "Job",
    "JobApp",
    "JobClient",
    "JobContext",
    "JobHooks",
    "JobTimeoutError",
    "Outcome",
    "OutcomeKind",
    "PublishError",
    "PublishRefusedError",
    "PublishTimeoutError",
    "Retry",
    "RetryPolicy",
    "TopologyMismatchError",
    "TopologySettings",
    "UnroutableError",
    "Worker",
    "WorkerStats",
    "__version__",
]
