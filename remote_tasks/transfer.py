"""File transfers between VMs: streamed SFTP to SFTP, atomic, verified, memory-bounded.

The controller sends one message per destination VM to its namespace's transfer queue
(``vmfleet.<namespace>:transfers``, consumed by that namespace's transfer worker); it
carries, in ``Envelope.targets``, how to reach the source VM and the destination (by VM
name). The delivery claims its destination's attempt in Redis (``State.claim``). On a
first attempt it also claims, one by one, every *other* destination named in
``targets``, so that one read of the source serves them all (their own messages then find
the claims taken and run nothing): the controller must therefore name there only
destinations whose first attempt it has sent (Queued), never one held back by fan-out
limits. A retry (attempt 2 and later) goes alone.

The worker writes no status: it reports ``claimed``, ``progress`` (bytes copied, every
``PROGRESS_SECONDS``) and ``finished`` per destination to the controller's report stream,
renews each destination's heartbeat, and stops when its command is cancelled (deleted).
Which failures run again is the controller's decision (``vmfleet.policy``).

Per destination: write to a temporary name beside the target (``.<name>.vmfleet-<tag>``,
derived from the command's uid, the VM and the attempt, so a later attempt or the cleanup
task can remove what a lost attempt left), set the mode, optionally re-read it, then
rename it over the target (``posix-rename@openssh.com``; plain ``rename``, which never
replaces, for ``overwrite: Never``). Readers see the old file or the whole new one; a
failed or cancelled attempt removes its temporary file.

Deadlines: ``timeoutSeconds`` (from this attempt's start) and ``activeDeadlineSeconds``
(from the command's ``startTime``, ``Envelope.command_start``) are checked for every block
copied or hashed, and a watchdog timer closes the SFTP channels a stalled source or
destination holds the copy on at the deadline. Timeout, deadline or cancel remove the
partial file on every destination; the ``finished`` report says so (its message and
``transfer.partialRemoved``).

Memory: the source is read in windows of ``WINDOW`` bytes (paramiko prefetch, many read
requests in flight), each chunk hashed and written (pipelined) to every destination before
the next window is requested, so a transfer holds at most about one window plus the SSH
channel windows, whatever the file size. Paths only ever travel as SFTP strings.

Keys: a namespace's transfer worker reaches every VM of its namespace, and only those:
the kubelet mounts their credentials Secrets at ``<credentials dir>/<secret name>/`` (the
Process runtime writes the same files). Its Kubernetes token (the chart's per-namespace
ServiceAccount: ``get`` on Secrets and ConfigMaps of its namespace) serves ConfigMap and
Secret sources only; the client is created on first use. A Secret is copied only when it
is labelled ``vmfleet.io/transferable: "true"``, is not of a type that holds tokens or
registry or SSH credentials, and is no RemoteVM's credentials (``secret_refusal``).
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
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import paramiko
from pydantic import ValidationError

from vmfleet import settings
from vmfleet.api import constants as c
from vmfleet.api.constants import Phase, Reason
from vmfleet.api.envelope import Envelope, Target, now_rfc3339, parse_rfc3339
from vmfleet.api.models import FileLocation, RemoteCommandSpec, TransferSource, TransferSpec
from vmfleet.api.reports import Event, ResultFields
from vmfleet.state import CANCELLED, CLAIMED

from .execute import Attempt, AttemptFailed, CommandExecutor, attempt_report
from .ssh import Deadline, SSHError, SSHTarget

if TYPE_CHECKING:
    from vmfleet.kube import Kube

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
PROGRESS_SECONDS = 5.0  # how often a running transfer reports the bytes it copied
TEMP_MARK = ".vmfleet-"
# Failures after which the next attempt must reconnect (the pooled connection is dropped).
RECONNECT = frozenset({Reason.TRANSPORT_ERROR, Reason.AUTH_FAILED})


class TransferFailed(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class Aborted(Exception):
    """The command was cancelled (deleted): stop, remove the temporary files."""


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


def deadline_message(spec: RemoteCommandSpec, reason: str) -> str:
    if reason == Reason.TIMEOUT:
        return f"the transfer did not finish within timeoutSeconds ({spec.timeout_seconds}s)"
    return f"activeDeadlineSeconds ({spec.active_deadline_seconds}s) passed"


def protected_secrets(envelope: Envelope) -> set[str]:
    """Secrets a transfer never copies: those the namespace's RemoteVMs name as credentials
    (the controller lists them in the envelope) and those of the VMs the message names."""
    names = set(envelope.protected_secrets)
    for target in [*envelope.targets.values(), *([envelope.target] if envelope.target else [])]:
        hop: Target | None = target
        while hop is not None:
            names.add(hop.secret)
            hop = hop.bastion
    return names


def secret_refusal(ref: str, secret_type: str | None, labels: dict[str, str],
                   credentials: bool) -> str | None:
    """Why a Secret may not be a transfer's source, or None: it must carry the label
    ``vmfleet.io/transferable: "true"``, not be of a type that holds tokens or registry
    or SSH credentials, and not be a RemoteVM's credentials (``credentials``)."""
    opt_in = f'{c.LABEL_TRANSFERABLE}: "true"'
    if secret_type in c.SECRET_TYPES_NEVER_TRANSFERRED:
        return (f"Secret {ref} is of type {secret_type}: vmfleet never copies it, even "
                f"labelled {opt_in}")
    if credentials:
        return (f"Secret {ref} holds a RemoteVM's SSH credentials: vmfleet never copies it, "
                f"even labelled {opt_in}")
    if labels.get(c.LABEL_TRANSFERABLE) != "true":
        return (f"Secret {ref} is not labelled {opt_in}: a transfer copies a Secret only "
                "when its owner allows it with that label")
    return None


