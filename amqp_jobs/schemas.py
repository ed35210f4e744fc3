"""Job contracts as published artefacts: JSON Schemas and an AsyncAPI 3.0 document.

``schemas/<job name>.json`` is the JSON Schema of one job's body (the pydantic model's),
with an ``x-amqp-jobs`` block saying where to publish it; ``schemas/envelope.json``
describes the AMQP properties and headers of protocol version 1. Publishers in other
languages need nothing else.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amqp_jobs.contract import MAX_KEY_LENGTH, Job
from amqp_jobs.errors import SchemaError as SchemaError
from amqp_jobs.message import (
    CONTENT_TYPE,
    H_ATTEMPT,
    H_DEAD_REASON,
    H_DEFERRALS,
    H_ERROR_MESSAGE,
    H_ERROR_TRACEBACK,
    H_ERROR_TYPE,
    H_ETA,
    H_FAILED_AT,
    H_KEY,
    H_PRIORITY,
    H_PROTOCOL,
    H_QUEUE,
    H_REPLAYS,
    H_REPLY_TO,
    H_TRACEPARENT,
    HIGH,
    MAX_ATTEMPT,
    PROTOCOL_VERSION,
    DeadReason,
)
from amqp_jobs.topology import (
    TopologySettings,
    dead_exchange,
    dead_queue,
    delay_exchange,
    deliver_exchange,
    due_queue,
    jobs_exchange,
    quarantine_queue,
    work_queue,
)

ENVELOPE_FILE = "envelope.json"
JSON_SCHEMA = "https://json-schema.org/draft/2020-12/schema"


def job_schema(job: Job[Any], namespace: str) -> dict[str, Any]:
    """The JSON Schema of a job's body, plus where and how to publish it."""
    schema = {"$schema": JSON_SCHEMA, **job.json_schema()}
    schema["x-amqp-jobs"] = {
        "job": job.name,
        "queue": job.queue,
        "protocol": PROTOCOL_VERSION,
        "exchange": jobs_exchange(namespace),
        "routing_key": job.name,
        "max_attempts": job.retry.max_attempts,
        "timeout_seconds": job.timeout,
    }
    if job.key is not None:
        # send this field's value (as text) in the job-key header
        schema["x-amqp-jobs"]["key_field"] = job.key
    return schema


def envelope_schema() -> dict[str, Any]:
    """Protocol version 1: the AMQP properties and headers every job message carries."""
    return {
        "$schema": JSON_SCHEMA,
        "title": f"amqp-jobs message envelope, protocol {PROTOCOL_VERSION}",
        "description": (
            "Publish the job's args as the body (UTF-8 JSON valid against"
            " schemas/<job name>.json) to the exchange '{namespace}.jobs' with routing key ="
            " the job name, persistent, mandatory, with publisher confirms."
        ),
        "type": "object",
        "required": ["properties", "headers"],
        "properties": {
            "properties": {
                "type": "object",
                "required": ["content_type", "delivery_mode", "message_id", "type"],
                "properties": {
                    "content_type": {"const": CONTENT_TYPE},
                    "delivery_mode": {"const": 2, "description": "persistent"},
                    "message_id": {
                        "type": "string",
                        "minLength": 1,
                        "description": "the job id: unique, kept across retries",
                    },
                    "type": {"type": "string", "description": "the job name"},
                    "timestamp": {
                        "type": "integer",
                        "description": "first enqueue time, epoch seconds",
                    },
                },
            },
            "headers": {
                "type": "object",
                "properties": {
                    H_PROTOCOL: {"const": PROTOCOL_VERSION},
                    H_ATTEMPT: {
                        "type": "integer",
                        "minimum": 1,
                        "maximum": MAX_ATTEMPT,
                        "description": "1-based attempt; absent means 1",
                    },
                    H_ETA: {
                        "type": "integer",
                        "description": "run no earlier than this, epoch milliseconds",
                    },
                    H_QUEUE: {"type": "string", "description": "destination work queue"},
                    H_TRACEPARENT: {
                        "type": "string",
                        "description": "W3C trace context, passed through",
                    },
                    H_ERROR_TYPE: {"type": "string", "description": "dead and retried copies"},
                    H_ERROR_MESSAGE: {"type": "string"},
                    H_ERROR_TRACEBACK: {"type": "string", "maxLength": 8192},
                    H_FAILED_AT: {"type": "integer", "description": "epoch milliseconds"},
                    H_DEAD_REASON: {"enum": [str(r) for r in DeadReason]},
                    H_KEY: {
                        "type": "string",
                        "minLength": 1,
                        "maxLength": MAX_KEY_LENGTH,
                        "description": "the job's key: the value of the args field the job"
                        " schema names as x-amqp-jobs.key_field, as text",
                    },
                    H_REPLY_TO: {
                        "type": "string",
                        "description": "a queue that gets the job's final lifecycle event"
                        " (JSON, type job-event) before the job is acked",
                    },
                    H_PRIORITY: {
                        "enum": [HIGH],
                        "description": "on a job published to the {ns}.jobs.high exchange;"
                        " absent: normal priority",
                    },
                    H_REPLAYS: {
                        "type": "integer",
                        "minimum": 0,
                        "description": "times an operator replayed it; set by amqp-jobs",
                    },
                    H_DEFERRALS: {
                        "type": "integer",
                        "minimum": 0,
                        "description": "times the current attempt was deferred; set by amqp-jobs",
                    },
                },
                "propertyNames": {
                    "not": {"pattern": "^x-"},
                    "description": "x- headers belong to the broker and are stripped",
                },
            },
        },
    }


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def expected_files(jobs: Iterable[Job[Any]], namespace: str) -> dict[str, str]:
    files = {f"{job.name}.json": render(job_schema(job, namespace)) for job in jobs}
    files[ENVELOPE_FILE] = render(envelope_schema())
    return files


