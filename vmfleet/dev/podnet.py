"""What a node of the pod-network cluster (``vmfleet.dev.cluster``) adds to a ``Node``:
its name and address, the CNI configuration of its containerd, its kubelet settings.

Node N is ``vmfleet-node-N`` at ``10.250.0.N`` on the nodes' bridge of the cluster's
network namespace (``vmfleet.dev.netns``). Its containerd runs the CNI ``bridge``
plugin (Debian's containernetworking-plugins) on a bridge of its own, ``cni(N-1)``,
gateway ``10.244.(N-1).1``, and ``host-local`` hands out the rest of
``10.244.(N-1).0/24``: every pod gets an address of its own, in the namespace. The
nodes share the namespace, so pods of one node reach the other's (and the VMs, and the
API server) by plain routing; kube-proxy's rules, in the same namespace, serve both.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

from vmfleet.dev.netns import (
    CLUSTER_DOMAIN,
    DNS_SERVICE_IP,
    NODES_BRIDGE,
    NetNamespace,
    node_ip,
    node_pod_cidr,
)

#: Each node's kubelet listens on its own address, so all use the usual port.
KUBELET_PORT = 10250


def node_name(index: int) -> str:
    return f"vmfleet-node-{index}"


def bridge_name(index: int) -> str:
    return f"cni{index - 1}"


def prepare_node(network: NetNamespace, index: int) -> None:
    """Give node ``index`` its address on the nodes' bridge (node 1's comes with the
    namespace)."""
    network.add_address(node_ip(index), NODES_BRIDGE)


def cni_config(index: int, ipam_dir: Path) -> dict[str, Any]:
    """The CNI network list of node ``index``'s containerd: ``bridge`` + ``host-local``
    with this node's pod range (allocations kept under ``ipam_dir``, the node's own),
    hairpin on so that a pod reaches itself through a Service."""
    subnet = ipaddress.ip_network(node_pod_cidr(index))
    return {
        "cniVersion": "1.0.0",
        "name": "vmfleet-pods",
        "plugins": [{
            "type": "bridge",
            "bridge": bridge_name(index),
            "isGateway": True,
            "ipMasq": False,
            "hairpinMode": True,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": str(subnet), "gateway": str(subnet.network_address + 1)}]],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": str(ipam_dir),
            },
        }],
    }


def kubelet_config(index: int) -> dict[str, Any]:
    """KubeletConfiguration fields of node ``index`` (over ``Node``'s defaults): its
    address, the cluster DNS, no resolver of the host's (pods with ``dnsPolicy:
    Default`` get none: no query ever leaves the namespace)."""
    return {
        "address": node_ip(index),
        "port": KUBELET_PORT,
        "healthzBindAddress": "127.0.0.1",
        "clusterDNS": [DNS_SERVICE_IP],
        "clusterDomain": CLUSTER_DOMAIN,
        "resolvConf": "",
    }


def pod_netns_paths(containers_info: list[dict[str, Any]]) -> list[Path]:
    """The pods' network namespaces (``/run/netns/cni-…``) named by the OCI specs of a
    node's containers (``ctr containers info``): what containerd would remove with the
    pod sandboxes, which a stopped node leaves behind."""
    found = set()
    for info in containers_info:
        for ns in info.get("Spec", {}).get("linux", {}).get("namespaces", []) or []:
            path = ns.get("path") or ""
            if ns.get("type") == "network" and path.startswith(("/run/netns/cni-", "/var/run/netns/cni-")):
                found.add(Path(path))
    return sorted(found)


def remove_pod_netns(paths: list[Path]) -> None:
    """Unmount and remove the pods' network namespace files (their interfaces went with
    the cluster's namespace or go with the last process inside)."""
    import subprocess

    for path in paths:
        subprocess.run(["umount", "--lazy", str(path)], capture_output=True, check=False)
        path.unlink(missing_ok=True)