def _closed(sftp: paramiko.SFTPClient) -> bool:
    channel = sftp.get_channel()
    return channel is not None and channel.closed


def close_file(fh: paramiko.SFTPFile, *, session_gone: bool = False) -> None:
    """Close an SFTP file without raising (with no I/O when its session is gone). paramiko
    marks a file closed only once its close succeeded; one left open is closed again by
    its ``__del__`` at garbage collection, which fails on the dead session and prints an
    ignored ``ValueError`` Traceback into the worker's log. So it is marked closed anyway."""
    try:
        if not session_gone:
            fh.close()
    except (OSError, paramiko.SSHException, EOFError, ValueError):
        pass
    finally:
        fh._closed = True  # type: ignore[attr-defined]  # BufferedFile._closed, not in the stubs


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


def sha256_of(sftp: paramiko.SFTPClient, path: str, size: int,
              tick: Callable[[], None] = lambda: None) -> str:
    """The file's sha256, read in windows; ``tick`` is called per block (heartbeats)."""
    digest = hashlib.sha256()
    with sftp.open(path, "rb") as fh:
        for chunk in read_windows(fh, size):
            tick()
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
    """One destination VM of this delivery (its own attempt, claimed in Redis)."""

    vm: str
    path: str
    attempt: int
    temp: str
    target: SSHTarget | None = None
    sftp: paramiko.SFTPClient | None = None
    fh: paramiko.SFTPFile | None = None
    written: int = 0
    failure: TransferFailed | None = None
    unchanged: bool = False
    verified: bool = False
    done: bool = False  # renamed into place
    finished_at: float = 0.0
    reported: bool = False  # its ``finished`` report is sent
    partial_removed: bool = False  # ended early: its temporary file was removed

    @property
    def active(self) -> bool:
        return self.failure is None and not self.unchanged and not self.done


@dataclass
class Source:
    description: str
    size: int
    mode: int
    chunks: Callable[[], Iterator[bytes]]
    digest: Callable[[], str]
    close: Callable[[], None] = lambda: None
    abort: Callable[[], None] = lambda: None  # from another thread: unblock a stalled read


