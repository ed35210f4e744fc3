"""Broker URLs: one or several (a cluster), validated, masked, walked in shuffled order.

Accepted everywhere a URL is taken: a string, or a list of strings in Python; several
``--url`` options on the command line; and several URLs in one string (``$AMQP_URL``),
separated by commas, semicolons or whitespace. A host list that shares credentials is
spelt ``amqp://user:pass@host1:5672,host2:5672,host3:5672/vhost``.

Nothing here ever puts a password into a message: ``mask_url`` works on any text, even
text that is not a URL.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from amqp_jobs.errors import ContractError

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/"
SCHEMES = ("amqp", "amqps")
#: ``memory://`` or ``memory://NAME``: the in-process broker of that name (one per process).
MEMORY_SCHEME = "memory"

#: ``scheme://user:password@`` in any text; the password is what gets masked.
_CREDENTIALS = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s;,]*:)[^\s;,/]*@")
#: Where one URL ends and the next begins in a single string.
_SEPARATOR = re.compile(r"[;\s]+|,(?=\s*[A-Za-z][A-Za-z0-9+.-]*://)")


def mask_url(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***``; never raises."""
    return _CREDENTIALS.sub(r"\g<head>***@", text)


@dataclass(frozen=True)
class BrokerURLs:
    """One or more broker URLs of the same cluster; ``str()`` is safe to print."""

    urls: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.urls:
            raise ContractError("no broker URL given")

    @property
    def first(self) -> str:
        return self.urls[0]

    @property
    def memory_name(self) -> str | None:
        """The in-process broker's name for a ``memory://`` URL, else None."""
        url = self.urls[0]
        if not url.startswith(MEMORY_SCHEME + "://"):
            return None
        return url[len(MEMORY_SCHEME) + 3 :].strip("/") or "default"

    def __str__(self) -> str:
        return ", ".join(mask_url(u) for u in self.urls)

    def __len__(self) -> int:
        return len(self.urls)

    def passwords(self) -> set[str]:
        """Every password in these URLs (to scrub from text that may quote them)."""
        out = set()
        for url in self.urls:
            password = urlsplit(url).password
            if password:
                out.add(password)
        return out

    def walk(self) -> Iterator[str]:
        """The URLs forever, in a new shuffled order on each pass (failover order)."""
        while True:
            order = list(self.urls)
            random.shuffle(order)
            yield from order


def resolve(urls: str | Sequence[str] | BrokerURLs | None) -> BrokerURLs:
    """Parse and check broker URLs: given, else ``$AMQP_URL``, else the local default.

    Raises ContractError naming the bad URL (password masked) before any connection.
    """
    if isinstance(urls, BrokerURLs):
        return urls
    if urls is None or (isinstance(urls, str | list | tuple) and len(urls) == 0):
        urls = os.environ.get("AMQP_URL") or DEFAULT_URL
    if isinstance(urls, str):
        pieces = [p for p in _SEPARATOR.split(urls.strip()) if p]
    elif isinstance(urls, list | tuple) and all(isinstance(u, str) for u in urls):
        pieces = [p for u in urls for p in _SEPARATOR.split(u.strip()) if p]
    else:
        raise ContractError(
            f"broker URL must be a string or a list of strings, got {type(urls).__name__}"
        )
    out: list[str] = []
    if any(p.startswith(MEMORY_SCHEME + "://") for p in pieces):
        if len(pieces) != 1:
            raise ContractError("a memory:// broker URL cannot be combined with others")
        check_memory_url(pieces[0])
        return BrokerURLs((pieces[0],))
    for piece in pieces:
        for url in _expand_hosts(piece):
            check_url(url)
            if url not in out:
                out.append(url)
    return BrokerURLs(tuple(out))


def _expand_hosts(url: str) -> list[str]:
    """``amqp://u:p@a:1,b:2/vh`` into one URL per host, sharing credentials and path."""
    match = re.match(r"^(?P<scheme>[^:/]+://)(?P<netloc>[^/?#]*)(?P<rest>.*)$", url)
    if not match or "," not in match["netloc"]:
        return [url]
    netloc = match["netloc"]
    userinfo, _, hosts = netloc.rpartition("@")
    prefix = f"{match['scheme']}{userinfo}@" if userinfo else match["scheme"]
    return [prefix + host + match["rest"] for host in hosts.split(",") if host]


def check_memory_url(url: str) -> None:
    name = url[len(MEMORY_SCHEME) + 3 :].strip("/")
    if name and not re.fullmatch(r"[A-Za-z0-9_.\-]{1,100}", name):
        raise ContractError(
            f"invalid broker URL {url!r}: memory://NAME takes a name of letters, digits,"
            " '_', '.' and '-'"
        )


def check_url(url: str) -> None:
    """Raise ContractError if ``url`` is not a usable amqp:// or amqps:// URL."""
    shown = mask_url(url)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ContractError(f"invalid broker URL {shown!r}: {_why(exc)}") from None
    if parts.scheme not in SCHEMES:
        raise ContractError(
            f"invalid broker URL {shown!r}: the scheme must be amqp://, amqps:// or memory://"
            " (several URLs are separated by commas, semicolons or spaces)"
        )
    if not parts.hostname:
        raise ContractError(f"invalid broker URL {shown!r}: no host")
    if port == 0:
        raise ContractError(f"invalid broker URL {shown!r}: port 0")


def _why(exc: ValueError) -> str:
    text = str(exc)
    if "Port" in text or "port" in text:
        return "the port must be a number from 1 to 65535"
    if "IPv6" in text:
        return "an IPv6 host must be in brackets, like [::1]"
    return mask_url(text)
