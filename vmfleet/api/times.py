"""RFC 3339 timestamps as vmfleet writes them into status fields (UTC, milliseconds, ``Z``).

The one definition: the controller, the workers, the CLI and the Airflow provider all
format and parse status times here.
"""

from __future__ import annotations

from datetime import UTC, datetime


def rfc3339(moment: datetime) -> str:
    """``moment`` (timezone-aware) as written into status fields: ``2026-12-01T08:25:00.123Z``."""
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def now_rfc3339() -> str:
    """Now, in UTC, as written into status fields."""
    return rfc3339(datetime.now(UTC))


def parse_rfc3339(value: str) -> datetime:
    """A status time (``Z`` or an offset) as a timezone-aware datetime; ValueError if it is none."""
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


__all__ = ["now_rfc3339", "parse_rfc3339", "rfc3339"]
