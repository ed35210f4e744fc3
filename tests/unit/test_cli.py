"""The command line: one-line errors for user mistakes, never a traceback."""

import argparse
import contextlib
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import BaseModel

from amqp_jobs import ContractError, Job, JobApp
from amqp_jobs.cli import build_parser, main
from amqp_jobs.commands import scrub
from amqp_jobs.urls import resolve

ROOT = Path(__file__).resolve().parents[2]


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


# -- a broker that is not there, or goes away ------------------------------------------

#: Every command that talks to the broker, with what it needs besides the broker.
BROKER_COMMANDS = [
    ["status", "--queue", "q"],
    ["dead", "list", "q"],
    ["dead", "show", "some-id", "--queue", "q"],
    ["dead", "replay", "q", "--all"],
    ["dead", "purge", "q", "--yes"],
    ["topology", "declare", "--queue", "q"],
    ["enqueue", "billing.sync_invoice", '{"user_id": 1, "amount_cents": 2}',
     "--schemas", str(ROOT / "schemas")],
]  # fmt: skip


def free_port() -> int:
    """A port nothing listens on (bound for a moment, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def hangs_up(reads: int, answer: bytes = b"") -> Iterator[int]:
    """A TCP server that accepts, reads up to ``reads`` bytes, sends ``answer`` and
    closes: a broker that goes away right after connecting or mid-handshake."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.05)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                with contextlib.suppress(OSError):
                    if reads:
                        conn.recv(reads)
                    conn.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(server.getsockname()[1])
    finally:
        stop.set()
        thread.join(5)
        server.close()


def run_against(
    port: int, command: list[str], capsys: pytest.CaptureFixture[str]
) -> tuple[int, str]:
    url = f"amqp://guest:hunter2@127.0.0.1:{port}/"
    code = main([*command, "--url", url, "--namespace", "n", "--connect-timeout", "0.2"])
    out, err = capsys.readouterr()
    return code, out + err


def assert_one_line_error(code: int, output: str) -> None:
    assert code == 1, output
    assert output.startswith("amqp-jobs: error: "), output
    assert len(output.strip().splitlines()) == 1, output
    assert "Traceback" not in output
    assert "hunter2" not in output
    assert "guest:***@127.0.0.1" in output, "names the broker, password masked"


@pytest.mark.parametrize("command", BROKER_COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_no_broker_listening_is_one_line(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert_one_line_error(*run_against(free_port(), command, capsys))


@pytest.mark.parametrize(
    ("reads", "answer"),
    [(0, b""), (8, b""), (8, b"HTTP/1.1 400 Bad Request\r\n\r\n")],
    ids=["closes-at-once", "closes-mid-handshake", "answers-garbage"],
)
@pytest.mark.parametrize("command", BROKER_COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_a_broker_that_hangs_up_is_one_line(
    command: list[str], reads: int, answer: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    with hangs_up(reads, answer) as port:
        assert_one_line_error(*run_against(port, command, capsys))


def test_a_file_that_cannot_be_written_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "no-such-dir" / "shop.json"
    code = main(["asyncapi", "--app", "examples.shop.worker:app", "-o", str(target)])
    err = capsys.readouterr().err
    assert code == 1
    assert len(err.strip().splitlines()) == 1 and "no-such-dir" in err


# -- options: declared once, offered only where they do something ----------------------


def subparser(*command: str) -> argparse.ArgumentParser:
    parser = build_parser()
    for name in command:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return parser


def options_of(*command: str) -> set[str]:
    return {flag for action in subparser(*command)._actions for flag in action.option_strings}


@pytest.mark.parametrize(
    ("command", "takes", "lacks"),
    [
        (["worker"], {"--url", "--namespace", "--connect-timeout", "--grace"}, {"--json"}),
        (["status"], {"--url", "--connect-timeout", "--app", "--json", "--queue"}, set()),
        (["schedules"], {"--url", "--connect-timeout", "--app", "--json"}, {"--queue"}),
        (["dead", "list"], {"--url", "--connect-timeout", "--job", "--limit"}, {"--queue"}),
        (["enqueue"], {"--url", "--connect-timeout", "--delay", "--at"}, {"--queue"}),
        (["topology", "declare"], {"--url", "--connect-timeout", "--queue", "--job"}, set()),
        # these never connect: no broker options
        (["topology", "show"], {"--namespace", "--app", "--json"}, {"--url", "--connect-timeout"}),
        (["schemas", "export"], {"--namespace", "--app", "--json"}, {"--url", "--connect-timeout"}),
        (["schemas", "check"], {"--namespace", "--app", "--json"}, {"--url", "--connect-timeout"}),
        # --url names the server in the document; nothing connects; the output is JSON
        (["asyncapi"], {"--url", "--namespace", "--app"}, {"--connect-timeout", "--json"}),
    ],
)
def test_each_command_offers_only_options_that_do_something(
    command: list[str], takes: set[str], lacks: set[str]
) -> None:
    offered = options_of(*command)
    assert takes <= offered
    assert not lacks & offered


def test_shared_options_read_the_same_everywhere() -> None:
    helps: dict[str, set[str]] = {}
    for command in (["status"], ["dead", "list"], ["enqueue"], ["topology", "declare"],
                    ["schemas", "check"], ["asyncapi"], ["worker"]):  # fmt: skip
        text = " ".join(subparser(*command).format_help().split())
        helps.setdefault("namespace", set()).add(text.split("--namespace NS ")[1][:60])
        if "--url URL " in text:
            helps.setdefault("url", set()).add(text.split("--url URL ")[1][:60])
    assert all(len(texts) == 1 for texts in helps.values()), helps


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--grace", "90s", "--connect-timeout", "500ms", "--consumer-timeout", "1h"],
         {"grace": 90.0, "connect_timeout": 0.5, "consumer_timeout": 3600.0}),
        (["--grace", "2.5"], {"grace": 2.5}),
    ],
)  # fmt: skip
def test_every_duration_option_takes_the_same_durations(
    args: list[str], expected: dict[str, float]
) -> None:
    parsed = build_parser().parse_args(["worker", "examples.shop.worker:app", *args])
    assert {k: getattr(parsed, k) for k in expected} == expected
    purge = build_parser().parse_args(["dead", "purge", "q", "--older-than", "1h30m"])
    assert purge.older_than == 5400.0


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--grace", "-1", "must not be negative"),
        ("--grace", "soon", "not a duration: 'soon'"),
        ("--connect-timeout", "nan", "finite"),
        ("--consumer-timeout", "inf", "finite"),
    ],
)
def test_a_bad_duration_is_refused_by_the_parser(
    option: str, value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["worker", "examples.shop.worker:app", option, value]) == 2
    err = capsys.readouterr().err
    assert message in err and option in err


