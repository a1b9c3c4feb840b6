"""``vmfleet dev up --node --pod-network``: the local environment as a cluster shaped
like a user's (``vmfleet.dev.cluster``): two nodes with a pod network, kube-proxy and
CoreDNS in a network namespace of their own, the sshd VMs on addresses of that
namespace, and the chart installed with its default values (only the images are
named: the project's, and the bundled broker's built from Debian's redis-server).

The host reaches the API server through the loopback relay written into
``.vmfleet/dev/kubeconfig``; ``vmfleet dev down`` stops it all and deletes the namespace.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from vmfleet.api import constants as c
from vmfleet.dev import netns
from vmfleet.dev.cluster import Cluster, build_redis_image
from vmfleet.dev.manifests import vm_manifests
from vmfleet.dev.node import build_image, image_name, missing_requirements
from vmfleet.dev.sshd import SshdVM
from vmfleet.procs import stop_pid_file, wait_until

CLUSTER_DIR = "cluster"


def _image_values(image: str) -> dict[str, Any]:
    repository, _, tag = image.rpartition(":")
    return {"repository": repository, "tag": tag, "pullPolicy": "Never"}


def up(root: Path, vms: int, namespace: str, release: str, labels: dict[str, str],
       helm: str, chart: Path, crds: Path) -> dict[str, Any]:
    """Start the cluster, the VMs and the chart under ``root``; the state to record."""
    missing = missing_requirements() + netns.missing_requirements()
    if missing:
        raise RuntimeError("--pod-network cannot run here; missing: " + "; ".join(missing))
    print("Building the images (make image, make redis-image; cached once built)...")
    archives = [build_image(), build_redis_image()]
    print("Starting the cluster (network namespace, control plane, 2 nodes, kube-proxy, CoreDNS)...")
    cluster = Cluster(root / CLUSTER_DIR).start()
    kubeconfig = root / "kubeconfig"
    shutil.copyfile(cluster.cp.kubeconfig, kubeconfig)
    for node in cluster.nodes:
        for archive in archives:
            node.import_image(archive)
    image, redis_image = (image_name(a) for a in archives)

    print(f"Starting {vms} sshd VMs in the cluster's network...")
    machines = []
    for i in range(1, vms + 1):
        vm = SshdVM(f"vm{i}", root / "vms" / f"vm{i}", address=netns.vm_ip(i), network=cluster.network)
        machines.append(vm.start())

    cp = cluster.cp
    cp.kubectl_run("apply", "-f", str(crds))
    cp.kubectl_run("wait", "--for=condition=Established", "--timeout=60s",
                   f"crd/{c.VM_PLURAL}.{c.GROUP}", f"crd/{c.COMMAND_PLURAL}.{c.GROUP}")
    values = root / "values.yaml"
    values.write_text(yaml.safe_dump({"image": _image_values(image),
                                      "broker": {"bundled": {"image": _image_values(redis_image)}}}))
    print(f"Installing the chart with its default values (helm upgrade --install {release})...")
    result = subprocess.run(
        [helm, "upgrade", "--install", release, str(chart), "-f", str(values), "--wait",
         "--timeout", "300s", "--namespace", namespace, "--kubeconfig", str(kubeconfig)],
        capture_output=True, text=True, env=cp.env(), timeout=600, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"helm upgrade --install failed:\n{result.stderr.strip()}")
    objects = [obj for vm in machines for obj in vm_manifests(vm, namespace, labels=labels)]
    cp.kubectl_run("apply", "-f", "-", input=yaml.safe_dump_all(objects))

    def converged() -> bool:
        out = cp.kubectl_run("get", "rvm", "-n", namespace, "-o", "json").stdout
        items = json.loads(out)["items"]
        return len(items) == vms and all(
            any(cond.get("type") == "Ready" and cond.get("status") == "True"
                for cond in item.get("status", {}).get("conditions", [])) for item in items)

    wait_until(converged, timeout=240, interval=1, what="the VMs' workers")
    return {"vms": vms, "broker": "redis", "node": True, "podNetwork": True,
            "brokerUrl": f"redis://{release}-broker.{namespace}.svc:6379/0", "brokerPort": 6379,
            "kubeconfig": str(kubeconfig), "kubectl": str(cp.kubectl), "netns": cluster.network.name,
            "machines": [{"name": m.name, "host": m.host, "port": m.port} for m in machines]}


def down(root: Path) -> None:
    """Stop the VMs, then the cluster (its namespace with it), if ``root`` has one."""
    if not (root / CLUSTER_DIR / "cluster.json").exists():
        return
    for pid_file in sorted((root / "vms").rglob("*.pgid")):
        stop_pid_file(pid_file, grace=5)
    Cluster.from_state(root / CLUSTER_DIR).stop()


def alive(root: Path) -> bool:
    state = root / CLUSTER_DIR / "cluster.json"
    if not state.exists():
        return False
    try:
        name = json.loads(state.read_text())["netns"]
    except (OSError, ValueError, KeyError):
        return False
    return netns.NetNamespace(name).exists()

