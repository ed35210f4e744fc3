"""The package's shape: a curated public API, and imports that flow one way."""

import ast
from pathlib import Path

import amqp_jobs

PACKAGE = Path(amqp_jobs.__file__).parent
#: Each module may import only modules listed before it (DESIGN.md §6).
LAYERS = [
    "errors",
    "urls",
    "contract",
    "message",
    "channels",
    "topology",
    "connection",
    "link",
    "settle",
    "registry",
    "worker",
    "client",
    "app",
    "ops",
    "schemas",
    "commands",
    "testing",
    "cli",
]


def test_public_api_is_pinned() -> None:
    assert sorted(amqp_jobs.__all__) == sorted(
        [
            "AmqpJobsError", "ArgsValidationError", "BatchPublishError",
            "BrokerUnavailableError", "ContractError", "DeadReason", "Discard", "Job",
            "JobApp", "JobClient", "JobContext", "JobHooks", "JobTimeoutError", "Outcome",
            "OutcomeKind", "PublishError", "PublishRefusedError", "PublishTimeoutError",
            "Retry", "RetryPolicy", "TopologyMismatchError", "TopologySettings",
            "UnroutableError", "Worker", "WorkerStats", "__version__",
        ]
    )  # fmt: skip
    for name in amqp_jobs.__all__:
        assert hasattr(amqp_jobs, name)


def test_every_module_has_a_layer() -> None:
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert modules == set(LAYERS)


def test_imports_flow_one_way() -> None:
    for index, module in enumerate(LAYERS):
        tree = ast.parse((PACKAGE / f"{module}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("amqp_jobs."):
                target = node.module.split(".")[1]  # type: ignore[union-attr]
                assert LAYERS.index(target) < index, f"{module} imports {target}"
