"""The shop's job contracts: imported by the web service (publisher) and the workers.

No handler code here: publishing services depend on this module only.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from amqp_jobs import Job, RetryPolicy


class NewUser(BaseModel):
    user_id: int = Field(gt=0)
    email: str
    postcode: str = Field(min_length=3, max_length=10)


class WelcomeEmail(BaseModel):
    user_id: int
    email: str


class Reminder(BaseModel):
    user_id: int
    text: str


class Invoice(BaseModel):
    user_id: int
    amount_cents: int = Field(ge=0)


# The CRM record and the invoice of one user touch the same account: never at once
# (a critical section per user, shared by the two job types).
create_crm_record = Job(
    "crm.create_record",
    NewUser,
    queue="crm",
    key="user_id",
    exclusive="account",
    retry=RetryPolicy(max_attempts=5, backoff=1),
    timeout=30,
)
assign_fulfilment_centre = Job(
    "fulfilment.assign_centre", NewUser, queue="fulfilment", key="user_id", timeout=10
)
send_welcome = Job(
    "emails.send_welcome",
    WelcomeEmail,
    queue="emails",
    key="user_id",
    retry=RetryPolicy(max_attempts=8),
    timeout=30,
)
send_reminder = Job("emails.send_reminder", Reminder, queue="emails", key="user_id", timeout=30)


class StockSync(BaseModel):
    warehouse: str


#: run periodically (examples/shop/worker.py schedules it)
sync_stock = Job("fulfilment.sync_stock", StockSync, queue="fulfilment", timeout=60)
sync_invoice = Job(
    "billing.sync_invoice",
    Invoice,
    queue="billing",
    key="user_id",
    exclusive="account",
    retry=RetryPolicy(max_attempts=3, backoff=0.5),
    timeout=10,
)

__all__ = [
    "Invoice",
    "NewUser",
    "Reminder",
    "StockSync",
    "WelcomeEmail",
    "assign_fulfilment_centre",
    "create_crm_record",
    "send_reminder",
    "send_welcome",
    "sync_invoice",
    "sync_stock",
]
