"""A second RabbitMQ node with only a TLS listener, signed by a throw-away test CA.

It runs beside the machine's broker under its own node name, ports and data directory,
and is stopped (by its node name, then by the PID it wrote) and deleted afterwards.
Starting it needs the local ``rabbitmq-server`` and root (the node runs as ``rabbitmq``).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import trustme

START_TIMEOUT = 90.0


@dataclass(frozen=True)
class TLSNode:
    host: str
    port: int
    ca_file: Path
    other_ca_file: Path  # a CA that did not sign the server's certificate

    def url(self, ca_file: Path | None = None, password: str = "guest") -> str:
        query = f"?cafile={ca_file}" if ca_file else ""
        return f"amqps://guest:{password}@{self.host}:{self.port}/{query}"


def missing_requirement() -> str | None:
    """Why a TLS node cannot be started here, or None."""
    if shutil.which("rabbitmq-server") is None or shutil.which("rabbitmqctl") is None:
        return "rabbitmq-server is not installed on this machine"
    if os.geteuid() != 0:
        return "starting a second RabbitMQ node needs root"
    try:
        pwd.getpwnam("rabbitmq")
    except KeyError:
        return "there is no rabbitmq user"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _write_certificates(directory: Path) -> tuple[Path, Path]:
    ca = trustme.CA(key_type=trustme.KeyType.RSA)
    server = ca.issue_cert("localhost", "127.0.0.1", key_type=trustme.KeyType.RSA)
    ca_file, other_ca_file = directory / "ca.pem", directory / "other-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    trustme.CA(key_type=trustme.KeyType.RSA).cert_pem.write_to_path(str(other_ca_file))
    server.cert_chain_pems[0].write_to_path(str(directory / "server.pem"))
    server.private_key_pem.write_to_path(str(directory / "server.key"))
    return ca_file, other_ca_file


def _rabbitmqctl(node: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["rabbitmqctl", "-n", node, *args], capture_output=True, text=True, timeout=timeout
    )


@contextmanager
def tls_node() -> Iterator[TLSNode]:
    """Start the node, yield how to reach it, stop it and delete its files."""
    directory = Path(tempfile.mkdtemp(prefix="amqp-jobs-tls-"))
    node = f"amqp-jobs-tls-{uuid.uuid4().hex[:8]}@localhost"
    port, dist_port = _free_port(), _free_port()
    ca_file, other_ca_file = _write_certificates(directory)
    (directory / "rabbitmq.conf").write_text(
        "listeners.tcp = none\n"
        f"listeners.ssl.default = 127.0.0.1:{port}\n"
        f"ssl_options.cacertfile = {ca_file}\n"
        f"ssl_options.certfile = {directory / 'server.pem'}\n"
        f"ssl_options.keyfile = {directory / 'server.key'}\n"
        "ssl_options.verify = verify_none\n"
        "ssl_options.fail_if_no_peer_cert = false\n"
        "loopback_users = none\n"
    )
    (directory / "enabled_plugins").write_text("[].\n")
    rabbitmq = pwd.getpwnam("rabbitmq")
    for path in [directory, *directory.iterdir()]:
        os.chown(path, rabbitmq.pw_uid, rabbitmq.pw_gid)
    pid_file = directory / "node.pid"
    env = {
        **os.environ,
        "RABBITMQ_NODENAME": node,
        "RABBITMQ_DIST_PORT": str(dist_port),
        "RABBITMQ_CONFIG_FILE": str(directory / "rabbitmq.conf"),
        "RABBITMQ_MNESIA_BASE": str(directory / "mnesia"),
        "RABBITMQ_LOG_BASE": str(directory / "log"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(directory / "enabled_plugins"),
        "RABBITMQ_PID_FILE": str(pid_file),
    }
    try:
        subprocess.run(
            ["rabbitmq-server", "-detached"], env=env, check=True, capture_output=True, timeout=60
        )
        deadline = time.monotonic() + START_TIMEOUT
        while not _listening(port):
            if time.monotonic() > deadline:
                logs = "".join(p.read_text() for p in (directory / "log").glob("*.log"))
                raise RuntimeError(f"the TLS node did not listen within {START_TIMEOUT}s:\n{logs}")
            time.sleep(0.2)  # polling a port that has no event to wait on
        yield TLSNode("localhost", port, ca_file, other_ca_file)
    finally:
        _stop(node, pid_file)
        shutil.rmtree(directory, ignore_errors=True)


def _stop(node: str, pid_file: Path) -> None:
    """Stop our node by name; if that fails, end the PID it wrote (ours, nobody else's)."""
    with suppress(subprocess.TimeoutExpired):
        if _rabbitmqctl(node, "stop").returncode == 0:
            return
    with suppress(OSError, ValueError):
        os.kill(int(pid_file.read_text().strip()), signal.SIGKILL)
