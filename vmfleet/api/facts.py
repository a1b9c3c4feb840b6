"""``status.facts`` of a RemoteVM as the worker's health probe reports it.

A plain dataclass (the worker imports no pydantic); its wire names are those of
``vmfleet.api.models.VMFacts``, which the controller validates the RemoteVM status
with (a unit test keeps the two in step).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Final

WIRE_NAMES: Final = {
    "hostname": "hostname", "os": "os", "kernel": "kernel", "uptime_seconds": "uptimeSeconds",
    "load1": "load1", "load5": "load5", "load15": "load15",
    "memory_total_bytes": "memoryTotalBytes", "memory_available_bytes": "memoryAvailableBytes",
    "root_disk_total_bytes": "rootDiskTotalBytes", "root_disk_used_bytes": "rootDiskUsedBytes",
    "last_probe_time": "lastProbeTime", "probe_latency_seconds": "probeLatencySeconds",
}


@dataclass(frozen=True)
class Facts:
    """What a probe saw of the VM; None: not answered."""

    hostname: str | None = None
    os: str | None = None
    kernel: str | None = None
    uptime_seconds: float | None = None
    load1: float | None = None
    load5: float | None = None
    load15: float | None = None
    memory_total_bytes: int | None = None
    memory_available_bytes: int | None = None
    root_disk_total_bytes: int | None = None
    root_disk_used_bytes: int | None = None
    last_probe_time: str | None = None
    probe_latency_seconds: float | None = None

    def wire(self) -> dict[str, Any]:
        """``status.facts`` as the RemoteVM spells it, without the unanswered fields."""
        return {WIRE_NAMES[f.name]: value for f in dataclasses.fields(self)
                if (value := getattr(self, f.name)) is not None}

    def replace(self, **changes: Any) -> Facts:
        return dataclasses.replace(self, **changes)


__all__ = ["Facts", "WIRE_NAMES"]
