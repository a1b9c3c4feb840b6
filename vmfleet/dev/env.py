"""``vmfleet dev up|down|status|demo``: the local environment as background processes.

Everything lives under ``.vmfleet/dev`` (or ``$VMFLEET_DEV_DIR``): the control plane
(kube-apiserver + etcd + kube-controller-manager), a broker, N sshd "VMs" on loopback
addresses, and the controller with the Process runtime. Each server records its process
group in a ``*.pgid`` file, so ``dev down`` (another process) can stop them all.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from vmfleet.api import constants as c
from vmfleet.dev.brokers import RabbitMQServer, RedisServer
from vmfleet.dev.controlplane import ControlPlane
from vmfleet.dev.manifests import vm_manifests
from vmfleet.procs import ManagedProcess, stop_pid_file, wait_until, write_pid_file
from vmfleet.dev.sshd import start_vms

NAMESPACE = "default"


def dev_dir() -> Path:
    return Path(os.environ.get("VMFLEET_DEV_DIR", ".vmfleet/dev")).resolve()


def _state_path() -> Path:
    return dev_dir() / "state.json"


def _kubectl(cp_kubectl: Path, kubeconfig: Path, *args: str, input: str | None = None) -> str:
    proc = subprocess.run([str(cp_kubectl), f"--kubeconfig={kubeconfig}", *args], input=input,
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)} failed:\n{proc.stderr.strip()}")
    return proc.stdout


def _alive(state: dict[str, Any]) -> bool:
    try:
        cp = ControlPlane.from_state(dev_dir() / "controlplane")
    except (FileNotFoundError, KeyError, ValueError):
        return False
    controller_pid = dev_dir() / "controller.pgid"
    if not cp.running() or not controller_pid.exists():
        return False
    pid = int(controller_pid.read_text().split()[0])
    return Path(f"/proc/{pid}").exists()


def up(vms: int = 3, broker: str = "redis") -> int:
    if vms < 1:
        print("--vms must be at least 1", file=sys.stderr)
        return 2
    root = dev_dir()
    state_path = _state_path()
    if state_path.exists():
        state = json.loads(state_path.read_text())
        if _alive(state) and state.get("vms") == vms and state.get("broker") == broker:
            print(f"The local environment is already up ({vms} VMs, {broker}).")
            _print_usage(root / "kubeconfig", state.get("kubectl", "kubectl"))
            return 0
        down(quiet=True)
    root.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        print("Starting the local control plane (kube-apiserver, etcd, kube-controller-manager)...")
        cp = ControlPlane(root / "controlplane").start()
        kubeconfig = root / "kubeconfig"
        shutil.copyfile(cp.kubeconfig, kubeconfig)
        kubectl = cp.kubectl

        print(f"Starting {broker}...")
        server: RedisServer | RabbitMQServer
        server = RedisServer(root / "redis") if broker == "redis" else RabbitMQServer(root / "rabbitmq")
        server.start()

        print(f"Starting {vms} sshd VMs...")
        machines = start_vms(vms, root / "vms")

        _kubectl(kubectl, kubeconfig, "apply", "-f", str(Path(__file__).resolve().parents[2] / "crds"))
        _kubectl(kubectl, kubeconfig, "wait", "--for=condition=Established", "--timeout=60s",
                 f"crd/{c.VM_PLURAL}.{c.GROUP}", f"crd/{c.COMMAND_PLURAL}.{c.GROUP}")
        objects = [obj for vm in machines for obj in vm_manifests(vm, NAMESPACE, labels={"fleet": "dev"})]
        _kubectl(kubectl, kubeconfig, "apply", "-f", "-", input=yaml.safe_dump_all(objects))
        # The control plane keeps its data between runs: drop VMs of an earlier, larger fleet.
        current = {m.name for m in machines}
        listed = json.loads(_kubectl(kubectl, kubeconfig, "get", "rvm", "-n", NAMESPACE, "-l",
                                     "fleet=dev", "-o", "json"))["items"]
        stale = sorted(item["metadata"]["name"] for item in listed
                       if item["metadata"]["name"] not in current)
        if stale:
            _kubectl(kubectl, kubeconfig, "delete", "rvm", "-n", NAMESPACE, *stale)

        print("Starting the controller (Process runtime)...")
        env = dict(os.environ)
        env.update({
            "KUBECONFIG": str(kubeconfig),
            "VMFLEET_BROKER_URL": server.url,
            "VMFLEET_WORKER_RUNTIME": c.RUNTIME_PROCESS,
            "VMFLEET_WORKER_LOG_DIR": str(root / "workers"),
            "PYTHONUNBUFFERED": "1",
        })
        controller = ManagedProcess(
            "controller",
            [sys.executable, "-m", "kopf", "run", "-m", "controller", "--standalone", "--all-namespaces"],
            root / "controller.log", env=env,
        ).start()
        write_pid_file(controller, root / "controller.pgid")

        def workers_ready() -> bool:
            controller.check_running()
            out = _kubectl(kubectl, kubeconfig, "get", "rvm", "-n", NAMESPACE, "-o", "json")
            items = json.loads(out)["items"]
            return len(items) == vms and all(
                ((item.get("status") or {}).get("workers") or {}).get("readyReplicas", 0) >= 1
                for item in items
            )

        wait_until(workers_ready, timeout=90, interval=0.5, what="the VMs' workers")
        state = {"vms": vms, "broker": broker, "brokerUrl": server.url,
                 "kubeconfig": str(kubeconfig), "kubectl": str(kubectl),
                 "machines": [{"name": m.name, "host": m.host, "port": m.port} for m in machines]}
        state_path.write_text(json.dumps(state, indent=2))
    except BaseException:
        print("Starting the local environment failed; stopping what was started.", file=sys.stderr)
        down(quiet=True)
        raise
    print(f"The local environment is up in {time.monotonic() - started:.1f}s.")
    _print_usage(kubeconfig, str(kubectl))
    return 0


def _print_usage(kubeconfig: Path, kubectl: str) -> None:
    print(f"""
