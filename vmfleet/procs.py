"""Process helpers: the controller's ``Process`` worker runtime, the local environment
(``vmfleet.dev``) and the tests use the same ones.

Every process started here is a ``ManagedProcess``: its own process group, output to a
log file, stopped with TERM then KILL. ``write_pid_file``/``stop_pid_file`` let another
process stop it later (``vmfleet dev down``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class WaitTimeout(TimeoutError):
    """``wait_until`` gave up; ``last_error`` is the last exception the predicate raised
    (also the exception's ``__cause__``, so its traceback is printed with this one)."""

    def __init__(self, message: str, last_error: BaseException | None) -> None:
        super().__init__(message)
        self.last_error = last_error


def wait_until(
    predicate: Callable[[], T | None | bool],
    timeout: float,
    interval: float = 0.1,
    what: str = "condition",
) -> T:
    """Poll ``predicate`` until it returns something truthy, or raise :class:`WaitTimeout`
    (a ``TimeoutError``) carrying the last exception the predicate raised, if any."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value  # type: ignore[return-value]
        except Exception as exc:  # noqa: BLE001 - carried by the timeout
            last_error = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise WaitTimeout(f"Timed out after {timeout:.0f}s waiting for {what}{detail}",
                              last_error) from last_error
        time.sleep(interval)


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class ManagedProcess:
    """A background server process with its own process group and a log file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        try:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
        finally:
            log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} was not started"
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check_running(self) -> None:
        """Raise with the tail of the log if the process has exited."""
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with code {self.proc.returncode}; "
                f"last log lines:\n{self.log_tail()}"
            )

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def signal(self, sig: int) -> None:
        if self.running():
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self, grace: float = 10.0) -> None:
        """TERM the process group, then KILL it after ``grace`` seconds."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.proc.wait(5)
        # Children left in the group (e.g. sshd session processes) go too.
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _proc_start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot), or None if it is gone or a
    zombie. With the PID, it names one process even if the PID is reused later."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2 :].split()  # fields from 3 (state) on
    if fields[0] == b"Z":
        return None
    return fields[19].decode()  # field 22: starttime


def write_pid_file(process: ManagedProcess, pid_file: Path) -> None:
    """Record a started process (its group leader's PID and start time) so that another
    process — e.g. ``vmfleet dev down`` — can stop it with ``stop_pid_file``."""
    pid_file.write_text(f"{process.pid}\n{_proc_start_time(process.pid) or ''}\n")


def read_pid_file(pid_file: Path) -> tuple[int, str] | None:
    """The (PID, start time) a ``write_pid_file`` recorded, or None."""
    try:
        pid_text, start_time = pid_file.read_text().splitlines()[:2]
        return int(pid_text), start_time
    except (OSError, ValueError):
        return None


def stop_pid_file(pid_file: Path, grace: float = 10.0) -> bool:
    """Stop the process group recorded by ``write_pid_file``: TERM, then KILL after
    ``grace`` seconds. Returns False if it was not running. A PID that now belongs to
    another process (reused) is left alone. The file is removed."""
    recorded = read_pid_file(pid_file)
    was_running = stop_recorded(*recorded, grace=grace) if recorded else False
    pid_file.unlink(missing_ok=True)
    return was_running


def stop_recorded(pid: int, start_time: str, grace: float = 10.0) -> bool:
    """Stop the process group of ``pid`` if it is still the process that started at
    ``start_time``: TERM, then KILL after ``grace`` seconds. False if it was not running."""

    def alive() -> bool:
        return bool(start_time) and _proc_start_time(pid) == start_time

    was_running = alive()
    if was_running:
        try:
            os.killpg(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            wait_until(lambda: not alive(), grace, interval=0.05, what=f"pid {pid} to exit")
        except TimeoutError:
            pass
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return was_running
