"""The package's shape: a curated public API, and imports that flow one way."""

import ast
import subprocess
import sys
from pathlib import Path

import amqp_jobs

PACKAGE = Path(amqp_jobs.__file__).parent
#: Each module may import only modules listed before it (docs/architecture.md).
LAYERS = [
    "errors",
    "durations",
    "clock",
    "waiting",
    "urls",
    "contract",
    "schedules",
    "message",
    "outcome",
    "events",
    "lifecycle",
    "joblog.base",
    "joblog.sqlite",
    "joblog.postgres",
    "joblog.store",
    "joblog.log",
    "joblog",
    "function_jobs",
    "topology",
    "transport.base",
    "transport.amqp.acks",
    "transport.amqp.channels",
    "transport.amqp.connection",
    "transport.amqp.declare",
    "transport.amqp.link",
    "transport.amqp.session",
    "transport.amqp",
    "transport.memory.broker",
    "transport.memory.session",
    "transport.memory.link",
    "transport.memory",
    "transport",
    "joblog.recorder",
    "results",
    "settle",
    "registry",
    "middleware",
    "scheduler",
    "attempt",
    "slots",
    "sections",
    "metrics",
    "tracing",
    "worker",
    "client",
    "sync_client",
    "app",
    "ops",
    "schemas",
    "supervised",
    "supervisor",
    "serving",
    "commands",
    "log_commands",
    "testing",
    "cli",
]
#: Client libraries of the AMQP transport: imported nowhere else.
CLIENT_LIBRARIES = ("aio_pika", "aiormq", "pamqp")


def test_public_api_is_pinned() -> None:
    assert sorted(amqp_jobs.__all__) == sorted(
        [
            "AmqpJobsError", "ArgsValidationError", "BatchPublishError",
            "BrokerUnavailableError", "ConnectionLostError", "ContractError", "DeadReason",
            "Defer", "Discard", "Job", "JobApp", "JobClient", "JobContext", "JobFailedError",
            "JobFunction", "JobHooks", "JobLog", "JobTimeoutError", "Middleware", "Namespace",
            "Outcome", "OutcomeKind", "Recorder", "ResultError", "StoreError", "UnknownJobError",
            "PublishError", "PublishRefusedError", "PublishTimeoutError", "Publishing",
            "Retry", "RetryPolicy", "SyncJobClient", "TopologyMismatchError", "TopologySettings",
            "UnroutableError", "Worker", "WorkerStats", "__version__",
        ]
    )  # fmt: skip
    for name in amqp_jobs.__all__:
        assert hasattr(amqp_jobs, name)


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        if parts:
            out[".".join(parts)] = path
    return out


def _imports(path: Path, *, typing_only: bool = True) -> list[str]:
    """Every module ``path`` imports, at any depth (lazy imports count). Imports under
    ``if TYPE_CHECKING:`` count only with ``typing_only`` (types, not a dependency at
    run time: a module may name the types of the layer above it)."""
    out: list[str] = []

    def visit(node: ast.AST) -> None:
        if (
            not typing_only
            and isinstance(node, ast.If)
            and isinstance(node.test, ast.Name)
            and node.test.id == "TYPE_CHECKING"
        ):
            return
        if isinstance(node, ast.ImportFrom) and node.module:
            out.append(node.module)
        elif isinstance(node, ast.Import):
            out.extend(alias.name for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return out


def test_every_module_has_a_layer() -> None:
    assert set(_modules()) == set(LAYERS)


def test_imports_flow_one_way() -> None:
    modules = _modules()
    for index, module in enumerate(LAYERS):
        for imported in _imports(modules[module], typing_only=False):
            if not imported.startswith("amqp_jobs."):
                continue
            target = imported.removeprefix("amqp_jobs.")
            assert target in LAYERS, f"{module} imports unknown {target}"
            assert LAYERS.index(target) < index, f"{module} imports {target}"


def test_client_libraries_stay_behind_the_transport_seam() -> None:
    for module, path in _modules().items():
        if module.startswith("transport.amqp"):
            continue
        for imported in _imports(path):
            assert not imported.startswith(CLIENT_LIBRARIES), f"{module} imports {imported}"


def test_the_core_never_imports_the_amqp_transport() -> None:
    """The worker, settle and the clients see brokers only through transport.base."""
    modules = _modules()
    for module in ("settle", "registry", "middleware", "attempt", "worker", "client",
                   "sync_client", "app"):  # fmt: skip
        for imported in _imports(modules[module]):
            assert not imported.startswith("amqp_jobs.transport.amqp"), (module, imported)


def test_a_worker_process_loads_neither_the_job_log_nor_the_clients() -> None:
    """Public names load on first use: a worker's start-up pays only for the worker."""
    code = """
import sys
from pydantic import BaseModel
from amqp_jobs import Job, JobApp
class A(BaseModel):
    n: int
app = JobApp("ns")
@app.handler(Job("t.a", A, queue="q"))
async def a(args: A) -> None: ...
app.worker("amqp://127.0.0.1/")
print(sorted(sys.modules))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    for heavy in ("amqp_jobs.joblog", "amqp_jobs.sync_client", "amqp_jobs.client", "sqlite3"):
        assert f"'{heavy}'" not in out, (heavy, out)
    assert "'amqp_jobs.worker'" in out
