"""vmfleet as users install it: `helm install` of charts/vmfleet on a real node (kubelet,
containerd, runc) with the project's image; the controller and the workers are pods.

One release for the module, in order: install → workers per VM → the flows through
pods → faults (a worker force-deleted, scale to zero and back, the controller pod
deleted) → least privilege as deployed → `helm upgrade` → `helm uninstall` and the
namespace deleted. Pods use the host's network: the sshd VMs, Redis and the API server
are on loopback, and every container that talks to the API is pointed at 127.0.0.1.

The contract checked is DESIGN.md's: command workers hold no Kubernetes credentials
(`automountServiceAccountToken: false`, no Role), a namespace's transfer worker holds
only its namespace's transfer ServiceAccount, the controller is the only writer of
status, and no RemoteVM or RemoteCommand carries a finalizer.
"""

from __future__ import annotations

import base64
import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.chart import CHART, helm_binary
from tests.e2e.fleet import Kubectl, Namespace, unique_namespace
from tests.e2e.release import RELEASE
from vmfleet.dev.brokers import RedisServer
from vmfleet.dev.controlplane import ControlPlane
from vmfleet.dev.node import NO_REGISTRY_PORT, Node, chart_values
from vmfleet.dev.proc import wait_until
from vmfleet.dev.sshd import SshdVM

CONTROLLER = f"{RELEASE}-vmfleet-controller"
TRANSFER_SA = f"{RELEASE}-vmfleet-transfer-worker"
TRANSFER_DEPLOYMENT = "vmfleet-transfers"
WORKER_SA = f"{RELEASE}-vmfleet-worker"
UPGRADE_TAG = "0.1.0-upgrade"
FLEET_LABELS = {"fleet": "session"}  # the session's vm1..vm3, not a test's own VM
FAST_FAULTS = {
    "VMFLEET_HEARTBEAT_SECONDS": "1",
    "VMFLEET_WORKER_LOST_SECONDS": "6",
    "VMFLEET_KILL_GRACE_SECONDS": "1",
}

pytestmark = pytest.mark.timeout(900)


