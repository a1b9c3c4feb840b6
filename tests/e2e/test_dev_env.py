"""`vmfleet dev up` converges, like `kind create cluster` or `minikube start`: run it
again, after `dev down`, with another `--vms`, or with `--node`, and the cluster holds
exactly what was asked. Each step is checked in the cluster, not in the state file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from vmfleet.dev.node import missing_requirements
from vmfleet.dev.proc import port_open, wait_until

VMFLEET = Path(sys.executable).with_name("vmfleet")

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1500)]


class Dev:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST")}
        self.env["VMFLEET_DEV_DIR"] = str(root)

    def __call__(self, *args: str, timeout: float = 600) -> str:
        started = time.monotonic()
        proc = subprocess.run([str(VMFLEET), "dev", *args], capture_output=True, text=True,
                              env=self.env, timeout=timeout)
        print(f"\nvmfleet dev {' '.join(args)}: exit {proc.returncode} in "
              f"{time.monotonic() - started:.1f}s")
        assert proc.returncode == 0, f"vmfleet dev {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout

    def state(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.root / "state.json").read_text())
        return data

    def kubectl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        state = self.state()
        proc = subprocess.run([state["kubectl"], f"--kubeconfig={state['kubeconfig']}", *args],
                              capture_output=True, text=True, timeout=120)
        if check:
            assert proc.returncode == 0, proc.stderr
        return proc

    def vms(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = json.loads(
            self.kubectl("get", "rvm", "-n", "default", "-o", "json").stdout)["items"]
        return items

    def assert_fleet(self, n: int, *, at_zero: tuple[str, ...] = ()) -> None:
        items = self.vms()
        assert sorted(i["metadata"]["name"] for i in items) == sorted(f"vm{k}" for k in range(1, n + 1))
        for item in items:
            spec, name = item["spec"], item["metadata"]["name"]
            assert port_open(spec["host"], spec["port"]), f"{name}'s sshd is not running"
            workers = item.get("status", {}).get("workers", {})
            if name in at_zero:
                assert workers.get("replicas") == 0, workers
            else:
                assert workers.get("readyReplicas", 0) >= 1, f"{name}: {workers}"

    def assert_down(self, ports: list[tuple[str, int]]) -> None:
        wait_until(lambda: not any(port_open(h, p) for h, p in ports), timeout=30, interval=0.3,
                   what="every VM's sshd to stop")
        assert not (self.root / "state.json").exists()
        assert not list(self.root.rglob("*.pgid")), list(self.root.rglob("*.pgid"))


def test_dev_up_converges_to_what_was_asked(tmp_path_factory: pytest.TempPathFactory) -> None:
    # Not under /tmp: the VMs' private /tmp would hide it (dev up says so, and works).
    base = Path(os.environ.get("VMFLEET_TEST_DEV_ROOT", Path(__file__).resolve().parents[2] / ".vmfleet"))
    root = base / f"test-dev-{os.getpid()}"
    dev = Dev(root)
    passed = False
    try:
        dev("up", "--vms", "4")
        dev.assert_fleet(4)
        # The local Redis asks who is there, as the chart's does (the fleet ran through
        # the namespace's own user, which the controller created).
        import redis

        port = json.loads((root / "state.json").read_text())["brokerPort"]
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=port, socket_timeout=5).ping()
        assert "Created broker user vmfleet-ns-default" in (root / "controller.log").read_text()
        # Watching commands: exec prints live and keeps the whole output for vmfleet logs.
        client = {**dev.env, "KUBECONFIG": dev.state()["kubeconfig"]}
        ran = subprocess.run([str(VMFLEET), "exec", "--keep", "vm1", "--", "sh", "-c",
                              "echo one; echo two >&2"], capture_output=True, text=True,
                             env=client, timeout=120)
        assert (ran.returncode, ran.stdout) == (0, "one\n"), ran.stderr
        name = ran.stderr.split("kept RemoteCommand default/")[1].split()[0]
        logs = subprocess.run([str(VMFLEET), "logs", name], capture_output=True, text=True,
                              env=client, timeout=120)
        assert (logs.returncode, logs.stdout, logs.stderr) == (0, "one\n", "two\n")
        ports = [(i["spec"]["host"], i["spec"]["port"]) for i in dev.vms()]

        dev("down")
        dev.assert_down(ports)

        # After down, with fewer VMs: exactly vm1, vm2 (vm3, vm4 of the earlier fleet go).
        dev("up", "--vms", "2")
        dev.assert_fleet(2)
        # A VM of the local environment set to scale to zero, as the README shows.
        dev.kubectl("patch", "rvm", "vm2", "-n", "default", "--type=merge", "-p", json.dumps(
            {"spec": {"workers": {"autoscale": {"minReplicas": 0, "maxReplicas": 1,
                                                "scaleDownDelaySeconds": 1}}}}))
        wait_until(lambda: (dev.kubectl("get", "rvm", "vm2", "-n", "default", "-o",
                                        "jsonpath={.status.workers.replicas}").stdout == "0"),
                   timeout=60, interval=0.5, what="vm2's workers at zero")

        # More VMs: five, vm2 still legitimately at zero.
        dev("up", "--vms", "5")
        dev.assert_fleet(5, at_zero=("vm2",))
        started = time.monotonic()
        out = dev("up", "--vms", "5")
        assert "already up" in out and time.monotonic() - started < 30, out

        # A VM's sshd gone: the cluster no longer matches, and dev up brings it back.
        vm5 = next(i for i in dev.vms() if i["metadata"]["name"] == "vm5")
        os.killpg(int((root / "vms" / "vm5" / "sshd.pgid").read_text().split()[0]), signal.SIGKILL)
        wait_until(lambda: not port_open(vm5["spec"]["host"], vm5["spec"]["port"]), timeout=20,
                   interval=0.2, what="vm5's sshd to stop")
        out = dev("up", "--vms", "5")
        assert "already up" not in out
        dev.assert_fleet(5, at_zero=("vm2",))

        if missing_requirements():
            pytest.skip(f"no local node here: {missing_requirements()}")
        dev("up", "--node")
        dev.assert_fleet(3, at_zero=("vm2",))  # the pods' controller keeps vm2 at zero too
        pods = json.loads(dev.kubectl("get", "pods", "-n", "default", "-o", "json").stdout)["items"]
        running = {p["metadata"]["labels"].get("app.kubernetes.io/component") for p in pods
                   if p["status"].get("phase") == "Running"}
        assert {"controller", "worker"} <= running, running
        node = json.loads(dev.kubectl("get", "node", "127.0.0.1", "-o", "json").stdout)
        assert any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"]["conditions"])
        assert not (root / "controller.pgid").exists(), "a controller process besides the pod"
        passed = True
    finally:
        if not passed:
            try:
                _keep_logs(root, tmp_path_factory.mktemp("dev-logs"))
            except OSError as exc:  # never in the way of dev down
                print(f"could not keep the logs: {exc}")
        subprocess.run([str(VMFLEET), "dev", "down"], env=dev.env, capture_output=True, timeout=300)
        subprocess.run(["rm", "-rf", str(root)], check=False)


def _keep_logs(root: Path, into: Path) -> None:
    """The environment's logs and the cluster's view, for a failure's diagnosis."""
    logs = [*root.glob("*.log"), *root.glob("*/*.log"), *(root / "node" / "pod-logs").rglob("*.log")]
    for log in logs:
        target = into / log.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(log.read_bytes()[-200_000:])
    try:
        state = json.loads((root / "state.json").read_text())
    except (OSError, ValueError):
        return
    for args in (["get", "pods,deployments,rvm", "-A", "-o", "wide"], ["get", "events", "-A"],
                 ["logs", "-n", "default", "deployment/vmfleet-controller", "--tail=200"]):
        proc = subprocess.run([state["kubectl"], f"--kubeconfig={state['kubeconfig']}", *args],
                              capture_output=True, text=True, timeout=60)
        with open(into / "cluster.txt", "a") as fh:
            fh.write(f"$ kubectl {' '.join(args)}\n{proc.stdout}{proc.stderr}\n")
