"""Private RabbitMQ nodes for the reliability tests: one node, a TLS node, a 3-node cluster.

Each node runs beside the machine's own broker under its own node name
(``amqp-jobs-<role>-<hex>@localhost``), free ports, data directory and PID file. Root
starts it with ``rabbitmq-server -detached`` as the ``rabbitmq`` user (whose Erlang
cookie every node and ``rabbitmqctl`` share); it is stopped by its node name, then by
the PID it wrote, and deleted afterwards. The machine's broker is never touched: every
``rabbitmqctl`` call names one of our nodes, and ``rabbitmqctl()`` refuses any other name.

Every node gets ``dead_letter_worker_publisher_confirm_timeout`` lowered from RabbitMQ's
180 s to ``DLX_CONFIRM_TIMEOUT_MS`` (see ``advanced_config``); ``advanced=None`` keeps
RabbitMQ's defaults, for before/after comparisons.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: How long a node may take to boot (a cold start on a busy 2-core machine takes ~5 s).
START_TIMEOUT = 90.0
#: How long a graceful stop may take before the node's PID is killed.
STOP_TIMEOUT = 60.0
#: Every rabbitmqctl call is bounded by this unless told otherwise.
CTL_TIMEOUT = 60.0

#: The quorum-queue dead-letter worker (rabbit_fifo_dlx_worker) retries a dead letter it
#: could not hand on (or that was not confirmed) after this long; RabbitMQ's default is
#: 180000 ms. After a restart a delay level can expire messages before the exchange it
#: dead-letters to is recovered, and those jobs wait out this timeout. A job then runs
#: up to this timeout plus the cascade's hops that the outage postponed and the worker's
#: reconnect after max(ETA, node up): with 2000 ms, 5-10 s in most runs, and up to 13.6 s
#: when several levels stall while a busy node recovers (test_node_restart.LATE_LIMIT).
DLX_CONFIRM_TIMEOUT_MS = 2000

#: Node names we create all start with this; anything else is not ours to stop.
PREFIX = "amqp-jobs-"

#: The server script behind Debian's /usr/sbin/rabbitmq-server su wrapper.
SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
#: Open files per node: a node with a few hundred quorum queues needs more than 1024.
NOFILE = 8192


def advanced_config(dlx_confirm_timeout_ms: int = DLX_CONFIRM_TIMEOUT_MS) -> str:
    """The advanced.config every private node gets by default."""
    return (
        "[{rabbit, [{dead_letter_worker_publisher_confirm_timeout, "
        f"{dlx_confirm_timeout_ms}}}]}}].\n"
    )


DEFAULT_ADVANCED = advanced_config()


def missing_requirement() -> str | None:
    """Why a private node cannot be started here, or None."""
    if shutil.which("rabbitmq-server") is None or shutil.which("rabbitmqctl") is None:
        return "rabbitmq-server is not installed on this machine"
    if os.geteuid() != 0:
        return "starting a second RabbitMQ node needs root"
    try:
        pwd.getpwnam("rabbitmq")
    except KeyError:
        return "there is no rabbitmq user"
    return None


def _server() -> str:
    if os.access(SERVER, os.X_OK):
        return SERVER
    return shutil.which("rabbitmq-server") or "rabbitmq-server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie nobody reaps counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def _wait(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.2) -> None:
    """Poll ``check()`` (no event to wait on: a port, a PID) until true or ``timeout``."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def rabbitmqctl(
    node: str, *args: str, timeout: float = CTL_TIMEOUT, tool: str = "rabbitmqctl"
) -> subprocess.CompletedProcess[str]:
    """``<tool> -n NODE ...`` for one of our nodes, bounded by ``timeout``."""
    if not node.startswith(PREFIX):
        raise ValueError(f"{node} is not a private test node; refusing to touch it")
    return subprocess.run(
        [tool, "-n", node, *args], capture_output=True, text=True, timeout=timeout
    )


