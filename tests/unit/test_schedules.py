"""When schedules tick, and what a scheduler step enqueues after downtime."""

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from amqp_jobs.errors import ContractError
from amqp_jobs.schedules import (
    MAX_TICKS_PER_STEP,
    ON_TIME,
    CatchUp,
    Entry,
    Schedule,
    State,
    due,
)

BERLIN = ZoneInfo("Europe/Berlin")


def daily(catch_up: CatchUp = CatchUp.LATEST) -> Schedule:
    return Schedule(
        "nightly", "t.report", "q", {}, cron="30 2 * * *", tz="Europe/Berlin", catch_up=catch_up
    )


def every(seconds: float, catch_up: CatchUp, window: timedelta = timedelta(hours=1)) -> Schedule:
    return Schedule(
        "tick", "t.tick", "q", {"n": 1}, every=timedelta(seconds=seconds), catch_up=catch_up,
        window=window,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("day", "expected_local"),
    [
        # spring forward: 02:30 does not exist that night; it runs once, at 03:00
        (datetime(2026, 3, 29, tzinfo=BERLIN), ["2026-03-29T03:00:00+02:00"]),
        # fall back: 02:30 happens twice on the wall clock; it runs once
        (datetime(2026, 10, 25, tzinfo=BERLIN), ["2026-10-25T02:30:00+02:00"]),
        (datetime(2026, 11, 23, tzinfo=BERLIN), ["2026-11-23T02:30:00+01:00"]),
    ],
)
def test_a_daily_0230_berlin_job_runs_once_on_dst_change_days(
    day: datetime, expected_local: list[str]
) -> None:
    ticks = list(daily().ticks(day, day + timedelta(hours=23, minutes=59)))
    assert [t.astimezone(BERLIN).isoformat() for t in ticks] == expected_local
    assert all(t.tzinfo is UTC for t in ticks)


def test_interval_ticks_are_anchored_to_the_epoch_not_to_a_start() -> None:
    s = every(5, CatchUp.ALL)
    t0 = datetime(2026, 11, 23, 12, 0, 1, 300_000, tzinfo=UTC)
    a = list(s.ticks(t0, t0 + timedelta(seconds=12)))
    b = list(s.ticks(t0 + timedelta(seconds=2), t0 + timedelta(seconds=12)))
    assert (
        a
        == b
        == [
            datetime(2026, 11, 23, 12, 0, 5, tzinfo=UTC),
            datetime(2026, 11, 23, 12, 0, 10, tzinfo=UTC),
        ]
    )
    assert s.next_tick(a[-1]) == a[-1] + timedelta(seconds=5)


def test_a_tick_has_one_job_id_whoever_computes_it() -> None:
    tick = datetime(2026, 11, 23, 1, 30, tzinfo=UTC)
    assert daily().tick_id(tick) == "schedule:nightly@2026-11-23T01:30:00Z"
    assert daily().tick_id(tick.astimezone(BERLIN)) == daily().tick_id(tick)


def test_a_new_schedule_starts_now_and_runs_nothing_from_before() -> None:
    now = datetime(2026, 11, 23, 12, 0, 0, 500_000, tzinfo=UTC)
    assert due(every(1, CatchUp.ALL), None, now) == ([], now)


@pytest.mark.parametrize("policy", list(CatchUp))
def test_on_time_ticks_run_whatever_the_policy(policy: CatchUp) -> None:
    """A takeover delays ticks by a second or two: they are not 'missed'."""
    now = datetime(2026, 11, 23, 12, 0, 10, 200_000, tzinfo=UTC)
    cursor = now - timedelta(seconds=3)
    ticks, new_cursor = due(every(1, policy), cursor, now)
    assert [t.second for t in ticks] == [8, 9, 10]
    assert new_cursor == now


def test_downtime_catch_up_all_latest_none() -> None:
    now = datetime(2026, 11, 23, 12, 0, 0, 500_000, tzinfo=UTC)
    cursor = now - timedelta(minutes=10)  # ten minutes without a scheduler
    all_ticks, _ = due(every(60, CatchUp.ALL), cursor, now)
    assert len(all_ticks) == 10  # 11:51 .. 12:00, each once
    assert all_ticks == sorted(set(all_ticks))
    latest, _ = due(every(60, CatchUp.LATEST), cursor, now)
    assert latest == [datetime(2026, 11, 23, 12, 0, tzinfo=UTC)]
    late_only = now + timedelta(seconds=30)  # the newest tick is 30 s old: not on time
    assert due(every(60, CatchUp.LATEST), cursor, late_only)[0] == latest
    assert due(every(60, CatchUp.NONE), cursor, late_only) == ([], late_only)


def test_catch_up_never_reaches_past_the_window() -> None:
    now = datetime(2026, 11, 23, 12, 0, 0, 500_000, tzinfo=UTC)
    s = every(60, CatchUp.ALL, window=timedelta(minutes=5))
    ticks, _ = due(s, now - timedelta(days=2), now)
    assert ticks[0] > now - timedelta(minutes=5)
    assert len(ticks) == 5


