"""The local control plane: version stamping, the controllers vmfleet relies on
(namespace, garbage collector, service accounts), RBAC, and clean process handling."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from vmfleet.dev.controlplane import ControlPlane, KubectlError, kubernetes_version
from vmfleet.dev.proc import port_open, wait_until

pytestmark = pytest.mark.e2e

T = TypeVar("T")


def poll(predicate: Callable[[], T], timeout: float, what: str) -> T:
    """Poll until ``predicate`` returns something truthy; fail the test on the deadline."""
    return wait_until(predicate, timeout, interval=0.2, what=what)


def exists(cp: ControlPlane, *args: str) -> bool:
    result = cp.kubectl_run("get", *args, "-o", "name", check=False)
    if result.returncode == 0:
        return True
    assert "NotFound" in result.stderr, result.stderr
    return False


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# -- version ---------------------------------------------------------------------


def test_version_endpoint_reports_the_go_mod_version(controlplane: ControlPlane) -> None:
    expected = kubernetes_version()
    assert expected.startswith("v1.3")
    info = controlplane.api_get("/version")
    assert info["gitVersion"] == expected
    major, minor = expected[1:].split(".")[:2]
    assert (info["major"], info["minor"]) == (major, minor)
    assert info["buildDate"] != "1970-01-01T00:00:00Z"


def test_kubectl_is_the_same_version(controlplane: ControlPlane) -> None:
    expected = kubernetes_version()
    assert controlplane.kubectl.name == "kubectl"
    out = json.loads(controlplane.kubectl_run("version", "-o", "json").stdout)
    assert out["clientVersion"]["gitVersion"] == expected
    assert out["serverVersion"]["gitVersion"] == expected
    # The subcommand form of the same binary is the same kubectl.
    sub = subprocess.run(
        [str(controlplane.binary), "kubectl", "version", "--client", "-o", "json"],
        capture_output=True, text=True, check=True, env=controlplane.env(),
    )
    assert json.loads(sub.stdout)["clientVersion"]["gitVersion"] == expected
    # And the component subcommands report it too.
    for component in ("kube-apiserver", "kube-controller-manager"):
        ver = subprocess.run(
            [str(controlplane.binary), component, "--version"],
            capture_output=True, text=True, check=True,
        )
        assert ver.stdout.strip() == f"Kubernetes {expected}"


# -- controllers -----------------------------------------------------------------


def test_default_namespace_and_service_account(controlplane: ControlPlane) -> None:
    assert exists(controlplane, "namespace", "default")
    assert exists(controlplane, "serviceaccount", "default", "-n", "default")


def test_namespace_deletion_completes(controlplane: ControlPlane) -> None:
    name = f"ns-lifecycle-{os.getpid()}-{time.monotonic_ns() % 100000}"
    controlplane.kubectl_run("create", "namespace", name)
    controlplane.kubectl_run("create", "configmap", "content", "-n", name, "--from-literal=a=b")
    controlplane.kubectl_run("delete", "namespace", name, "--wait=false")
    # Without the namespace controller it would stay Terminating for ever.
    poll(lambda: not exists(controlplane, "namespace", name), 90, f"namespace {name} to be gone")


def test_new_namespace_gets_default_service_account_and_root_ca(
    controlplane: ControlPlane, namespace: str
) -> None:
    poll(lambda: exists(controlplane, "serviceaccount", "default", "-n", namespace),
         60, "ServiceAccount default")
    poll(lambda: exists(controlplane, "configmap", "kube-root-ca.crt", "-n", namespace),
         60, "ConfigMap kube-root-ca.crt")
    ca = controlplane.kubectl_run(
        "get", "configmap", "kube-root-ca.crt", "-n", namespace,
        "-o", "jsonpath={.data.ca\\.crt}",
    ).stdout
    assert ca.strip() == controlplane.ca_file.read_text().strip()


def test_owned_object_is_garbage_collected(controlplane: ControlPlane, namespace: str) -> None:
    controlplane.kubectl_run("create", "configmap", "owner", "-n", namespace)
    uid = controlplane.kubectl_run(
        "get", "configmap", "owner", "-n", namespace, "-o", "jsonpath={.metadata.uid}"
    ).stdout.strip()
    assert uid
    dependent = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "dependent",
            "namespace": namespace,
            "ownerReferences": [
                {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid}
            ],
        },
        "data": {"k": "v"},
    }
    unowned = {"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": "unowned", "namespace": namespace}}
    for obj in (dependent, unowned):
        controlplane.kubectl_run("create", "-f", "-", input=json.dumps(obj))
    assert exists(controlplane, "configmap", "dependent", "-n", namespace)

    controlplane.kubectl_run("delete", "configmap", "owner", "-n", namespace,
                             "--cascade=background", "--wait=false")
    poll(lambda: not exists(controlplane, "configmap", "dependent", "-n", namespace),
         60, "the dependent ConfigMap to be garbage collected")
    assert exists(controlplane, "configmap", "unowned", "-n", namespace)


# -- authentication and authorization -----------------------------------------------


def test_rbac_is_enforced(controlplane: ControlPlane, namespace: str) -> None:
    sa = f"system:serviceaccount:{namespace}:default"

    def can_i(*args: str, ns: str = namespace) -> str:
        result = controlplane.kubectl_run("auth", "can-i", *args, "-n", ns, check=False)
        assert result.returncode in (0, 1), result.stderr
        return result.stdout.strip()

    assert can_i("create", "pods") == "yes"  # the admin (system:masters)
    assert can_i("create", "pods", f"--as={sa}") == "no"
    assert can_i("get", "secrets", f"--as={sa}") == "no"

    controlplane.kubectl_run("create", "rolebinding", "default-edit", "-n", namespace,
                             "--clusterrole=edit", f"--serviceaccount={namespace}:default")
    # RBAC reads bindings from an informer: it may take a moment to apply.
    poll(lambda: can_i("create", "pods", f"--as={sa}") == "yes", 30, "the RoleBinding to apply")
    assert can_i("create", "pods", f"--as={sa}", ns="default") == "no"


def test_service_account_token_authenticates(controlplane: ControlPlane, namespace: str) -> None:
    poll(lambda: exists(controlplane, "serviceaccount", "default", "-n", namespace),
         60, "ServiceAccount default")
    token = controlplane.kubectl_run("create", "token", "default", "-n", namespace).stdout.strip()
    assert token.count(".") == 2  # a JWT signed with the launcher's key
    whoami = json.loads(
        controlplane.kubectl_run("auth", "whoami", f"--token={token}", "-o", "json").stdout
    )
    assert whoami["status"]["userInfo"]["username"] == f"system:serviceaccount:{namespace}:default"
    # Denied, not unauthenticated.
    with pytest.raises(KubectlError, match="Forbidden|forbidden"):
        controlplane.kubectl_run("get", "pods", "-n", namespace, f"--token={token}")
    with pytest.raises(KubectlError, match="Unauthorized|provide credentials"):
        controlplane.kubectl_run("get", "pods", "-n", namespace, "--token=not-a-token")


def test_kubeconfig_fixture_verifies_tls(controlplane: ControlPlane, kubeconfig: Path) -> None:
    config = json.loads(kubeconfig.read_text())
    cluster = config["clusters"][0]["cluster"]
    assert cluster["server"] == controlplane.server
    assert cluster["server"].startswith("https://127.0.0.1:")
    assert "insecure-skip-tls-verify" not in cluster
    assert cluster["certificate-authority-data"]
    assert oct(kubeconfig.stat().st_mode & 0o777) == "0o600"


def test_python_kubernetes_client_uses_the_kubeconfig(
    controlplane: ControlPlane, kubeconfig: Path, namespace: str
) -> None:
    """What the controller and the workers do: load the kubeconfig, verify TLS."""
    from kubernetes import client, config

    api_client = config.new_client_from_config(config_file=str(kubeconfig))
    try:
        core = client.CoreV1Api(api_client)
        names = {ns.metadata.name for ns in core.list_namespace().items}
        assert {"default", "kube-system", namespace} <= names
        core.create_namespaced_config_map(
            namespace, {"metadata": {"name": "from-python"}, "data": {"k": "v"}}
        )
        assert exists(controlplane, "configmap", "from-python", "-n", namespace)
    finally:
        api_client.close()


# -- process handling ------------------------------------------------------------------


def test_stop_restart_and_stop_from_another_process(
    controlplane: ControlPlane, tmp_path: Path
) -> None:
    workdir = tmp_path / "cp"
    cp = ControlPlane(workdir, controlplane.binary, exit_with_parent=True).start()
    try:
        pids = {name: p.pid for name, p in cp.processes.items()}
        assert set(pids) == {"etcd", "kube-apiserver", "kube-controller-manager"}
        assert all(pid_alive(pid) for pid in pids.values())
        for name in pids:
            assert cp.log_path(name).stat().st_size > 0
        cp.kubectl_run("create", "namespace", "keep-me")
        token, kubeconfig_text = cp.token, cp.kubeconfig.read_text()

        # What `vmfleet dev down` does: stop it from the recorded state.
        recorded = ControlPlane.from_state(workdir)
        assert recorded.server == cp.server and recorded.running()
        recorded.stop()
        poll(lambda: not any(pid_alive(pid) for pid in pids.values()), 30, "components to exit")
        assert not port_open("127.0.0.1", cp.apiserver_port)
        assert not (workdir / "controlplane.json").exists()
    finally:
        cp.stop()

    # Started again: same data, same credentials (new ports).
    with ControlPlane(workdir, controlplane.binary, exit_with_parent=True) as again:
        assert again.token == token
        assert exists(again, "namespace", "keep-me")
        assert kubeconfig_text != again.kubeconfig.read_text()  # new port
        pids = {name: p.pid for name, p in again.processes.items()}
    assert not any(pid_alive(pid) for pid in pids.values())
    assert not port_open("127.0.0.1", again.apiserver_port)
    assert not port_open("127.0.0.1", again.etcd_client_port)


def test_startup_failure_raises_with_log_tail(controlplane: ControlPlane, tmp_path: Path) -> None:
    cp = ControlPlane(tmp_path / "bad", controlplane.binary,
                      extra_apiserver_args=["--no-such-flag"])
    with pytest.raises(RuntimeError, match="no-such-flag") as info:
        cp.start(timeout=60)
    assert "kube-apiserver exited" in str(info.value)
    assert cp.processes == {}
    assert not port_open("127.0.0.1", cp.etcd_client_port)


def test_components_exit_with_their_parent(controlplane: ControlPlane, tmp_path: Path) -> None:
    """A test session that is killed leaves no control plane behind."""
    script = textwrap.dedent(
        """
        import json, signal, sys
        from pathlib import Path
        from vmfleet.dev.controlplane import ControlPlane
        cp = ControlPlane(Path(sys.argv[1]), Path(sys.argv[2]), exit_with_parent=True).start()
        print(json.dumps({n: p.pid for n, p in cp.processes.items()}), flush=True)
        signal.pause()  # until the test kills this parent
        """
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path / "orphan"), str(controlplane.binary)],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert parent.stdout is not None
        line = parent.stdout.readline()
        assert line, "the child did not start its control plane"
        pids: dict[str, int] = json.loads(line)
        assert all(pid_alive(pid) for pid in pids.values())
    finally:
        parent.kill()
        parent.wait()
    poll(lambda: not any(pid_alive(pid) for pid in pids.values()), 60,
         "the orphaned components to exit")
