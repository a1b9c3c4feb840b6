"""Bad and odd objects against the real servers: no object stops the controller, the
broker is no way across namespaces, and a fan-out's status keeps to its budget.

Real kube-apiserver + etcd, real OpenSSH sshd, real Redis, the real controller (Process
runtime, restarted as a user would) and its Celery workers.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.fleet import (
    Kubectl,
    Namespace,
    assert_no_tracebacks,
    start_controller,
)
from vmfleet.dev.manifests import remote_vm, vm_manifests
from vmfleet.dev.proc import wait_until
from vmfleet.dev.sshd import SshdVM
from vmfleet.procs import free_port

pytestmark = pytest.mark.e2e

OWN_NS_PREFIX = "bad"  # the namespaces of own_ns


def alias(vm: SshdVM, ns: Namespace, name: str, **spec: Any) -> dict[str, Any]:
    """A RemoteVM named ``name`` reaching ``vm`` (its host, key and Secret)."""
    body = remote_vm(vm, ns.name, **spec)
    body["metadata"]["name"] = name
    return body


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in (obj.get("status") or {}).get("conditions") or []
                 if c["type"] == type_), {})


def warnings(ns: Namespace, name: str, reason: str) -> list[dict[str, Any]]:
    events = ns.kubectl.get_json("-n", ns.name, "events",
                                 f"--field-selector=involvedObject.name={name},reason={reason}")
    return [e for e in events["items"] if e["type"] == "Warning"]


def test_a_controller_restarted_among_odd_objects_serves_the_rest_and_refuses_a_borrowed_queue(
        controlplane: Any, redis_server: Any, kubectl: Kubectl, own_ns: Callable[[], Namespace],
        make_vm: Callable[..., SshdVM], tmp_path: Path) -> None:
    victim, tenant = own_ns(), own_ns()
    vm = make_vm("odd")
    marker = f"/tmp/borrowed-{uuid.uuid4().hex[:8]}"
    controller = start_controller(controlplane.kubeconfig, redis_server.url, tmp_path,
                                  [victim.name, tenant.name])
    try:
        victim.add_vms([vm])
        victim.run("before", vm="odd", command="echo before")
        assert victim.finished("before", timeout=120)["status"]["phase"] == "Succeeded"
        controller.stop(grace=30)

        # While no controller runs: valid shapes that once stopped it, and a RemoteVM in
        # another namespace that borrows the victim's queue and Secret name.
        kubectl.apply(alias(vm, victim, "empty", workers={}),
                      alias(vm, victim, "sized", workers={"resources": {
                          "requests": {"cpu": "10m", "memory": 64 * 1024 * 1024}}}),
                      alias(vm, victim, "pooled", workerPool="p",
                            workers={"resources": {"limits": {"memory": "1Gi"}}}))
        thief = alias(vm, tenant, "thief", queue=f"vmfleet.{victim.name}.odd")
        kubectl.apply(*[o for o in vm_manifests(vm, tenant.name) if o["kind"] == "Secret"], thief)
        controller = start_controller(controlplane.kubeconfig, redis_server.url, tmp_path,
                                      [victim.name, tenant.name])

        tenant.run("steal", vm="thief", command=f"id -un > {marker}")
        for name in ("odd", "empty", "sized", "pooled"):
            victim.run(f"on-{name}", vm=name, command=f"echo hello-{name}")
        for name in ("odd", "empty", "sized", "pooled"):
            result = victim.finished(f"on-{name}", timeout=180)
            assert result["status"]["phase"] == "Succeeded", result["status"]
            assert result["status"]["results"][0]["stdout"] == f"hello-{name}\n"

        stolen = tenant.finished("steal", timeout=60)["status"]
        (entry,) = stolen["results"]
        assert (stolen["phase"], entry["phase"], entry["reason"]) == ("Failed", "Failed", "InvalidSpec")
        assert f"spec.queue 'vmfleet.{victim.name}.odd' is outside namespace {tenant.name}" \
            in entry["message"]
        ready = condition(tenant.get("rvm", "thief"), "Ready")
        assert (ready["status"], ready["reason"]) == ("False", "InvalidSpec")
        assert "spec.queue" in ready["message"]
        assert warnings(tenant, "thief", "InvalidSpec")
        assert vm.run(f"test -e {marker}")[0] != 0  # nothing ran on the VM
        controller.check_running()
        assert_no_tracebacks(tmp_path / "controller.log")
    finally:
        controller.stop(grace=30)


def test_a_fan_outs_status_keeps_to_the_output_budget(
        controlplane: Any, redis_server: Any, kubectl: Kubectl, own_ns: Callable[[], Namespace],
        make_vm: Callable[..., SshdVM], tmp_path: Path) -> None:
    """50 RemoteVMs (one worker pool, one sshd) printing 8 KiB each, a 64 KiB budget."""
    budget, targets = 64 * 1024, 50
    ns = own_ns()
    vm = make_vm("fan")
    controller = start_controller(controlplane.kubeconfig, redis_server.url, tmp_path, [ns.name],
                                  extra_env={"VMFLEET_STATUS_OUTPUT_BUDGET_BYTES": str(budget)})
    try:
        secret = [o for o in vm_manifests(vm, ns.name) if o["kind"] == "Secret"]
        aliases = [alias(vm, ns, f"fan{i:02d}", workerPool="fan", maxConcurrentCommands=1)
                   for i in range(targets)]
        for body in aliases:
            body["metadata"]["labels"] = {"budget": "yes"}
        ns.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(secret + aliases), timeout=120)
        ns.run("loud", selector={"matchLabels": {"budget": "yes"}}, maxParallel=10,
               command="head -c 8192 /dev/zero | tr '\\0' o; head -c 2048 /dev/zero | tr '\\0' e >&2")
        status = ns.finished("loud", timeout=300)["status"]
        assert status["phase"] == "Succeeded", status.get("summary")
        results = status["results"]
        assert len(results) == targets
        tails = sum(len(r[k].encode()) for r in results for k in ("stdout", "stderr"))
        assert tails <= budget
        share = budget // (2 * targets)
        for result in results:
            assert result["outputTruncated"] is True
            assert result["stdout"] == "o" * share and result["stderr"] == "e" * share
            assert (result["stdoutBytes"], result["stderrBytes"]) == (8192, 2048)
        stored = kubectl("get", "-n", ns.name, "rcmd", "loud", "-o", "json").stdout
        assert len(stored.encode()) < budget + targets * 1024
        assert_no_tracebacks(tmp_path / "controller.log")
    finally:
        controller.stop(grace=30)



def probe(url: str) -> int | str:
    """The liveness endpoint's HTTP status, or why there is none."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError as exc:
        return type(exc).__name__


