"""File transfers: the API, the pure helpers of the worker and of the controller."""

from __future__ import annotations

import errno
import hashlib
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from controller.runtime import transfer_worker_argv
from controller.transfers import initial_transfer_results, lost_patch, stale
from remote_tasks import transfer as t
from remote_tasks.ssh import AuthFailed
from vmfleet.api.constants import TASK_TRANSFER, TRANSFER_QUEUE
from vmfleet.api.models import RemoteCommandSpec, TransferSource


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


def test_the_shared_worker_serves_the_transfer_queue():
    argv = transfer_worker_argv()
    assert argv[argv.index("-Q") + 1] == TRANSFER_QUEUE == "vmfleet.transfers"
    assert argv[argv.index("--pool") + 1] == "threads"
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


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def test_stale_running_entries():
    now = datetime(2026, 1, 1, tzinfo=UTC)
    old, fresh = _iso(now - timedelta(seconds=100)), _iso(now - timedelta(seconds=5))
    assert stale({"phase": "Running", "startTime": old}, now, 60)
    assert not stale({"phase": "Running", "startTime": old, "transfer": {"updateTime": fresh}},
                     now, 60)
    assert not stale({"phase": "Queued", "startTime": old}, now, 60)
    assert not stale({"phase": "Succeeded", "startTime": old}, now, 60)


def test_lost_attempt_is_retried_or_ends_worker_lost_only_if_still_that_attempt():
    entry = {"vm": "vm2", "phase": "Running", "attempt": 1, "worker": "w@h"}
    retry = lost_patch(3, entry, retry=True, now="T")
    tests = [op for op in retry if op["op"] == "test"]
    assert tests == [
        {"op": "test", "path": "/status/results/3/vm", "value": "vm2"},
        {"op": "test", "path": "/status/results/3/phase", "value": "Running"},
        {"op": "test", "path": "/status/results/3/attempt", "value": 1},
    ]
    values = {op["path"].rsplit("/", 1)[1]: op["value"] for op in retry if op["op"] != "test"}
    assert values["phase"] == "Queued" and values["attempt"] == 2
    assert values["reason"] == "WorkerLost"
    final = lost_patch(3, entry, retry=False, now="T")
    values = {op["path"].rsplit("/", 1)[1]: op["value"] for op in final if op["op"] != "test"}
    assert (values["phase"], values["reason"], values["completionTime"]) == (
        "Failed", "WorkerLost", "T")
    assert "temporary file is removed" in values["message"]


# --------------------------------------------------------------------------- the executor, with fakes

import stat as _stat  # noqa: E402

from remote_tasks.ssh import SSHTarget  # noqa: E402
from vmfleet.api.envelope import Envelope  # noqa: E402


class Attrs:
    def __init__(self, mode: int, size: int) -> None:
        self.st_mode, self.st_size = mode, size


class FakeSFTP:
    """A VM's filesystem as paramiko's SFTPClient shows it (only what transfers use)."""

    def __init__(self, files: dict[str, bytes], broken: bool = False) -> None:
        self.files = files
        self.dirs = {"/", "/tmp", "/srv"}
        self.broken = broken
        self.bytes_read = 0

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
            return Reader(data)
        if self.broken:
            raise EOFError()
        self.files[path] = b""
        sftp = self

        class Writer:
            def set_pipelined(self, on):
                pass

            def write(self, data):
                sftp.files[path] += data

            def close(self):
                pass
        return Writer()

    def chmod(self, path, mode):
        pass

    def posix_rename(self, old, new):
        self.files[new] = self.files.pop(old)

    rename = posix_rename

    def remove(self, path):
        if path not in self.files:
            raise FileNotFoundError(errno.ENOENT, "No such file")
        del self.files[path]

    def mkdir(self, path):
        self.dirs.add(path)

    def close(self):
        pass


class FakeKube:
    def __init__(self) -> None:
        self.patches: list = []

    def patch_command_status(self, namespace, name, patch):
        self.patches.append(patch)
        return {}


class FakePool:
    def __init__(self, vms: dict[str, FakeSFTP]) -> None:
        self.vms = vms
        self.discarded: list[str] = []

    def get(self, target):
        sftp = self.vms[target.host]
        return type("Conn", (), {"sftp": lambda self, window_size=None: sftp})()

    def discard(self, target):
        self.discarded.append(target.host)


