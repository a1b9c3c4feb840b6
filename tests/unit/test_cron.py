"""RemoteCronCommand: cron syntax and CronJob's rules, with a fake clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from controller.cron import Run, plan, run_name
from vmfleet.api.cronexpr import CronError, parse
from vmfleet.api.kinds import RemoteCronCommandSpec

T0 = datetime(2026, 12, 6, 12, 0, 30, tzinfo=UTC)


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def z(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def cron(**fields) -> RemoteCronCommandSpec:
    return RemoteCronCommandSpec.model_validate({
        "schedule": "* * * * *",
        "commandTemplate": {"spec": {"selector": {}, "command": "true"}}, **fields})


def run(name: str, phase: str | None, scheduled: datetime, **kw) -> Run:
    return Run(name=name, uid=f"uid-{name}", scheduled=scheduled, phase=phase, **kw)


# --------------------------------------------------------------------------- syntax


@pytest.mark.parametrize(
    ("expr", "after", "expected"),
    [
        ("*/15 2 * * mon-fri", datetime(2026, 12, 6, 12, tzinfo=UTC), datetime(2026, 12, 7, 2, tzinfo=UTC)),
        ("0 0 1 jan *", datetime(2026, 12, 6, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC)),
        ("@hourly", datetime(2026, 12, 6, 12, 30, tzinfo=UTC), datetime(2026, 12, 6, 13, tzinfo=UTC)),
        ("0 12 * * 7", datetime(2026, 12, 6, 12, tzinfo=UTC), datetime(2026, 12, 13, 12, tzinfo=UTC)),
        # both day fields restricted: either matches (the 7th is a Monday, the 10th the 10th)
        ("0 0 10 * 1", datetime(2026, 12, 6, tzinfo=UTC), datetime(2026, 12, 7, tzinfo=UTC)),
        ("5-10/5 * * * *", datetime(2026, 12, 6, 12, 5, tzinfo=UTC), datetime(2026, 12, 6, 12, 10, tzinfo=UTC)),
    ],
)
def test_next_time(expr, after, expected):
    assert parse(expr).next_after(after) == expected


def test_time_zone_and_dst():
    paris = parse("30 2 * * *", "Europe/Paris")
    assert paris.next_after(datetime(2026, 12, 6, 12, tzinfo=UTC)) == datetime(2026, 12, 7, 1, 30, tzinfo=UTC)
    # 02:30 does not exist in Paris on 2026-03-29 (clocks go from 02:00 to 03:00): skipped.
    assert paris.next_after(datetime(2026, 3, 28, 12, tzinfo=UTC)) == datetime(2026, 3, 30, 0, 30, tzinfo=UTC)


@pytest.mark.parametrize("expr", ["* * * *", "60 * * * *", "* * 0 * *", "*/0 * * * *",
                                  "5-1 * * * *", "@often", "x * * * *", "TZ=UTC * * * * *"])
def test_bad_schedules(expr):
    with pytest.raises(CronError):
        parse(expr)
    with pytest.raises(ValidationError, match="schedule"):
        cron(schedule=expr)


def test_bad_time_zone():
    with pytest.raises(ValidationError, match="unknown time zone"):
        cron(timeZone="Mars/Olympus")


def test_run_name_is_minutes_since_the_epoch():
    assert run_name("nightly", datetime(2026, 12, 6, 12, 1, tzinfo=UTC)) == "nightly-29942641"


# --------------------------------------------------------------------------- CronJob's rules


def test_not_due_yet():
    step = plan("c", cron(), {}, T0, [], at(0.3))
    assert step.create is None and step.events == []


def test_due_run_is_created_and_recorded():
    step = plan("c", cron(), {}, T0, [], at(0.6))  # 12:01:06
    scheduled = datetime(2026, 12, 6, 12, 1, tzinfo=UTC)
    assert step.create == (run_name("c", scheduled), scheduled)
    assert step.status["lastScheduleTime"] == "2026-12-06T12:01:00.000Z"


def test_a_scheduled_time_is_used_once():
    status = {"lastScheduleTime": "2026-12-06T12:01:00.000Z"}
    assert plan("c", cron(), status, T0, [], at(1.3)).create is None


def test_more_than_100_missed_warns_and_starts_the_latest():
    step = plan("c", cron(), {}, T0, [], at(180.2))  # three hours down (15:00:42)
    assert step.create is not None and step.create[1] == datetime(2026, 12, 6, 15, 0, tzinfo=UTC)
    (event,) = step.events
    assert event[:2] == ("Warning", "TooManyMissedTimes")


def test_starting_deadline_limits_what_is_caught_up():
    # Down from 12:00:30 to 12:05:30: with a 10 s deadline nothing is due any more ...
    assert plan("c", cron(startingDeadlineSeconds=10), {}, T0, [], at(5)).create is None
    # ... with 60 s the latest (12:05) still starts, and nothing counts as too many.
    step = plan("c", cron(startingDeadlineSeconds=60), {}, T0, [], at(5))
    assert step.create is not None and step.create[1] == datetime(2026, 12, 6, 12, 5, tzinfo=UTC)
    assert step.events == []


def test_forbid_skips_while_one_runs_and_keeps_the_schedule_pending():
    running = run("c-1", "Running", at(0.5))
    step = plan("c", cron(concurrencyPolicy="Forbid"), {}, T0, [running], at(0.6))
    assert step.create is None
    assert "lastScheduleTime" not in step.status
    assert step.events[0][:2] == ("Normal", "AlreadyActive")
    assert step.status["active"] == [{"name": "c-1", "uid": "uid-c-1"}]
    assert step.status["activeCount"] == 1


def test_allow_runs_alongside():
    running = run("c-1", "Running", at(0.5))
    assert plan("c", cron(), {}, T0, [running], at(0.6)).create is not None


def test_replace_cancels_then_waits_for_the_processes_to_be_gone():
    running = run("c-1", "Running", at(0.5))
    step = plan("c", cron(concurrencyPolicy="Replace"), {}, T0, [running], at(0.6))
    assert step.cancel == [running] and step.create is None and step.delete == []
    # Its results say the processes are gone (Cancelled): deleted, and the next starts.
    gone = run("c-1", "Cancelled", at(0.5), replaced=True)
    step = plan("c", cron(concurrencyPolicy="Replace"), {}, T0, [gone], at(0.7))
    assert step.delete == [gone] and step.create is not None and step.cancel == []


def test_replace_gives_up_waiting_after_the_deadline_and_says_so():
    stuck = run("c-1", "Running", at(0.5), summary="Running on vm2", replaced=True)
    spec = cron(concurrencyPolicy="Replace", startingDeadlineSeconds=20)
    assert plan("c", spec, {}, T0, [stuck], at(0.8)).create is None  # 12:01:18
    step = plan("c", spec, {}, T0, [stuck], at(0.9))  # 12:01:24
    assert step.delete == [stuck] and step.create is not None
    (event,) = step.events
    assert event[:2] == ("Warning", "ReplacedRunning")
    assert "c-1 was not yet stopped (Running on vm2) after 20s" in event[2]


def test_suspend_starts_nothing_but_keeps_history_trimmed():
    runs = [run(f"c-{i}", "Succeeded", at(i)) for i in range(5)]
    step = plan("c", cron(suspend=True), {}, T0, runs, at(10))
    assert step.create is None
    assert [r.name for r in step.delete] == ["c-0", "c-1"]


def test_history_limits_and_last_successful_time():
    runs = [run(f"ok-{i}", "Succeeded", at(i), completion_time=z(at(i + 0.5))) for i in range(4)]
    runs += [run(f"bad-{i}", "Failed", at(i)) for i in range(3)]
    step = plan("c", cron(successfulHistoryLimit=2, failedHistoryLimit=1),
                {"lastScheduleTime": z(at(10))}, T0, runs, at(10.2))
    assert [r.name for r in step.delete] == ["ok-0", "ok-1", "bad-0", "bad-1"]
    assert step.status["lastSuccessfulTime"] == z(at(3.5))
    assert step.status["active"] is None and step.status["activeCount"] == 0


def test_time_zone_of_the_schedule():
    spec = cron(schedule="0 2 * * *", timeZone="Europe/Paris")
    created = datetime(2026, 12, 6, 0, 0, tzinfo=UTC)
    assert plan("c", spec, {}, created, [], datetime(2026, 12, 6, 0, 59, tzinfo=UTC)).create is None
    step = plan("c", spec, {}, created, [], datetime(2026, 12, 6, 1, 0, 5, tzinfo=UTC))
    assert step.create is not None and step.create[1] == datetime(2026, 12, 6, 1, 0, tzinfo=UTC)