def test_a_controller_whose_start_failed_is_not_alive_and_a_started_one_is(
        controlplane: Any, redis_server: Any, own_ns: Callable[[], Namespace],
        tmp_path: Path) -> None:
    ns = own_ns()
    port = free_port()
    url = f"http://127.0.0.1:{port}/healthz"
    # A broker nobody listens on: the start-up cannot read what the workers reported.
    broken = start_controller(controlplane.kubeconfig, "redis://vmfleet-controller:pw@127.0.0.1:9/0",
                              tmp_path / "broken",
                              [ns.name], extra_args=[f"--liveness={url}"])
    try:
        wait_until(lambda: "'configure' failed" in broken.log_tail(200), timeout=90,
                   interval=1, what="the start-up to fail")
        for _ in range(3):
            assert probe(url) != 200
        broken.check_running()  # kopf tries the start again; meanwhile it is not alive
    finally:
        broken.stop(grace=10)
    started = start_controller(controlplane.kubeconfig, redis_server.url, tmp_path / "good",
                               [ns.name], extra_args=[f"--liveness={url}"])
    try:
        wait_until(lambda: probe(url) == 200, timeout=90, interval=0.5, what="a live controller")
        with urllib.request.urlopen(url, timeout=5) as response:
            assert json.loads(response.read()) == {"controller": "serving"}
    finally:
        started.stop(grace=30)
