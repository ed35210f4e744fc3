"""examples/flask_app.py: a Flask view enqueues through a SyncJobClient made at import."""

import asyncio
import importlib
import sys
from collections.abc import Iterator
from types import ModuleType

import pytest

from amqp_jobs.testing import Namespace
from amqp_jobs.topology import work_queue
from examples.shop.contracts import send_welcome
from tests.support import drain

pytest.importorskip("flask")


@pytest.fixture
def flask_app(namespace: Namespace, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The example imported afresh, publishing into this test's namespace."""
    monkeypatch.setenv("AMQP_URL", namespace.url)
    monkeypatch.setenv("SHOP_NAMESPACE", namespace.name)
    namespace.track(send_welcome)
    sys.modules.pop("examples.flask_app", None)
    module = importlib.import_module("examples.flask_app")
    yield module
    module.jobs.close()
    sys.modules.pop("examples.flask_app", None)


def test_a_view_enqueues_a_job(namespace: Namespace, flask_app: ModuleType) -> None:
    http = flask_app.app.test_client()
    accepted = http.post("/signup", json={"user_id": 1, "email": "a@b.c"})
    assert accepted.status_code == 202, accepted.json
    refused = http.post("/signup", json={"user_id": "one", "email": "a@b.c"})
    assert refused.status_code == 422
    assert refused.json["fields"] == ["user_id"]
    [message] = asyncio.run(drain(namespace.url, work_queue(namespace.name, "emails"), 1))
    assert message.message_id == accepted.json["job_id"]
    assert message.type == "emails.send_welcome"