def test_errors_are_scrubbed_of_passwords_but_keep_user_names() -> None:
    urls = resolve("amqp://guest:guest@h:5672/,amqp://app:hunter2@k:5672/")
    text = "cannot reach amqp://guest:guest@h:5672/:\n refused (hunter2, guest)"
    assert scrub(text, urls) == "cannot reach amqp://guest:***@h:5672/: refused (***, ***)"
    assert scrub("amqp://u:p4ss@x/ down", None) == "amqp://u:***@x/ down"


# -- what a newcomer types first -------------------------------------------------------


def test_version() -> None:
    from amqp_jobs import __version__

    result = run("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"amqp-jobs {__version__}"


def test_no_command_prints_the_commands_and_how_to_learn_more() -> None:
    """As pip does: the help on stdout, exit 0 (git prints its list too, with exit 1)."""
    result = run()
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    out = result.stdout
    assert out.startswith("usage: amqp-jobs")
    for command in ("worker", "status", "dead", "enqueue", "topology", "schemas", "asyncapi"):
        assert f"\n    {command} " in out, command
    assert "amqp-jobs COMMAND --help" in out


@pytest.mark.parametrize(
    ("group", "actions"),
    [
        ("dead", ["list", "show", "replay", "purge"]),
        ("topology", ["show", "declare", "delete"]),
        ("schemas", ["export", "check"]),
    ],
)
def test_a_group_without_action_lists_its_actions(
    group: str, actions: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([group]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out.startswith(f"usage: amqp-jobs {group}")
    for action in actions:
        assert f"\n    {action} " in out, action
    assert f"amqp-jobs {group} ACTION --help" in out


def test_plurals() -> None:
    from amqp_jobs.commands import plural

    assert plural(0, "dead job") == "0 dead jobs"
    assert plural(1, "dead job") == "1 dead job"
    assert plural(2, "queue") == "2 queues"
    assert plural(1, "copy", "copies") == "1 copy"
    assert plural(3, "copy", "copies") == "3 copies"


def test_no_plural_is_spelt_by_hand_in_cli_output() -> None:
    """Counts go through plural(): no ``{n} jobs`` that reads "1 jobs"."""
    import re

    for module in ("cli", "commands", "ops"):
        source = (ROOT / "amqp_jobs" / f"{module}.py").read_text()
        by_hand = re.findall(
            r"(?:\}|%d) (?:dead |handler )?(?:jobs|queues|exchanges|consumers|threads)\b", source
        )
        assert not by_hand, (module, by_hand)


def test_a_job_duration_reads_as_a_person_would_write_it() -> None:
    from amqp_jobs.settle import took

    assert took(0.0004) == "0.4 ms"
    assert took(0.012) == "12 ms"
    assert took(3.21) == "3210 ms"
    assert took(12.34) == "12.3 s"


# -- every option offered is one its command reads ---------------------------------------


def _leaves(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for name, child in subs[0].choices.items():
        yield from _leaves(child, (*path, name))


LEAVES = list(_leaves(build_parser()))


def test_every_command_has_a_handler() -> None:
    names = {" ".join(path) for path, _ in LEAVES}
    assert {"worker", "status", "dead show", "topology delete", "schemas check"} <= names
    for path, parser in LEAVES:
        assert callable(parser.get_default("handler")), path


@pytest.mark.parametrize(("path", "parser"), LEAVES, ids=[" ".join(p) for p, _ in LEAVES])
def test_every_option_a_command_offers_is_read_by_its_handler(
    path: tuple[str, ...], parser: argparse.ArgumentParser
) -> None:
    """A structural check: each option's dest appears in the command's handler as
    ``args.DEST`` (or by name, as Context reads the shared ones), and each ``args.X`` the
    handler reads is an option of that command."""
    import inspect
    import re

    from amqp_jobs import commands

    handler = parser.get_default("handler")
    own = inspect.getsource(handler)
    source = own
    if "Context(args)" in own:
        source += inspect.getsource(commands.Context.__init__)
    dests = {
        a.dest
        for a in parser._actions
        if not isinstance(a, argparse._HelpAction | argparse._VersionAction)
    }
    for dest in dests:
        assert re.search(rf"\bargs\.{dest}\b|[\"']{dest}[\"']", source), (
            f"`amqp-jobs {' '.join(path)}` offers {dest!r}, which its handler never reads"
        )
    read = set(re.findall(r"\bargs\.(\w+)", own))
    assert read <= dests, f"`amqp-jobs {' '.join(path)}` reads {read - dests}, not offered"
