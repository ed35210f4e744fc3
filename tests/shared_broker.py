"""The broker at $AMQP_URL is shared: the suite must leave it as it found it.

At the start of a run, ``Guard`` notes the node (OS PID, uptime), its vhosts and their
lasting queues (durable, not exclusive, not auto-delete: what other applications keep;
read-only ``rabbitmqctl``), and plays a bystander application: its own connection, left
open and idle for the whole run, and its own queue holding messages.
``tests/test_shared_broker.py``, which runs last, checks that the node was never
restarted, no vhost or lasting queue that was there is gone, the bystander's connection
is still open with its messages in place, and no namespace this run's tests created was
left behind (another run on the same broker may have its own in flight).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import pika

MESSAGES = 3


def _ctl(*args: str) -> Any:
    result = subprocess.run(
        ["rabbitmqctl", *args, "--formatter", "json", "-q"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return json.loads(result.stdout)


def dead_letter_workers_supervised() -> bool:
    """Whether the node still has its supervisor of quorum dead-letter workers (read only).
    RabbitMQ gives it up after two worker crashes in 5 s, and a quorum queue with
    at-least-once dead-lettering deleted while its worker starts crashes that worker."""
    result = subprocess.run(
        ["rabbitmqctl", "eval", "is_pid(whereis(rabbit_fifo_dlx_sup))."],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    return result.stdout.strip().endswith("true")


def is_local(url: str) -> bool:
    host = urlsplit(url).hostname or "localhost"
    return host in ("localhost", "127.0.0.1", "::1") and shutil.which("rabbitmqctl") is not None


def _expires(arguments: object) -> bool:
    """Whether a queue has x-expires: the broker deletes it once unused (a lock queue
    of a critical section, a client's reply queue), so it is not a leftover."""
    if isinstance(arguments, dict):
        return "x-expires" in arguments
    if isinstance(arguments, list):
        return any(
            (isinstance(a, list | tuple) and a and a[0] == "x-expires")
            or (isinstance(a, dict) and "x-expires" in a)
            for a in arguments
        )
    return False


@dataclass
class Snapshot:
    pid: int
    uptime_s: float
    taken_at: float
    vhosts: set[str]
    queues: dict[str, set[str]] = field(default_factory=dict)

    @classmethod
    def take(cls) -> Snapshot:
        status = _ctl("status")
        vhosts = {v["name"] for v in _ctl("list_vhosts", "name")}
        queues = {
            vh: {
                q["name"]
                for q in _ctl(
                    "list_queues",
                    "-p",
                    vh,
                    "name",
                    "durable",
                    "auto_delete",
                    "exclusive",
                    "arguments",
                )
                if q["durable"]
                and not q["auto_delete"]
                and not q["exclusive"]
                and not _expires(q.get("arguments"))
            }
            for vh in vhosts
        }
        return cls(
            pid=int(status["pid"]),
            uptime_s=float(status["uptime"]),
            taken_at=time.monotonic(),
            vhosts=vhosts,
            queues=queues,
        )


class Guard:
    """The shared broker before the run, and a bystander application on it."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.before = Snapshot.take()
        self.queue = f"amqp-jobs-bystander-{uuid.uuid4().hex[:8]}"
        params = pika.URLParameters(url)
        params.heartbeat = 0  # idle for the whole run without a thread to answer beats
        params.client_properties = {"connection_name": f"bystander {self.queue}"}
        self.connection = pika.BlockingConnection(params)
        channel = self.connection.channel()
        channel.confirm_delivery()
        channel.queue_declare(self.queue, durable=True)
        for n in range(MESSAGES):
            channel.basic_publish("", self.queue, f"bystander {n}".encode())
        self.channel = channel

    def problems(self, namespaces: set[str]) -> list[str]:
        """What the run did to the broker that it should not have (``namespaces``: those
        this run's tests created)."""
        found = []
        after = Snapshot.take()
        elapsed = time.monotonic() - self.before.taken_at
        if after.pid != self.before.pid or after.uptime_s + 5 < self.before.uptime_s + elapsed:
            found.append(
                f"the node restarted: pid {self.before.pid} -> {after.pid}, uptime"
                f" {self.before.uptime_s:.0f} s -> {after.uptime_s:.0f} s over {elapsed:.0f} s"
            )
        if not dead_letter_workers_supervised():
            found.append(
                "the node's supervisor of quorum dead-letter workers (rabbit_fifo_dlx_sup) is"
                " gone: at-least-once quorum queues cannot start until it is restarted"
                " (rabbitmq-server#16652; quorum queues deleted right after they were made)"
            )
        if gone := self.before.vhosts - after.vhosts:
            found.append(f"vhosts deleted: {sorted(gone)}")
        for vhost, names in self.before.queues.items():
            if gone := names - after.queues.get(vhost, set()):
                found.append(f"queues deleted in {vhost!r}: {sorted(gone)[:10]}")
        for vhost, names in after.queues.items():
            left = {n for n in names if n.split(".", 1)[0] in namespaces}
            if left:
                found.append(f"test queues left in {vhost!r}: {sorted(left)[:10]}")
        if not self.connection.is_open:
            found.append("the bystander's connection was closed")
        else:
            try:
                declared = self.channel.queue_declare(self.queue, passive=True)
                if declared.method.message_count != MESSAGES:
                    found.append(
                        f"the bystander's queue holds {declared.method.message_count} messages,"
                        f" not {MESSAGES}"
                    )
            except pika.exceptions.AMQPError as exc:
                found.append(f"the bystander's connection or queue is gone: {exc!r}")
        return found

    def close(self) -> None:
        try:
            if self.connection.is_open:
                self.channel.queue_delete(self.queue)
                self.connection.close()
        except pika.exceptions.AMQPError:
            pass
