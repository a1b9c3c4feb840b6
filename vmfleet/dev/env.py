"""``vmfleet dev up|down|status|demo``: the local environment as background processes.

Everything lives under ``.vmfleet/dev`` (or ``$VMFLEET_DEV_DIR``): the control plane
(kube-apiserver + etcd + kube-controller-manager), a broker, N sshd "VMs" on loopback
addresses, and the controller with the Process runtime — or, with ``--node``, a real
node (``vmfleet.dev.node``) running the Helm chart's controller and worker pods from
the project's image. Each server records its process group in a ``*.pgid`` file, so
``dev down`` (another process) can stop them all. ``dev up`` converges: it asks the
cluster and the processes what runs, and makes it exactly what was asked.
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
from vmfleet.api.signing import write_key_pair
from vmfleet.dev import env_cluster, logsapi
from vmfleet.dev import node as node_mod
from vmfleet.dev.brokers import RabbitMQServer, RedisServer, output_store
from vmfleet.dev.controlplane import ControlPlane
from vmfleet.dev.manifests import vm_manifests
from vmfleet.dev.sshd import start_vms
from vmfleet.procs import (
    ManagedProcess,
    free_port,
    port_open,
    stop_pid_file,
    wait_until,
    write_pid_file,
)
from vmfleet.tenancy import redacted

NAMESPACE = "default"
RELEASE = "vmfleet"  # the chart's fullname is then "vmfleet": vmfleet-controller
REPO_ROOT = Path(__file__).resolve().parents[2]
DEV_LABELS = {"fleet": "dev"}
DEV_LABEL = "fleet=dev"


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


def _running_controlplane() -> ControlPlane | None:
    """The control plane a ``dev up`` left running, if it still answers."""
    try:
        cp = ControlPlane.from_state(dev_dir() / "controlplane")
    except (FileNotFoundError, KeyError, ValueError):
        return None
    try:
        if cp.running() and cp._api_ok("/readyz"):
            return cp
    except Exception:  # noqa: BLE001 - not answering: not running
        pass
    return None


def _pid_alive(pid_file: Path) -> bool:
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return False
    return Path(f"/proc/{pid}").exists()


def _cluster_matches(vms: int, broker: str, node: bool) -> str | None:
    """Why the running environment is not what ``dev up`` asks for (None: it is).
    Asks the cluster and the processes, not the state file."""
    state_path = _state_path()
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    if state.get("broker") != broker or bool(state.get("node")) != node:
        return "another broker or mode"
    cp = _running_controlplane()
    if cp is None:
        return "the control plane is not running"
    if not port_open("127.0.0.1", int(state.get("brokerPort", 0)) or 1):
        return "the broker is not running"
    if node:
        ready = cp.kubectl_run("get", "deployment", "-n", NAMESPACE, f"{RELEASE}-controller",
                               "-o", "jsonpath={.status.readyReplicas}", check=False)
        if ready.stdout.strip() != "1" or not _pid_alive(dev_dir() / "node" / "kubelet.pgid"):
            return "the node or its controller pod is not running"
    elif not _pid_alive(dev_dir() / "controller.pgid"):
        return "the controller is not running"
    items = json.loads(cp.kubectl_run("get", "rvm", "-n", NAMESPACE, "-l", DEV_LABEL,
                                      "-o", "json").stdout)["items"]
    names = sorted(item["metadata"]["name"] for item in items)
    if names != sorted(f"vm{i}" for i in range(1, vms + 1)):
        return f"the cluster has RemoteVMs {names or 'none'}"
    for item in items:
        if not port_open(item["spec"]["host"], int(item["spec"].get("port", 22))):
            return f"the VM {item['metadata']['name']} is not running"
    return None


def _workers_ready(items: list[dict[str, Any]]) -> bool:
    """Every VM has a ready worker, or is legitimately at zero (autoscale
    ``minReplicas: 0``, no backlog: the controller scaled it down)."""
    for item in items:
        workers = (item.get("status") or {}).get("workers") or {}
        if workers.get("readyReplicas", 0) >= 1:
            continue
        autoscale = ((item.get("spec") or {}).get("workers") or {}).get("autoscale") or {}
        if autoscale.get("minReplicas", 1) == 0 and workers.get("replicas") == 0:
            continue
        return False
    return True


def up(vms: int = 3, broker: str = "redis", node: bool = False, pod_network: bool = False) -> int:
    """Converge to the asked environment: ``vms`` VMs (``vm1``..``vmN``), ``broker``,
    and with ``node`` a real node running the chart's pods instead of the controller
    process. What already matches (asked of the cluster) is kept; anything else is
    stopped and started again, and the RemoteVMs are made exactly ``vm1``..``vmN``.
    ``pod_network`` (with ``node``): the cluster shaped like a user's instead
    (``vmfleet.dev.env_cluster``), started afresh each time."""
    if vms < 1:
        print("--vms must be at least 1", file=sys.stderr)
        return 2
    if pod_network:
        return _up_pod_network(vms, node, broker)
    root = dev_dir()
    why = _cluster_matches(vms, broker, node)
    if why is None:
        state = json.loads(_state_path().read_text())
        print(f"The local environment is already up ({vms} VMs, {broker}"
              f"{', node' if node else ''}).")
        _print_usage(root / "kubeconfig", state.get("kubectl", "kubectl"))
        return 0
    if _state_path().exists() or _running_controlplane() is not None:
        print(f"Restarting the local environment ({why}).")
    down(quiet=True)
    if node:
        missing = node_mod.missing_requirements()
        if missing:
            print("--node cannot run here; missing: " + "; ".join(missing), file=sys.stderr)
            return 2
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
        _remove_vm_dirs(root / "vms", keep=vms)
        machines = start_vms(vms, root / "vms")

        _kubectl(kubectl, kubeconfig, "apply", "-f", str(REPO_ROOT / "crds"))
        _kubectl(kubectl, kubeconfig, "wait", "--for=condition=Established", "--timeout=60s",
                 f"crd/{c.VM_PLURAL}.{c.GROUP}", f"crd/{c.COMMAND_PLURAL}.{c.GROUP}")

        if node:
            # The Process runtime's output API (an ExternalName Service to a controller
            # process) is not the node's: an APIService nobody serves would hold up every
            # namespace's deletion.
            logsapi.unregister(cp.kubectl_run)
            _start_node(cp, server)
        else:
            _remove_release(cp)
            print("Starting the output store (a Redis of its own)...")
            store = output_store(root / "output").start()
            ca, serving = logsapi.serving_pki(root / "logs-api")
            logs_port = free_port()
            print("Starting the controller (Process runtime)...")
            env = dict(os.environ)
            private_key, _ = write_key_pair(root)  # signs every message to the workers
            env.update({
                # The whole output of each attempt (vmfleet logs), and the output API
                # behind the API server's aggregation layer.
                "VMFLEET_OUTPUT_URL": store.url,
                "VMFLEET_LOGS_API_PORT": str(logs_port),
                "VMFLEET_LOGS_API_CERT_FILE": str(serving.cert),
                "VMFLEET_LOGS_API_KEY_FILE": str(serving.key),
                "KUBECONFIG": str(kubeconfig),
                "VMFLEET_SIGNING_KEY_FILE": str(private_key),
                "VMFLEET_BROKER_URL": server.url,
                "VMFLEET_WORKER_RUNTIME": c.RUNTIME_PROCESS,
                "VMFLEET_WORKER_LOG_DIR": str(root / "workers"),
                "PYTHONUNBUFFERED": "1",
            })
            env.pop("KUBERNETES_SERVICE_HOST", None)
            controller = ManagedProcess(
                "controller",
                [sys.executable, "-m", "kopf", "run", "-m", "controller", "--standalone", "--all-namespaces"],
                root / "controller.log", env=env,
            ).start()
            write_pid_file(controller, root / "controller.pgid")
            logsapi.register(cp.kubectl_run, logs_port, ca.cert.read_bytes())
            logsapi.wait_available(cp.kubectl_run, timeout=90)

        # Exactly vm1..vmN, each as dev up writes it (server-side apply, forced: what
        # dev up owns is reset; a field someone else set stays theirs). The controller
        # runs already, so deleting a VM of an earlier, larger fleet never waits on it.
        objects = [obj for vm in machines for obj in vm_manifests(vm, NAMESPACE, labels=DEV_LABELS)]
        _kubectl(kubectl, kubeconfig, "apply", "--server-side", "--force-conflicts",
                 "--field-manager=vmfleet-dev", "-f", "-", input=yaml.safe_dump_all(objects))
        current = {m.name for m in machines}
        listed = json.loads(_kubectl(kubectl, kubeconfig, "get", "rvm", "-n", NAMESPACE, "-l",
                                     DEV_LABEL, "-o", "json"))["items"]
        stale = sorted(item["metadata"]["name"] for item in listed
                       if item["metadata"]["name"] not in current)
        if stale:
            print(f"Removing RemoteVMs of an earlier fleet: {', '.join(stale)}")
            _kubectl(kubectl, kubeconfig, "delete", "rvm", "-n", NAMESPACE, "--wait=false", *stale)
            _kubectl(kubectl, kubeconfig, "delete", "secret", "-n", NAMESPACE, "--ignore-not-found",
                     *(f"{name}-ssh" for name in stale))

        def converged() -> bool:
            if not node and not _pid_alive(root / "controller.pgid"):
                raise RuntimeError(f"the controller exited: see {root / 'controller.log'}")
            out = _kubectl(kubectl, kubeconfig, "get", "rvm", "-n", NAMESPACE, "-l", DEV_LABEL, "-o", "json")
            items = json.loads(out)["items"]
            return sorted(i["metadata"]["name"] for i in items) == sorted(current) and _workers_ready(items)

        wait_until(converged, timeout=180 if node else 90, interval=0.5, what="the VMs' workers")
        state = {"vms": vms, "broker": broker, "node": node, "brokerUrl": server.url,
                 "brokerPort": server.port, "kubeconfig": str(kubeconfig), "kubectl": str(kubectl),
                 "machines": [{"name": m.name, "host": m.host, "port": m.port} for m in machines]}
        _state_path().write_text(json.dumps(state, indent=2))
    except BaseException:
        if node:
            _print_node_diagnostics()
        print("Starting the local environment failed; stopping what was started.", file=sys.stderr)
        down(quiet=True)
        raise
    print(f"The local environment is up in {time.monotonic() - started:.1f}s.")
    _print_usage(kubeconfig, str(kubectl))
    return 0


def _up_pod_network(vms: int, node: bool, broker: str) -> int:
    if not node or broker != "redis":
        print("--pod-network goes with --node and the chart's bundled Redis (--broker redis)",
              file=sys.stderr)
        return 2
    down(quiet=True)
    root = dev_dir()
    root.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        state = env_cluster.up(root, vms, NAMESPACE, RELEASE, DEV_LABELS, _helm(),
                               REPO_ROOT / "charts" / "vmfleet", REPO_ROOT / "crds")
    except BaseException:
        print("Starting the pod-network cluster failed; stopping what was started.", file=sys.stderr)
        down(quiet=True)
        raise
    _state_path().write_text(json.dumps(state, indent=2))
    print(f"The local cluster is up in {time.monotonic() - started:.1f}s "
          f"(network namespace {state['netns']}).")
    _print_usage(Path(state["kubeconfig"]), state["kubectl"])
    return 0


def _print_node_diagnostics() -> None:
    """What the node's pods were doing, before ``down`` stops them."""
    cp = _running_controlplane()
    if cp is None:
        return
    for args in (("get", "pods,deployments,rvm", "-n", NAMESPACE, "-o", "wide"),
                 ("logs", "-n", NAMESPACE, f"deployment/{RELEASE}-controller", "--tail=40")):
        result = cp.kubectl_run(*args, check=False)
        print(f"$ kubectl {' '.join(args)}\n{result.stdout}{result.stderr}", file=sys.stderr)


