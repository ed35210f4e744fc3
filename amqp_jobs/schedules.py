"""Periodic jobs as data: when a schedule ticks, what a tick enqueues, what is due.

Pure: no broker, no clock of its own. The scheduler (``scheduler.py``) keeps one
cursor per schedule, the last tick it enqueued, in a token only the leader holds, and
asks ``due()`` what to enqueue now. Times are aware datetimes; cron expressions are
read in the schedule's time zone by cronsim, which fires once across DST changes (a
02:30 daily job runs at 03:00 on the spring-forward day and once on the fall-back day).
"""

from __future__ import annotations

import enum
import logging
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from amqp_jobs.errors import ContractError

#: Ticks within this much of now always run: a takeover between leaders delays them.
ON_TIME = timedelta(seconds=5)
#: At most this many ticks are enqueued for one schedule in one step (the rest follow).
MAX_TICKS_PER_STEP = 1000
#: How far back catch-up looks by default.
DEFAULT_WINDOW = timedelta(hours=1)

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,99}$")
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
log = logging.getLogger("amqp_jobs.scheduler")


class CatchUp(enum.StrEnum):
    """What a schedule does with ticks missed while no scheduler ran (older than
    ``ON_TIME``): every one within the window, only the latest, or none."""

    ALL = "all"
    LATEST = "latest"
    NONE = "none"


@dataclass(frozen=True)
class Schedule:
    """One periodic job: a stable name, the job and its args (validated, as JSON), and
    either a cron expression read in ``tz`` or a fixed interval counted from the epoch
    (so the ticks are the same across restarts and processes)."""

    name: str
    job_name: str
    queue: str
    args: Mapping[str, Any]
    cron: str | None = None
    every: timedelta | None = None
    tz: str = "UTC"
    catch_up: CatchUp = CatchUp.LATEST
    window: timedelta = DEFAULT_WINDOW

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ContractError(
                f"schedule name {self.name!r}: 1 to 100 of A-Z a-z 0-9 _ . -, not starting"
                " with . or -"
            )
        if (self.cron is None) == (self.every is None):
            raise ContractError(f"schedule {self.name!r}: give exactly one of cron= or every=")
        if self.every is not None and self.every < timedelta(seconds=1):
            raise ContractError(f"schedule {self.name!r}: every= must be at least 1 second")
        try:
            zone = ZoneInfo(self.tz)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ContractError(f"schedule {self.name!r}: unknown time zone {self.tz!r}") from exc
        if self.cron is not None:
            _cron_ticks(self.cron, datetime.now(zone), self.name)  # checks the expression
        if not isinstance(self.catch_up, CatchUp):
            object.__setattr__(self, "catch_up", catch_up_of(str(self.catch_up), self.name))
        if self.window < timedelta(0):
            raise ContractError(f"schedule {self.name!r}: window must not be negative")

    @property
    def spec(self) -> str:
        """How it ticks, for people: ``cron */5 * * * * (Europe/Berlin)`` or ``every 30s``."""
        if self.cron is not None:
            return f"cron {self.cron} ({self.tz})"
        assert self.every is not None
        return f"every {_short(self.every)}"

    def ticks(self, after: datetime, until: datetime) -> Iterator[datetime]:
        """Ticks t with after < t <= until, in UTC, oldest first."""
        if self.every is not None:
            step = self.every
            n = (after - EPOCH) // step + 1
            tick = EPOCH + n * step
            while tick <= until:
                yield tick
                tick += step
            return
        assert self.cron is not None
        for tick in _cron_ticks(self.cron, after.astimezone(ZoneInfo(self.tz)), self.name):
            if tick > until:
                return
            # In the hour a fall-back repeats, cronsim answers in wall-clock time: a
            # start in the second 02:xx gets the first 02:30 back, which is before it.
            if tick > after:
                yield tick.astimezone(UTC)

    def next_tick(self, after: datetime) -> datetime:
        """The first tick after ``after`` (UTC)."""
        return next(self.ticks(after, datetime.max.replace(tzinfo=UTC)))

    def tick_id(self, tick: datetime) -> str:
        """The job id of a tick: the same for every leader, so a tick is enqueued once."""
        return f"schedule:{self.name}@{tick.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ}"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "job": self.job_name,
            "queue": self.queue,
            "args": dict(self.args),
            "cron": self.cron,
            "every_s": self.every.total_seconds() if self.every is not None else None,
            "tz": self.tz,
            "catch_up": self.catch_up.value,
            "window_s": self.window.total_seconds(),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Schedule:
        every = data.get("every_s")
        return cls(
            name=data["name"],
            job_name=data["job"],
            queue=data["queue"],
            args=dict(data.get("args") or {}),
            cron=data.get("cron"),
            every=timedelta(seconds=every) if every is not None else None,
            tz=data.get("tz", "UTC"),
            catch_up=catch_up_of(data.get("catch_up", "latest"), data["name"]),
            window=timedelta(seconds=data.get("window_s", DEFAULT_WINDOW.total_seconds())),
        )


