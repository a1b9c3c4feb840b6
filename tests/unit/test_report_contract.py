"""vmfleet.api.reports: the typed report contract workers build and the controller reads,
and its version rule (a rolling upgrade mixes two releases)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from prometheus_client import REGISTRY

from controller.isolate import Recorder
from controller.loop import ReportReader
from vmfleet.api.reports import (
    REPORT_VERSION,
    AttemptReport,
    Event,
    ProbeReport,
    ResultFields,
    UnsupportedReport,
    read_report,
)

CLAIM = AttemptReport(Event.CLAIMED, "ns", "c", "u1", "vm1", 2, "w1", "t1",
                      ResultFields(phase="Running", start_time="t1", pgid=42, process_marker="m"))
DONE = AttemptReport(Event.FINISHED, "ns", "c", "u1", "vm1", 2, "w1", "t2",
                     ResultFields(phase="Failed", reason="ExitCode", exit_code=3,
                                  completion_time="t2", stdout="", output_truncated=False,
                                  transfer={"bytes": 10, "sha256": "ab"}))
PROBE = ProbeReport("ns", "vm1", "uid-vm1", "w1", "t3", {"lastProbe": {"succeeded": True}})


@pytest.mark.parametrize("report", [CLAIM, DONE, PROBE])
def test_a_report_round_trips(report: Any) -> None:
    message = report.to_message()
    assert message["version"] == REPORT_VERSION
    assert read_report(message) == report


def test_the_wire_spells_result_fields_as_the_crd_does_without_nulls() -> None:
    fields = DONE.to_message()["fields"]
    assert fields == {"phase": "Failed", "reason": "ExitCode", "exitCode": 3,
                      "completionTime": "t2", "stdout": "", "outputTruncated": False,
                      "transfer": {"bytes": 10, "sha256": "ab"}}
    assert CLAIM.to_message()["fields"]["processMarker"] == "m"


def _with(message: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {**message, **changes}


@pytest.mark.parametrize("message, expected", [
    # The release before versions wrote no version: read as 1.0.
    ({k: v for k, v in CLAIM.to_message().items() if k != "version"}, CLAIM),
    # An older or newer minor of the same major: read; unknown fields ignored.
    (_with(CLAIM.to_message(), version="1.0"), CLAIM),
    (_with(CLAIM.to_message(), version="1.7", shiny="new", fields={
        **CLAIM.to_message()["fields"], "newField": 1}), CLAIM),
    (_with(PROBE.to_message(), version="1.9", extra=[1]), PROBE),
])
def test_the_same_major_version_is_read_and_unknown_fields_are_ignored(
        message: dict[str, Any], expected: Any) -> None:
    report = read_report(message)
    assert type(report) is type(expected)
    assert report.to_message() | {"version": REPORT_VERSION} == expected.to_message()


@pytest.mark.parametrize("message, reason", [
    (_with(CLAIM.to_message(), version="2.0"), "Version"),
    (_with(CLAIM.to_message(), version="0.9"), "Version"),
    (_with(CLAIM.to_message(), version="one"), "Version"),
    (_with(CLAIM.to_message(), kind="gossip"), "Malformed"),
    (_with(CLAIM.to_message(), event="exploded"), "Malformed"),
    ({"kind": "attempt", "event": "claimed"}, "Malformed"),
    (["not", "an", "object"], "Malformed"),
    (_with(PROBE.to_message(), status="up"), "Malformed"),
])
def test_another_major_version_or_a_malformed_report_is_refused(message: Any, reason: str) -> None:
    with pytest.raises(UnsupportedReport) as refused:
        read_report(message)
    assert refused.value.reason == reason


class _State:
    def __init__(self) -> None:
        self.acked: list[str] = []

    def ack(self, ids: list[str]) -> None:
        self.acked.extend(ids)


class _Commands:
    def __init__(self) -> None:
        self.applied: list[AttemptReport] = []
        self.recorder = Recorder()

    def apply(self, report: AttemptReport, report_id: str) -> bool:
        self.applied.append(report)
        return True  # acknowledged with its write


def test_the_reader_drops_acks_and_counts_a_newer_major_and_applies_the_rest() -> None:
    state, commands = _State(), _Commands()
    reader = ReportReader(state, commands, "c1", lambda probe: True)  # type: ignore[arg-type]
    before = REGISTRY.get_sample_value("vmfleet_reports_dropped_total", {"reason": "Version"}) or 0
    reader.apply("1-0", _with(DONE.to_message(), version="2.0"))
    reader.apply("2-0", _with(DONE.to_message(), version="1.0"))
    assert state.acked == ["1-0"]  # dropped, not read again for ever
    assert commands.applied == [dataclasses.replace(DONE, version="1.0")]  # typed, never a dict
    assert REGISTRY.get_sample_value("vmfleet_reports_dropped_total",
                                     {"reason": "Version"}) == before + 1
    reader.probes.shutdown()
