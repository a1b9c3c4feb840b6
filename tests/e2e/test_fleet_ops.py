"""Fleet operations end to end: percentages, the ``vms`` target, dry runs, re-runs of what
failed, templates, schedules and waves — checked on the VMs themselves."""

from __future__ import annotations

import uuid

import pytest

from tests.e2e.fleet import REPO, Namespace, assert_no_tracebacks

pytestmark = pytest.mark.e2e


@pytest.fixture
def shared_dir():
    """A directory every VM sees at the same path (outside the VMs' private /tmp)."""
    path = REPO / ".vmfleet" / "e2e-shared" / uuid.uuid4().hex[:8]
    path.mkdir(parents=True)
    path.chmod(0o777)
    return path


def max_overlap(intervals: list[tuple[int, int]]) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    return peak


def test_percentages_of_ten_vms(ns: Namespace, make_vm, shared_dir, controller_dir):
    fleet = [make_vm(f"pct{i}") for i in range(10)]
    ns.add_vms(fleet, labels={"role": "pct"})
    log = shared_dir / "intervals"
    ns.run("thirty", selector={"matchLabels": {"role": "pct"}}, maxParallel="30%",
           script=f"s=$(date +%s%N); sleep 3; echo \"$(hostname) $s $(date +%s%N)\" >> {log}\n")
    # 10% of 10 = 1 at a time, so the failures come one by one: it stops at 20% = 2.
    ns.run("twenty", selector={"matchLabels": {"role": "pct"}}, maxParallel="10%",
           maxFailures="20%", command="exit 7")

    obj = ns.finished("thirty", timeout=180)
    assert (obj["status"]["phase"], obj["status"]["completions"]) == ("Succeeded", "10/10")
    lines = [line.split() for line in log.read_text().splitlines()]
    assert sorted(host for host, *_ in lines) == sorted(vm.name for vm in fleet)
    peak = max_overlap([(int(start), int(end)) for _, start, end in lines])
    assert peak == 3, f"{peak} ran at once"

    obj = ns.finished("twenty", timeout=120)
    results = obj["status"]["results"]
    assert obj["status"]["phase"] == "Failed"
    assert [r["reason"] for r in results].count("ExitCode") == 2
    cancelled = [r for r in results if r["phase"] == "Cancelled"]
    assert len(cancelled) == 8
    assert {r["message"] for r in cancelled} == {
        "not started: 2 VMs failed (maxFailures 20% of 10 = 2)"}
    assert_no_tracebacks(controller_dir / "controller.log")


def test_vms_target_runs_on_exactly_the_named_vms(ns: Namespace, vms):
    ns.add_vms(vms)
    ns.run("two", vms=["vm1", "vm3", "nosuchvm"], command="hostname")
    obj = ns.finished("two", timeout=90)
    results = {r["vm"]: r for r in obj["status"]["results"]}
    assert set(results) == {"vm1", "vm3", "nosuchvm"}
    assert results["vm1"]["phase"] == results["vm3"]["phase"] == "Succeeded"
    assert results["nosuchvm"]["reason"] == "VMNotFound"
    assert obj["status"]["target"] == "vm1,vm3,nosuchvm"
    refused = ns.k("apply", "-f", "-", check=False, input=__import__("yaml").safe_dump(
        ns.command("both", vm="vm1", vms=["vm2"], command="true")))
    assert refused.returncode != 0
    assert "exactly one target must be set: vm, vms or selector" in refused.stderr
