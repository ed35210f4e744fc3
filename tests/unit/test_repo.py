"""Repository artefacts stay true to the code: compose file, README commands, CLI help."""

import re
from pathlib import Path

import yaml

from amqp_jobs.cli import build_parser, load_app

ROOT = Path(__file__).resolve().parents[2]


def test_compose_runs_a_real_app_against_its_broker() -> None:
    compose = yaml.safe_load((ROOT / "compose" / "docker-compose.yml").read_text())
    services = compose["services"]
    assert services["rabbitmq"]["image"].startswith("rabbitmq:3.")
    assert "5672:5672" in services["rabbitmq"]["ports"]
    worker = services["worker"]
    assert worker["environment"]["AMQP_URL"].startswith("amqp://guest:guest@rabbitmq:5672")
    target = re.search(r"amqp-jobs worker (\S+)", worker["command"])
    assert target is not None
    assert load_app(target.group(1)).queues, "the compose worker runs an app with handlers"


def test_readme_starts_with_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:sh|bash)?\n(.*?)```", readme, re.S)
    first = [line.split("#")[0].strip() for line in blocks[0].splitlines()]
    first = [line for line in first if line]
    assert first == ["make demo", "make test"]


def test_every_worker_option_is_documented_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    parser = build_parser()
    worker = parser._subparsers._group_actions[0].choices["worker"]  # type: ignore[union-attr]
    for action in worker._actions:
        for flag in action.option_strings:
            if flag.startswith("--") and flag != "--help":
                assert flag in readme, f"{flag} is not in the README"
