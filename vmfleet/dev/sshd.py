"""Fake "VMs" for the local environment and the e2e tests: real OpenSSH sshd processes.

Each ``SshdVM`` is one ``/usr/sbin/sshd -D`` listening on its own loopback address
(``127.0.10.1``, ``127.0.10.2``, ... — any 127.x address works on Linux without setup)
with a generated ed25519 host key and a generated ed25519 user key (optionally with a
passphrase). The login user is the current user (root in CI).

When running as root, each VM also gets its own namespaces (``unshare``, util-linux):

* UTS: ``hostname`` on vm1 prints ``vm1``;
* PID: the VM's processes are a tree of their own, so ``kill()`` (SIGKILL, a crashed
  VM) and ``stop()`` end every session and command running on it, as a VM going away
  would; ``ps`` on the VM shows only its own processes;
* mount: a private ``/tmp``, ``/var/tmp`` and home directory, so a file written on vm1
  is not visible on vm2 (file transfers between VMs mean something). These are
  directories under ``vm.root`` on the host: ``vm.host_path("/tmp/x")`` is where
  ``/tmp/x`` "on the VM" lives. The rest of the filesystem is shared with the host.
  Directories that must stay visible (``visible``; by default the checkout this package
  runs from, which tests and the demo share with the VMs) are bound back at their own
  path, so a clone under ``/tmp`` or the home directory works like one under ``/srv``.

Not root (a developer's laptop), or where namespaces are forbidden (an unprivileged
container): plain sshd processes, no namespaces. ``hostname``
prints the machine's hostname on every VM, all VMs share one filesystem
(``vm.isolated`` is False, ``vm.root`` is None and ``host_path`` is the identity), and
``kill()``/``stop()`` end sshd and the session processes found under it.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from vmfleet.procs import ManagedProcess, free_port, stop_pid_file, wait_until, write_pid_file

if TYPE_CHECKING:  # paramiko is imported lazily: only the helpers need it
    import paramiko

    from vmfleet.dev.netns import NetNamespace

SSHD = "/usr/sbin/sshd"
SSH_KEYGEN = "ssh-keygen"
UNSHARE = "unshare"

# Inside a VM's mount namespace, its work directory is bound here, so sshd's own files
# stay reachable after /tmp (which may hold the work directory) is replaced.
_NS_VMDIR = "/run/vmfleet-dev-vm"

# Shell run inside the namespaces before sshd; only positional parameters, never
# values formatted into the text. $1 name, $2 work dir, $3 home dir, $4 N, then N
# directories that stay visible, then sshd's argv. Those directories are held aside
# (bound under the work dir) before the private ones cover them, then bound back.
_NS_SETUP = r"""
set -eu
name=$1 vmdir=$2 home=$3 nkeep=$4
shift 4
hostname "$name"
v=/run/vmfleet-dev-vm
mount --bind "$vmdir" "$v"
i=0
for path in "$@"; do
  [ "$i" -lt "$nkeep" ] || break
  mkdir -p "$v/keep/$i"
  mount --bind "$path" "$v/keep/$i"
  i=$((i + 1))
done
mount --bind "$v/root/tmp" /tmp
mount --bind "$v/root/var/tmp" /var/tmp
mount --bind "$v/root/home" "$home"
i=0
while [ "$i" -lt "$nkeep" ]; do
  mkdir -p "$1"
  mount --bind "$v/keep/$i" "$1"
  umount "$v/keep/$i"
  shift
  i=$((i + 1))
