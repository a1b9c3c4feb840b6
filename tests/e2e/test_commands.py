"""The walking skeleton end to end: kubectl apply a RemoteCommand, read its result in status.

Real kube-apiserver + etcd, real OpenSSH sshd VMs, real Redis (and RabbitMQ), the real
controller with the Process runtime, and real kubectl.
"""

from __future__ import annotations

import pytest

from tests.e2e.fleet import Namespace, assert_no_tracebacks, controller_argv
from vmfleet.api.times import parse_rfc3339
from vmfleet.dev.proc import wait_until

pytestmark = pytest.mark.e2e


def result_of(obj: dict) -> dict:
    (result,) = obj["status"]["results"]
    return result


def test_a_command_per_vm_completes_with_real_output(ns: Namespace, vms, controller_dir):
    ns.add_vms(vms)
    ns.run("hostname-vm1", vm="vm1", command="hostname && echo to-stderr >&2")
    ns.run("argv-vm2", vm="vm2", argv=["uname", "-s"])
    ns.run("script-vm3", vm="vm3", script="set -e\nx=$((6*7))\necho \"answer $x\"\n")
    for name in ("hostname-vm1", "argv-vm2", "script-vm3"):
        ns.wait(f"remotecommand/{name}", "Complete")

    expected_hostname = vms[0].run("hostname")[1].decode()
    obj = ns.get("rcmd", "hostname-vm1")
    status = obj["status"]
    result = result_of(obj)
    assert status["phase"] == "Succeeded"
    assert status["completions"] == "1/1"
    assert status["target"] == "vm1"
    assert status["summary"] == {"targets": 1, "pending": 0, "running": 0, "succeeded": 1,
                                 "failed": 0, "cancelled": 0}
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "Complete": "True", "Finished": "True"}
    assert result["exitCode"] == 0
    assert result["reason"] == "Completed"
    assert result["stdout"] == expected_hostname
    assert result["stderr"] == "to-stderr\n"
    assert result["stdoutBytes"] == len(expected_hostname.encode())
    assert result["outputTruncated"] is False
    assert result["host"] == vms[0].host
    assert result["worker"] == f"local/vmfleet-worker-vm1-0.{ns}"  # the Process runtime's "pod"
    times = [parse_rfc3339(result[k]) for k in ("dispatchTime", "startTime", "completionTime")]
    assert times == sorted(times)

    assert result_of(ns.get("rcmd", "argv-vm2"))["stdout"] == "Linux\n"
    assert result_of(ns.get("rcmd", "script-vm3"))["stdout"] == "answer 42\n"

    # The full output is in the worker's log, one prefixed line per output line.
    worker_log = (controller_dir / "workers" / f"{ns}.vm1.0.log").read_text()
    assert f"[{ns}/hostname-vm1 vm1 stdout] {expected_hostname.strip()}" in worker_log
    assert f"[{ns}/hostname-vm1 vm1 stderr] to-stderr" in worker_log
    assert_no_tracebacks(controller_dir / "workers", controller_dir / "controller.log")


def test_printer_columns(ns: Namespace, vms):
    ns.add_vms(vms[:1])
    ns.run("cols", vm="vm1", command="true")
    ns.wait("remotecommand/cols", "Complete")
    table = ns.k("get", "rcmd", "cols").stdout.split("\n")
    assert table[0].split() == ["NAME", "TARGET", "PHASE", "COMPLETIONS", "AGE"]
    assert table[1].split()[:4] == ["cols", "vm1", "Succeeded", "1/1"]


def test_exit_code_3_fails_and_finishes(ns: Namespace, vms):
    ns.add_vms(vms[:1])
    ns.run("exit3", vm="vm1", command="echo before; exit 3")
    obj = ns.finished("exit3")
    result = result_of(obj)
    assert obj["status"]["phase"] == "Failed"
    assert (result["phase"], result["exitCode"], result["reason"]) == ("Failed", 3, "ExitCode")
    assert result["stdout"] == "before\n"
    conditions = {c["type"]: c for c in obj["status"]["conditions"]}
    assert conditions["Failed"]["status"] == "True"
    assert conditions["Failed"]["reason"] == "ExitCode"
    assert "vm1: exit code 3" in conditions["Failed"]["message"]
    assert "Complete" not in conditions


