"""Helpers for e2e tests: a namespace of RemoteVMs and RemoteCommands driven through kubectl,
controllers as the tests start them, the vmfleet CLI as a person runs it, and what many
commands at once leave behind. (Fixtures are in tests/e2e/plugins/.)"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import kubernetes
import yaml

from vmfleet.api.signing import write_key_pair
from vmfleet.dev import logsapi
from vmfleet.dev.manifests import vm_manifests
from vmfleet.dev.proc import ManagedProcess, wait_until
from vmfleet.kube import Kube
from vmfleet.procs import free_port

REPO = Path(__file__).resolve().parents[2]


def unique_namespace(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class Kubectl:
    """The real kubectl against the local control plane."""

    def __init__(self, kubectl: Path, kubeconfig: Path) -> None:
        self.binary = str(kubectl)
        self.kubeconfig = str(kubeconfig)

    def __call__(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [self.binary, f"--kubeconfig={self.kubeconfig}", *args],
            input=input, capture_output=True, text=True, timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def apply(self, *objects: dict[str, Any], check: bool = True) -> subprocess.CompletedProcess[str]:
        text = yaml.safe_dump_all(objects)
        return self("apply", "-f", "-", input=text, check=check)

    def get_json(self, *args: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self("get", *args, "-o", "json").stdout)
        return data


class Namespace:
    """One test's namespace, with shortcuts for what the tests do in it."""

    def __init__(self, kubectl: Kubectl, name: str) -> None:
        self.kubectl = kubectl
        self.name = name

    def __str__(self) -> str:
        return self.name

    def create(self) -> Namespace:
        self.kubectl("create", "namespace", self.name)
        return self

    def delete(self) -> None:
        self.kubectl("delete", "namespace", self.name, "--wait=false", check=False)

    def k(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return self.kubectl("-n", self.name, *args, **kwargs)

    def add_vms(self, vms: Iterable[Any], labels: dict[str, str] | None = None, **spec: Any) -> None:
        objects = [obj for vm in vms for obj in vm_manifests(vm, self.name, labels=labels, **spec)]
        self.kubectl.apply(*objects)

    def command(self, name: str, **spec: Any) -> dict[str, Any]:
        return {
            "apiVersion": "vmfleet.io/v1alpha1",
            "kind": "RemoteCommand",
            "metadata": {"name": name, "namespace": self.name},
            "spec": spec,
        }

    def run(self, name: str, **spec: Any) -> None:
        self.kubectl.apply(self.command(name, **spec))

    def get(self, kind: str, name: str) -> dict[str, Any]:
        return self.kubectl.get_json("-n", self.name, kind, name)

    def wait(self, target: str, condition: str, timeout: int = 90) -> None:
        self.k("wait", f"--for=condition={condition}", target, f"--timeout={timeout}s",
               timeout=timeout + 30)

    def finished(self, name: str, timeout: int = 90) -> dict[str, Any]:
        """Wait with ``kubectl wait --for=condition=Finished``, return the object."""
        self.wait(f"remotecommand/{name}", "Finished", timeout)
        return self.get("remotecommand", name)


def controller_argv(namespaces: Sequence[str]) -> list[str]:
    """``kopf run`` of the controller for these namespaces (globs), as the tests start it."""
    argv = [sys.executable, "-m", "kopf", "run", "-m", "controller", "--standalone"]
    for ns in namespaces:
        argv += ["--namespace", ns]
    return argv


def start_controller(
    kubeconfig: Path,
    broker_url: str,
    workdir: Path,
    namespaces: Sequence[str],
    runtime: str = "Process",
    extra_env: dict[str, str] | None = None,
    extra_args: Sequence[str] = (),
) -> ManagedProcess:
    """Run ``kopf run -m controller`` as the user would, in the background; with a signing
    key pair of its own in ``workdir`` (``signing.key``, ``verify.pub``) unless
    ``extra_env`` names one: every test runs the signed path (``extra_args``: more of
    kopf's options, such as ``--liveness=...``)."""
    env = dict(os.environ)
    private_key, _ = write_key_pair(workdir)
    env["VMFLEET_SIGNING_KEY_FILE"] = str(private_key)
    env.update({
        "KUBECONFIG": str(kubeconfig),
        "VMFLEET_BROKER_URL": broker_url,
        "VMFLEET_WORKER_RUNTIME": runtime,
        "VMFLEET_WORKER_LOG_DIR": str(workdir / "workers"),
        "PYTHONUNBUFFERED": "1",
        "VMFLEET_METRICS_PORT": "0",  # several controllers at once: metrics only when asked
        # Faster fault handling than in production, so fault tests finish quickly.
        "VMFLEET_HEARTBEAT_SECONDS": "1",
        "VMFLEET_WORKER_LOST_SECONDS": "6",
        "VMFLEET_KILL_GRACE_SECONDS": "1",
    })
    env.pop("KUBERNETES_SERVICE_HOST", None)
    env.update(extra_env or {})
    proc = ManagedProcess("controller", [*controller_argv(namespaces), *extra_args],
                          workdir / "controller.log",
                          env=env, cwd=REPO)
    proc.start()
    return proc


def logs_of(paths: Iterable[Path]) -> str:
    return "\n".join(p.read_text(errors="replace") for p in paths if p.exists())


def assert_no_tracebacks(*paths: Path) -> None:
    files = [p for path in paths for p in ([path] if path.is_file() else sorted(path.glob("*.log")))]
    text = logs_of(files)
    assert "Traceback" not in text, f"a Traceback in {', '.join(map(str, files))}:\n{text[-4000:]}"


__all__ = ["Kubectl", "Namespace", "assert_no_tracebacks", "start_controller", "unique_namespace",
           "wait_until"]


def holds_for(predicate: Callable[[], bool], seconds: float, interval: float = 0.2,
              what: str = "condition") -> None:
    """``predicate`` stays true for ``seconds`` (checked every ``interval``): the counterpart
    of ``wait_until`` for "and nothing more comes"; fails the moment it turns false."""
    deadline = time.monotonic() + seconds
    while True:
        assert predicate(), f"{what} stopped holding"
        if time.monotonic() >= deadline:
            return
        time.sleep(interval)


def apply_crds(kubectl: Kubectl) -> None:
    """The project's CRDs applied and Established."""
    kubectl("apply", "-f", str(REPO / "crds"))
    # Right after apply, `kubectl wait` can fail before the CRDs have a status: retry it.
    wait_until(
        lambda: kubectl("wait", "--for=condition=Established", "crd/remotevms.vmfleet.io",
                        "crd/remotecommands.vmfleet.io", "--timeout=60s", check=False,
                        timeout=90).returncode == 0,
        timeout=120, interval=1, what="the CRDs to be established",
    )


# --------------------------------------------------------------------------- the CLI

BIN = Path(sys.executable).parent  # .venv/bin: vmfleet and kubectl-vmfleet
VMFLEET = str(BIN / "vmfleet")


def client_env(controlplane) -> dict[str, str]:  # type: ignore[no-untyped-def]
    env = controlplane.env()
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def vmfleet(controlplane, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    return subprocess.run([VMFLEET, *args], capture_output=True, text=True, timeout=timeout,
                          env=client_env(controlplane), stdin=subprocess.DEVNULL)


def admin(controlplane) -> Kube:  # type: ignore[no-untyped-def]
    """vmfleet.kube.Kube with the control plane's admin kubeconfig."""
    config = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(config_file=str(controlplane.kubeconfig),
                                       client_configuration=config)
    return Kube(kubernetes.client.ApiClient(config))


@contextlib.contextmanager
def logs_api_controller(controlplane, broker_url: str, output_url: str,  # type: ignore[no-untyped-def]
                        workdir: Path, namespaces: Sequence[str],
                        controller_id: str) -> Iterator[ManagedProcess]:
    """A controller of its own with the output store and the output API on, registered
    behind the APIService; unregistered and stopped at the end. ``proc.logs_api`` is the
    API's (port, CA certificate)."""
    ca, serving = logsapi.serving_pki(workdir)
    port = free_port()
    proc = start_controller(controlplane.kubeconfig, broker_url, workdir, namespaces,
                            extra_env={
                                "VMFLEET_CONTROLLER_ID": controller_id,
                                "VMFLEET_OUTPUT_URL": output_url,
                                "VMFLEET_LOGS_API_PORT": str(port),
                                "VMFLEET_LOGS_API_CERT_FILE": str(serving.cert),
                                "VMFLEET_LOGS_API_KEY_FILE": str(serving.key),
                            })
    logsapi.register(controlplane.kubectl_run, port, ca.cert.read_bytes())
    proc.logs_api = (port, ca.cert)  # type: ignore[attr-defined]
    try:
        logsapi.wait_available(controlplane.kubectl_run, timeout=90)
        yield proc
    finally:
        logsapi.unregister(controlplane.kubectl_run)
        proc.stop(grace=30)


def role_granting(namespace: str, name: str, rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A Role ``name`` granting ``rules`` in ``namespace``, bound to the ServiceAccount ``name``."""
    return [
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": name, "namespace": namespace}, "rules": rules},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": name, "namespace": namespace},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
         "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}]},
    ]


def token_kube(controlplane, namespace: str, name: str) -> Kube:  # type: ignore[no-untyped-def]
    """vmfleet.kube.Kube with a new token of the ServiceAccount ``namespace/name``."""
    token = controlplane.kubectl_run("create", "token", "-n", namespace, name).stdout.strip()
    config = kubernetes.client.Configuration(host=controlplane.server,
                                             api_key={"BearerToken": token},
                                             api_key_prefix={"BearerToken": "Bearer"})
    config.ssl_ca_cert = str(controlplane.ca_file)
    return Kube(kubernetes.client.ApiClient(config))


# --------------------------------------------------------------------------- on the VMs


def remote_processes(vm, needle: str) -> list[str]:  # type: ignore[no-untyped-def]
    """Processes on the VM whose command line contains ``needle`` (not zombies)."""
    _, out, _ = vm.run("ps -eo stat=,args=")
    return [line for line in out.decode().splitlines()
            if needle in line and not line.strip().startswith("Z") and "ps -eo" not in line]


def max_overlap(intervals: list[tuple[int, int]]) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    return peak


# --------------------------------------------------------------------------- many commands at once


def create_commands(ns: Namespace, names: list[str], vms: list[str], log: Path, sleep: float) -> None:
    docs = [ns.command(name, vm=vms[i % len(vms)],
                       command=f"sleep {sleep}; echo {name} >> {log}")
            for i, name in enumerate(names)]
    for start in range(0, len(docs), 100):
        ns.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs[start:start + 100]), timeout=300)


def phases(ns: Namespace) -> Counter[str]:
    items = ns.kubectl.get_json("-n", str(ns), "rcmd")["items"]
    return Counter((item.get("status") or {}).get("phase", "New") for item in items)


def wait_all_finished(ns: Namespace, total: int, timeout: float) -> Counter[str]:
    def done() -> Counter[str] | None:
        counts = phases(ns)
        finished = sum(counts[p] for p in ("Succeeded", "Failed", "Cancelled"))
        return counts if finished == total else None

    return wait_until(done, timeout=timeout, interval=1, what=f"{total} commands to finish")


def assert_each_ran_once(log: Path, names: list[str]) -> None:
    runs = Counter(log.read_text().split())
    assert set(runs) == set(names), f"missing: {sorted(set(names) - set(runs))[:10]}"
    duplicated = {name: n for name, n in runs.items() if n > 1}
    assert duplicated == {}
