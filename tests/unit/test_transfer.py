"""File transfers: the API, the pure helpers of the worker and of the controller."""

from __future__ import annotations

import base64
import errno
import hashlib
import threading
import time
from dataclasses import replace

import pytest
from pydantic import ValidationError

from controller.runtime import VMRef, transfer_group, worker_argv
from controller.status import checked_entry
from controller.transfers import initial_transfer_results
from remote_tasks import transfer as t
from remote_tasks.sshtarget import AuthFailed
from vmfleet.api.constants import TASK_TRANSFER, transfer_queue
from vmfleet.api.models import RemoteCommandSpec, RemoteVMSpec, TransferSource
from vmfleet.api.planning import plan_of


def spec(**transfer) -> RemoteCommandSpec:
    body = {"from": {"vm": "vm1", "path": "/data/in.csv"},
            "to": [{"vm": "vm2", "path": "/srv/in.csv"}, {"vm": "vm3", "path": "/srv/in.csv"}]}
    body.update(transfer)
    return RemoteCommandSpec.model_validate({"transfer": body})


# --------------------------------------------------------------------------- API


@pytest.mark.parametrize(
    ("source", "described"),
    [
        ({"vm": "vm1", "path": "/a b/$(x)"}, "vm1:/a b/$(x)"),
        ({"configMapKeyRef": {"name": "scripts", "key": "run.sh"}}, "configMap/scripts/run.sh"),
        ({"secretKeyRef": {"name": "token", "key": "value"}}, "secret/token/value"),
    ],
)
def test_sources(source, described):
    assert TransferSource.model_validate(source).describe() == described


@pytest.mark.parametrize(
    ("transfer", "message"),
    [
        ({"from": {"vm": "vm1"}}, "go together"),
        ({"from": {"vm": "vm1", "path": "/a", "secretKeyRef": {"name": "s", "key": "k"}}},
         "exactly one source"),
        ({"from": {}}, "exactly one source"),
        ({"to": [{"vm": "vm2", "path": "/a"}, {"vm": "vm2", "path": "/b"}]}, "may appear once"),
        ({"to": [{"vm": "vm2", "path": "relative"}]}, "should match pattern"),
        ({"overwrite": "Sometimes"}, "Always"),
    ],
)
def test_invalid_transfers(transfer, message):
    with pytest.raises(ValidationError, match=message):
        spec(**transfer)


def test_defaults():
    transfer = spec().transfer
    assert transfer is not None
    assert (transfer.overwrite, transfer.create_dirs, transfer.verify, transfer.mode) == (
        "Always", False, False, None)


def test_each_namespace_has_its_transfer_worker_on_its_own_queue():
    vms = [VMRef("team-a", name, f"uid-{name}", RemoteVMSpec.model_validate(
        {"host": "h", "user": "u", "credentialsSecretRef": {"name": f"{name}-key"}}))
        for name in ("vm2", "vm1")]
    group = transfer_group("team-a", vms)
    argv = worker_argv(",".join(group.queues), group.concurrency, "n")
    assert argv[argv.index("-Q") + 1] == transfer_queue("team-a") == "vmfleet.team-a:transfers"
    assert argv[argv.index("--pool") + 1] == "threads"
    assert (group.deployment, group.key) == ("vmfleet-transfers", "team-a/:transfers")
    assert group.secrets == ["vm1-key", "vm2-key"]  # every VM of its namespace, no other
    assert group.workers is not None and group.workers.autoscale is not None
    assert group.workers.autoscale.min_replicas == 0  # at zero when idle
    assert TASK_TRANSFER == "remote_tasks.transfer_file"


# --------------------------------------------------------------------------- worker helpers


def test_temp_names_are_hidden_beside_the_target_and_per_attempt():
    first = t.temp_path("/srv/data/in.csv", "uid-1", "vm2", 1)
    second = t.temp_path("/srv/data/in.csv", "uid-1", "vm2", 2)
    assert first.startswith("/srv/data/.in.csv.vmfleet-")
    assert first != second
    assert first == t.temp_path("/srv/data/in.csv", "uid-1", "vm2", 1)  # deterministic
    assert first != t.temp_path("/srv/data/in.csv", "uid-1", "vm3", 1)
    assert first != t.temp_path("/srv/data/in.csv", "uid-2", "vm2", 1)


@pytest.mark.parametrize("name", ["-rf", "a\nb", "$(touch x)", "é" * 200, "x" * 255])
def test_temp_names_stay_within_name_max(name):
    temp = t.temp_path(f"/tmp/{name}", "uid", "vm", 1)
    base = temp.rsplit("/", 1)[1]
    assert temp.startswith("/tmp/.")
    assert len(base.encode()) <= 255
    base.encode().decode()  # still valid UTF-8


@pytest.mark.parametrize(
    ("exc", "writing", "reason", "words"),
    [
        (FileNotFoundError(errno.ENOENT, "No such file"), False, "SourceNotFound",
         "source file /p does not exist on vm1"),
        (FileNotFoundError(errno.ENOENT, "No such file"), True, "DestinationNotFound",
         "createDirs"),
        (PermissionError(errno.EACCES, "Permission denied"), True, "PermissionDenied",
         "permission denied writing /p on vm1"),
        (PermissionError(errno.EACCES, "Permission denied"), False, "PermissionDenied",
         "reading /p"),
        (OSError("Failure"), True, "TransportError", "vm1:/p: Failure"),
        (EOFError(), True, "TransportError", "vm1:/p: EOFError"),
        (AuthFailed("refused"), True, "AuthFailed", "refused"),
    ],
)
def test_errors_have_named_reasons_and_name_the_path(exc, writing, reason, words):
    failure = t.classify(exc, "vm1", "/p", writing)
    assert failure.reason == reason
    assert words in failure.message


