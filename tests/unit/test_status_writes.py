"""The one place RemoteCommand status is written from: status_patch (pure) and the CRD."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.status import UnknownField, status_patch
from vmfleet.api.models import RemoteCommandStatus, TargetResult, TransferResult

REPO = Path(__file__).resolve().parents[2]


def running(*vms: str) -> dict[str, Any]:
    return {"phase": "Running", "startTime": "t0", "target": "all VMs",
            "results": [{"vm": vm, "phase": "Running", "attempt": 1, "worker": "w1"} for vm in vms]}


def test_the_first_write_is_the_whole_status_as_a_merge_patch() -> None:
    desired = running("vm1", "vm2")
    assert status_patch(None, desired) == {"status": desired}


def test_nulls_are_not_written() -> None:
    desired = {**running("vm1"), "completionTime": None}
    desired["results"][0]["exitCode"] = None
    patch = status_patch(None, desired)
    assert isinstance(patch, dict)
    assert "completionTime" not in patch["status"]
    assert "exitCode" not in patch["status"]["results"][0]


def test_later_writes_replace_only_the_entries_and_fields_that_changed() -> None:
    written = running("vm1", "vm2", "vm3")
    desired = running("vm1", "vm2", "vm3")
    desired["results"][1] = {"vm": "vm2", "phase": "Succeeded", "attempt": 1, "worker": "w1",
                             "exitCode": 0, "completionTime": "t5"}
    desired["completions"] = "1/3"
    assert status_patch(written, desired) == [
        {"op": "replace", "path": "/status/results/1", "value": desired["results"][1]},
        {"op": "add", "path": "/status/completions", "value": "1/3"},
    ]


def test_nothing_changed_is_no_write() -> None:
    assert status_patch(running("vm1"), running("vm1")) is None
    assert status_patch({"phase": "Failed"}, {"phase": "Failed"}) is None


def test_a_field_that_is_gone_is_removed() -> None:
    written = {**running("vm1"), "completionTime": "t9"}
    assert status_patch(written, running("vm1")) == [
        {"op": "remove", "path": "/status/completionTime"}]


def test_a_changed_number_of_results_is_written_whole() -> None:
    desired = running("vm1", "vm2")
    assert status_patch(running("vm1"), desired) == {"status": desired}


@pytest.mark.parametrize("status, message", [
    ({"phase": "Running", "completion": "1/1"}, "status has no field completion"),
    ({"results": [{"vm": "vm1", "phase": "Running", "exit_code": 0}]},
     "status.results[vm1] has no field exit_code"),
    ({"results": [{"vm": "vm1", "transfer": {"byte": 3}}]},
     "status.results[vm1].transfer has no field byte"),
])
def test_a_misspelt_field_is_an_error_not_dropped(status: dict[str, Any], message: str) -> None:
    with pytest.raises(UnknownField, match=re.escape(message)):
        status_patch(None, status)


def test_a_value_the_model_refuses_is_an_error() -> None:
    with pytest.raises(ValueError):
        status_patch(None, {"results": [{"vm": "vm1", "phase": "Done"}]})


def _status_schema() -> dict[str, Any]:
    crd = yaml.safe_load((REPO / "crds" / "vmfleet.io_remotecommands.yaml").read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v.get("storage")]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]["properties"]["status"]
    return schema


def _aliases(model: type[Any]) -> set[str]:
    return {field.alias or name for name, field in model.model_fields.items()}


def test_every_field_the_controller_can_write_exists_in_the_crd_schema() -> None:
    """A field missing from the structural schema would be dropped by the API server
    without a word: every field status_patch lets through must be in the CRD."""
    status = _status_schema()
    assert not status.get("x-kubernetes-preserve-unknown-fields")
    assert _aliases(RemoteCommandStatus) <= set(status["properties"])
    result = status["properties"]["results"]["items"]
    assert not result.get("x-kubernetes-preserve-unknown-fields")
    missing = _aliases(TargetResult) - set(result["properties"])
    assert missing == set(), f"status.results[] fields missing from the CRD: {sorted(missing)}"
    transfer = result["properties"]["transfer"]
    missing = _aliases(TransferResult) - set(transfer["properties"])
    assert missing == set(), f"status.results[].transfer fields missing from the CRD: {sorted(missing)}"
    for name, field in RemoteCommandStatus.model_fields.items():
        sub = getattr(field.annotation, "__args__", (field.annotation,))
        for model in sub:
            inner = getattr(model, "__args__", (model,))
            for candidate in inner:
                if isinstance(candidate, type) and hasattr(candidate, "model_fields"):
                    node = status["properties"][field.alias or name]
                    node = node.get("items", node)
                    assert _aliases(candidate) <= set(node["properties"]), name


def test_what_the_workers_report_passes_the_check() -> None:
    """The fields a claim and a result carry (remote_tasks.execute) are TargetResult's."""
    from remote_tasks.execute import Outcome
    from vmfleet.api.reports import WIRE_NAMES

    names = _aliases(TargetResult)
    claimed = {"phase", "startTime", "worker", "heartbeatTime", "pgid", "processMarker"}
    assert claimed <= names
    fields = Outcome("Failed", "ExitCode", "exit code 3", 3).fields("t1")
    assert set(fields.wire()) <= names
    # Every field a report can carry is a result entry's (vmfleet.api.reports).
    assert set(WIRE_NAMES.values()) <= names
    assert {"stdout", "stderr", "stdoutBytes", "stderrBytes", "outputTruncated", "host"} <= names
