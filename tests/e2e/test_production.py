"""The local cluster shaped like a user's (issue 23): a pod network, Services, cluster DNS
and two nodes, all inside one network namespace; the host on loopback only.

What is checked: nothing of the cluster's network is in the machine's root namespace;
the host's kubectl reaches the API server on 127.0.0.1 through the relay; both nodes
are Ready with their own addresses and pod ranges; pods get addresses of their own on
either node and reach each other, a Service by its DNS name and ClusterIP, the API server
through the ``kubernetes`` Service (the certificate verifies), and the sshd VMs by
routing.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from vmfleet.dev import netns
from vmfleet.dev.cluster import Cluster
from vmfleet.dev.podnet import node_name
from vmfleet.dev.sshd import SshdVM

pytestmark = pytest.mark.timeout(600)

CLUSTER_RANGES = [netns.NODES_SUBNET, netns.VMS_SUBNET, netns.POD_CIDR, netns.SERVICE_CIDR]
WEB_PORT = 8080


def kubectl_json(cluster: Cluster, *args: str) -> Any:
    return json.loads(cluster.cp.kubectl_run(*args, "-o", "json").stdout)


def pod_python(cluster: Cluster, ns: str, pod: str, code: str, timeout: float = 60) -> str:
    """Run ``python3 -c CODE`` in a pod (kubectl exec through the relay); its stdout."""
    result = cluster.cp.kubectl_run("-n", ns, "exec", pod, "--", "python3", "-c", code,
                                    check=False, timeout=timeout)
    assert result.returncode == 0, f"exec in {pod} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout.strip()


def _addresses_in_cluster_ranges(text: str) -> list[str]:
    found = []
    for word in text.replace("/", " ").split():
        try:
            address = ipaddress.ip_address(word)
        except ValueError:
            continue
        if any(address in net for net in CLUSTER_RANGES):
            found.append(word)
    return found


@pytest.fixture(scope="module")
def web(cluster: Cluster, cluster_image: str) -> Iterator[tuple[str, dict[str, dict[str, Any]]]]:
    """Namespace with pod ``a`` on node 1 and ``b`` on node 2 (an HTTP server on 8080
    each), and Service ``web`` selecting ``b``. Yields (namespace, pods by name)."""
    ns = f"prod-{uuid.uuid4().hex[:6]}"
    cluster.cp.kubectl_run("create", "namespace", ns)
    objects = []
    for name, node in (("a", node_name(1)), ("b", node_name(2))):
        objects.append({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": {"app": f"web-{name}"}},
            "spec": {
                "nodeName": node,
                "terminationGracePeriodSeconds": 1,
                "containers": [{
                    "name": "web", "image": cluster_image, "imagePullPolicy": "Never",
                    "command": ["python3", "-m", "http.server", str(WEB_PORT)],
                    "workingDir": "/tmp",
                    "readinessProbe": {"tcpSocket": {"port": WEB_PORT}, "periodSeconds": 1},
                }],
            },
        })
    objects.append({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": ns},
        "spec": {"selector": {"app": "web-b"}, "ports": [{"port": 80, "targetPort": WEB_PORT}]},
    })
    cluster.cp.kubectl_run("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                                 "items": objects}))
    try:
        cluster.cp.kubectl_run("-n", ns, "wait", "--for=condition=Ready", "pod/a", "pod/b",
                               "--timeout=180s", timeout=200)
        pods = {p["metadata"]["name"]: p for p in kubectl_json(cluster, "-n", ns, "get", "pods")["items"]}
        yield ns, pods
    finally:
        cluster.cp.kubectl_run("delete", "namespace", ns, "--wait=false", check=False)


def test_nothing_of_the_cluster_network_is_in_the_root_namespace(cluster: Cluster) -> None:
    root = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True, check=True).stdout
    root += subprocess.run(["ip", "route", "show", "table", "all"], capture_output=True, text=True,
                           check=True).stdout
    assert _addresses_in_cluster_ranges(root) == []
    inside = cluster.network.ip("-o", "addr")
    assert netns.node_ip(1) in inside and netns.node_ip(2) in inside
    # The host's kubectl talks to loopback only: the relay.
    server = json.loads(cluster.cp.kubeconfig.read_text())["clusters"][0]["cluster"]["server"]
    assert server.startswith("https://127.0.0.1:")


def test_two_nodes_ready_each_with_its_address_and_pod_range(cluster: Cluster) -> None:
    nodes = {n["metadata"]["name"]: n for n in kubectl_json(cluster, "get", "nodes")["items"]}
    assert sorted(nodes) == [node_name(1), node_name(2)]
    for i in (1, 2):
        node = nodes[node_name(i)]
        assert any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"]["conditions"])
        internal = [a["address"] for a in node["status"]["addresses"] if a["type"] == "InternalIP"]
        assert internal == [netns.node_ip(i)]
        assert node["spec"]["podCIDR"] == netns.node_pod_cidr(i)


def test_pods_get_addresses_of_their_own_and_reach_each_other_across_nodes(
        cluster: Cluster, web: tuple[str, dict[str, dict[str, Any]]]) -> None:
    ns, pods = web
    for name, index in (("a", 1), ("b", 2)):
        status = pods[name]["status"]
        assert status["hostIP"] == netns.node_ip(index)
        assert status["podIP"] != status["hostIP"]
        assert ipaddress.ip_address(status["podIP"]) in ipaddress.ip_network(netns.node_pod_cidr(index))
    b_ip = pods["b"]["status"]["podIP"]
    seen = pod_python(cluster, ns, "a", (
        "import urllib.request,socket;"
        f"urllib.request.urlopen('http://{b_ip}:{WEB_PORT}/', timeout=10).read();"
        "print(socket.gethostbyname(socket.gethostname()))"))
    assert seen == pods["a"]["status"]["podIP"]  # the pod's own interface holds its address


def test_a_service_resolves_by_dns_and_answers_on_its_cluster_ip(
        cluster: Cluster, web: tuple[str, dict[str, dict[str, Any]]]) -> None:
    ns, _ = web
    cluster_ip = kubectl_json(cluster, "-n", ns, "get", "service", "web")["spec"]["clusterIP"]
    assert ipaddress.ip_address(cluster_ip) in netns.SERVICE_CIDR
    out = pod_python(cluster, ns, "a", (
        "import socket,urllib.request;"
        f"print(socket.gethostbyname('web.{ns}.svc.cluster.local'));"
        "print(urllib.request.urlopen('http://web/', timeout=10).status)"))
    assert out.splitlines() == [cluster_ip, "200"]


def test_pods_reach_the_api_server_through_the_kubernetes_service(
        cluster: Cluster, web: tuple[str, dict[str, dict[str, Any]]]) -> None:
    ns, _ = web
    # The service account's CA verifies the serving certificate for the Service's name.
    out = pod_python(cluster, ns, "a", (
        "import ssl,urllib.request,urllib.error;"
        "ctx=ssl.create_default_context(cafile='/var/run/secrets/kubernetes.io/serviceaccount/ca.crt');"
        "tok=open('/var/run/secrets/kubernetes.io/serviceaccount/token').read();"
        "req=urllib.request.Request('https://kubernetes.default.svc/version',"
        "headers={'Authorization':'Bearer '+tok});"
        "print(urllib.request.urlopen(req, context=ctx, timeout=10).status)"))
    assert out == "200"


def test_pods_reach_the_vms_by_routing(cluster: Cluster, cluster_vms: list[SshdVM],
                                       web: tuple[str, dict[str, dict[str, Any]]]) -> None:
    ns, _ = web
    for vm in cluster_vms:
        assert ipaddress.ip_address(vm.host) in netns.VMS_SUBNET
        banner = pod_python(cluster, ns, "b", (
            "import socket;"
            f"s=socket.create_connection(('{vm.host}', {vm.port}), timeout=10);"
            "print(s.recv(64).split(b'\\n')[0].decode().strip())"))
        assert banner.startswith("SSH-2.0-")
    # The host reaches them only from inside the namespace (as the tests' SSH does).
    code, out, _ = cluster_vms[0].run("hostname")
    assert (code, out.strip()) == (0, b"vm1")
    assert time.time() > 0
