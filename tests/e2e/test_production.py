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
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.fleet import REPO, Kubectl, Namespace, unique_namespace
from tests.e2e.test_in_cluster import RELEASE, helm_binary
from vmfleet.dev import netns
from vmfleet.dev.cluster import Cluster
from vmfleet.dev.manifests import vm_manifests
from vmfleet.dev.podnet import node_name
from vmfleet.dev.proc import wait_until
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


# ------------------------------------------------------------------ the chart, default values


class DefaultRelease:
    """charts/vmfleet installed with its default values but the images' names."""

    def __init__(self, cluster: Cluster, kubectl: Kubectl, ns: Namespace, workdir: Path) -> None:
        self.cluster = cluster
        self.kubectl = kubectl
        self.ns = ns
        self.workdir = workdir
        self.helm = helm_binary()

    def helm_run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        env = self.cluster.cp.env()
        for part in ("CACHE", "CONFIG", "DATA"):
            env[f"HELM_{part}_HOME"] = str(self.workdir / f"helm-{part.lower()}")
        proc = subprocess.run([self.helm, *args, "--namespace", self.ns.name,
                               "--kubeconfig", str(self.cluster.cp.kubeconfig)],
                              capture_output=True, text=True, timeout=timeout, env=env, check=False)
        if proc.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} exited {proc.returncode}:\n"
                                 f"{proc.stdout}\n{proc.stderr}\n{self.diagnostics()}")
        return proc

    def diagnostics(self) -> str:
        out = self.ns.k("get", "pods,deployments,rvm,rcmd", "-o", "wide", check=False).stdout
        events = self.ns.k("get", "events", "--sort-by=.lastTimestamp", check=False).stdout[-3000:]
        logs = self.ns.k("logs", f"deployment/{RELEASE}-vmfleet-controller", "--tail=40", check=False)
        return f"{out}\n{events}\n--- controller log:\n{logs.stdout}{logs.stderr}"

    def pods(self, selector: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.kubectl.get_json("-n", self.ns.name, "pods", "-l", selector)["items"]
        return [p for p in items if p["metadata"].get("deletionTimestamp") is None]

    def finished(self, name: str, timeout: int = 180) -> dict[str, Any]:
        try:
            return self.ns.finished(name, timeout=timeout)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.diagnostics()}") from None


def image_values(image: str) -> dict[str, Any]:
    repository, _, tag = image.rpartition(":")
    return {"repository": repository, "tag": tag, "pullPolicy": "Never"}


@pytest.fixture(scope="module")
def release(cluster: Cluster, cluster_image: str, cluster_redis_image: str,
            cluster_vms: list[SshdVM], tmp_path_factory: pytest.TempPathFactory) -> Iterator[DefaultRelease]:
    kubectl = Kubectl(cluster.cp.kubectl, cluster.cp.kubeconfig)
    kubectl("apply", "-f", str(REPO / "crds"))
    wait_until(lambda: kubectl("wait", "--for=condition=Established", "crd/remotevms.vmfleet.io",
                               "crd/remotecommands.vmfleet.io", "--timeout=60s", check=False,
                               timeout=90).returncode == 0,
               timeout=120, interval=1, what="the CRDs to be established")
    ns = Namespace(kubectl, unique_namespace("prod")).create()
    rel = DefaultRelease(cluster, kubectl, ns, tmp_path_factory.mktemp("release"))
    # The images are the only values given: everything else is the chart's default.
    values = {"image": image_values(cluster_image),
              "broker": {"bundled": {"image": image_values(cluster_redis_image)}}}
    values_file = rel.workdir / "values.yaml"
    values_file.write_text(json.dumps(values))
    started = time.monotonic()
    rel.helm_run("install", RELEASE, str(REPO / "charts" / "vmfleet"), "-f", str(values_file),
                 "--wait", "--timeout", "300s", timeout=400)
    print(f"\nhelm install --wait (default values, pod network): {time.monotonic() - started:.1f}s")
    ns.add_vms(cluster_vms, labels={"fleet": "prod"})
    try:
        yield rel
    finally:
        rel.helm_run("uninstall", RELEASE, "--wait", "--timeout", "60s", timeout=120)
        ns.delete()


