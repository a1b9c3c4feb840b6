"""The reports workers send the controller: typed, versioned, and read one way.

A worker tells the controller what happened through the reports stream
(``vmfleet.state``): an attempt was claimed, made progress or finished
(:class:`AttemptReport`), or a VM was probed (:class:`ProbeReport`). Workers build
reports only here (``to_message``) and the controller reads them only here
(:func:`read_report`). Plain dataclasses: a worker does not need pydantic for them.

Versions, so that a rolling upgrade may mix workers of two releases:

- every report carries ``version`` ``"<major>.<minor>"`` (:data:`REPORT_VERSION`); a
  report without one is of the release before versions (``"1.0"``);
- a report of the same major version is read, whatever its minor: fields this release
  does not know are ignored, fields it lacks take their defaults;
- a report of another major version is refused (:class:`UnsupportedReport`): the
  controller logs it, counts it (``vmfleet_reports_dropped_total{reason}``) and
  acknowledges it, so it is dropped rather than read again for ever.

The wire names of a result entry's fields (``completionTime``…) are spelled once, in
:class:`F`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final

REPORT_MAJOR: Final = 1
REPORT_MINOR: Final = 2  # 1.2: stdoutSha256, stderrSha256, hostKeyFingerprint
REPORT_VERSION: Final = f"{REPORT_MAJOR}.{REPORT_MINOR}"
UNVERSIONED: Final = "1.0"  # reports of the release before versions


class Event(StrEnum):
    """What a report says happened."""

    CLAIMED = "claimed"  # the attempt was claimed: it runs
    PROGRESS = "progress"  # a running attempt's progress (a transfer's bytes)
    FINISHED = "finished"  # the attempt ended (its phase says how)
    PROBE = "probe"  # a VM's health probe


class Kind(StrEnum):
    ATTEMPT = "attempt"
    PROBE = "probe"


class F:
    """Wire names of a result entry's fields (``status.results[]`` of a RemoteCommand)."""

    VM: Final = "vm"
    HOST: Final = "host"
    PHASE: Final = "phase"
    ATTEMPT: Final = "attempt"
    REASON: Final = "reason"
    MESSAGE: Final = "message"
    EXIT_CODE: Final = "exitCode"
    SIGNAL: Final = "signal"
    STDOUT: Final = "stdout"
    STDERR: Final = "stderr"
    STDOUT_BYTES: Final = "stdoutBytes"
    STDERR_BYTES: Final = "stderrBytes"
    STDOUT_SHA256: Final = "stdoutSha256"
    STDERR_SHA256: Final = "stderrSha256"
    HOST_KEY_FINGERPRINT: Final = "hostKeyFingerprint"
    OUTPUT_TRUNCATED: Final = "outputTruncated"
    DISPATCH_TIME: Final = "dispatchTime"
    START_TIME: Final = "startTime"
    COMPLETION_TIME: Final = "completionTime"
    WORKER: Final = "worker"
    PGID: Final = "pgid"
    PROCESS_MARKER: Final = "processMarker"
    HEARTBEAT_TIME: Final = "heartbeatTime"
    RETRY_AFTER: Final = "retryAfter"
    LOST_PGID: Final = "lostPgid"
    LOST_MARKER: Final = "lostMarker"
    TRANSFER: Final = "transfer"
    # A worker that is being stopped says so while its attempt still runs; ``disruptions``
    # counts the attempts that ended that way (retried without counting against the limit).
    DISRUPTION: Final = "disruption"
    DISRUPTIONS: Final = "disruptions"


class UnsupportedReport(ValueError):
    """A report this controller cannot read; ``reason`` labels the dropped-reports metric."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ResultFields:
    """What a worker reports of its result entry; None: not reported."""

    phase: str | None = None
    reason: str | None = None
    message: str | None = None
    exit_code: int | None = None
    signal: str | None = None
    start_time: str | None = None
    completion_time: str | None = None
    worker: str | None = None
    heartbeat_time: str | None = None
    pgid: int | None = None
    process_marker: str | None = None
    host: str | None = None
    stdout: str | None = None
    stderr: str | None = None
    stdout_bytes: int | None = None
    stderr_bytes: int | None = None
    output_truncated: bool | None = None
    stdout_sha256: str | None = None  # of the whole stream the worker read (1.2)
    stderr_sha256: str | None = None
    host_key_fingerprint: str | None = None  # the key the VM showed for this attempt (1.2)
    transfer: dict[str, Any] | None = None  # TransferResult's wire fields
    disruption: str | None = None  # the worker is being stopped (a progress report)

    def wire(self) -> dict[str, Any]:
        """The fields as a result entry spells them, without the unreported ones."""
        return {WIRE_NAMES[f.name]: value for f in dataclasses.fields(self)
                if (value := getattr(self, f.name)) is not None}

    @classmethod
    def from_wire(cls, body: dict[str, Any]) -> ResultFields:
        """From a report's ``fields``; names this release does not know are ignored."""
        known = {python: body[wire] for python, wire in WIRE_NAMES.items() if body.get(wire) is not None}
        return cls(**known)

    def replace(self, **changes: Any) -> ResultFields:
        return dataclasses.replace(self, **changes)


