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
import os
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.chart import CHART, helm_binary
from tests.e2e.fleet import REPO, Kubectl, Namespace, unique_namespace
from tests.e2e.release import RELEASE, DefaultRelease, image_values, install, new_release
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


OLD_COMMIT = "d088c06"  # chart 0.1.0 and its image: where issue 23 started
OLD_TAG = f"0.1.0-{OLD_COMMIT}"


def old_chart_and_image(workdir: Path) -> tuple[Path, Path]:
    """Chart 0.1.0 (``helm package`` of the chart at OLD_COMMIT) and that commit's image
    (its own ``scripts/build-image.sh``, cached per machine like ``make image``)."""
    # A fixed directory: that commit's build-image.sh keys its cache by its own path too.
    cache = Path(os.environ.get("VMFLEET_CACHE_DIR") or Path.home() / ".cache" / "vmfleet")
    source = cache / f"src-{OLD_COMMIT}"
    archive = subprocess.run(["git", "-C", str(REPO), "archive", OLD_COMMIT], capture_output=True,
                             check=False)
    if archive.returncode != 0:
        pytest.skip(f"commit {OLD_COMMIT} (chart 0.1.0) is not in this clone (a shallow one?): "
                    f"{archive.stderr.decode().strip()}")
    shutil.rmtree(source, ignore_errors=True)
    source.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(source)], input=archive.stdout, check=True)
    started = time.monotonic()
    built = subprocess.run(["bash", "scripts/build-image.sh"], cwd=source, stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, text=True, check=False, timeout=1200,
                           # The base `make image` built (the same build-base-image.sh): from
                           # another directory that script would build and re-tag it again.
                           env={**os.environ, "IMAGE": f"localhost/vmfleet:{OLD_TAG}",
                                "BASE_IMAGE": "localhost/vmfleet-base:bookworm-py3.11"})
    assert built.returncode == 0, f"building {OLD_COMMIT}'s image failed:\n{built.stdout[-2000:]}"
    print(f"\nthe image of {OLD_COMMIT} (chart 0.1.0): {time.monotonic() - started:.1f}s (cached after the first)")
    subprocess.run([helm_binary(), "package", str(source / "charts" / "vmfleet"), "-d", str(workdir)],
                   capture_output=True, check=True, timeout=120)
    return workdir / "vmfleet-0.1.0.tgz", Path(built.stdout.strip().splitlines()[-1])


def ended(release: DefaultRelease, name: str, timeout: float = 180) -> dict[str, Any]:
    """The RemoteCommand once its phase is final (0.1.0's status has no Finished condition
    to wait for, perhaps)."""
    def done() -> dict[str, Any] | None:
        obj = release.ns.get("remotecommand", name)
        return obj if obj.get("status", {}).get("phase") in ("Succeeded", "Failed") else None
    try:
        obj: dict[str, Any] = wait_until(done, timeout=timeout, interval=1, what=f"{name} to end")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{release.diagnostics()}") from None
    return obj


