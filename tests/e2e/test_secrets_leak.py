"""Secrets appear in no log, Event, status or metric.

Markers are seeded where secrets live: the passphrase of a VM's encrypted user key, an extra
entry of the key's Secret, the private key's own text, and a wrong passphrase of a second
VM (so that the error paths run too). A marker env value is seeded in a command: env values
are part of the spec (visible in the object by design, see SECURITY.md) but must not be
copied anywhere else. Then every output channel is grepped: the controller's and the
workers' logs, ``kubectl get events -A``, the RemoteCommands' and RemoteVMs' status, and
the controller's and workers' /metrics.
"""

from __future__ import annotations

import json
import re
import textwrap
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.fleet import (
    Kubectl,
    Namespace,
    logs_of,
    start_controller,
    unique_namespace,
)
from vmfleet.dev.manifests import vm_manifests
from vmfleet.dev.proc import free_port, wait_until
from vmfleet.dev.sshd import SshdVM

pytestmark = pytest.mark.e2e

SERVING = re.compile(r"Serving metrics on http://127\.0\.0\.1:(\d+)/metrics")


def http_get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - loopback only
        body: bytes = response.read()
    return body.decode()


@pytest.fixture
def leak_ns(kubectl: Kubectl, crds: None) -> Iterator[Namespace]:
    namespace = Namespace(kubectl, unique_namespace("leak")).create()
    yield namespace
    namespace.delete()


