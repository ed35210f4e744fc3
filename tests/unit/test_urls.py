"""Broker URLs: several for a cluster, every spelling users try, and no password ever shown."""

import os
import subprocess
import sys

import pytest

from amqp_jobs import ContractError
from amqp_jobs.transport.amqp.connection import scrub
from amqp_jobs.urls import DEFAULT_URL, mask_url, resolve

A = "amqp://guest:s3cret@a.example:5701/"
B = "amqp://guest:s3cret@b.example:5702/"


@pytest.mark.parametrize(
    "given",
    [
        [A, B],
        f"{A},{B}",
        f"{A};{B}",
        f"{A} {B}",
        f"{A}, {B}",
        f"{A}\n{B}",
        "amqp://guest:s3cret@a.example:5701,b.example:5702/",
    ],
)
def test_several_urls_in_every_documented_spelling(given: str | list[str]) -> None:
    assert resolve(given).urls == (A, B)


def test_default_is_amqp_url_then_local(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AMQP_URL", f"{A} {B}")
    assert resolve(None).urls == (A, B)
    monkeypatch.delenv("AMQP_URL")
    assert resolve(None).urls == (DEFAULT_URL,)


def test_duplicates_are_dropped_and_order_kept() -> None:
    assert resolve([B, A, B]).urls == (B, A)


def test_str_masks_every_password() -> None:
    text = str(resolve([A, "amqps://u:other@c:5671/vh"]))
    assert "s3cret" not in text and "other" not in text
    assert "a.example:5701" in text and "amqps://u:***@c:5671/vh" in text


def test_walk_visits_every_url_each_pass() -> None:
    walk = resolve([A, B, "amqp://c/"]).walk()
    for _ in range(5):
        assert {next(walk) for _ in range(3)} == {A, B, "amqp://c/"}


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("amqp://guest:x@127.0.0.1:notaport/", "port must be a number"),
        ("amqp://guest:x@127.0.0.1:99999/", "port must be a number"),
        ("amqp://guest:x@[::1/", "IPv6 host must be in brackets"),
        ("not a url", "scheme must be amqp"),
        ("http://guest:x@host/", "scheme must be amqp"),
        ("amqp://guest:x@/", "no host"),
    ],
)
def test_malformed_urls_raise_a_typed_error_without_the_password(url: str, why: str) -> None:
    with pytest.raises(ContractError, match=why) as info:
        resolve(url)
    assert "x@" not in str(info.value).replace("***@", "")


def test_wrong_types_raise_a_typed_error() -> None:
    with pytest.raises(ContractError, match="string or a list of strings"):
        resolve(42)  # type: ignore[arg-type]
    with pytest.raises(ContractError, match="string or a list of strings"):
        resolve([A, 7])  # type: ignore[list-item]


@pytest.mark.parametrize(
    "text",
    [
        "amqp://guest:s3cret@127.0.0.1:notaport/",
        "amqp://guest:s3cret@[::1",
        "amqp://u:s3cret@a:1/;amqp://u:s3cret@b:2/",
        "connecting to amqp://guest:s3cret@host/ failed",
    ],
)
def test_mask_url_never_raises_and_never_leaks(text: str) -> None:
    assert "s3cret" not in mask_url(text)


def test_scrub_removes_passwords_quoted_without_their_url() -> None:
    assert "s3cret" not in scrub("login failed for password s3cret", [A, B])  # type: ignore[arg-type]


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "amqp_jobs.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


BAD_URLS = [
    "amqp://guest:s3cret@127.0.0.1:notaport/",
    "not a url",
    "amqp://guest:s3cret@127.0.0.1:99999/",
    "amqp://guest:s3cret@[::1",
]


@pytest.mark.parametrize("url", BAD_URLS)
@pytest.mark.parametrize(
    "command",
    [
        ["status", "--namespace", "n", "--queue", "q"],
        ["enqueue", "shop.send_welcome", '{"user_id": 1}', "--app", "examples.shop.worker:app"],
        ["worker", "examples.shop.worker:app"],
    ],
)
def test_a_bad_url_is_one_line_on_the_command_line(url: str, command: list[str]) -> None:
    for result in (cli(*command, "--url", url), cli(*command, env={"AMQP_URL": url})):
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "invalid broker URL" in result.stderr
        assert "s3cret" not in result.stderr + result.stdout


def test_kombu_style_list_is_accepted_and_masked() -> None:
    # Both URLs refuse connections (nothing listens on port 1): the error names both
    # nodes, with every password masked, and no frame error from parsing one as the other.
    urls = "amqp://guest:first@127.0.0.1:1/;amqp://guest:second@127.0.0.1:2/"
    result = cli("status", "--namespace", "n", "--queue", "q", "--connect-timeout", "0.5",
                 env={"AMQP_URL": urls})  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "first" not in result.stderr and "second" not in result.stderr
    assert "127.0.0.1:1" in result.stderr and "127.0.0.1:2" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_exception_chain_with_a_cycle_is_walked_once() -> None:
    """aiormq's connection error and the reset it wraps can point at each other."""
    from amqp_jobs.transport.amqp.connection import _chain

    outer, inner = ConnectionError("wrapper"), ConnectionResetError("reset")
    outer.__cause__, inner.__context__ = inner, outer
    assert list(_chain(outer)) == [outer, inner]
