"""A local cluster shaped like a user's: a pod network, Services, cluster DNS, two nodes.

Everything runs inside one network namespace (``vmfleet.dev.netns``), as kind puts a
node in a container; the host reaches the API server through a loopback relay::

    cluster = Cluster(workdir, exit_with_parent=True).start()
    cluster.cp.kubectl_run("get", "nodes")      # vmfleet-node-1, vmfleet-node-2 Ready
    cluster.nodes[0].import_image(archive)
    ...
    cluster.stop()                               # the namespace goes with it

Parts, all in the namespace: the control plane (``ControlPlane(network=...)``: etcd,
kube-apiserver on ``10.250.0.1:6443``, kube-controller-manager); node N (``Node``:
containerd, a kubelet, pods on bridge ``cni(N-1)``; node 1 also runs kube-scheduler);
kube-proxy in iptables mode (one for the namespace: the nodes share its iptables); and
CoreDNS (``build-coredns.sh``) on port 53 of the namespace's addresses, behind the ``kube-dns`` Service
``10.0.0.10`` of ``kube-system`` — a Service without selector whose EndpointSlice names
that address, so pods' queries go through kube-proxy like any Service's. The Service
range is routed on the nodes' link, as a node's default route carries it, so that the
API server reaches an APIService's ClusterIP (the output API) through kube-proxy too.

Work directory layout::

    cluster.json          the namespace, for ``from_state`` (``vmfleet dev down``)
    controlplane/         ControlPlane's work directory (kubeconfig: the admin's)
    node1/, node2/        each Node's
    kube-proxy.log, coredns.log, Corefile, *.kubeconfig
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from vmfleet.dev.controlplane import BUILD_SCRIPT, DNS_USER, PROXY_USER, ControlPlane
from vmfleet.dev.netns import (
    CLUSTER_DOMAIN,
    DNS_SERVICE_IP,
    NODES_BRIDGE,
    POD_CIDR,
    SERVICE_CIDR,
    NetNamespace,
    name_for,
    node_ip,
    node_pod_cidr,
)
from vmfleet.dev.node import Node, NodeError
from vmfleet.dev.podnet import node_name, pod_netns_paths, remove_pod_netns
from vmfleet.procs import (
    ManagedProcess,
    free_port,
    stop_pid_file,
    wait_until,
    write_pid_file,
)

COREDNS_BUILD_SCRIPT = BUILD_SCRIPT.parent / "build-coredns.sh"
REDIS_IMAGE_SCRIPT = BUILD_SCRIPT.parents[3] / "scripts" / "build-redis-image.sh"
#: Use this binary instead of building one (a vmfleet-coredns build).
COREDNS_BINARY_ENV = "VMFLEET_COREDNS_BINARY"
DNS_PORT = 53

_DNS_RBAC = f"""\
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {{name: "{DNS_USER}"}}
rules:
- apiGroups: [""]
  resources: [services, namespaces, pods]
  verbs: [list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {{name: "{DNS_USER}"}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "{DNS_USER}"}}
subjects:
- {{apiGroup: rbac.authorization.k8s.io, kind: User, name: "{DNS_USER}"}}
---
apiVersion: v1
kind: Service
metadata:
  name: kube-dns
  namespace: kube-system
  labels: {{k8s-app: kube-dns}}
