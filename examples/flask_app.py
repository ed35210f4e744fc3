"""Enqueueing jobs from a Flask app: one SyncJobClient, made at import time.

    flask --app examples.flask_app run
    gunicorn -w 4 --preload examples.flask_app:app   # the client is made before the fork
    curl -X POST localhost:5000/signup -H 'content-type: application/json' \\
         -d '{"user_id": 1, "email": "a@b.c"}'

Views are plain functions: the client publishes from its own thread and returns once
the broker confirmed the job. Each gunicorn worker connects on its first request.
"""

from __future__ import annotations

import os

from flask import Flask, request

from amqp_jobs import ArgsValidationError, BrokerUnavailableError, PublishError, SyncJobClient
from examples.shop.contracts import send_welcome

jobs = SyncJobClient(  # $AMQP_URL, else the local broker
    os.environ.get("AMQP_URL"), namespace=os.environ.get("SHOP_NAMESPACE", "shop"), retry_for=5
)
app = Flask(__name__)


@app.post("/signup")
def signup() -> tuple[dict[str, object], int]:
    try:
        job_id = jobs.enqueue(send_welcome, request.get_json(force=True))
    except ArgsValidationError as exc:  # nothing was sent
        return {"error": str(exc), "fields": exc.fields}, 422
    except (BrokerUnavailableError, PublishError) as exc:
        return {"error": str(exc)}, 503
    return {"job_id": job_id}, 202
