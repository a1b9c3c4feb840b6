"""Signals that end commands: their names as SSH reports them, and exit codes 128+N."""

from __future__ import annotations

import signal as _signal
from typing import Any


def signal_number(name: str) -> int | None:
    """``KILL`` -> 9 (the names of RFC 4254 6.10, without ``SIG``; Linux numbers)."""
    try:
        return int(_signal.Signals["SIG" + name.removeprefix("SIG")])
    except KeyError:
        return None


def signal_exit_code(name: str) -> int | None:
    """The shell's convention for a command killed by signal N: 128+N (KILL: 137)."""
    number = signal_number(name)
    return 128 + number if number is not None else None


def signal_outcome(name: str | None, exit_code: int | None) -> dict[str, Any]:
    """The result fields ``signal`` and, when no exit code was reported, ``exitCode``."""
    if name is None:
        return {"signal": None}
    fields: dict[str, Any] = {"signal": name}
    if exit_code is None:
        fields["exitCode"] = signal_exit_code(name)
    return fields


__all__ = ["signal_exit_code", "signal_number", "signal_outcome"]
