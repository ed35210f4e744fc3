"""Published contracts: JSON Schemas that match the code, and a valid AsyncAPI 3.0 document."""

import json
from pathlib import Path

import jsonschema
import pytest
from pydantic import BaseModel

from amqp_jobs import Job, TopologySettings
from amqp_jobs.schemas import (
    asyncapi,
    check,
    envelope_schema,
    export,
    inline_refs,
    job_schema,
    load_job,
    validate_args,
)
from examples.shop.worker import app

ROOT = Path(__file__).resolve().parents[2]
ASYNCAPI_SCHEMA = json.loads(
    (ROOT / "tests" / "fixtures" / "asyncapi-3.0.0.schema.json").read_text()
)


def test_checked_in_schemas_match_the_example_app() -> None:
    drift = check(ROOT / "schemas", app.jobs, app.namespace)
    assert drift.clean, (
        f"{drift.describe()}: run `amqp-jobs schemas export schemas --app examples.shop.worker:app`"
    )


def test_check_detects_drift(tmp_path: Path) -> None:
    export(tmp_path, app.jobs, app.namespace)
    assert check(tmp_path, app.jobs, app.namespace).clean
    path = tmp_path / "billing.sync_invoice.json"
    schema = json.loads(path.read_text())
    schema["required"] = ["user_id"]
    path.write_text(json.dumps(schema))
    (tmp_path / "emails.send_welcome.json").unlink()
    (tmp_path / "old.job.json").write_text("{}")
    drift = check(tmp_path, app.jobs, app.namespace)
    assert drift.changed == ["billing.sync_invoice.json"]
    assert drift.missing == ["emails.send_welcome.json"]
    assert drift.extra == ["old.job.json"]


def test_job_schema_says_where_to_publish() -> None:
    job = next(j for j in app.jobs if j.name == "crm.create_record")
    schema = job_schema(job, "shop")
    assert schema["x-amqp-jobs"]["exchange"] == "shop.jobs"
    assert schema["x-amqp-jobs"]["routing_key"] == "crm.create_record"
    assert schema["x-amqp-jobs"]["queue"] == "crm"
    jsonschema.Draft202012Validator.check_schema(schema)


def test_schema_validation_names_the_field(tmp_path: Path) -> None:
    export(tmp_path, app.jobs, app.namespace)
    job = load_job(tmp_path, "crm.create_record")
    assert validate_args(job, {"user_id": 1, "email": "a", "postcode": "E1 6AN"}) == []
    problems = validate_args(job, {"user_id": 0, "email": "a"})
    assert any(p.startswith("user_id:") for p in problems)
    assert any("postcode" in p for p in problems)


def test_envelope_schema_accepts_a_real_message_and_rejects_x_headers() -> None:
    validator = jsonschema.Draft202012Validator(envelope_schema())
    good = {
        "properties": {
            "content_type": "application/json",
            "delivery_mode": 2,
            "message_id": "a",
            "type": "j",
        },
        "headers": {"job-protocol": 1, "job-attempt": 2, "job-eta": 1_800_000_000_000},
    }
    assert list(validator.iter_errors(good)) == []
    bad = {**good, "headers": {"x-death": [], "job-attempt": 0}}
    assert len(list(validator.iter_errors(bad))) == 2


def test_asyncapi_document_is_valid_asyncapi_3() -> None:
    doc = asyncapi(app.jobs, app.namespace, app.settings, server="127.0.0.1:5672")
    validator = jsonschema.Draft7Validator(ASYNCAPI_SCHEMA)
    assert [e.message for e in validator.iter_errors(doc)] == []
    assert (
        doc["channels"]["crm.create_record"]["bindings"]["amqp"]["exchange"]["name"] == "shop.jobs"
    )
    payload = doc["components"]["messages"]["crm.create_record"]["payload"]
    assert payload["properties"]["postcode"]["minLength"] == 3
    assert doc["channels"]["queue_crm"]["address"] == "shop.q.crm"


def test_the_asyncapi_check_can_fail() -> None:
    doc = asyncapi(app.jobs, app.namespace, app.settings)
    del doc["info"]
    doc["operations"]["publish_crm.create_record"]["action"] = "publish"  # 2.x wording
    errors = list(jsonschema.Draft7Validator(ASYNCAPI_SCHEMA).iter_errors(doc))
    assert errors


def test_nested_models_are_inlined_for_asyncapi() -> None:
    class Address(BaseModel):
        city: str

    class Order(BaseModel):
        ship_to: Address
        bill_to: Address | None = None

    job = Job("orders.place", Order, queue="orders")
    inlined = inline_refs(job.json_schema())
    assert "$defs" not in inlined
    assert inlined["properties"]["ship_to"]["properties"]["city"]["type"] == "string"
    doc = asyncapi([job], "shop", TopologySettings())
    assert list(jsonschema.Draft7Validator(ASYNCAPI_SCHEMA).iter_errors(doc)) == []


@pytest.mark.parametrize("name", ["envelope.json"])
def test_envelope_is_checked_in(name: str) -> None:
    assert (ROOT / "schemas" / name).is_file()
