"""charts/vmfleet against the real API server: rendered output accepted by a server-side dry
run, `helm install` creates every object, and `kubectl auth can-i` shows that the
controller and the workers may do what they need and nothing more."""

from __future__ import annotations

import base64
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.chart import CHART, CI_VALUES, IDS, VALUE_SETS, helm_binary
from tests.e2e.fleet import Kubectl

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
        # No worker ServiceAccount, Role or RoleBinding; no transfer worker Deployment (the
        # controller runs one per namespace); the controller's admission fence.
        assert len(manifest) == 29  # with both admission policies (the API server serves them)
        kinds = {d["kind"] for d in manifest}
        assert {"ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"} <= kinds
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
        transfer = f"system:serviceaccount:{ns}:{release}-vmfleet-transfer-worker"
        rvm, rcmd = "remotevms.vmfleet.io", "remotecommands.vmfleet.io"

        # The controller: vmfleet objects, their status, worker Deployments, Events — in its
        # namespace only; no Secrets, no pods.
        for verb, resource, sub in [
            ("watch", rvm, None), ("list", rcmd, None), ("patch", rcmd, None),
            ("patch", rcmd, "status"), ("patch", rvm, "status"),
            ("create", "deployments.apps", None), ("patch", "deployments.apps", None),
            ("watch", "deployments.apps", None), ("create", "events", None),
            ("delete", rcmd, None),
            # RemoteCronCommands create their runs; templates and their ConfigMaps are read.
            ("create", rcmd, None), ("watch", "remotecroncommands.vmfleet.io", None),
            ("patch", "remotecroncommands.vmfleet.io", "status"),
            ("get", "remotecommandtemplates.vmfleet.io", None), ("get", "configmaps", None),
        ]:
            assert can_i(kubectl, controller, verb, resource, ns, sub), (verb, resource, sub)
        # Verbs the code never uses are gone: Deployments are applied server-side and
        # garbage collected with their RemoteVMs; Events are created, never changed.
        for verb, resource, namespace in [
            ("get", "secrets", ns), ("list", "secrets", ns), ("create", "pods", ns),
            ("create", "pods/exec", ns), ("list", rvm, other), ("create", "deployments.apps", other),
            ("create", rcmd, other), ("list", "configmaps", ns),
            ("patch", "remotecroncommands.vmfleet.io", ns),
            ("delete", "namespaces", ns), ("create", "roles.rbac.authorization.k8s.io", ns),
            ("delete", "deployments.apps", ns), ("update", "deployments.apps", ns),
            ("get", "deployments.apps", ns), ("update", rvm, ns), ("update", rcmd, ns),
            ("patch", "events", ns), ("create", "events.events.k8s.io", ns),
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

        # The namespace's transfer worker: sources from Secrets and ConfigMaps of its own
        # namespace, get, never list (its VMs' keys are mounted by the kubelet).
        assert can_i(kubectl, transfer, "get", "secrets", ns)
        assert can_i(kubectl, transfer, "get", "configmaps", ns)
        assert not can_i(kubectl, transfer, "list", "secrets", ns)
        assert not can_i(kubectl, transfer, "get", "secrets", other)
        assert not can_i(kubectl, transfer, "create", "pods", ns)
        assert not can_i(kubectl, transfer, "patch", rcmd, ns, "status")  # it only reports
        assert not can_i(kubectl, transfer, "get", rcmd, ns)

        # The broker's generated credentials survive `helm upgrade` (lookup), and its
        # NetworkPolicy is accepted by the API server.
        def broker_secrets() -> dict[str, Any]:
            return {name: kubectl.get_json("-n", ns, "secret", f"{release}-vmfleet-{name}")["data"]
                    for name in ("broker", "broker-controller", "broker-transfers", "broker-acl")}

        before = broker_secrets()
        helm("upgrade", release, str(CHART), "--namespace", ns)
        assert broker_secrets() == before
        kubectl("get", "networkpolicy", f"{release}-vmfleet-broker", "-n", ns)
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
        for namespace in (ns, "default", "kube-system", *spec["watchNamespaces"]):
            assert can_i(kubectl, controller, "watch", "remotevms.vmfleet.io", namespace)
            assert can_i(kubectl, controller, "watch", "deployments.apps", namespace)
            assert not can_i(kubectl, controller, "get", "secrets", namespace)
            # Workers run only where the chart put the controller's Role, never kube-system.
            writes = namespace in spec["watchNamespaces"]
            for verb in ("create", "patch"):
                assert can_i(kubectl, controller, verb, "deployments.apps", namespace) == writes, (
                    verb, namespace)
            assert not can_i(kubectl, controller, "delete", "deployments.apps", namespace)
        assert can_i(kubectl, controller, "list", "namespaces", ns)
        for namespace in spec["watchNamespaces"]:
            accounts = kubectl("get", "serviceaccount", "-n", namespace, "-o", "name").stdout.split()
            assert f"serviceaccount/{release}-vmfleet-worker" not in accounts  # workers: no token
            # Each namespace's transfer worker has its own account, reaching that namespace only.
            transfer = f"system:serviceaccount:{namespace}:{release}-vmfleet-transfer-worker"
            args = ["auth", "can-i", "get", "secrets/vm1-ssh", f"--as={transfer}", "-n", namespace]
            assert kubectl(*args, check=False).stdout.strip() == "yes"
            args[3] = "secrets/someone-elses"
            assert kubectl(*args, check=False).stdout.strip() == "no"
            for elsewhere in (ns, *[n for n in spec["watchNamespaces"] if n != namespace]):
                assert not can_i(kubectl, transfer, "get", "configmaps", elsewhere), elsewhere
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
                       "VMFLEET_WATCH_NAMESPACES": ns_name,
                       "VMFLEET_BROKER_SECRET_NAME": f"{release}-vmfleet-broker"})
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
        # Its broker URL is the namespace's own user, from the chart's Secret (secretKeyRef).
        by_name = {e["name"]: e for e in pod["containers"][0]["env"]}
        ref = by_name["VMFLEET_BROKER_URL"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": f"{release}-vmfleet-broker", "key": "url"}
        chart_secret = kubectl.get_json("-n", ns_name, "secret", ref["name"])["data"]
        password = base64.b64decode(chart_secret["password"]).decode()
        env.update(KUBECONFIG=str(tmp_path / "no-such-kubeconfig"),
                   VMFLEET_BROKER_URL=redis_server.namespace_url(ns_name, password),
                   VMFLEET_NAMESPACE=by_name["VMFLEET_NAMESPACE"]["value"], HOME=str(tmp_path),
                   # The controller's public key and what this worker serves, as set on the pod.
                   VMFLEET_VERIFY_KEY=by_name["VMFLEET_VERIFY_KEY"]["value"],
                   VMFLEET_SERVED_VMS=by_name["VMFLEET_SERVED_VMS"]["value"],
                   VMFLEET_CREDENTIALS_DIR=str(key_dir), VMFLEET_METRICS_PORT="0",
                   PYTHONUNBUFFERED="1")
        container = pod["containers"][0]
        # The pod runs `python -m remote_tasks.worker ...` (its args): here this interpreter.
        assert container["args"][:3] == ["python", "-m", "remote_tasks.worker"]
        worker = ManagedProcess("worker", [sys.executable, *container["args"][1:]],
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


def test_the_controller_is_fenced_to_worker_deployments_by_the_admission_policy(
        helm, kubectl, crds, namespaces):
    """As the controller's ServiceAccount (its Role allows creating Deployments in the
    namespace), the chart's ValidatingAdmissionPolicy admits the worker Deployments the
    controller builds (controller/deployment_runtime.py) and refuses any other: a hostPath, another
    image, a token, privileged, a hostPort, the node's network or PID namespace."""
    import copy

    from controller.deployment_runtime import DeploymentSettings, worker_deployment
    from controller.runtime import VMRef, single, transfer_group
    from vmfleet.api.models import RemoteVMSpec
    from vmfleet.dev.proc import wait_until

    ns = f"chart-fence-{uuid.uuid4().hex[:6]}"
    namespaces(ns)
    release = f"r{uuid.uuid4().hex[:5]}"
    controller = f"system:serviceaccount:{ns}:{release}-vmfleet-controller"
    settings = DeploymentSettings("vmfleet:0.1.0", "redis://127.0.0.1:6379/0",
                                  transfer_service_account=f"{release}-vmfleet-transfer-worker")
    vm = VMRef(ns, "vm1", str(uuid.uuid4()), RemoteVMSpec.model_validate(
        {"host": "127.0.0.1", "user": "u", "credentialsSecretRef": {"name": "vm1-ssh"},
         "hostKeys": ["ssh-ed25519 AAAA"]}))

    def create(body: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        body = copy.deepcopy(body)
        body["metadata"].pop("ownerReferences")  # no such RemoteVM: nothing to own it
        return kubectl("create", "--dry-run=server", f"--as={controller}", "-f", "-",
                       input=yaml.safe_dump(body), check=False)

    worker = worker_deployment(single(vm), settings, 1)
    refused: dict[str, tuple[dict[str, Any], str]] = {}

    def variant(name: str, words: str, change: Any) -> None:
        body = copy.deepcopy(worker)
        change(body["spec"]["template"]["spec"], body["spec"]["template"]["spec"]["containers"][0])
        refused[name] = (body, words)

    variant("hostPath", "only secret and emptyDir volumes",
            lambda p, c: p["volumes"].append({"name": "root", "hostPath": {"path": "/"}}))
    variant("image", "must run the vmfleet image",
            lambda p, c: c.update(image="docker.io/library/busybox:1"))
    variant("token", "no Kubernetes token", lambda p, c: p.update(automountServiceAccountToken=True))
    variant("privileged", "may not be privileged",
            lambda p, c: c["securityContext"].update(privileged=True, allowPrivilegeEscalation=True))
    variant("hostPort", "may not use a hostPort",
            lambda p, c: c.update(ports=[{"containerPort": 22, "hostPort": 22}]))
    variant("hostNetwork", "may not share the node's network",
            lambda p, c: p.update(hostNetwork=True))
    variant("hostPID", "process or IPC namespace", lambda p, c: p.update(hostPID=True))
    try:
        helm("install", release, str(CHART), "--namespace", ns)
        hostpath, words = refused["hostPath"]
        # The policy is enforced once the API server has loaded it: wait for the first refusal.
        wait_until(lambda: create(hostpath).returncode != 0, timeout=30, interval=0.5,
                   what="the admission policy to refuse a hostPath worker")
        for name, (body, words) in refused.items():
            proc = create(body)
            assert proc.returncode != 0, name
            assert "ValidatingAdmissionPolicy" in proc.stderr and words in proc.stderr, (name, proc.stderr)
        # What the controller builds is admitted: a VM's worker, and the namespace's transfer
        # worker with the chart's transfer ServiceAccount (the one worker with a token).
        for body in (worker, worker_deployment(transfer_group(ns, [vm]), settings, 1)):
            proc = create(body)
            assert proc.returncode == 0, proc.stderr
        # Any other Deployment name, or the transfer account on a command worker: refused.
        other = copy.deepcopy(worker)
        other["metadata"]["name"] = "not-a-worker"
        assert "only worker Deployments" in create(other).stderr
        sneaky = copy.deepcopy(worker)
        sneaky["spec"]["template"]["spec"].update(
            automountServiceAccountToken=True, serviceAccountName=settings.transfer_service_account)
        assert "no Kubernetes token" in create(sneaky).stderr
        # The admin (not the controller) is not fenced: the policy matches the controller only.
        body = copy.deepcopy(hostpath)
        body["metadata"].pop("ownerReferences")
        assert kubectl("create", "--dry-run=server", "-f", "-",
                       input=yaml.safe_dump(body), check=False).returncode == 0
    finally:
        helm("uninstall", release, "--namespace", ns, check=False)