done
exec "$@"
"""

# The checkout this package runs from (tests and the demo put files there for the VMs).
_CHECKOUT = Path(__file__).resolve().parents[2]


def is_root() -> bool:
    return os.geteuid() == 0


_UNSHARE_FLAGS = ["--uts", "--mount", "--propagation", "private", "--pid", "--fork", "--kill-child", "--mount-proc"]
_namespaces_ok: bool | None = None


def namespaces_supported() -> bool:
    """True when this process may create the per-VM namespaces (root, and not in a
    container that forbids it). Probed once."""
    global _namespaces_ok
    if _namespaces_ok is None:
        if not is_root() or shutil.which(UNSHARE) is None:
            _namespaces_ok = False
        else:
            try:
                probe = subprocess.run(
                    [UNSHARE, *_UNSHARE_FLAGS, "true"],
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    timeout=10,
                )
                _namespaces_ok = probe.returncode == 0
            except (OSError, subprocess.TimeoutExpired):
                _namespaces_ok = False
    return _namespaces_ok


def current_user() -> str:
    return pwd.getpwuid(os.geteuid()).pw_name


def _home_of(user: str) -> str:
    return pwd.getpwnam(user).pw_dir


def _private_dirs(user: str) -> list[tuple[PurePosixPath, str]]:
    """The directories each VM replaces with its own (see the module docstring), and
    where each lives under ``vm.root``."""
    return [(PurePosixPath("/tmp"), "tmp"), (PurePosixPath("/var/tmp"), "var/tmp"),
            (PurePosixPath(_home_of(user)), "home")]


def _under(path: PurePosixPath, root: PurePosixPath) -> bool:
    return path == root or root in path.parents


def hidden_paths(paths: Sequence[Path], user: str) -> list[Path]:
    """Those of ``paths`` that a VM logged into as ``user`` would not see: they lie
    under its private ``/tmp``, ``/var/tmp`` or home directory."""
    roots = [root for root, _ in _private_dirs(user)]
    return [p for p in paths if any(_under(PurePosixPath(p), root) for root in roots)]


def read_ssh_banner(host: str, port: int, timeout: float = 2.0,
                    network: NetNamespace | None = None) -> str:
    """Return the server's identification line (``SSH-2.0-...``); ``network``: connect
    inside that namespace."""
    sock = (socket.create_connection((host, port), timeout=timeout) if network is None
            else network.connect(host, port, timeout))
    with sock:
        data = b""
        while b"\n" not in data and len(data) < 512:
            chunk = sock.recv(256)
            if not chunk:
                break
            data += chunk
    return data.split(b"\n", 1)[0].decode("ascii", "replace").strip()


def _keygen(path: Path, comment: str, passphrase: str = "") -> None:
    for p in (path, path.with_name(path.name + ".pub")):
        p.unlink(missing_ok=True)
    subprocess.run(
        [SSH_KEYGEN, "-q", "-t", "ed25519", "-N", passphrase, "-C", comment, "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    path.chmod(0o600)


def _descendants(pid: int) -> list[int]:
    """PIDs of all descendants of ``pid`` (from /proc), deepest last."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        # Field 4 (ppid) follows the ")" that ends the command name.
        fields = stat[stat.rindex(b")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(entry))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class SshdVM:
    """One fake VM: an OpenSSH sshd on a loopback address, with generated keys."""

    def __init__(
        self,
        name: str,
        workdir: Path,
        address: str = "127.0.0.1",
        port: int | None = None,
        user: str | None = None,
        key_passphrase: str | None = None,
        isolate: bool | None = None,
        visible: Sequence[Path] | None = None,
        network: NetNamespace | None = None,
    ) -> None:
        """``workdir`` is this VM's own directory (created). ``isolate`` (per-VM
        namespaces) defaults to True when they can be made (root, ``unshare`` allowed).
        ``visible``: host directories the VM sees at their own path even under its
        private ``/tmp``, ``/var/tmp`` or home (default: the checkout). ``network``:
        sshd runs inside that namespace (the pod-network cluster's, ``vmfleet.dev.netns``),
        on ``address`` (one of its VM addresses, added to its VMs' bridge), port 22 by
        default; the host reaches it only from inside (``ssh_client`` does)."""
        self.name = name
        self.workdir = Path(workdir).resolve()
        self.host = address
        self.network = network
        if network is not None:
            network.add_address(address)
            port = 22 if port is None else port
        self.port = port if port is not None else free_port(address)
        self.user = user or current_user()
        self.key_passphrase = key_passphrase
        if isolate is None:
            isolate = namespaces_supported()
        elif isolate and not namespaces_supported():
            raise ValueError("per-VM namespaces (isolate=True) need root and unshare(1)")
        self.isolated = isolate
        self.root: Path | None = self.workdir / "root" if isolate else None
        wanted = [Path(p).resolve() for p in (visible if visible is not None else [_CHECKOUT])]
        for path in wanted:
            if not path.is_dir():
                raise ValueError(f"visible: {path} is not a directory")
        # Only what a private directory would hide needs binding back.
        self.visible: list[Path] = hidden_paths(wanted, self.user) if isolate else []
        self._process: ManagedProcess | None = None
        self._host_key_generation = 0
        self._prepare()

    # -- files -------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.workdir / "sshd_config"

    @property
    def log_path(self) -> Path:
        return self.workdir / "sshd.log"

    @property
    def pid_file(self) -> Path:
        """The running sshd's process group, so another process can stop it."""
        return self.workdir / "sshd.pgid"

    @property
    def user_key_path(self) -> Path:
        """The user's private key file (OpenSSH format), e.g. for ``ssh -i``."""
        return self.workdir / "id_ed25519"

    @property
    def host_key_path(self) -> Path:
        return self.workdir / f"ssh_host_ed25519_key.{self._host_key_generation}"

    @property
    def known_hosts_path(self) -> Path:
        """A known_hosts file pinning this VM's current host key (for ``ssh -o``)."""
        path = self.workdir / "known_hosts"
        path.write_text("".join(line + "\n" for line in self.known_hosts_lines()))
        return path

    def _prepare(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.workdir.chmod(0o700)
        if self.root is not None:
            for sub in ("tmp", "var/tmp"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
                (self.root / sub).chmod(0o1777)
            (self.root / "home").mkdir(parents=True, exist_ok=True)
            (self.root / "home").chmod(0o700)
        if not self.user_key_path.exists():
            _keygen(self.user_key_path, f"{self.user}@vmfleet-{self.name}", self.key_passphrase or "")
            pub = self.user_key_path.with_name(self.user_key_path.name + ".pub")
            shutil.copyfile(pub, self.workdir / "authorized_keys")
        if self.user != current_user():
            # Another login user (root making a VM for an unprivileged user): sshd reads
            # authorized_keys as that user, and the VM's private home is the user's.
            self.workdir.chmod(0o711)
            (self.workdir / "authorized_keys").chmod(0o644)
            if self.root is not None:
                entry = pwd.getpwnam(self.user)
                os.chown(self.root / "home", entry.pw_uid, entry.pw_gid)
        existing = sorted(
            int(p.name.rsplit(".", 1)[1])
            for p in self.workdir.glob("ssh_host_ed25519_key.*")
            if p.name.rsplit(".", 1)[1].isdigit()
        )
        if existing:
            self._host_key_generation = existing[-1]
        else:
            self.regenerate_host_key()

    def regenerate_host_key(self) -> None:
        """Make a new host key. A running sshd keeps serving the old one until
        ``restart()``; ``host_public_keys`` already returns the new one."""
        self._host_key_generation += 1
        _keygen(self.host_key_path, f"root@{self.name}")

    def _prune_old_host_keys(self) -> None:
        # Called when sshd is stopped: a running sshd may still read its key files.
        for p in self.workdir.glob("ssh_host_ed25519_key.*"):
            gen = p.name.split(".")[1]
            if gen.isdigit() and int(gen) != self._host_key_generation:
                p.unlink(missing_ok=True)

    @property
    def host_public_keys(self) -> list[str]:
        """OpenSSH public key lines of the host key(s): ``["ssh-ed25519 AAAA..."]``
        (without the comment)."""
        text = self.host_key_path.with_name(self.host_key_path.name + ".pub").read_text()
        return [" ".join(line.split()[:2]) for line in text.splitlines() if line.strip()]

    @property
    def user_private_key_pem(self) -> str:
        """The user's private key, OpenSSH format (a Secret's ``ssh-privatekey``)."""
        return self.user_key_path.read_text()

    @property
    def user_public_key(self) -> str:
        pub = self.user_key_path.with_name(self.user_key_path.name + ".pub")
        return pub.read_text().strip()

    def known_hosts_lines(self) -> list[str]:
        host = self.host if self.port == 22 else f"[{self.host}]:{self.port}"
        return [f"{host} {key}" for key in self.host_public_keys]

    def host_path(self, path: str | PurePosixPath) -> Path:
        """Where the file ``path`` "on the VM" is on the host.

        With namespaces, ``/tmp``, ``/var/tmp`` and the user's home are private to the
        VM and live under ``vm.root``; every other path, and those under ``visible``,
        is the host's own.
        """
        p = PurePosixPath(path)
        if not p.is_absolute():
            p = PurePosixPath(_home_of(self.user)) / p
        if self.root is None or any(_under(p, PurePosixPath(v)) for v in self.visible):
            return Path(p)
        for remote, local in _private_dirs(self.user):
            if _under(p, remote):
                return self.root / local / p.relative_to(remote)
        return Path(p)

    # -- config ------------------------------------------------------------------

    def _write_config(self) -> Path:
        # Paths as sshd sees them: inside the mount namespace the work dir is rebound.
        base = _NS_VMDIR if self.isolated else str(self.workdir)
        host_key = f"{base}/{self.host_key_path.name}"
        lines = [
            f"# vmfleet dev VM {self.name} (generated; rewritten at every start)",
            f"ListenAddress {self.host}:{self.port}",
            "AddressFamily inet",
            f"HostKey {host_key}",
            # In a PID namespace sshd's own pid file would say "1": see pid_file.
            f"PidFile {base}/sshd.pid" if not self.isolated else "PidFile none",
            f"AuthorizedKeysFile {base}/authorized_keys",
            f"AllowUsers {self.user}",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "HostbasedAuthentication no",
            "UsePAM no",
            "StrictModes no",
            "PermitRootLogin prohibit-password",
            "PermitUserEnvironment no",
            # No AcceptEnv line: sshd accepts no client environment variables.
            "Subsystem sftp internal-sftp",
            "MaxSessions 100",
            "MaxStartups 200",
            "MaxAuthTries 10",
            "LoginGraceTime 30",
            "UseDNS no",
            "PrintMotd no",
            "PrintLastLog no",
            "X11Forwarding no",
            "AllowTcpForwarding yes",  # a VM can be a proxyJump bastion
            "LogLevel INFO",
            "",
        ]
        self.config_path.write_text("\n".join(lines))
        return self.config_path

    def _argv(self) -> list[str]:
        base = _NS_VMDIR if self.isolated else str(self.workdir)
        sshd = [SSHD, "-D", "-e", "-f", f"{base}/{self.config_path.name}"]
        inside = self.network.exec_prefix() if self.network is not None else []
        if not self.isolated:
            return [*inside, *sshd]
        return [
            *inside,
            UNSHARE,
            *_UNSHARE_FLAGS,
            "sh",
            "-c",
            _NS_SETUP,
            "vmfleet-vm",  # $0
            self.name,
            str(self.workdir),
            _home_of(self.user),
            str(len(self.visible)),
            *map(str, self.visible),
            *sshd,
        ]

    # -- lifecycle ---------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def running(self) -> bool:
        return self._process is not None and self._process.running()

    def start(self, timeout: float = 30) -> SshdVM:
        if self.running():
            return self
        if is_root():
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
            if self.isolated:
                Path(_NS_VMDIR).mkdir(mode=0o700, exist_ok=True)
        stop_pid_file(self.pid_file)  # a stale sshd of this work dir (e.g. a crashed dev up)
        self._prune_old_host_keys()
        self._write_config()
        self._process = ManagedProcess(f"sshd-{self.name}", self._argv(), self.log_path)
        self._process.start()
        write_pid_file(self._process, self.pid_file)
        process = self._process

        def ready() -> bool:
            process.check_running()
            banner = read_ssh_banner(self.host, self.port, timeout=1.0, network=self.network)
            return banner.startswith("SSH-2.0")

        try:
            wait_until(ready, timeout, interval=0.05, what=f"sshd {self.name} on {self.host}:{self.port}")
        except Exception:
            self.kill()
            raise
        return self

    def _sshd_pid(self) -> int | None:
        """The sshd listener's PID (in the host's PID namespace)."""
        if self._process is None or not self._process.running():
            return None
        if not self.isolated:
            return self._process.pid
        kids = _descendants(self._process.pid)
        return kids[0] if kids else None

    def processes(self) -> list[int]:
        """Every process of this VM (sshd and its sessions), host PIDs, parents first."""
        if self._process is None or not self._process.running():
            return []
        return [self._process.pid, *_descendants(self._process.pid)]

    def commands(self, pids: Sequence[int] | None = None) -> dict[int, str]:
        """The command line of each live process of this VM (a zombie has exited), by
        host PID, read from the host's /proc: no SSH round trip. ``pids``: only those."""
        found: dict[int, str] = {}
        for pid in self.processes() if pids is None else pids:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as fh:
                    args = fh.read()
                with open(f"/proc/{pid}/stat", "rb") as fh:
                    stat = fh.read()
                state = stat[stat.rindex(b")") + 2:].split()[0]
            except (OSError, ValueError, IndexError):
                continue  # it ended while we looked
            if state != b"Z":
                found[pid] = args.replace(b"\0", b" ").decode(errors="replace").strip()
        return found

    def _kill_sessions(self) -> None:
        # Without a PID namespace, session processes (sshd children call setsid) are
        # not in sshd's process group: find them through /proc.
        if self._process is None or self.isolated:
            return
        for pid in reversed(_descendants(self._process.pid)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop(self, grace: float = 10.0) -> None:
        """Stop sshd and end every session on the VM. Without a process of its own
        (another process started it), stops the one recorded in ``pid_file``."""
        if self._process is None:
            stop_pid_file(self.pid_file, grace)
            return
        self._kill_sessions()
        self._process.stop(grace)
        self._process = None
        self.pid_file.unlink(missing_ok=True)

    def kill(self) -> None:
        """SIGKILL sshd (and with it everything on the VM): a crashed VM."""
        if self._process is None:
            stop_pid_file(self.pid_file, grace=0)
            return
        self._kill_sessions()
        self._process.signal(signal.SIGKILL)
        self._process.stop(grace=5)
        self._process = None
        self.pid_file.unlink(missing_ok=True)

    def restart(self, timeout: float = 30) -> SshdVM:
        self.stop()
        return self.start(timeout)

    def __enter__(self) -> SshdVM:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"SshdVM({self.name!r}, {self.host}:{self.port}, user={self.user!r})"

    # -- helpers for tests and the demo ---------------------------------------------

    def ssh_client(self, timeout: float = 10, host_keys: Sequence[str] | None = None) -> paramiko.SSHClient:
        """A connected paramiko client: this VM's user key, host key pinned
        (``host_keys`` or this VM's own), unknown keys rejected."""
        import io

        import paramiko

        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        known = client.get_host_keys()
        entry = self.host if self.port == 22 else f"[{self.host}]:{self.port}"
        for line in host_keys if host_keys is not None else self.host_public_keys:
            key_type, blob = line.split()[:2]
            known.add(entry, key_type, paramiko.PKey.from_type_string(key_type, _b64decode(blob)))
        pkey = paramiko.Ed25519Key.from_private_key(
            io.StringIO(self.user_private_key_pem), password=self.key_passphrase
        )
        sock = self.network.connect(self.host, self.port, timeout) if self.network is not None else None
        try:
            client.connect(
                self.host,
                port=self.port,
                sock=sock,
                username=self.user,
                pkey=pkey,
                timeout=timeout,
                banner_timeout=timeout,
                auth_timeout=timeout,
                allow_agent=False,
                look_for_keys=False,
            )
        except BaseException:
            client.close()
            raise
        return client

    def run(self, command: str, timeout: float = 30) -> tuple[int, bytes, bytes]:
        """Run ``command`` on the VM over SSH: ``(exit_code, stdout, stderr)``."""
        client = self.ssh_client(timeout=timeout)
        try:
            _, stdout, stderr = client.exec_command(command, timeout=timeout)
            out = stdout.read()
            err = stderr.read()
            return stdout.channel.recv_exit_status(), out, err
        except TimeoutError as exc:  # say what the VM's sshd saw
            tail = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-30:]) \
                if self.log_path.exists() else "(no log)"
            raise TimeoutError(f"{command!r} on {self.name} ({self.host}:{self.port}) did not end "
                               f"within {timeout}s; the end of its sshd log:\n{tail}") from exc
        finally:
            client.close()


def _b64decode(blob: str) -> bytes:
    import base64

    return base64.b64decode(blob)


def start_vms(
    n: int,
    workdir: Path,
    *,
    subnet: str = "127.0.10",
    first: int = 1,
    prefix: str = "vm",
    user: str | None = None,
    key_passphrase: str | None = None,
    isolate: bool | None = None,
    timeout: float = 30,
) -> list[SshdVM]:
    """Start ``vm1``..``vmN`` on ``{subnet}.1``..``{subnet}.N`` (distinct loopback
    addresses), each on a free port, under ``workdir/vmK``. All are stopped again if
    one fails to start."""
    vms: list[SshdVM] = []
    try:
        for i in range(first, first + n):
            name = f"{prefix}{i}"
            vm = SshdVM(
                name,
                Path(workdir) / name,
                address=f"{subnet}.{i}",
                user=user,
                key_passphrase=key_passphrase,
                isolate=isolate,
            )
            vms.append(vm)
            vm.start(timeout)
    except BaseException:
        stop_vms(vms)
        raise
    return vms


def stop_vms(vms: Sequence[SshdVM]) -> None:
    for vm in vms:
        vm.stop()


def wait_for_port_closed(host: str, port: int, timeout: float = 10) -> None:
    """Wait until nothing accepts connections on ``host:port``."""

    def closed() -> bool:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return False
        except OSError:
            return True

    wait_until(closed, timeout, interval=0.05, what=f"{host}:{port} to close")


__all__ = [
    "SshdVM",
    "current_user",
    "is_root",
    "namespaces_supported",
    "read_ssh_banner",
    "start_vms",
    "stop_vms",
    "wait_for_port_closed",
]