def test_no_secret_reaches_logs_events_status_or_metrics(
    controlplane: Any, redis_server: Any, kubectl: Kubectl, leak_ns: Namespace,
    make_vm: Callable[..., SshdVM], tmp_path: Path,
) -> None:
    tag = uuid.uuid4().hex[:10]
    passphrase = f"marker-pass-{tag}"
    in_secret = f"marker-key-{tag}"
    wrong = f"marker-wrong-{tag}"
    env_value = f"marker-env-{tag}"
    ns = leak_ns

    good = make_vm("locked", key_passphrase=passphrase)
    bad = make_vm("wrongpass", key_passphrase=f"right-{tag}")
    objects = vm_manifests(good, ns.name) + vm_manifests(bad, ns.name)
    for obj in objects:
        if obj["kind"] == "Secret" and obj["metadata"]["name"] == "locked-ssh":
            obj["stringData"]["note"] = in_secret
        if obj["kind"] == "Secret" and obj["metadata"]["name"] == "wrongpass-ssh":
            obj["stringData"]["passphrase"] = wrong
    # A piece of the private key's own text (a base64 line of its body).
    key_lines = [line for line in good.user_private_key_pem.splitlines() if len(line) >= 60]
    key_piece = key_lines[len(key_lines) // 2]
    markers = {"passphrase": passphrase, "secret entry": in_secret, "wrong passphrase": wrong,
               "private key": key_piece}

    controller_port = free_port()
    controller = start_controller(controlplane.kubeconfig, redis_server.url, tmp_path, [ns.name],
                                  extra_env={"VMFLEET_METRICS_PORT": str(controller_port)})
    try:
        kubectl.apply(*objects)
        ns.run("with-env", vm="locked", env={"TOKEN_LIKE": env_value},
               command='test -n "$TOKEN_LIKE" && echo ran')
        ns.run("fails", vm="locked", env={"TOKEN_LIKE": env_value},
               command='test -n "$TOKEN_LIKE" && exit 3')
        ns.run("bad-key", vm="wrongpass", env={"TOKEN_LIKE": env_value}, command="true")
        ok = ns.finished("with-env")["status"]
        assert (ok["phase"], ok["results"][0]["stdout"]) == ("Succeeded", "ran\n"), ok
        assert ns.finished("fails")["status"]["results"][0]["exitCode"] == 3
        bad_result = ns.finished("bad-key")["status"]["results"][0]
        assert bad_result["phase"] == "Failed"
        assert bad_result["reason"] in ("CredentialsInvalid", "AuthFailed"), bad_result

        # Every worker serves /metrics on a port the controller chose; scrape them all.
        def worker_ports() -> list[int] | None:
            controller.check_running()
            ports = []
            for vm in ("locked", "wrongpass"):
                log = tmp_path / "workers" / f"{ns}.{vm}.0.log"
                match = SERVING.search(log.read_text()) if log.exists() else None
                if match is None:
                    return None
                ports.append(int(match.group(1)))
            return ports

        ports = wait_until(worker_ports, timeout=60, what="the workers' metrics endpoints")
        scrapes = {f"metrics :{p}": http_get(f"http://127.0.0.1:{p}/metrics")
                   for p in [controller_port, *ports]}
        assert "vmfleet_commands_total" in "".join(scrapes.values())

        # The VMs' health probes have run too (the wrong passphrase's Warning Event).
        wait_until(lambda: "wrongpass" in kubectl("get", "events", "-n", ns.name).stdout,
                   timeout=60, what="an Event about the VM with the wrong passphrase")

        channels: dict[str, str] = {
            "controller log": logs_of([tmp_path / "controller.log"]),
            "worker logs": logs_of(sorted((tmp_path / "workers").glob("*.log"))),
            "events": kubectl("get", "events", "-A", "-o", "json").stdout,
            **scrapes,
        }
        for kind, name in [("remotecommand", "with-env"), ("remotecommand", "fails"),
                           ("remotecommand", "bad-key"), ("remotevm", "locked"),
                           ("remotevm", "wrongpass")]:
            obj = ns.get(kind, name)
            channels[f"{kind}/{name} status"] = json.dumps(obj.get("status"))
            channels[f"{kind}/{name} metadata"] = json.dumps(obj["metadata"])
        assert len(channels["worker logs"]) > 0 and "Claimed RemoteCommand" in channels["worker logs"]

        for channel, text in channels.items():
            # Annotations copy the spec (kubectl's last-applied, kopf's last-handled): the env
            # value is in the object there too, readable by the same people as the spec.
            seeded = markers if channel.endswith("metadata") else {**markers, "env value": env_value}
            for what, marker in seeded.items():
                assert marker not in text, f"the {what} appears in the {channel}"
        # The env value is where the user put it, and only there.
        assert ns.get("remotecommand", "with-env")["spec"]["env"] == {"TOKEN_LIKE": env_value}
    finally:
        controller.stop(grace=30)
    # Stopped, the logs are complete: still nothing.
    final = logs_of([tmp_path / "controller.log", *sorted((tmp_path / "workers").glob("*.log"))])
    for what, marker in {**markers, "env value": env_value}.items():
        assert marker not in final, f"the {what} appears in a log"


# --------------------------------------------------------------------------- who can read keys

REPO = Path(__file__).resolve().parents[2]


def can_i(kubectl: Kubectl, namespace: str, verb: str, resource: str, *who: str) -> bool:
    proc = kubectl("auth", "can-i", verb, resource, "-n", namespace, *who, check=False)
    return proc.stdout.strip() == "yes"


def test_security_md_team_role_runs_commands_but_reads_no_key(kubectl: Kubectl, leak_ns: Namespace) -> None:
    """The Role in SECURITY.md, applied as written: commands yes, keys and VM changes no."""
    text = (REPO / "SECURITY.md").read_text()
    (block,) = re.findall(r"```yaml\n(.*?)```", text, flags=re.DOTALL)
    manifest = textwrap.dedent(block).replace("namespace: team-a", f"namespace: {leak_ns}")
    kubectl("apply", "-f", "-", input=manifest)
    alice = ("--as=alice", "--as-group=team-a")
    rcmd, rvm = "remotecommands.vmfleet.io", "remotevms.vmfleet.io"
    for verb, resource in [("create", rcmd), ("delete", rcmd), ("watch", rcmd), ("get", rvm),
                           ("list", rvm)]:
        assert can_i(kubectl, leak_ns.name, verb, resource, *alice), (verb, resource)
    for verb, resource in [("get", "secrets"), ("list", "secrets"), ("watch", "secrets"),
                           ("patch", rvm), ("create", rvm), ("patch", f"{rvm}/status"),
                           ("patch", f"{rcmd}/status"), ("create", "pods"),
                           ("create", "deployments.apps"), ("create", "pods/exec")]:
        assert not can_i(kubectl, leak_ns.name, verb, resource, *alice), (verb, resource)
    # Only in the team's namespace.
    assert not can_i(kubectl, "default", "create", rcmd, *alice)


def test_readme_resource_quota_caps_a_teams_remote_commands(kubectl: Kubectl,
                                                            leak_ns: Namespace) -> None:
    """The README's team ResourceQuota, applied as written but for a cap of 2: the API
    server refuses the third RemoteCommand, so no team can pile up objects for the
    controller to hold."""
    text = (REPO / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", text, flags=re.DOTALL)
                if "kind: ResourceQuota" in b]
    quota = yaml.safe_load(block)
    assert quota["spec"]["hard"]["count/remotecommands.vmfleet.io"] == "500"
    quota["metadata"]["namespace"] = leak_ns.name
    quota["spec"]["hard"]["count/remotecommands.vmfleet.io"] = "2"
    kubectl.apply(quota)
    counted = "count/remotecommands.vmfleet.io"
    attempts = iter(range(1000))

    def counting() -> bool:
        used = kubectl.get_json("-n", leak_ns.name, "resourcequota", "vmfleet").get(
            "status", {}).get("used", {})
        if counted in used:
            return True
        # The quota controller learns a new CRD at its next discovery (about every 30 s)
        # and recounts a quota when its spec changes: nudge it until it counts the kind.
        quota["spec"]["hard"]["count/remotevms.vmfleet.io"] = str(100 + next(attempts) % 2)
        kubectl.apply(quota)
        return False

    wait_until(counting, timeout=150, interval=3,
               what="the quota controller to count RemoteCommands")
    for name in ("one", "two"):
        kubectl.apply(leak_ns.command(name, vm="vm1", command="true"))
    proc = kubectl.apply(leak_ns.command("three", vm="vm1", command="true"), check=False)
    assert proc.returncode != 0 and "exceeded quota" in proc.stderr, proc.stderr
    assert "count/remotecommands.vmfleet.io" in proc.stderr


def test_local_default_service_account_has_no_vmfleet_or_secret_rights(
    kubectl: Kubectl, leak_ns: Namespace
) -> None:
    """The local environment's workers run as the developer; a pod of the namespace (its
    default ServiceAccount) may neither read the keys nor create or change commands."""
    sa = f"--as=system:serviceaccount:{leak_ns}:default"
    for verb, resource in [("get", "secrets"), ("list", "secrets"),
                           ("create", "remotecommands.vmfleet.io"),
                           ("patch", "remotecommands.vmfleet.io/status"),
                           ("get", "remotevms.vmfleet.io"), ("patch", "remotevms.vmfleet.io/status"),
                           ("create", "pods")]:
        assert not can_i(kubectl, leak_ns.name, verb, resource, sa), (verb, resource)


def test_a_transfer_never_copies_a_vms_ssh_key(ns: Namespace, make_vm: Callable[..., SshdVM]) -> None:
    """Who may create RemoteCommands (but not read Secrets) cannot copy a VM's key onto a VM
    through the transfer worker, which may read the namespace's Secrets."""
    vm = make_vm("keyholder")
    ns.add_vms([vm])
    ns.run("steal", transfer={"from": {"secretKeyRef": {"name": "keyholder-ssh",
                                                         "key": "ssh-privatekey"}},
                              "to": [{"vm": "keyholder", "path": "/tmp/stolen-key"}]})
    (result,) = ns.finished("steal", timeout=90)["status"]["results"]
    assert (result["phase"], result["reason"]) == ("Failed", "PermissionDenied"), result
    assert "of type kubernetes.io/ssh-auth: vmfleet never copies it" in result["message"]
    assert not vm.host_path("/tmp/stolen-key").exists()
    assert not [p for p in vm.host_path("/tmp").iterdir() if "stolen-key" in p.name]