class Release:
    """The chart installed in one namespace, and what the tests measure on it."""

    def __init__(self, cp: ControlPlane, kubectl: Kubectl, node: Node, image: str,
                 ns: Namespace, redis: RedisServer, workdir: Path) -> None:
        self.cp = cp
        self.kubectl = kubectl
        self.node = node
        self.image = image
        self.ns = ns
        self.redis = redis
        self.workdir = workdir
        self.helm = helm_binary()
        self.installed_at = 0.0
        self.first_succeeded: float | None = None

    def helm_run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        env = self.cp.env()
        env["HELM_CACHE_HOME"] = str(self.workdir / "helm-cache")
        env["HELM_CONFIG_HOME"] = str(self.workdir / "helm-config")
        env["HELM_DATA_HOME"] = str(self.workdir / "helm-data")
        proc = subprocess.run([self.helm, *args, "--namespace", self.ns.name,
                               "--kubeconfig", str(self.cp.kubeconfig)],
                              capture_output=True, text=True, timeout=timeout, env=env)
        if proc.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} exited {proc.returncode}:\n"
                                 f"{proc.stdout}\n{proc.stderr}\n{self.diagnostics()}")
        return proc

    def values(self) -> Path:
        path = self.workdir / "values.yaml"
        path.write_text(yaml.safe_dump(chart_values(self.cp, self.image, extra_env=FAST_FAULTS)))
        return path

    # -- what the cluster shows ------------------------------------------------------

    def pods(self, selector: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.kubectl.get_json("-n", self.ns.name, "pods", "-l", selector)["items"]
        return items

    def ready_pods(self, selector: str) -> list[dict[str, Any]]:
        return [p for p in self.pods(selector) if p["metadata"].get("deletionTimestamp") is None
                and any(c["type"] == "Ready" and c["status"] == "True"
                        for c in p.get("status", {}).get("conditions", []))]

    def worker_pods(self, vm: str) -> list[dict[str, Any]]:
        return self.pods(f"app.kubernetes.io/component=worker,vmfleet.io/vm={vm}")

    def diagnostics(self) -> str:
        out = self.kubectl("-n", self.ns.name, "get", "pods,deployments,rvm,rcmd", "-o", "wide",
                           check=False).stdout
        events = self.kubectl("-n", self.ns.name, "get", "events", "--sort-by=.lastTimestamp",
                              check=False).stdout[-3000:]
        logs = self.kubectl("-n", self.ns.name, "logs", f"deployment/{CONTROLLER}", "--tail=40",
                            check=False)
        return f"{out}\n{events}\n--- controller log:\n{logs.stdout}{logs.stderr}"

    def finished(self, name: str, timeout: int = 120) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            obj = self.ns.get("remotecommand", name)
            conditions = obj.get("status", {}).get("conditions", [])
            if any(c["type"] == "Finished" and c["status"] == "True" for c in conditions):
                return obj
            return None
        try:
            obj: dict[str, Any] = wait_until(done, timeout=timeout, interval=0.3,
                                             what=f"RemoteCommand {name} to finish")
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{self.diagnostics()}") from None
        if obj["status"]["phase"] == "Succeeded" and self.first_succeeded is None:
            self.first_succeeded = time.monotonic()
            print(f"\nhelm install → first Succeeded: {self.first_succeeded - self.installed_at:.1f}s")
        return obj


@pytest.fixture(scope="module")
def release(controlplane: ControlPlane, kubectl: Kubectl, crds: None, node: Node,
            node_image: str, vms: list[SshdVM],
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Release]:
    workdir = tmp_path_factory.mktemp("in-cluster")
    # A broker of its own: the session's Process-runtime controller shares none of its queues.
    redis = RedisServer(workdir / "redis").start()
    ns = Namespace(kubectl, unique_namespace("inc")).create()
    # The namespace's workers hold its own Redis user; the controller and transfer worker theirs.
    kubectl("-n", ns.name, "create", "secret", "generic", "broker",
            f"--from-literal=url={redis.namespace_url(ns.name)}")
    kubectl("-n", ns.name, "create", "secret", "generic", "broker-controller",
            f"--from-literal=url={redis.url}")
    rel = Release(controlplane, kubectl, node, node_image, ns, redis, workdir)
    rel.installed_at = time.monotonic()
    rel.helm_run("install", RELEASE, str(CHART), "-f", str(rel.values()), "--wait", "--timeout", "240s")
    print(f"\nhelm install --wait: {time.monotonic() - rel.installed_at:.1f}s")
    ns.add_vms(vms, labels=FLEET_LABELS)
    try:
        yield rel
    finally:
        subprocess.run([rel.helm, "uninstall", RELEASE, "-n", ns.name, "--kubeconfig",
                        str(controlplane.kubeconfig), "--wait", "--timeout", "60s"],
                       capture_output=True, timeout=120, env=controlplane.env())
        ns.delete()
        redis.stop()


def results_of(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["vm"]: r for r in obj.get("status", {}).get("results", [])}


def uid() -> str:
    return uuid.uuid4().hex[:8]


def vm_file(vm: SshdVM, path: str) -> str:
    code, out, _ = vm.run(f"cat {path} 2>/dev/null || true")
    return out.decode()


def pid_alive(vm: SshdVM, pid: int) -> bool:
    code, _, _ = vm.run(f"kill -0 {pid} 2>/dev/null")
    return code == 0


# ------------------------------------------------------------------------------- install


def test_controller_pod_ready_and_one_worker_deployment_per_vm(release: Release, vms: list[SshdVM]) -> None:
    (controller,) = release.ready_pods("app.kubernetes.io/component=controller")
    assert controller["spec"]["nodeName"] == release.node.name
    assert controller["spec"]["containers"][0]["image"] == release.image

    def workers_running() -> bool:
        return all(any(p["status"].get("phase") == "Running" for p in release.worker_pods(vm.name))
                   for vm in vms)
    try:
        wait_until(workers_running, timeout=180, interval=1, what="a Running worker pod per VM")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{release.diagnostics()}") from None
    for vm in vms:
        deploy = release.kubectl.get_json("-n", release.ns.name, "deployment", f"vmfleet-worker-{vm.name}")
        assert deploy["metadata"]["ownerReferences"][0]["name"] == vm.name
        (pod,) = [p for p in release.worker_pods(vm.name) if p["status"].get("phase") == "Running"]
        spec = pod["spec"]
        secrets = sorted(v["secret"]["secretName"] for v in spec.get("volumes", []) if "secret" in v)
        assert secrets == [f"{vm.name}-ssh"], f"{vm.name}'s worker mounts {secrets}"
        projected = [v for v in spec.get("volumes", []) if "projected" in v]
        assert spec.get("automountServiceAccountToken") is False and not projected, (
            f"{vm.name}'s worker pod has Kubernetes credentials (DESIGN.md: none)")


def test_the_broker_asks_who_is_there_and_worker_pods_hold_their_namespace_s_user(
        release: Release) -> None:
    import redis

    from vmfleet import tenancy

    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis.from_url(release.redis.anonymous_url, socket_timeout=5).ping()
    pods = release.pods("app.kubernetes.io/name=vmfleet")
    assert pods
    for pod in pods:
        for container in pod["spec"]["containers"]:
            for env in container.get("env", []):
                assert "redis://" not in str(env.get("value", "")), pod["metadata"]["name"]
    workers = [p for p in pods if p["metadata"]["labels"].get("app.kubernetes.io/component") == "worker"]
    assert workers
    for pod in workers:
        env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
        assert env["VMFLEET_BROKER_URL"]["valueFrom"]["secretKeyRef"] == {"name": "broker", "key": "url"}
        assert env["VMFLEET_NAMESPACE"]["value"] == release.ns.name
    secret = release.kubectl.get_json("-n", release.ns.name, "secret", "broker")
    url = base64.b64decode(secret["data"]["url"]).decode()
    assert tenancy.url_credentials(url)[0] == tenancy.namespace_user(release.ns.name)


def test_every_container_talks_to_the_api_on_loopback_only(release: Release) -> None:
    """The kubelet gives every container KUBERNETES_SERVICE_HOST, the Service IP of
    `kubernetes`, which is not on this machine: each container of the release that
    can reach the API is pointed at 127.0.0.1 instead, and all pods are on the host's
    network with the node's loopback address."""
    pods = release.pods("app.kubernetes.io/name=vmfleet")
    assert pods
    for pod in pods:
        assert pod["spec"].get("hostNetwork") is True, pod["metadata"]["name"]
        assert pod["status"].get("podIP") in (None, "127.0.0.1"), pod["metadata"]["name"]
        for container in pod["spec"]["containers"]:
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert env.get("KUBERNETES_SERVICE_HOST") == "127.0.0.1", pod["metadata"]["name"]


def test_an_image_that_was_not_imported_is_never_pulled(release: Release) -> None:
    """The node pulls nothing: a short image name (the kubelet qualifies it with the
    default registry) resolves, like any registry, to a closed port on loopback."""
    name = "never-pulled"
    release.kubectl.apply({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": release.ns.name},
        "spec": {"hostNetwork": True, "restartPolicy": "Never",
                 "containers": [{"name": "c", "image": "vmfleet-not-imported:1",
                                 "imagePullPolicy": "Always"}]}})
    try:
        def pull_error() -> str | None:
            pod = release.kubectl.get_json("-n", release.ns.name, "pod", name)
            for status in pod.get("status", {}).get("containerStatuses") or []:
                waiting = status.get("state", {}).get("waiting") or {}
                if waiting.get("reason") in ("ErrImagePull", "ImagePullBackOff") and waiting.get("message"):
                    return str(waiting["message"])
            return None

        message = wait_until(pull_error, timeout=60, what="the pull to fail")
        assert f"127.0.0.1:{NO_REGISTRY_PORT}" in message, message
    finally:
        release.kubectl("delete", "-n", release.ns.name, "pod", name, "--grace-period=0", "--force",
                        "--wait=false", check=False)


# ------------------------------------------------------------------------------- flows


def test_skeleton_flow_through_pods(release: Release, vms: list[SshdVM]) -> None:
    release.ns.run("hello", vm=vms[0].name, command="echo hello from $(hostname)")
    obj = release.finished("hello", timeout=180)
    assert obj["status"]["phase"] == "Succeeded", obj["status"]
    result = results_of(obj)[vms[0].name]
    assert result["exitCode"] == 0
    assert "hello from" in result["stdout"]
    # The worker pod that ran it, by its name (the downward API), not Celery's node name.
    pods = {p["metadata"]["name"] for p in release.pods(f"vmfleet.io/vm={vms[0].name}")}
    assert result["worker"].startswith(f"vmfleet-worker-{vms[0].name}-"), result["worker"]
    assert result["worker"] in pods, (result["worker"], pods)
    # Its Event, created by the controller pod with the chart's RBAC (create only).
    def attempt_events() -> list[dict[str, Any]]:
        items = release.kubectl.get_json("-n", release.ns.name, "events", "--field-selector",
                                         "involvedObject.name=hello")["items"]
        return [e for e in items if e["reason"] == "AttemptSucceeded"]
    wait_until(lambda: bool(attempt_events()), timeout=30, what="the attempt's Event")
    (event,) = attempt_events()
    record = json.loads(event["metadata"]["annotations"]["vmfleet.io/attempt"])
    assert (record["worker"], record["exitCode"], record["vm"]) == (result["worker"], 0, vms[0].name)
    assert event["reportingInstance"].startswith(f"{CONTROLLER}-"), event["reportingInstance"]


def test_fan_out_with_max_parallel(release: Release, vms: list[SshdVM]) -> None:
    tag = uid()
    path = f"/tmp/inc-fan-{tag}"
    release.ns.run("fan", selector={"matchLabels": FLEET_LABELS}, maxParallel=1,
                   command=f"date +%s.%N > {path}; sleep 1; date +%s.%N >> {path}")
    obj = release.finished("fan", timeout=180)
    assert obj["status"]["phase"] == "Succeeded", obj["status"]
    assert obj["status"]["completions"] == f"{len(vms)}/{len(vms)}"
    spans = []
    for vm in vms:
        start, end = (float(x) for x in vm_file(vm, path).split())
        spans.append((start, end))
    spans.sort()
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        assert start >= end, f"two VMs ran at once with maxParallel 1: {spans}"


def test_timeout_kills_the_remote_process(release: Release, vms: list[SshdVM]) -> None:
    vm = vms[1]
    path = f"/tmp/inc-timeout-{uid()}"
    release.ns.run("slow", vm=vm.name, timeoutSeconds=3, command=f"echo $$ > {path}; exec sleep 300")
    obj = release.finished("slow", timeout=120)
    result = results_of(obj)[vm.name]
    assert (obj["status"]["phase"], result["reason"]) == ("Failed", "Timeout"), obj["status"]
    pid = int(vm_file(vm, path))
    wait_until(lambda: not pid_alive(vm, pid), timeout=30, interval=0.5,
               what=f"the timed-out process {pid} to be gone from {vm.name}")


def test_cancel_by_delete_kills_the_remote_process(release: Release, vms: list[SshdVM]) -> None:
    vm = vms[2]
    path = f"/tmp/inc-cancel-{uid()}"
    release.ns.run("cancelme", vm=vm.name, command=f"echo $$ > {path}; exec sleep 300")
    wait_until(lambda: vm_file(vm, path).strip(), timeout=120, interval=0.5,
               what="the command to start on the VM")
    pid = int(vm_file(vm, path))
    started = time.monotonic()
    release.ns.k("delete", "remotecommand", "cancelme", "--timeout=60s", timeout=90)
    print(f"\nkubectl delete of a running RemoteCommand: {time.monotonic() - started:.1f}s")
    wait_until(lambda: not pid_alive(vm, pid), timeout=60, interval=0.5,
               what=f"the cancelled process {pid} to be gone from {vm.name}")


def test_transfer_vm_to_vm_through_the_transfer_worker_pod(release: Release, vms: list[SshdVM]) -> None:
    """The namespace's transfer worker is a pod the controller started for the transfer,
    running as the chart's transfer ServiceAccount with the namespace's VM keys mounted;
    its token reads a labelled Secret source, and an unlabelled one is refused."""
    src, dst = vms[0], vms[1]
    tag = uid()
    code, _, err = src.run(f"head -c 300000 /dev/urandom > /tmp/inc-src-{tag}")
    assert code == 0, err
    _, digest, _ = src.run(f"sha256sum /tmp/inc-src-{tag} | cut -d' ' -f1")
    release.ns.run("copy", transfer={"from": {"vm": src.name, "path": f"/tmp/inc-src-{tag}"},
                                     "to": [{"vm": dst.name, "path": f"/tmp/inc-dst-{tag}"}]})
    obj = release.finished("copy", timeout=180)
    assert obj["status"]["phase"] == "Succeeded", obj["status"]
    _, copied, _ = dst.run(f"sha256sum /tmp/inc-dst-{tag} | cut -d' ' -f1")
    assert copied.strip() == digest.strip() != b""
    (result,) = obj["status"]["results"]
    (pod,) = [p for p in release.pods("vmfleet.io/transfers=true")
              if p["status"].get("phase") == "Running"]
    assert result["worker"] == pod["metadata"]["name"], result["worker"]  # the pod, by name
    spec = pod["spec"]
    assert spec["serviceAccountName"] == TRANSFER_SA
    secrets = sorted(v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v)
    assert secrets == sorted(f"{vm.name}-ssh" for vm in vms), secrets
    # The token, the keys, and the probe files' in-memory directory.
    assert all("secret" in v or "projected" in v or v.get("name") == "probes" for v in spec["volumes"])
    for name, labels in (("shared", {"vmfleet.io/transferable": "true"}), ("private", {})):
        release.kubectl.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {
            "name": f"inc-{name}", "namespace": release.ns.name, "labels": labels},
            "stringData": {"v": f"{name}-{tag}"}})
        release.ns.run(f"from-{name}", transfer={
            "from": {"secretKeyRef": {"name": f"inc-{name}", "key": "v"}},
            "to": [{"vm": dst.name, "path": f"/tmp/inc-{name}-{tag}"}]})
    obj = release.finished("from-shared", timeout=180)
    assert obj["status"]["phase"] == "Succeeded", obj["status"]
    assert vm_file(dst, f"/tmp/inc-shared-{tag}") == f"shared-{tag}"
    (result,) = release.finished("from-private", timeout=180)["status"]["results"]
    assert result["reason"] == "PermissionDenied" and "vmfleet.io/transferable" in result["message"]
    assert vm_file(dst, f"/tmp/inc-private-{tag}") == ""


