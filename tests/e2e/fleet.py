"""Helpers for e2e tests: a namespace of RemoteVMs and RemoteCommands driven through kubectl."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from vmfleet.api.signing import write_key_pair
from vmfleet.dev.manifests import vm_manifests
from vmfleet.dev.proc import ManagedProcess, wait_until

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
