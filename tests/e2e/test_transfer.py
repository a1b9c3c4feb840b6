"""File transfers between VMs end to end: real sshd VMs, real controller, the namespace's
transfer worker (run by the controller, woken by the first transfer).

The big-file size is 64 MiB by default; ``VMFLEET_E2E_BIG=1`` runs the 1 GiB version of
the issue (slow: about a minute on two cores).
"""

from __future__ import annotations

import hashlib
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.fleet import Namespace, assert_no_tracebacks, start_controller, unique_namespace
from vmfleet.dev.proc import wait_until

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024
BIG = 1024 * MiB if os.environ.get("VMFLEET_E2E_BIG") == "1" else 64 * MiB


def write_random(path: Path, size: int) -> str:
    """A file of ``size`` random bytes; returns its sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    block = os.urandom(MiB)
    with path.open("wb") as fh:
        for i in range(size // MiB):
            chunk = block[i % 251:] + block[: i % 251]  # differs per MiB, cheap to make
            digest.update(chunk)
            fh.write(chunk)
        rest = os.urandom(size % MiB)
        digest.update(rest)
        fh.write(rest)
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(4 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def transfer_worker_pid(controller_dir: Path, namespace: str) -> int:
    """The pid of the namespace's transfer worker (the Process runtime's first replica)."""
    pid_file = controller_dir / "workers" / f"{namespace}.transfers.0.pgid"
    wait_until(pid_file.exists, timeout=60, what="the transfer worker to start")
    return int(pid_file.read_text().split()[0])


def ready_transfer_worker(controller_dir: Path, namespace: str) -> int:
    """The worker's pid once Celery reports it ready (its start-up memory is not growth)."""
    pid = transfer_worker_pid(controller_dir, namespace)
    log = controller_dir / "workers" / f"{namespace}.transfers.0.log"
    wait_until(lambda: " ready." in log.read_text(errors="replace"), timeout=60,
               what="the transfer worker to be ready")
    return pid


