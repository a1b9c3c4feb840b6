"""File transfers, the destination side: one delivery's run and each destination's file.

Per destination: write to a temporary name beside the target (``temp_path``), set the
mode, optionally re-read it, then rename it over the target (``posix-rename@openssh.com``;
plain ``rename``, which never replaces, for ``overwrite: Never``). Readers see the old
file or the whole new one; a failed or cancelled attempt removes its temporary file
(``discard``, over a fresh SFTP session when the deadline's watchdog closed the one it
was written through). ``prepare``, ``complete`` and ``discard`` record what happened on
the :class:`Destination`; the executor (``remote_tasks.transfer``) reports it.
"""

from __future__ import annotations

import logging
import posixpath
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import paramiko

from vmfleet.api.constants import Reason
from vmfleet.api.envelope import Envelope
from vmfleet.api.plan import Plan, Transfer

from .attempt import Attempt
from .session import Deadline
from .ssh import ConnectionPool
from .sshtarget import SSHError, SSHTarget
from .transfer_files import (
    WRITE_BUFFER,
    TransferFailed,
    classify,
    close_file,
    closed,
    ensure_dirs,
    parse_mode,
    remove_quietly,
    sha256_of,
    temp_path,
)
from .transfer_sources import Source

log = logging.getLogger("remote_tasks.transfer")

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



def deadline_message(plan: Plan, reason: str) -> str:
    if reason == Reason.TIMEOUT:
        return f"the transfer did not finish within timeoutSeconds ({plan.timeout_seconds}s)"
    return f"activeDeadlineSeconds ({plan.active_deadline_seconds}s) passed"


@dataclass
class Run:
    """One delivery's transfer: what it claimed (``attempt``), its destinations, its
    source once open, and when it next reports progress."""

    envelope: Envelope
    worker: str
    plan: Plan
    transfer: Transfer
    dests: list[Destination]
    attempt: Attempt  # registered with the executor's Cancels: a published cancel marks it
    clock: Callable[[], float]  # the executor's monotonic clock
    started: float
    next_progress: float
    source: Source | None = None
    digest: str = ""
    deadline: Deadline | None = None  # timeoutSeconds / activeDeadlineSeconds, if any
    expired: list[str] = field(default_factory=list)  # the watchdog's reason, once it fired

    def deadline_failure(self, reason: str) -> TransferFailed:
        return TransferFailed(reason, deadline_message(self.plan, reason))

    @property
    def unreported(self) -> list[Destination]:
        return [dest for dest in self.dests if not dest.reported]


def prepare(pool: ConnectionPool, run: Run, dest: Destination,
            tick: Callable[[], None]) -> None:
    """Connect, apply createDirs and overwrite, remove earlier attempts' temps, open the
    temp (``dest.target`` is set by the caller). A failure is recorded on ``dest``."""
    envelope, transfer, source = run.envelope, run.transfer, run.source
    assert source is not None and dest.target is not None
    try:
        try:
            dest.sftp = pool.get(dest.target).sftp()
        except SSHError:
            pool.discard(dest.target)
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
                seen = sha256_of(sftp, dest.path, source.size, tick)
                if seen == source.digest():
                    dest.unchanged = True
                    dest.finished_at = run.clock()
                    return
        if transfer.create_dirs and directory:
            ensure_dirs(sftp, directory)
        dest.fh = sftp.open(dest.temp, "wb", bufsize=WRITE_BUFFER)
        dest.fh.set_pipelined(True)
    except (OSError, paramiko.SSHException, EOFError, SSHError, TransferFailed) as exc:
        dest.failure = classify(exc, dest.vm, dest.path, writing=True)


def complete(run: Run, dest: Destination, tick: Callable[[], None]) -> None:
    """Close the temp, set its mode, verify, and rename it over the target. A failure is
    recorded on ``dest``."""
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
            seen = sha256_of(sftp, dest.temp, source.size, tick)
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
        dest.finished_at = run.clock()
    except (OSError, paramiko.SSHException, EOFError, TransferFailed) as exc:
        dest.failure = classify(exc, dest.vm, dest.path, writing=True)


def discard(pool: ConnectionPool, dest: Destination) -> None:
    """Close and remove this attempt's temporary file, if any (over a fresh SFTP session
    when the watchdog closed the one it was written through)."""
    if dest.fh is not None:
        close_file(dest.fh)
        dest.fh = None
        dest.partial_removed = _remove_temp(pool, dest) or dest.partial_removed
    elif dest.sftp is not None:
        _remove_temp(pool, dest)


def _remove_temp(pool: ConnectionPool, dest: Destination) -> bool:
    if dest.sftp is None or not dest.temp:
        return False
    if closed(dest.sftp):
        if dest.target is None:
            return False
        try:
            dest.sftp = pool.get(dest.target).sftp()
        except SSHError:
            return False
    return remove_quietly(dest.sftp, dest.temp)


def watchdog(run: Run) -> threading.Timer | None:
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

    timer = threading.Timer(max(deadline.at - run.clock(), 0.0), expire)
    timer.name = f"vmfleet-transfer-deadline-{run.envelope.name}"
    timer.daemon = True
    timer.start()
    return timer


__all__ = ["Destination", "Run", "complete", "deadline_message", "discard", "prepare", "watchdog"]
