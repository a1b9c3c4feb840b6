"""vmfleet rerun: which VMs run again, and the RemoteCommand that does it."""

from __future__ import annotations

import argparse
import io
from typing import Any

import pytest

from vmfleet import rerun
from vmfleet.api.models import RemoteCommandSpec
from vmfleet.cli import build_parser


def original(phase: str = "Failed", results: list[dict[str, Any]] | None = None,
             **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "patch", "namespace": "ops", "uid": "u-1"},
        "spec": {"selector": {"matchLabels": {"role": "web"}}, "command": "apt-get -y upgrade",
                 "maxParallel": "30%", **spec},
        "status": {"phase": phase, "results": results if results is not None else [
            {"vm": "vm1", "phase": "Succeeded"},
            {"vm": "vm2", "phase": "Failed", "reason": "ExitCode"},
            {"vm": "vm3", "phase": "Cancelled", "reason": "MaxFailuresReached"},
            {"vm": "vm4", "phase": "Failed", "reason": "VMNotFound"},
            {"vm": "vm5", "phase": "Succeeded"},
        ]},
    }


def test_failed_picks_every_vm_that_did_not_succeed():
    assert rerun.rerun_vms(original(), failed=True) == ["vm2", "vm3", "vm4"]


def test_failed_and_vm_intersect():
    assert rerun.rerun_vms(original(), failed=True, vms=["vm3", "vm1"]) == ["vm3"]


def test_vm_alone_reruns_exactly_those():
    assert rerun.rerun_vms(original(), failed=False, vms=["vm5", "vm1", "vm5"]) == ["vm5", "vm1"]


@pytest.mark.parametrize(
    ("obj", "kwargs", "message"),
    [
        (original(phase="Running"), {"failed": True}, "has not finished"),
        (original(phase="DryRun", results=[]), {"failed": True}, "is a dry run"),
        (original(), {"failed": True, "vms": ["vm9"]}, "vm9 is not a target"),
        (original(), {"failed": False}, "--failed, --vm VM, or both"),
    ],
)
def test_refusals(obj, kwargs, message):
    with pytest.raises(rerun.RerunError, match=message):
        rerun.rerun_vms(obj, **kwargs)


def test_no_results_is_refused_with_a_reason():
    obj = original()
    del obj["status"]["results"]
    with pytest.raises(rerun.RerunError, match="has no results"):
        rerun.rerun_vms(obj, failed=True)


def test_the_rerun_body_keeps_the_spec_and_targets_the_vms():
    body = rerun.rerun_body(original(dryRun=True), ["vm2", "vm3"])
    assert body["spec"] == {"command": "apt-get -y upgrade", "maxParallel": "30%",
                            "vms": ["vm2", "vm3"]}
    RemoteCommandSpec.model_validate(body["spec"])
    meta = body["metadata"]
    assert meta["generateName"] == "patch-rerun-"
    assert meta["labels"] == {"vmfleet.io/rerun-of": "patch"}
    assert meta["annotations"] == {"vmfleet.io/rerun-of": "patch", "vmfleet.io/rerun-of-uid": "u-1"}


class FakeKube:
    def __init__(self, obj: dict[str, Any] | None) -> None:
        self.obj = obj
        self.created: list[dict[str, Any]] = []

    def get_command(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.obj

    def create_command(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        self.created.append(body)
        return {"metadata": {"name": "patch-rerun-x7k2p"}}


def cli(kube: FakeKube, *argv: str) -> tuple[int, str, str]:
    args = build_parser().parse_args(["rerun", *argv])
    out, err = io.StringIO(), io.StringIO()
    code = rerun.run(args, kube, "ops", out, err)
    return code, out.getvalue(), err.getvalue()


def test_cli_creates_the_rerun():
    kube = FakeKube(original())
    code, out, err = cli(kube, "patch", "--failed")
    assert (code, err) == (0, "")
    assert out == "Created RemoteCommand ops/patch-rerun-x7k2p on 3 VMs: vm2, vm3, vm4\n"
    assert kube.created[0]["spec"]["vms"] == ["vm2", "vm3", "vm4"]


def test_cli_nothing_to_do_when_all_succeeded():
    kube = FakeKube(original(phase="Succeeded", results=[{"vm": "vm1", "phase": "Succeeded"}]))
    code, out, _ = cli(kube, "patch", "--failed")
    assert code == 0 and kube.created == []
    assert "nothing to run again" in out


def test_cli_missing_and_refused():
    assert cli(FakeKube(None), "patch", "--failed")[0] == 1
    code, _, err = cli(FakeKube(original()), "patch")
    assert code == 1 and "--failed, --vm VM, or both" in err
    assert isinstance(build_parser().parse_args(["rerun", "x", "--vm", "a", "--vm", "b"]),
                      argparse.Namespace)
