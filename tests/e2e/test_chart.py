"""charts/vmfleet against the real API server: rendered output accepted by a server-side dry
run, `helm install` creates every object, and `kubectl auth can-i` shows that the
controller and the workers may do what they need and nothing more."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.fleet import Kubectl
from tests.unit.test_chart import CHART, CI_VALUES, IDS, VALUE_SETS, helm_binary

pytestmark = pytest.mark.e2e

# prometheus-operator's kinds, so that the server accepts ServiceMonitor/PrometheusRule in a
# dry run: stand-ins without a schema (the operator's CRDs cannot be fetched here).
STAND_IN_CRDS = [
    {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.monitoring.coreos.com"},
        "spec": {
            "group": "monitoring.coreos.com",
            "scope": "Namespaced",
            "names": {"plural": plural, "singular": kind.lower(), "kind": kind},
            "versions": [{
                "name": "v1", "served": True, "storage": True,
                "schema": {"openAPIV3Schema": {"type": "object",
                                               "x-kubernetes-preserve-unknown-fields": True}},
            }],
        },
    }
    for plural, kind in (("servicemonitors", "ServiceMonitor"), ("prometheusrules", "PrometheusRule"))
]


class Helm:
    def __init__(self, kubeconfig: Path) -> None:
        self.kubeconfig = str(kubeconfig)

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([helm_binary(), f"--kubeconfig={self.kubeconfig}", *args],
                              capture_output=True, text=True, timeout=300)
        if check and proc.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
        return proc


@pytest.fixture(scope="module")
def helm(controlplane) -> Helm:  # type: ignore[no-untyped-def]
    return Helm(controlplane.kubeconfig)


@pytest.fixture(scope="module")
def monitoring_crds(kubectl: Kubectl, crds: None) -> Iterator[None]:
    kubectl.apply(*STAND_IN_CRDS)
    names = [f"crd/{c['metadata']['name']}" for c in STAND_IN_CRDS]
    kubectl("wait", "--for=condition=Established", *names, "--timeout=60s")
    yield
    kubectl("delete", *names, "--wait=false", check=False)


@pytest.fixture
def namespaces(kubectl: Kubectl) -> Iterator[Any]:
    created: list[str] = []

    def make(*names: str) -> None:
        for name in names:
            # A fixed name (ci values) may still be terminating from an earlier run.
            kubectl("wait", "--for=delete", f"namespace/{name}", "--timeout=120s", check=False,
                    timeout=150)
            kubectl("create", "namespace", name)
            created.append(name)

    yield make
    for name in created:
        kubectl("delete", "namespace", name, "--wait=false", check=False)


def values_args(values: Path | None) -> list[str]:
    return ["-f", str(values)] if values is not None else []


@pytest.mark.parametrize("values", VALUE_SETS, ids=IDS)
def test_rendered_chart_is_accepted_by_a_server_side_dry_run(
    helm, kubectl, monitoring_crds, namespaces, values
):
    release_ns = f"chart-{uuid.uuid4().hex[:6]}"
    spec = yaml.safe_load(values.read_text()) if values is not None else {}
    namespaces(release_ns, *spec.get("watchNamespaces", []))
    rendered = helm("template", "rel", str(CHART), "--namespace", release_ns, "--include-crds",
                    *values_args(values)).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    proc = kubectl("apply", "--dry-run=server", "-f", "-", input=rendered)
    # One line per object: "<kind>/<name> created (server dry run)" or "... configured/unchanged".
    lines = [line for line in proc.stdout.splitlines() if "(server dry run)" in line]
    assert len(lines) == len(docs), proc.stdout


def can_i(kubectl: Kubectl, sa: str, verb: str, resource: str, namespace: str,
          subresource: str | None = None) -> bool:
    args = ["auth", "can-i", verb, resource, f"--as={sa}", "-n", namespace]
    if subresource:
        args.append(f"--subresource={subresource}")
    proc = kubectl(*args, check=False)
    answer = proc.stdout.strip()
    assert answer in ("yes", "no"), f"kubectl {' '.join(args)}: {proc.stdout}{proc.stderr}"
    return answer == "yes"


def test_helm_install_creates_every_object_and_rbac_is_least_privilege(
    helm, kubectl, crds, namespaces
):
    ns = f"chart-{uuid.uuid4().hex[:6]}"
    other = f"chart-other-{uuid.uuid4().hex[:6]}"
    namespaces(ns, other)
    release = f"r{uuid.uuid4().hex[:5]}"
    try:
        helm("install", release, str(CHART), "--namespace", ns)
        manifest = [d for d in yaml.safe_load_all(helm("get", "manifest", release, "-n", ns).stdout) if d]
        assert len(manifest) == 19  # no worker ServiceAccount, Role or RoleBinding
        for doc in manifest:
            kind, name = doc["kind"], doc["metadata"]["name"]
            args = ["get", kind, name, "-o", "name"]
            if doc["metadata"].get("namespace"):
                args += ["-n", doc["metadata"]["namespace"]]
            assert kubectl(*args).stdout.strip().lower().endswith(f"/{name}"), (kind, name)
        status = helm("status", release, "-n", ns, "-o", "yaml").stdout
        assert yaml.safe_load(status)["info"]["status"] == "deployed"
        # The CRDs are the chart's (already present from the session; helm leaves them).
        kubectl("get", "crd", "remotevms.vmfleet.io", "remotecommands.vmfleet.io")

        controller = f"system:serviceaccount:{ns}:{release}-vmfleet-controller"
        worker = f"system:serviceaccount:{ns}:{release}-vmfleet-worker"
        transfer = f"system:serviceaccount:{ns}:{release}-vmfleet-transfer-worker"
        rvm, rcmd = "remotevms.vmfleet.io", "remotecommands.vmfleet.io"

        # The controller: vmfleet objects, their status, worker Deployments, Events — in its
        # namespace only; no Secrets, no pods.
        for verb, resource, sub in [
            ("watch", rvm, None), ("list", rcmd, None), ("patch", rcmd, None),
            ("patch", rcmd, "status"), ("patch", rvm, "status"),
            ("create", "deployments.apps", None), ("patch", "deployments.apps", None),
            ("delete", "deployments.apps", None), ("create", "events", None),
            ("delete", rcmd, None),
        ]:
            assert can_i(kubectl, controller, verb, resource, ns, sub), (verb, resource, sub)
        for verb, resource, namespace in [
            ("get", "secrets", ns), ("list", "secrets", ns), ("create", "pods", ns),
            ("create", "pods/exec", ns), ("list", rvm, other), ("create", "deployments.apps", other),
            ("create", rcmd, ns), ("delete", "namespaces", ns), ("create", "roles.rbac.authorization.k8s.io", ns),
        ]:
            assert not can_i(kubectl, controller, verb, resource, namespace), (verb, resource, namespace)
        assert can_i(kubectl, controller, "list", "customresourcedefinitions.apiextensions.k8s.io", ns)
        assert can_i(kubectl, controller, "watch", "namespaces", ns)  # kopf observes them
        assert not can_i(kubectl, controller, "create", "customresourcedefinitions.apiextensions.k8s.io", ns)

        # Workers get no ServiceAccount, Role or token at all: the chart creates none.
        accounts = kubectl("get", "serviceaccount", "-n", ns, "-o", "name").stdout.split()
        assert f"serviceaccount/{release}-vmfleet-worker" not in accounts
        roles = kubectl("get", "role", "-n", ns, "-o", "name").stdout.split()
        assert not [r for r in roles if r.endswith("-vmfleet-worker")], roles

        # The transfer worker reads VMs' keys (both ends of a copy): get, never list.
        assert can_i(kubectl, transfer, "get", "secrets", ns)
        assert can_i(kubectl, transfer, "get", "configmaps", ns)
        assert not can_i(kubectl, transfer, "list", "secrets", ns)
        assert not can_i(kubectl, transfer, "get", "secrets", other)
        assert not can_i(kubectl, transfer, "create", "pods", ns)
        assert not can_i(kubectl, transfer, "patch", rcmd, ns, "status")  # it only reports
        assert not can_i(kubectl, transfer, "get", rcmd, ns)
    finally:
        helm("uninstall", release, "--namespace", ns, check=False)
    assert not kubectl("get", "clusterrole", "-l", f"app.kubernetes.io/instance={release}",
                       "-o", "name").stdout.strip()
    assert not kubectl("get", "deployment,role,serviceaccount", "-n", ns, "-l",
                       f"app.kubernetes.io/instance={release}", "-o", "name").stdout.strip()


def test_cluster_wide_controller_and_per_namespace_workers(helm, kubectl, crds, namespaces):
    values = next(p for p in CI_VALUES if p.name == "clusterwide-values.yaml")
    suffix = uuid.uuid4().hex[:6]
    ns = f"chart-{suffix}"
    spec = {"watchNamespaces": [f"chart-a-{suffix}", f"chart-b-{suffix}"]}
    namespaces(ns, *spec["watchNamespaces"])
    release = f"r{uuid.uuid4().hex[:5]}"
    try:
        helm("install", release, str(CHART), "--namespace", ns, "-f", str(values),
             "--set", f"watchNamespaces={{{','.join(spec['watchNamespaces'])}}}")
        controller = f"system:serviceaccount:{ns}:{release}-vmfleet-controller"
        for namespace in (ns, "default", *spec["watchNamespaces"]):
            assert can_i(kubectl, controller, "watch", "remotevms.vmfleet.io", namespace)
            assert can_i(kubectl, controller, "create", "deployments.apps", namespace)
            assert not can_i(kubectl, controller, "get", "secrets", namespace)
        assert can_i(kubectl, controller, "list", "namespaces", ns)
        for namespace in spec["watchNamespaces"]:
            accounts = kubectl("get", "serviceaccount", "-n", namespace, "-o", "name").stdout.split()
            assert f"serviceaccount/{release}-vmfleet-worker" not in accounts  # workers: no token
            transfer = f"system:serviceaccount:{ns}:{release}-vmfleet-transfer-worker"
            args = ["auth", "can-i", "get", "secrets/vm1-ssh", f"--as={transfer}", "-n", namespace]
            assert kubectl(*args, check=False).stdout.strip() == "yes"
            args[3] = "secrets/someone-elses"
            assert kubectl(*args, check=False).stdout.strip() == "no"
    finally:
        helm("uninstall", release, "--namespace", ns, check=False)


def service_account_kubeconfig(kubectl: Kubectl, admin: Path, namespace: str, account: str,
                               path: Path) -> Path:
    """A kubeconfig that authenticates as a ServiceAccount (a token from the TokenRequest API)."""
    token = kubectl("create", "token", account, "-n", namespace, "--duration=1h").stdout.strip()
    config = yaml.safe_load(admin.read_text())
    config["users"] = [{"name": account, "user": {"token": token}}]
    for context in config["contexts"]:
        context["context"]["user"] = account
    path.write_text(yaml.safe_dump(config))
    return path


def test_controller_and_worker_run_a_command_with_nothing_but_the_charts_rbac(
    helm, kubectl, controlplane, namespaces, redis_server, vms, tmp_path
):
    """Not only can-i: the real controller, authenticated as its ServiceAccount, and a real
    worker with no Kubernetes credentials at all take a RemoteCommand from creation to
    Succeeded. The worker has its VM's key as a mounted file (as in its Deployment)."""
    from tests.e2e.fleet import Namespace, assert_no_tracebacks, start_controller
    from vmfleet.dev.manifests import vm_manifests
    from vmfleet.dev.proc import ManagedProcess, wait_until

    ns_name = f"chart-run-{uuid.uuid4().hex[:6]}"
    namespaces(ns_name)
    ns = Namespace(kubectl, ns_name)
    release = f"r{uuid.uuid4().hex[:5]}"
    controller = worker = None
    try:
        helm("install", release, str(CHART), "--namespace", ns_name,
             "--set", "transferWorker.enabled=false")
        controller_kc = service_account_kubeconfig(
            kubectl, controlplane.kubeconfig, ns_name, f"{release}-vmfleet-controller",
            tmp_path / "controller.kubeconfig")
        controller = start_controller(
            controller_kc, redis_server.url, tmp_path, [ns_name], runtime="Deployment",
            extra_env={"VMFLEET_WORKER_IMAGE": "vmfleet:0.1.0",
                       "VMFLEET_WATCH_NAMESPACES": ns_name})
        vm = vms[0]
        kubectl.apply(*vm_manifests(vm, ns_name))
        deployment = wait_until(
            lambda: kubectl.get_json("-n", ns_name, "deployment", "vmfleet-worker-vm1"),
            timeout=60, what="the worker Deployment made by the controller")
        pod = deployment["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False
        assert "serviceAccountName" not in pod
        mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        secret = vm_manifests(vm, ns_name)[0]["metadata"]["name"]
        # Its VM's Secret, and the probe files' memory emptyDir: nothing else.
        assert mounts == {f"/var/run/secrets/vmfleet.io/ssh/{secret}", "/run/vmfleet"}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["probes"] == {"name": "probes",
                                     "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}}

        # The worker as its Deployment would run it: the Secret's files mounted, no
        # kubeconfig, no token, no API server address.
        key_dir = tmp_path / "ssh"
        (key_dir / secret).mkdir(parents=True, mode=0o700)
        (key_dir / secret / "ssh-privatekey").write_text(vm.user_private_key_pem)
        import os
        import sys

        from tests.e2e.fleet import REPO

        env = {k: v for k, v in os.environ.items()
               if k not in ("KUBERNETES_SERVICE_HOST", "KUBECONFIG")}
        env.update(KUBECONFIG=str(tmp_path / "no-such-kubeconfig"),
                   VMFLEET_BROKER_URL=redis_server.url, HOME=str(tmp_path),
                   VMFLEET_CREDENTIALS_DIR=str(key_dir), VMFLEET_METRICS_PORT="0",
                   PYTHONUNBUFFERED="1")
        container = pod["containers"][0]
        worker = ManagedProcess("worker", [sys.executable, "-m", *container["args"]],
                                tmp_path / "worker.log", env=env, cwd=REPO).start()

        ns.run("hello", vm="vm1", argv=["echo", "via the chart's RBAC"])
        obj = wait_until(
            lambda: (o := ns.get("rcmd", "hello")).get("status", {}).get("phase") in
            ("Succeeded", "Failed") and o,
            timeout=90, interval=0.5, what="the RemoteCommand to finish")
        (result,) = obj["status"]["results"]
        assert obj["status"]["phase"] == "Succeeded", result
        assert result["stdout"] == "via the chart's RBAC\n"
        logs = (tmp_path / "controller.log").read_text() + (tmp_path / "worker.log").read_text()
        assert "Forbidden" not in logs and " 403" not in logs
        assert_no_tracebacks(tmp_path / "controller.log", tmp_path / "worker.log")
    finally:
        if worker is not None:
            worker.stop(grace=15)
        if controller is not None:
            controller.stop(grace=30)
        helm("uninstall", release, "--namespace", ns_name, check=False)
