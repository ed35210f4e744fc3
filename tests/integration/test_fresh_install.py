"""The README's "Testing your jobs" examples, as a new user runs them: in a fresh virtualenv
with only ``pip install 'amqp-jobs[testing]'``, no pytest configuration and no $AMQP_URL.
The plugin must find the local broker, run the async tests, run the real app in each
test's namespace, and leave nothing of it on the broker."""

import asyncio
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from amqp_jobs import TopologySettings
from amqp_jobs.topology import namespace_queues
from amqp_jobs.urls import DEFAULT_URL
from tests.support import _link

ROOT = Path(__file__).resolve().parents[2]

#: builds a virtualenv and installs the package with its testing extra
pytestmark = [pytest.mark.rabbitmq_only, pytest.mark.slow, pytest.mark.timeout(420)]

#: Records each test's namespace, so this test can look for leftovers afterwards.
CONFTEST = """
import pytest


@pytest.fixture
def namespace(namespace):
    with open("namespaces.txt", "a") as out:
        out.write(namespace.name + "\\n")
    return namespace
"""


def readme_testing_examples() -> str:
    """The Python blocks of the README's "Testing your jobs" section, as one module."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Testing your jobs", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) >= 2, "the section shows an in-memory and a RabbitMQ example"
    return "\n\n".join(blocks)


async def leftovers(namespaces: list[str]) -> list[str]:
    link = _link(DEFAULT_URL)
    found = []
    try:
        for ns in namespaces:
            names = namespace_queues(ns, {"crm", "fulfilment", "emails", "billing"}, SETTINGS)
            found += [name for name in names if await link.depth(name) is not None]
    finally:
        await link.close()
    return found


SETTINGS = TopologySettings()


def test_the_readme_examples_run_after_installing_the_testing_extra(
    tmp_path: Path, amqp_url: str
) -> None:
    if amqp_url.rstrip("/") != DEFAULT_URL.rstrip("/"):
        pytest.skip("shows the plugin finding the local broker at the default URL")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    install = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", f"{ROOT}[testing]"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:]

    project = tmp_path / "project"
    shutil.copytree(ROOT / "examples" / "shop", project / "shop")
    (project / "test_readme.py").write_text(readme_testing_examples())
    (project / "conftest.py").write_text(CONFTEST)
    env = {k: v for k, v in os.environ.items() if k not in ("AMQP_URL", "PYTHONPATH")}
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pytest", "-p", "no:cacheprovider",
         "-W", "ignore::DeprecationWarning"],
        cwd=project, env={**env, "CI": "true"}, capture_output=True, text=True, timeout=240,
        check=False,
    )  # fmt: skip
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert re.search(r"\b2 passed\b", done.stdout), out[-2000:]
    assert "tests that need a broker use the local broker" in done.stdout, out[-2000:]
    namespaces = (project / "namespaces.txt").read_text().split()
    assert namespaces
    assert asyncio.run(leftovers(namespaces)) == []
