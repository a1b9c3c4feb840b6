"""A real Kubernetes node for the local control plane: kube-scheduler, a kubelet and
containerd with runc, so that the Helm chart's pods run from the project's image.

Used by ``vmfleet dev up --node`` and by the e2e suite's ``node`` fixture::

    node = Node(workdir, controlplane).start()   # Node "127.0.0.1" Ready
    node.import_image(archive)                    # a docker-archive from `make image`
    ...
    node.stop()

What it is for: the e2e tests of the chart and trying the chart on one machine. Users
with Docker have ``kind-config.yaml``. Its limits, all deliberate:

- Pods use the host's network (``hostNetwork: true``): the sshd "VMs", the broker and
  the API server are on loopback, and no pod network exists. The CNI configuration
  holds only the ``loopback`` plugin, so a pod without host networking gets ``lo`` and
  nothing else. No address outside 127.0.0.0/8 is ever used: the node's name and
  InternalIP are ``127.0.0.1``, the kubelet and containerd's streaming server listen on
  loopback.
- No image is pulled: the pause image is built here from the ``pause`` binary of the
  control plane build, the project's image is imported from ``make image``'s archive.
- Cgroup v1 machines are accepted (``failCgroupV1: false``, KEP-5573); the node's pods
  live under their own cgroup root, so two nodes on one machine do not meet.
- Root only (containerd, runc, cgroups).
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vmfleet.dev import podnet
from vmfleet.dev.controlplane import NODE_NAME, SCHEDULER_USER, ControlPlane
from vmfleet.dev.netns import NetNamespace
from vmfleet.dev.proc import ManagedProcess, free_port, stop_pid_file, write_pid_file

REPO_ROOT = Path(__file__).resolve().parents[2]
IMAGE_BUILD_SCRIPT = REPO_ROOT / "scripts" / "build-image.sh"
#: The sandbox image of every pod, built by ``Node`` from the ``pause`` binary.
PAUSE_IMAGE = "localhost/vmfleet-pause:1"
CONTAINERD_NAMESPACE = "k8s.io"
CNI_BIN_DIRS = ("/usr/lib/cni", "/opt/cni/bin")
COMPONENTS = ("containerd", "kube-scheduler", "kubelet")
#: Where containerd would pull from: the discard port of loopback, where nothing listens.
NO_REGISTRY_PORT = 9


class NodeError(RuntimeError):
    """The node cannot run on this machine, or one of its parts failed."""


def missing_requirements() -> list[str]:
    """What this machine lacks for a node (empty: it can run one)."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (containerd, runc and cgroups)")
    for tool in ("containerd", "runc", "ctr"):
        if shutil.which(tool) is None:
            missing.append(f"{tool} (scripts/install-system-deps.sh installs it)")
    if not any((Path(d) / "loopback").exists() for d in CNI_BIN_DIRS):
        missing.append("the CNI loopback plugin (containernetworking-plugins)")
    if not Path("/sys/fs/cgroup").is_dir():
        missing.append("cgroups under /sys/fs/cgroup")
    return missing