# ------------------------------------------------------------------------------- faults


def test_worker_pod_force_deleted_mid_command_ends_truly_and_runs_once(
        release: Release, vms: list[SshdVM]) -> None:
    vm = vms[0]
    path = f"/tmp/inc-lost-{uid()}"
    digits = f"{uuid.uuid4().int % 10**6:06d}"
    sleep = f"sleep 150.{digits}"  # a process line of this test only; outlives the test's waits
    # A forced deletion still sends SIGTERM: the worker reports a disruption, which is
    # retried without counting unless the spec says countDisruptions (as here: once).
    release.ns.run("lost", vm=vm.name, retries={"limit": 0, "countDisruptions": True},
                   command=f"echo run >> {path}; {sleep}; echo done >> {path}")
    wait_until(lambda: "run" in vm_file(vm, path), timeout=120, interval=0.3,
               what="the command to start on the VM")
    (pod,) = [p for p in release.worker_pods(vm.name) if p["status"].get("phase") == "Running"]
    release.ns.k("delete", "pod", pod["metadata"]["name"], "--grace-period=0", "--force")
    obj = release.finished("lost", timeout=180)
    result = results_of(obj)[vm.name]
    assert obj["status"]["phase"] in ("Failed", "Succeeded"), obj["status"]
    if obj["status"]["phase"] == "Failed":
        assert result["reason"] == "WorkerLost", result
    runs = vm_file(vm, path).split().count("run")
    assert runs == 1, f"ran {runs} times with retries.limit 0"
    # The lost attempt's processes are gone: the file never gets its "done".
    # Killed, not ended by itself: "[s]leep" does not match the shell that runs pgrep.
    wait_until(lambda: vm.run(f"pgrep -f '[s]leep 150.{digits}' >/dev/null")[0] != 0, timeout=120,
               interval=0.5, what="the lost attempt's processes to be killed")
    assert "done" not in vm_file(vm, path)
    # A new worker pod takes the VM's queue.
    wait_until(lambda: any(p["status"].get("phase") == "Running" for p in release.worker_pods(vm.name)),
               timeout=120, interval=1, what=f"a new worker pod for {vm.name}")