class FakeCommands:
    def __init__(self, vms: dict[str, FakeSFTP]) -> None:
        self.kube = FakeKube()
        self.pool = FakePool(vms)

    def resolve_target(self, namespace, vm):
        return SSHTarget(host=vm, port=22, user="u", private_key="k", host_keys=("k",))


def run_transfer(vms, retries=0, requeued=None, **transfer):
    body = {"from": {"vm": "vm1", "path": "/tmp/src"},
            "to": [{"vm": "vm2", "path": "/srv/dst"}, {"vm": "vm3", "path": "/srv/dst"}]}
    body.update(transfer)
    s = RemoteCommandSpec.model_validate({"transfer": body, "retries": {"limit": retries,
                                                                        "backoffSeconds": 5}})
    commands = FakeCommands(vms)
    executor = t.TransferExecutor(commands,  # type: ignore[arg-type]
                                  requeue=(lambda env, countdown: requeued.append((env, countdown)))
                                  if requeued is not None else None)
    envelope = Envelope("ns", "copy", "uid-1", "vm2", 1, "", s.wire())
    outcome = executor.run(envelope, "w", s, [(0, {"vm": "vm2", "attempt": 1}),
                                              (1, {"vm": "vm3", "attempt": 1})])
    return outcome, commands


def written(patch) -> dict:
    return {op["path"].rsplit("/", 1)[1]: op["value"] for op in patch if op["op"] != "test"}


def test_the_source_is_read_once_for_every_destination():
    data = bytes(range(256)) * 40000  # ~10 MiB: several windows
    vms = {"vm1": FakeSFTP({"/tmp/src": data}), "vm2": FakeSFTP({}), "vm3": FakeSFTP({})}
    outcome, commands = run_transfer(vms)
    assert outcome == "Succeeded"
    assert vms["vm1"].bytes_read == len(data)
    for vm in ("vm2", "vm3"):
        assert vms[vm].files == {"/srv/dst": data}  # and no temporary file
    results = [written(p) for p in commands.kube.patches if written(p).get("phase")]
    assert [r["phase"] for r in results] == ["Succeeded", "Succeeded"]
    assert results[0]["transfer"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert results[0]["transfer"]["bytes"] == len(data)
    assert results[0]["transfer"]["source"] == "vm1:/tmp/src"


def test_one_broken_destination_does_not_stop_the_others():
    vms = {"vm1": FakeSFTP({"/tmp/src": b"x" * 1000}), "vm2": FakeSFTP({}, broken=True),
           "vm3": FakeSFTP({})}
    outcome, commands = run_transfer(vms)
    assert outcome == "Failed"
    by_phase = {written(p)["phase"]: written(p) for p in commands.kube.patches}
    assert by_phase["Failed"]["reason"] == "TransportError"
    assert "/srv/dst" in by_phase["Failed"]["message"]
    assert by_phase["Succeeded"]["transfer"]["bytes"] == 1000
    assert vms["vm3"].files == {"/srv/dst": b"x" * 1000}


def test_a_transport_error_is_requeued_as_the_next_attempt_within_the_limit():
    vms = {"vm1": FakeSFTP({"/tmp/src": b"x"}), "vm2": FakeSFTP({}, broken=True),
           "vm3": FakeSFTP({})}
    requeued: list = []
    _, commands = run_transfer(vms, retries=1, requeued=requeued)
    ((envelope, countdown),) = requeued
    assert (envelope.vm, envelope.attempt, countdown) == ("vm2", 2, 5.0)
    retry = next(written(p) for p in commands.kube.patches if written(p).get("phase") == "Queued")
    assert retry["attempt"] == 2
    assert retry["reason"] == "TransportError"
    assert "retrying in 5s" in retry["message"]
    assert commands.pool.discarded == ["vm2"]  # the next attempt reconnects


def test_overwrite_never_and_missing_source():
    vms = {"vm1": FakeSFTP({"/tmp/src": b"new"}), "vm2": FakeSFTP({"/srv/dst": b"old"}),
           "vm3": FakeSFTP({})}
    _, commands = run_transfer(vms, overwrite="Never")
    reasons = sorted(written(p)["reason"] for p in commands.kube.patches)
    assert reasons == ["Completed", "DestinationExists"]
    assert vms["vm2"].files == {"/srv/dst": b"old"}
    _, commands = run_transfer(vms, **{"from": {"vm": "vm1", "path": "/tmp/none"}})
    failures = [written(p) for p in commands.kube.patches]
    assert {f["reason"] for f in failures} == {"SourceNotFound"}
    assert all("/tmp/none" in f["message"] for f in failures)
