"""The job log: what happened to every job, from its lifecycle events.

The recorder writes one row per job and one per attempt into a store (SQLite by
default, or PostgreSQL), chosen by URL; ``JobLog`` reads them::

    async with JobLog("sqlite:///amqp-jobs.db", "shop") as log:
        record = await log.get(job_id)
        recent = await log.list(key="user-42", limit=20)
"""

from amqp_jobs.joblog.log import JobLog
from amqp_jobs.joblog.store import (
    DEFAULT_STORE,
    DEFAULT_TIMEOUT,
    MAX_LIMIT,
    STATES,
    AttemptRecord,
    FencedError,
    JobRecord,
    JobState,
    Query,
    Store,
    open_store,
    redact,
)

__all__ = [
    "DEFAULT_STORE",
    "DEFAULT_TIMEOUT",
    "MAX_LIMIT",
    "STATES",
    "AttemptRecord",
    "FencedError",
    "JobLog",
    "JobRecord",
    "JobState",
    "Query",
    "Store",
    "open_store",
    "redact",
]
