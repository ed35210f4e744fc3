"""The pytest plugin as a user runs it: with AMQP_URL=memory://, tests need no broker."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

USER_TEST = textwrap.dedent(
    """
    from pydantic import BaseModel

    from amqp_jobs import Job
    from amqp_jobs.testing import run_until_idle


    class Ping(BaseModel):
        n: int


    ping = Job("user.ping", Ping, queue="pings")


    async def test_ping_runs(namespace):
        assert namespace.url.startswith("memory://")
        seen = []
        app = namespace.app()
        app.add_handler(ping, lambda args: seen.append(args.n))
        async with namespace.client() as jobs:
            await jobs.enqueue(ping, {"n": 7})
        stats = await run_until_idle(namespace.worker(app))
        assert (stats.succeeded, seen) == (1, [7])
    """
)


def test_the_namespace_fixture_runs_in_memory_with_a_memory_url(tmp_path: Path) -> None:
    (tmp_path / "test_user.py").write_text(USER_TEST)
    (tmp_path / "pytest.ini").write_text("[pytest]\nasyncio_mode = auto\n")
    env = {**os.environ, "AMQP_URL": "memory://", "CI": "true"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout


ASYNC_TESTS = textwrap.dedent(
    """
    import asyncio

    import pytest


    class Client:
        async def fetch(self):
            return 1


    fetch = Client().fetch  # not a test: a bound async method the plugin must not touch


    async def helper():  # not a test either
        return 1


    async def test_unmarked_runs_on_asyncio():
        assert await fetch() == await helper() == 1


    @pytest.mark.asyncio(loop_scope="class")
    class TestOneLoop:
        loops = []

        async def test_one(self):
            self.loops.append(asyncio.get_running_loop())

        async def test_two(self):
            assert asyncio.get_running_loop() is self.loops[0]
    """
)


def test_async_tests_run_without_configuring_pytest_asyncio(tmp_path: Path) -> None:
    """Strict mode (nothing configured): unmarked async tests run; a class's own asyncio
    mark (its loop scope) is kept; objects that are not tests are left alone."""
    (tmp_path / "test_async.py").write_text(ASYNC_TESTS)
    (tmp_path / "pytest.ini").write_text(
        "[pytest]\nasyncio_default_fixture_loop_scope = function\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "AMQP_URL"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])  # this checkout's plugin
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 passed" in done.stdout