def test_success_exit_codes(ns: Namespace, vms):
    ns.add_vms(vms[:1])
    ns.run("grep-none", vm="vm1", command="exit 1", successExitCodes=[0, 1])
    ns.wait("remotecommand/grep-none", "Complete")
    assert result_of(ns.get("rcmd", "grep-none"))["exitCode"] == 1


def test_non_utf8_and_large_output_are_kept_as_bytes(ns: Namespace, vms):
    ns.add_vms(vms[:1])
    # 100000 bytes of stdout ending in invalid UTF-8, 3 bytes of stderr.
    ns.run("bytes", vm="vm1", output={"maxBytes": 1024},
           script="head -c 99996 /dev/zero | tr '\\0' a\nprintf 'z\\377\\376\\n'\n"
                  "printf '\\377x\\n' >&2\n")
    obj = ns.finished("bytes")
    result = result_of(obj)
    assert obj["status"]["phase"] == "Succeeded"
    assert result["stdoutBytes"] == 100000
    assert result["stderrBytes"] == 3
    assert result["outputTruncated"] is True
    assert result["stdout"] == "a" * 1020 + "z\ufffd\ufffd\n"
    assert result["stderr"] == "\ufffdx\n"


def test_a_vm_that_never_stops_printing_is_cut_at_the_timeout_with_a_bounded_tail(
        ns: Namespace, vms):
    """A malicious or broken VM's endless output: the status keeps a tail of maxBytes (the
    count is exact), the attempt ends Timeout and the printing process is killed."""
    vm1 = vms[0]
    ns.add_vms(vms[:1])
    marker = f"flood-{ns}"
    ns.run("flood", vm="vm1", timeoutSeconds=3, output={"maxBytes": 4096},
           command=f"while :; do head -c 32768 /dev/zero | tr '\\0' x; echo {marker}; "
                   "sleep 0.01; done")
    obj = ns.finished("flood", timeout=120)
    result = result_of(obj)
    assert (obj["status"]["phase"], result["reason"]) == ("Failed", "Timeout"), result
    assert result["outputTruncated"] is True
    assert len(result["stdout"].encode()) <= 4096 and marker in result["stdout"]
    assert result["stdoutBytes"] > 64 * 4096  # it did print far more than it kept
    wait_until(lambda: vm1.run(f"pgrep -f '[e]cho {marker}' >/dev/null")[0] != 0, timeout=30,
               what="the printing loop to be killed on the VM")


def test_unknown_vm_fails_with_reason(ns: Namespace, vms):
    ns.run("ghost", vm="no-such-vm", command="true")
    obj = ns.finished("ghost")
    assert result_of(obj)["reason"] == "VMNotFound"
    assert obj["status"]["phase"] == "Failed"


def test_host_key_mismatch_refuses_and_runs_nothing(ns: Namespace, make_vm):
    vm = make_vm("rekeyed")
    ns.add_vms([vm])
    vm.regenerate_host_key()
    vm.restart()
    marker = "/tmp/vmfleet-must-not-exist"
    ns.run("mitm", vm="rekeyed", command=f"touch {marker}")
    obj = ns.finished("mitm")
    result = result_of(obj)
    assert obj["status"]["phase"] == "Failed"
    assert result["reason"] == "HostKeyMismatch"
    assert "does not match the pinned keys" in result["message"]
    assert "exitCode" not in result
    assert not vm.host_path(marker).exists()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"vm": "vm1", "selector": {"matchLabels": {"a": "b"}}, "command": "true"},
         "exactly one target must be set: vm, vms or selector"),
        ({"vm": "vm1"}, "exactly one action must be set: command, argv, script, transfer or "
                        "templateRef"),
        ({"vm": "vm1", "command": "a", "argv": ["b"]}, "exactly one action must be set"),
        ({"vm": "vm1", "command": "true", "env": {"BAD-NAME": "x"}}, "env names must be"),
        ({"vm": "vm1", "argv": []}, "spec.argv: Invalid value: 0"),
    ],
)
def test_invalid_manifests_are_refused(ns: Namespace, spec, message):
    proc = ns.kubectl.apply(ns.command("bad", **spec), check=False)
    assert proc.returncode != 0
    assert message in proc.stderr