WIRE_NAMES: Final = {
    "phase": F.PHASE, "reason": F.REASON, "message": F.MESSAGE, "exit_code": F.EXIT_CODE,
    "signal": F.SIGNAL, "start_time": F.START_TIME, "completion_time": F.COMPLETION_TIME,
    "worker": F.WORKER, "heartbeat_time": F.HEARTBEAT_TIME, "pgid": F.PGID,
    "process_marker": F.PROCESS_MARKER, "host": F.HOST, "stdout": F.STDOUT, "stderr": F.STDERR,
    "stdout_bytes": F.STDOUT_BYTES, "stderr_bytes": F.STDERR_BYTES,
    "output_truncated": F.OUTPUT_TRUNCATED, "stdout_sha256": F.STDOUT_SHA256,
    "stderr_sha256": F.STDERR_SHA256, "host_key_fingerprint": F.HOST_KEY_FINGERPRINT,
    "transfer": F.TRANSFER, "disruption": F.DISRUPTION,
}


@dataclass(frozen=True)
class AttemptReport:
    """A claim, progress or outcome of one attempt on one VM (a transfer: one destination)."""

    event: Event
    namespace: str
    name: str
    uid: str
    vm: str
    attempt: int
    worker: str
    time: str
    fields: ResultFields = field(default_factory=ResultFields)
    version: str = REPORT_VERSION

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    def to_message(self) -> dict[str, Any]:
        return {"kind": Kind.ATTEMPT.value, "version": self.version, "event": self.event.value,
                "namespace": self.namespace, "name": self.name, "uid": self.uid, "vm": self.vm,
                "attempt": self.attempt, "worker": self.worker, "time": self.time,
                "fields": self.fields.wire()}

    @classmethod
    def from_message(cls, body: dict[str, Any]) -> AttemptReport:
        try:
            event = Event(body["event"])
            return cls(event=event, namespace=str(body["namespace"]), name=str(body["name"]),
                       uid=str(body["uid"]), vm=str(body["vm"]),
                       attempt=int(body.get("attempt") or 0), worker=str(body.get("worker") or ""),
                       time=str(body.get("time") or ""),
                       fields=ResultFields.from_wire(dict(body.get("fields") or {})),
                       version=str(body.get("version") or UNVERSIONED))
        except (KeyError, TypeError, ValueError) as exc:
            raise UnsupportedReport("Malformed", f"not an attempt report: {exc!r}") from exc


@dataclass(frozen=True)
class ProbeReport:
    """What a health probe saw: ``status`` holds RemoteVM status fields (``lastProbe``,
    ``facts``, ``hostKey``) in their wire form."""

    namespace: str
    vm: str
    uid: str | None
    worker: str
    time: str
    status: dict[str, Any] = field(default_factory=dict)
    version: str = REPORT_VERSION

    def to_message(self) -> dict[str, Any]:
        return {"kind": Kind.PROBE.value, "version": self.version, "event": Event.PROBE.value,
                "namespace": self.namespace, "vm": self.vm, "uid": self.uid,
                "worker": self.worker, "time": self.time, "status": self.status}

    @classmethod
    def from_message(cls, body: dict[str, Any]) -> ProbeReport:
        try:
            status = body.get("status") or {}
            if not isinstance(status, dict):
                raise TypeError("status is not an object")
            uid = body.get("uid")
            return cls(namespace=str(body["namespace"]), vm=str(body["vm"]),
                       uid=str(uid) if uid else None, worker=str(body.get("worker") or ""),
                       time=str(body.get("time") or ""), status=dict(status),
                       version=str(body.get("version") or UNVERSIONED))
        except (KeyError, TypeError, ValueError) as exc:
            raise UnsupportedReport("Malformed", f"not a probe report: {exc!r}") from exc


Report = AttemptReport | ProbeReport


def check_version(version: str) -> None:
    """Same major: read it (:mod:`the rule <vmfleet.api.reports>`); else refused."""
    major, _, minor = version.partition(".")
    if not major.isdigit() or (minor and not minor.isdigit()):
        raise UnsupportedReport("Version", f"report version {version!r} is not <major>.<minor>")
    if int(major) != REPORT_MAJOR:
        raise UnsupportedReport(
            "Version", f"report version {version} is not readable by this controller (it "
            f"reads {REPORT_MAJOR}.x): is a worker newer than the controller?")


def read_report(body: Any) -> Report:
    """The typed report in a stream entry; raises :class:`UnsupportedReport`."""
    if not isinstance(body, dict):
        raise UnsupportedReport("Malformed", "a report is not a JSON object")
    check_version(str(body.get("version") or UNVERSIONED))
    kind = body.get("kind")
    if kind == Kind.ATTEMPT:
        return AttemptReport.from_message(body)
    if kind == Kind.PROBE:
        return ProbeReport.from_message(body)
    raise UnsupportedReport("Malformed", f"unknown report kind {kind!r}")


__all__ = ["AttemptReport", "Event", "F", "Kind", "ProbeReport", "REPORT_VERSION", "Report", "WIRE_NAMES",
           "ResultFields", "UNVERSIONED", "UnsupportedReport", "check_version", "read_report"]
