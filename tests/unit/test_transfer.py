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
