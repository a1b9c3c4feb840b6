"""The pod-network cluster's addressing and node configuration (vmfleet.dev.netns,
vmfleet.dev.podnet), without starting anything: every address is inside the ranges the
cluster's namespace holds, and nodes never share a pod range, bridge or IPAM store."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from vmfleet.dev import netns, podnet
from vmfleet.dev.netns import NetNamespace, name_for


def test_node_and_vm_addresses_are_in_their_ranges_and_distinct() -> None:
    nodes = {netns.node_ip(i) for i in (1, 2, 3)}
    vms = {netns.vm_ip(i) for i in range(1, 20)}
    assert len(nodes) == 3 and len(vms) == 19
    assert all(ipaddress.ip_address(a) in netns.NODES_SUBNET for a in nodes)
    assert all(ipaddress.ip_address(a) in netns.VMS_SUBNET for a in vms)
    assert netns.node_pod_cidr(1) == "10.244.0.0/24"
    assert netns.node_pod_cidr(2) == "10.244.1.0/24"
    assert ipaddress.ip_address(netns.DNS_SERVICE_IP) in netns.SERVICE_CIDR
    assert ipaddress.ip_address(netns.KUBERNETES_SERVICE_IP) in netns.SERVICE_CIDR


def test_each_node_has_its_own_bridge_pod_range_and_ipam_store(tmp_path: Path) -> None:
    one = podnet.cni_config(1, tmp_path / "n1")
    two = podnet.cni_config(2, tmp_path / "n2")
    assert one["plugins"][0]["bridge"] != two["plugins"][0]["bridge"]
    r1 = one["plugins"][0]["ipam"]["ranges"][0][0]
    r2 = two["plugins"][0]["ipam"]["ranges"][0][0]
    assert (r1["subnet"], r1["gateway"]) == ("10.244.0.0/24", "10.244.0.1")
    assert (r2["subnet"], r2["gateway"]) == ("10.244.1.0/24", "10.244.1.1")
    assert one["plugins"][0]["ipam"]["dataDir"] != two["plugins"][0]["ipam"]["dataDir"]
    assert one["plugins"][0]["ipMasq"] is False  # nothing is ever NATed out of the namespace


def test_kubelet_uses_the_cluster_dns_and_no_resolver_of_the_host() -> None:
    config = podnet.kubelet_config(2)
    assert config["address"] == netns.node_ip(2)
    assert config["clusterDNS"] == [netns.DNS_SERVICE_IP]
    assert config["clusterDomain"] == "cluster.local"
    assert config["resolvConf"] == ""  # dnsPolicy Default pods get no host resolver


def test_namespace_names_are_the_projects_own(tmp_path: Path) -> None:
    name = name_for(tmp_path)
    assert name.startswith("vmfleet-") and name == name_for(tmp_path / "." )
    assert NetNamespace(name).path == Path("/run/netns") / name
    for bad in ("default", "vmfleet-a/../b", "x"):
        with pytest.raises(ValueError):
            NetNamespace(bad)
    assert NetNamespace(name).exec_prefix()[:2] == ["nsenter", f"--net=/run/netns/{name}"]


def test_addresses_outside_the_namespace_ranges_are_refused() -> None:
    ns = NetNamespace("vmfleet-test0000")
    with pytest.raises(ValueError, match="not in"):
        ns.add_address("192.168.1.10")
    with pytest.raises(ValueError, match="not in"):
        ns.add_address(netns.vm_ip(1), netns.NODES_BRIDGE)


def test_only_the_pods_cni_namespaces_are_collected_for_removal() -> None:
    infos = [
        {"Spec": {"linux": {"namespaces": [{"type": "pid"},
                                           {"type": "network", "path": "/var/run/netns/cni-1"}]}}},
        {"Spec": {"linux": {"namespaces": [{"type": "network", "path": "/proc/42/ns/net"}]}}},
        {"Spec": {"linux": {"namespaces": [{"type": "network", "path": "/run/netns/vmfleet-x"}]}}},
        {"Spec": {}},
    ]
    assert podnet.pod_netns_paths(infos) == [Path("/var/run/netns/cni-1")]


def test_the_service_range_is_routed_inside_the_namespace_from_node_1(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The API server (host network of the namespace) connects to an APIService's
    ClusterIP: the Service range needs a route there, or the connect fails before
    kube-proxy's rules ("network is unreachable"). Only inside the namespace."""
    from vmfleet.dev.cluster import Cluster

    calls: list[tuple[str, ...]] = []
    monkeypatch.setattr(NetNamespace, "ip", lambda self, *args: calls.append(args) or "")
    Cluster(tmp_path)._route_services()
    assert calls == [("route", "replace", str(netns.SERVICE_CIDR), "dev", netns.NODES_BRIDGE,
                      "src", netns.node_ip(1))]