def test_helm_upgrade_from_chart_0_1_0_with_the_upgrade_notes(
        cluster: Cluster, cluster_image: str, cluster_redis_image: str, cluster_vms: list[SshdVM],
        tmp_path: Path) -> None:
    """Chart 0.1.0 with its image, installed with its CRDs (first in the module: the
    cluster has no CRDs yet) and running a command; then the CHANGELOG's notes for
    0.2.0: the new CRDs applied server-side, no command Queued or Running, ``helm upgrade
    --reset-then-reuse-values`` to the current chart and image. The old release's
    objects still read, its workers roll to the new image, commands run again."""
    chart, archive = old_chart_and_image(tmp_path)
    for node in cluster.nodes:
        node.import_image(archive)
    kubectl = Kubectl(cluster.cp.kubectl, cluster.cp.kubeconfig)
    ns = Namespace(kubectl, unique_namespace("old")).create()
    old = DefaultRelease(cluster, kubectl, ns, tmp_path)
    name = "old"
    values = tmp_path / "values.yaml"
    values.write_text(json.dumps({"image": {**image_values(cluster_image), "tag": OLD_TAG},
                                  "broker": {"bundled": {"image": image_values(cluster_redis_image)}}}))
    started = time.monotonic()
    try:
        old.helm_run("install", name, str(chart), "-f", str(values), "--wait", "--timeout", "240s",
                     timeout=300)
        ns.add_vms(cluster_vms[:1])
        ns.run("before", vm=cluster_vms[0].name, command="echo under 0.1.0")
        before = ended(old, "before")
        assert before["status"]["phase"] == "Succeeded", before["status"]
        # Note 1: the CRDs first (Helm never upgrades crds/).
        kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CHART / "crds"))
        # Note 2: nothing Queued or Running (0.1.0 signs nothing; 0.2.0's workers refuse that).
        phases = {o["status"].get("phase") for o in kubectl.get_json("-n", ns.name, "remotecommands")["items"]}
        assert not phases & {"Queued", "Running", "Pending"}, phases
        upgraded_at = time.monotonic()
        old.helm_run("upgrade", name, str(CHART), "--reset-then-reuse-values",
                     "--set", f"image.tag={cluster_image.rpartition(':')[2]}",
                     "--wait", "--timeout", "240s", timeout=300)
        kept = ns.get("remotecommand", "before")  # written by 0.1.0, read under the new schema
        assert kept["status"]["phase"] == "Succeeded"
        assert only_result(kept)["stdout"] == only_result(before)["stdout"] == "under 0.1.0\n"

        def rolled() -> bool:
            deploy = kubectl.get_json("-n", ns.name, "deployment", f"vmfleet-worker-{cluster_vms[0].name}")
            image = deploy["spec"]["template"]["spec"]["containers"][0]["image"]
            status = deploy.get("status", {})
            return image == cluster_image and status.get("updatedReplicas") == status.get("readyReplicas") == 1
        try:
            wait_until(rolled, timeout=180, interval=1, what="the VM's worker on the new image")
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{old.diagnostics()}") from None
        ns.run("after", vm=cluster_vms[0].name, command="echo under 0.2.0")
        after = ended(old, "after")
        assert after["status"]["phase"] == "Succeeded", after["status"]
        controllers = old.pods("app.kubernetes.io/component=controller")
        assert len(controllers) == 2 and {p["spec"]["containers"][0]["image"] for p in controllers} == {
            cluster_image}
        print(f"\n[figures] helm upgrade 0.1.0 → current: upgraded and a command Succeeded "
              f"{time.monotonic() - upgraded_at:.1f}s after the upgrade began "
              f"({upgraded_at - started:.1f}s for 0.1.0's install and its command)")
    finally:
        # The RemoteVMs (their workers) first, while the bundled broker still answers: a
        # worker stopping without a broker waits out its grace (300 s). Then the release.
        ended_at = time.monotonic()
        ns.k("delete", "remotevms", "--all", "--wait=true", "--timeout=120s", check=False, timeout=150)
        try:
            wait_until(lambda: not old.pods("app.kubernetes.io/component=worker"), timeout=120,
                       interval=1, what="the old release's workers to go")
        finally:
            subprocess.run([old.helm, "uninstall", name, "-n", ns.name, "--kubeconfig",
                            str(cluster.cp.kubeconfig), "--wait", "--timeout", "60s"],
                           capture_output=True, timeout=120, env=cluster.cp.env(), check=False)
            kubectl("delete", "namespace", ns.name, "--timeout=120s", check=False, timeout=150)
            print(f"\nthe old release removed in {time.monotonic() - ended_at:.1f}s")


@pytest.fixture(scope="module")
def release(cluster: Cluster, cluster_image: str, cluster_redis_image: str,
            cluster_vms: list[SshdVM], tmp_path_factory: pytest.TempPathFactory) -> Iterator[DefaultRelease]:
    # The images are the only values given: everything else is the chart's default.
    rel = new_release(cluster, "prod", tmp_path_factory.mktemp("release"), cluster_image, cluster_redis_image)
    ns = rel.ns
    started = time.monotonic()
    install(rel)
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


# ------------------------------------------------------------------ disruptions, on the pod network
#
# The same release, in order: its broker switched to persistence (a static local
# PersistentVolume on node 1, which pins the broker there), the broker pod deleted under
# 100 commands, a drain of node 2, a `helm upgrade` to a new image tag, node 2 lost. Every
# command appends its name to a file on its VM: how often each ran is counted there.