def test_a_long_catch_up_goes_in_steps_and_misses_nothing() -> None:
    now = datetime(2026, 11, 23, 12, 0, 0, 500_000, tzinfo=UTC)
    s = every(1, CatchUp.ALL, window=timedelta(hours=1))
    cursor = now - timedelta(minutes=30)
    seen: list[datetime] = []
    for _ in range(5):
        ticks, cursor = due(s, cursor, now)
        assert len(ticks) <= MAX_TICKS_PER_STEP
        seen += ticks
    assert len(seen) == 1800 == len(set(seen))
    assert cursor == now


def test_a_repeated_step_with_the_kept_cursor_enqueues_nothing_twice() -> None:
    now = datetime(2026, 11, 23, 12, 0, 0, 500_000, tzinfo=UTC)
    s = every(1, CatchUp.ALL)
    ticks, cursor = due(s, now - timedelta(seconds=4), now)
    assert len(ticks) == 4
    assert due(s, cursor, now + timedelta(milliseconds=300))[0] == []
    assert due(s, cursor, now + ON_TIME)[0] == [now + timedelta(seconds=n + 0.5) for n in range(5)]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "bad name!", "cron": "* * * * *"}, "schedule name"),
        ({"cron": "* * * *"}, "bad cron expression"),
        ({"cron": "* * * * *", "every": timedelta(seconds=5)}, "exactly one of"),
        ({}, "exactly one of"),
        ({"every": timedelta(milliseconds=10)}, "at least 1 second"),
        ({"cron": "* * * * *", "tz": "Mars/Olympus"}, "unknown time zone"),
        ({"cron": "* * * * *", "catch_up": "some"}, "catch_up must be one of"),
    ],
)
def test_bad_schedules_are_refused_naming_the_problem(
    kwargs: dict[str, object], message: str
) -> None:
    fields: dict[str, object] = {"name": "s", "job_name": "t.j", "queue": "q", "args": {}}
    with pytest.raises(ContractError, match=message):
        Schedule(**{**fields, **kwargs})  # type: ignore[arg-type]


def test_a_schedule_survives_json() -> None:
    for s in (daily(CatchUp.ALL), every(30, CatchUp.NONE)):
        assert Schedule.from_json(s.to_json()) == s
    assert daily().spec == "cron 30 2 * * * (Europe/Berlin)"
    assert every(90, CatchUp.ALL).spec == "every 90s"
    assert every(3600, CatchUp.ALL).spec == "every 1h"


def test_a_cursor_inside_the_repeated_hour_gets_no_tick_twice_and_no_past_one() -> None:
    """Fall-back night in Berlin: 02:00-03:00 happens twice (00:00-01:00Z, 01:00-02:00Z).
    The 02:30 tick (00:30Z) ran; from anywhere later that night, the next is tomorrow's."""
    s = daily(CatchUp.ALL)
    ran = datetime(2026, 10, 25, 0, 30, tzinfo=UTC)
    tomorrow = datetime(2026, 10, 26, 1, 30, tzinfo=UTC)  # 02:30 CET
    for minutes in (1, 40, 75, 100, 130):  # first 02:xx, second 02:xx, after
        now = ran + timedelta(minutes=minutes)
        assert due(s, ran + timedelta(milliseconds=1), now)[0] == [], now
        assert s.next_tick(now) == tomorrow, now
        assert list(s.ticks(now, now + timedelta(hours=30))) == [tomorrow], now


def entry(cursor: datetime | None, defined: int, every_s: int = 60) -> Entry:
    return Entry(
        every(every_s, CatchUp.ALL), datetime(2026, 11, 23, 12, defined, tzinfo=UTC), cursor
    )


def test_states_merge_to_the_later_cursor_and_the_newest_definition() -> None:
    t = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
    mine = State({"tick": entry(t, defined=0)}, version=4)
    theirs = State({"tick": entry(t - timedelta(minutes=5), defined=1, every_s=30)}, version=7)
    assert mine.merge(theirs)
    assert mine.entries["tick"].cursor == t  # never moved back
    assert mine.entries["tick"].schedule.every == timedelta(seconds=30)  # newer definition
    assert mine.version == 7
    older = State({"tick": entry(t + timedelta(minutes=1), defined=0, every_s=90)})
    assert mine.merge(older)  # its cursor is later: taken; its definition is older: not
    assert mine.entries["tick"].cursor == t + timedelta(minutes=1)
    assert mine.entries["tick"].schedule.every == timedelta(seconds=30)
    assert not mine.merge(older)  # nothing new the second time


def test_a_state_carries_entries_it_cannot_read_and_survives_json() -> None:
    t = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
    data = State({"tick": entry(t, defined=0)}, token="abc", version=3).to_json()
    data["schedules"]["martian"] = {"def": {"name": "martian", "tz": "Mars/Olympus"}}
    state = State.from_json(data)
    assert set(state.entries) == {"tick"} and set(state.unreadable) == {"martian"}
    again = State.from_json(state.to_json())
    assert again.unreadable == state.unreadable  # handed on as it came
    assert again.entries["tick"].cursor == t and again.token == "abc" and again.version == 3
