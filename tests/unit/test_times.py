"""vmfleet.api.times: the one RFC 3339 format of status times."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from vmfleet.api import envelope, times

REPO = Path(__file__).resolve().parents[2]


def test_format_is_utc_milliseconds_z():
    moment = datetime(2026, 12, 1, 8, 25, 0, 123456, tzinfo=UTC)
    assert times.rfc3339(moment) == "2026-12-01T08:25:00.123Z"
    east = moment.astimezone(timezone(timedelta(hours=2)))
    assert times.rfc3339(east) == "2026-12-01T08:25:00.123Z"


def test_parse_round_trips_and_is_aware():
    moment = datetime(2026, 12, 1, 8, 25, 0, 123000, tzinfo=UTC)
    assert times.parse_rfc3339("2026-12-01T08:25:00.123Z") == moment
    assert times.parse_rfc3339("2026-12-01T10:25:00.123+02:00") == moment
    assert times.parse_rfc3339(times.rfc3339(moment)) == moment
    now = times.parse_rfc3339(times.now_rfc3339())
    assert now.tzinfo is not None and abs((datetime.now(UTC) - now).total_seconds()) < 5
    with pytest.raises(ValueError):
        times.parse_rfc3339("yesterday")


def test_one_definition():
    assert envelope.now_rfc3339 is times.now_rfc3339
    assert envelope.parse_rfc3339 is times.parse_rfc3339
    # The lead's rewrite of remote_tasks/execute.py switches its retryAfter to times.rfc3339.
    allowed = {REPO / "vmfleet" / "api" / "times.py", REPO / "remote_tasks" / "execute.py"}
    spelled = [
        path for root in ("vmfleet", "controller", "remote_tasks")
        for path in (REPO / root).rglob("*.py")
        if path not in allowed and ('replace("Z", "+00:00")' in path.read_text()
                                    or 'timespec="milliseconds"' in path.read_text())
    ]
    assert spelled == []
