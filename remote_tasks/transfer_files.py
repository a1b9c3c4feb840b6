"""File transfers, the file side: temporary names, SFTP reads and writes, named errors.

Pure helpers and small SFTP pieces that ``remote_tasks.transfer`` builds a copy from:
where a destination's temporary file lives (``temp_path``: derived from the command's
uid, the VM and the attempt, so a later attempt or the cleanup task finds what a lost
attempt left), how an SFTP or SSH error becomes a named reason (``classify``), and
bounded reads (``read_windows``: one prefetch window at a time).
"""

from __future__ import annotations

import errno
import hashlib
import posixpath
import stat
from collections.abc import Callable, Iterator

import paramiko

from vmfleet.api.constants import Reason

from .sshtarget import SSHError

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
TEMP_MARK = ".vmfleet-"


class TransferFailed(Exception):
    """A destination (or the whole transfer) failed, for a named reason."""

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


def closed(sftp: paramiko.SFTPClient) -> bool:
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


__all__ = ["Aborted", "READ_BLOCK", "TEMP_MARK", "TransferFailed", "WINDOW", "classify", "closed",
           "ensure_dirs", "parse_mode", "read_windows", "remove_quietly", "sha256_of",
           "temp_path", "temp_tag", "throughput"]
