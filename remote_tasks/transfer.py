"""File transfers between VMs: streamed SFTP to SFTP, atomic, verified, memory-bounded.

One delivery of ``remote_tasks.transfer_file`` claims its destination's result entry, and
with it every other destination still ``Queued`` (one JSON Patch with ``test`` operations,
as commands are claimed), so the source is read once and written to every destination.

Per destination: write to a temporary name beside the target (``.<name>.vmfleet-<tag>``,
derived from the command's uid, the VM and the attempt, so a later attempt or the cleanup
task can remove what a lost attempt left), set the mode, optionally re-read it, then
rename it over the target (``posix-rename@openssh.com``; plain ``rename``, which never
replaces, for ``overwrite: Never``). Readers see the old file or the whole new one.

Memory: the source is read in windows of ``WINDOW`` bytes (paramiko prefetch, many read
requests in flight), each chunk hashed and written (pipelined) to every destination before
the next window is requested, so a transfer holds at most about one window plus the SSH
channel windows, whatever the file size. Paths only ever travel as SFTP strings.
"""

from __future__ import annotations

import base64
import errno
import functools
import hashlib
import logging
import posixpath
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import paramiko
from pydantic import ValidationError

from vmfleet.api.constants import SECRET_TYPE_SSH_AUTH, Phase, Reason
from vmfleet.api.envelope import Envelope, now_rfc3339, parse_rfc3339
from vmfleet.api.models import FileLocation, RemoteCommandSpec, TransferSource, TransferSpec
from vmfleet.kube import ApiException

from . import claims
from .execute import AttemptFailed, CommandExecutor
from .ssh import Deadline, SSHError, SSHTarget

log = logging.getLogger("remote_tasks.transfer")

# Bytes requested from the source at once, and the source channel's SSH window: together
# they bound what a transfer buffers (measured: ~35 MiB of Python objects at 8 MiB each).
WINDOW = 4 * 1024 * 1024
SOURCE_CHANNEL_WINDOW = 4 * 1024 * 1024
# One SFTP request's worth (paramiko's largest): blocks are handed on exactly as they
# arrive, never joined, so every buffer is the same small size and the allocator reuses
# them instead of fragmenting (bigger joined blocks made the worker's RSS creep).
READ_BLOCK = 32 * 1024
PREFETCH_REQUESTS = 64  # SFTP read requests in flight
WRITE_BUFFER = 0  # unbuffered: each block becomes one pipelined SFTP write
PROGRESS_SECONDS = 2.0  # how often a running transfer reports bytes (and proves it is alive)
TEMP_MARK = ".vmfleet-"
# Failures worth another attempt (within retries.limit): the link, not the request.
RETRYABLE = frozenset({Reason.TRANSPORT_ERROR})