def due(
    schedule: Schedule, cursor: datetime | None, now: datetime
) -> tuple[list[datetime], datetime]:
    """The ticks to enqueue at ``now`` after the last one handled (``cursor``), and the
    cursor to keep once they are enqueued.

    A schedule never handled starts now: its first tick is the next one. Ticks within
    ``ON_TIME`` of now always run; older ones follow the catch-up policy, and nothing
    older than the window runs. At most ``MAX_TICKS_PER_STEP`` come back at once; the
    cursor then stops at the last of them, and the next step goes on from there.
    """
    if cursor is None:
        return [], now
    on_time = now - ON_TIME
    late: list[datetime] = []
    fresh: list[datetime] = []
    for tick in schedule.ticks(max(cursor, now - max(schedule.window, ON_TIME)), now):
        if tick >= on_time:
            fresh.append(tick)
        elif schedule.catch_up is CatchUp.ALL:
            late.append(tick)
        else:
            late[:] = [tick]  # LATEST and NONE need the newest late tick at most
        if len(late) + len(fresh) >= MAX_TICKS_PER_STEP:
            return late + fresh, (late + fresh)[-1]
    if schedule.catch_up is CatchUp.ALL:
        ticks = late + fresh
    elif schedule.catch_up is CatchUp.LATEST:
        ticks = fresh or late
    else:
        ticks = fresh
    return ticks, max(cursor, now)


def _cron_ticks(expression: str, start: datetime, name: str) -> Iterator[datetime]:
    from cronsim import CronSim, CronSimError

    try:
        return iter(CronSim(expression, start))
    except CronSimError as exc:
        raise ContractError(
            f"schedule {name!r}: bad cron expression {expression!r}: {exc}"
        ) from exc


def catch_up_of(value: str, name: str) -> CatchUp:
    """``value`` as a CatchUp, or ContractError naming the schedule and the choices."""
    try:
        return CatchUp(value)
    except ValueError:
        choices = ", ".join(c.value for c in CatchUp)
        raise ContractError(f"schedule {name!r}: catch_up must be one of {choices}") from None


def _short(delta: timedelta) -> str:
    total = int(delta.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if total % size == 0 and total >= size:
            return f"{total // size}{unit}"
    return f"{delta.total_seconds():g}s"


# -- the scheduler's token: the state every leader hands on ---------------------------


@dataclass
class Entry:
    """One schedule in the token: its definition, when that was announced, and its
    cursor (how far its ticks are dealt with; None until a leader first runs it)."""

    schedule: Schedule
    defined_at: datetime
    cursor: datetime | None = None
    #: the newest tick enqueued
    last_tick: datetime | None = None


@dataclass
class State:
    """What a scheduler token (or an announcement of a process's schedules) says.

    Any two merge: definitions by newest announcement, cursors by the later one. A
    cursor only ever moves in the same transaction that enqueues its ticks, so taking
    the later of two can skip no tick and repeat none.
    """

    entries: dict[str, Entry]
    #: the token's id (None for an announcement) and how many tokens came before it
    token: str | None = None
    version: int = 0
    leader: dict[str, Any] | None = None
    #: entries this process cannot read (a newer format, a time zone or cron syntax it
    #: lacks): carried on as they are, never dropped
    unreadable: dict[str, Any] = field(default_factory=dict)

    def merge(self, other: State) -> bool:
        """Take in what ``other`` knows; whether anything changed."""
        changed = False
        for name, theirs in other.entries.items():
            mine = self.entries.get(name)
            if mine is None:
                self.entries[name] = Entry(
                    theirs.schedule, theirs.defined_at, theirs.cursor, theirs.last_tick
                )
                changed = True
                continue
            if theirs.defined_at > mine.defined_at:
                changed |= theirs.schedule != mine.schedule
                mine.schedule, mine.defined_at = theirs.schedule, theirs.defined_at
            if _later(theirs.cursor, mine.cursor):
                mine.cursor = theirs.cursor
                changed = True
            if _later(theirs.last_tick, mine.last_tick):
                mine.last_tick = theirs.last_tick
        for name, raw in other.unreadable.items():
            if name not in self.entries and self.unreadable.get(name) != raw:
                self.unreadable[name] = raw
                changed = True
        if other.version > self.version:
            self.version = other.version
        return changed

    def to_json(self) -> dict[str, Any]:
        return {
            "v": 1,
            "token": self.token,
            "version": self.version,
            "leader": self.leader,
            "schedules": {
                **self.unreadable,
                **{
                    name: {
                        "def": e.schedule.to_json(),
                        "defined_at": e.defined_at.isoformat(),
                        "cursor": _iso(e.cursor),
                        "last_tick": _iso(e.last_tick),
                    }
                    for name, e in sorted(self.entries.items())
                },
            },
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> State:
        """Raises ValueError (or KeyError, TypeError) for what is not a state."""
        if data.get("v") != 1:
            raise ValueError(f"unknown scheduler state version {data.get('v')!r}")
        entries = {}
        unreadable = {}
        for name, e in (data.get("schedules") or {}).items():
            try:
                entries[name] = Entry(
                    Schedule.from_json(e["def"]),
                    datetime.fromisoformat(e["defined_at"]),
                    _from_iso(e.get("cursor")),
                    _from_iso(e.get("last_tick")),
                )
            except (ValueError, KeyError, TypeError) as exc:  # ContractError included
                log.error("scheduler: cannot read schedule %r, carrying it on: %s", name, exc)
                unreadable[name] = e
        return cls(
            entries,
            token=data.get("token"),
            version=int(data.get("version") or 0),
            leader=data.get("leader"),
            unreadable=unreadable,
        )


def _later(a: datetime | None, b: datetime | None) -> bool:
    return a is not None and (b is None or a > b)


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def _from_iso(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None