class FakeFile:
    """Just enough of paramiko.SFTPFile.readv, counting the bytes asked for at once."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.largest_request = 0

    def readv(self, chunks, max_concurrent_prefetch_requests=None):
        self.largest_request = max(self.largest_request, sum(length for _, length in chunks))
        for offset, length in chunks:
            yield self.data[offset:offset + length]


def test_reads_are_windowed():
    data = bytes(range(256)) * (40 * 1024 + 3)  # ~10 MiB, not a multiple of anything
    fh = FakeFile(data)
    chunks = list(t.read_windows(fh, len(data)))  # type: ignore[arg-type]
    assert b"".join(chunks) == data
    assert fh.largest_request <= t.WINDOW
    assert max(map(len, chunks)) <= t.READ_BLOCK


def test_a_source_that_shrinks_is_an_error():
    fh = FakeFile(b"x" * 1000)
    with pytest.raises(EOFError, match="ended early"):
        list(t.read_windows(fh, 5000))  # type: ignore[arg-type]


def test_throughput():
    assert t.throughput(100, 2.0) == 50.0
    assert t.throughput(100, 0) == 100.0
    assert t.parse_mode("0640") == 0o640
    assert t.parse_mode(None) is None
    assert hashlib.sha256(b"").hexdigest().startswith("e3b0")


# --------------------------------------------------------------------------- controller


def test_one_entry_per_destination_records_the_source():
    vms = {name: {"spec": {"host": f"10.0.0.{i}"}} for i, name in enumerate(["vm1", "vm2"])}
    results = initial_transfer_results(spec(), vms, "T")
    assert results == [
        {"vm": "vm2", "host": "10.0.0.1", "phase": "Queued", "attempt": 1, "dispatchTime": "T",
         "transfer": {"source": "vm1:/data/in.csv", "path": "/srv/in.csv"}},
        {"vm": "vm3", "phase": "Failed", "attempt": 1, "reason": "VMNotFound",
         "message": "RemoteVM vm3 does not exist in this namespace", "completionTime": "T",
         "transfer": {"source": "vm1:/data/in.csv", "path": "/srv/in.csv"}},
    ]


def test_a_missing_source_vm_fails_every_destination():
    vms = {name: {"spec": {"host": "h"}} for name in ["vm2", "vm3"]}
    results = initial_transfer_results(spec(), vms, "T")
    assert {(r["vm"], r["phase"], r["reason"]) for r in results} == {
        ("vm2", "Failed", "VMNotFound"), ("vm3", "Failed", "VMNotFound")}
    assert "source RemoteVM vm1" in results[0]["message"]


def test_a_secret_source_needs_no_source_vm():
    s = spec(**{"from": {"secretKeyRef": {"name": "tok", "key": "k"}}})
    vms = {name: {"spec": {"host": "h"}} for name in ["vm2", "vm3"]}
    results = initial_transfer_results(s, vms, "T")
    assert [r["phase"] for r in results] == ["Queued", "Queued"]
    assert results[0]["transfer"]["source"] == "secret/tok/k"


# --------------------------------------------------------------------------- the executor, with fakes

import stat as _stat  # noqa: E402
from types import SimpleNamespace  # noqa: E402

from kubernetes.client.exceptions import ApiException  # noqa: E402

from remote_tasks.execute import CommandExecutor  # noqa: E402
from vmfleet.api.envelope import Envelope, Target  # noqa: E402

SRC, DST = "/tmp/src", "/srv/dst"


class Attrs:
    def __init__(self, mode: int, size: int) -> None:
        self.st_mode, self.st_size = mode, size


class FakeSFTP:
    """A VM's filesystem as paramiko's SFTPClient shows it (only what transfers use).

    ``fail_after``: a write past that many bytes breaks the connection; ``corrupt``: every
    byte written lands flipped (a disk that lies)."""

    def __init__(self, files: dict[str, bytes], broken: bool = False,
                 fail_after: int | None = None, corrupt: bool = False) -> None:
        self.files = files
        self.dirs = {"/", "/tmp", "/srv"}
        self.broken = broken
        self.fail_after = fail_after
        self.corrupt = corrupt
        self.bytes_read = 0
        self.opened_for_writing: list[str] = []

    def get_channel(self):
        return None  # no channel: never closed under the transfer

    def stat(self, path):
        if path in self.dirs:
            return Attrs(_stat.S_IFDIR | 0o755, 0)
        if path not in self.files:
            raise FileNotFoundError(errno.ENOENT, "No such file")
        return Attrs(_stat.S_IFREG | 0o644, len(self.files[path]))

    def open(self, path, mode, bufsize=-1):
        if "r" in mode:
            sftp, data = self, self.files[path]

            class Reader(FakeFile):
                def readv(self, chunks, max_concurrent_prefetch_requests=None):
                    for block in FakeFile.readv(self, chunks):
                        sftp.bytes_read += len(block)
                        yield block

                def close(self):
                    pass

                def __enter__(self):
                    return self

                def __exit__(self, *exc):
                    return False
            return Reader(data)
        if self.broken:
            raise EOFError()
        if (path.rsplit("/", 1)[0] or "/") not in self.dirs:
            raise FileNotFoundError(errno.ENOENT, "No such file")
        self.files[path] = b""
        self.opened_for_writing.append(path)
        sftp = self

        class Writer:
            def set_pipelined(self, on):
                pass

            def write(self, data):
                if sftp.fail_after is not None and len(sftp.files[path]) + len(data) > sftp.fail_after:
                    raise OSError("Socket is closed")
                sftp.files[path] += bytes(b ^ 0xFF for b in data) if sftp.corrupt else data

            def close(self):
                pass
        return Writer()

    def chmod(self, path, mode):
        pass

    def posix_rename(self, old, new):
        self.files[new] = self.files.pop(old)

    def rename(self, old, new):
        if new in self.files:
            raise OSError("Failure")
        self.posix_rename(old, new)

    def remove(self, path):
        if path not in self.files:
            raise FileNotFoundError(errno.ENOENT, "No such file")
        del self.files[path]

    def mkdir(self, path):
        self.dirs.add(path)

    def close(self):
        pass


class FakePool:
    def __init__(self, vms: dict[str, FakeSFTP]) -> None:
        self.vms = vms
        self.discarded: list[str] = []
        self.keys: dict[str, str] = {}

    def get(self, target):
        self.keys[target.host] = target.private_key
        sftp = self.vms[target.host]

        def session(_conn, window_size=None):
            getattr(sftp, "reopen", lambda: None)()  # a new SFTP session (its own channel)
            return sftp
        return type("Conn", (), {"sftp": session})()

    def discard(self, target):
        self.discarded.append(target.host)


class FakeState:
    """Redis as vmfleet.state uses it: SET NX claims with their holder, cancels, reports."""

    def __init__(self, cancel_after_beats: int | None = None) -> None:
        self.claims: dict[tuple[str, str, int], str] = {}
        self.cancelled_uids: set[str] = set()
        self.reports: list[dict] = []
        self.beats: list[tuple[str, int]] = []
        self.released: list[tuple[str, int]] = []
        self.cancel_after_beats = cancel_after_beats

    def claim(self, uid, vm, attempt, worker, scope="default", *, namespace, delivery=""):
        if uid in self.cancelled_uids:
            return "cancelled"
        holder = self.claims.setdefault((uid, vm, attempt), worker)
        return "claimed" if holder == worker else "taken"

    def heartbeat(self, uid, vm, attempt, scope="default", *, namespace):
        self.beats.append((vm, attempt))
        if self.cancel_after_beats is not None and len(self.beats) >= self.cancel_after_beats:
            self.cancelled_uids.add(uid)
        return uid in self.cancelled_uids

    def release(self, uid, vm, attempt, scope="default", *, namespace):
        self.released.append((vm, attempt))

    def report(self, body, scope="default", namespace=None):
        self.reports.append(body)
        return str(len(self.reports))

    def cancelled(self, uid, *, namespace):
        return uid in self.cancelled_uids

    def events(self, event: str, vm: str | None = None) -> list[dict]:
        return [r for r in self.reports if r["event"] == event and vm in (None, r["vm"])]

    def finished(self) -> dict[str, dict]:
        """The finished report's fields per destination (each reported once)."""
        done = self.events("finished")
        assert len({r["vm"] for r in done}) == len(done), "a destination finished twice"
        return {r["vm"]: r["fields"] for r in done}