def test_spec_is_immutable(ns: Namespace, vms):
    ns.run("fixed", vm="vm1", command="true")
    proc = ns.kubectl.apply(ns.command("fixed", vm="vm1", command="rm -rf /tmp/x"), check=False)
    assert proc.returncode != 0
    assert "spec is immutable once created" in proc.stderr


def test_vm_without_pinned_keys_is_refused(ns: Namespace):
    vm = {"apiVersion": "vmfleet.io/v1alpha1", "kind": "RemoteVM",
          "metadata": {"name": "open", "namespace": str(ns)},
          "spec": {"host": "127.0.0.1", "user": "root", "credentialsSecretRef": {"name": "s"}}}
    proc = ns.kubectl.apply(vm, check=False)
    assert proc.returncode != 0
    assert "hostKeyPolicy Pinned needs hostKeys" in proc.stderr


def test_workers_of_a_deleted_vm_stop(ns: Namespace, make_vm, controller_dir):
    vm = make_vm("shortlived")
    ns.add_vms([vm])
    ns.run("touch", vm="shortlived", command="true")
    ns.wait("remotecommand/touch", "Complete")
    status = ns.get("rvm", "shortlived")["status"]["workers"]
    assert {k: status[k] for k in ("runtime", "queue", "replicas", "readyReplicas")} == {
        "runtime": "Process", "queue": f"vmfleet.{ns}.shortlived", "replicas": 1, "readyReplicas": 1}
    log = controller_dir / "workers" / f"{ns}.shortlived.0.log"
    ns.k("delete", "rvm", "shortlived")
    wait_until(lambda: "Warm shutdown" in log.read_text() or "Cold shutdown" in log.read_text(),
               timeout=60, what="the worker of the deleted RemoteVM to stop")


def test_duplicate_deliveries_run_the_command_once(ns: Namespace, make_vm, redis_server,
                                                    controller_dir):
    """Extra copies of the dispatch message (as a broker redelivery makes) are claimed away."""
    from controller.context import controller_scope
    from controller.dispatch import Dispatcher
    from controller.targets import vm_target
    from tests.e2e.plugins.fleet import CONTROLLER_NAMESPACES
    from vmfleet.api.constants import TASK_EXECUTE
    from vmfleet.api.envelope import Envelope
    from vmfleet.api.signing import PRIVATE_KEY_FILE, Signer, read_private_key

    vm = make_vm("once")
    ns.add_vms([vm])
    runs = "/tmp/vmfleet-runs"
    ns.run("once", vm="once", command=f"echo ran >> {runs}; sleep 1")
    obj = wait_until(lambda: (ns.get("rcmd", "once").get("status") or {}).get("results") and
                     ns.get("rcmd", "once"), timeout=30, what="the dispatch")
    envelope = Envelope(namespace=str(ns), name="once", uid=obj["metadata"]["uid"], vm="once",
                        attempt=1, dispatch_time="", spec=obj["spec"],
                        target=vm_target(ns.get("rvm", "once")),
                        # A redelivery is the very message: it names the controller's scope,
                        # so whichever copy wins the claim reports where the controller reads.
                        scope=controller_scope(None, controller_argv(CONTROLLER_NAMESPACES)))
    # Copies as genuine as the controller's: signed with its key.
    dispatcher = Dispatcher(redis_server.url,
                            Signer(read_private_key(controller_dir / PRIVATE_KEY_FILE), 300))
    try:
        for _ in range(3):
            dispatcher.send_task(TASK_EXECUTE, envelope.to_message(), f"vmfleet.{ns}.once", str(ns))
    finally:
        dispatcher.close()
    ns.wait("remotecommand/once", "Complete")
    log = controller_dir / "workers" / f"{ns}.once.0.log"
    wait_until(lambda: log.read_text().count(f"Skipped RemoteCommand {ns}/once") == 3,
               timeout=30, what="the three duplicates to be skipped")
    assert vm.host_path(runs).read_text() == "ran\n"
    assert log.read_text().count(f"Claimed RemoteCommand {ns}/once") == 1
