"""The command line: one-line errors for user mistakes, never a traceback."""

import subprocess
import sys

import pytest
from pydantic import BaseModel

from amqp_jobs import ContractError, Job, JobApp
from amqp_jobs.cli import main


class A(BaseModel):
    n: int


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "amqp_jobs.cli", *args], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("nocolon", "expected module:app"),
        ("no_such_module_xyz:app", "cannot import 'no_such_module_xyz'"),
        ("examples.shop.worker:nope", "has no attribute 'nope'"),
        ("examples.shop.contracts:send_welcome", "is a Job, not a JobApp"),
    ],
)
def test_bad_app_is_one_line(target: str, message: str) -> None:
    result = run("worker", target)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_unknown_queue_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["worker", "examples.shop.worker:app", "--queue", "nope"]) == 1
    err = capsys.readouterr().err
    assert "no handler runs on queue 'nope'" in err
    assert "billing, crm, emails, fulfilment" in err


def test_bad_numbers_are_refused_by_the_parser() -> None:
    result = run("worker", "examples.shop.worker:app", "--concurrency", "0")
    assert result.returncode == 2
    assert "must be at least 1" in result.stderr


def test_help_describes_shutdown() -> None:
    result = run("worker", "--help")
    assert result.returncode == 0
    assert "second signal exits at once" in result.stdout
    assert "--grace" in result.stdout


def test_job_timeout_beyond_consumer_timeout_is_refused() -> None:
    app = JobApp("t")
    app.add_handler(Job("long.job", A, timeout=3600), lambda args: None)
    with pytest.raises(ContractError, match=r"long\.job.*consumer_timeout"):
        app.worker("amqp://guest:guest@127.0.0.1:5672/")
    app.worker("amqp://guest:guest@127.0.0.1:5672/", consumer_timeout=7200)


def test_app_without_handlers_is_refused() -> None:
    with pytest.raises(ContractError, match="no handlers"):
        JobApp("t").worker()