def test_the_chart_with_default_values_runs_on_the_pod_network(release: DefaultRelease) -> None:
    def all_running() -> list[dict[str, Any]] | None:
        pods = release.pods("app.kubernetes.io/name=vmfleet")
        return pods if all(p["status"].get("phase") == "Running" for p in pods) else None

    try:  # the workers of the VMs just added start now
        pods = wait_until(all_running, timeout=180, interval=1, what="every pod of the release Running")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{release.diagnostics()}") from None
    components = {p["metadata"]["labels"].get("app.kubernetes.io/component") for p in pods}
    assert {"controller", "broker"} <= components, components
    for pod in pods:
        assert not pod["spec"].get("hostNetwork"), pod["metadata"]["name"]
        assert ipaddress.ip_address(pod["status"]["podIP"]) in netns.POD_CIDR, pod["metadata"]["name"]
        for container in pod["spec"]["containers"]:
            names = {e["name"] for e in container.get("env", [])}
            assert "KUBERNETES_SERVICE_HOST" not in names  # the kubelet's, the `kubernetes` Service
    # The broker URL handed to pods names the bundled broker's Service, resolved by DNS.
    controllers = release.pods("app.kubernetes.io/component=controller")
    assert len(controllers) == 2  # the chart's default: a leader and a warm standby
    controller = controllers[0]
    env = {e["name"]: e for e in controller["spec"]["containers"][0].get("env", [])}
    assert f"{RELEASE}-vmfleet-broker" in json.dumps(env.get("VMFLEET_BROKER_URL", {}))


def test_commands_run_on_every_vm_through_pods(release: DefaultRelease, cluster_vms: list[SshdVM]) -> None:
    release.ns.run("hello", selector={"matchLabels": {"fleet": "prod"}},
                   command="echo hello from $(hostname)")
    obj = release.finished("hello", timeout=240)
    assert obj["status"]["phase"] == "Succeeded", obj["status"]
    results = {r["vm"]: r for r in obj["status"]["results"]}
    for vm in cluster_vms:
        assert results[vm.name]["exitCode"] == 0
        assert results[vm.name]["stdout"].strip() == f"hello from {vm.name}"


def test_workers_of_a_vm_with_several_replicas_and_of_a_pool_land_on_both_nodes(
        release: DefaultRelease, cluster_vms: list[SshdVM]) -> None:
    """RemoteVM ``wide`` (vm1) with 4 workers, and pool ``spread`` (``pa`` on vm2, ``pb``
    on vm3) with 4: each group's pods run on both nodes, and commands run through them."""
    def renamed(vm: SshdVM, name: str, **spec: Any) -> list[dict[str, Any]]:
        objects = vm_manifests(vm, release.ns.name, **spec)
        for obj in objects:
            if obj["kind"] == "RemoteVM":
                obj["metadata"]["name"] = name
        return objects

    release.kubectl.apply(*renamed(cluster_vms[0], "wide", workers={"replicas": 4}),
                          *renamed(cluster_vms[1], "pa", workerPool="spread", workers={"replicas": 4}),
                          *renamed(cluster_vms[2], "pb", workerPool="spread", workers={"replicas": 4}))

    def spread(selector: str) -> set[str] | None:
        pods = [p for p in release.pods(f"app.kubernetes.io/component=worker,{selector}")
                if p["status"].get("phase") == "Running"]
        return {p["spec"]["nodeName"] for p in pods} if len(pods) == 4 else None

    for selector in ("vmfleet.io/vm=wide", "vmfleet.io/pool=spread"):
        try:
            nodes = wait_until(lambda s=selector: spread(s), timeout=180, interval=1,
                               what=f"4 Running workers of {selector}")
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{release.diagnostics()}") from None
        assert nodes == {node_name(1), node_name(2)}, selector
    for name in ("wide", "pa", "pb"):
        release.ns.run(f"{name}-hello", vm=name, command="hostname")
    for name, vm in (("wide", "vm1"), ("pa", "vm2"), ("pb", "vm3")):
        obj = release.finished(f"{name}-hello")
        assert obj["status"]["phase"] == "Succeeded", obj["status"]
        assert obj["status"]["results"][0]["stdout"].strip() == vm