@dataclass
class Run:
    """One delivery's transfer: what it claimed, and when it next beats and reports."""

    envelope: Envelope
    worker: str
    spec: RemoteCommandSpec
    transfer: TransferSpec
    dests: list[Destination]
    cancel: Attempt  # registered with the executor's Cancels: a published cancel marks it
    started: float
    next_beat: float
    next_progress: float
    source: Source | None = None
    digest: str = ""
    deadline: Deadline | None = None  # timeoutSeconds / activeDeadlineSeconds, if any
    expired: list[str] = field(default_factory=list)  # the watchdog's reason, once it fired

    def deadline_failure(self, reason: str) -> TransferFailed:
        return TransferFailed(reason, deadline_message(self.spec, reason))

    @property
    def unreported(self) -> list[Destination]:
        return [dest for dest in self.dests if not dest.reported]


def _default_kube() -> Kube:
    from vmfleet.kube import Kube

    return Kube()


class TransferExecutor:
    """Runs transfer attempts with the command executor's Redis state and SSH pool."""

    def __init__(
        self,
        executor: CommandExecutor,
        clock: Callable[[], float] = time.monotonic,
        kube: Callable[[], Kube] = _default_kube,
    ) -> None:
        self.executor = executor
        self.state = executor.state
        self.pool = executor.pool
        self.clock = clock
        self._make_kube = kube
        self._kube: Kube | None = None
        self._kube_lock = threading.Lock()

    @property
    def kube(self) -> Kube:
        """The Kubernetes client (ConfigMap and Secret sources only), made once."""
        with self._kube_lock:
            if self._kube is None:
                self._kube = self._make_kube()
            return self._kube

    # ---------------------------------------------------------------- claim

    def execute(self, envelope: Envelope, worker: str) -> str:
        """Claim this message's destination (and, on a first attempt, the envelope's other
        destinations), copy, and report each. Returns what happened, for logs."""
        cancel = Attempt(self.state, envelope, worker)
        with self.executor.cancels.running(cancel):
            return self._execute(envelope, worker, cancel)

    def _execute(self, envelope: Envelope, worker: str, cancel: Attempt) -> str:
        # The claim's holder is this delivery, not just this worker: a worker's threads
        # (or a redelivery to it) must not win a claim another of its deliveries holds.
        holder = f"{worker}/{uuid.uuid4().hex[:12]}"
        try:
            spec = RemoteCommandSpec.model_validate(envelope.spec)
            if spec.transfer is None:
                raise ValueError("the spec has no transfer")
        except (ValidationError, ValueError) as exc:
            return self._reject(envelope, worker, holder, cancel, f"invalid spec: {exc}")
        transfer = spec.transfer
        locations = {loc.vm: loc for loc in transfer.to}
        own = locations.get(envelope.vm)
        if own is None:
            return self._reject(envelope, worker, holder, cancel,
                                f"{envelope.vm} is not a destination of this transfer")
        if not self._claim(envelope, envelope.vm, holder, cancel):
            return "cancelled" if cancel.cancelled else "duplicate"
        wanted: list[FileLocation] = [own]
        if envelope.attempt == 1:
            # Every other destination the controller sent with this one: one read serves all.
            wanted += [loc for loc in transfer.to
                       if loc.vm != envelope.vm and loc.vm in envelope.targets
                       and self._claim(envelope, loc.vm, holder, cancel)]
        now = now_rfc3339()
        dests = []
        for loc in wanted:
            dests.append(Destination(loc.vm, loc.path, envelope.attempt,
                                     temp_path(loc.path, envelope.uid, loc.vm, envelope.attempt)))
            target = self._find_target(envelope, loc.vm)
            self._report(envelope, worker, Event.CLAIMED, loc.vm, ResultFields(
                phase=Phase.RUNNING, start_time=now, worker=worker, heartbeat_time=now,
                host=target.host if target else None,
                transfer={"source": transfer.from_.describe(), "path": loc.path}))
        log.info("Claimed transfer %s to %s (attempt %s)", envelope.ref,
                 ", ".join(dest.vm for dest in dests), envelope.attempt)
        started = self.clock()
        run = Run(envelope, worker, spec, transfer, dests, cancel, started,
                  next_beat=started + settings.current().heartbeat_seconds,
                  next_progress=started + PROGRESS_SECONDS,
                  deadline=transfer_deadline(spec, envelope.command_start, started))
        return self.run(run)

    def _claim(self, envelope: Envelope, vm: str, holder: str, cancel: Attempt) -> bool:
        result = self.state.claim(envelope.uid, vm, envelope.attempt, holder, envelope.scope,
                                  namespace=envelope.namespace)
        if result == CLAIMED:
            return True
        if result == CANCELLED:
            cancel.cancelled = True
        log.info("Skipped transfer %s to %s attempt %s: %s", envelope.ref, vm, envelope.attempt,
                 "it was deleted" if result == CANCELLED else "claimed by another delivery")
        return False

    def _reject(self, envelope: Envelope, worker: str, holder: str, cancel: Attempt,
                message: str) -> str:
        """The message cannot run (the controller validated the spec: rare): fail its entry."""
        if not self._claim(envelope, envelope.vm, holder, cancel):
            return "cancelled" if cancel.cancelled else "duplicate"
        dest = Destination(envelope.vm, "", envelope.attempt, "",
                           failure=TransferFailed(Reason.INVALID_SPEC, message))
        self._finish(envelope, worker, dest, {})
        return Phase.FAILED

    # ---------------------------------------------------------------- run

    def run(self, run: Run) -> str:
        stop = self._beat_meanwhile(run)
        try:
            return self._run(run)
        finally:
            stop.set()

    def _beat_meanwhile(self, run: Run) -> threading.Event:
        """Heartbeats from a thread of their own while the run lasts: connecting, a slow
        first block or the cleanup after a deadline send none from ``tick``, and a silence
        as long as the controller's lost-worker limit would end the attempt WorkerLost."""
        stop = threading.Event()
        interval = settings.current().heartbeat_seconds
        if interval <= 0:
            return stop
        env = run.envelope

        def beat() -> None:
            while not stop.wait(interval):
                for dest in run.unreported:
                    try:
                        if self.state.heartbeat(env.uid, dest.vm, dest.attempt, env.scope,
                                                namespace=env.namespace):
                            run.cancel.cancelled = True
                    except Exception as exc:  # noqa: BLE001 - Redis restarting: beat again later
                        log.warning("Heartbeat of transfer %s to %s failed: %s", env.ref,
                                    dest.vm, exc)

        threading.Thread(target=beat, name="vmfleet-transfer-beat", daemon=True).start()
        return stop

    def _run(self, run: Run) -> str:
        envelope, transfer, dests = run.envelope, run.transfer, run.dests
        watchdog = self._watchdog(run)
        try:
            self.tick(run)  # cancelled, or past the deadline, meanwhile?
            run.source = self.open_source(envelope, transfer.from_, lambda: self.tick(run))
            self.tick(run)  # the watchdog may have fired before there was a source to cut
            for dest in dests:
                self.prepare(run, dest)
                self.flush(run)
                self.tick(run)
            if any(dest.active for dest in dests):
                run.digest = self.stream(run)
            elif any(dest.unchanged for dest in dests):
                run.digest = run.source.digest()
            for dest in dests:
                if dest.active:
                    self.complete(run, dest)
                    self.flush(run)
        except Aborted:
            log.info("Stopped transfer %s: the RemoteCommand was deleted", envelope.ref)
            for dest in dests:
                if dest.active:
                    self.discard(dest)
                    left = "" if dest.partial_removed else \
                        f"; {dest.path} on {dest.vm} was left as it was"
                    dest.failure = TransferFailed(
                        Reason.CANCELLED, f"cancelled: the RemoteCommand was deleted{left}")
        except TransferFailed as exc:  # the source or the deadline: every destination alike
            # The watchdog cut a stalled read or write: that is the deadline.
            failure = run.deadline_failure(run.expired[0]) if run.expired else exc
            for dest in dests:
                if dest.active:
                    dest.failure = failure
        finally:
            if watchdog is not None:
                watchdog.cancel()
            if run.source is not None:
                try:
                    run.source.close()
                except (OSError, paramiko.SSHException, EOFError):
                    pass
            for dest in dests:
                if dest.fh is not None or (dest.failure is not None and not dest.reported):
                    self.discard(dest)
                if dest.sftp is not None:
                    dest.sftp.close()
                    dest.sftp = None
        self.flush(run, every=True)
        for dest in dests:
            if dest.failure is not None and dest.failure.reason in RECONNECT and dest.target:
                self.pool.discard(dest.target)  # the next attempt reconnects
        phases = {self._phase(dest) for dest in dests}
        for phase in (Phase.CANCELLED, Phase.FAILED):
            if phase in phases:
                return phase
        return Phase.SUCCEEDED

    def tick(self, run: Run) -> None:
        """Called for every block copied or hashed: heartbeats, progress, cancels, deadline."""
        if run.cancel.cancelled:
            raise Aborted()
        now = self.clock()
        if now >= run.next_beat:
            run.next_beat = now + settings.current().heartbeat_seconds
            env = run.envelope
            for dest in run.unreported:
                try:
                    if self.state.heartbeat(env.uid, dest.vm, dest.attempt, env.scope,
                                            namespace=env.namespace):
                        run.cancel.cancelled = True
                except Exception as exc:  # noqa: BLE001 - Redis restarting: the next beat may land
                    log.warning("Heartbeat of transfer %s to %s failed: %s", env.ref, dest.vm, exc)
            if run.cancel.cancelled:
                raise Aborted()
        # After the beat: the cleanup that follows a deadline sends none until it reports.
        if run.expired:  # the watchdog fired (it cut what was stalled): stop the others too
            raise run.deadline_failure(run.expired[0])
        if run.deadline is not None and (reason := run.deadline.expired(now)):
            raise run.deadline_failure(reason)
        if now >= run.next_progress and run.source is not None:
            run.next_progress = now + PROGRESS_SECONDS
            self.progress(run, run.source)

    def progress(self, run: Run, source: Source) -> None:
        """Report the bytes each running destination has so far (best effort)."""
        now = now_rfc3339()
        for dest in run.dests:
            if dest.reported or not dest.active:
                continue
            try:
                self._report(run.envelope, run.worker, Event.PROGRESS, dest.vm, ResultFields(
                    heartbeat_time=now,
                    transfer={"source": source.description, "path": dest.path,
                              "bytes": dest.written, "totalBytes": source.size,
                              "updateTime": now}))
            except Exception as exc:  # noqa: BLE001 - the next report carries the count
                log.warning("Progress of transfer %s to %s not reported: %s", run.envelope.ref,
                            dest.vm, exc)

    # ---------------------------------------------------------------- source

    def open_source(self, envelope: Envelope, source: TransferSource,
                    tick: Callable[[], None] = lambda: None) -> Source:
        if source.vm is not None:
            assert source.path is not None
            return self._vm_source(envelope, source.vm, source.path, tick)
        return self._object_source(envelope, source)

    def _find_target(self, envelope: Envelope, vm: str) -> Target | None:
        target = envelope.targets.get(vm)
        if target is None and envelope.target is not None and envelope.target.vm == vm:
            target = envelope.target
        return target

    def ssh_target(self, envelope: Envelope, vm: str) -> SSHTarget:
        """How to reach ``vm``: its ``Target`` from the envelope, its key mounted or read."""
        target = self._find_target(envelope, vm)
        if target is None:
            raise TransferFailed(Reason.VM_NOT_FOUND,
                                 f"the message does not say how to reach RemoteVM {vm}")
        try:
            return self.executor.ssh_target(target)
        except AttemptFailed as failed:
            raise TransferFailed(failed.reason, failed.message) from failed

    def _vm_source(self, envelope: Envelope, vm: str, path: str,
                   tick: Callable[[], None]) -> Source:
        target = self.ssh_target(envelope, vm)
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
                tick()
                h.update(chunk)
            return h.hexdigest()

        def close() -> None:
            close_file(fh, session_gone=_closed(sftp))
            sftp.close()

        def abort() -> None:
            channel = sftp.get_channel()
            if channel is not None:
                channel.close()

        return Source(f"{vm}:{path}", size, stat.S_IMODE(attrs.st_mode or 0o644), chunks, digest,
                      close, abort)

    def _object_source(self, envelope: Envelope, source: TransferSource) -> Source:
        from kubernetes.client.exceptions import ApiException

        namespace = envelope.namespace
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
                labels = (secret.metadata.labels if secret.metadata is not None else None) or {}
                refusal = secret_refusal(f"{namespace}/{ref.name}", secret.type, labels,
                                         ref.name in protected_secrets(envelope))
                if refusal is not None:
                    raise TransferFailed(Reason.PERMISSION_DENIED, refusal)
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

    def prepare(self, run: Run, dest: Destination) -> None:
        """Connect, apply createDirs and overwrite, remove earlier attempts' temps, open the temp."""
        envelope, transfer, source = run.envelope, run.transfer, run.source
        assert source is not None
        try:
            dest.target = self.ssh_target(envelope, dest.vm)
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
                    seen = sha256_of(sftp, dest.path, source.size, lambda: self.tick(run))
                    if seen == source.digest():
                        dest.unchanged = True
                        dest.finished_at = self.clock()
                        return
            if transfer.create_dirs and directory:
                ensure_dirs(sftp, directory)
            dest.fh = sftp.open(dest.temp, "wb", bufsize=WRITE_BUFFER)
            dest.fh.set_pipelined(True)
        except (OSError, paramiko.SSHException, EOFError, SSHError, TransferFailed) as exc:
            dest.failure = classify(exc, dest.vm, dest.path, writing=True)

    def stream(self, run: Run) -> str:
        source = run.source
        assert source is not None
        digest = hashlib.sha256()
        for chunk in source.chunks():
            digest.update(chunk)
            for dest in run.dests:
                if not dest.active:
                    continue
                assert dest.fh is not None
                try:
                    dest.fh.write(chunk)
                    dest.written += len(chunk)
                except (OSError, paramiko.SSHException, EOFError) as exc:
                    dest.failure = classify(exc, dest.vm, dest.path, writing=True)
                    self.flush(run)  # its temp goes and the controller hears of it now
            if not any(dest.active for dest in run.dests):
                break
            self.tick(run)  # and the deadline, checked per block
        return digest.hexdigest()

    def complete(self, run: Run, dest: Destination) -> None:
        """Close the temp, set its mode, verify, and rename it over the target."""
        transfer, source = run.transfer, run.source
        assert dest.sftp is not None and dest.fh is not None and source is not None
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
                seen = sha256_of(sftp, dest.temp, source.size, lambda: self.tick(run))
                if seen != run.digest:
                    raise TransferFailed(Reason.CHECKSUM_MISMATCH,
                                         f"{dest.path} on {dest.vm}: sha256 {seen} read back "
                                         f"differs from the source's {run.digest}")
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
            dest.done = True
            dest.finished_at = self.clock()
        except (OSError, paramiko.SSHException, EOFError, TransferFailed) as exc:
            dest.failure = classify(exc, dest.vm, dest.path, writing=True)

    def discard(self, dest: Destination) -> None:
        """Close and remove this attempt's temporary file, if any (over a fresh SFTP session
        when the watchdog closed the one it was written through)."""
        if dest.fh is not None:
            close_file(dest.fh)
            dest.fh = None
            dest.partial_removed = self._remove_temp(dest) or dest.partial_removed
        elif dest.sftp is not None:
            self._remove_temp(dest)

    def _remove_temp(self, dest: Destination) -> bool:
        if dest.sftp is None or not dest.temp:
            return False
        if _closed(dest.sftp):
            if dest.target is None:
                return False
            try:
                dest.sftp = self.pool.get(dest.target).sftp()
            except SSHError:
                return False
        return remove_quietly(dest.sftp, dest.temp)

    def _watchdog(self, run: Run) -> threading.Timer | None:
        """A timer that, at the deadline, closes the SFTP channels a stalled read or write
        may be blocked on (a source or destination that stopped answering): the blocked
        call then fails and the transfer ends with the deadline's reason."""
        deadline = run.deadline
        if deadline is None:
            return None

        def expire() -> None:
            run.expired.append(deadline.reason)  # before the cut: the failure it causes reads it
            if run.source is not None:
                run.source.abort()
            for dest in run.dests:
                # still copying, verifying or renaming (a finished one keeps its session)
                channel = dest.sftp.get_channel() if dest.sftp is not None else None
                if channel is not None and dest.active:
                    channel.close()

        timer = threading.Timer(max(deadline.at - self.clock(), 0.0), expire)
        timer.name = f"vmfleet-transfer-deadline-{run.envelope.name}"
        timer.daemon = True
        timer.start()
        return timer

    # ---------------------------------------------------------------- results

    def flush(self, run: Run, every: bool = False) -> None:
        """Report each destination that ended (failed now; with ``every``: all of them)."""
        for dest in run.unreported:
            if not every and dest.failure is None:
                continue
            if dest.failure is not None:
                if run.expired:  # the watchdog cut what it was blocked on: the deadline ended it
                    dest.failure = run.deadline_failure(run.expired[0])
                self.discard(dest)
            self._finish(run.envelope, run.worker, dest, self._result(run, dest))

    def _result(self, run: Run, dest: Destination) -> dict[str, Any]:
        source = run.source
        duration = (dest.finished_at or self.clock()) - run.started
        fields: dict[str, Any] = {
            "source": source.description if source else run.transfer.from_.describe(),
            "path": dest.path,
            "durationSeconds": round(duration, 3),
        }
        if dest.failure is None and source is not None:
            fields.update(bytes=source.size, totalBytes=source.size, sha256=run.digest,
                          bytesPerSecond=throughput(dest.written, duration),
                          verified=dest.verified or None, unchanged=dest.unchanged or None)
        else:
            fields.update(bytes=dest.written, totalBytes=source.size if source else None,
                          partialRemoved=dest.partial_removed or None)
        return fields

    @staticmethod
    def _phase(dest: Destination) -> str:
        if dest.failure is None:
            return Phase.SUCCEEDED
        return Phase.CANCELLED if dest.failure.reason == Reason.CANCELLED else Phase.FAILED

    def _finish(self, envelope: Envelope, worker: str, dest: Destination,
                transfer: dict[str, Any]) -> None:
        """Report the destination's outcome and end its heartbeats."""
        phase = self._phase(dest)
        if dest.failure is None:
            reason = Reason.COMPLETED
            message = ("unchanged: the destination already had the same content"
                       if dest.unchanged else None)
        else:
            reason, message = dest.failure.reason, dest.failure.message
            if dest.partial_removed and "partial file" not in message:
                message = (f"{message}; the partial file on {dest.vm} was removed ({dest.path} "
                           "was left as it was)")
        self._report(envelope, worker, Event.FINISHED, dest.vm, ResultFields(
            phase=phase, reason=reason, message=message, worker=worker,
            completion_time=now_rfc3339(), host=dest.target.host if dest.target else None,
            transfer={k: v for k, v in transfer.items() if v is not None} or None))
        dest.reported = True
        self.state.release(envelope.uid, dest.vm, dest.attempt, envelope.scope,
                           namespace=envelope.namespace)
        log.info("Finished transfer %s to %s attempt %s: %s (%s)", envelope.ref, dest.vm,
                 dest.attempt, phase, reason)

    def _report(self, envelope: Envelope, worker: str, event: Event, vm: str,
                fields: ResultFields) -> None:
        report = attempt_report(envelope, worker, event, fields, vm=vm, attempt=envelope.attempt)
        self.state.report(report.to_message(), envelope.scope)

    # ---------------------------------------------------------------- cleanup task

    def clean(self, envelope: Envelope) -> int:
        """Remove the temporary files attempts 1..``envelope.attempt`` left on one destination."""
        spec = RemoteCommandSpec.model_validate(envelope.spec)
        assert spec.transfer is not None
        loc = next((loc for loc in spec.transfer.to if loc.vm == envelope.vm), None)
        if loc is None:
            return 0
        try:
            target = self.ssh_target(envelope, envelope.vm)
        except TransferFailed as failed:
            log.warning("Could not remove the temporary files of transfer %s on %s: %s",
                        envelope.ref, envelope.vm, failed.message)
            return 0
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