def build_image() -> Path:
    """``make image``: build (or find cached) the project's image; its docker-archive."""
    result = subprocess.run(["bash", str(IMAGE_BUILD_SCRIPT)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, text=True, check=False)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        raise NodeError(f"{IMAGE_BUILD_SCRIPT} failed with exit code {result.returncode}")
    archive = Path(lines[-1])
    if not archive.is_file():
        raise NodeError(f"{IMAGE_BUILD_SCRIPT} printed {archive}, which is not a file")
    return archive


def image_name(archive: Path) -> str:
    """The full image name recorded beside a ``build-image.sh`` archive."""
    return (archive.parent / "image.txt").read_text().strip()


def _timestamp(value: str | None) -> float:
    """Seconds since the epoch of an API timestamp (``2026-12-01T08:36:09Z``); 0 if none."""
    if not value:
        return 0.0
    return datetime.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(
        tzinfo=datetime.UTC).timestamp()


def _unescape(field: str) -> str:
    """A path of /proc/self/mountinfo (space, tab, newline and backslash are octal)."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def _cgroup_v1_hierarchies() -> list[Path]:
    root = Path("/sys/fs/cgroup")
    if (root / "cgroup.controllers").exists():  # cgroup v2: one hierarchy
        return [root]
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink())


class Node:
    """containerd + kube-scheduler + kubelet for one control plane and work directory."""

    def __init__(self, workdir: Path, controlplane: ControlPlane | None, *,
                 exit_with_parent: bool = False, network: NetNamespace | None = None,
                 index: int = 1, scheduler: bool = True) -> None:
        """``controlplane`` None: a node another process started, only to ``stop()``
        (``from_state``). ``network``: a node of the pod-network cluster
        (``vmfleet.dev.cluster``): its components run in that namespace, it is
        ``vmfleet-node-INDEX`` on ``podnet``'s addresses, its pods get addresses of
        their own. ``scheduler``: this node runs the cluster's kube-scheduler (one
        node of a cluster does)."""
        self.workdir = Path(workdir).resolve()
        self._cp = controlplane
        self.exit_with_parent = exit_with_parent
        self.network = network
        self.index = index
        self.run_scheduler = scheduler
        self.name = podnet.node_name(index) if network is not None else NODE_NAME
        # A cgroup root of this work directory's own: its pods' cgroups go there.
        self.cgroup_root = "/vmfleet-" + hashlib.sha256(str(self.workdir).encode()).hexdigest()[:10]
        self.containerd_dir = self.workdir / "containerd"
        self.socket = self.containerd_dir / "containerd.sock"
        self.processes: dict[str, ManagedProcess] = {}
        self.kubelet_port = 0
        self.state_file = self.workdir / "node.json"
        self._started_at = 0.0

    @property
    def cp(self) -> ControlPlane:
        if self._cp is None:
            raise NodeError("this Node was read from its state: it can only be stopped")
        return self._cp

    @classmethod
    def from_state(cls, workdir: Path) -> Node:
        """The node another process (``vmfleet dev up --node``) left running in
        ``workdir``, to ``stop()`` it (``vmfleet dev down``)."""
        return cls(workdir, None)

    # -- lifecycle ---------------------------------------------------------------

    def start(self, timeout: float = 180) -> Node:
        missing = missing_requirements()
        if missing:
            raise NodeError("cannot run a local node here; missing: " + "; ".join(missing))
        binary = self.cp.binary
        pause = binary.parent / "pause"
        if not pause.is_file():
            raise NodeError(f"no pause binary beside {binary}: rebuild the control plane")
        deadline = time.monotonic() + timeout
        self._started_at = time.time()
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            if self.network is not None:
                podnet.prepare_node(self.network, self.index)
            self._start_containerd(deadline)
            self._import(self._pause_archive(pause))
            if self.run_scheduler:
                self._start("kube-scheduler", self._scheduler_args(binary))
            self._prepare_cgroups()
            self._start("kubelet", self._kubelet_args(binary))
            self._wait(deadline, f"Node {self.name} Ready", self.ready)
        except BaseException:
            self.stop()
            raise
        self._write_state()
        return self

    def stop(self, grace: float = 20.0) -> None:
        """Stop the kubelet, the scheduler and containerd; the pods' containers too.
        Components started by another process are found by their ``*.pgid`` files."""
        for name in ("kubelet", "kube-scheduler"):
            self._stop_component(name, grace)
        if self.socket.exists() and self._ctr_ok():
            self._remove_pods()
        self._stop_component("containerd", grace)
        self._kill_leftover_shims()
        self._kill_pod_processes()
        self._unmount_all()
        self._remove_cgroups()
        self.state_file.unlink(missing_ok=True)

    def kill(self) -> None:
        """Lose the node, as a machine that dies: SIGKILL to its kubelet (and scheduler),
        its containerd, the containers' shims and every process of its pods, in that
        order, so nothing restarts them. Nothing is cleaned up and nothing tells the API
        server: the Node object turns NotReady when its heartbeats stop, and its pods
        stay bound to it until the eviction. ``stop()`` cleans up afterwards."""
        for name in ("kubelet", "kube-scheduler", "containerd"):
            process = self.processes.get(name)
            if process is not None:
                process.signal(signal.SIGKILL)
        self._kill_leftover_shims()
        self._kill_pod_processes()

    def _stop_component(self, name: str, grace: float) -> None:
        process = self.processes.pop(name, None)
        if process is not None:
            process.stop(grace)
        stop_pid_file(self.workdir / f"{name}.pgid", grace)

    def running(self) -> bool:
        return bool(self.processes) and all(p.running() for p in self.processes.values())

    def check_running(self) -> None:
        for process in self.processes.values():
            process.check_running()

    def ready(self) -> bool:
        """Node Ready, as reported by this kubelet (the Node object of an earlier run
        survives in etcd with its old conditions)."""
        self.check_running()
        result = self.cp.kubectl_run("get", "node", self.name, "-o", "json", check=False)
        if result.returncode != 0:
            return False
        conditions = json.loads(result.stdout).get("status", {}).get("conditions", [])
        return any(
            c["type"] == "Ready" and c["status"] == "True"
            and _timestamp(c.get("lastHeartbeatTime")) >= self._started_at - 1
            for c in conditions
        )

    # -- images ------------------------------------------------------------------

    def import_image(self, archive: Path, *, tag: str | None = None) -> str:
        """Import a docker-archive into containerd's ``k8s.io`` namespace (where the
        kubelet looks); with ``tag``, also under that name. Returns the image name."""
        name = image_name(archive) if (archive.parent / "image.txt").exists() else ""
        self._import(archive)
        if tag:
            self.ctr("images", "tag", "--force", name, tag)
            return tag
        return name

    def images(self) -> list[str]:
        out = self.ctr("images", "list", "--quiet")
        return [line for line in out.splitlines() if line.strip()]

    def ctr(self, *args: str) -> str:
        argv = ["ctr", "--address", str(self.socket), "--namespace", CONTAINERD_NAMESPACE, *args]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
        if result.returncode != 0:
            raise NodeError(f"{' '.join(argv)} failed: {result.stderr.strip()}")
        return result.stdout

    def _import(self, archive: Path) -> None:
        self.ctr("images", "import", "--no-unpack=false", str(archive))

    def _pause_archive(self, pause: Path) -> Path:
        """A docker-archive of the pause image: one layer holding ``/pause``."""
        archive = self.workdir / "pause-image.tar"
        layer = io.BytesIO()
        with tarfile.open(fileobj=layer, mode="w") as tar:
            info = tar.gettarinfo(str(pause), arcname="pause")
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mode = 0o755
            info.mtime = 0
            with open(pause, "rb") as fh:
                tar.addfile(info, fh)
        layer_bytes = layer.getvalue()
        diff_id = "sha256:" + hashlib.sha256(layer_bytes).hexdigest()
        config = json.dumps({
            "architecture": "amd64" if os.uname().machine == "x86_64" else os.uname().machine,
            "os": "linux",
            "config": {"Entrypoint": ["/pause"], "User": "65535:65535"},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        }, sort_keys=True).encode()
        config_name = hashlib.sha256(config).hexdigest() + ".json"
        manifest = json.dumps([{
            "Config": config_name, "RepoTags": [PAUSE_IMAGE], "Layers": ["layer.tar"],
        }]).encode()
        with tarfile.open(archive, "w") as tar:
            for name, data in (("layer.tar", layer_bytes), (config_name, config),
                               ("manifest.json", manifest)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(data))
        return archive

    # -- components ----------------------------------------------------------------

    def _start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> ManagedProcess:
        env = dict(os.environ if env is None else env)
        env.pop("VMFLEET_CONTROLPLANE_PARENT_PID", None)
        if self.exit_with_parent and name != "containerd":
            env["VMFLEET_CONTROLPLANE_PARENT_PID"] = str(os.getpid())
        log = self.workdir / f"{name}.log"
        with open(log, "ab") as fh:
            fh.write(f"==== {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(argv)}\n".encode())
        if self.network is not None:
            argv = [*self.network.exec_prefix(), *argv]
        process = ManagedProcess(name, argv, log, env=env, cwd=self.workdir).start()
        self.processes[name] = process
        write_pid_file(process, self.workdir / f"{name}.pgid")
        return process

    def _wait(self, deadline: float, what: str, predicate: Callable[[], bool]) -> None:
        last_error: BaseException | None = None
        while True:
            self.check_running()
            try:
                if predicate():
                    return
            except NodeError:
                raise
            except Exception as exc:  # noqa: BLE001 - reported on timeout
                last_error = exc
            if time.monotonic() >= deadline:
                tails = "\n".join(f"--- {n}.log:\n{p.log_tail(15)}" for n, p in self.processes.items())
                raise NodeError(f"node: timed out waiting for {what}"
                                f"{f' (last error: {last_error!r})' if last_error else ''}\n{tails}")
            time.sleep(0.3)

    def _start_containerd(self, deadline: float) -> None:
        cni_bin = next(d for d in CNI_BIN_DIRS if (Path(d) / "loopback").exists())
        net_d = self.workdir / "cni" / "net.d"
        net_d.mkdir(parents=True, exist_ok=True)
        if self.network is not None:
            conflist = podnet.cni_config(self.index, self.workdir / "cni" / "ipam")
            (net_d / "10-vmfleet-pods.conflist").write_text(json.dumps(conflist, indent=2) + "\n")
        else:
            # Only the loopback plugin: a pod without hostNetwork gets `lo`, nothing else.
            (net_d / "10-loopback.conflist").write_text(json.dumps({
                "cniVersion": "1.0.0", "name": "vmfleet-loopback", "plugins": [{"type": "loopback"}],
            }, indent=2) + "\n")
        self.containerd_dir.mkdir(parents=True, exist_ok=True)
        config = self.containerd_dir / "config.toml"
        config.write_text(f"""\