class TransferFailed(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class Aborted(Exception):
    """The entry is no longer ours (deleted, cancelled or taken over): stop, leave nothing."""


# --------------------------------------------------------------------------- pure helpers


def temp_tag(uid: str, vm: str, attempt: int) -> str:
    """The part of a temporary name that identifies one attempt on one destination."""
    digest = hashlib.sha256(f"{uid}\0{vm}".encode()).hexdigest()[:12]
    return f"{digest}-{attempt}"


def temp_path(path: str, uid: str, vm: str, attempt: int) -> str:
    """The temporary file beside ``path`` for this attempt (hidden, same directory)."""
    directory, name = posixpath.split(path)
    # Keep the name under NAME_MAX (255 bytes) whatever the target's name is.
    short = name.encode()[:180].decode("utf-8", errors="ignore")
    return posixpath.join(directory, f".{short}{TEMP_MARK}{temp_tag(uid, vm, attempt)}")


def parse_mode(mode: str | None) -> int | None:
    return int(mode, 8) if mode else None


def throughput(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds, 1) if seconds > 0 else float(nbytes)


def classify(exc: BaseException, vm: str, path: str, writing: bool) -> TransferFailed:
    """A named reason and a message that names the path, for an SFTP or SSH error."""
    if isinstance(exc, TransferFailed):
        return exc
    if isinstance(exc, SSHError):
        return TransferFailed(exc.reason, f"{vm}:{path}: {exc}")
    code = getattr(exc, "errno", None)
    if isinstance(exc, FileNotFoundError) or code == errno.ENOENT:
        if writing:
            return TransferFailed(
                Reason.DESTINATION_NOT_FOUND,
                f"the directory of {path} does not exist on {vm} (set createDirs: true to create it)",
            )
        return TransferFailed(Reason.SOURCE_NOT_FOUND, f"source file {path} does not exist on {vm}")
    if isinstance(exc, PermissionError) or code in (errno.EACCES, errno.EPERM):
        verb = "writing" if writing else "reading"
        return TransferFailed(Reason.PERMISSION_DENIED, f"permission denied {verb} {path} on {vm}")
    detail = str(exc) or type(exc).__name__
    return TransferFailed(Reason.TRANSPORT_ERROR, f"{vm}:{path}: {detail}")


def transfer_deadline(spec: RemoteCommandSpec, command_start: str | None,
                      now: float) -> Deadline | None:
    """When this attempt must end (``now``: the executor's clock): timeoutSeconds from now,
    activeDeadlineSeconds from the command's startTime, whichever comes first."""
    per_attempt = Deadline(now + spec.timeout_seconds, Reason.TIMEOUT) if spec.timeout_seconds \
        else None
    overall = None
    if spec.active_deadline_seconds and command_start:
        remaining = (parse_rfc3339(command_start).timestamp() + spec.active_deadline_seconds
                     - time.time())
        overall = Deadline(now + remaining, Reason.DEADLINE_EXCEEDED)
    return Deadline.earliest(per_attempt, overall)


def _closed(sftp: paramiko.SFTPClient) -> bool:
    channel = sftp.get_channel()
    return channel is not None and channel.closed


def deadline_message(spec: RemoteCommandSpec, reason: str) -> str:
    if reason == Reason.TIMEOUT:
        return f"the transfer did not finish within timeoutSeconds ({spec.timeout_seconds}s)"
    return f"activeDeadlineSeconds ({spec.active_deadline_seconds}s) passed"


# --------------------------------------------------------------------------- SFTP pieces


def ensure_dirs(sftp: paramiko.SFTPClient, directory: str) -> None:
    """``mkdir -p`` over SFTP."""
    missing: list[str] = []
    current = directory
    while current not in ("", "/"):
        try:
            attrs = sftp.stat(current)
        except FileNotFoundError:
            missing.append(current)
            current = posixpath.dirname(current)
            continue
        if not stat.S_ISDIR(attrs.st_mode or 0):
            raise NotADirectoryError(errno.ENOTDIR, f"{current} is not a directory")
        break
    for path in reversed(missing):
        try:
            sftp.mkdir(path)
        except OSError:
            # Created meanwhile by someone else is fine; anything else is reported.
            if not stat.S_ISDIR(sftp.stat(path).st_mode or 0):
                raise


def remove_quietly(sftp: paramiko.SFTPClient, path: str) -> bool:
    try:
        sftp.remove(path)
        return True
    except (OSError, paramiko.SSHException, EOFError):
        return False


def sha256_of(sftp: paramiko.SFTPClient, path: str, size: int) -> str:
    digest = hashlib.sha256()
    with sftp.open(path, "rb") as fh:
        for chunk in read_windows(fh, size):
            digest.update(chunk)
    return digest.hexdigest()


def read_windows(fh: paramiko.SFTPFile, size: int) -> Iterator[bytes]:
    """The file's bytes, one bounded prefetch window at a time."""
    offset = 0
    while offset < size:
        end = min(size, offset + WINDOW)
        blocks = [(o, min(READ_BLOCK, end - o)) for o in range(offset, end, READ_BLOCK)]
        for (_, length), data in zip(blocks, fh.readv(blocks, PREFETCH_REQUESTS), strict=True):
            if len(data) != length:
                raise EOFError("the source ended early (it changed while being copied?)")
            yield data
        offset = end


# --------------------------------------------------------------------------- one transfer


@dataclass
class Destination:
    """One destination VM of this attempt."""

    vm: str
    path: str
    index: int  # of its result entry
    attempt: int
    temp: str
    target: SSHTarget | None = None
    sftp: paramiko.SFTPClient | None = None
    fh: paramiko.SFTPFile | None = None
    written: int = 0
    failure: TransferFailed | None = None
    unchanged: bool = False
    verified: bool = False
    finished_at: float = 0.0
    last_report: float = field(default_factory=time.monotonic)
    partial_removed: bool = False  # ended early: its temporary file was removed

    @property
    def active(self) -> bool:
        return self.failure is None and not self.unchanged


@dataclass
class Source:
    description: str
    size: int
    mode: int
    chunks: Callable[[], Iterator[bytes]]
    digest: Callable[[], str]
    close: Callable[[], None] = lambda: None
    abort: Callable[[], None] = lambda: None  # from another thread: unblock a stalled read


class TransferExecutor:
    """Runs transfer attempts with the command executor's API client and SSH pool."""

    def __init__(
        self,
        commands: CommandExecutor,
        clock: Callable[[], float] = time.monotonic,
        requeue: Callable[[Envelope, float | None], None] | None = None,
    ) -> None:
        self.commands = commands
        self.kube = commands.kube
        self.pool = commands.pool
        self.clock = clock
        self.requeue = requeue  # sends a retry attempt (countdown seconds) to the queue

    # ---------------------------------------------------------------- claim

    def execute(self, envelope: Envelope, worker: str) -> str:
        obj = self.kube.get_command(envelope.namespace, envelope.name)
        if obj is None or obj["metadata"].get("uid") != envelope.uid:
            log.info("Skipped transfer %s to %s: it no longer exists", envelope.ref, envelope.vm)
            return "gone"
        results = (obj.get("status") or {}).get("results") or []
        own = claims.result_index(obj.get("status"), envelope.vm)
        entry = results[own] if own is not None else {}
        if entry.get("phase") != Phase.QUEUED or entry.get("attempt") != envelope.attempt:
            log.info("Skipped transfer %s to %s attempt %s: already %s", envelope.ref,
                     envelope.vm, envelope.attempt, entry.get("phase", "unknown"))
            return "duplicate"
        assert own is not None
        # First attempts: claim our entry and every other destination still waiting, so one
        # read of the source serves all. Retries (which may wait for a backoff) go alone.
        batch = [(i, e) for i, e in enumerate(results)
                 if e.get("phase") == Phase.QUEUED and e.get("attempt") == 1
                 and envelope.attempt == 1]
        claimed = ((batch and self._claim(envelope, worker, batch))
                   or self._claim(envelope, worker, [(own, entry)]))
        if not claimed:
            log.info("Skipped transfer %s to %s: claimed by another delivery", envelope.ref,
                     envelope.vm)
            return "duplicate"
        log.info("Claimed transfer %s to %s", envelope.ref,
                 ", ".join(f"{e['vm']} (attempt {e['attempt']})" for _, e in claimed))
        try:
            spec = RemoteCommandSpec.model_validate(obj["spec"])
        except ValidationError as exc:
            failure = TransferFailed(Reason.INVALID_SPEC, f"invalid spec: {exc}")
            for index, e in claimed:
                self._finish_failed(envelope, worker, index, e["vm"], e["attempt"], failure, None)
            return Phase.FAILED
        assert spec.transfer is not None
        return self.run(envelope, worker, spec, claimed,
                        command_start=(obj.get("status") or {}).get("startTime"))

    def _claim(
        self, envelope: Envelope, worker: str, batch: list[tuple[int, dict[str, Any]]]
    ) -> list[tuple[int, dict[str, Any]]]:
        now = now_rfc3339()
        patch: claims.Patch = []
        for index, e in batch:
            patch += claims.claim_patch(index, e["vm"], e["attempt"], worker, now)
        try:
            self.kube.patch_command_status(envelope.namespace, envelope.name, patch)
        except ApiException as exc:
            if exc.status in (404, 409, 422):
                return []
            raise
        return batch

    # ---------------------------------------------------------------- run

    def run(
        self, envelope: Envelope, worker: str, spec: RemoteCommandSpec,
        claimed: list[tuple[int, dict[str, Any]]], command_start: str | None = None,
    ) -> str:
        transfer = spec.transfer
        assert transfer is not None
        locations = {loc.vm: loc for loc in transfer.to}
        dests = []
        for index, e in claimed:
            loc: FileLocation | None = locations.get(e["vm"])
            if loc is None:
                continue
            dests.append(Destination(e["vm"], loc.path, index, e["attempt"],
                                     temp_path(loc.path, envelope.uid, e["vm"], e["attempt"])))
        deadline = transfer_deadline(spec, command_start, self.clock())
        started = self.clock()
        source: Source | None = None
        digest = ""
        expired: list[str] = []  # the watchdog's reason, once the deadline passed
        watchdog = self._watchdog(deadline, dests, expired, lambda: source)
        try:
            if deadline is not None and deadline.expired(self.clock()):
                raise TransferFailed(deadline.reason, deadline_message(spec, deadline.reason))
            source = self.open_source(envelope.namespace, transfer.from_)
            for dest in dests:
                self.prepare(envelope, dest, transfer, source)
            if any(dest.active for dest in dests):
                digest = self.stream(envelope, worker, source, dests, deadline, started)
            elif any(dest.unchanged for dest in dests):
                digest = source.digest()
            for dest in dests:
                if dest.active:
                    self.complete(dest, transfer, source, digest)
        except Aborted:
            log.info("Stopped transfer %s: it was deleted, cancelled or taken over", envelope.ref)
            for dest in dests:
                self.discard(dest)
            return "aborted"
        except TransferFailed as failure:  # the source: every destination fails alike
            if expired:  # the watchdog cut a stalled read or write: that is the deadline
                failure = TransferFailed(expired[0], deadline_message(spec, expired[0]))
            elif failure.reason in (Reason.TIMEOUT, Reason.DEADLINE_EXCEEDED):
                failure = TransferFailed(failure.reason, deadline_message(spec, failure.reason))
            for dest in dests:
                if expired or dest.failure is None:
                    dest.failure = failure
        finally:
            if watchdog is not None:
                watchdog.cancel()
            if expired:  # a read or write the watchdog cut failed for the deadline's reason
                late = TransferFailed(expired[0], deadline_message(spec, expired[0]))
                for dest in dests:
                    if dest.failure is not None or (dest.active and not dest.finished_at):
                        dest.failure = late
            if source is not None:
                try:
                    source.close()
                except (OSError, paramiko.SSHException, EOFError):
                    pass
            for dest in dests:
                if dest.fh is not None or dest.failure is not None:
                    self.discard(dest)
                if dest.sftp is not None:
                    dest.sftp.close()
        outcome = Phase.SUCCEEDED
        for dest in dests:
            duration = (dest.finished_at or self.clock()) - started
            fields = {
                "source": source.description if source else transfer.from_.describe(),
                "path": dest.path,
                "durationSeconds": round(duration, 3),
            }
            if dest.failure is None and source is not None:
                fields.update(bytes=source.size, totalBytes=source.size, sha256=digest,
                              bytesPerSecond=throughput(dest.written, duration),
                              verified=dest.verified or None, unchanged=dest.unchanged or None)
                self._finish(envelope, worker, dest, Phase.SUCCEEDED, Reason.COMPLETED,
                             "unchanged: the destination already had the same content"
                             if dest.unchanged else None, fields)
            else:
                assert dest.failure is not None
                outcome = Phase.FAILED
                fields.update(bytes=dest.written, totalBytes=source.size if source else None,
                              partialRemoved=dest.partial_removed or None)
                if dest.partial_removed and "partial file" not in dest.failure.message:
                    dest.failure = TransferFailed(
                        dest.failure.reason, f"{dest.failure.message}; the partial file on "
                        f"{dest.vm} was removed ({dest.path} was left as it was)")
                if (dest.failure.reason in RETRYABLE and dest.attempt <= spec.retries.limit
                        and self.requeue is not None):
                    self._retry(envelope, worker, dest, spec, dest.failure, fields)
                    continue
                self._finish_failed(envelope, worker, dest.index, dest.vm, dest.attempt,
                                    dest.failure, fields)
        return outcome

    # ---------------------------------------------------------------- source

    def open_source(self, namespace: str, source: TransferSource) -> Source:
        if source.vm is not None:
            assert source.path is not None
            return self._vm_source(namespace, source.vm, source.path)
        return self._object_source(namespace, source)

    def _target(self, namespace: str, vm: str) -> SSHTarget:
        try:
            return self.commands.resolve_target(namespace, vm)
        except AttemptFailed as failed:
            raise TransferFailed(failed.reason, failed.message) from failed

    def _vm_source(self, namespace: str, vm: str, path: str) -> Source:
        target = self._target(namespace, vm)
        try:
            sftp = self.pool.get(target).sftp(window_size=SOURCE_CHANNEL_WINDOW)
        except SSHError as exc:
            self.pool.discard(target)
            raise classify(exc, vm, path, writing=False) from exc
        try:
            attrs = sftp.stat(path)
            if not stat.S_ISREG(attrs.st_mode or 0):
                raise TransferFailed(Reason.SOURCE_NOT_FOUND,
                                     f"source {path} on {vm} is not a regular file")
            fh = sftp.open(path, "rb")
        except (OSError, paramiko.SSHException, EOFError) as exc:
            sftp.close()
            raise classify(exc, vm, path, writing=False) from exc
        except TransferFailed:
            sftp.close()
            raise
        size = attrs.st_size or 0

        def chunks() -> Iterator[bytes]:
            try:
                yield from read_windows(fh, size)
            except (OSError, paramiko.SSHException, EOFError) as exc:
                raise classify(exc, vm, path, writing=False) from exc

        @functools.cache
        def digest() -> str:
            h = hashlib.sha256()
            for chunk in chunks():
                h.update(chunk)
            return h.hexdigest()

        def close() -> None:
            if not _closed(sftp):
                fh.close()
            sftp.close()

        def abort() -> None:
            channel = sftp.get_channel()
            if channel is not None:
                channel.close()

        return Source(f"{vm}:{path}", size, stat.S_IMODE(attrs.st_mode or 0o644), chunks, digest,
                      close, abort)

    def _object_source(self, namespace: str, source: TransferSource) -> Source:
        ref = source.config_map_key_ref or source.secret_key_ref
        assert ref is not None
        kind = "ConfigMap" if source.config_map_key_ref is not None else "Secret"
        try:
            if kind == "ConfigMap":
                cm = self.kube.core.read_namespaced_config_map(ref.name, namespace)
                if cm.data and ref.key in cm.data:
                    data = cm.data[ref.key].encode()
                elif cm.binary_data and ref.key in cm.binary_data:
                    data = base64.b64decode(cm.binary_data[ref.key])
                else:
                    raise TransferFailed(Reason.SOURCE_NOT_FOUND,
                                         f"ConfigMap {namespace}/{ref.name} has no key {ref.key}")
            else:
                secret = self.kube.core.read_namespaced_secret(ref.name, namespace)
                if secret.type == SECRET_TYPE_SSH_AUTH:
                    # The transfer worker may read VMs' keys; a user who may create commands
                    # must not be able to copy one onto a VM and read it there.
                    raise TransferFailed(
                        Reason.PERMISSION_DENIED,
                        f"Secret {namespace}/{ref.name} is of type {SECRET_TYPE_SSH_AUTH} (SSH "
                        "credentials of a VM): vmfleet never copies SSH credentials")
                if not secret.data or ref.key not in secret.data:
                    raise TransferFailed(Reason.SOURCE_NOT_FOUND,
                                         f"Secret {namespace}/{ref.name} has no key {ref.key}")
                data = base64.b64decode(secret.data[ref.key])
        except ApiException as exc:
            if exc.status == 404:
                raise TransferFailed(Reason.SOURCE_NOT_FOUND,
                                     f"{kind} {namespace}/{ref.name} does not exist") from exc
            if exc.status == 403:
                raise TransferFailed(Reason.PERMISSION_DENIED,
                                     f"the worker may not read {kind} {namespace}/{ref.name}") from exc
            raise TransferFailed(Reason.TRANSPORT_ERROR,
                                 f"cannot read {kind} {namespace}/{ref.name}: {exc.reason}") from exc
        mode = 0o600 if kind == "Secret" else 0o644
        label = source.describe()

        def chunks() -> Iterator[bytes]:
            for offset in range(0, len(data), READ_BLOCK):
                yield data[offset:offset + READ_BLOCK]

        return Source(label, len(data), mode, chunks, lambda: hashlib.sha256(data).hexdigest())

    # ---------------------------------------------------------------- destinations

    def prepare(self, envelope: Envelope, dest: Destination, transfer: TransferSpec,
                source: Source) -> None:
        """Connect, apply createDirs and overwrite, remove lost attempts' temps, open the temp."""
        try:
            dest.target = self._target(envelope.namespace, dest.vm)
            try:
                dest.sftp = self.pool.get(dest.target).sftp()
            except SSHError:
                self.pool.discard(dest.target)
                raise
            sftp = dest.sftp
            for earlier in range(1, dest.attempt):
                if remove_quietly(sftp, temp_path(dest.path, envelope.uid, dest.vm, earlier)):
                    log.info("Removed the temporary file of lost attempt %s on %s", earlier, dest.vm)
            directory, name = posixpath.split(dest.path)
            if not name:
                raise TransferFailed(Reason.INVALID_SPEC,
                                     f"destination {dest.path} on {dest.vm} names no file")
            try:
                existing: paramiko.SFTPAttributes | None = sftp.stat(dest.path)
            except FileNotFoundError:
                existing = None
            if existing is not None:
                if stat.S_ISDIR(existing.st_mode or 0):
                    raise TransferFailed(Reason.DESTINATION_EXISTS,
                                         f"destination {dest.path} on {dest.vm} is a directory")
                if transfer.overwrite == "Never":
                    raise TransferFailed(
                        Reason.DESTINATION_EXISTS,
                        f"destination {dest.path} already exists on {dest.vm} (overwrite: Never)")
                if transfer.overwrite == "IfDifferent" and existing.st_size == source.size:
                    if sha256_of(sftp, dest.path, source.size) == source.digest():
                        dest.unchanged = True
                        return
            if transfer.create_dirs and directory:
                ensure_dirs(sftp, directory)
            dest.fh = sftp.open(dest.temp, "wb", bufsize=WRITE_BUFFER)
            dest.fh.set_pipelined(True)
        except (OSError, paramiko.SSHException, EOFError, SSHError, TransferFailed) as exc:
            dest.failure = classify(exc, dest.vm, dest.path, writing=True)

    def stream(self, envelope: Envelope, worker: str, source: Source, dests: list[Destination],
               deadline: Deadline | None, started: float) -> str:
        digest = hashlib.sha256()
        next_report = self.clock() + PROGRESS_SECONDS
        for chunk in source.chunks():
            if deadline is not None and (reason := deadline.expired(self.clock())):
                raise TransferFailed(reason, f"the transfer of {source.description} did not "
                                     f"finish in time ({reason})")
            digest.update(chunk)
            for dest in dests:
                if not dest.active:
                    continue
                assert dest.fh is not None
                try:
                    dest.fh.write(chunk)
                    dest.written += len(chunk)
                except (OSError, paramiko.SSHException, EOFError) as exc:
                    dest.failure = classify(exc, dest.vm, dest.path, writing=True)
            if not any(dest.active for dest in dests):
                break
            now = self.clock()
            if now >= next_report:
                next_report = now + PROGRESS_SECONDS
                self.report(envelope, worker, source, dests)
        return digest.hexdigest()

    def report(self, envelope: Envelope, worker: str, source: Source,
               dests: list[Destination]) -> None:
        """Write progress into each running entry; an entry no longer ours stops the copy."""
        lost = 0
        for dest in dests:
            if not dest.active:
                continue
            patch = claims.finish_patch(dest.index, dest.vm, dest.attempt, worker, {})
            patch.append({"op": "add", "path": f"/status/results/{dest.index}/transfer", "value": {
                "source": source.description, "path": dest.path, "bytes": dest.written,
                "totalBytes": source.size, "updateTime": now_rfc3339()}})
            try:
                obj = self.kube.patch_command_status(envelope.namespace, envelope.name, patch)
            except ApiException as exc:
                if exc.status not in (404, 409, 422):
                    raise
                lost += 1
                dest.failure = TransferFailed(Reason.CANCELLED, "no longer this worker's attempt")
                self.discard(dest)
                continue
            if (obj or {}).get("metadata", {}).get("deletionTimestamp"):
                # Deleted while running (a finalizer keeps it for us): stop and say so.
                dest.failure = TransferFailed(
                    Reason.CANCELLED, "cancelled: the RemoteCommand was deleted")
                self.discard(dest)
        if lost and not any(dest.active for dest in dests):
            raise Aborted()

    def complete(self, dest: Destination, transfer: TransferSpec, source: Source,
                 digest: str) -> None:
        """Close the temp, set its mode, verify, and rename it over the target."""
        assert dest.sftp is not None and dest.fh is not None
        sftp = dest.sftp
        try:
            dest.fh.close()  # waits for every pipelined write's status
            dest.fh = None
            sftp.chmod(dest.temp, parse_mode(transfer.mode) or source.mode)
            size = sftp.stat(dest.temp).st_size
            if size != source.size:
                raise TransferFailed(Reason.CHECKSUM_MISMATCH,
                                     f"{dest.path} on {dest.vm}: wrote {size} bytes, "
                                     f"the source has {source.size}")
            if transfer.verify:
                seen = sha256_of(sftp, dest.temp, source.size)
                if seen != digest:
                    raise TransferFailed(Reason.CHECKSUM_MISMATCH,
                                         f"{dest.path} on {dest.vm}: sha256 {seen} read back "
                                         f"differs from the source's {digest}")
                dest.verified = True
            if transfer.overwrite == "Never":
                try:
                    sftp.rename(dest.temp, dest.path)  # OpenSSH: link()+unlink(), never replaces
                except OSError as exc:
                    try:
                        sftp.stat(dest.path)
                    except OSError:
                        raise exc from None
                    raise TransferFailed(
                        Reason.DESTINATION_EXISTS,
                        f"destination {dest.path} appeared on {dest.vm} during the copy "
                        "(overwrite: Never)") from exc
            else:
                sftp.posix_rename(dest.temp, dest.path)
            dest.finished_at = self.clock()
        except (OSError, paramiko.SSHException, EOFError, TransferFailed) as exc:
            dest.failure = classify(exc, dest.vm, dest.path, writing=True)

    def discard(self, dest: Destination) -> None:
        """Close and remove this attempt's temporary file, if any (over a fresh SFTP session
        when the watchdog closed the one it was written through)."""
        if dest.fh is not None:
            try:
                dest.fh.close()
            except (OSError, paramiko.SSHException, EOFError):
                pass
            dest.fh = None
            dest.partial_removed = self._remove_temp(dest) or dest.partial_removed
        elif dest.sftp is not None:
            self._remove_temp(dest)

    def _remove_temp(self, dest: Destination) -> bool:
        assert dest.sftp is not None
        if _closed(dest.sftp):
            if dest.target is None:
                return False
            try:
                dest.sftp = self.pool.get(dest.target).sftp()
            except SSHError:
                return False
        return remove_quietly(dest.sftp, dest.temp)

    def _watchdog(self, deadline: Deadline | None, dests: list[Destination],
                  expired: list[str], source: Callable[[], Source | None]
                  ) -> threading.Timer | None:
        """A timer that, at the deadline, closes the SFTP channels a stalled read or write
        may be blocked on (a source or destination that stopped answering): the blocked
        call then fails and the transfer ends with the deadline's reason."""
        if deadline is None:
            return None

        def expire() -> None:
            expired.append(deadline.reason)
            current = source()
            if current is not None:
                current.abort()
            for dest in dests:
                channel = dest.sftp.get_channel() if dest.sftp is not None else None
                if channel is not None and dest.fh is not None:
                    channel.close()

        timer = threading.Timer(max(deadline.at - self.clock(), 0.0), expire)
        timer.daemon = True
        timer.start()
        return timer

    # ---------------------------------------------------------------- results

    def _finish(self, envelope: Envelope, worker: str, dest: Destination, phase: str, reason: str,
                message: str | None, transfer: dict[str, Any]) -> None:
        fields = {"phase": phase, "reason": reason, "message": message,
                  "completionTime": now_rfc3339(),
                  "host": dest.target.host if dest.target else None,
                  "transfer": {k: v for k, v in transfer.items() if v is not None}}
        try:
            self.kube.patch_command_status(
                envelope.namespace, envelope.name,
                claims.finish_patch(dest.index, dest.vm, dest.attempt, worker, fields))
        except ApiException as exc:
            if exc.status not in (404, 409, 422):
                raise
            log.info("Did not record transfer %s to %s: the entry is no longer ours",
                     envelope.ref, dest.vm)
            return
        log.info("Finished transfer %s to %s: %s (%s)", envelope.ref, dest.vm, phase, reason)

    def _finish_failed(self, envelope: Envelope, worker: str, index: int, vm: str, attempt: int,
                       failure: TransferFailed, transfer: dict[str, Any] | None) -> None:
        dest = Destination(vm, "", index, attempt, "")
        phase = Phase.CANCELLED if failure.reason == Reason.CANCELLED else Phase.FAILED
        self._finish(envelope, worker, dest, phase, failure.reason, failure.message,
                     transfer or {})

    def _retry(self, envelope: Envelope, worker: str, dest: Destination, spec: RemoteCommandSpec,
               failure: TransferFailed, transfer: dict[str, Any]) -> None:
        """Queue the next attempt of this destination (transport errors, within retries.limit)."""
        assert self.requeue is not None
        if dest.target is not None:
            self.pool.discard(dest.target)
        now = now_rfc3339()
        base = f"/status/results/{dest.index}"
        backoff = spec.retries.backoff_seconds
        patch = claims.finish_patch(dest.index, dest.vm, dest.attempt, worker, {})
        patch += [
            {"op": "replace", "path": f"{base}/phase", "value": Phase.QUEUED},
            {"op": "replace", "path": f"{base}/attempt", "value": dest.attempt + 1},
            {"op": "add", "path": f"{base}/reason", "value": failure.reason},
            {"op": "add", "path": f"{base}/message", "value":
                f"attempt {dest.attempt} failed: {failure.message}; retrying in {backoff}s"},
            {"op": "add", "path": f"{base}/dispatchTime", "value": now},
            {"op": "add", "path": f"{base}/transfer",
             "value": {k: v for k, v in transfer.items() if v is not None}},
        ]
        try:
            self.kube.patch_command_status(envelope.namespace, envelope.name, patch)
        except ApiException as exc:
            if exc.status not in (404, 409, 422):
                raise
            return
        self.requeue(Envelope(namespace=envelope.namespace, name=envelope.name, uid=envelope.uid,
                              vm=dest.vm, attempt=dest.attempt + 1, dispatch_time=now,
                              spec=envelope.spec), float(backoff) or None)
        log.info("Transfer %s to %s: attempt %s failed (%s); retrying in %ss", envelope.ref,
                 dest.vm, dest.attempt, failure.reason, backoff)

    # ---------------------------------------------------------------- cleanup task

    def clean(self, envelope: Envelope) -> int:
        """Remove the temporary files attempts 1..``envelope.attempt`` left on one destination."""
        spec = RemoteCommandSpec.model_validate(envelope.spec)
        assert spec.transfer is not None
        loc = next((loc for loc in spec.transfer.to if loc.vm == envelope.vm), None)
        if loc is None:
            return 0
        target = self._target(envelope.namespace, envelope.vm)
        sftp = self.pool.get(target).sftp()
        try:
            removed = sum(
                remove_quietly(sftp, temp_path(loc.path, envelope.uid, envelope.vm, attempt))
                for attempt in range(1, envelope.attempt + 1)
            )
        finally:
            sftp.close()
        log.info("Removed %s temporary file(s) of transfer %s on %s", removed, envelope.ref,
                 envelope.vm)
        return removed


__all__ = ["Aborted", "TransferExecutor", "TransferFailed", "classify", "temp_path", "temp_tag"]
