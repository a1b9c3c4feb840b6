"""One command on one channel of a VM's connection: the wrapper's report and the gate,
sudo's dialogue, the output read (within the read budget) and the end, by the command's
exit or by the attempt's deadline, ``tick`` or ``AttemptControl``.
"""

from __future__ import annotations

import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import paramiko

from .become import Become, Step, SudoDialogue
from .output import ReadBudget, StreamTail
from .shell import GO, parse_marker
from .sshtarget import NotStarted, SSHTarget, TransportError


def wait_readable(chan: paramiko.Channel, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for ``chan`` to have something to read; True if it
    has. ``poll()``, not ``select()``: a pool worker holds hundreds of connections and a
    pipe per open channel, and ``select()`` refuses any descriptor past 1,023 (the task
    failed with "filedescriptor out of range in select()" at 200 VMs)."""
    poller = select.poll()
    poller.register(chan, select.POLLIN)
    return bool(poller.poll(max(0, int(timeout * 1000))))


class Connection(Protocol):
    """What a session needs of the connection it runs on (``ssh.Connection``): its target,
    its transport, whether that transport turned out dead, and killing a process group."""

    target: SSHTarget
    transport: paramiko.Transport | None

    def settles_dead(self, within: float = 1.0) -> bool: ...

    def terminate(self, pgid: int | None, grace: float = ..., nonce: str | None = None,
                  become: Become | None = None) -> None: ...

READ_CHUNK = 64 * 1024
# Held back by the read rate, a channel is read again once this much may be read: a few
# wakeups a second for a loud command, each taking a few chunks.
READ_QUANTUM = 4 * READ_CHUNK
TICK_SECONDS = 0.5
DEFAULT_KILL_GRACE = 3.0
# Where ``ssh.SignalTransport`` keeps the signal that ended a channel's command.
EXIT_SIGNAL_KEY = "vmfleet_exit_signal"


def exit_signal(chan: paramiko.Channel) -> str | None:
    """The name of the signal that ended the channel's command (``KILL``), if one did."""
    name = chan.__dict__.get(EXIT_SIGNAL_KEY)
    return name if isinstance(name, str) else None


class OutputSink(Protocol):
    """Where a command's output goes as it is read, besides the status tails."""

    def stdout(self, data: bytes) -> None: ...

    def stderr(self, data: bytes) -> None: ...


class AttemptControl:
    """A handle on one running attempt that any thread may end at once (``terminate``).

    ``Connection.run`` attaches the attempt once its wrapper reported the process group;
    ``terminate(reason)`` then sends TERM to the group and to every process carrying the
    attempt's marker from the calling thread, over a new channel of the same connection,
    while ``run`` keeps reading the command's own channel. Called before the attempt
    started, it makes ``run`` close the channel at the gate (the command never starts).
    Whoever ends the attempt first (this, the deadline or ``tick``) does the kill, once.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reason: str | None = None
        self._killed = False
        self._conn: Connection | None = None
        self._pgid: int | None = None
        self._nonce: str | None = None
        self._become: Become | None = None
        self._grace = DEFAULT_KILL_GRACE

    def attach(self, conn: Connection, pgid: int, nonce: str, become: Become | None,
               grace: float) -> None:
        with self._lock:
            self._conn, self._pgid, self._nonce, self._become = conn, pgid, nonce, become
            self._grace = grace

    def _claim_kill(self, reason: str) -> bool:
        """Record ``reason`` (the first one wins); True for the one caller that kills."""
        with self._lock:
            if self.reason is None:
                self.reason = reason
            if self._killed or self._pgid is None:
                return False
            self._killed = True
            return True

    def terminate(self, reason: str) -> bool:
        """End the attempt now (TERM, grace, KILL), from any thread. False when it had not
        started (``run`` then never starts it) or another caller is already ending it."""
        if not self._claim_kill(reason):
            return False
        assert self._conn is not None and self._pgid is not None
        self._conn.terminate(self._pgid, self._grace, self._nonce, self._become)
        return True


@dataclass(frozen=True)
class Deadline:
    """When an attempt must end, and the reason it then ends with."""

    at: float  # time.monotonic()
    reason: str

    def expired(self, now: float) -> str | None:
        return self.reason if now >= self.at else None

    @classmethod
    def earliest(cls, *deadlines: Deadline | None) -> Deadline | None:
        present = [d for d in deadlines if d is not None]
        return min(present, key=lambda d: d.at) if present else None


@dataclass
class ExecResult:
    exit_code: int | None
    stdout: StreamTail
    stderr: StreamTail
    started: float
    finished: float
    pgid: int | None = None
    ended_by: str | None = None  # the reason the attempt was terminated, if it was
    signal: str | None = None  # the signal that ended the command (exit-signal), e.g. KILL
    become_failed: str | None = None  # sudo did not let the action run: why
    host_key: str | None = None  # fingerprint of the key the VM showed (SHA256:...)


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip()[:500] if lines else ""


def shutdown_write(chan: paramiko.Channel) -> None:
    """Send EOF on ``chan`` unless it is already closed.

    ``Channel.shutdown_write`` checks nothing: an EOF sent after the server closed the
    channel makes OpenSSH drop the whole connection, every channel on it. The check here
    narrows that race to the moment between it and the send (paramiko sends outside the
    channel's lock); the wrapped commands without stdin need no EOF at all.
    """
    with chan.lock:
        if chan.closed or chan.eof_sent or chan.transport is None:
            return
        message = chan._send_eof()  # type: ignore[attr-defined]
    if message is not None:
        chan.transport._send_user_message(message)  # type: ignore[attr-defined]


def _feed_stdin(chan: paramiko.Channel, data: bytes) -> None:
    try:
        chan.sendall(data)
        shutdown_write(chan)
    except (OSError, EOFError, paramiko.SSHException):
        pass  # the command exited before reading all of stdin


class Session:
    """One command on one channel, driven by ``Connection.run``: the wrapper's report of
    its process group and the gate, sudo's dialogue, the output, and the end (the
    command's exit, or the attempt ended once by its deadline, ``tick`` or ``control``)."""

    def __init__(self, conn: Connection, chan: paramiko.Channel, stdin: bytes | None,
                 out: StreamTail, err: StreamTail, *, nonce: str | None,
                 deadline: Deadline | None, gate: Callable[[int | None, str], bool] | None,
                 tick: Callable[[], str | None] | None, kill_grace: float,
                 become: Become | None, control: AttemptControl | None,
                 read_rate: float | Callable[[], float] = 0) -> None:
        self.conn, self.chan, self.stdin, self.out, self.err = conn, chan, stdin, out, err
        self.nonce, self.deadline, self.gate, self.tick = nonce, deadline, gate, tick
        self.kill_grace, self.become, self.control = kill_grace, become, control
        self.pgid: int | None = None
        self.head: bytearray | None = bytearray() if nonce is not None else None
        self.gated = nonce is not None  # the gate is still to be called
        self.refused = False
        self.ended_by: str | None = None
        self.give_up_at: float | None = None
        self.next_tick = time.monotonic() + TICK_SECONDS
        self.dialogue = (SudoDialogue(nonce, become.password is not None)
                         if become is not None and nonce is not None else None)
        self.become_failed: str | None = None
        self.budget = ReadBudget(read_rate)

    @property
    def host(self) -> str:
        return self.conn.target.host

    def drive(self, line: str) -> None:
        """Run ``line`` and read until the channel is done; NotStarted if the gate refused."""
        self.chan.exec_command(line)
        if not self.gated:
            self.start()
        while not self.refused and self.read() and self.enforce(time.monotonic()):
            pass
        if self.refused:
            raise NotStarted(f"the command on {self.host} was not started (gate refused)")
        dialogue = self.dialogue
        if dialogue is not None and not dialogue.ready and self.become_failed is None \
                and self.ended_by is None:
            self.err.feed(dialogue.flush())
            self.become_failed = ("sudo did not run the action as "
                                  f"{self.become.user if self.become else '?'}: "
                                  f"{_last_line(self.err.text()) or 'it exited before the action ran'}")

    def outcome(self) -> tuple[int, str | None]:
        """The exit status (-1: none) and the signal that ended the command, if any."""
        killed_by = exit_signal(self.chan)
        # paramiko's exit_status stays -1 until an exit-status message arrives (and
        # exit_status_ready() is also true once the channel merely closed).
        reported = self.chan.exit_status >= 0 or killed_by is not None
        if not reported and self.ended_by is None and self.conn.settles_dead():
            # The connection died (e.g. sshd restarted) before the command reported an
            # exit status: a transport error, retried within the spec's limit.
            raise TransportError(f"connection to {self.host} broke before the command exited",
                                 pgid=self.pgid, nonce=self.nonce)
        return self.chan.exit_status, killed_by

    def close(self) -> None:
        if self.head:
            self.out.feed(bytes(self.head))
        if self.dialogue is not None:
            self.err.feed(self.dialogue.flush())
        self.out.close()
        self.err.close()
        self.chan.close()

    # -- reading -----------------------------------------------------------------

    def read(self) -> bool:
        """Take what arrived (waiting up to a tick); False once the channel is done."""
        chan = self.chan
        budget = self.budget
        self.hold_back()
        if chan.eof_received and not chan.recv_ready() and not chan.recv_stderr_ready():
            # Once the VM sent EOF paramiko keeps the channel readable for good: waiting
            # for it would return at once, again and again, until the exit status comes (sshd
            # sends it after reaping the command), a busy loop of the worker's CPU.
            chan.status_event.wait(TICK_SECONDS)
        else:
            wait_readable(chan, TICK_SECONDS)
        # Each read lets the VM send more (paramiko adjusts the window), so a loud channel
        # is never drained: reading stops once the budget is spent.
        while chan.recv_ready() and budget.available():
            self.feed_stdout(self.counted(chan.recv(READ_CHUNK)))
        while chan.recv_stderr_ready() and budget.available():
            self.feed_stderr(self.counted(chan.recv_stderr(READ_CHUNK)))
        if self.become_failed is not None:
            return False
        drained = not chan.recv_ready() and not chan.recv_stderr_ready()
        if ((chan.exit_status_ready() and chan.eof_received) or chan.closed) and drained:
            return False
        assert self.conn.transport is not None
        if not self.conn.transport.is_active():
            raise TransportError(f"connection to {self.host} broke during the command",
                                 pgid=self.pgid, nonce=self.nonce)
        return True

    def counted(self, data: bytes) -> bytes:
        self.budget.spend(len(data))
        return data

    def hold_back(self) -> None:
        """Once the read budget is spent (``ReadBudget``: the read rate, past a burst),
        wait until a quantum may be read again (at most a tick): meanwhile the channel's
        window fills and the remote command waits on its output."""
        wait = self.budget.delay(READ_QUANTUM)
        if wait > 0:
            time.sleep(min(wait, TICK_SECONDS))

    def feed_stdout(self, data: bytes) -> None:
        if self.head is None:
            self.out.feed(data)
            return
        self.head += data
        newline = self.head.find(b"\n")
        if newline < 0 and len(self.head) < 256:
            return
        first, rest = bytes(self.head[: newline + 1]), bytes(self.head[newline + 1 :])
        self.head = None
        assert self.nonce is not None
        self.pgid = parse_marker(first, self.nonce) if newline >= 0 else None
        if self.pgid is None:
            self.out.feed(first)  # not our marker: keep every byte
        self.out.feed(rest)
        self.open_gate()

    def feed_stderr(self, data: bytes) -> None:
        if self.dialogue is None:
            self.err.feed(data)
            return
        data, steps = self.dialogue.feed(data)
        self.err.feed(data)
        for step in steps:
            if step is Step.SEND_PASSWORD:
                assert self.become is not None
                self.chan.sendall(self.become.password_line())
            elif step is Step.READY:
                self.start()
            elif step is Step.FAILED:
                self.become_failed = self.dialogue.failure
                self.chan.close()  # sudo reads EOF and exits: nothing ran

    # -- starting ----------------------------------------------------------------

    def open_gate(self) -> None:
        assert self.nonce is not None
        self.gated = False
        control = self.control
        if (self.gate is not None and not self.gate(self.pgid, self.nonce)) or (
                control is not None and control.reason is not None):
            self.refused = True
            self.chan.close()
            return
        if control is not None and self.pgid is not None:
            control.attach(self.conn, self.pgid, self.nonce, self.become, self.kill_grace)
        self.chan.sendall(GO)
        self.start()

    def start(self) -> None:
        if self.dialogue is not None and not self.dialogue.ready:
            return  # stdin waits until sudo let the action run
        if self.stdin:
            threading.Thread(target=_feed_stdin, args=(self.chan, self.stdin), daemon=True).start()
        elif self.nonce is None:
            shutdown_write(self.chan)
        # A wrapped command without stdin reads /dev/null (shell.wrap): no EOF is sent,
        # which could otherwise race with the server closing the channel of a command
        # that ended at once.

    # -- ending ------------------------------------------------------------------

    def enforce(self, now: float) -> bool:
        """End the attempt once its deadline, ``tick`` or ``control`` says so; False once
        a killed command outlived its grace (the channel is closed: stop reading)."""
        if self.ended_by is not None:
            if self.give_up_at is not None and now > self.give_up_at:
                self.chan.close()
                return False
            return True
        reason = self.deadline.expired(now) if self.deadline is not None else None
        if reason is None and self.tick is not None and now >= self.next_tick:
            self.next_tick = now + TICK_SECONDS
            reason = self.tick()
        if reason is None and self.control is not None:
            reason = self.control.reason
        if reason is not None:
            self.end(reason, now)
        return True

    def end(self, reason: str, now: float) -> None:
        self.ended_by = reason
        self.give_up_at = now + self.kill_grace + 10
        if self.control is not None:
            # the kill happens once: here, or it was done by another thread
            self.control.terminate(reason)
            self.ended_by = self.control.reason or reason
            if self.pgid is None:
                self.chan.close()
        elif self.pgid is not None:
            self.conn.terminate(self.pgid, self.kill_grace, self.nonce, self.become)
        else:
            self.chan.close()
