"""The private-node fixtures: a real 3-node cluster, and the machine's broker left alone."""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.nodes import DLX_CONFIRM_TIMEOUT_MS, PREFIX, Cluster, rabbitmqctl
from tests.support import channel, eventually

pytestmark = pytest.mark.timeout(180)
ROOT = Path(__file__).resolve().parents[2]


def shared_broker() -> dict[str, Any] | None:
    """The machine's own node (read only): its name, OS PID and uptime, or None."""
    try:
        result = subprocess.run(
            ["rabbitmqctl", "status", "--formatter", "json"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        status = json.loads(result.stdout)
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return None
    nodes = {listener["node"] for listener in status.get("listeners", [])}
    return {"node": nodes.pop() if len(nodes) == 1 else None, **status} if nodes else None


@pytest.fixture(scope="module")
def shared_before() -> dict[str, Any] | None:
    """The shared broker as it was before this module's cluster started."""
    return shared_broker()


@pytest.fixture
async def quorum_queue(cluster: Cluster) -> AsyncIterator[str]:
    name = f"t-nodes-{uuid.uuid4().hex[:8]}"
    async with channel(cluster.urls()[1]) as ch:
        await ch.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})
    yield name
    async with channel(cluster.urls()[0]) as ch:
        await ch.queue_delete(name)


def test_three_nodes_run_as_one_cluster(shared_before: object, cluster: Cluster) -> None:
    names = sorted(node.name for node in cluster.nodes)
    assert len(set(names)) == 3
    assert len({node.port for node in cluster.nodes}) == 3
    for node in cluster.nodes:  # every node sees all three running
        assert cluster.running_nodes(via=node) == names


def test_every_node_has_the_dead_letter_confirm_timeout(cluster: Cluster) -> None:
    for node in cluster.nodes:
        setting = node.ctl(
            "eval", "application:get_env(rabbit, dead_letter_worker_publisher_confirm_timeout)."
        )
        assert setting.stdout.strip() == f"{{ok,{DLX_CONFIRM_TIMEOUT_MS}}}"


def test_compose_advanced_config_sets_the_same_timeout() -> None:
    """compose/advanced.config parses as Erlang terms and sets what the test nodes use."""
    if shutil.which("erl") is None:
        pytest.skip("erl is not installed")
    path = ROOT / "compose" / "advanced.config"
    script = (
        f'{{ok, [Terms]}} = file:consult("{path}"),'
        ' io:format("~p", [proplists:get_value(dead_letter_worker_publisher_confirm_timeout,'
        " proplists:get_value(rabbit, Terms))]), halt()."
    )
    result = subprocess.run(
        ["erl", "-noshell", "-eval", script], capture_output=True, text=True, timeout=30
    )
    assert result.stdout.strip() == str(DLX_CONFIRM_TIMEOUT_MS), result.stderr
    compose = (ROOT / "compose" / "docker-compose.yml").read_text()
    assert "./advanced.config:/etc/rabbitmq/advanced.config:ro" in compose


async def test_a_quorum_queue_has_a_member_on_every_node(
    cluster: Cluster, quorum_queue: str
) -> None:
    names = sorted(node.name for node in cluster.nodes)

    def all_online() -> bool:
        return sorted(cluster.queue_info(quorum_queue)["online"]) == names

    await eventually(all_online, timeout=15, interval=0.5, what="3 online members")
    assert cluster.members_of(quorum_queue) == names
    assert cluster.leader_of(quorum_queue) in cluster.nodes


async def test_restarting_the_leader_leaves_the_shared_broker_alone(
    shared_before: dict[str, Any] | None, cluster: Cluster, quorum_queue: str
) -> None:
    leader = cluster.leader_of(quorum_queue)
    cluster.rolling_restart([leader])
    names = sorted(node.name for node in cluster.nodes)
    # the node that answers may learn of the rejoin a moment after the restarted one
    await eventually(cluster.all_running, timeout=30, interval=0.5, what="all nodes running")
    assert cluster.running_nodes() == names
    await eventually(
        lambda: sorted(cluster.queue_info(quorum_queue)["online"]) == names,
        timeout=30, interval=0.5, what="the restarted member back online",
    )  # fmt: skip
    # Only our nodes were ever named: the shared broker's name is refused outright.
    assert all(node.name.startswith(PREFIX) for node in cluster.nodes)
    if shared_before is None:
        return  # no broker of the machine's own to compare with
    shared = shared_before["node"]
    assert shared not in names
    with pytest.raises(ValueError, match="refusing"):
        rabbitmqctl(shared, "stop")
    after = shared_broker()
    assert after is not None, "the shared broker still answers"
    assert after["pid"] == shared_before["pid"], "the shared broker was not restarted"
    assert after["uptime"] >= shared_before["uptime"]
