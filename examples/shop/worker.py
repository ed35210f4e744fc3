"""The shop's handlers. Run them with::

amqp-jobs worker examples.shop.worker:app --concurrency 16
"""

from __future__ import annotations

import asyncio
import os

from amqp_jobs import JobApp, JobContext

from .contracts import (
    Invoice,
    NewUser,
    Reminder,
    StockSync,
    WelcomeEmail,
    assign_fulfilment_centre,
    create_crm_record,
    send_reminder,
    send_welcome,
    sync_invoice,
    sync_stock,
)

app = JobApp(namespace=os.environ.get("SHOP_NAMESPACE", "shop"))
# Every quarter hour, London time; one worker process leads the namespace's scheduler.
app.schedule(
    sync_stock, {"warehouse": "all"}, cron="*/15 * * * *", tz="Europe/London", name="stock-sync"
)

CENTRES = {"1": "Dublin", "2": "Leeds", "3": "Bristol", "E": "London", "S": "Glasgow"}


@app.handler(create_crm_record)
async def crm_record(args: NewUser, ctx: JobContext) -> dict[str, str]:
    # The CRM times out on the first two calls: the job retries on its backoff.
    if ctx.attempt <= 2:
        await asyncio.sleep(0.3)  # waiting for the CRM, inside the user's section
        raise ConnectionError("CRM API timed out")
    await asyncio.sleep(0.05)
    ctx.logger.info("CRM record created for user %s", args.user_id)
    return {"crm_id": f"crm-{args.user_id}"}  # the result: kept in the job log


@app.handler(assign_fulfilment_centre)
def fulfilment_centre(args: NewUser, ctx: JobContext) -> str:
    # A plain function: runs in the worker's thread pool.
    centre = CENTRES.get(args.postcode[0].upper(), "Birmingham")
    ctx.logger.info("user %s assigned to %s", args.user_id, centre)
    return centre


@app.handler(send_welcome)
async def welcome(args: WelcomeEmail, ctx: JobContext) -> None:
    await asyncio.sleep(0.02)
    ctx.logger.info("welcome e-mail sent to %s", args.email)


@app.handler(send_reminder)
async def reminder(args: Reminder, ctx: JobContext) -> None:
    ctx.logger.info("reminder to user %s: %s", args.user_id, args.text)


@app.handler(sync_invoice)
async def invoice(args: Invoice, ctx: JobContext) -> None:
    raise PermissionError("billing API rejected our credentials (HTTP 401)")


@app.handler(sync_stock)
async def stock(args: StockSync, ctx: JobContext) -> int:
    await asyncio.sleep(0.01)
    ctx.logger.info("stock levels of %s synced", args.warehouse)
    return 0  # items out of stock
