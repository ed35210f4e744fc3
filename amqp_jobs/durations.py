"""Durations: one conversion of numbers and timedeltas to seconds, one parser of text.

``seconds()`` is the conversion for durations given to the Python API (timeouts,
backoffs, delays); ``parse_duration()`` the parser for durations given on the command
line (``90``, ``90s``, ``1h30m``, ``500ms``). Both raise ContractError saying what was
wrong. (``errors.Retry`` converts its delay inline: errors.py cannot import this module,
which imports it.)
"""

from __future__ import annotations

import math
import re
from datetime import timedelta

from amqp_jobs.errors import ContractError

#: Units a text duration may use, in seconds.
UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
EXAMPLES = "examples: 30, 30s, 5m, 1h30m, 2d, 500ms"


def seconds(value: float | timedelta, what: str, *, allow_negative: bool = False) -> float:
    """``value`` (seconds, or a timedelta) as seconds: finite, and not negative unless
    ``allow_negative``. ``what`` names the value in the ContractError."""
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ContractError(f"{what} must be seconds or a timedelta, got {value!r}")
    if value < 0 and not allow_negative:
        raise ContractError(f"{what} must not be negative, got {value}")
    if not math.isfinite(value):
        raise ContractError(f"{what} must be a finite number of seconds, got {value}")
    return float(value)


def parse_duration(text: str, what: str = "duration") -> float:
    """Seconds in ``'90'``, ``'1.5'``, ``'90s'``, ``'5m'``, ``'1h30m'``, ``'2d'``, ``'500ms'``.

    A plain number is seconds; units (ms, s, m, h, d, w; any case) may be combined. The
    result is finite and not negative, or ContractError says what was wrong.
    """
    cleaned = text.strip().lower()
    try:
        total = float(cleaned)
    except ValueError:
        units = _in_units(cleaned.removeprefix("-"))
        if units is None:
            raise ContractError(f"not a duration: {text!r} ({EXAMPLES})") from None
        total = -units if cleaned.startswith("-") else units
    if total < 0:
        raise ContractError(f"{what} must not be negative: {text!r}")
    return seconds(total + 0.0, what)  # + 0.0: '-0' is 0.0, not -0.0


def _in_units(text: str) -> float | None:
    """Seconds in ``text`` made of number-unit parts (``1h30m``), or None if it is not."""
    pos, total = 0, 0.0
    for m in _PART.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * UNITS[m.group(2)]
        pos = m.end()
    return total if text and pos == len(text) else None