def test_scale_to_zero_and_wake_on_dispatch(release: Release, make_vm: Any) -> None:
    vm = make_vm("sleepy")
    release.ns.add_vms([vm], workers={"autoscale": {"minReplicas": 0, "maxReplicas": 1,
                                                    "scaleDownDelaySeconds": 1}})
    deployment = f"vmfleet-worker-{vm.name}"

    def at_zero() -> bool:
        result = release.kubectl("-n", release.ns.name, "get", "deployment", deployment, "-o",
                                 "jsonpath={.spec.replicas}", check=False)
        return result.returncode == 0 and result.stdout == "0" and not release.worker_pods(vm.name)
    try:
        wait_until(at_zero, timeout=180, interval=0.5, what=f"{deployment} at zero replicas, no pod")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{release.diagnostics()}") from None
    started = time.monotonic()
    release.ns.run("wake", vm=vm.name, command="echo awake")
    obj = release.finished("wake", timeout=120)
    waited = time.monotonic() - started
    print(f"\nwake from zero: dispatch → Succeeded in {waited:.1f}s (target ≤ 10 s)")
    assert obj["status"]["phase"] == "Succeeded", obj["status"]
    assert waited <= 60, f"waking a VM's worker from zero took {waited:.0f}s"


def test_controller_pod_deleted_mid_fan_out_new_pod_finishes(release: Release, vms: list[SshdVM]) -> None:
    tag = uid()
    path = f"/tmp/inc-restart-{tag}"
    release.ns.run("rollout", selector={"matchLabels": FLEET_LABELS}, maxParallel=1,
                   command=f"echo run >> {path}; sleep 6")

    def one_done() -> bool:
        obj = release.ns.get("remotecommand", "rollout")
        return any(r.get("phase") == "Succeeded" for r in results_of(obj).values())
    wait_until(one_done, timeout=180, interval=0.3, what="the first VM of the fan-out to succeed")
    (old,) = release.ready_pods("app.kubernetes.io/component=controller")
    release.ns.k("delete", "pod", old["metadata"]["name"], "--wait=false")
    obj = release.finished("rollout", timeout=300)
    assert obj["status"]["phase"] == "Succeeded", obj["status"]
    assert obj["status"]["completions"] == f"{len(vms)}/{len(vms)}"
    (new,) = wait_until(lambda: release.ready_pods("app.kubernetes.io/component=controller"),
                        timeout=120, interval=1, what="the new controller pod to be Ready")
    assert new["metadata"]["uid"] != old["metadata"]["uid"]
    # The new pod, not the old one on its way out, finished the fan-out.
    log = release.kubectl("-n", release.ns.name, "logs", new["metadata"]["name"]).stdout
    assert f"RemoteCommand {release.ns.name}/rollout Succeeded" in log, log[-3000:]
    for vm in vms:
        runs = vm_file(vm, path).split().count("run")
        assert runs == 1, f"{vm.name} ran the command {runs} times"


