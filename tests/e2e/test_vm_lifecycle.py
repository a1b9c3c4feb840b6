"""RemoteVM lifecycle end to end: health as status, trust on first use, bastions,
backlog-driven worker scaling to zero, and the VM-wide concurrency limit.

Real kube-apiserver + etcd, real OpenSSH sshd VMs, real Redis, the real controller
(Process runtime) and its Celery workers, real kubectl.
"""

from __future__ import annotations

import base64
import hashlib
import os
import time
from pathlib import Path

import pytest

from tests.e2e.fleet import Namespace, assert_no_tracebacks, start_controller, unique_namespace
from vmfleet.dev.manifests import vm_manifests
from vmfleet.dev.proc import wait_until

pytestmark = pytest.mark.e2e

FAST_HEALTH = {"periodSeconds": 5, "timeoutSeconds": 3}


def status_of(ns: Namespace, vm: str) -> dict:
    return ns.get("rvm", vm).get("status") or {}


def condition(ns: Namespace, vm: str, type_: str) -> dict:
    for cond in status_of(ns, vm).get("conditions") or []:
        if cond["type"] == type_:
            return cond
    return {}


def warning_events(ns: Namespace, vm: str, reason: str) -> list[dict]:
    events = ns.kubectl.get_json("-n", ns.name, "events",
                                 f"--field-selector=involvedObject.name={vm},reason={reason}")
    return [e for e in events["items"] if e["type"] == "Warning"]


def all_finished(ns: Namespace, prefix: str, count: int, timeout: float) -> list[dict]:
    """Wait (one list per poll) until ``count`` RemoteCommands named ``prefix*`` finished."""

    def finished() -> list[dict] | None:
        items = [o for o in ns.kubectl.get_json("-n", ns.name, "rcmd")["items"]
                 if o["metadata"]["name"].startswith(prefix)]
        done = [o for o in items if (o.get("status") or {}).get("phase") in
                ("Succeeded", "Failed", "Cancelled")]
        return done if len(done) == count else None

    return wait_until(finished, timeout=timeout, interval=1, what=f"{count} {prefix}* commands")


