"""Repository artefacts stay true to the code: compose file, README commands, CLI help."""

import argparse
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


def _parsers(
    parser: argparse.ArgumentParser, path: str = "amqp-jobs"
) -> list[tuple[str, argparse.ArgumentParser]]:
    found = [(path, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _parsers(sub, f"{path} {name}")
    return found


def test_every_command_and_option_has_help() -> None:
    for path, parser in _parsers(build_parser()):
        assert parser.description, f"{path} has no description"
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction) or action.dest == "help":
                continue
            assert action.help, f"{path} {action.option_strings or action.dest} has no help"


def test_every_command_is_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    for path, _ in _parsers(build_parser()):
        if path != "amqp-jobs":
            assert f"{path.removeprefix('amqp-jobs ')}" in readme, path
