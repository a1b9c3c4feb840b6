"""Counts given as a number or as a percentage of the matched VMs ("10%").

``maxParallel``, ``maxFailures`` and ``rollout.batchSize`` take either form, as Ansible's
``serial`` and AWS SSM's ``MaxConcurrency`` do. A percentage is of the VMs the command
matched, rounded down, and never less than 1.
"""

from __future__ import annotations

import re
from typing import Final

PERCENT_PATTERN: Final = r"^(100|[1-9][0-9]?)%$"
_PERCENT_RE: Final = re.compile(PERCENT_PATTERN)


def is_percent(value: int | str) -> bool:
    return isinstance(value, str) and bool(_PERCENT_RE.fullmatch(value))


def resolve_count(value: int | str, total: int) -> int:
    """``value`` as a number of VMs out of ``total``: a number as it is, a percentage of
    ``total`` rounded down, at least 1."""
    if isinstance(value, int):
        return value
    if not is_percent(value):
        raise ValueError(f"{value!r} is neither a number nor a percentage such as \"10%\"")
    return max(1, total * int(value[:-1]) // 100)


def describe_count(value: int | str, total: int) -> str:
    """``3`` or ``30% of 10 = 3``: how a limit reads in a message."""
    if isinstance(value, int):
        return str(value)
    return f"{value} of {total} = {resolve_count(value, total)}"