def _remove_vm_dirs(vms_dir: Path, keep: int) -> None:
    """Work directories of VMs beyond ``keep`` (their keys, their private /tmp)."""
    if not vms_dir.is_dir():
        return
    for path in vms_dir.iterdir():
        if path.name.startswith("vm") and path.name[2:].isdigit() and int(path.name[2:]) > keep:
            shutil.rmtree(path, ignore_errors=True)


def _helm() -> str:
    result = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "install-helm.sh")],
                            stdout=subprocess.PIPE, text=True, check=True)
    return result.stdout.strip().splitlines()[-1]


def _helm_run(cp: ControlPlane, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = cp.env()
    for var, sub in (("HELM_CACHE_HOME", "cache"), ("HELM_CONFIG_HOME", "config"),
                     ("HELM_DATA_HOME", "data")):
        env[var] = str(dev_dir() / "helm" / sub)
    result = subprocess.run([_helm(), *args, "--namespace", NAMESPACE, "--kubeconfig", str(cp.kubeconfig)],
                            capture_output=True, text=True, env=env, timeout=600, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"helm {' '.join(args)} failed:\n{result.stderr.strip()}")
    return result


def _start_node(cp: ControlPlane, server: RedisServer | RabbitMQServer) -> None:
    print("Building the image (make image; cached once built)...")
    archive = node_mod.build_image()
    print("Starting the node (containerd, kube-scheduler, kubelet)...")
    local_node = node_mod.Node(dev_dir() / "node", cp).start()
    print("Importing the image into the node's containerd...")
    image = local_node.import_image(archive)
    # The namespace's workers get its own broker user; the controller its own.
    worker_url = server.namespace_url(NAMESPACE) if isinstance(server, RedisServer) else server.url
    for name, url in (("broker", worker_url), ("broker-controller", server.url)):
        secret = cp.kubectl_run("-n", NAMESPACE, "create", "secret", "generic", name,
                                f"--from-literal=url={url}", "--dry-run=client", "-o", "yaml").stdout
        cp.kubectl_run("apply", "-f", "-", input=secret)
    values = dev_dir() / "node" / "values.yaml"
    values.write_text(yaml.safe_dump(node_mod.chart_values(cp, image)))
    print(f"Installing the chart (helm upgrade --install {RELEASE})...")
    _helm_run(cp, "upgrade", "--install", RELEASE, str(REPO_ROOT / "charts" / "vmfleet"),
              "-f", str(values), "--wait", "--timeout", "300s")


def _remove_release(cp: ControlPlane) -> None:
    """Back from --node: the chart's release and the worker Deployments go, so no
    controller pod competes with the controller process when a node returns."""
    if _helm_run(cp, "status", RELEASE, check=False).returncode == 0:
        _helm_run(cp, "uninstall", RELEASE, "--wait", "--timeout", "60s", check=False)
    cp.kubectl_run("-n", NAMESPACE, "delete", "deployment", "-l",
                   f"{c.LABEL_COMPONENT}=worker", "--ignore-not-found", "--wait=false", check=False)


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
    # A pod-network cluster as a whole (VMs, nodes, control plane, then its namespace).
    env_cluster.down(root)
    # The node next (its pods' containers with it), while the API still answers.
    node_dir = root / "node"
    if any(node_dir.glob("*.pgid")):
        node_mod.Node.from_state(node_dir).stop()
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
    if state.get("podNetwork"):
        alive = env_cluster.alive(dev_dir())
    else:
        alive = _cluster_matches(state["vms"], state["broker"], bool(state.get("node"))) is None
    print(f"{'up' if alive else 'DOWN (run vmfleet dev up)'}: {state['vms']} VMs, "
          f"broker {state['broker']} ({redacted(state['brokerUrl'])})")
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
