"""The small message the controller sends to a VM's queue for one attempt on one VM."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any


def now_rfc3339() -> str:
    """UTC time with milliseconds, as written into status fields."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_rfc3339(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


@dataclass(frozen=True)
class Envelope:
    namespace: str
    name: str
    uid: str
    vm: str
    attempt: int
    dispatch_time: str
    spec: dict[str, Any]

    def to_message(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> Envelope:
        fields = {k: message[k] for k in ("namespace", "name", "uid", "vm", "attempt")}
        return cls(
            **fields,
            dispatch_time=str(message.get("dispatch_time", "")),
            spec=dict(message.get("spec") or {}),
        )

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"