def restart_while_running(release: Release, vm: SshdVM, names: list[str]) -> dict[str, Any]:
    """``kubectl rollout restart`` of the VM's workers once ``names`` all run; returns the
    old pod and when it got its SIGTERM (its deletionTimestamp appeared)."""
    def running() -> bool:
        return all(results_of(release.ns.get("remotecommand", n)).get(vm.name, {}).get("phase")
                   == "Running" for n in names)
    wait_until(running, timeout=180, interval=0.5, what="the commands to run")
    (old,) = [p for p in release.worker_pods(vm.name) if p["status"].get("phase") == "Running"]
    release.ns.k("rollout", "restart", f"deployment/vmfleet-worker-{vm.name}")

    def terminating() -> bool:
        pods = [p for p in release.worker_pods(vm.name)
                if p["metadata"]["uid"] == old["metadata"]["uid"]]
        return bool(pods and pods[0]["metadata"].get("deletionTimestamp"))
    wait_until(terminating, timeout=120, interval=0.2, what="the old worker pod to be stopped")
    return {"pod": old, "sigterm": time.monotonic()}


def test_a_rollout_restart_of_workers_finishes_what_they_run(release: Release, make_vm: Any) -> None:
    """A planned disruption loses nothing: commands that still need more than Kubernetes'
    default grace (30 s) after SIGTERM keep running in the stopping pod (Celery's warm
    shutdown within the RemoteVM's terminationGracePeriodSeconds, default 300) while the
    new pod takes what comes next."""
    vm = make_vm("drain")
    release.ns.add_vms([vm], maxConcurrentCommands=4, workers={"replicas": 1})
    path = f"/tmp/inc-drain-{uid()}"
    names = [f"drain{i}" for i in range(3)]
    for name in names:
        release.ns.run(name, vm=vm.name, command=f"sleep 50; echo {name} >> {path}")
    old = restart_while_running(release, vm, names)
    assert old["pod"]["spec"]["terminationGracePeriodSeconds"] == 300
    release.ns.run("after", vm=vm.name, command=f"echo after >> {path}")  # for the new pod
    results = {name: results_of(release.finished(name, timeout=150))[vm.name]
               for name in [*names, "after"]}
    drained = time.monotonic() - old["sigterm"]
    lost = [n for n, r in results.items() if r.get("reason") == "WorkerLost" or r["attempt"] != 1]
    runs = vm_file(vm, path).split()
    print(f"\nrollout restart with 3 commands of 50 s running: the stopping pod ran them "
          f"{drained:.1f}s past its SIGTERM; lost {len(lost)}, run twice "
          f"{len(runs) - len(set(runs))}, retried {sum(1 for r in results.values() if r['attempt'] != 1)}")
    assert {n: r["phase"] for n, r in results.items()} == dict.fromkeys([*names, "after"], "Succeeded")
    assert lost == []
    assert sorted(runs) == sorted([*names, "after"])  # each once
    assert drained > 30, "the commands ended within the default grace: this shows nothing"
    # The stopping pod exits once its commands ended (the kubelet needs a moment to remove it).
    wait_until(lambda: all(p["metadata"]["uid"] != old["pod"]["metadata"]["uid"]
                           for p in release.worker_pods(vm.name)),
               timeout=60, interval=0.5, what="the stopped worker pod to be gone")