@dataclass
class PrivateNode:
    """One private node: how to reach it, start it, stop it, kill it."""

    name: str
    port: int
    dist_port: int
    directory: Path
    env: dict[str, str] = field(repr=False)
    tls: bool = False

    @property
    def pid_file(self) -> Path:
        return self.directory / "node.pid"

    @property
    def log_dir(self) -> Path:
        return self.directory / "log"

    @property
    def ca_file(self) -> Path:
        """The test CA (TLS nodes only)."""
        return self.directory / "ca.pem"

    @property
    def other_ca_file(self) -> Path:
        """A CA that did not sign the node's certificate (TLS nodes only)."""
        return self.directory / "other-ca.pem"

    def url(self, password: str = "guest") -> str:
        scheme = "amqps" if self.tls else "amqp"
        return f"{scheme}://guest:{password}@127.0.0.1:{self.port}/"

    def pid(self) -> int | None:
        """The beam PID the node wrote, or None."""
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def logs(self) -> str:
        parts = []
        for path in sorted(self.log_dir.glob("*")):
            with suppress(OSError):
                parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-20000:]}")
        return "\n".join(parts)

    def ctl(
        self, *args: str, timeout: float = CTL_TIMEOUT, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """``rabbitmqctl -n NODE ...``; raises with its output if it fails and ``check``."""
        return self._tool("rabbitmqctl", *args, timeout=timeout, check=check)

    def queues_tool(self, *args: str, timeout: float = CTL_TIMEOUT) -> str:
        """``rabbitmq-queues -n NODE ...``'s output."""
        return self._tool("rabbitmq-queues", *args, timeout=timeout, check=True).stdout

    def _tool(
        self, tool: str, *args: str, timeout: float, check: bool
    ) -> subprocess.CompletedProcess[str]:
        result = rabbitmqctl(self.name, *args, timeout=timeout, tool=tool)
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{tool} -n {self.name} {' '.join(args)} exited {result.returncode}:\n"
                f"{result.stdout}{result.stderr}"
            )
        return result

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the node; return once it accepts AMQP connections and has booted."""
        self.pid_file.unlink(missing_ok=True)
        began = time.monotonic()
        result = subprocess.run(
            # As the rabbitmq user (its home holds the shared Erlang cookie), not through
            # /usr/sbin's su wrapper: su would cut the open-files limit back to 1024.
            ["sh", "-c", f"ulimit -n {NOFILE}; exec {_server()} -detached"],
            env=self.env,
            cwd=self.env["HOME"],
            user="rabbitmq",
            group="rabbitmq",
            extra_groups=[],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        try:
            if result.returncode != 0:
                raise RuntimeError(f"rabbitmq-server exited {result.returncode}")
            _wait(lambda: listening(self.port), timeout, f"{self.name} to listen on {self.port}")
            left = max(5.0, timeout - (time.monotonic() - began))
            self.ctl("await_startup", "--timeout", str(int(left)), timeout=left + 10)
        except (RuntimeError, TimeoutError, subprocess.TimeoutExpired) as exc:
            raise RuntimeError(
                f"node {self.name} did not start: {exc}\n{result.stdout}{result.stderr}\n"
                f"{self.logs()}"
            ) from None

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop gracefully (``rabbitmqctl stop`` waits for the PID); SIGKILL if that fails."""
        pid = self.pid()
        with suppress(subprocess.TimeoutExpired, RuntimeError):
            args = ["stop", "--idempotent"] + ([str(self.pid_file)] if pid else [])
            self.ctl(*args, timeout=timeout)
        if pid is not None and _alive(pid):
            self.kill9()
            return
        _wait(lambda: not listening(self.port), 15, f"{self.name}'s port to close")

    def kill9(self, timeout: float = 15.0) -> None:
        """SIGKILL the node's beam process; return once its port no longer accepts."""
        pid = self.pid()
        if pid is None:
            raise RuntimeError(f"{self.name} wrote no PID file at {self.pid_file}")
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _wait(lambda: not _alive(pid), timeout, f"{self.name} (PID {pid}) to die")
        _wait(lambda: not listening(self.port), timeout, f"{self.name}'s port to close")

    def restart(self) -> None:
        self.stop()
        self.start()

    def stop_quietly(self) -> None:
        """Teardown: by name, then by PID; never raises."""
        with suppress(Exception):
            self.stop(timeout=30)
        pid = self.pid()
        if pid is not None and _alive(pid):
            with suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def _write_certificates(directory: Path) -> None:
    import trustme

    ca = trustme.CA(key_type=trustme.KeyType.RSA)
    server = ca.issue_cert("localhost", "127.0.0.1", key_type=trustme.KeyType.RSA)
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    other = trustme.CA(key_type=trustme.KeyType.RSA)
    other.cert_pem.write_to_path(str(directory / "other-ca.pem"))
    server.cert_chain_pems[0].write_to_path(str(directory / "server.pem"))
    server.private_key_pem.write_to_path(str(directory / "server.key"))