spec:
  clusterIP: {DNS_SERVICE_IP}
  ports:
  - {{name: dns, port: 53, protocol: UDP, targetPort: {DNS_PORT}}}
  - {{name: dns-tcp, port: 53, protocol: TCP, targetPort: {DNS_PORT}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: kube-dns-vmfleet
  namespace: kube-system
  labels:
    kubernetes.io/service-name: kube-dns
    endpointslice.kubernetes.io/managed-by: vmfleet.dev
addressType: IPv4
endpoints:
- addresses: ["{node_ip(1)}"]
  conditions: {{ready: true}}
ports:
- {{name: dns, port: {DNS_PORT}, protocol: UDP}}
- {{name: dns-tcp, port: {DNS_PORT}, protocol: TCP}}
"""


def ensure_coredns_built() -> Path:
    """Build vmfleet-coredns if this machine has none yet (``build-coredns.sh``, cached);
    its path. ``$VMFLEET_COREDNS_BINARY`` names a prebuilt one instead."""
    override = os.environ.get(COREDNS_BINARY_ENV)
    if override:
        return Path(override)
    result = subprocess.run(["bash", str(COREDNS_BUILD_SCRIPT)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, text=True, check=False)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"{COREDNS_BUILD_SCRIPT} failed with exit code {result.returncode}")
    return Path(lines[-1])


def build_redis_image() -> Path:
    """The chart's bundled broker image made from Debian's redis-server
    (``scripts/build-redis-image.sh``, cached); its docker-archive (``image.txt``
    beside it names the image)."""
    result = subprocess.run(["bash", str(REDIS_IMAGE_SCRIPT)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, text=True, check=False)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"{REDIS_IMAGE_SCRIPT} failed with exit code {result.returncode}")
    return Path(lines[-1])


class Cluster:
    """The namespace, the control plane, ``node_count`` nodes, kube-proxy and CoreDNS."""

    def __init__(self, workdir: Path, *, node_count: int = 2, exit_with_parent: bool = False) -> None:
        self.workdir = Path(workdir).resolve()
        self.exit_with_parent = exit_with_parent
        self.network = NetNamespace(name_for(self.workdir))
        names = [node_name(i) for i in range(1, node_count + 1)]
        self.cp = ControlPlane(self.workdir / "controlplane", exit_with_parent=exit_with_parent,
                               network=self.network, node_names=names,
                               extra_controller_manager_args=[f"--cluster-cidr={POD_CIDR}"])
        self.nodes = [Node(self.workdir / f"node{i}", self.cp, exit_with_parent=exit_with_parent,
                           network=self.network, index=i, scheduler=i == 1)
                      for i in range(1, node_count + 1)]
        self.processes: dict[str, ManagedProcess] = {}
        self.state_file = self.workdir / "cluster.json"
        self._lost_netns: list[Path] = []  # the pods' namespaces of killed nodes

    def start(self, timeout: float = 240) -> Cluster:
        coredns = ensure_coredns_built()  # may build: not counted in the timeout
        self.cp.binary  # noqa: B018 - the same for the control plane's build
        deadline = time.monotonic() + timeout
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(json.dumps({"netns": self.network.name}) + "\n")
        try:
            self.network.create()
            self._route_services()
            self.cp.start(timeout=max(30.0, deadline - time.monotonic()))
            for node in self.nodes:
                node.start(timeout=max(30.0, deadline - time.monotonic()))
                self._record_pod_cidr(node)
            self._start_kube_proxy()
            self._start_coredns(coredns)
            wait_until(self._dns_ready, max(10.0, deadline - time.monotonic()), interval=0.3,
                       what="CoreDNS ready")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop everything (CoreDNS, kube-proxy, the nodes, the control plane) and
        delete the namespace. Also what a killed run left, found by pid files."""
        for name in ("coredns", "kube-proxy"):
            process = self.processes.pop(name, None)
            if process is not None:
                process.stop(5)
            stop_pid_file(self.workdir / f"{name}.pgid", 5)
        for node in reversed(self.nodes):
            leftovers = self._pod_netns(node)
            node.stop()
            remove_pod_netns(leftovers)
        remove_pod_netns(self._lost_netns)
        self._lost_netns = []
        self.cp.stop()
        self.network.delete()
        self.state_file.unlink(missing_ok=True)

    def kill_node(self, index: int) -> None:
        """Lose node ``index`` (1-based) as a machine that dies (``Node.kill``); its pods'
        network namespaces, which its dead containerd can no longer name, are noted
        first and removed by ``stop()``."""
        node = self.nodes[index - 1]
        self._lost_netns += self._pod_netns(node)
        node.kill()

    @classmethod
    def from_state(cls, workdir: Path) -> Cluster:
        """The cluster another process left running in ``workdir``, to ``stop()`` it."""
        cluster = cls(workdir)
        try:
            cluster.cp = ControlPlane.from_state(cluster.workdir / "controlplane")
        except FileNotFoundError:  # it never came up: its processes have pid files only
            pass
        cluster.nodes = [Node.from_state(path) for path in sorted(cluster.workdir.glob("node*"))
                         if path.is_dir()]
        return cluster

    def check_running(self) -> None:
        self.cp.check_running()
        for node in self.nodes:
            node.check_running()
        for process in self.processes.values():
            process.check_running()

    @staticmethod
    def _pod_netns(node: Node) -> list[Path]:
        """The network namespaces of the node's pods, while its containerd answers."""
        if not node.socket.exists():
            return []
        try:
            ids = node.ctr("containers", "list", "--quiet").split()
            infos = [json.loads(node.ctr("containers", "info", cid)) for cid in ids]
        except (NodeError, ValueError):
            return []
        return pod_netns_paths(infos)

    # -- kube-proxy and CoreDNS ------------------------------------------------------

    def _start(self, name: str, argv: list[str]) -> ManagedProcess:
        env = dict(os.environ)
        env.pop("VMFLEET_CONTROLPLANE_PARENT_PID", None)
        if self.exit_with_parent:
            if name == "kube-proxy":
                env["VMFLEET_CONTROLPLANE_PARENT_PID"] = str(os.getpid())
            elif shutil.which("setpriv"):
                argv = ["setpriv", "--pdeathsig", "TERM", "--", *argv]
        log = self.workdir / f"{name}.log"
        process = ManagedProcess(name, [*self.network.exec_prefix(), *argv], log,
                                 env=env, cwd=self.workdir).start()
        self.processes[name] = process
        write_pid_file(process, self.workdir / f"{name}.pgid")
        return process

    def _record_pod_cidr(self, node: Node) -> None:
        """Write the node's pod range (its CNI configuration's) into its spec, as a
        cluster's IPAM controller would: it is set once, and the same on every start."""
        cidr = node_pod_cidr(node.index)
        current = self.cp.kubectl_run("get", "node", node.name, "-o", "jsonpath={.spec.podCIDR}").stdout
        if current == cidr:
            return
        if current:
            raise NodeError(f"Node {node.name} has pod range {current}, its CNI configuration {cidr}")
        patch = {"spec": {"podCIDR": cidr, "podCIDRs": [cidr]}}
        self.cp.kubectl_run("patch", "node", node.name, "--type=merge", "-p", json.dumps(patch))

    def _route_services(self) -> None:
        """Route the Service range on the nodes' link, as a node's default route carries
        it: the API server and host-network processes connect to a ClusterIP (an
        APIService's, a webhook's) and kube-proxy's OUTPUT rules rewrite it to a pod.
        Without a route the connect fails before any rule is seen ("network is
        unreachable"); pods, whose default route is their node's bridge, never need it."""
        self.network.ip("route", "replace", str(SERVICE_CIDR), "dev", NODES_BRIDGE, "src", node_ip(1))

    def _start_kube_proxy(self) -> None:
        """kube-proxy, iptables mode, for the whole namespace. It leaves the
        namespace's conntrack sysctls alone (they are the host's in a child namespace)."""
        kubeconfig = self.cp.component_kubeconfig(PROXY_USER, self.workdir / "kube-proxy.kubeconfig")
        config = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(kubeconfig)},
            "mode": "iptables",
            "clusterCIDR": str(POD_CIDR),
            "hostnameOverride": self.nodes[0].name,
            "healthzBindAddress": f"127.0.0.1:{free_port()}",
            "metricsBindAddress": f"127.0.0.1:{free_port()}",
            "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s",
                          "tcpCloseWaitTimeout": "0s"},
            "iptables": {"syncPeriod": "10s", "minSyncPeriod": "0s"},
        }
        path = self.workdir / "kube-proxy-config.json"
        path.write_text(json.dumps(config, indent=2) + "\n")
        self._start("kube-proxy", [str(self.cp.binary), "kube-proxy", f"--config={path}"])

    def _start_coredns(self, binary: Path) -> None:
        self.cp.kubectl_run("apply", "-f", "-", input=_DNS_RBAC)
        kubeconfig = self.cp.component_kubeconfig(DNS_USER, self.workdir / "coredns.kubeconfig")
        self._ready_port = free_port()
        corefile = self.workdir / "Corefile"
        corefile.write_text(f"""\
.:{DNS_PORT} {{
    errors
    ready 127.0.0.1:{self._ready_port}
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig}
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
    cache 5
    loadbalance
}}
""")
        self._start("coredns", [str(binary), "-conf", str(corefile)])

    def _dns_ready(self) -> bool:
        self.check_running()

        def probe() -> bool:
            import urllib.request

            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            with opener.open(f"http://127.0.0.1:{self._ready_port}/ready", timeout=2) as response:
                return bool(response.status == 200)

        try:
            return self.network.run_inside(probe)
        except OSError:
            return False


__all__ = ["Cluster", "NodeError", "build_redis_image", "ensure_coredns_built"]