class RssSampler:
    """Samples a process's resident memory until stopped; keeps the peak."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.start = self.peak = rss_bytes(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, rss_bytes(self.pid))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth(self) -> int:
        return self.peak - self.start


def results_by_vm(obj: dict) -> dict[str, dict]:
    return {entry["vm"]: entry for entry in obj["status"]["results"]}


def listing(vm, directory: str) -> list[str]:
    return sorted(os.listdir(vm.host_path(directory)))


@pytest.fixture
def tmpdir_on(ns: Namespace, vms) -> Iterator[str]:
    """A directory name private to this test, removed from every VM afterwards."""
    directory = f"/tmp/xfer-{ns}"
    yield directory
    import shutil

    for vm in vms:
        shutil.rmtree(vm.host_path(directory), ignore_errors=True)


def test_big_file_to_two_vms_is_identical_and_memory_bounded(
    ns: Namespace, vms, controller_dir: Path, tmpdir_on: str
):
    vm1, vm2, vm3 = vms
    ns.add_vms(vms)
    src = f"{tmpdir_on}/src.bin"
    expected = write_random(vm1.host_path(src), BIG)
    # A small copy first: it wakes the namespace's transfer worker, and what the worker
    # loads on first use (SFTP, ciphers) is not memory that grows with the file.
    write_random(vm1.host_path(f"{tmpdir_on}/warm.bin"), MiB)
    ns.run("warm-up", transfer={"from": {"vm": "vm1", "path": f"{tmpdir_on}/warm.bin"},
                                "to": [{"vm": "vm2", "path": f"{tmpdir_on}/warm.bin"},
                                       {"vm": "vm3", "path": f"{tmpdir_on}/warm.bin"}],
                                "createDirs": True})
    assert ns.finished("warm-up")["status"]["phase"] == "Succeeded"
    pid = ready_transfer_worker(controller_dir, str(ns))
    dst = f"{tmpdir_on}/copy/big.bin"
    with RssSampler(pid) as rss:
        ns.run("big", transfer={
            "from": {"vm": "vm1", "path": src},
            "to": [{"vm": "vm2", "path": dst}, {"vm": "vm3", "path": dst}],
            "createDirs": True, "mode": "0640"})
        obj = ns.finished("big", timeout=600)
    assert obj["status"]["phase"] == "Succeeded", obj["status"]
    assert obj["status"]["target"] == "vm1 -> vm2,vm3"
    results = results_by_vm(obj)
    assert sorted(results) == ["vm2", "vm3"]
    for vm in (vm2, vm3):
        entry = results[vm.name]
        assert (entry["phase"], entry["reason"]) == ("Succeeded", "Completed")
        transfer = entry["transfer"]
        assert transfer["bytes"] == BIG
        assert transfer["sha256"] == expected
        assert transfer["source"] == f"vm1:{src}"
        assert transfer["path"] == dst
        assert transfer["bytesPerSecond"] > 0
        path = vm.host_path(dst)
        assert sha256_file(path) == expected
        assert path.stat().st_mode & 0o777 == 0o640
        assert listing(vm, f"{tmpdir_on}/copy") == ["big.bin"]  # no temporary file left
    assert not vm1.host_path(dst).exists()  # private /tmp: the copy is on vm2 and vm3 only
    # Read once, written twice: the worker's memory does not grow with the file.
    assert rss.growth < 64 * MiB, (
        f"transfer worker RSS grew by {rss.growth / MiB:.1f} MiB "
        f"({rss.start / MiB:.1f} -> {rss.peak / MiB:.1f} MiB)")
    seconds = max(results[v]["transfer"]["durationSeconds"] for v in ("vm2", "vm3"))
    print(f"\n{BIG / MiB:.0f} MiB vm1 -> vm2+vm3 in {seconds:.1f}s: "
          f"{BIG / MiB / seconds:.1f} MiB/s per destination; worker RSS "
          f"{rss.start / MiB:.1f} MiB -> peak {rss.peak / MiB:.1f} MiB "
          f"(+{rss.growth / MiB:.1f} MiB)")
    assert_no_tracebacks(controller_dir / "workers", controller_dir / "controller.log")


HOSTILE = [
    "with space.txt",
    "quote'\"s.txt",
    "$(touch HACKED).txt",
    "semi;touch HACKED2",
    "new\nline",
    "-rf",
    "--help",
    "`id`",
]


def test_hostile_names_copy_literally_and_create_nothing_else(ns: Namespace, vms, tmpdir_on: str):
    vm1, vm2, _ = vms
    ns.add_vms(vms[:2])
    for i, name in enumerate(HOSTILE):
        src = vm1.host_path(f"{tmpdir_on}/src/{name}")
        src.parent.mkdir(parents=True, exist_ok=True)
        src.write_bytes(f"content {i}\n".encode())
    before_vm1 = sorted(os.listdir(vm1.host_path("/tmp")))
    for i, name in enumerate(HOSTILE):
        ns.run(f"hostile-{i}", transfer={
            "from": {"vm": "vm1", "path": f"{tmpdir_on}/src/{name}"},
            "to": [{"vm": "vm2", "path": f"{tmpdir_on}/dst/{name}"}], "createDirs": True})
    for i, name in enumerate(HOSTILE):
        obj = ns.finished(f"hostile-{i}")
        assert obj["status"]["phase"] == "Succeeded", (name, obj["status"])
        assert vm2.host_path(f"{tmpdir_on}/dst/{name}").read_bytes() == f"content {i}\n".encode()
    assert listing(vm2, f"{tmpdir_on}/dst") == sorted(HOSTILE)
    assert listing(vm1, f"{tmpdir_on}/src") == sorted(HOSTILE)
    assert sorted(os.listdir(vm1.host_path("/tmp"))) == before_vm1
    for vm in (vm1, vm2):
        for marker in ("HACKED", "HACKED2"):
            assert not vm.host_path(f"/tmp/{marker}").exists()
            assert not vm.host_path(f"{tmpdir_on}/{marker}").exists()
        _, out, _ = vm.run("ls -A ~")
        assert b"HACKED" not in out


def test_reader_never_sees_a_partial_file(ns: Namespace, vms, tmpdir_on: str):
    vm1, vm2, _ = vms
    ns.add_vms(vms[:2])
    size = 16 * MiB
    old = b"old\n" * 1000
    dst = vm2.host_path(f"{tmpdir_on}/watched.bin")
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(old)
    new_sha = write_random(vm1.host_path(f"{tmpdir_on}/new.bin"), size)
    seen: dict[str, int] = {}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            data = dst.read_bytes()
            state = "old" if data == old else (
                "new" if len(data) == size and hashlib.sha256(data).hexdigest() == new_sha
                else f"partial:{len(data)}")
            seen[state] = seen.get(state, 0) + 1

    reader = threading.Thread(target=watch, daemon=True)
    reader.start()
    try:
        ns.run("swap", transfer={"from": {"vm": "vm1", "path": f"{tmpdir_on}/new.bin"},
                                 "to": [{"vm": "vm2", "path": f"{tmpdir_on}/watched.bin"}]})
        obj = ns.finished("swap", timeout=300)
        wait_until(lambda: seen.get("new", 0) > 0, timeout=10, what="the reader to see the copy")
    finally:
        stop.set()
        reader.join()
    assert obj["status"]["phase"] == "Succeeded"
    assert set(seen) == {"old", "new"}, seen
    assert seen["old"] > 1


def test_failures_name_their_reason_and_path(ns: Namespace, vms, tmpdir_on: str):
    vm1, vm2, _ = vms
    ns.add_vms(vms[:2])
    src = f"{tmpdir_on}/here.txt"
    vm1.host_path(src).parent.mkdir(parents=True, exist_ok=True)
    vm1.host_path(src).write_bytes(b"here\n")
    taken = f"{tmpdir_on}/taken.txt"
    vm2.host_path(taken).parent.mkdir(parents=True, exist_ok=True)
    vm2.host_path(taken).write_bytes(b"keep me\n")
    cases = {
        "missing": ({"vm": "vm1", "path": f"{tmpdir_on}/nope.txt"}, "/tmp/ok.txt", {},
                    "SourceNotFound", f"{tmpdir_on}/nope.txt"),
        "unwritable": ({"vm": "vm1", "path": src}, "/sys/vmfleet-denied.txt", {},
                       "PermissionDenied", "/sys/vmfleet-denied.txt"),
        "never": ({"vm": "vm1", "path": src}, taken, {"overwrite": "Never"},
                  "DestinationExists", taken),
        "nodir": ({"vm": "vm1", "path": src}, f"{tmpdir_on}/a/b/c.txt", {},
                  "DestinationNotFound", f"{tmpdir_on}/a/b/c.txt"),
    }
    for name, (source, dst, extra, _, _) in cases.items():
        ns.run(name, transfer={"from": source, "to": [{"vm": "vm2", "path": dst}], **extra})
    for name, (_, _, _, reason, path) in cases.items():
        obj = ns.finished(name)
        (entry,) = obj["status"]["results"]
        assert obj["status"]["phase"] == "Failed", name
        assert (entry["phase"], entry["reason"]) == ("Failed", reason), (name, entry)
        assert path in entry["message"], (name, entry["message"])
        failed = {c["type"]: c for c in obj["status"]["conditions"]}["Failed"]
        assert failed["reason"] == reason
    assert vm2.host_path(taken).read_bytes() == b"keep me\n"
    assert listing(vm2, tmpdir_on) == ["taken.txt"]
    assert not vm2.host_path("/tmp/ok.txt").exists()


def test_overwrite_if_different_and_verify(ns: Namespace, vms, tmpdir_on: str):
    vm1, vm2, vm3 = vms
    ns.add_vms(vms)
    src = vm1.host_path(f"{tmpdir_on}/conf")
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_bytes(b"same\n")
    for vm, content in ((vm2, b"same\n"), (vm3, b"diff\n")):
        vm.host_path(tmpdir_on).mkdir(parents=True, exist_ok=True)
        vm.host_path(f"{tmpdir_on}/conf").write_bytes(content)
    ns.run("ifdiff", transfer={"from": {"vm": "vm1", "path": f"{tmpdir_on}/conf"},
                               "to": [{"vm": "vm2", "path": f"{tmpdir_on}/conf"},
                                      {"vm": "vm3", "path": f"{tmpdir_on}/conf"}],
                               "overwrite": "IfDifferent", "verify": True})
    obj = ns.finished("ifdiff")
    results = results_by_vm(obj)
    assert obj["status"]["phase"] == "Succeeded"
    assert results["vm2"]["transfer"].get("unchanged") is True
    assert results["vm3"]["transfer"].get("unchanged") is None
    assert results["vm3"]["transfer"]["verified"] is True
    assert results["vm3"]["transfer"]["sha256"] == hashlib.sha256(b"same\n").hexdigest()
    assert vm3.host_path(f"{tmpdir_on}/conf").read_bytes() == b"same\n"


def test_source_from_a_secret_key_is_never_logged(ns: Namespace, vms, controller_dir: Path,
                                                  tmpdir_on: str):
    _, vm2, _ = vms
    ns.add_vms(vms[1:2])
    token = "s3cr3t-" + os.urandom(8).hex()
    ns.kubectl.apply({"apiVersion": "v1", "kind": "Secret",
                      "metadata": {"name": "api-token", "namespace": str(ns),
                                   "labels": {"vmfleet.io/transferable": "true"}},
                      "stringData": {"token": token}})
    ns.kubectl.apply({"apiVersion": "v1", "kind": "ConfigMap",
                      "metadata": {"name": "scripts", "namespace": str(ns)},
                      "data": {"process.sh": "#!/bin/sh\necho processing \"$@\"\n"}})
    ns.run("secret", transfer={"from": {"secretKeyRef": {"name": "api-token", "key": "token"}},
                               "to": [{"vm": "vm2", "path": f"{tmpdir_on}/token"}],
                               "createDirs": True})
    ns.run("script", transfer={"from": {"configMapKeyRef": {"name": "scripts", "key": "process.sh"}},
                               "to": [{"vm": "vm2", "path": f"{tmpdir_on}/process.sh"}],
                               "createDirs": True, "mode": "0755"})
    for name in ("secret", "script"):
        assert ns.finished(name)["status"]["phase"] == "Succeeded"
    token_file = vm2.host_path(f"{tmpdir_on}/token")
    assert token_file.read_text() == token
    assert token_file.stat().st_mode & 0o777 == 0o600
    code, out, _ = vm2.run(f"{tmpdir_on}/process.sh a b")
    assert (code, out) == (0, b"processing a b\n")
    logs = "".join(p.read_text(errors="replace") for p in controller_dir.rglob("*.log"))
    assert token not in logs
    assert token not in str(ns.get("rcmd", "secret"))


def test_a_secret_leaves_its_namespace_only_by_its_owners_opt_in(ns: Namespace, vms,
                                                                  tmpdir_on: str):
    """Who may create RemoteCommands but not read Secrets gets no Secret out through a VM:
    an unlabelled one is refused, a token Secret even labelled, a VM's key even Opaque and
    labelled (vm1 is not part of the copy: the controller names its Secret); the one
    labelled vmfleet.io/transferable: "true" is copied."""
    from vmfleet.dev.manifests import credentials_secret, remote_vm

    vm1, vm2, _ = vms
    label = {"vmfleet.io/transferable": "true"}
    opaque_key = credentials_secret(vm1, str(ns), "vm1-opaque")
    opaque_key.update(type="Opaque")
    opaque_key["metadata"]["labels"] = label
    ns.kubectl.apply(opaque_key, remote_vm(vm1, str(ns), secret_name="vm1-opaque"))
    ns.add_vms(vms[1:2])
    secret = "opaque-" + os.urandom(8).hex()
    ns.kubectl.apply(
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": "robot", "namespace": str(ns)}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "plain", "namespace": str(ns)},
         "stringData": {"v": secret}},
        {"apiVersion": "v1", "kind": "Secret",
         "metadata": {"name": "allowed", "namespace": str(ns), "labels": label},
         "stringData": {"v": secret}},
        {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/service-account-token",
         "metadata": {"name": "robot-token", "namespace": str(ns), "labels": label,
                      "annotations": {"kubernetes.io/service-account.name": "robot"}}})
    sources = {"plain": ("plain", "v"), "allowed": ("allowed", "v"),
               "token": ("robot-token", "token"), "vm-key": ("vm1-opaque", "ssh-privatekey"),
               "ssh-auth": ("vm2-ssh", "ssh-privatekey")}
    for name, (secret_name, key_name) in sources.items():
        ns.run(name, transfer={"from": {"secretKeyRef": {"name": secret_name, "key": key_name}},
                               "to": [{"vm": "vm2", "path": f"{tmpdir_on}/{name}"}],
                               "createDirs": True})
    assert ns.finished("allowed")["status"]["phase"] == "Succeeded"
    assert vm2.host_path(f"{tmpdir_on}/allowed").read_text() == secret
    expected = {"plain": 'not labelled vmfleet.io/transferable: "true"',
                "token": "of type kubernetes.io/service-account-token",
                "vm-key": "holds a RemoteVM's SSH credentials",
                "ssh-auth": "of type kubernetes.io/ssh-auth"}
    for name, words in expected.items():
        obj = ns.finished(name)
        (entry,) = obj["status"]["results"]
        assert (obj["status"]["phase"], entry["reason"]) == ("Failed", "PermissionDenied"), entry
        assert words in entry["message"] and "vmfleet.io/transferable" in entry["message"]
        assert not vm2.host_path(f"{tmpdir_on}/{name}").exists()
    assert listing(vm2, tmpdir_on) == ["allowed"]  # no temporary file either


def test_the_local_transfer_worker_reaches_only_its_namespaces_secrets(ns: Namespace, vms,
                                                                        controller_dir: Path):
    """The Process runtime's transfer worker holds a token of its namespace's ServiceAccount
    (not the controller's kubeconfig): `get` on that namespace's Secrets and ConfigMaps only."""
    ns.add_vms(vms[:1])
    ns.run("wake", transfer={"from": {"configMapKeyRef": {"name": "missing", "key": "k"}},
                             "to": [{"vm": "vm1", "path": "/tmp/never"}]})
    (entry,) = ns.finished("wake")["status"]["results"]
    assert entry["reason"] == "SourceNotFound", entry  # it read through its own token
    config = (controller_dir / "transfer-access" / f"{ns}.kubeconfig").read_text()
    assert '"token"' in config and "client-key" not in config
    account = f"system:serviceaccount:{ns}:vmfleet-transfer-worker"
    for verb, resource, namespace, allowed in [
        ("get", "secrets", str(ns), True), ("get", "configmaps", str(ns), True),
        ("list", "secrets", str(ns), False), ("watch", "secrets", str(ns), False),
        ("get", "secrets", "default", False), ("get", "remotecommands.vmfleet.io", str(ns), False),
        ("create", "pods", str(ns), False),
    ]:
        proc = ns.kubectl("auth", "can-i", verb, resource, f"--as={account}", "-n", namespace,
                          check=False)
        assert proc.stdout.strip() == ("yes" if allowed else "no"), (verb, resource, namespace)


def test_invalid_transfers_are_refused(ns: Namespace):
    both = {"from": {"vm": "vm1", "path": "/a", "secretKeyRef": {"name": "s", "key": "k"}},
            "to": [{"vm": "vm2", "path": "/b"}]}
    twice = {"from": {"vm": "vm1", "path": "/a"},
             "to": [{"vm": "vm2", "path": "/b"}, {"vm": "vm2", "path": "/c"}]}
    relative = {"from": {"vm": "vm1", "path": "a"}, "to": [{"vm": "vm2", "path": "/b"}]}
    for spec, message in ((both, "exactly one source"), (twice, "may appear once"),
                          (relative, "spec.transfer.from.path")):
        proc = ns.kubectl.apply(ns.command("bad", transfer=spec), check=False)
        assert proc.returncode != 0
        assert message in proc.stderr


# --------------------------------------------------------------------------- worker killed


@pytest.fixture
def lost_controller(controlplane, kubectl, crds, make_redis, tmp_path) -> Iterator[tuple]:
    """A controller of our own (own broker: its transfer worker is the only consumer of the
    namespace's transfer queue) that declares a silent transfer worker lost after 6s."""
    ns = Namespace(kubectl, unique_namespace("xferlost")).create()
    redis = make_redis()
    proc = start_controller(controlplane.kubeconfig, redis.url, tmp_path, [ns.name],
                            extra_env={"VMFLEET_TRANSFER_LOST_SECONDS": "6"})
    try:
        yield ns, tmp_path, proc
    finally:
        proc.stop(grace=30)
        ns.delete()


def test_killed_worker_leaves_no_partial_file_retried_or_worker_lost(lost_controller, make_vm):
    """Two transfers are copying when the worker is SIGKILLed: the one allowed a retry
    succeeds on attempt 2, the other ends WorkerLost; neither leaves a temporary file."""
    ns, workdir, controller = lost_controller
    src_vm, dst_vm = make_vm("ksrc"), make_vm("kdst")
    ns.add_vms([src_vm, dst_vm])
    size = 192 * MiB
    expected = write_random(src_vm.host_path("/tmp/kill.bin"), size)
    for name, limit in (("retried", 1), ("lost", 0)):
        ns.run(name, transfer={"from": {"vm": "ksrc", "path": "/tmp/kill.bin"},
                               "to": [{"vm": "kdst", "path": f"/tmp/{name}/kill.bin"}],
                               "createDirs": True},
               retries={"limit": limit, "backoffSeconds": 0})

    def copying(name: str) -> bool:
        d = dst_vm.host_path(f"/tmp/{name}")
        return d.exists() and any(p.name.startswith(".kill.bin.vmfleet-") and p.stat().st_size > 0
                                  for p in d.iterdir())

    wait_until(lambda: copying("retried") and copying("lost"), timeout=60, interval=0.02,
               what="both copies to start")
    pid = transfer_worker_pid(workdir, ns.name)  # woken by the first of them
    os.killpg(pid, signal.SIGKILL)
    for name in ("retried", "lost"):
        first = ns.get("rcmd", name)["status"]["results"][0]
        assert first["phase"] == "Running" and first["attempt"] == 1

    obj = ns.finished("retried", timeout=240)
    (entry,) = obj["status"]["results"]
    assert obj["status"]["phase"] == "Succeeded", entry
    assert entry["attempt"] == 2
    assert entry["transfer"]["sha256"] == expected
    assert sha256_file(dst_vm.host_path("/tmp/retried/kill.bin")) == expected
    assert sorted(os.listdir(dst_vm.host_path("/tmp/retried"))) == ["kill.bin"]  # no temp

    obj = ns.finished("lost", timeout=120)
    (entry,) = obj["status"]["results"]
    assert (obj["status"]["phase"], entry["reason"]) == ("Failed", "WorkerLost"), entry
    wait_until(lambda: not os.listdir(dst_vm.host_path("/tmp/lost")), timeout=60,
               what="the cleanup task to remove the lost attempt's temporary file")

    log = (workdir / "controller.log").read_text()
    assert "lost during attempt 1; retrying" in log
    assert "lost during attempt 1; failed (WorkerLost)" in log
    assert transfer_worker_pid(workdir, ns.name) != pid  # the controller started a new worker
    controller.check_running()


def test_deleting_a_running_transfer_leaves_no_temporary_file(ns: Namespace, vms,
                                                              tmpdir_on: str):
    vm1, vm2, _ = vms
    ns.add_vms(vms[:2])
    write_random(vm1.host_path(f"{tmpdir_on}/cancel.bin"), 256 * MiB)
    out = vm2.host_path(f"{tmpdir_on}/out")
    ns.run("cancel", transfer={"from": {"vm": "vm1", "path": f"{tmpdir_on}/cancel.bin"},
                               "to": [{"vm": "vm2", "path": f"{tmpdir_on}/out/cancel.bin"}],
                               "createDirs": True})
    wait_until(lambda: out.exists() and any(p.stat().st_size > 0 for p in out.iterdir()),
               timeout=60, interval=0.02, what="the copy to start")
    ns.k("delete", "rcmd", "cancel", "--wait=false")
    wait_until(lambda: not list(out.iterdir()), timeout=30,
               what="the temporary file to be removed")
    assert not (out / "cancel.bin").exists()


def test_a_broken_connection_is_retried_and_the_lost_temp_removed(ns: Namespace, vms, make_vm,
                                                                   tmpdir_on: str):
    vm1 = vms[0]
    dst_vm = make_vm("flaky")
    ns.add_vms([vm1, dst_vm])
    expected = write_random(vm1.host_path(f"{tmpdir_on}/flaky.bin"), 256 * MiB)
    out = dst_vm.host_path("/tmp/out")
    ns.run("flaky", transfer={"from": {"vm": "vm1", "path": f"{tmpdir_on}/flaky.bin"},
                              "to": [{"vm": "flaky", "path": "/tmp/out/flaky.bin"}],
                              "createDirs": True},
           retries={"limit": 3, "backoffSeconds": 2})
    wait_until(lambda: out.exists() and any(p.stat().st_size > 0 for p in out.iterdir()),
               timeout=60, interval=0.02, what="the copy to start")
    dst_vm.kill()  # the VM goes away mid-copy: every session on it ends
    dst_vm.start()
    obj = ns.finished("flaky", timeout=240)
    (entry,) = obj["status"]["results"]
    assert obj["status"]["phase"] == "Succeeded", entry
    assert entry["attempt"] >= 2
    assert entry["transfer"]["sha256"] == expected
    assert sha256_file(out / "flaky.bin") == expected
    assert sorted(p.name for p in out.iterdir()) == ["flaky.bin"]  # attempt 1's temp is gone