def export(directory: Path, jobs: Iterable[Job[Any]], namespace: str) -> list[Path]:
    """Write one schema per job and the envelope; returns the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in sorted(expected_files(jobs, namespace).items()):
        path = directory / name
        path.write_text(text)
        written.append(path)
    return written


@dataclass(frozen=True)
class Drift:
    missing: list[str]
    extra: list[str]
    changed: list[str]

    @property
    def clean(self) -> bool:
        return not (self.missing or self.extra or self.changed)

    def describe(self) -> str:
        parts = []
        for label, names in (
            ("missing", self.missing),
            ("not in the code", self.extra),
            ("differ", self.changed),
        ):
            if names:
                parts.append(f"{label}: {', '.join(names)}")
        return "; ".join(parts)


def check(directory: Path, jobs: Iterable[Job[Any]], namespace: str) -> Drift:
    """Compare the checked-in schemas with the code."""
    if not directory.is_dir():
        raise SchemaError(f"no schema directory {str(directory)!r}")
    expected = expected_files(jobs, namespace)
    present = {p.name for p in directory.glob("*.json")}
    changed = []
    for name, text in sorted(expected.items()):
        path = directory / name
        if path.exists() and json.loads(path.read_text()) != json.loads(text):
            changed.append(name)
    return Drift(
        missing=sorted(set(expected) - present),
        extra=sorted(present - set(expected)),
        changed=changed,
    )


@dataclass(frozen=True)
class SchemaJob:
    """A job known only from its exported schema (for publishing without the code)."""

    name: str
    queue: str
    schema: dict[str, Any]

    def key_of(self, args: Any) -> str | None:
        """The job key in ``args`` (validated), as text, if the schema names a key field."""
        field = self.schema.get("x-amqp-jobs", {}).get("key_field")
        value = args.get(field) if isinstance(field, str) and isinstance(args, dict) else None
        if value is None or isinstance(value, dict | list):
            return None
        text = value if isinstance(value, str) else json.dumps(value)
        return text if 0 < len(text) <= MAX_KEY_LENGTH else None


def load_job(directory: Path, name: str) -> SchemaJob:
    path = directory / f"{name}.json"
    if not path.is_file():
        known = sorted(p.stem for p in directory.glob("*.json") if p.name != ENVELOPE_FILE)
        raise SchemaError(
            f"no schema for job {name!r} in {str(directory)!r}; known: {', '.join(known) or 'none'}"
        )
    try:
        schema = json.loads(path.read_text())
        meta = schema["x-amqp-jobs"]
        return SchemaJob(meta["job"], meta["queue"], schema)
    except (ValueError, KeyError, TypeError) as exc:
        raise SchemaError(f"{str(path)!r} is not an amqp-jobs job schema: {exc}") from None


def validate_args(job: SchemaJob, args: Any) -> list[str]:
    """Problems with ``args`` against the job's JSON Schema, each naming the field."""
    import jsonschema

    schema = {k: v for k, v in job.schema.items() if k != "x-amqp-jobs"}
    validator = jsonschema.Draft202012Validator(schema)
    problems = []
    for error in sorted(validator.iter_errors(args), key=lambda e: list(e.absolute_path)):
        where = ".".join(str(p) for p in error.absolute_path) or "<args>"
        problems.append(f"{where}: {error.message}")
    return problems


# -- AsyncAPI ----------------------------------------------------------------------


def inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy with local ``#/$defs/...`` references replaced by their definitions.

    Embedded in another document, a local reference would resolve against that
    document's root; inlining keeps each payload self-contained. Recursive models keep
    their ``$defs``, under which the references still resolve.
    """
    defs = schema.get("$defs", {})

    def walk(node: Any, seen: frozenset[str]) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                name = ref.split("/")[-1]
                if name in defs and name not in seen:
                    return walk(copy.deepcopy(defs[name]), seen | {name})
            return {k: walk(v, seen) for k, v in node.items() if k != "$defs"}
        if isinstance(node, list):
            return [walk(v, seen) for v in node]
        return node

    out: dict[str, Any] = walk(schema, frozenset())
    if "$ref" in json.dumps(out):
        return {**schema}
    return out


def _headers_schema() -> dict[str, Any]:
    headers: dict[str, Any] = envelope_schema()["properties"]["headers"]
    return {"type": "object", "properties": headers["properties"]}


def asyncapi(
    jobs: Iterable[Job[Any]],
    namespace: str,
    settings: TopologySettings,
    *,
    server: str | None = None,
    vhost: str = "/",
    version: str = "1.0.0",
) -> dict[str, Any]:
    """An AsyncAPI 3.0 document of the namespace: exchanges, routing keys, queues, messages."""
    jobs = sorted(jobs, key=lambda j: j.name)
    exchange = {
        "name": jobs_exchange(namespace),
        "type": "direct",
        "durable": True,
        "autoDelete": False,
        "vhost": vhost,
    }
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for job in jobs:
        key = _ident(job.name)
        messages[key] = {
            "name": job.name,
            "title": job.args_model.__name__,
            "summary": (job.args_model.__doc__ or "").strip().split("\n")[0] or job.name,
            "contentType": CONTENT_TYPE,
            "headers": _headers_schema(),
            "payload": inline_refs(job.json_schema()),
            "bindings": {"amqp": {"messageType": job.name, "bindingVersion": "0.3.0"}},
        }
        channels[key] = {
            "address": job.name,
            "title": f"{job.name} on {jobs_exchange(namespace)}",
            "messages": {key: {"$ref": f"#/components/messages/{key}"}},
            "bindings": {
                "amqp": {"is": "routingKey", "exchange": exchange, "bindingVersion": "0.3.0"}
            },
        }
        operations[f"publish_{key}"] = {
            "action": "send",
            "title": f"Enqueue {job.name}",
            "channel": {"$ref": f"#/channels/{key}"},
            "messages": [{"$ref": f"#/channels/{key}/messages/{key}"}],
            "bindings": {"amqp": {"deliveryMode": 2, "mandatory": True, "bindingVersion": "0.3.0"}},
        }
    for queue in sorted({job.queue for job in jobs}):
        key = f"queue_{_ident(queue)}"
        queue_jobs = [j for j in jobs if j.queue == queue]
        channels[key] = {
            "address": work_queue(namespace, queue),
            "title": f"work queue {queue}",
            "description": (
                f"Consumed by workers. Delayed jobs and retries arrive on"
                f" {due_queue(namespace, queue)!r} through the delay cascade"
                f" ({delay_exchange(namespace, settings.delay_levels - 1)!r} …"
                f" {deliver_exchange(namespace)!r}); a job delivered twice without being"
                f" settled (its worker died) moves to {quarantine_queue(namespace, queue)!r}"
                f" and runs alone; dead jobs are parked in"
                f" {dead_queue(namespace, queue)!r} via {dead_exchange(namespace)!r}."
            ),
            "messages": {
                _ident(j.name): {"$ref": f"#/components/messages/{_ident(j.name)}"}
                for j in queue_jobs
            },
            "bindings": {
                "amqp": {
                    "is": "queue",
                    "queue": {
                        "name": work_queue(namespace, queue),
                        "durable": True,
                        "exclusive": False,
                        "autoDelete": False,
                        "vhost": vhost,
                    },
                    "bindingVersion": "0.3.0",
                }
            },
        }
        operations[f"work_{_ident(queue)}"] = {
            "action": "receive",
            "title": f"Run the jobs of queue {queue}",
            "channel": {"$ref": f"#/channels/{key}"},
            "messages": [
                {"$ref": f"#/channels/{key}/messages/{_ident(j.name)}"} for j in queue_jobs
            ],
            "bindings": {"amqp": {"ack": True, "bindingVersion": "0.3.0"}},
        }
    doc: dict[str, Any] = {
        "asyncapi": "3.0.0",
        "info": {
            "title": f"amqp-jobs namespace {namespace}",
            "version": version,
            "description": (
                f"Jobs of namespace {namespace!r}, protocol version {PROTOCOL_VERSION}."
                " Publish each job to its channel with publisher confirms."
            ),
        },
        "defaultContentType": CONTENT_TYPE,
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages},
    }
    if server:
        doc["servers"] = {
            "broker": {"host": server, "protocol": "amqp", "protocolVersion": "0.9.1"}
        }
    return doc


def _ident(name: str) -> str:
    """A component key: AsyncAPI keys allow letters, digits, '.', '_' and '-'."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