def test_a_grace_too_short_ends_worker_lost_and_retries_without_counting(
        release: Release, make_vm: Any) -> None:
    """When the grace runs out first (10 s here), the attempts end WorkerLost naming the
    disruption and run again although retries.limit is 0."""
    vm = make_vm("short")
    release.ns.add_vms([vm], maxConcurrentCommands=4,
                       workers={"replicas": 1, "terminationGracePeriodSeconds": 10})
    path = f"/tmp/inc-short-{uid()}"
    names = [f"short{i}" for i in range(2)]
    for name in names:  # attempt 1 sleeps past the grace; attempt 2 (a flag file) ends at once
        release.ns.run(name, vm=vm.name, command=(
            f"if [ -e {path}.{name} ]; then echo {name} >> {path}; "
            f"else touch {path}.{name}; sleep 90; echo {name} >> {path}; fi"))
    old = restart_while_running(release, vm, names)
    results = {n: results_of(release.finished(n, timeout=180))[vm.name] for n in names}
    print(f"\nrollout restart, grace 10 s, commands of 90 s: all Succeeded "
          f"{time.monotonic() - old['sigterm']:.1f}s after the SIGTERM, "
          f"{sum(r.get('disruptions', 0) for r in results.values())} attempts lost to the "
          f"disruption and retried without counting (retries.limit 0)")
    assert {n: (r["phase"], r["attempt"], r.get("disruptions")) for n, r in results.items()} == \
        dict.fromkeys(names, ("Succeeded", 2, 1))
    assert sorted(vm_file(vm, path).split()) == sorted(names)  # the first attempts never ended
    log = release.kubectl("-n", release.ns.name, "logs", f"deployment/{CONTROLLER}").stdout
    assert "lost during attempt 1; retrying" in log