class Clock:
    """Monotonic time that moves ``step`` seconds per reading; ``at`` runs hooks by reading."""

    def __init__(self, step: float = 0.0, at: dict | None = None) -> None:
        self.now, self.step, self.calls, self.at = 1000.0, step, 0, at or {}

    def __call__(self) -> float:
        self.calls += 1
        if self.calls in self.at:
            self.at[self.calls]()
        self.now += self.step
        return self.now


def no_kube():
    raise AssertionError("the Kubernetes API was used although every key is mounted")


def target(vm: str) -> Target:
    return Target(vm=vm, host=vm, port=22, user="u", secret=f"{vm}-key", host_keys=("k",))


class Fleet:
    """Three VMs' filesystems, their mounted keys, Redis, and a TransferExecutor."""

    def __init__(self, tmp_path, vms: dict[str, FakeSFTP], state: FakeState | None = None,
                 clock: Clock | None = None, kube=no_kube, mounted=("vm1", "vm2", "vm3")) -> None:
        for vm in mounted:
            (tmp_path / f"{vm}-key").mkdir(parents=True)
            (tmp_path / f"{vm}-key" / "ssh-privatekey").write_text(f"key of {vm}")
        self.vms = vms
        self.state = state or FakeState()
        self.pool = FakePool(vms)
        self.commands = CommandExecutor(self.state, self.pool, tmp_path)  # type: ignore[arg-type]
        self.clock = clock or Clock()
        self.executor = t.TransferExecutor(self.commands, clock=self.clock, kube=kube)

    def envelope(self, vm="vm2", attempt=1, targets=("vm1", "vm2", "vm3"), retries=0,
                 timeout=None, deadline=None, command_start=None, **transfer) -> Envelope:
        body = {"from": {"vm": "vm1", "path": SRC},
                "to": [{"vm": "vm2", "path": DST}, {"vm": "vm3", "path": DST}]}
        body.update(transfer)
        s = RemoteCommandSpec.model_validate({"transfer": body, "timeoutSeconds": timeout,
                                              "activeDeadlineSeconds": deadline,
                                              "retries": {"limit": retries, "backoffSeconds": 5}})
        return Envelope("ns", "copy", "uid-1", vm, attempt, "", s.wire(), plan=plan_of(s),
                        command_start=command_start,
                        targets={name: target(name) for name in targets})

    def run(self, worker="w", **kwargs) -> str:
        return self.executor.execute(self.envelope(**kwargs), worker)


