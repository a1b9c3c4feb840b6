"""The same flow with RabbitMQ as broker, and the Deployment worker runtime."""

from __future__ import annotations

import pytest

from tests.e2e.fleet import Namespace, assert_no_tracebacks, start_controller, unique_namespace
from vmfleet.dev.proc import wait_until

pytestmark = pytest.mark.e2e


@pytest.fixture
def own_namespace(kubectl, crds):
    """A namespace outside the session controller's ``e2e-*`` pattern."""
    namespaces = []

    def make(prefix: str) -> Namespace:
        ns = Namespace(kubectl, unique_namespace(prefix)).create()
        namespaces.append(ns)
        return ns

    yield make
    for ns in namespaces:
        ns.delete()


def test_rabbitmq_broker(controlplane, own_namespace, rabbitmq_server, redis_server, vms, tmp_path):
    """RabbitMQ carries the Celery queues; claims, reports and cancels still need a Redis."""
    ns = own_namespace("rmq")
    controller = start_controller(controlplane.kubeconfig, rabbitmq_server.url, tmp_path, [ns.name],
                                  extra_env={"VMFLEET_STATE_URL": redis_server.url})
    try:
        ns.add_vms(vms)
        for vm in vms:
            ns.run(f"host-{vm.name}", vm=vm.name, argv=["hostname"])
        for vm in vms:
            ns.wait(f"remotecommand/host-{vm.name}", "Complete")
            (result,) = ns.get("rcmd", f"host-{vm.name}")["status"]["results"]
            assert result["stdout"] == vm.run("hostname")[1].decode()
            assert result["exitCode"] == 0
        assert_no_tracebacks(tmp_path / "workers", tmp_path / "controller.log")
    finally:
        controller.stop(grace=30)


def test_deployment_runtime_creates_an_owned_worker_deployment(
    controlplane, own_namespace, vms, redis_server, tmp_path
):
    ns = own_namespace("dep")
    controller = start_controller(
        controlplane.kubeconfig, redis_server.url, tmp_path, [ns.name],
        runtime="Deployment", extra_env={"VMFLEET_WORKER_IMAGE": "vmfleet:e2e"},
    )
    try:
        ns.add_vms(vms[:1], maxConcurrentCommands=3)
        deployment = wait_until(
            lambda: ns.kubectl.get_json("-n", ns.name, "deployment", "vmfleet-worker-vm1"),
            timeout=60, what="the worker Deployment",
        )
        vm = ns.get("rvm", "vm1")
        assert deployment["metadata"]["ownerReferences"][0]["uid"] == vm["metadata"]["uid"]
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["image"] == "vmfleet:e2e"
        args = container["args"]
        assert args[args.index("-Q") + 1] == f"vmfleet.{ns}.vm1"
        assert args[args.index("--concurrency") + 1] == "3"
        assert args[args.index("--pool") + 1] == "threads"
        # Only its VM's Secret, at <mount>/<secret>; no Kubernetes token at all.
        # Only its VM's Secret (and the probe files' in-memory directory).
        assert [v["secret"] for v in pod["volumes"] if "secret" in v] == [
            {"secretName": "vm1-ssh", "defaultMode": 0o440}]
        assert [(m["mountPath"], m.get("readOnly")) for m in container["volumeMounts"]] == [
            ("/var/run/secrets/vmfleet.io/ssh/vm1-ssh", True), ("/run/vmfleet", None)]
        assert pod["automountServiceAccountToken"] is False
        wait_until(lambda: (ns.get("rvm", "vm1").get("status") or {}).get("workers"),
                   timeout=30, what="status.workers")
        workers = ns.get("rvm", "vm1")["status"]["workers"]
        assert workers["runtime"] == "Deployment"
        assert workers["deployment"] == "vmfleet-worker-vm1"

        # Deleting the RemoteVM removes its workers (garbage collection of owned objects).
        ns.k("delete", "rvm", "vm1")
        wait_until(
            lambda: ns.k("get", "deployment", "vmfleet-worker-vm1", check=False).returncode != 0,
            timeout=60, what="the garbage collector to delete the worker Deployment",
        )
        assert_no_tracebacks(tmp_path / "controller.log")
    finally:
        controller.stop(grace=30)


def test_rabbitmq_broker_keeps_the_vm_wide_limit_across_replicas(
    controlplane, own_namespace, rabbitmq_server, redis_server, vms, tmp_path
):
    """With RabbitMQ, ``maxConcurrentCommands`` holds across a VM's worker replicas: the
    slots live in the Redis named by ``VMFLEET_STATE_URL`` (they fell back to one limit per
    replica before, so two replicas ran two commands at once)."""
    ns = own_namespace("rmqslots")
    controller = start_controller(controlplane.kubeconfig, rabbitmq_server.url, tmp_path, [ns.name],
                                  extra_env={"VMFLEET_STATE_URL": redis_server.url})
    vm = vms[0]
    path = f"/tmp/rmq-slots-{ns.name}"
    try:
        ns.add_vms([vm], maxConcurrentCommands=1, workers={"replicas": 2})
        names = [f"slot-{i}" for i in range(4)]
        for name in names:
            ns.run(name, vm=vm.name,
                   command=f"echo start $(date +%s.%N) >> {path}; sleep 1; echo end $(date +%s.%N) >> {path}")
        for name in names:
            assert ns.finished(name, timeout=120)["status"]["phase"] == "Succeeded"
        events = sorted((float(t), kind) for kind, t in
                        (line.split() for line in vm.run(f"cat {path}")[1].decode().splitlines()))
        running = peak = 0
        for _, kind in events:
            running += 1 if kind == "start" else -1
            peak = max(peak, running)
        assert len(events) == 2 * len(names)
        assert peak == 1, f"{peak} commands ran at once on a VM with maxConcurrentCommands 1: {events}"
        assert_no_tracebacks(tmp_path / "workers", tmp_path / "controller.log")
    finally:
        controller.stop(grace=30)
        vm.run(f"rm -f {path}")