# ------------------------------------------------------------------------------- RBAC


def can_i(release: Release, sa: str, verb: str, resource: str, namespace: str | None = None) -> bool:
    result = release.kubectl("auth", "can-i", verb, resource, "-n", namespace or release.ns.name,
                             f"--as=system:serviceaccount:{release.ns.name}:{sa}", check=False)
    return result.stdout.strip() == "yes"


def test_least_privilege_as_deployed(release: Release) -> None:
    other = "default"
    allowed = [
        ("list", "remotevms.vmfleet.io"), ("watch", "remotecommands.vmfleet.io"),
        ("patch", "remotecommands.vmfleet.io/status"), ("patch", "remotevms.vmfleet.io/status"),
        ("create", "deployments.apps"), ("patch", "deployments.apps"),
    ]
    lease = f"leases.coordination.k8s.io/{CONTROLLER}"  # the chart's Lease, by name
    allowed += [("get", lease), ("update", lease), ("create", "poddisruptionbudgets.policy"),
                ("patch", "poddisruptionbudgets.policy")]
    for verb, resource in allowed:
        assert can_i(release, CONTROLLER, verb, resource), f"the controller cannot {verb} {resource}"
    for verb, resource in [("create", "leases.coordination.k8s.io"), ("delete", lease),
                           ("update", "leases.coordination.k8s.io/another-lease")]:
        assert not can_i(release, CONTROLLER, verb, resource), f"the controller may {verb} {resource}"
    denied = [
        ("get", "secrets"), ("list", "secrets"), ("create", "pods"), ("create", "pods/exec"),
        ("delete", "namespaces"), ("create", "roles.rbac.authorization.k8s.io"),
        ("create", "rolebindings.rbac.authorization.k8s.io"), ("patch", "serviceaccounts"),
    ]
    for verb, resource in [*denied, ("delete", "deployments.apps"), ("update", "deployments.apps")]:
        assert not can_i(release, CONTROLLER, verb, resource), f"the controller may {verb} {resource}"
    assert not can_i(release, CONTROLLER, "list", "remotevms.vmfleet.io", other), (
        "the controller reaches another namespace")
    # The namespace's transfer worker: its Secrets and ConfigMaps, get only.
    assert can_i(release, TRANSFER_SA, "get", "secrets") and can_i(release, TRANSFER_SA, "get", "configmaps")
    for verb, resource, namespace in [("list", "secrets", None), ("get", "secrets", other),
                                      ("get", "remotecommands.vmfleet.io", None),
                                      ("create", "pods", None)]:
        assert not can_i(release, TRANSFER_SA, verb, resource, namespace), (verb, resource, namespace)
    # The admission fence, as deployed: the controller's ServiceAccount may not create a
    # worker with a hostPath (its Role alone would let it).
    body = {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "vmfleet-worker-evil", "namespace": release.ns.name},
            "spec": {"selector": {"matchLabels": {"a": "b"}}, "template": {
                "metadata": {"labels": {"a": "b"}},
                "spec": {"automountServiceAccountToken": False,
                         "containers": [{"name": "c", "image": release.image}],
                         "volumes": [{"name": "root", "hostPath": {"path": "/"}}]}}}}
    refused = release.kubectl("create", "--dry-run=server", "-f", "-",
                              f"--as=system:serviceaccount:{release.ns.name}:{CONTROLLER}",
                              input=json.dumps(body), check=False)
    assert refused.returncode != 0 and "only secret and emptyDir volumes" in refused.stderr, refused
    # Workers: nothing of the cluster at all (DESIGN.md).
    for verb, resource in [("get", "secrets"), ("get", "remotecommands.vmfleet.io"),
                           ("patch", "remotecommands.vmfleet.io/status"), ("list", "pods"),
                           ("get", "remotevms.vmfleet.io"), ("create", "events")]:
        assert not can_i(release, WORKER_SA, verb, resource), f"a worker may {verb} {resource}"