BROKER = f"{RELEASE}-vmfleet-broker"
CONTROLLER = f"{RELEASE}-vmfleet-controller"
LOCAL_STORAGE_CLASS = "vmfleet-local"
REDIS_UID = 10001  # the chart's podSecurityContext
UPGRADE_TAG = "0.2.0-rolled"


def uid() -> str:
    return uuid.uuid4().hex[:6]


def results_of(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["vm"]: r for r in obj.get("status", {}).get("results", [])}


def only_result(obj: dict[str, Any]) -> dict[str, Any]:
    (result,) = results_of(obj).values() or [{}]
    return result


def runs_on(vms: list[SshdVM], path: str) -> list[str]:
    """The lines every VM's ``path`` holds (each VM has its own /tmp)."""
    lines: list[str] = []
    for vm in vms:
        try:
            lines += vm.host_path(path).read_text().split("\n")
        except FileNotFoundError:
            pass
    return [line for line in lines if line]


def finished(release: DefaultRelease, label: str, count: int, timeout: float) -> dict[str, dict[str, Any]]:
    """Wait until the ``count`` RemoteCommands labelled ``prod-test=label`` are Finished."""
    def done() -> dict[str, dict[str, Any]] | None:
        items = release.kubectl.get_json("-n", release.ns.name, "remotecommands", "-l",
                                         f"prod-test={label}")["items"]
        ended = {o["metadata"]["name"]: o for o in items
                 if any(c["type"] == "Finished" and c["status"] == "True"
                        for c in o.get("status", {}).get("conditions", []))}
        return ended if len(ended) == count else None
    try:
        result: dict[str, dict[str, Any]] = wait_until(done, timeout=timeout, interval=1,
                                                       what=f"{count} commands {label} to finish")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{release.diagnostics()}") from None
    return result


def submit(release: DefaultRelease, label: str, commands: list[tuple[str, str, dict[str, Any]]]) -> None:
    """Create RemoteCommands (name, RemoteVM, spec extras), all in one request."""
    items = []
    for name, vm, extra in commands:
        obj = release.ns.command(name, vm=vm, **extra)
        obj["metadata"]["labels"] = {"prod-test": label}
        items.append(obj)
    release.kubectl.apply({"apiVersion": "v1", "kind": "List", "items": items})


def running_results(release: DefaultRelease, label: str) -> dict[str, dict[str, Any]]:
    items = release.kubectl.get_json("-n", release.ns.name, "remotecommands", "-l",
                                     f"prod-test={label}")["items"]
    return {o["metadata"]["name"]: only_result(o) for o in items
            if only_result(o).get("phase") == "Running"}


def tally(objects: dict[str, dict[str, Any]], runs: list[str]) -> dict[str, Any]:
    """What a disruption did: commands not Succeeded, lost to a worker, retried, run twice."""
    results = {name: only_result(obj) for name, obj in objects.items()}
    return {
        "lost": sorted(n for n, o in objects.items() if o["status"]["phase"] != "Succeeded"),
        "workerLost": sorted(n for n, r in results.items() if r.get("reason") == "WorkerLost"),
        "retried": sorted(n for n, r in results.items() if r.get("attempt", 1) != 1),
        "twice": sorted({n for n in runs if runs.count(n) > 1}),
        "missing": sorted(set(objects) - set(runs)),
    }


def figures(what: str, counts: dict[str, Any], extra: str = "") -> None:
    print(f"\n[figures] {what}: lost {len(counts['lost'])}, WorkerLost {len(counts['workerLost'])}, "
          f"retried {len(counts['retried'])}, run twice {len(counts['twice'])}{extra}")


def rename(vm: SshdVM, ns: str, name: str, **spec: Any) -> list[dict[str, Any]]:
    objects = vm_manifests(vm, ns, **spec)
    for obj in objects:
        if obj["kind"] == "RemoteVM":
            obj["metadata"]["name"] = name
    return objects


