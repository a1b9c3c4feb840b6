"""The local Kubernetes control plane: etcd, kube-apiserver and kube-controller-manager.

All three (and kubectl) are one Go binary built from ``tests/e2e/controlplane`` by its
``build.sh`` — the same Kubernetes version for server and client, with nothing but Go
needed to get it. Each component runs as its own ``ManagedProcess`` on free ports of
127.0.0.1, with its data, certificates and logs in one work directory::

    with ControlPlane(Path("/tmp/cp")).start() as cp:
        cp.kubectl_run("get", "namespaces")
        # cp.kubeconfig: admin (system:masters), TLS verified against the local CA

Work directory layout::

    kubeconfig                          admin kubeconfig (self-contained)
    controlplane.json                   ports, pids and paths of a running control plane
    etcd.log, kube-apiserver.log, kube-controller-manager.log
    etcd/                               etcd data
    pki/                                CA, serving cert, service-account keys, tokens
    kube-controller-manager.kubeconfig

The work directory can be started again after ``stop()``: data, keys and tokens are
reused, so a kubeconfig handed out earlier stays valid.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import os
import secrets
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from vmfleet.dev.certs import Pair, ensure_ca, ensure_leaf
from vmfleet.dev.netns import APISERVER_PORT, NetNamespace, Relay, node_ip
from vmfleet.procs import ManagedProcess, free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "tests" / "e2e" / "controlplane" / "build.sh"
GO_MOD = REPO_ROOT / "tests" / "e2e" / "controlplane" / "go.mod"

#: Use this binary instead of building one (it must be a vmfleet-controlplane build).
BINARY_ENV = "VMFLEET_CONTROLPLANE_BINARY"
#: Read by the Go binary: server components stop once this process is gone.
PARENT_PID_ENV = "VMFLEET_CONTROLPLANE_PARENT_PID"

SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"
KUBERNETES_SERVICE_IP = "10.0.0.1"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
ADMIN_USER = "vmfleet-admin"
CONTROLLER_MANAGER_USER = "system:kube-controller-manager"
SCHEDULER_USER = "system:kube-scheduler"
#: kube-proxy's user: bound to ClusterRole system:node-proxier by the default policy.
PROXY_USER = "system:kube-proxy"
#: The cluster DNS's user (read-only RBAC of its own, see vmfleet.dev.cluster).
DNS_USER = "vmfleet:coredns"
#: The local node (vmfleet.dev.node) is named after its address: a kubelet takes its
#: InternalIP from a node name that is an IP, and 127.0.0.1 is the only address it has.
NODE_NAME = "127.0.0.1"
NODE_USER = f"system:node:{NODE_NAME}"
#: What kube-apiserver presents to a kubelet (logs, exec): a client certificate of the CA
#: (no group: the local kubelet admits any client certificate of the CA, nothing else).
KUBELET_CLIENT_CN = "kube-apiserver-kubelet-client"
FRONT_PROXY_CN = "front-proxy-client"
CONTEXT_NAME = "vmfleet-local"

# Server components, in start order; they are stopped in reverse.
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager")


def kubernetes_version() -> str:
    """The k8s.io/kubernetes version the control plane is built from (from go.mod)."""
    for line in GO_MOD.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "k8s.io/kubernetes" and parts[1].startswith("v"):
            return parts[1]
    raise RuntimeError(f"no k8s.io/kubernetes requirement in {GO_MOD}")


def ensure_built() -> Path:
    """Build the control plane binary if this machine has none yet; return its path.

    ``$VMFLEET_CONTROLPLANE_BINARY`` names a prebuilt binary to use instead. Building
    from scratch takes several minutes on two cores; an up-to-date build returns at
    once. Build progress goes to stderr.
    """
    override = os.environ.get(BINARY_ENV)
    if override:
        path = Path(override)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise FileNotFoundError(f"${BINARY_ENV}={override} is not an executable file")
        return path
    if not BUILD_SCRIPT.is_file():
        raise FileNotFoundError(
            f"{BUILD_SCRIPT} not found (vmfleet is not run from a source checkout); "
            f"set ${BINARY_ENV} to a vmfleet-controlplane binary"
        )
    result = subprocess.run(
        ["bash", str(BUILD_SCRIPT)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
        check=False,
    )
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        raise RuntimeError(
            f"{BUILD_SCRIPT} failed with exit code {result.returncode} (its output is above)"
        )
    path = Path(lines[-1])
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise RuntimeError(f"{BUILD_SCRIPT} printed {path}, which is not an executable file")
    return path


class KubectlError(subprocess.CalledProcessError):
    """A kubectl command that failed; its message includes kubectl's stderr."""

    def __str__(self) -> str:
        stderr = (self.stderr or "").strip()
        return f"{super().__str__()}\n{stderr}" if stderr else super().__str__()


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager for one work directory."""

    def __init__(
        self,
        workdir: Path,
        binary: Path | None = None,
        *,
        exit_with_parent: bool = False,
        etcd_unsafe_no_fsync: bool = True,
        extra_apiserver_args: Sequence[str] = (),
        extra_controller_manager_args: Sequence[str] = (),
        network: NetNamespace | None = None,
        node_names: Sequence[str] = (NODE_NAME,),
    ) -> None:
        """``exit_with_parent``: the components stop by themselves once this Python
        process is gone (for test sessions; a dev environment that outlives its
        launcher leaves it off). ``etcd_unsafe_no_fsync``: the data is throwaway, so
        etcd skips fsync (much faster on slow disks). ``network``: run every
        component inside that network namespace (the pod-network cluster of
        ``vmfleet.dev.cluster``; kube-apiserver on node 1's address, reached from the
        host through a loopback ``Relay``). ``node_names``: the kubelets that get a
        token of their own (``system:node:NAME``)."""
        self.workdir = Path(workdir).resolve()
        self._binary = Path(binary) if binary is not None else None
        self.exit_with_parent = exit_with_parent
        self.etcd_unsafe_no_fsync = etcd_unsafe_no_fsync
        self.extra_apiserver_args = list(extra_apiserver_args)
        self.extra_controller_manager_args = list(extra_controller_manager_args)
        self.network = network
        self.node_names = list(node_names)
        self.relay: Relay | None = None

        self.pki = self.workdir / "pki"
        self.kubeconfig = self.workdir / "kubeconfig"
        self.state_file = self.workdir / "controlplane.json"
        self.ca_file = self.pki / "ca.crt"
        self.etcd_client_port = 0
        self.etcd_peer_port = 0
        self.apiserver_port = 0
        self.controller_manager_port = 0
        self.token = ""
        self.processes: dict[str, ManagedProcess] = {}
        self._recorded_pids: dict[str, int] = {}

    # -- public attributes -------------------------------------------------------

    @property
    def binary(self) -> Path:
        if self._binary is None:
            self._binary = ensure_built()
        return self._binary

    @property
    def kubectl(self) -> Path:
        """A ``kubectl`` of the server's own version (a link to the binary)."""
        beside = self.binary.parent / "kubectl"
        if beside.exists() and beside.resolve() == self.binary.resolve():
            return beside
        link = self.workdir / "bin" / "kubectl"
        if not link.is_symlink() or link.resolve() != self.binary.resolve():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.unlink(missing_ok=True)
            link.symlink_to(self.binary.resolve())
        return link

    @property
    def server(self) -> str:
        """The API server's URL for the host's clients (on loopback; through the relay
        when the control plane runs in a network namespace)."""
        if not self.apiserver_port:
            raise RuntimeError("the control plane has not been started")
        return f"https://127.0.0.1:{self.apiserver_port}"

    @property
    def internal_server(self) -> str:
        """The API server's URL for components in the cluster's network namespace
        (the same as ``server`` without one)."""
        if self.network is None:
            return self.server
        return f"https://{node_ip(1)}:{APISERVER_PORT}"

    @property
    def etcd_url(self) -> str:
        return f"http://127.0.0.1:{self.etcd_client_port}"

    @property
    def version(self) -> str:
        """The Kubernetes version this control plane runs (from go.mod)."""
        return kubernetes_version()

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for a client process: ``KUBECONFIG`` set to the admin kubeconfig."""
        env = dict(os.environ if base is None else base)
        env["KUBECONFIG"] = str(self.kubeconfig)
        env["KUBERC"] = "off"  # no user preferences (~/.kube/kuberc) in our kubectl runs
        env["KUBECACHEDIR"] = str(self.workdir / "kube-cache")  # not ~/.kube/cache
        return env

    # -- lifecycle ---------------------------------------------------------------

    def start(self, timeout: float = 120) -> ControlPlane:
        """Start etcd, kube-apiserver and kube-controller-manager and wait until the
        API is ready, namespace ``default`` exists and has its ``default``
        ServiceAccount. On failure everything started is stopped again and the error
        carries the failing component's log tail."""
        if self.processes:
            raise RuntimeError("the control plane is already running")
        binary = self.binary  # may build: not counted in the start timeout
        deadline = time.monotonic() + timeout
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._ensure_pki()
        ports: set[int] = set()
        self.etcd_client_port = _unique_port(ports)
        self.etcd_peer_port = _unique_port(ports)
        self.apiserver_port = _unique_port(ports)
        self.controller_manager_port = _unique_port(ports)
        self._write_kubeconfig(self.kubeconfig, ADMIN_USER, self.token)
        kcm_kubeconfig = self.workdir / "kube-controller-manager.kubeconfig"
        self._write_kubeconfig(kcm_kubeconfig, CONTROLLER_MANAGER_USER, self._kcm_token, self.internal_server)

        try:
            etcd = self._start("etcd", self._etcd_args(binary))

            if self.network is None:
                self._wait(deadline, "etcd /health", self._etcd_healthy, etcd)
            apiserver = self._start("kube-apiserver", self._apiserver_args(binary))
            if self.network is not None:
                # etcd's health is part of /readyz; the host reaches only the relay.
                self.relay = Relay(self.network, "kube-apiserver", (node_ip(1), APISERVER_PORT),
                                   self.workdir, port=self.apiserver_port,
                                   exit_with_parent=self.exit_with_parent).start()
            self._wait(deadline, "kube-apiserver /readyz", lambda: self._api_ok("/readyz"), apiserver)
            self._wait(
                deadline,
                "namespace default",
                lambda: self._api_ok("/api/v1/namespaces/default"),
                apiserver,
            )

            kcm = self._start("kube-controller-manager", self._controller_manager_args(binary, kcm_kubeconfig))
            if self.network is None:  # inside, its health shows in the ServiceAccount below
                self._wait(deadline, "kube-controller-manager /healthz", self._kcm_healthy, kcm)
            self._wait(
                deadline,
                "ServiceAccount default/default (service account controller)",
                lambda: self._api_ok("/api/v1/namespaces/default/serviceaccounts/default"),
                kcm,
            )
        except BaseException:
            self.stop()
            raise
        self._write_state()
        return self

    def stop(self, grace: float = 15.0) -> None:
        """Stop the components in reverse order (TERM, then KILL after ``grace``)."""
        for name in reversed(COMPONENTS):
            process = self.processes.pop(name, None)
            if process is not None:
                process.stop(grace)
            pid = self._recorded_pids.pop(name, None)
            if pid is not None:
                _stop_recorded_pid(pid, self.binary, grace)
        if self.relay is not None:
            self.relay.stop()
            self.relay = None
        self.state_file.unlink(missing_ok=True)

    def running(self) -> bool:
        if self.processes:
            return all(p.running() for p in self.processes.values())
        return bool(self._recorded_pids) and all(
            _is_our_process(pid, self.binary) for pid in self._recorded_pids.values()
        )

    def check_running(self) -> None:
        """Raise with the log tail if a component has exited."""
        for process in self.processes.values():
            process.check_running()

    def log_path(self, component: str) -> Path:
        return self.workdir / f"{component}.log"

    @classmethod
    def from_state(cls, workdir: Path) -> ControlPlane:
        """The control plane a ``start()`` in another process left running in
        ``workdir`` (read from ``controlplane.json``), for ``stop()`` or its
        kubeconfig — e.g. ``vmfleet dev down``. Raises ``FileNotFoundError`` if none."""
        workdir = Path(workdir).resolve()
        state = json.loads((workdir / "controlplane.json").read_text())
        cp = cls(workdir, Path(state["binary"]))
        cp.etcd_client_port = int(state["etcdClientPort"])
        cp.etcd_peer_port = int(state["etcdPeerPort"])
        cp.apiserver_port = int(state["apiserverPort"])
        cp.controller_manager_port = int(state["controllerManagerPort"])
        cp.token = cp._read_tokens()[ADMIN_USER]
        cp._recorded_pids = {name: int(pid) for name, pid in state["pids"].items()}
        if state.get("netns"):
            cp.network = NetNamespace(state["netns"])
            # No processes: stop() ends the relay's by their pid files.
            cp.relay = Relay(cp.network, "kube-apiserver", (node_ip(1), APISERVER_PORT), workdir,
                             port=cp.apiserver_port)
        return cp

    def __enter__(self) -> ControlPlane:
        if not self.processes:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        server = f"https://127.0.0.1:{self.apiserver_port}" if self.apiserver_port else "not started"
        return f"ControlPlane({str(self.workdir)!r}, {server})"

    # -- clients -----------------------------------------------------------------

    def kubectl_run(
        self,
        *args: str,
        input: str | None = None,  # noqa: A002 - as subprocess.run
        check: bool = True,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``kubectl --kubeconfig <admin kubeconfig> ARGS``; text in and out.
        With ``check`` a non-zero exit raises ``KubectlError`` (stderr in its message)."""
        argv = [str(self.kubectl), f"--kubeconfig={self.kubeconfig}", *args]
        result = subprocess.run(
            argv,
            input=input,
            capture_output=True,
            text=True,
            env=self.env(),
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise KubectlError(result.returncode, argv, result.stdout, result.stderr)
        return result

    def api_get(self, path: str, timeout: float = 10) -> Any:
        """GET an API path as the admin user and return the decoded JSON."""
        return json.loads(self.api_get_raw(path, timeout))

    def api_get_raw(self, path: str, timeout: float = 10) -> bytes:
        """GET a path (``/readyz``, ``/metrics``, ...) as the admin user; the body."""
        request = urllib.request.Request(
            self.server + path,
            headers={"Authorization": f"Bearer {self.token}", "Accept": "application/json, */*"},
        )
        with _open(request, timeout, self._ssl_context()) as response:
            body: bytes = response.read()
            return body

    # -- internals -----------------------------------------------------------------

    def _start(self, name: str, argv: list[str]) -> ManagedProcess:
        env = dict(os.environ)
        env.pop(PARENT_PID_ENV, None)
        if self.exit_with_parent:
            env[PARENT_PID_ENV] = str(os.getpid())
        log = self.log_path(name)
        with open(log, "ab") as fh:
            fh.write(f"==== {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(argv)}\n".encode())
        if self.network is not None:
            argv = [*self.network.exec_prefix(), *argv]
        process = ManagedProcess(name, argv, log, env=env, cwd=self.workdir).start()
        self.processes[name] = process
        return process

    def _wait(
        self,
        deadline: float,
        what: str,
        predicate: Callable[[], bool],
        process: ManagedProcess,
    ) -> None:
        """Poll ``predicate`` until it is true; fail at once if ``process`` exits."""
        last_error: BaseException | None = None
        while True:
            process.check_running()
            try:
                if predicate():
                    return
            except Exception as exc:  # noqa: BLE001 - reported on timeout
                last_error = exc
            if time.monotonic() >= deadline:
                detail = f" (last error: {last_error!r})" if last_error else ""
                raise TimeoutError(
                    f"control plane: timed out waiting for {what}{detail}; "
                    f"last lines of {process.log_path}:\n{process.log_tail()}"
                )
            time.sleep(0.2)

    def _etcd_args(self, binary: Path) -> list[str]:
        client = f"http://127.0.0.1:{self.etcd_client_port}"
        peer = f"http://127.0.0.1:{self.etcd_peer_port}"
        args = [
            str(binary), "etcd",
            "--name=vmfleet",
            f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            "--log-level=warn",
        ]
        if self.etcd_unsafe_no_fsync:
            args.append("--unsafe-no-fsync")
        return args

    def _apiserver_args(self, binary: Path) -> list[str]:
        if self.network is not None:
            # Node 1's address in the namespace: the `kubernetes` Service's endpoint,
            # kept by the default (lease) endpoint reconciler.
            where = [f"--bind-address={node_ip(1)}", f"--advertise-address={node_ip(1)}",
                     f"--secure-port={APISERVER_PORT}"]
        else:
            # 127.0.0.1 is not a valid Endpoints address, and no pod could use it.
            where = ["--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
                     f"--secure-port={self.apiserver_port}", "--endpoint-reconciler-type=none"]
        return [
            str(binary), "kube-apiserver",
            f"--etcd-servers={self.etcd_url}",
            *where,
            f"--cert-dir={self.workdir / 'apiserver-certs'}",
            f"--tls-cert-file={self.pki / 'apiserver.crt'}",
            f"--tls-private-key-file={self.pki / 'apiserver.key'}",
            f"--client-ca-file={self.ca_file}",
            f"--token-auth-file={self.pki / 'tokens.csv'}",
            # Node: a kubelet's credentials reach only what its own pods use.
            "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction",
            f"--kubelet-client-certificate={self.pki / 'apiserver-kubelet-client.crt'}",
            f"--kubelet-client-key={self.pki / 'apiserver-kubelet-client.key'}",
            "--kubelet-preferred-address-types=InternalIP",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={self.pki / 'sa.pub'}",
            f"--service-account-signing-key-file={self.pki / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            "--allow-privileged=true",
            "--profiling=false",
            *self._front_proxy_args(),
            *self.extra_apiserver_args,
        ]

    def _front_proxy_args(self) -> list[str]:
        """The aggregation layer: the API server proxies aggregated APIs (the output API,
        ``logs.vmfleet.io``) with this client certificate and the caller in
        ``X-Remote-*`` headers; it publishes the CA and names in ConfigMap
        ``kube-system/extension-apiserver-authentication`` for the servers behind it."""
        ca, client = self.front_proxy_pki()
        return [
            f"--requestheader-client-ca-file={ca.cert}",
            f"--requestheader-allowed-names={FRONT_PROXY_CN}",
            "--requestheader-username-headers=X-Remote-User",
            "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            f"--proxy-client-cert-file={client.cert}",
            f"--proxy-client-key-file={client.key}",
        ]

    def front_proxy_pki(self) -> tuple[Pair, Pair]:
        """The front proxy's CA (its own, not the cluster's: a user's client certificate
        must never pass as the proxy) and client certificate, made once."""
        ca = ensure_ca(Pair(self.pki / "front-proxy-ca.crt", self.pki / "front-proxy-ca.key"),
                       "vmfleet-front-proxy-ca")
        client = ensure_leaf(Pair(self.pki / "front-proxy-client.crt",
                                  self.pki / "front-proxy-client.key"), ca, FRONT_PROXY_CN,
                             server=False)
        return ca, client

    def _controller_manager_args(self, binary: Path, kubeconfig: Path) -> list[str]:
        return [
            str(binary), "kube-controller-manager",
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            # Callers of its /healthz and /metrics authenticate with tokens; it needs no
            # client CA from kube-system/extension-apiserver-authentication.
            "--authentication-skip-lookup=true",
            "--bind-address=127.0.0.1",
            f"--secure-port={self.controller_manager_port}",
            f"--cert-dir={self.workdir / 'controller-manager-certs'}",
            "--leader-elect=false",
            "--controllers=*",
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={self.pki / 'sa.key'}",
            f"--root-ca-file={self.ca_file}",
            f"--cluster-signing-cert-file={self.ca_file}",
            f"--cluster-signing-key-file={self.pki / 'ca.key'}",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            "--profiling=false",
            *self.extra_controller_manager_args,
        ]

    def component_kubeconfig(self, user: str, path: Path) -> Path:
        """Write a kubeconfig for a component user of this control plane (the local
        node's scheduler and kubelet: ``SCHEDULER_USER``, ``NODE_USER``); return it."""
        self._write_kubeconfig(path, user, self._read_tokens()[user], self.internal_server)
        return path

    def _ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def _api_ok(self, path: str) -> bool:
        try:
            self.api_get_raw(path, timeout=5)
            return True
        except urllib.error.HTTPError as exc:
            if exc.code in (404, 500, 503):  # not yet
                return False
            raise

    def _etcd_healthy(self) -> bool:
        with _open(f"{self.etcd_url}/health", 5) as response:
            return bool(json.loads(response.read()).get("health") == "true")

    def _kcm_healthy(self) -> bool:
        # Its serving certificate is self-signed in --cert-dir; only health is asked.
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        url = f"https://127.0.0.1:{self.controller_manager_port}/healthz"
        try:
            with _open(url, 5, context) as response:
                return bool(response.read().strip() == b"ok")
        except urllib.error.HTTPError:
            return False

    def _write_kubeconfig(self, path: Path, user: str, token: str, server: str | None = None) -> None:
        ca_data = base64.b64encode(self.ca_file.read_bytes()).decode()
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{
                "name": CONTEXT_NAME,
                "cluster": {"server": server or self.server, "certificate-authority-data": ca_data},
            }],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{
                "name": CONTEXT_NAME,
                "context": {"cluster": CONTEXT_NAME, "user": user, "namespace": "default"},
            }],
            "current-context": CONTEXT_NAME,
            "preferences": {},
        }
        _write_private(path, json.dumps(config, indent=2) + "\n")

    def _write_state(self) -> None:
        state = {
            "binary": str(self.binary),
            "server": self.server,
            "kubeconfig": str(self.kubeconfig),
            "etcdClientPort": self.etcd_client_port,
            "etcdPeerPort": self.etcd_peer_port,
            "apiserverPort": self.apiserver_port,
            "controllerManagerPort": self.controller_manager_port,
            "pids": {name: p.pid for name, p in self.processes.items()},
            "netns": self.network.name if self.network is not None else None,
        }
        _write_private(self.state_file, json.dumps(state, indent=2) + "\n")

    # -- certificates, keys and tokens ---------------------------------------------

    @property
    def _kcm_token(self) -> str:
        return self._read_tokens()[CONTROLLER_MANAGER_USER]

    def _read_tokens(self) -> dict[str, str]:
        tokens: dict[str, str] = json.loads((self.pki / "tokens.json").read_text())
        return tokens

    def _ensure_pki(self) -> None:
        """Create the CA, the apiserver's serving certificate, the service-account key
        pair and the tokens, unless the work directory has them from an earlier start."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec, rsa
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        self.pki.mkdir(parents=True, exist_ok=True)
        os.chmod(self.pki, 0o700)

        def pem_key(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> str:
            return key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ).decode()

        def load_key(path: Path) -> Any:
            return serialization.load_pem_private_key(path.read_bytes(), password=None)

        now = datetime.datetime.now(datetime.UTC)
        not_before = now - datetime.timedelta(hours=1)

        ca_key_file = self.pki / "ca.key"
        if not (self.ca_file.exists() and ca_key_file.exists()):
            ca_key = ec.generate_private_key(ec.SECP256R1())
            name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vmfleet-local-ca")])
            ca_cert = (
                x509.CertificateBuilder()
                .subject_name(name)
                .issuer_name(name)
                .public_key(ca_key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(not_before)
                .not_valid_after(now + datetime.timedelta(days=3650))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(
                    x509.KeyUsage(
                        digital_signature=True, content_commitment=False, key_encipherment=False,
                        data_encipherment=False, key_agreement=False, key_cert_sign=True,
                        crl_sign=True, encipher_only=False, decipher_only=False,
                    ),
                    critical=True,
                )
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
                .sign(ca_key, hashes.SHA256())
            )
            _write_private(ca_key_file, pem_key(ca_key))
            self.ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
            (self.pki / "apiserver.crt").unlink(missing_ok=True)  # re-issue under the new CA

        serving_cert = self.pki / "apiserver.crt"
        serving_key = self.pki / "apiserver.key"
        if not (serving_cert.exists() and serving_key.exists()):
            ca_key = load_key(ca_key_file)
            ca_cert = x509.load_pem_x509_certificate(self.ca_file.read_bytes())
            key = ec.generate_private_key(ec.SECP256R1())
            names = [
                "localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ]
            # Node 1's address in the cluster's namespace too: one certificate serves
            # both kinds of control plane, and a work directory may be started as either.
            ips = ["127.0.0.1", "::1", KUBERNETES_SERVICE_IP, node_ip(1)]
            cert = (
                x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
                .issuer_name(ca_cert.subject)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(not_before)
                .not_valid_after(now + datetime.timedelta(days=3650))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(
                    x509.KeyUsage(
                        digital_signature=True, content_commitment=False, key_encipherment=False,
                        data_encipherment=False, key_agreement=False, key_cert_sign=False,
                        crl_sign=False, encipher_only=False, decipher_only=False,
                    ),
                    critical=True,
                )
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .add_extension(
                    x509.SubjectAlternativeName(
                        [x509.DNSName(n) for n in names]
                        + [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
                    ),
                    critical=False,
                )
                .add_extension(
                    x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
                    critical=False,
                )
                .sign(ca_key, hashes.SHA256())
            )
            _write_private(serving_key, pem_key(key))
            serving_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))

        sa_key = self.pki / "sa.key"
        sa_pub = self.pki / "sa.pub"
        if not (sa_key.exists() and sa_pub.exists()):
            rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            _write_private(sa_key, pem_key(rsa_key))
            sa_pub.write_bytes(
                rsa_key.public_key().public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                )
            )

        tokens_json = self.pki / "tokens.json"
        tokens = self._read_tokens() if tokens_json.exists() else {}
        node_users = [f"system:node:{name}" for name in self.node_names]
        users = (ADMIN_USER, CONTROLLER_MANAGER_USER, SCHEDULER_USER, PROXY_USER, DNS_USER, *node_users)
        if any(user not in tokens for user in users):  # a work directory of an older version
            for user in users:
                tokens.setdefault(user, secrets.token_urlsafe(32))
            _write_private(tokens_json, json.dumps(tokens) + "\n")
        self.token = tokens[ADMIN_USER]
        # kube-apiserver's static token file: token,user,uid,"group1,group2". The node's
        # user is in system:nodes: the Node authorizer gives it its own pods' objects only.
        _write_private(
            self.pki / "tokens.csv",
            f'{tokens[ADMIN_USER]},{ADMIN_USER},{ADMIN_USER},"system:masters"\n'
            f"{tokens[CONTROLLER_MANAGER_USER]},{CONTROLLER_MANAGER_USER},{CONTROLLER_MANAGER_USER}\n"
            f"{tokens[SCHEDULER_USER]},{SCHEDULER_USER},{SCHEDULER_USER}\n"
            f"{tokens[PROXY_USER]},{PROXY_USER},{PROXY_USER}\n"
            f"{tokens[DNS_USER]},{DNS_USER},{DNS_USER}\n"
            + "".join(f'{tokens[user]},{user},{user},"system:nodes"\n' for user in node_users),
        )

        kubelet_client_cert = self.pki / "apiserver-kubelet-client.crt"
        kubelet_client_key = self.pki / "apiserver-kubelet-client.key"
        if not (kubelet_client_cert.exists() and kubelet_client_key.exists()):
            ca_key = load_key(ca_key_file)
            ca_cert = x509.load_pem_x509_certificate(self.ca_file.read_bytes())
            key = ec.generate_private_key(ec.SECP256R1())
            cert = (
                x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, KUBELET_CLIENT_CN)]))
                .issuer_name(ca_cert.subject)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(not_before)
                .not_valid_after(now + datetime.timedelta(days=3650))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .sign(ca_key, hashes.SHA256())
            )
            _write_private(kubelet_client_key, pem_key(key))
            kubelet_client_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _open(
    url: str | urllib.request.Request, timeout: float, context: ssl.SSLContext | None = None
) -> Any:
    """urlopen without proxies: the control plane is on 127.0.0.1, whatever
    ``http_proxy``/``https_proxy`` say."""
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
    if context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=context))
    return urllib.request.build_opener(*handlers).open(url, timeout=timeout)


def _unique_port(taken: set[int]) -> int:
    while True:
        port = free_port()
        if port not in taken:
            taken.add(port)
            return port


def _write_private(path: Path, text: str) -> None:
    """Write a file readable by its owner only (keys, tokens, kubeconfigs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(path, 0o600)


def _is_our_process(pid: int, binary: Path) -> bool:
    """True if ``pid`` runs ``binary`` (a recorded pid may have been reused since)."""
    try:
        return Path(os.readlink(f"/proc/{pid}/exe")) == binary.resolve()
    except OSError:
        return False


def _stop_recorded_pid(pid: int, binary: Path, grace: float) -> None:
    """Stop a component started by another process: TERM its process group, then KILL."""
    if not _is_our_process(pid, binary):
        return
    try:
        os.killpg(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _is_our_process(pid, binary):
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
