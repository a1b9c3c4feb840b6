"""The network namespace of the local pod-network cluster, and a loopback relay into it.

Every address of the cluster that is not loopback — the nodes' and the control plane's,
the pod and Service ranges, the bridges, kube-proxy's iptables rules, the sshd VMs'
addresses — lives inside ONE network namespace, ``vmfleet-<id>``, that this module
creates (as kind puts a node in a container). Nothing of it appears in the machine's
root namespace: no route, address or rule is ever set there. The host reaches what it
needs through loopback: a ``Relay`` forwards ``127.0.0.1:PORT`` to a unix socket, and
a process inside the namespace forwards that socket to an address of the namespace.

Addressing (all inside the namespace)::

    10.250.0.0/24   bridge vmf-nodes: the nodes' addresses (10.250.0.N for node N;
                    node 1 also serves the control plane)
    10.251.0.0/24   bridge vmf-vms: the sshd VMs' addresses (pods reach them by routing)
    10.244.0.0/16   pods; node N's containerd hands out 10.244.(N-1).0/24 on bridge cni(N-1)
    10.0.0.0/24     Services (the ``kubernetes`` Service 10.0.0.1, cluster DNS 10.0.0.10)

Root only (``ip netns``, ``nsenter``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import ipaddress
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from vmfleet.procs import (
    ManagedProcess,
    free_port,
    stop_pid_file,
    wait_until,
    write_pid_file,
)

NETNS_DIR = Path("/run/netns")
NODES_BRIDGE = "vmf-nodes"
NODES_SUBNET = ipaddress.ip_network("10.250.0.0/24")
VMS_BRIDGE = "vmf-vms"
VMS_SUBNET = ipaddress.ip_network("10.251.0.0/24")
POD_CIDR = ipaddress.ip_network("10.244.0.0/16")
SERVICE_CIDR = ipaddress.ip_network("10.0.0.0/24")
KUBERNETES_SERVICE_IP = "10.0.0.1"
DNS_SERVICE_IP = "10.0.0.10"
CLUSTER_DOMAIN = "cluster.local"
#: The port kube-apiserver listens on inside the namespace (its own address: no clash).
APISERVER_PORT = 6443
_CLONE_NEWNET = 0x40000000

T = TypeVar("T")


class NetnsError(RuntimeError):
    """The namespace could not be made, entered or used."""


def node_ip(index: int) -> str:
    """The address of node ``index`` (1-based) on the nodes' bridge."""
    return str(NODES_SUBNET.network_address + index)


def node_pod_cidr(index: int) -> str:
    """The pod range of node ``index`` (1-based): one /24 of ``POD_CIDR`` each."""
    return str(list(POD_CIDR.subnets(new_prefix=24))[index - 1])


def vm_ip(index: int) -> str:
    """The address of VM ``index`` (1-based) on the VMs' bridge."""
    return str(VMS_SUBNET.network_address + 10 + index)