def running_workers(release: DefaultRelease, vm: str, count: int, timeout: float = 180) -> list[dict[str, Any]]:
    def ready() -> list[dict[str, Any]] | None:
        pods = [p for p in release.pods(f"app.kubernetes.io/component=worker,vmfleet.io/vm={vm}")
                if any(c["type"] == "Ready" and c["status"] == "True"
                       for c in p.get("status", {}).get("conditions", []))]
        return pods if len(pods) == count else None
    try:
        pods: list[dict[str, Any]] = wait_until(ready, timeout=timeout, interval=1,
                                                what=f"{count} Ready workers of {vm}")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{release.diagnostics()}") from None
    return pods


def worker_pod_of(result: dict[str, Any]) -> str:
    """The pod that ran an attempt: its worker's name is ``<deployment>@<pod hostname>``."""
    return str(result.get("worker", "")).rpartition("@")[2]


def broker_pod(release: DefaultRelease) -> dict[str, Any] | None:
    pods = [p for p in release.pods("app.kubernetes.io/component=broker")
            if any(c["type"] == "Ready" and c["status"] == "True"
                   for c in p.get("status", {}).get("conditions", []))]
    return pods[0] if len(pods) == 1 else None


@pytest.fixture(scope="module")
def persistent_broker(cluster: Cluster, release: DefaultRelease, cluster_vms: list[SshdVM]) -> dict[str, Any]:
    """The bundled broker switched to ``broker.bundled.persistence`` by ``helm upgrade``:
    a StatefulSet whose claim binds a static local PersistentVolume on node 1 (a storage
    class without provisioner, as a cluster with local disks has). The volume's node
    affinity pins the broker to node 1, so node 2 can be drained and lost. Its pod."""
    path = cluster.workdir / "broker-volume"
    path.mkdir(exist_ok=True)
    os.chown(path, REDIS_UID, REDIS_UID)
    path.chmod(0o770)
    release.kubectl.apply(
        {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
         "metadata": {"name": LOCAL_STORAGE_CLASS},
         "provisioner": "kubernetes.io/no-provisioner", "volumeBindingMode": "WaitForFirstConsumer"},
        {"apiVersion": "v1", "kind": "PersistentVolume",
         "metadata": {"name": "vmfleet-broker-data"},
         "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                  "persistentVolumeReclaimPolicy": "Retain", "storageClassName": LOCAL_STORAGE_CLASS,
                  "local": {"path": str(path)},
                  "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                      {"key": "kubernetes.io/hostname", "operator": "In", "values": [node_name(1)]}]}]}}}})
    release.ns.add_vms(cluster_vms, labels={"fleet": "prod"}, maxConcurrentCommands=10)
    started = time.monotonic()
    release.helm_run("upgrade", RELEASE, str(CHART), "--reuse-values",
                     "--set", "broker.bundled.persistence.enabled=true",
                     "--set", f"broker.bundled.persistence.storageClassName={LOCAL_STORAGE_CLASS}",
                     "--set", "broker.bundled.persistence.size=1Gi",
                     "--wait", "--timeout", "180s", timeout=240)
    kind = release.kubectl("-n", release.ns.name, "get", "statefulset", BROKER, "-o", "name").stdout.strip()
    assert kind == f"statefulset.apps/{BROKER}"
    pod = wait_until(lambda: broker_pod(release), timeout=120, interval=1, what="the broker pod Ready")
    print(f"\nhelm upgrade to broker.bundled.persistence: {time.monotonic() - started:.1f}s")
    assert pod["spec"]["nodeName"] == node_name(1)
    claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"]
              if "persistentVolumeClaim" in v]
    assert claims == [f"data-{BROKER}-0"]
    return pod


def test_the_broker_pod_deleted_under_100_commands_loses_none(
        release: DefaultRelease, persistent_broker: dict[str, Any], cluster_vms: list[SshdVM]) -> None:
    """``kubectl delete pod`` of the persistent broker (gracefully: Redis writes its
    append-only file and exits) while 100 commands are queued or running on vm1..vm3:
    all 100 end Succeeded, each ran once (counted on the VMs)."""
    label = f"redis-{uid()}"
    path = f"/tmp/{label}"
    names = [f"{label}-{i:03d}" for i in range(100)]
    vms = [vm.name for vm in cluster_vms]
    # Paused while the 100 are created (one request each): all of them wait, none ran yet.
    for vm in vms:
        release.ns.k("patch", "remotevm", vm, "--type=merge", "-p", '{"spec":{"paused":true}}')
    submit(release, label, [(name, vms[i % 3], {"command": f"echo {name} >> {path}; sleep 1"})
                            for i, name in enumerate(names)])
    started = time.monotonic()
    for vm in vms:
        release.ns.k("patch", "remotevm", vm, "--type=merge", "-p", '{"spec":{"paused":false}}')
    wait_until(lambda: len(runs_on(cluster_vms, path)) >= 3, timeout=120, interval=0.2,
               what="the first commands to run")
    old = broker_pod(release)
    assert old is not None
    before = len(runs_on(cluster_vms, path))
    deleted = time.monotonic()
    release.ns.k("delete", "pod", old["metadata"]["name"], "--wait=false")

    def back() -> dict[str, Any] | None:
        pod = broker_pod(release)
        return pod if pod is not None and pod["metadata"]["uid"] != old["metadata"]["uid"] else None
    new = wait_until(back, timeout=120, interval=0.5, what="the new broker pod Ready")
    outage = time.monotonic() - deleted
    assert new["spec"]["nodeName"] == node_name(1)
    objects = finished(release, label, len(names), timeout=300)
    counts = tally(objects, runs_on(cluster_vms, path))
    figures("broker pod deleted with 100 commands queued or running", counts,
            f"; {before} had run when it was deleted {deleted - started:.1f}s after the VMs were "
            f"resumed, the new pod Ready after {outage:.1f}s, the other {len(names) - before} "
            f"finished {time.monotonic() - deleted:.1f}s after the deletion")
    release.ns.k("delete", "remotecommands", "-l", f"prod-test={label}", "--wait=false")
    assert 0 < before < len(names), "the broker was not deleted while commands were queued"
    assert counts["lost"] == [] and counts["twice"] == [] and counts["missing"] == [], counts


def test_a_drain_of_a_node_holding_workers_loses_nothing(
        release: DefaultRelease, persistent_broker: dict[str, Any], cluster_vms: list[SshdVM]) -> None:
    """``kubectl drain`` of node 2 while RemoteVM ``dr``'s two workers (one per node,
    under their PodDisruptionBudget) run 12 commands of 8 s: every evicted worker pod
    finishes what it runs and takes nothing new; all Succeeded, none WorkerLost, none
    retried, none twice. The controller's PodDisruptionBudget keeps one replica."""
    release.kubectl.apply(*rename(cluster_vms[1], release.ns.name, "dr", maxConcurrentCommands=6,
                                  workers={"replicas": 2}))
    pods = running_workers(release, "dr", 2)
    assert {p["spec"]["nodeName"] for p in pods} == {node_name(1), node_name(2)}
    budget = release.kubectl.get_json("-n", release.ns.name, "poddisruptionbudget", "vmfleet-worker-dr")
    assert budget["spec"]["maxUnavailable"] == 1
    controller_budget = release.kubectl.get_json("-n", release.ns.name, "poddisruptionbudget", CONTROLLER)
    assert controller_budget["spec"]["maxUnavailable"] == 1
    label = f"drain-{uid()}"
    path = f"/tmp/{label}"
    names = [f"{label}-{i:02d}" for i in range(12)]
    submit(release, label, [(name, "dr", {"command": f"sleep 8; echo {name} >> {path}"})
                            for name in names])
    wait_until(lambda: len(running_results(release, label)) >= 6, timeout=120, interval=0.5,
               what="6 commands running")
    on_node2 = {p["metadata"]["name"] for p in release.pods("app.kubernetes.io/name=vmfleet")
                if p["spec"].get("nodeName") == node_name(2)}
    started = time.monotonic()
    gone: dict[str, float] = {}  # each pod of node 2: when it was gone, for the figures
    watching = threading.Event()

    def watch() -> None:
        while not watching.wait(1):
            present = {p["metadata"]["name"] for p in release.kubectl.get_json(
                "-n", release.ns.name, "pods", "-l", "app.kubernetes.io/name=vmfleet")["items"]}
            for pod in on_node2 - present - set(gone):
                gone[pod] = time.monotonic() - started
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        drain = release.kubectl("drain", node_name(2), "--ignore-daemonsets", "--delete-emptydir-data",
                                "--pod-selector=app.kubernetes.io/name=vmfleet", "--timeout=240s",
                                check=False, timeout=300)
        drained = time.monotonic() - started
        watching.set()
        assert drain.returncode == 0, f"{drain.stdout}\n{drain.stderr}\n{release.diagnostics()}"
        objects = finished(release, label, len(names), timeout=180)
    finally:
        release.kubectl("uncordon", node_name(2), check=False)
    counts = tally(objects, runs_on(cluster_vms, path))
    evicted = sorted(n for n, o in objects.items() if worker_pod_of(only_result(o)) in on_node2)
    figures(f"kubectl drain of node 2 with 12 commands of 8 s ({len(evicted)} on its worker)", counts,
            f"; the drain took {drained:.1f}s")
    print("pods of node 2 gone after: " + ", ".join(f"{pod} {at:.0f}s" for pod, at in sorted(gone.items())))
    release.kubectl("-n", release.ns.name, "delete", "remotevm", "dr", "--wait=false")
    release.ns.k("delete", "remotecommands", "-l", f"prod-test={label}", "--wait=false")
    assert evicted, "no command ran on the drained node's worker: this shows nothing"
    assert counts == {"lost": [], "workerLost": [], "retried": [], "twice": [], "missing": []}, counts
    assert not [p for p in release.pods("app.kubernetes.io/name=vmfleet")
                if p["spec"].get("nodeName") == node_name(2)], "pods left on the drained node"


def test_helm_upgrade_to_a_new_tag_while_commands_run_loses_nothing(
        cluster: Cluster, cluster_image: str, release: DefaultRelease,
        persistent_broker: dict[str, Any], cluster_vms: list[SshdVM]) -> None:
    """``helm upgrade`` to a new image tag rolls the controller and every worker
    Deployment while 5 RemoteVMs (maxConcurrentCommands 5, grace 20 s) run 50 commands
    of 6 s (two waves): all Succeeded, none WorkerLost, none retried, none twice.
    (The issue asks 10 VMs; 5 keep the CI budget on 2 cores: 5 more worker pods, rolled.)"""
    grace = 20
    vms = {f"up{i}": cluster_vms[i % 3] for i in range(5)}
    release.kubectl.apply(*[obj for name, vm in vms.items()
                            for obj in rename(vm, release.ns.name, name, maxConcurrentCommands=5,
                                              workers={"terminationGracePeriodSeconds": grace})])
    old_pods = {name: running_workers(release, name, 1)[0]["metadata"]["uid"] for name in vms}
    label = f"upgrade-{uid()}"
    path = f"/tmp/{label}"
    names = [f"{label}-{i:02d}" for i in range(50)]
    submit(release, label, [(name, list(vms)[i % 5], {"command": f"sleep 6; echo {name} >> {path}"})
                            for i, name in enumerate(names)])
    wait_until(lambda: len(running_results(release, label)) >= 20, timeout=120, interval=0.5,
               what="20 commands running")
    repository = cluster_image.rpartition(":")[0]
    for node in cluster.nodes:
        node.ctr("images", "tag", "--force", cluster_image, f"{repository}:{UPGRADE_TAG}")
    started = time.monotonic()
    release.helm_run("upgrade", RELEASE, str(CHART), "--reuse-values", "--set", f"image.tag={UPGRADE_TAG}",
                     "--wait", "--timeout", "240s", timeout=300)
    objects = finished(release, label, len(names), timeout=300)

    def rolled() -> bool:
        for name in vms:
            pods = running_workers(release, name, 1)
            if pods[0]["metadata"]["uid"] == old_pods[name] or \
                    not pods[0]["spec"]["containers"][0]["image"].endswith(f":{UPGRADE_TAG}"):
                return False
        return True
    wait_until(rolled, timeout=180, interval=1, what="every worker on the new tag")
    rolled_in = time.monotonic() - started
    counts = tally(objects, runs_on(cluster_vms, path))
    figures("helm upgrade to a new tag with 50 commands on 5 VMs", counts,
            f"; controller and workers rolled in {rolled_in:.1f}s")
    release.kubectl("-n", release.ns.name, "delete", "remotevm", *vms, "--wait=false")
    release.ns.k("delete", "remotecommands", "-l", f"prod-test={label}", "--wait=false")
    assert counts == {"lost": [], "workerLost": [], "retried": [], "twice": [], "missing": []}, counts
    for pod in release.pods("app.kubernetes.io/component=controller"):
        assert pod["spec"]["containers"][0]["image"].endswith(f":{UPGRADE_TAG}")


def test_a_node_lost_its_workers_commands_are_retried_on_the_other_node(
        cluster: Cluster, release: DefaultRelease, persistent_broker: dict[str, Any],
        cluster_vms: list[SshdVM]) -> None:
    """Node 2 lost: its kubelet, containerd, the shims and every process of its pods
    SIGKILLed. RemoteVM ``nl``'s worker there was running commands (retries.limit 1,
    backoff 0): they end WorkerLost and their second attempt runs on the node-1 worker
    within 60 s; the others finish on node 1 once. The eviction tolerations are the
    defaults (300 s): the node-1 worker was already there. Last of the module: node 2
    stays lost (its Node object is deleted so its pods go)."""
    release.kubectl.apply(*rename(cluster_vms[2], release.ns.name, "nl", maxConcurrentCommands=8,
                                  workers={"replicas": 2}))
    pods = {p["metadata"]["name"]: p["spec"]["nodeName"] for p in running_workers(release, "nl", 2)}
    assert set(pods.values()) == {node_name(1), node_name(2)}, pods
    # The controller's two replicas are spread too (after the upgrade's rollout as well):
    # node 2 takes one of them, leader or standby.
    controllers = {p["spec"]["nodeName"] for p in release.pods("app.kubernetes.io/component=controller")}
    assert controllers == {node_name(1), node_name(2)}, controllers
    label = f"lost-{uid()}"
    path = f"/tmp/{label}"
    names = [f"{label}-{i}" for i in range(8)]
    script = ("if [ -e {path}.{name} ]; then echo {name} >> {path}; echo {name} $(date +%s.%N) >> {path}.retry; "
              "else touch {path}.{name}; echo {name} >> {path}; sleep 40; echo {name}.done >> {path}; fi")
    submit(release, label, [(name, "nl", {"command": script.format(path=path, name=name),
                                          "retries": {"limit": 1, "backoffSeconds": 0}})
                            for name in names])
    running = wait_until(lambda: (r := running_results(release, label)) and len(r) == len(names) and r,
                         timeout=120, interval=0.5, what="all 8 commands running")
    on_node2 = sorted(n for n, r in running.items() if pods.get(worker_pod_of(r)) == node_name(2))
    assert on_node2, f"no command runs on node 2's worker: {running}"
    killed = time.time()
    try:
        cluster.kill_node(2)
        objects = finished(release, label, len(names), timeout=180)
    finally:
        release.kubectl("delete", "node", node_name(2), "--wait=false", check=False)
    retried_at = {}
    retry_file = cluster_vms[2].host_path(f"{path}.retry")
    for line in retry_file.read_text().split("\n") if retry_file.exists() else []:
        if line:
            name, at = line.split()
            retried_at[name] = float(at) - killed
    runs = runs_on([cluster_vms[2]], path)
    results = {n: only_result(o) for n, o in objects.items()}
    slowest = max(retried_at.values(), default=float("nan"))
    print(f"\n[figures] node 2 lost ({len(on_node2)} of 8 commands on its worker): "
          f"retried on node 1 {min(retried_at.values(), default=float('nan')):.1f}–{slowest:.1f}s "
          f"after the kill; {sum(1 for r in results.values() if r['phase'] != 'Succeeded')} not Succeeded")
    release.kubectl("-n", release.ns.name, "delete", "remotevm", "nl", "--wait=false")
    for name in names:
        result = results[name]
        assert result["phase"] == "Succeeded", (name, result)
        if name in on_node2:
            assert result["attempt"] == 2, (name, result)
            assert pods.get(worker_pod_of(result)) == node_name(1), (name, result)
            assert runs.count(name) == 2 and f"{name}.done" not in runs, (name, runs)
        else:
            assert result["attempt"] == 1, (name, result)
            assert runs.count(name) == 1 and runs.count(f"{name}.done") == 1, (name, runs)
    assert sorted(retried_at) == on_node2
    assert slowest <= 60, f"retried {slowest:.0f}s after the node was lost"