version = 2
root = "{self.containerd_dir / 'root'}"
state = "{self.containerd_dir / 'state'}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
                    "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "{self.socket}"

[ttrpc]
  address = "{self.containerd_dir / 'containerd-ttrpc.sock'}"

[debug]
  level = "warn"

[metrics]
  address = ""

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  disable_apparmor = true
  # Without CAP_SYS_RESOURCE (some sandboxes) no process may lower its OOM score:
  # containers keep at least containerd's own.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni_bin}"
    conf_dir = "{net_d}"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{self.containerd_dir / 'certs.d'}"
""")
        # No image is ever pulled: every registry (_default: any host without a
        # directory of its own) resolves to a closed loopback port, so a pull of an
        # image that was not imported fails at once and contacts nothing.
        hosts = self.containerd_dir / "certs.d" / "_default" / "hosts.toml"
        hosts.parent.mkdir(parents=True, exist_ok=True)
        hosts.write_text(f'server = "http://127.0.0.1:{NO_REGISTRY_PORT}"\n\n'
                         f'[host."http://127.0.0.1:{NO_REGISTRY_PORT}"]\n'
                         '  capabilities = ["pull", "resolve"]\n')
        argv = ["containerd", "--config", str(config)]
        if self.exit_with_parent and shutil.which("setpriv"):
            # As the Go components do (VMFLEET_CONTROLPLANE_PARENT_PID): a killed test
            # session leaves no containerd behind.
            argv = ["setpriv", "--pdeathsig", "TERM", "--", *argv]
        self._start("containerd", argv)
        self._wait(deadline, "containerd's socket",
                   lambda: self.socket.exists() and self._ctr_ok())

    def _ctr_ok(self) -> bool:
        try:
            self.ctr("version")
            return True
        except NodeError:
            return False

    def _scheduler_args(self, binary: Path) -> list[str]:
        kubeconfig = self.cp.component_kubeconfig(SCHEDULER_USER, self.workdir / "kube-scheduler.kubeconfig")
        return [
            str(binary), "kube-scheduler",
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--authentication-skip-lookup=true",
            "--bind-address=127.0.0.1",
            f"--secure-port={free_port()}",
            f"--cert-dir={self.workdir / 'scheduler-certs'}",
            "--leader-elect=false",
            "--profiling=false",
        ]

    def _kubelet_args(self, binary: Path) -> list[str]:
        kubeconfig = self.cp.component_kubeconfig(f"system:node:{self.name}",
                                                  self.workdir / "kubelet.kubeconfig")
        self.kubelet_port = free_port() if self.network is None else podnet.KUBELET_PORT
        config: dict[str, Any] = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            # This machine mounts cgroup v1 only; Kubernetes 1.35 needs this to accept it.
            "failCgroupV1": False,
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": self.cgroup_root,
            "containerRuntimeEndpoint": f"unix://{self.socket}",
            "address": "127.0.0.1",
            "port": self.kubelet_port,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": free_port(),
            "podLogsDir": str(self.workdir / "pod-logs"),
            # Only kube-apiserver (a client certificate of the CA) may call the kubelet.
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": False},
                "x509": {"clientCAFile": str(self.cp.ca_file)},
            },
            "authorization": {"mode": "AlwaysAllow"},
            "failSwapOn": False,
            "clusterDomain": "cluster.local",
            "resolvConf": "/etc/resolv.conf",
            "registerNode": True,
            "serializeImagePulls": False,
            # A shared development machine: never evict or collect images for disk space.
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%",
                             "imagefs.available": "1%", "nodefs.inodesFree": "1%"},
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "syncFrequency": "10s",
            "nodeStatusUpdateFrequency": "5s",
            "shutdownGracePeriod": "0s",
            "maxPods": 110,
        }
        extra: list[str] = []
        if self.network is not None:
            config.update(podnet.kubelet_config(self.index))
            extra = [f"--node-ip={config['address']}"]
        config_path = self.workdir / "kubelet-config.json"
        config_path.write_text(json.dumps(config, indent=2) + "\n")
        return [
            str(binary), "kubelet",
            f"--config={config_path}",
            f"--kubeconfig={kubeconfig}",
            f"--hostname-override={self.name}",
            f"--root-dir={self.workdir / 'kubelet'}",
            f"--cert-dir={self.workdir / 'kubelet' / 'pki'}",
            *extra,
            "--v=1",
        ]

    # -- cgroups and cleanup ---------------------------------------------------------

    def _prepare_cgroups(self) -> None:
        """The kubelet wants its cgroup root to exist in every hierarchy."""
        for hierarchy in _cgroup_v1_hierarchies():
            (hierarchy / self.cgroup_root.lstrip("/")).mkdir(exist_ok=True)

    def _kill_pod_processes(self) -> None:
        """Whatever still runs in the node's cgroups (a containerd that died with a
        killed test session left its containers behind): SIGKILL."""
        for hierarchy in _cgroup_v1_hierarchies():
            root = hierarchy / self.cgroup_root.lstrip("/")
            if not root.is_dir():
                continue
            for procs in root.rglob("cgroup.procs"):
                try:
                    pids = procs.read_text().split()
                except OSError:
                    continue
                for pid in pids:
                    try:
                        os.kill(int(pid), 9)
                    except (OSError, ValueError):
                        pass
            return  # every process is in every hierarchy: one is enough

    def _remove_cgroups(self) -> None:
        for hierarchy in _cgroup_v1_hierarchies():
            root = hierarchy / self.cgroup_root.lstrip("/")
            if not root.is_dir():
                continue
            # Deepest first; a cgroup still holding a process stays (and is reported).
            for path in sorted((p for p in root.rglob("*") if p.is_dir()),
                               key=lambda p: len(p.parts), reverse=True):
                try:
                    path.rmdir()
                except OSError:
                    pass
            try:
                root.rmdir()
            except OSError:
                pass

    def _remove_pods(self) -> None:
        """Kill every container of this containerd (the kubelet is already stopped)."""
        try:
            tasks = self.ctr("tasks", "list", "--quiet").split()
        except NodeError:
            return
        for task in tasks:
            try:
                self.ctr("tasks", "kill", "--signal", "SIGKILL", "--all", task)
            except NodeError:
                pass
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                if not self.ctr("tasks", "list", "--quiet").split():
                    break
            except NodeError:
                break
            time.sleep(0.2)

    def _unmount_all(self) -> None:
        """The kubelet's and containerd's mounts under the work directory (the kubelet
        binds its root directory onto itself, pods' volumes are tmpfs and binds, and
        containers' root filesystems overlays): unmounted, deepest first."""
        prefix = str(self.workdir) + "/"
        points = []
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = _unescape(line.split()[4])
            if point.startswith(prefix):
                points.append(point)
        for point in sorted(set(points), key=lambda p: p.count("/"), reverse=True):
            subprocess.run(["umount", "--lazy", point], capture_output=True, check=False)

    def _kill_leftover_shims(self) -> None:
        """containerd-shim processes outlive containerd by design; ours die with it."""
        marker = str(self.containerd_dir / "state")
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if not cmdline or not cmdline[0].endswith(b"containerd-shim-runc-v2"):
                continue
            if not any(marker.encode() in arg or str(self.socket).encode() in arg for arg in cmdline):
                continue
            try:
                os.kill(int(proc.name), 9)
            except OSError:
                pass

    def _write_state(self) -> None:
        state = {"name": self.name, "kubeletPort": self.kubelet_port,
                 "socket": str(self.socket), "cgroupRoot": self.cgroup_root,
                 "pids": {n: p.pid for n, p in self.processes.items()}}
        self.state_file.write_text(json.dumps(state, indent=2) + "\n")


def chart_values(controlplane: ControlPlane, image: str, *, broker_secret: str = "broker",
                 controller_secret: str = "broker-controller",
                 extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    """Helm values of charts/vmfleet for the local node: the imported image (never
    pulled), every pod on the host's network, the API server reached on 127.0.0.1 (the
    kubelet's KUBERNETES_SERVICE_HOST is the `kubernetes` Service IP, which nothing
    here serves), the broker URLs from the Secrets ``broker_secret`` (the namespace's
    own Redis user, for its workers) and ``controller_secret`` (the controller's and the
    transfer worker's), of a Redis on loopback (the bundled one's image cannot be
    pulled), and free loopback ports for the
    controller's health and metrics endpoints. ``extra_env`` goes to every container."""
    api = [{"name": "KUBERNETES_SERVICE_HOST", "value": "127.0.0.1"},
           {"name": "KUBERNETES_SERVICE_PORT", "value": str(controlplane.apiserver_port)}]
    extra = [{"name": k, "value": v} for k, v in (extra_env or {}).items()]
    loopback_metrics = [{"name": "VMFLEET_METRICS_ADDRESS", "value": "127.0.0.1"}]
    repository, _, tag = image.rpartition(":")
    small = {"requests": {"cpu": "10m", "memory": "64Mi"}, "limits": {"memory": "512Mi"}}
    return {
        "image": {"repository": repository, "tag": tag, "pullPolicy": "Never"},
        "hostNetwork": True,
        "broker": {"bundled": {"enabled": False},
                   "external": {"existingSecret": broker_secret, "secretKey": "url",
                                "controllerSecret": controller_secret}},
        # One controller replica: two on the host's network would take the same ports.
        "controller": {"healthPort": free_port(), "readinessPort": free_port(), "replicas": 1,
                       "extraEnv": api + extra + loopback_metrics, "resources": small},
        "metrics": {"controllerPort": free_port(), "workerPort": free_port()},
        # The workers share the node's network, so one port would not do: metrics off.
        # The transfer workers are workers too: the API server on loopback, for sources.
        "workers": {"extraEnv": api + extra + [{"name": "VMFLEET_METRICS_PORT", "value": "0"}]},
    }