def fingerprint(public_key_line: str) -> str:
    blob = base64.b64decode(public_key_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def worker_pids(queue: str) -> list[int]:
    """Worker processes (``python -m remote_tasks.worker``) serving ``queue``, as the
    machine's process table shows them."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"remote_tasks.worker" in argv and queue.encode() in argv:
            pids.append(int(entry))
    return pids


# --------------------------------------------------------------------------- health


def test_facts_match_the_vm_conditions_flip_and_a_hung_probe_times_out(ns: Namespace, make_vm, controller_dir):
    vm = make_vm("health")
    ns.add_vms([vm], healthCheck=FAST_HEALTH)
    ns.wait("rvm/health", "Ready", timeout=60)

    facts = status_of(ns, "health")["facts"]
    assert facts["hostname"] == vm.run("hostname")[1].decode().strip()
    assert facts["kernel"] == vm.run("uname -sr")[1].decode().strip()
    meminfo = dict(line.split(":", 1) for line in vm.run("cat /proc/meminfo")[1].decode().splitlines())
    assert facts["memoryTotalBytes"] == int(meminfo["MemTotal"].split()[0]) * 1024
    df = vm.run("df -P -k /")[1].decode().splitlines()[-1].split()
    assert facts["rootDiskTotalBytes"] == int(df[1]) * 1024
    assert abs(facts["rootDiskUsedBytes"] - int(df[2]) * 1024) < 512 * 1024 * 1024
    pretty = vm.run(". /etc/os-release && echo \"$PRETTY_NAME\"")[1].decode().strip()
    assert facts["os"] == pretty
    uptime = float(vm.run("cut -d' ' -f1 /proc/uptime")[1])
    assert uptime - 30 < facts["uptimeSeconds"] <= uptime
    loads = [float(x) for x in vm.run("cat /proc/loadavg")[1].split()[:3]]
    assert all(abs(a - b) < 5 for a, b in zip(loads, (facts["load1"], facts["load5"], facts["load15"]), strict=True))
    assert 0 < facts["probeLatencySeconds"] < FAST_HEALTH["timeoutSeconds"]
    conditions = {c["type"]: c["status"] for c in status_of(ns, "health")["conditions"]}
    assert conditions == {"Reachable": "True", "HostKeyVerified": "True", "DiskPressure": "False",
                          "MemoryPressure": "False", "WorkersReady": "True", "Ready": "True"}

    # kubectl get rvm: READY, HOSTNAME, LOAD, AGE filled from status.
    header, row = ns.k("get", "rvm", "health").stdout.strip().splitlines()
    assert header.split() == ["NAME", "HOST", "READY", "HOSTNAME", "LOAD", "AGE"]
    assert row.split()[:4] == ["health", vm.host, "True", facts["hostname"]]
    float(row.split()[4])

    # The sshd stops: Reachable and Ready turn False, with a Warning Event.
    vm.stop()
    ns.wait("rvm/health", "Reachable=False", timeout=60)
    reachable = condition(ns, "health", "Reachable")
    assert reachable["reason"] == "TransportError"
    assert vm.host in reachable["message"]
    assert condition(ns, "health", "Ready")["status"] == "False"
    assert condition(ns, "health", "HostKeyVerified")["status"] == "True"  # unchanged
    assert warning_events(ns, "health", "Unreachable")

    # It returns: Ready again.
    vm.start()
    ns.wait("rvm/health", "Ready", timeout=60)
    assert_no_tracebacks(controller_dir / "workers", controller_dir / "controller.log")
    if vm.isolated:
        hung_probe_times_out(ns, vm, "health")


def hung_probe_times_out(ns: Namespace, vm, name: str) -> None:
    """A probe that never returns ends as Timeout; the worker goes on running commands."""
    # A hung filesystem: df never returns, on this VM only (its own mount namespace).
    hang = vm.host_path("/tmp/hung-df")
    hang.write_text("#!/bin/sh\nexec sleep 3600\n")
    hang.chmod(0o755)
    assert vm.run("mount --bind /tmp/hung-df /usr/bin/df")[0] == 0
    try:
        ns.wait("rvm/" + name, "Reachable=False", timeout=60)
        reachable = condition(ns, name, "Reachable")
        assert reachable["reason"] == "Timeout"
        assert "within 3s" in reachable["message"]
        probe = status_of(ns, name)["lastProbe"]
        assert FAST_HEALTH["timeoutSeconds"] <= probe["latencySeconds"] < FAST_HEALTH["timeoutSeconds"] + 2.5

        # The worker is not stuck: it still runs commands on the VM.
        ns.run("still-works", vm=name, command="echo alive")
        obj = ns.finished("still-works", timeout=60)
        assert obj["status"]["results"][0]["stdout"] == "alive\n"
    finally:
        vm.run("umount /usr/bin/df")
    ns.wait("rvm/" + name, "Ready", timeout=60)
    # The remote side of the hung probe was killed too (timeout -s KILL on the VM).
    wait_until(lambda: b"sleep 3600" not in vm.run("ps -eo args")[1], timeout=30,
               what="the hung df to be killed on the VM")


# --------------------------------------------------------------------------- host keys


def test_trust_on_first_use_records_then_refuses_a_new_key(ns: Namespace, make_vm, controller_dir):
    vm = make_vm("tofu")
    secret, rvm = vm_manifests(vm, ns.name, hostKeyPolicy="TrustOnFirstUse", healthCheck=FAST_HEALTH)
    del rvm["spec"]["hostKeys"]
    ns.kubectl.apply(secret, rvm)

    first_key = vm.host_public_keys[0]
    recorded = wait_until(lambda: status_of(ns, "tofu").get("hostKey", {}).get("publicKey"),
                          timeout=60, what="the host key recorded on first use")
    assert recorded == first_key
    host_key = status_of(ns, "tofu")["hostKey"]
    assert host_key["fingerprint"] == fingerprint(first_key)
    assert host_key["keyType"] == "ssh-ed25519"
    ns.wait("rvm/tofu", "HostKeyVerified", timeout=60)
    ns.run("before", vm="tofu", command="hostname")
    assert ns.finished("before")["status"]["phase"] == "Succeeded"

    # The VM comes back with another key: refused, recorded key kept, VM paused, Event.
    vm.regenerate_host_key()
    vm.restart()
    new_key = vm.host_public_keys[0]
    ns.wait("rvm/tofu", "HostKeyVerified=False", timeout=60)
    verified = condition(ns, "tofu", "HostKeyVerified")
    assert verified["reason"] == "HostKeyMismatch"
    assert fingerprint(new_key) in verified["message"]
    obj = ns.get("rvm", "tofu")
    assert obj["status"]["hostKey"]["publicKey"] == first_key
    wait_until(lambda: ns.get("rvm", "tofu")["spec"].get("paused") is True, timeout=30,
               what="the VM to be paused")
    assert ns.get("rvm", "tofu")["metadata"]["annotations"]["vmfleet.io/paused-by"] == "HostKeyMismatch"
    (event,) = warning_events(ns, "tofu", "HostKeyMismatch")
    assert fingerprint(new_key) in event["message"]

    # Paused: a new command is not dispatched.
    ns.run("while-paused", vm="tofu", command="echo should-not-run")
    with pytest.raises(TimeoutError):
        wait_until(lambda: ns.get("rcmd", "while-paused").get("status", {}).get("phase")
                   not in (None, "Pending"), timeout=6, what="a dispatch")
    # Unpaused by a person without trusting the new key: the command is refused.
    ns.k("patch", "rvm", "tofu", "--type=merge", "-p", '{"spec":{"paused":false}}')
    result = ns.finished("while-paused", timeout=60)["status"]["results"][0]
    assert result["reason"] == "HostKeyMismatch"
    assert "should-not-run" not in (result.get("stdout") or "")
    assert_no_tracebacks(controller_dir / "controller.log")


def test_credentials_with_a_passphrase_and_a_missing_or_malformed_secret(ns: Namespace, make_vm):
    vm = make_vm("phrase", key_passphrase="correct horse battery")
    secret, rvm = vm_manifests(vm, ns.name, healthCheck=FAST_HEALTH)
    assert "passphrase" in secret["stringData"]
    _, broken = vm_manifests(vm, ns.name, healthCheck=FAST_HEALTH)
    broken["metadata"]["name"] = "no-secret"
    broken["spec"]["credentialsSecretRef"] = {"name": "no-such-secret"}
    ns.kubectl.apply(secret, rvm, broken)
    ns.wait("rvm/phrase", "Ready", timeout=60)

    ns.wait("rvm/no-secret", "Reachable=False", timeout=60)
    reachable = condition(ns, "no-secret", "Reachable")
    assert reachable["reason"] == "CredentialsInvalid"
    assert "cannot read Secret" in reachable["message"] and "no-such-secret" in reachable["message"]

    # The Secret appears, but holds no key: a clear message again, never a crash loop.
    ns.kubectl.apply({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/ssh-auth",
                      "metadata": {"name": "no-such-secret", "namespace": ns.name},
                      "stringData": {"ssh-privatekey": "not a key"}})
    wait_until(lambda: "not a private key" in condition(ns, "no-secret", "Reachable").get("message", ""),
               timeout=60, what="the malformed key reported")
    assert condition(ns, "no-secret", "Reachable")["reason"] == "CredentialsInvalid"
    assert condition(ns, "phrase", "Ready")["status"] == "True"


# --------------------------------------------------------------------------- bastion


def test_a_command_through_a_bastion(ns: Namespace, make_vm):
    bastion, inner = make_vm("bastion"), make_vm("inner")
    inner_host = inner.host
    if bastion.isolated:
        # A name only the bastion can resolve (its own /etc/hosts): the worker cannot reach
        # the inner VM except through the bastion.
        hosts = bastion.host_path("/tmp/hosts")
        hosts.write_text(f"127.0.0.1 localhost\n{inner.host} inner.vmfleet-e2e.internal\n")
        assert bastion.run("mount --bind /tmp/hosts /etc/hosts")[0] == 0
        inner_host = "inner.vmfleet-e2e.internal"
    ns.add_vms([bastion], workers={"replicas": 0})  # reached through, never run on
    secret, rvm = vm_manifests(inner, ns.name, proxyJump={"vm": "bastion"})
    rvm["spec"]["host"] = inner_host
    ns.kubectl.apply(secret, rvm)

    ns.run("via-bastion", vm="inner", command="hostname")
    obj = ns.finished("via-bastion", timeout=60)
    result = obj["status"]["results"][0]
    assert (obj["status"]["phase"], result["exitCode"]) == ("Succeeded", 0), result
    assert result["stdout"] == inner.run("hostname")[1].decode()

    # A bastion whose pinned key is wrong is refused, and so is every VM behind it.
    secret, bad = vm_manifests(bastion, ns.name, healthCheck=FAST_HEALTH)
    bad["metadata"]["name"] = "bad-bastion"
    bad["spec"]["hostKeys"] = inner.host_public_keys  # not the bastion's key
    bad["spec"]["workers"] = {"replicas": 0}
    secret2, behind = vm_manifests(inner, ns.name, proxyJump={"vm": "bad-bastion"},
                                   healthCheck=FAST_HEALTH)
    behind["metadata"]["name"] = "behind-bad"
    behind["spec"]["host"] = inner_host
    ns.kubectl.apply(bad, behind)
    ns.wait("rvm/behind-bad", "Reachable=False", timeout=60)
    reachable = condition(ns, "behind-bad", "Reachable")
    assert reachable["reason"] == "HostKeyMismatch"
    assert bastion.host in reachable["message"]


# --------------------------------------------------------------------------- scaling


def test_autoscale_to_zero_and_back(ns: Namespace, make_vm, controller_dir):
    vm = make_vm("scale")
    ns.add_vms([vm], maxConcurrentCommands=4, workers={"autoscale": {
        "minReplicas": 0, "maxReplicas": 3, "targetBacklogPerReplica": 4,
        "scaleDownDelaySeconds": 3}})
    queue = f"vmfleet.{ns}.scale"
    wait_until(lambda: status_of(ns, "scale").get("workers", {}).get("replicas") == 0,
               timeout=30, what="status.workers.replicas 0")
    assert worker_pids(queue) == []

    # 50 queued commands: up to 3 workers.
    ns.kubectl.apply(*[ns.command(f"job-{i}", vm="scale", command="sleep 0.5; echo done")
                       for i in range(50)])
    most = 0

    def three_workers() -> bool:
        nonlocal most
        most = max(most, len(worker_pids(queue)))
        return most == 3

    wait_until(three_workers, timeout=90, interval=0.5, what="3 worker processes")
    assert status_of(ns, "scale")["workers"]["replicas"] == 3
    done = all_finished(ns, "job-", 50, timeout=120)
    assert {o["status"]["phase"] for o in done} == {"Succeeded"}
    assert len(worker_pids(queue)) <= 3

    # Drained: back to zero after the delay.
    wait_until(lambda: not worker_pids(queue), timeout=60, what="the workers to stop")
    assert status_of(ns, "scale")["workers"]["replicas"] == 0

    # The first command after idle wakes a worker and completes.
    started = time.monotonic()
    ns.run("after-idle", vm="scale", command="echo woke")
    obj = ns.finished("after-idle", timeout=60)
    assert obj["status"]["results"][0]["stdout"] == "woke\n"
    woke_in = time.monotonic() - started
    assert woke_in < 30, woke_in
    assert_no_tracebacks(controller_dir / "controller.log")


def test_deployment_runtime_scales_the_deployment_to_zero_and_wakes_it(
    controlplane, kubectl, crds, make_vm, redis_server, tmp_path
):
    ns = Namespace(kubectl, unique_namespace("scaledep")).create()
    controller = start_controller(
        controlplane.kubeconfig, redis_server.url, tmp_path, [ns.name],
        runtime="Deployment", extra_env={"VMFLEET_WORKER_IMAGE": "vmfleet:e2e"},
    )
    try:
        vm = make_vm("scaledep")
        ns.add_vms([vm], workers={"autoscale": {"minReplicas": 0, "maxReplicas": 3,
                                                "scaleDownDelaySeconds": 3}})

        def replicas() -> int | None:
            proc = ns.k("get", "deployment", "vmfleet-worker-scaledep", "-o",
                        "jsonpath={.spec.replicas}", check=False)
            return int(proc.stdout) if proc.returncode == 0 and proc.stdout else None

        wait_until(lambda: replicas() == 0, timeout=60, what="a Deployment with 0 replicas")
        # No pod can start here (no kubelet): the dispatch alone must wake the Deployment.
        ns.run("wake", vm="scaledep", command="true")
        wait_until(lambda: replicas() == 1, timeout=30, what="the Deployment woken to 1 replica")
        assert_no_tracebacks(tmp_path / "controller.log")
    finally:
        controller.stop(grace=30)
        ns.delete()


# --------------------------------------------------------------------------- concurrency


def test_max_concurrent_commands_holds_across_replicas(ns: Namespace, make_vm, controller_dir):
    vm = make_vm("conc")
    ns.add_vms([vm], maxConcurrentCommands=2, workers={"replicas": 3})
    queue = f"vmfleet.{ns}.conc"
    wait_until(lambda: len(worker_pids(queue)) == 3, timeout=60, what="3 worker processes")
    # Each command records when it started and ended, on the VM.
    script = ("s=$(date +%s.%N); sleep 1.5; e=$(date +%s.%N); "
              "echo \"$s $e\" >> /tmp/vmfleet-conc.log")
    ns.kubectl.apply(*[ns.command(f"c-{i}", vm="conc", command=script) for i in range(8)])
    done = all_finished(ns, "c-", 8, timeout=120)
    assert {o["status"]["phase"] for o in done} == {"Succeeded"}
    workers = {o["status"]["results"][0]["worker"] for o in done}
    spans = [tuple(map(float, line.split()))
             for line in vm.run("cat /tmp/vmfleet-conc.log")[1].decode().splitlines()]
    assert len(spans) == 8
    points = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans],
                    key=lambda p: (p[0], p[1]))
    running = most = 0
    for _, step in points:
        running += step
        most = max(most, running)
    assert most == 2, f"{most} commands ran at once on the VM"
    assert len(workers) >= 2, workers  # the replicas shared the work
    assert_no_tracebacks(controller_dir / "workers", controller_dir / "controller.log")


def test_a_dead_workers_slot_expires(redis_server):
    """The VM-wide semaphore on real Redis: a lease nobody renews (its worker died) frees
    its slot by itself; a live holder keeps it by renewing."""
    from remote_tasks.slots import VMSlots, slots_key

    slots = VMSlots(redis_server.url, lease_seconds=1.5)
    key = slots_key("e2e-slots", "vm1")
    slots.client.delete(key)
    assert slots.try_acquire(key, "dead-worker", 2)
    assert slots.try_acquire(key, "live-worker", 2)
    assert not slots.try_acquire(key, "waiting", 2)
    assert slots.held(key) == 2

    def renewed_and_acquired() -> bool:
        assert slots.renew(key, "live-worker")  # the live holder keeps renewing
        return slots.try_acquire(key, "waiting", 2)

    started = time.monotonic()
    wait_until(renewed_and_acquired, timeout=10, interval=0.3, what="the dead lease to expire")
    assert 1.0 < time.monotonic() - started < 8  # 1.5 s lease; slack for a loaded machine
    assert not slots.renew(key, "dead-worker")  # gone for good
    slots.release(key, "waiting")
    slots.release(key, "live-worker")
    assert slots.held(key) == 0


def test_held_slots_are_renewed_by_one_thread(redis_server, monkeypatch):
    """Leases held past their lease time stay held (renewed), all by one renewal thread
    of the process, and are freed when their commands end."""
    import threading

    import remote_tasks.slots as slots_module
    from remote_tasks.slots import VMSlots, slots_key

    monkeypatch.setattr(slots_module, "RENEW_SECONDS", 0.3)
    slots = VMSlots(redis_server.url, lease_seconds=1.0)
    key = slots_key("e2e-slots", "vm2")
    slots.client.delete(key)
    with slots.slot(key, 2, "w"), slots.slot(key, 2, "w"):
        time.sleep(2.5)  # two and a half lease times
        assert slots.held(key) == 2
        assert not slots.try_acquire(key, "waiting", 2)
        renewers = [t for t in threading.enumerate() if t.name == "vmfleet-slot-renew"]
        assert len(renewers) == 1, renewers
    assert slots.held(key) == 0
    assert slots.try_acquire(key, "waiting", 2)
    slots.release(key, "waiting")


@pytest.mark.parametrize("broker", ["redis_server", "rabbitmq_server"])
def test_queue_depth_through_kombu(broker, request):
    """The autoscaler's queue depth: the same kombu call for Redis and RabbitMQ."""
    from celery import Celery

    from vmfleet.celeryconf import celery_config
    from vmfleet.queues import QueueDepth

    server = request.getfixturevalue(broker)
    # Redis: kombu's unprefixed keys need a user beyond the controller's (vmfleet* only).
    url = getattr(server, "admin_url", server.url)
    queue = unique_namespace("vmfleet.e2e-depth")
    depth = QueueDepth(url)
    app = Celery("e2e-depth", set_as_current=False)
    conf = celery_config(url)
    # kombu's own keys, no namespace prefix: on Redis the product reads its queues under
    # their namespace's prefix (vmfleet.tenancy.queue_key), on RabbitMQ through this call.
    conf["broker_transport_options"].pop("global_keyprefix", None)
    app.conf.update(conf)
    try:
        assert depth(queue) == 0  # nobody declared it yet
        for i in range(3):
            app.send_task("remote_tasks.nothing", args=[i], queue=queue)
        wait_until(lambda: depth(queue) == 3, timeout=10, what="a depth of 3")
    finally:
        app.close()
        depth.close()
