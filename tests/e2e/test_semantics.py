"""RemoteCommand semantics with faults: fan-out limits, timeouts that kill, retries,
cancellation, lost workers — checked on the VMs themselves, not from our bookkeeping."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.e2e.fleet import Namespace, assert_no_tracebacks, max_overlap, remote_processes
from vmfleet.dev.proc import wait_until

pytestmark = pytest.mark.e2e


def entry(ns: Namespace, name: str, vm: str | None = None) -> dict:
    results = (ns.get("rcmd", name).get("status") or {}).get("results") or []
    return next((r for r in results if vm is None or r["vm"] == vm), {})


def test_fan_out_respects_max_parallel_on_the_vms(ns: Namespace, make_vm, shared_dir):
    fleet = [make_vm(f"fan{i}") for i in range(10)]
    ns.add_vms(fleet, labels={"role": "fan"})
    log = shared_dir / "intervals"
    ns.run("fan", selector={"matchLabels": {"role": "fan"}}, maxParallel=3,
           # Long enough that three overlap even when dispatches lag on a loaded machine.
           script=f"s=$(date +%s%N); sleep 3; echo \"$(hostname) $s $(date +%s%N)\" >> {log}\n")
    obj = ns.finished("fan", timeout=180)
    status = obj["status"]
    assert status["phase"] == "Succeeded", status
    assert status["completions"] == "10/10"
    lines = [line.split() for line in log.read_text().splitlines()]
    assert sorted(host for host, *_ in lines) == sorted(vm.name for vm in fleet)
    peak = max_overlap([(int(start), int(end)) for _, start, end in lines])
    assert peak == 3, f"{peak} ran at once"


def test_max_failures_stops_starting_new_vms(ns: Namespace, make_vm):
    fleet = [make_vm(f"mf{i}") for i in range(4)]
    ns.add_vms(fleet, labels={"role": "mf"})
    ns.run("mf", selector={"matchLabels": {"role": "mf"}}, maxParallel=1, maxFailures=1,
           command="exit 7")
    obj = ns.finished("mf", timeout=120)
    results = {r["vm"]: r for r in obj["status"]["results"]}
    assert obj["status"]["phase"] == "Failed"
    assert [r["reason"] for r in results.values()].count("ExitCode") == 1
    cancelled = [r for r in results.values() if r["phase"] == "Cancelled"]
    assert len(cancelled) == 3
    assert all(r["reason"] == "MaxFailuresReached" for r in cancelled)


@pytest.mark.parametrize(
    ("kind", "action"),
    [
        ("sleep", {"argv": ["sleep", "600"]}),
        ("stubborn", {"script": "trap '' TERM\n(trap '' TERM; sleep 601) &\nsleep 602\n"}),
    ],
)
def test_timeout_terminates_the_remote_process_group(ns: Namespace, make_vm, kind, action):
    vm = make_vm(f"to-{kind}")
    ns.add_vms([vm])
    ns.run("slow", vm=vm.name, timeoutSeconds=2, **action)
    obj = ns.finished("slow", timeout=60)
    result = obj["status"]["results"][0]
    assert (obj["status"]["phase"], result["reason"]) == ("Failed", "Timeout")
    assert "timed out after 2s" in result["message"]
    assert "pgid" not in result
    elapsed = (_t(result["completionTime"]) - _t(result["startTime"]))
    assert 2 <= elapsed < 10
    assert remote_processes(vm, "sleep 60") == []


def _t(stamp: str) -> float:
    from vmfleet.api.times import parse_rfc3339

    return parse_rfc3339(stamp).timestamp()


def test_active_deadline_ends_the_command(ns: Namespace, make_vm):
    vm = make_vm("deadline")
    ns.add_vms([vm])
    ns.run("late", vm=vm.name, activeDeadlineSeconds=2, argv=["sleep", "603"])
    obj = ns.finished("late", timeout=60)
    assert obj["status"]["results"][0]["reason"] == "DeadlineExceeded"
    assert remote_processes(vm, "sleep 603") == []


def test_transport_errors_are_retried_until_the_vm_is_back(ns: Namespace, make_vm):
    vm = make_vm("flaky")
    ns.add_vms([vm])
    vm.stop()
    runs = "/tmp/vmfleet-runs"
    ns.run("retry", vm=vm.name, retries={"limit": 10, "backoffSeconds": 1},
           command=f"echo ran >> {runs}")
    wait_until(lambda: entry(ns, "retry").get("attempt", 1) >= 2, timeout=60,
               what="a second attempt after the refused connection")
    first = entry(ns, "retry")
    assert first["reason"] == "TransportError"
    assert "attempt 1 failed (TransportError)" in first["message"]
    vm.start()
    obj = ns.finished("retry", timeout=90)
    result = obj["status"]["results"][0]
    assert obj["status"]["phase"] == "Succeeded"
    assert result["attempt"] >= 2
    assert (result["reason"], result["exitCode"]) == ("Completed", 0)
    assert "message" not in result
    assert vm.host_path(runs).read_text() == "ran\n"


def test_a_vm_restarted_under_a_running_command_is_a_transport_error_and_retried(
    ns: Namespace, make_vm
):
    """sshd stopped under the command: its session ends without an exit status. That is
    the connection breaking (retried), not a command that failed (it was: Failed/ExitCode
    with no exit code, found by the soak)."""
    vm = make_vm("restarted")
    ns.add_vms([vm])
    runs = "/tmp/vmfleet-restarted-runs"
    ns.run("interrupted", vm=vm.name, retries={"limit": 3, "backoffSeconds": 1},
           command=f"echo started >> {runs}; sleep 4; echo finished >> {runs}")
    wait_until(lambda: vm.host_path(runs).exists(), timeout=60, what="the command to start")
    vm.restart()
    obj = ns.finished("interrupted", timeout=90)
    result = obj["status"]["results"][0]
    assert (obj["status"]["phase"], result["reason"], result["exitCode"]) == (
        "Succeeded", "Completed", 0)
    assert result["attempt"] == 2
    assert vm.host_path(runs).read_text() == "started\nstarted\nfinished\n"


def test_exit_codes_listed_in_on_exit_codes_are_retried(ns: Namespace, make_vm):
    vm = make_vm("exitretry")
    ns.add_vms([vm])
    count = "/tmp/vmfleet-count"
    ns.run("again", vm=vm.name, retries={"limit": 2, "backoffSeconds": 0, "onExitCodes": [9]},
           command=f"echo x >> {count}; [ $(wc -l < {count}) -ge 3 ] || exit 9")
    obj = ns.finished("again", timeout=60)
    result = obj["status"]["results"][0]
    assert (obj["status"]["phase"], result["attempt"], result["exitCode"]) == ("Succeeded", 3, 0)
    assert vm.host_path(count).read_text() == "x\nx\nx\n"


def test_deleting_a_running_command_cancels_it_and_ends_the_remote_process(ns: Namespace, make_vm):
    """No finalizer: the object goes at once; the cancel reaches the worker through Redis
    and the remote process is killed within a few seconds (``make bench`` cancel_latency
    measures how few)."""
    vm = make_vm("cancel")
    ns.add_vms([vm])
    ns.run("victim", vm=vm.name, argv=["sleep", "604"])
    wait_until(lambda: entry(ns, "victim").get("pgid"), timeout=60, what="the command to run")
    assert remote_processes(vm, "sleep 604")
    assert not ns.get("rcmd", "victim")["metadata"].get("finalizers")
    began = time.monotonic()
    ns.k("delete", "rcmd", "victim", "--wait=true", "--timeout=10s", timeout=30)
    assert time.monotonic() - began < 10
    wait_until(lambda: remote_processes(vm, "sleep 604") == [], timeout=10,
               what="the remote process to be killed")


def _running_on(vm, needle: str) -> bool:
    """A process of the VM (read from the host's /proc, no SSH round trip) runs ``needle``."""
    return needle in vm.commands().values()


def test_deleting_a_running_command_with_every_slot_busy_kills_it_within_a_second(
    ns: Namespace, make_vm,
):
    """The cancel does not wait for a free slot or a heartbeat: with the VM's 4 slots
    all running, the deleted command's process is gone within 1 s of the DELETE, and the
    other three keep running."""
    vm = make_vm("busy")
    ns.add_vms([vm], maxConcurrentCommands=4)
    holders = [f"sleep 62{j}" for j in range(3)]
    for j, needle in enumerate(holders):
        ns.run(f"hold-{j}", vm=vm.name, argv=needle.split())
    ns.run("victim", vm=vm.name, argv=["sleep", "629"])
    wait_until(lambda: all(_running_on(vm, n) for n in [*holders, "sleep 629"]), timeout=60,
               what="four commands to hold the four slots")
    ns.k("delete", "rcmd", "victim", "--wait=false")
    deleted = time.monotonic()  # the API answered: the object is gone (no finalizer)
    wait_until(lambda: not _running_on(vm, "sleep 629"), timeout=10, interval=0.01,
               what="the cancelled command's process to end")
    killed_in = time.monotonic() - deleted
    assert killed_in < 1.0, f"the remote process outlived the DELETE by {killed_in:.2f} s"
    assert all(_running_on(vm, n) for n in holders)
    ns.k("delete", "rcmd", "hold-0", "hold-1", "hold-2", "--wait=true", "--timeout=30s", timeout=60)
    wait_until(lambda: not any(_running_on(vm, n) for n in holders), timeout=10,
               what="the holders to end")


def test_deleting_a_queued_command_never_runs_it(ns: Namespace, make_vm):
    vm = make_vm("paused")
    ns.add_vms([vm], paused=True)
    runs = "/tmp/vmfleet-never"
    ns.run("queued", vm=vm.name, command=f"touch {runs}")
    wait_until(lambda: entry(ns, "queued").get("phase") == "Pending", timeout=30,
               what="the command to wait for the paused VM")
    ns.k("delete", "rcmd", "queued", "--timeout=60s", timeout=90)
    ns.kubectl.apply({"apiVersion": "vmfleet.io/v1alpha1", "kind": "RemoteVM",
                      "metadata": {"name": vm.name, "namespace": str(ns)},
                      "spec": {**ns.get("rvm", vm.name)["spec"], "paused": False}})
    ns.run("after", vm=vm.name, command="true")
    ns.wait("remotecommand/after", "Complete")
    assert not vm.host_path(runs).exists()


def test_ttl_deletes_a_finished_command(ns: Namespace, vms):
    ns.add_vms(vms[:1])
    ns.run("short-lived", vm="vm1", command="true", ttlSecondsAfterFinished=1)
    wait_until(lambda: ns.k("get", "rcmd", "short-lived", check=False).returncode != 0,
               timeout=60, what="the TTL to delete the command")


def test_env_working_dir_and_stdin(ns: Namespace, vms):
    ns.add_vms(vms[:1])
    ns.run("env", vm="vm1", workingDir="/etc", stdin="from stdin\n",
           env={"GREETING": "it's $(not run) `here`"},
           command='pwd; printf "%s\\n" "$GREETING"; cat')
    ns.wait("remotecommand/env", "Complete")
    assert entry(ns, "env")["stdout"] == "/etc\nit's $(not run) `here`\nfrom stdin\n"


def _worker_pid(controller_dir: Path, ns: Namespace, vm: str) -> int:
    pgid_file = controller_dir / "workers" / f"{ns}.{vm}.0.pgid"
    return int(pgid_file.read_text().split()[0])


@pytest.mark.parametrize("limit", [0, 1])
def test_killed_worker_ends_worker_lost_or_retries(ns: Namespace, make_vm, controller_dir, limit):
    vm = make_vm(f"lost{limit}")
    ns.add_vms([vm])
    starts = "/tmp/vmfleet-starts"
    # The first attempt hangs; a later one finishes at once.
    ns.run("lost", vm=vm.name, retries={"limit": limit, "backoffSeconds": 0},
           script=f"echo start >> {starts}\n[ $(wc -l < {starts}) -gt 1 ] || sleep 605\n")
    wait_until(lambda: entry(ns, "lost").get("pgid"), timeout=60, what="the first attempt")
    first_pgid = entry(ns, "lost")["pgid"]
    os.kill(_worker_pid(controller_dir, ns, vm.name), signal.SIGKILL)
    obj = ns.finished("lost", timeout=120)
    result = obj["status"]["results"][0]
    wait_until(lambda: remote_processes(vm, "sleep 605") == [], timeout=30,
               what=f"process group {first_pgid} of the lost attempt to be terminated")
    attempts = vm.host_path(starts).read_text().count("start")
    if limit == 0:
        assert (obj["status"]["phase"], result["reason"]) == ("Failed", "WorkerLost")
        assert f"process group {first_pgid} is terminated" in result["message"]
        assert attempts == 1
    else:
        assert obj["status"]["phase"] == "Succeeded"
        assert result["attempt"] == 2
        assert attempts == 2


def test_no_tracebacks_in_controller_or_workers(controller_dir):
    assert_no_tracebacks(controller_dir / "workers", controller_dir / "controller.log")