def missing_requirements() -> list[str]:
    """What this machine lacks for the namespace and its relays (empty: nothing)."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (network namespaces)")
    for tool in ("ip", "nsenter", "socat", "iptables"):
        if shutil.which(tool) is None:
            missing.append(f"{tool} (scripts/install-system-deps.sh installs it)")
    return missing


def name_for(workdir: Path) -> str:
    """The namespace name of a work directory: ``vmfleet-`` and a hash of its path."""
    return "vmfleet-" + hashlib.sha256(str(Path(workdir).resolve()).encode()).hexdigest()[:8]


def _run(argv: Sequence[str]) -> str:
    result = subprocess.run(list(argv), capture_output=True, text=True, timeout=60, check=False)
    if result.returncode != 0:
        raise NetnsError(f"{' '.join(argv)} failed: {result.stderr.strip()}")
    return result.stdout


class NetNamespace:
    """One named network namespace (``/run/netns/NAME``) and the cluster's bridges in it."""

    def __init__(self, name: str) -> None:
        if not name.startswith("vmfleet-") or not name.replace("-", "").isalnum():
            raise ValueError(f"not a vmfleet namespace name: {name!r}")
        self.name = name
        self.path = NETNS_DIR / name

    def exists(self) -> bool:
        return self.path.exists()

    def create(self) -> NetNamespace:
        """Create the namespace afresh (a stale one of a killed run is deleted first):
        loopback up, the nodes' and the VMs' bridges with their addresses, forwarding
        on, bridged traffic through iptables (kube-proxy's Service rules see it)."""
        missing = missing_requirements()
        if missing:
            raise NetnsError("cannot make the cluster's network namespace; missing: " + "; ".join(missing))
        self.delete()
        _run(["ip", "netns", "add", self.name])
        try:
            self.ip("link", "set", "lo", "up")
            for bridge in (NODES_BRIDGE, VMS_BRIDGE):
                self.ip("link", "add", bridge, "type", "bridge")
                self.ip("link", "set", bridge, "up")
            self.ip("addr", "add", f"{node_ip(1)}/{NODES_SUBNET.prefixlen}", "dev", NODES_BRIDGE)
            self.sysctl("net.ipv4.ip_forward", "1")
            self.sysctl("net.bridge.bridge-nf-call-iptables", "1")
        except BaseException:
            self.delete()
            raise
        return self

    def delete(self) -> None:
        """Delete the namespace (its interfaces and rules go with it). The processes
        inside must have been stopped: a live one keeps the namespace alive."""
        if self.exists():
            _run(["ip", "netns", "delete", self.name])

    def ip(self, *args: str) -> str:
        """``ip -n NAME ARGS``: iproute2 acting inside the namespace only."""
        return _run(["ip", "-n", self.name, *args])

    def sysctl(self, key: str, value: str) -> None:
        _run([*self.exec_prefix(), "sysctl", "-q", "-w", f"{key}={value}"])

    def add_address(self, address: str, bridge: str = VMS_BRIDGE) -> None:
        """Give ``bridge`` one more address (idempotent): a node's or a VM's."""
        net = NODES_SUBNET if bridge == NODES_BRIDGE else VMS_SUBNET
        if ipaddress.ip_address(address) not in net:
            raise ValueError(f"{address} is not in {net}, the range of {bridge}")
        if address in self.ip("-o", "addr", "show", "dev", bridge):
            return
        self.ip("addr", "add", f"{address}/{net.prefixlen}", "dev", bridge)

    def exec_prefix(self) -> list[str]:
        """argv prefix that runs a program inside the namespace (network only: the
        mount namespace, and so /sys/fs/cgroup, stay the host's)."""
        return ["nsenter", f"--net={self.path}", "--"]

    def run_inside(self, fn: Callable[[], T]) -> T:
        """Call ``fn`` on a thread that has entered the namespace; sockets it creates
        stay in the namespace. The thread's namespace is checked after ``setns``, so
        a failure can never leave ``fn`` running in the root namespace."""
        result: list[T] = []
        errors: list[BaseException] = []

        def target() -> None:
            try:
                _enter(self.path)
                result.append(fn())
            except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
                errors.append(exc)

        thread = threading.Thread(target=target, name=f"netns-{self.name}", daemon=True)
        thread.start()
        thread.join()  # the OS thread exits with its namespace: nothing else uses it
        if errors:
            raise errors[0]
        return result[0]

    def connect(self, host: str, port: int, timeout: float = 5.0) -> socket.socket:
        """A TCP connection made inside the namespace to one of its addresses."""
        return self.run_inside(lambda: socket.create_connection((host, port), timeout=timeout))

    def port_open(self, host: str, port: int, timeout: float = 1.0) -> bool:
        try:
            self.connect(host, port, timeout).close()
            return True
        except OSError:
            return False

    def __repr__(self) -> str:
        return f"NetNamespace({self.name!r})"


def _enter(path: Path) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise NetnsError(f"setns({path}): {os.strerror(err)}")
        want = os.fstat(fd).st_ino
    finally:
        os.close(fd)
    if os.stat("/proc/thread-self/ns/net").st_ino != want:
        raise NetnsError(f"this thread did not enter {path}")


class Relay:
    """``127.0.0.1:port`` on the host → a unix socket → ``target`` inside the namespace.

    Two socat processes: one inside the namespace listening on the unix socket (which,
    being a file, is reachable from any namespace) and connecting to the target; one on
    the host listening on loopback and connecting to the socket."""

    def __init__(self, netns: NetNamespace, name: str, target: tuple[str, int], workdir: Path,
                 *, port: int = 0, exit_with_parent: bool = False) -> None:
        self.netns = netns
        self.name = name
        self.target = target
        self.workdir = Path(workdir)
        self.port = port
        self.exit_with_parent = exit_with_parent
        self.socket_path = self.workdir / f"{name}.sock"
        self.processes: list[ManagedProcess] = []

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def start(self, timeout: float = 10.0) -> Relay:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.socket_path.unlink(missing_ok=True)
        self.port = self.port or free_port()
        host, port = self.target
        inside = [*self.netns.exec_prefix(), "socat",
                  f"UNIX-LISTEN:{self.socket_path},fork,mode=600", f"TCP:{host}:{port}"]
        outside = ["socat", f"TCP-LISTEN:{self.port},bind=127.0.0.1,reuseaddr,fork",
                   f"UNIX-CONNECT:{self.socket_path}"]
        for side, argv in (("in", inside), ("out", outside)):
            if self.exit_with_parent and shutil.which("setpriv"):
                argv = ["setpriv", "--pdeathsig", "TERM", "--", *argv]
            process = ManagedProcess(f"relay-{self.name}-{side}", argv,
                                     self.workdir / f"relay-{self.name}.log").start()
            self.processes.append(process)
            write_pid_file(process, self.workdir / f"relay-{self.name}-{side}.pgid")
            if side == "in":
                wait_until(lambda: self.socket_path.exists(), timeout, interval=0.05,
                           what=f"relay {self.name}'s socket {self.socket_path}")
        return self

    def stop(self, grace: float = 2.0) -> None:
        for process in self.processes:
            process.stop(grace)
        self.processes.clear()
        for side in ("in", "out"):
            stop_pid_file(self.workdir / f"relay-{self.name}-{side}.pgid", grace)
        self.socket_path.unlink(missing_ok=True)
