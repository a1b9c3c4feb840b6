"""The output API's wire form: what ``vmfleet logs``, ``vmfleet exec`` and the Airflow
trigger read, and what the controller's aggregated API serves.

A RemoteCommand's output is served by an aggregated API in a group of its own
(``logs.vmfleet.io``, as metrics-server serves ``metrics.k8s.io``) at::

    GET /apis/logs.vmfleet.io/v1alpha1/namespaces/{namespace}/remotecommands/{name}/log
        ?vm=VM&attempt=N&follow=true&sinceSeconds=S&tailLines=N&after=CURSOR

The API server authenticates the caller and authorises ``get`` on
``remotecommands/log`` in ``logs.vmfleet.io``; the controller then checks ``get`` on the
RemoteCommand itself (``vmfleet.io``) with a SubjectAccessReview before it answers.

The body is newline-delimited JSON (``application/x-ndjson``), one :class:`LogRecord`
per line, in order per (vm, attempt); with ``follow`` the response ends once every
attempt of the command has ended and its output is drained. ``cursor`` is opaque: pass
the last one seen as ``after`` to resume after it (a reader that restarts loses no line).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Final, Literal

GROUP: Final = "logs.vmfleet.io"
VERSION: Final = "v1alpha1"
RESOURCE: Final = "remotecommands"
SUBRESOURCE: Final = "log"
CONTENT_TYPE: Final = "application/x-ndjson"

Stream = Literal["stdout", "stderr"]


def log_path(namespace: str, name: str) -> str:
    """The API server path of one RemoteCommand's output."""
    return f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{RESOURCE}/{name}/{SUBRESOURCE}"


@dataclass(frozen=True)
class LogRecord:
    """Output of one VM's attempt as the worker read it: a line, or a partial line.

    ``data`` ends with ``"\\n"`` when the line is complete; a partial line (the VM printed
    no newline yet) has none, and its rest comes in a later record. ``seq`` counts the
    records of one (vm, attempt), both streams together, from 1. ``time`` is when the
    worker read it (RFC 3339, UTC, microseconds).
    """

    vm: str
    attempt: int
    stream: Stream
    seq: int
    time: str
    data: str
    cursor: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str | bytes) -> LogRecord:
        raw: dict[str, Any] = json.loads(line)
        return cls(vm=str(raw["vm"]), attempt=int(raw["attempt"]), stream=_stream(raw["stream"]),
                   seq=int(raw["seq"]), time=str(raw["time"]), data=str(raw["data"]),
                   cursor=str(raw["cursor"]))


def _stream(value: object) -> Stream:
    if value == "stdout":
        return "stdout"
    if value == "stderr":
        return "stderr"
    raise ValueError(f"unknown output stream {value!r}")