def temps(sftp: FakeSFTP) -> list[str]:
    return [path for path in sftp.files if t.TEMP_MARK in path]


def three(src: bytes, **dests) -> dict[str, FakeSFTP]:
    vms = {"vm1": FakeSFTP({SRC: src}), "vm2": FakeSFTP({}), "vm3": FakeSFTP({})}
    vms.update(dests)
    return vms


BIG = bytes(range(256)) * 40000  # ~10 MiB: several windows, ~300 blocks


def test_the_source_is_read_once_for_every_destination(tmp_path):
    fleet = Fleet(tmp_path, three(BIG))
    assert fleet.run() == "Succeeded"
    assert fleet.vms["vm1"].bytes_read == len(BIG)
    for vm in ("vm2", "vm3"):
        assert fleet.vms[vm].files == {DST: BIG}  # and no temporary file
    claimed = {r["vm"]: r for r in fleet.state.events("claimed")}
    assert set(claimed) == {"vm2", "vm3"}
    for report in claimed.values():
        assert (report["kind"], report["uid"], report["attempt"], report["worker"]) == (
            "attempt", "uid-1", 1, "w")
        assert report["fields"]["phase"] == "Running"
        assert report["fields"]["host"] == report["vm"]
        assert report["fields"]["transfer"] == {"source": "vm1:/tmp/src", "path": DST}
    results = fleet.state.finished()
    assert {vm: r["phase"] for vm, r in results.items()} == {"vm2": "Succeeded", "vm3": "Succeeded"}
    assert results["vm2"]["reason"] == "Completed"
    assert results["vm2"]["transfer"]["sha256"] == hashlib.sha256(BIG).hexdigest()
    assert results["vm2"]["transfer"]["bytes"] == len(BIG)
    assert results["vm2"]["transfer"]["source"] == "vm1:/tmp/src"
    assert sorted(fleet.state.released) == [("vm2", 1), ("vm3", 1)]
    # Each destination is reported claimed before finished; the worker decides no retry.
    order = [(r["vm"], r["event"]) for r in fleet.state.reports if r["event"] != "progress"]
    assert order.index(("vm3", "claimed")) < order.index(("vm3", "finished"))
    assert {r["attempt"] for r in fleet.state.reports} == {1}
    assert fleet.pool.keys == {"vm1": "key of vm1", "vm2": "key of vm2", "vm3": "key of vm3"}


def test_the_other_destinations_message_and_a_redelivery_run_nothing_twice(tmp_path):
    fleet = Fleet(tmp_path, three(b"x" * 1000))
    assert fleet.run() == "Succeeded"
    reports = len(fleet.state.reports)
    fleet.vms["vm2"].files[DST] = b"changed since"
    # vm3's own message, and vm2's message delivered again, to the same worker.
    assert fleet.run(vm="vm3") == "duplicate"
    assert fleet.run(vm="vm2") == "duplicate"
    assert fleet.vms["vm1"].bytes_read == 1000
    assert fleet.vms["vm2"].files == {DST: b"changed since"}
    assert len(fleet.state.reports) == reports


def test_a_claim_held_by_another_delivery_copies_nothing(tmp_path):
    fleet = Fleet(tmp_path, three(b"x" * 1000))
    fleet.state.claims[("uid-1", "vm2", 1)] = "other-worker"
    assert fleet.run() == "duplicate"
    assert fleet.vms["vm1"].bytes_read == 0
    assert fleet.vms["vm2"].files == {} and fleet.vms["vm3"].files == {}
    assert fleet.state.reports == []
    assert ("uid-1", "vm3", 1) not in fleet.state.claims  # a duplicate claims nothing else


def test_a_deleted_command_is_never_started(tmp_path):
    fleet = Fleet(tmp_path, three(b"x"))
    fleet.state.cancelled_uids.add("uid-1")
    assert fleet.run() == "cancelled"
    assert fleet.vms["vm1"].bytes_read == 0 and fleet.state.reports == []


def test_only_destinations_the_message_can_reach_join_the_batch(tmp_path):
    fleet = Fleet(tmp_path, three(b"x"))
    assert fleet.run(targets=("vm1", "vm2")) == "Succeeded"
    assert set(fleet.state.finished()) == {"vm2"}
    assert fleet.vms["vm3"].files == {}
    assert ("uid-1", "vm3", 1) not in fleet.state.claims  # its own message will claim it


def test_a_retry_goes_alone_and_removes_the_earlier_attempts_temporary_file(tmp_path):
    lost = t.temp_path(DST, "uid-1", "vm2", 1)
    fleet = Fleet(tmp_path, three(b"new", vm2=FakeSFTP({lost: b"half"})))
    assert fleet.run(attempt=2) == "Succeeded"
    assert fleet.vms["vm2"].files == {DST: b"new"}
    assert list(fleet.state.finished()) == ["vm2"]
    assert {r["attempt"] for r in fleet.state.reports} == {2}
    assert fleet.vms["vm3"].files == {}