Use it:
  export KUBECONFIG={kubeconfig}
  alias kubectl={kubectl}     # a kubectl of the control plane's version
  kubectl get remotevms
  kubectl apply -f examples/remotecommand.yaml
  kubectl wait --for=condition=Finished remotecommand/hello
  kubectl get remotecommand hello -o yaml
Logs: {dev_dir()}/controller.log and {dev_dir()}/workers/
Stop it: vmfleet dev down""")


def down(quiet: bool = False) -> int:
    root = dev_dir()
    if not root.exists():
        if not quiet:
            print("The local environment is not running.")
        return 0
    # The controller first: it stops its worker processes itself on a clean shutdown.
    stop_pid_file(root / "controller.pgid", grace=30)
    pid_files = sorted(p for p in root.rglob("*.pgid"))
    # epmd after the RabbitMQ node that uses it.
    for pid_file in sorted(pid_files, key=lambda p: p.name == "epmd.pgid"):
        stop_pid_file(pid_file, grace=15)
    try:
        ControlPlane.from_state(root / "controlplane").stop()
    except FileNotFoundError:
        pass
    _state_path().unlink(missing_ok=True)
    if not quiet:
        print("The local environment is stopped.")
    return 0


def status() -> int:
    state_path = _state_path()
    if not state_path.exists():
        print("The local environment is not running: `vmfleet dev up` starts it.")
        return 1
    state = json.loads(state_path.read_text())
    alive = _alive(state)
    print(f"{'up' if alive else 'DOWN (run vmfleet dev up)'}: {state['vms']} VMs, "
          f"broker {state['broker']} ({state['brokerUrl']})")
    print(f"KUBECONFIG={state['kubeconfig']}")
    return 0 if alive else 1


def demo() -> int:
    from vmfleet.dev import demo as flow

    state_path = _state_path()
    if not state_path.exists():
        print("The local environment is not running: run `vmfleet dev up` first.", file=sys.stderr)
        return 1
    os.environ["KUBECONFIG"] = json.loads(state_path.read_text())["kubeconfig"]
    return flow.run(NAMESPACE)