# ------------------------------------------------------------------------------- upgrade, uninstall


def test_helm_upgrade_to_a_new_tag_rolls_controller_and_workers(release: Release, vms: list[SshdVM]) -> None:
    new_image = f"{release.image.rpartition(':')[0]}:{UPGRADE_TAG}"
    release.node.ctr("images", "tag", "--force", release.image, new_image)
    release.helm_run("upgrade", RELEASE, str(CHART), "--reuse-values", "--set", f"image.tag={UPGRADE_TAG}",
                     "--wait", "--timeout", "240s")
    workers = [f"vmfleet-worker-{vm.name}" for vm in vms]

    def rolled() -> bool:
        for name in [CONTROLLER, TRANSFER_DEPLOYMENT, *workers]:
            deploy = release.kubectl.get_json("-n", release.ns.name, "deployment", name)
            image = deploy["spec"]["template"]["spec"]["containers"][0]["image"]
            status = deploy.get("status", {})
            if not image.endswith(f":{UPGRADE_TAG}"):
                return False
            if status.get("updatedReplicas", 0) != deploy["spec"]["replicas"] or \
                    status.get("readyReplicas", 0) != deploy["spec"]["replicas"]:
                return False
        return True
    try:
        wait_until(rolled, timeout=240, interval=1, what="every Deployment on the new tag")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{release.diagnostics()}") from None
    release.ns.run("after-upgrade", vm=vms[0].name, command="echo upgraded")
    assert release.finished("after-upgrade", timeout=180)["status"]["phase"] == "Succeeded"


def test_helm_uninstall_then_namespace_delete_completes(release: Release) -> None:
    objects = json.loads(release.kubectl("-n", release.ns.name, "get", "rvm,rcmd", "-o", "json").stdout)
    with_finalizers = [o["metadata"]["name"] for o in objects["items"] if o["metadata"].get("finalizers")]
    release.helm_run("uninstall", RELEASE, "--wait", "--timeout", "120s")
    started = time.monotonic()
    deleted = release.kubectl("delete", "namespace", release.ns.name, "--timeout=90s", check=False,
                              timeout=120)
    print(f"\nkubectl delete namespace after helm uninstall: {time.monotonic() - started:.1f}s")
    assert not with_finalizers, (
        f"RemoteVMs/RemoteCommands with finalizers (DESIGN.md: none), so deleting the namespace "
        f"waits on a controller that is gone: {with_finalizers}")
    assert deleted.returncode == 0, deleted.stderr
    assert not release.kubectl("get", "namespace", release.ns.name, check=False).stdout