def test_one_broken_destination_does_not_stop_the_others(tmp_path):
    fleet = Fleet(tmp_path, three(b"x" * 1000, vm2=FakeSFTP({}, broken=True)))
    assert fleet.run(retries=3) == "Failed"
    results = fleet.state.finished()
    assert results["vm2"]["phase"] == "Failed"
    assert results["vm2"]["reason"] == "TransportError"
    assert DST in results["vm2"]["message"]
    assert results["vm3"]["phase"] == "Succeeded"
    assert results["vm3"]["transfer"]["bytes"] == 1000
    assert fleet.vms["vm3"].files == {DST: b"x" * 1000}
    # The controller decides the retry: the worker reports the failure and nothing else.
    assert {r["attempt"] for r in fleet.state.reports} == {1}
    assert not [r for r in fleet.state.reports if r["fields"].get("phase") == "Queued"]
    assert fleet.pool.discarded == ["vm2"]  # the next attempt reconnects
    assert sorted(fleet.state.released) == [("vm2", 1), ("vm3", 1)]


def test_a_write_that_fails_midway_removes_the_partial_file(tmp_path):
    fleet = Fleet(tmp_path, three(BIG, vm2=FakeSFTP({DST: b"old"}, fail_after=len(BIG) // 2)))
    assert fleet.run() == "Failed"
    vm2 = fleet.vms["vm2"]
    assert vm2.opened_for_writing == [t.temp_path(DST, "uid-1", "vm2", 1)]
    assert vm2.files == {DST: b"old"}  # the partial temporary file is gone, the target kept
    result = fleet.state.finished()["vm2"]
    assert result["reason"] == "TransportError"
    assert 0 < result["transfer"]["bytes"] <= len(BIG) // 2
    assert result["transfer"]["totalBytes"] == len(BIG)
    assert fleet.vms["vm3"].files == {DST: BIG}
    # The failure is reported as soon as it happens, before the other copy ends.
    order = [(r["vm"], r["event"]) for r in fleet.state.reports if r["event"] == "finished"]
    assert order == [("vm2", "finished"), ("vm3", "finished")]


def test_overwrite_never_and_missing_source(tmp_path):
    fleet = Fleet(tmp_path / "a", three(b"new", vm2=FakeSFTP({DST: b"old"})))
    fleet.run(overwrite="Never")
    results = fleet.state.finished()
    assert (results["vm2"]["reason"], results["vm3"]["reason"]) == ("DestinationExists", "Completed")
    assert fleet.vms["vm2"].files == {DST: b"old"}
    fleet = Fleet(tmp_path / "b", three(b"new"))
    fleet.run(**{"from": {"vm": "vm1", "path": "/tmp/none"}})
    failures = fleet.state.finished().values()
    assert {f["reason"] for f in failures} == {"SourceNotFound"}
    assert all("/tmp/none" in f["message"] for f in failures)


def test_overwrite_if_different_leaves_the_same_content_alone(tmp_path):
    fleet = Fleet(tmp_path, three(b"same", vm2=FakeSFTP({DST: b"same"}),
                                  vm3=FakeSFTP({DST: b"diff"})))
    assert fleet.run(overwrite="IfDifferent") == "Succeeded"
    results = fleet.state.finished()
    assert results["vm2"]["transfer"]["unchanged"] is True
    assert "unchanged" in results["vm2"]["message"]
    assert fleet.vms["vm2"].opened_for_writing == []
    assert "unchanged" not in results["vm3"]["transfer"]
    assert fleet.vms["vm3"].files == {DST: b"same"}


def test_verify_reads_back_and_a_mismatch_keeps_the_target(tmp_path):
    fleet = Fleet(tmp_path, three(b"payload", vm2=FakeSFTP({DST: b"old"}, corrupt=True)))
    assert fleet.run(verify=True) == "Failed"
    results = fleet.state.finished()
    assert results["vm2"]["reason"] == "ChecksumMismatch"
    assert fleet.vms["vm2"].files == {DST: b"old"}
    assert results["vm3"]["transfer"]["verified"] is True
    assert fleet.vms["vm3"].files == {DST: b"payload"}


def test_create_dirs(tmp_path):
    deep = "/srv/new/deep/dst"
    to = [{"vm": "vm2", "path": deep}]
    fleet = Fleet(tmp_path / "a", three(b"x"))
    assert fleet.run(to=to) == "Failed"
    result = fleet.state.finished()["vm2"]
    assert result["reason"] == "DestinationNotFound" and "createDirs" in result["message"]
    fleet = Fleet(tmp_path / "b", three(b"x"))
    assert fleet.run(to=to, createDirs=True) == "Succeeded"
    assert {"/srv/new", "/srv/new/deep"} <= fleet.vms["vm2"].dirs
    assert fleet.vms["vm2"].files == {deep: b"x"}


def test_progress_and_heartbeats_every_few_seconds(tmp_path):
    clock = Clock(step=0.25)
    fleet = Fleet(tmp_path, three(BIG), clock=clock)
    assert fleet.run() == "Succeeded"
    progress = fleet.state.events("progress", "vm2")
    assert len(progress) >= 2
    seen = [p["fields"]["transfer"]["bytes"] for p in progress]
    assert seen == sorted(seen) and 0 < seen[-1] < len(BIG)
    for report in progress:
        fields = report["fields"]
        assert fields["heartbeatTime"] == fields["transfer"]["updateTime"]
        assert fields["transfer"]["totalBytes"] == len(BIG)
        assert fields["transfer"]["path"] == DST
    elapsed = clock.now - 1000.0
    assert len(progress) <= elapsed / t.PROGRESS_SECONDS + 1  # throttled
    beats = [vm for vm, _ in fleet.state.beats]
    assert beats.count("vm2") >= 2 and beats.count("vm2") == beats.count("vm3")


def test_a_cancel_seen_by_a_heartbeat_stops_and_removes_every_temporary_file(tmp_path):
    fleet = Fleet(tmp_path, three(BIG, vm3=FakeSFTP({DST: b"old"})), clock=Clock(step=0.25),
                  state=FakeState(cancel_after_beats=3))
    assert fleet.run() == "Cancelled"
    assert fleet.vms["vm1"].bytes_read < len(BIG)  # stopped in the middle
    assert fleet.vms["vm2"].opened_for_writing and fleet.vms["vm2"].files == {}
    assert fleet.vms["vm3"].files == {DST: b"old"}
    results = fleet.state.finished()
    assert {r["phase"] for r in results.values()} == {"Cancelled"}
    assert {r["reason"] for r in results.values()} == {"Cancelled"}
    assert "left as it was" in results["vm3"]["message"]
    assert sorted(fleet.state.released) == [("vm2", 1), ("vm3", 1)]


def test_a_published_cancel_stops_the_copy_at_once(tmp_path):
    holder: list = []
    clock = Clock(at={40: lambda: holder[0].commands.cancels.cancel("uid-1")})
    fleet = Fleet(tmp_path, three(BIG), clock=clock)
    holder.append(fleet)
    assert fleet.run() == "Cancelled"
    assert fleet.state.beats == []  # the clock never moved: no heartbeat told it
    assert temps(fleet.vms["vm2"]) == [] and fleet.vms["vm2"].files == {}
    assert {r["phase"] for r in fleet.state.finished().values()} == {"Cancelled"}


def test_a_timeout_fails_every_destination_and_removes_the_temporary_files(tmp_path):
    fleet = Fleet(tmp_path, three(BIG), clock=Clock(step=0.25))
    assert fleet.run(timeout=5) == "Failed"
    results = fleet.state.finished()
    assert {r["reason"] for r in results.values()} == {"Timeout"}
    assert fleet.vms["vm2"].files == {} and fleet.vms["vm3"].files == {}


def test_a_timeout_says_every_partial_file_was_removed(tmp_path):
    fleet = Fleet(tmp_path, three(BIG, vm3=FakeSFTP({DST: b"old"})), clock=Clock(step=0.25))
    assert fleet.run(timeout=5) == "Failed"
    for vm, result in fleet.state.finished().items():
        assert result["reason"] == "Timeout"
        assert 0 < result["transfer"]["bytes"] < len(BIG)
        assert result["transfer"]["partialRemoved"] is True
        assert result["message"] == (
            "the transfer did not finish within timeoutSeconds (5s); the partial file on "
            f"{vm} was removed ({DST} was left as it was)")
        assert temps(fleet.vms[vm]) == []
    assert fleet.vms["vm3"].files == {DST: b"old"}


def test_a_cancel_says_the_partial_file_was_removed(tmp_path):
    fleet = Fleet(tmp_path, three(BIG), clock=Clock(step=0.25),
                  state=FakeState(cancel_after_beats=3))
    assert fleet.run() == "Cancelled"
    for vm, result in fleet.state.finished().items():
        assert result["transfer"]["partialRemoved"] is True
        assert result["message"] == ("cancelled: the RemoteCommand was deleted; the partial "
                                     f"file on {vm} was removed ({DST} was left as it was)")


def test_a_failure_before_any_byte_was_written_claims_no_partial_file(tmp_path):
    fleet = Fleet(tmp_path, three(b"x", vm2=FakeSFTP({}, broken=True)))
    assert fleet.run() == "Failed"
    result = fleet.state.finished()["vm2"]
    assert "partialRemoved" not in result["transfer"]
    assert "partial file" not in result["message"]


def ago(seconds: float) -> str:
    from datetime import UTC, datetime, timedelta

    from vmfleet.api.times import rfc3339

    return rfc3339(datetime.now(UTC) - timedelta(seconds=seconds))


def test_active_deadline_counts_from_the_commands_start_time(tmp_path):
    # Passed already (the command started 100 s ago): nothing is opened, nothing written.
    fleet = Fleet(tmp_path / "a", three(BIG))
    assert fleet.run(deadline=50, command_start=ago(100)) == "Failed"
    for result in fleet.state.finished().values():
        assert result["reason"] == "DeadlineExceeded"
        assert result["message"] == "activeDeadlineSeconds (50s) passed"
        assert "partialRemoved" not in result["transfer"]
    assert fleet.vms["vm1"].bytes_read == 0 and fleet.vms["vm2"].opened_for_writing == []
    # Passing mid-copy (3 s left of it; the clock moves 0.25 s per block).
    fleet = Fleet(tmp_path / "b", three(BIG), clock=Clock(step=0.25))
    assert fleet.run(deadline=60, command_start=ago(57)) == "Failed"
    for vm, result in fleet.state.finished().items():
        assert result["reason"] == "DeadlineExceeded"
        assert result["transfer"]["partialRemoved"] is True
        assert result["message"].startswith("activeDeadlineSeconds (60s) passed; the partial")
        assert fleet.vms[vm].files == {}
    # Far off: the copy succeeds; the earlier of the two deadlines (timeoutSeconds) rules.
    fleet = Fleet(tmp_path / "c", three(b"x"))
    assert fleet.run(deadline=3600, command_start=ago(1)) == "Succeeded"
    both = RemoteCommandSpec.model_validate({"vm": "x", "command": "true", "timeoutSeconds": 5,
                                             "activeDeadlineSeconds": 3600})
    earliest = t.transfer_deadline(plan_of(both), ago(1), 100.0)
    assert earliest is not None and (earliest.at, earliest.reason) == (105.0, "Timeout")


class FakeChannel:
    def __init__(self) -> None:
        self.closed = False
        self.cut = threading.Event()

    def close(self) -> None:
        self.closed = True
        self.cut.set()


class StalledSFTP(FakeSFTP):
    """A VM that stops answering once ``after`` bytes were read from or written to it: the
    blocked call returns only when its channel is closed (then fails, as paramiko's does).
    A new session (the pool's ``sftp()``) has a channel of its own and answers again."""

    def __init__(self, files: dict[str, bytes], after: int) -> None:
        super().__init__(files)
        self.after = after
        self.channel = FakeChannel()
        self.stalled = 0

    def get_channel(self):
        return self.channel

    def reopen(self) -> None:
        if self.channel.closed:
            self.channel = FakeChannel()

    def _stall(self) -> None:
        self.stalled += 1
        if not self.channel.cut.wait(60):
            raise AssertionError("the stalled call was never cut")
        raise OSError("Socket is closed")

    def open(self, path, mode, bufsize=-1):
        fh = super().open(path, mode, bufsize)
        vm = self
        if "r" in mode:
            read = fh.readv

            def readv(chunks, max_concurrent_prefetch_requests=None):
                for block in read(chunks):
                    if vm.bytes_read > vm.after:
                        vm._stall()
                    yield block
            fh.readv = readv
        else:
            write = fh.write

            def stalling_write(data):
                if len(vm.files[path]) >= vm.after:
                    vm._stall()
                write(data)
            fh.write = stalling_write
        return fh

    def remove(self, path):
        if self.channel.closed:
            raise OSError("Socket is closed")
        super().remove(path)


def run_bounded(fleet: Fleet, **kwargs) -> tuple[str, float]:
    """``fleet.run`` in a thread: a watchdog that never fires fails the test, not hangs it."""
    outcome: list[str] = []
    started = time.monotonic()
    thread = threading.Thread(target=lambda: outcome.append(fleet.run(**kwargs)), daemon=True)
    thread.start()
    thread.join(90)
    assert outcome, "the transfer was still blocked long after its deadline"
    return outcome[0], time.monotonic() - started


def test_the_watchdog_cuts_a_stalled_source_at_the_deadline(tmp_path):
    # The clock never moves: only the watchdog's timer can end this copy.
    # It stalls after two blocks: long before the deadline even on a loaded machine.
    fleet = Fleet(tmp_path, three(BIG, vm1=StalledSFTP({SRC: BIG}, after=2 * t.READ_BLOCK)))
    outcome, took = run_bounded(fleet, timeout=2)
    assert outcome == "Failed" and took >= 2.0
    assert fleet.vms["vm1"].stalled == 1
    for vm, result in fleet.state.finished().items():
        assert result["reason"] == "Timeout"  # not the TransportError of the cut channel
        assert result["transfer"]["partialRemoved"] is True
        assert result["message"].startswith("the transfer did not finish within timeoutSeconds")
        assert fleet.vms[vm].files == {}


def test_the_watchdog_cuts_a_stalled_destination_and_removes_its_file_over_a_new_session(
        tmp_path):
    fleet = Fleet(tmp_path, three(BIG, vm2=StalledSFTP({DST: b"old"}, after=2 * t.READ_BLOCK)))
    outcome, took = run_bounded(fleet, deadline=3, command_start=ago(0))
    assert outcome == "Failed" and took >= 1.0
    vm2 = fleet.vms["vm2"]
    assert vm2.stalled == 1 and vm2.files == {DST: b"old"}  # removed after the cut
    results = fleet.state.finished()
    for vm in ("vm2", "vm3"):  # the one that still answered stops at the deadline too
        assert results[vm]["reason"] == "DeadlineExceeded"
        assert results[vm]["transfer"]["partialRemoved"] is True
    assert temps(fleet.vms["vm3"]) == [] and fleet.vms["vm3"].files == {}


class FakeKube:
    """The Secrets and ConfigMaps the transfer worker reads through the API."""

    def __init__(self, secrets=None, config_maps=None) -> None:
        self.secrets, self.config_maps = secrets or {}, config_maps or {}
        self.read: list[tuple[str, str]] = []
        self.core = SimpleNamespace(read_namespaced_secret=self._secret,
                                    read_namespaced_config_map=self._config_map)

    def read_secret(self, namespace, name):
        self.read.append((namespace, name))
        if name not in self.secrets:
            raise ApiException(status=403, reason="Forbidden")
        return self.secrets[name]

    def _secret(self, name, namespace):
        if name not in self.secrets:
            raise ApiException(status=404, reason="Not Found")
        return self.secrets[name]

    def _config_map(self, name, namespace):
        if name not in self.config_maps:
            raise ApiException(status=404, reason="Not Found")
        return self.config_maps[name]


def test_a_key_not_mounted_fails_that_destination_and_is_never_read_through_the_api(tmp_path):
    fleet = Fleet(tmp_path, three(b"x"), mounted=("vm1", "vm3"))  # no_kube: the API is unused
    assert fleet.run() == "Failed"
    result = fleet.state.finished()["vm2"]
    assert result["reason"] == "CredentialsInvalid"
    assert "vm2-key" in result["message"]
    assert fleet.state.finished()["vm3"]["phase"] == "Succeeded"


LABELLED = {"vmfleet.io/transferable": "true"}


def a_secret(secret_type="Opaque", labels=None, value=b"secret"):
    return SimpleNamespace(type=secret_type, metadata=SimpleNamespace(labels=labels),
                           data={"k": base64.b64encode(value).decode()})


def test_config_map_sources_are_copied(tmp_path):
    kube = FakeKube(
        config_maps={"scripts": SimpleNamespace(data={"run.sh": "echo hi\n"}, binary_data=None)})
    fleet = Fleet(tmp_path, three(b""), kube=lambda: kube)
    source = {"configMapKeyRef": {"name": "scripts", "key": "run.sh"}}
    assert fleet.run(targets=("vm2", "vm3"), **{"from": source}) == "Succeeded"
    assert fleet.vms["vm2"].files == {DST: b"echo hi\n"}


@pytest.mark.parametrize(
    ("secret", "protected", "words"),
    [
        (a_secret(), (), 'not labelled vmfleet.io/transferable: "true"'),
        (a_secret(labels={"vmfleet.io/transferable": "yes"}), (), "not labelled"),
        (a_secret("kubernetes.io/service-account-token", LABELLED), (),
         "of type kubernetes.io/service-account-token"),
        (a_secret("kubernetes.io/dockerconfigjson", LABELLED), (), "dockerconfigjson"),
        (a_secret("kubernetes.io/dockercfg", LABELLED), (), "dockercfg"),
        (a_secret("kubernetes.io/ssh-auth", LABELLED), (), "ssh-auth"),
        (a_secret(labels=LABELLED), ("src",), "holds a RemoteVM's SSH credentials"),
    ],
)
def test_a_secret_is_copied_only_by_its_owners_opt_in(tmp_path, secret, protected, words):
    kube = FakeKube(secrets={"src": secret})
    fleet = Fleet(tmp_path, three(b""), kube=lambda: kube)
    envelope = replace(fleet.envelope(targets=("vm2", "vm3"),
                                      **{"from": {"secretKeyRef": {"name": "src", "key": "k"}}}),
                       protected_secrets=protected)
    assert fleet.executor.execute(envelope, "w") == "Failed"
    results = fleet.state.finished()
    assert {r["reason"] for r in results.values()} == {"PermissionDenied"}
    assert all(words in r["message"] and "vmfleet.io/transferable" in r["message"]
               for r in results.values())
    assert fleet.vms["vm2"].files == {} and fleet.vms["vm3"].files == {}


def test_a_labelled_opaque_secret_is_copied_but_never_a_key_of_the_vms_the_message_names(tmp_path):
    kube = FakeKube(secrets={"src": a_secret(labels=LABELLED, value=b"tok"),
                             "vm2-key": a_secret(labels=LABELLED)})
    fleet = Fleet(tmp_path / "a", three(b""), kube=lambda: kube)
    source = {"secretKeyRef": {"name": "src", "key": "k"}}
    assert fleet.run(targets=("vm2", "vm3"), **{"from": source}) == "Succeeded"
    assert fleet.vms["vm2"].files == {DST: b"tok"}
    fleet = Fleet(tmp_path / "b", three(b""), kube=lambda: kube)
    source = {"secretKeyRef": {"name": "vm2-key", "key": "k"}}  # vm2's own, even Opaque
    assert fleet.run(targets=("vm2", "vm3"), **{"from": source}) == "Failed"
    assert {r["reason"] for r in fleet.state.finished().values()} == {"PermissionDenied"}


def test_the_envelope_carries_the_protected_secrets():
    envelope = Envelope("ns", "c", "u", "vm2", 1, "", {}, protected_secrets=("a", "b"))
    assert Envelope.from_message(envelope.to_message()).protected_secrets == ("a", "b")
    assert Envelope.from_message({**envelope.to_message(), "protected_secrets": None}
                                 ).protected_secrets == ()


def test_cleanup_removes_every_attempts_temporary_file_on_one_destination(tmp_path):
    left = {t.temp_path(DST, "uid-1", "vm2", n): b"half" for n in (1, 2)}
    fleet = Fleet(tmp_path, three(b"", vm2=FakeSFTP({**left, DST: b"kept"})))
    assert fleet.executor.clean(fleet.envelope(vm="vm2", attempt=2, targets=("vm2",))) == 2
    assert fleet.vms["vm2"].files == {DST: b"kept"}
    assert fleet.state.reports == []


def test_every_reported_field_is_one_the_status_has(tmp_path):
    """The controller writes what workers report: each field must exist in the CRD's models."""
    fleet = Fleet(tmp_path, three(BIG, vm2=FakeSFTP({}, fail_after=len(BIG) // 2)),
                  clock=Clock(step=0.25))
    fleet.run(verify=True)
    events = {r["event"] for r in fleet.state.reports}
    assert events == {"claimed", "progress", "finished"}
    for report in fleet.state.reports:
        checked_entry({"vm": report["vm"], "attempt": report["attempt"], **report["fields"]})