def make_node(
    role: str,
    conf_extra: str = "",
    advanced: str | None = DEFAULT_ADVANCED,
    tls: bool = False,
) -> PrivateNode:
    """Write a node's files (not started). ``advanced=None``: RabbitMQ's own defaults."""
    directory = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{role}-"))
    name = f"{PREFIX}{role}-{uuid.uuid4().hex[:8]}@localhost"
    port, dist_port = free_port(), free_port()
    if tls:
        _write_certificates(directory)
        listeners = (
            "listeners.tcp = none\n"
            f"listeners.ssl.default = 127.0.0.1:{port}\n"
            f"ssl_options.cacertfile = {directory / 'ca.pem'}\n"
            f"ssl_options.certfile = {directory / 'server.pem'}\n"
            f"ssl_options.keyfile = {directory / 'server.key'}\n"
            "ssl_options.verify = verify_none\n"
            "ssl_options.fail_if_no_peer_cert = false\n"
        )
    else:
        listeners = f"listeners.tcp.default = 127.0.0.1:{port}\n"
    (directory / "rabbitmq.conf").write_text(
        f"{listeners}loopback_users = none\n{conf_extra.strip()}\n"
    )
    # Always our own file, so the machine's /etc/rabbitmq/advanced.config never applies.
    (directory / "advanced.config").write_text(advanced if advanced is not None else "[].\n")
    (directory / "enabled_plugins").write_text("[].\n")
    (directory / "conf.d").mkdir()
    rabbitmq = pwd.getpwnam("rabbitmq")
    for path in [directory, *directory.iterdir()]:
        os.chown(path, rabbitmq.pw_uid, rabbitmq.pw_gid)
    env = {
        **os.environ,
        "HOME": rabbitmq.pw_dir,  # the shared Erlang cookie is there
        "RABBITMQ_NODENAME": name,
        "RABBITMQ_DIST_PORT": str(dist_port),
        "RABBITMQ_CONFIG_FILE": str(directory / "rabbitmq.conf"),
        "RABBITMQ_CONFIG_FILES": str(directory / "conf.d"),
        "RABBITMQ_ADVANCED_CONFIG_FILE": str(directory / "advanced.config"),
        "RABBITMQ_MNESIA_BASE": str(directory / "mnesia"),
        "RABBITMQ_LOG_BASE": str(directory / "log"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(directory / "enabled_plugins"),
        "RABBITMQ_PID_FILE": str(directory / "node.pid"),
    }
    return PrivateNode(name, port, dist_port, directory, env, tls=tls)


def _discard(node: PrivateNode) -> None:
    node.stop_quietly()
    shutil.rmtree(node.directory, ignore_errors=True)


@contextmanager
def private_node(
    conf_extra: str = "",
    advanced: str | None = DEFAULT_ADVANCED,
    tls: bool = False,
    role: str = "node",
) -> Iterator[PrivateNode]:
    """Start one fresh node, yield it, stop it and delete its files."""
    node = make_node("tls" if tls else role, conf_extra, advanced, tls)
    try:
        node.start()
        yield node
    finally:
        _discard(node)


@dataclass
class Cluster:
    nodes: list[PrivateNode]

    def urls(self) -> list[str]:
        return [node.url() for node in self.nodes]

    def node_of(self, port: int) -> PrivateNode:
        return next(node for node in self.nodes if node.port == port)

    def by_name(self, name: str) -> PrivateNode:
        return next(node for node in self.nodes if node.name == name)

    def running_nodes(self, via: PrivateNode | None = None) -> list[str]:
        """Node names ``cluster_status`` reports running, asked of ``via`` (default: first up)."""
        status = self._ask(via, "cluster_status", "--formatter", "json")
        return sorted(json.loads(status)["running_nodes"])

    def all_running(self, via: PrivateNode | None = None) -> bool:
        """Whether every node of the cluster is running in it (False if nobody answers)."""
        try:
            return self.running_nodes(via) == sorted(node.name for node in self.nodes)
        except RuntimeError:
            return False

    def queue_info(
        self, queue: str, vhost: str = "/", via: PrivateNode | None = None
    ) -> dict[str, Any]:
        """``list_queues name type leader members online`` for one queue."""
        out = self._ask(
            via, "list_queues", "-p", vhost, "name", "type", "leader", "members", "online",
            "--formatter", "json",
        )  # fmt: skip
        for row in json.loads(out):
            if row["name"] == queue:
                return dict(row)
        raise LookupError(f"no queue {queue!r} in vhost {vhost!r}")

    def leader_of(self, queue: str, vhost: str = "/") -> PrivateNode:
        return self.by_name(self.queue_info(queue, vhost)["leader"])

    def members_of(self, queue: str, vhost: str = "/") -> list[str]:
        return sorted(self.queue_info(queue, vhost)["members"])

    def _ask(self, via: PrivateNode | None, *args: str) -> str:
        candidates = [via] if via is not None else [n for n in self.nodes if listening(n.port)]
        error: Exception | None = None
        for node in candidates:
            try:
                return node.ctl(*args).stdout
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                error = exc
        raise RuntimeError(f"no cluster node answered {args}: {error}")

    def rolling_restart(self, nodes: Sequence[PrivateNode] | None = None) -> None:
        """Restart the nodes one at a time, each back in the cluster before the next."""
        for node in nodes or self.nodes:
            node.stop()
            node.start()
            _wait(lambda n=node: self.all_running(via=n), 30, f"{node.name} to rejoin", 0.5)  # type: ignore[misc]


@contextmanager
def private_cluster(
    size: int = 3, conf_extra: str = "", advanced: str | None = DEFAULT_ADVANCED
) -> Iterator[Cluster]:
    """Start ``size`` nodes at once, join the others to the first, yield the cluster."""
    with ExitStack() as stack:
        nodes = []
        for i in range(size):
            node = make_node(f"c{i}", conf_extra, advanced)
            stack.callback(_discard, node)
            nodes.append(node)
        _start_all(nodes)
        first = nodes[0]
        for node in nodes[1:]:
            node.ctl("stop_app")
            node.ctl("join_cluster", first.name)
            node.ctl("start_app")
        cluster = Cluster(nodes)
        for node in nodes:
            node.ctl("await_startup", "--timeout", "60", timeout=70)
        _wait(cluster.all_running, 30, "every node to run in the cluster", 0.5)
        yield cluster


def _start_all(nodes: Sequence[PrivateNode]) -> None:
    """Start nodes in parallel threads (each start blocks on a port and await_startup)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(nodes)) as pool:
        for future in [pool.submit(node.start) for node in nodes]:
            future.result(timeout=START_TIMEOUT + 30)
