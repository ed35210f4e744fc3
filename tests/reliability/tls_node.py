"""A second RabbitMQ node with only a TLS listener, signed by a throw-away test CA.

A thin view of ``tests.reliability.nodes.private_node(tls=True)``: it runs beside the
machine's broker under its own node name, ports and data directory, and is stopped (by
its node name, then by the PID it wrote) and deleted afterwards. Starting it needs the
local ``rabbitmq-server`` and root (the node runs as ``rabbitmq``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.reliability.nodes import missing_requirement, private_node

__all__ = ["TLSNode", "missing_requirement", "tls_node"]


@dataclass(frozen=True)
class TLSNode:
    host: str
    port: int
    ca_file: Path
    other_ca_file: Path  # a CA that did not sign the server's certificate

    def url(self, ca_file: Path | None = None, password: str = "guest") -> str:
        query = f"?cafile={ca_file}" if ca_file else ""
        return f"amqps://guest:{password}@{self.host}:{self.port}/{query}"


@contextmanager
def tls_node() -> Iterator[TLSNode]:
    """Start the node, yield how to reach it, stop it and delete its files."""
    with private_node(tls=True) as node:
        yield TLSNode("localhost", node.port, node.ca_file, node.other_ca_file)
