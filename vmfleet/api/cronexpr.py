"""Cron schedules as Kubernetes CronJob reads them (pure; no dependency).

Five fields — minute, hour, day of month, month, day of week — each ``*``, a number, a
range ``a-b``, a step ``*/n`` or ``a-b/n``, or a comma list of those; month and weekday
names (``jan``, ``mon``) and ``7`` for Sunday; ``?`` as ``*``; and the macros
``@yearly`` (``@annually``), ``@monthly``, ``@weekly``, ``@daily`` (``@midnight``) and
``@hourly``. When both day fields are restricted a day matching either runs (cron's
rule); when one is ``*`` the other decides. Times are evaluated in a time zone (IANA
name, default UTC): a wall-clock time that does not exist on a DST change is skipped, one
that happens twice runs once.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

_MACROS = {
    "@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_MONTHS = {n: i + 1 for i, n in enumerate(
    ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"])}
_DAYS = {n: i for i, n in enumerate(["sun", "mon", "tue", "wed", "thu", "fri", "sat"])}
# (name, lowest, highest, names)
_FIELDS: tuple[tuple[str, int, int, dict[str, int]], ...] = (
    ("minute", 0, 59, {}), ("hour", 0, 23, {}), ("day of month", 1, 31, {}),
    ("month", 1, 12, _MONTHS), ("day of week", 0, 7, _DAYS))


class CronError(ValueError):
    """A schedule or time zone that cannot be read."""


def _value(text: str, field: str, low: int, high: int, names: dict[str, int]) -> int:
    key = text.lower()
    if key in names:
        return names[key]
    if not text.isdigit():
        raise CronError(f"{field}: {text!r} is not a number")
    number = int(text)
    if not low <= number <= high:
        raise CronError(f"{field}: {number} is outside {low}-{high}")
    return number


def _field(text: str, field: str, low: int, high: int, names: dict[str, int]) -> frozenset[int]:
    values: set[int] = set()
    for part in text.split(","):
        if not part:
            raise CronError(f"{field}: empty list item in {text!r}")
        base, _, step_text = part.partition("/")
        step = 1
        if step_text:
            if not step_text.isdigit() or int(step_text) == 0:
                raise CronError(f"{field}: step {step_text!r} must be a positive number")
            step = int(step_text)
        if base in ("*", "?"):
            start, end = low, high
        elif "-" in base:
            a, b = base.split("-", 1)
            start, end = _value(a, field, low, high, names), _value(b, field, low, high, names)
            if start > end:
                raise CronError(f"{field}: range {base!r} runs backwards")
        else:
            start = _value(base, field, low, high, names)
            end = high if step_text else start
        values.update(range(start, end + 1, step))
    return frozenset(values)


@dataclass(frozen=True)
class Schedule:
    """A parsed schedule in a time zone."""

    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    any_day: bool  # day of month is *
    any_weekday: bool  # day of week is *
    zone: ZoneInfo

    def _day_matches(self, day: datetime) -> bool:
        dom = day.day in self.days
        dow = (day.isoweekday() % 7) in self.weekdays
        if self.any_day or self.any_weekday:
            return dom and dow
        return dom or dow

    def next_after(self, moment: datetime) -> datetime:
        """The first scheduled time strictly after ``moment`` (aware), in UTC."""
        local = moment.astimezone(self.zone).replace(tzinfo=None, second=0, microsecond=0)
        local += timedelta(minutes=1)
        limit = local + timedelta(days=366 * 5)
        while local < limit:
            if local.month not in self.months:
                local = (local.replace(day=1, hour=0, minute=0) + timedelta(days=32)).replace(day=1)
                continue
            if not self._day_matches(local):
                local = local.replace(hour=0, minute=0) + timedelta(days=1)
                continue
            if local.hour not in self.hours:
                local = local.replace(minute=0) + timedelta(hours=1)
                continue
            if local.minute not in self.minutes:
                local += timedelta(minutes=1)
                continue
            found = self._aware(local)
            if found is not None and found > moment:
                return found
            local += timedelta(minutes=1)
        raise CronError("the schedule never runs within five years")

    def _aware(self, local: datetime) -> datetime | None:
        """The UTC time of a wall-clock time, None when the wall clock skips it (DST)."""
        aware = local.replace(tzinfo=self.zone)
        back = aware.astimezone(UTC).astimezone(self.zone).replace(tzinfo=None)
        if back != local:
            return None
        return aware.astimezone(UTC)

    def times_between(self, after: datetime, until: datetime, limit: int) -> tuple[list[datetime], int]:
        """Scheduled times in ``(after, until]``: the last ``limit`` of them, and how many
        there were in all (counting stops a little past ``limit``)."""
        found: list[datetime] = []
        count = 0
        moment = after
        while True:
            moment = self.next_after(moment)
            if moment > until:
                return found, count
            count += 1
            found.append(moment)
            if len(found) > limit:
                found.pop(0)
            if count > limit + 1:  # enough to say "too many"; jump to the latest ones
                moment = max(moment, until - timedelta(minutes=limit + 1))


def zone(name: str | None) -> ZoneInfo:
    try:
        return ZoneInfo(name or "UTC")
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise CronError(f"unknown time zone {name!r} (use an IANA name such as Europe/Paris)") from exc


def parse(text: str, time_zone: str | None = None) -> Schedule:
    """A schedule, or CronError saying what is wrong with it."""
    expr = _MACROS.get(text.strip().lower(), text.strip())
    if expr.startswith("@"):
        raise CronError(f"unknown macro {text!r} (use @yearly, @monthly, @weekly, @daily or @hourly)")
    if expr.upper().startswith(("TZ=", "CRON_TZ=")):
        raise CronError("put the time zone in timeZone, not in the schedule")
    parts = expr.split()
    if len(parts) != 5:
        raise CronError(f"{text!r} has {len(parts)} fields; a schedule has 5: minute hour "
                        "day-of-month month day-of-week")
    sets = [_field(p, *spec) for p, spec in zip(parts, _FIELDS, strict=True)]
    weekdays = frozenset(d % 7 for d in sets[4])
    return Schedule(sets[0], sets[1], sets[2], sets[3], weekdays,
                    any_day=parts[2] in ("*", "?"), any_weekday=parts[4] in ("*", "?"),
                    zone=zone(time_zone))
