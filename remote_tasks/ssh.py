"""The SSH layer: one authenticated connection per VM per worker process, a channel per command.

There is no per-host lock around commands: paramiko multiplexes channels over one
transport, so commands on one VM run side by side (the VM's ``maxConcurrentCommands`` is
the worker's concurrency). Host keys are always verified against the pinned keys; a key
that does not match is refused and never added anywhere.
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import paramiko

from vmfleet import metrics

from .become import Become, Step, SudoDialogue
from .output import ReadBudget, StreamTail
from .shell import GO, parse_marker, terminate_line

log = logging.getLogger(__name__)

KEEPALIVE_SECONDS = 30
READ_CHUNK = 64 * 1024
# Held back by the read rate, a channel is read again once this much may be read: a few
# wakeups a second for a loud command, each taking a few chunks.
READ_QUANTUM = 4 * READ_CHUNK
TICK_SECONDS = 0.5
DEFAULT_KILL_GRACE = 3.0
SFTP_WINDOW = 8 * 1024 * 1024


class SSHError(Exception):
    """Base of the errors that end an attempt before or while the command runs."""

    reason = "TransportError"


class TransportError(SSHError):
    reason = "TransportError"

    def __init__(self, message: str, pgid: int | None = None, nonce: str | None = None) -> None:
        super().__init__(message)
        self.pgid = pgid  # the remote process group, if the command had started
        self.nonce = nonce


class NotStarted(Exception):
    """The gate refused: the wrapper was told nothing and exited without running the command."""


class ChannelOpenFailed(TransportError):
    """No channel could be opened: the command never started, so trying again is safe."""


class AuthFailed(SSHError):
    reason = "AuthFailed"


class HostKeyMismatch(SSHError):
    reason = "HostKeyMismatch"


class CredentialsInvalid(SSHError):
    reason = "CredentialsInvalid"


class SignalTransport(paramiko.Transport):
    """A paramiko Transport that keeps the ``exit-signal`` request (RFC 4254 6.10).

    paramiko handles ``exit-status`` and drops ``exit-signal`` ("Unhandled channel
    request"), so a command killed by a signal looked like one without an exit status.
    Here the signal's name (``KILL``, ``TERM``, ...) is kept on the channel
    (``exit_signal(chan)``) and the channel's status event is set, as for an exit status.
    """

    _channel_handler_table = dict(paramiko.Transport._channel_handler_table)  # type: ignore[attr-defined]

    @staticmethod
    def _handle_channel_request(chan: paramiko.Channel, m: paramiko.Message) -> None:
        start = m.packet.tell()
        if m.get_text() != "exit-signal":
            m.packet.seek(start)
            paramiko.Channel._handle_request(chan, m)  # type: ignore[attr-defined]
            return
        m.get_boolean()  # want_reply: always false for exit-signal
        name = m.get_text()
        m.get_boolean()  # core dumped
        chan.__dict__[_EXIT_SIGNAL] = name
        chan.status_event.set()


SignalTransport._channel_handler_table[paramiko.common.MSG_CHANNEL_REQUEST] = (
    SignalTransport._handle_channel_request)
_EXIT_SIGNAL = "vmfleet_exit_signal"


def exit_signal(chan: paramiko.Channel) -> str | None:
    """The name of the signal that ended the channel's command (``KILL``), if one did."""
    name = chan.__dict__.get(_EXIT_SIGNAL)
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


# An OpenSSH host key type and the key types paramiko may negotiate to get it.
_NEGOTIATED_TYPES = {
    "ssh-rsa": ("rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"),
}


def fingerprint(key: paramiko.PKey) -> str:
    """``SHA256:...`` as ``ssh-keygen -l`` prints it."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


@dataclass(frozen=True)
class PinnedKey:
    key_type: str
    blob: bytes

    @classmethod
    def parse(cls, line: str) -> PinnedKey:
        """Parse an OpenSSH public key line (``type base64 [comment]``, or known_hosts style)."""
        fields = line.split()
        # known_hosts lines start with the host pattern(s); skip to the key type.
        while fields and not (fields[0].startswith(("ssh-", "ecdsa-", "sk-"))):
            fields = fields[1:]
        if len(fields) < 2:
            raise CredentialsInvalid(f"host key {line[:40]!r}... is not an OpenSSH public key line")
        try:
            blob = base64.b64decode(fields[1], validate=True)
        except ValueError as exc:
            raise CredentialsInvalid(f"host key of type {fields[0]} is not valid base64") from exc
        return cls(fields[0], blob)


@dataclass(frozen=True)
class SSHTarget:
    """Everything needed to reach one VM. ``key`` identifies a pooled connection."""

    host: str
    port: int
    user: str
    private_key: str = field(repr=False)
    host_keys: tuple[str, ...]
    passphrase: str | None = field(default=None, repr=False)
    connect_timeout: float = 30.0
    # TrustOnFirstUse with no key recorded yet: accept the key the VM offers (the caller
    # records it in status.hostKey; once recorded it is pinned like any other).
    trust_on_first_use: bool = False
    # proxyJump: reach this VM through a direct-tcpip channel of the bastion's connection.
    jump: SSHTarget | None = None
    # spec.allowBecome of the RemoteVM, and its sudo password (become-password), if any.
    allow_become: bool = False
    become_password: str | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"


def load_private_key(text: str, passphrase: str | None) -> paramiko.PKey:
    """Load an OpenSSH or PEM private key of any type paramiko supports."""
    errors = []
    for key_class in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
        try:
            return key_class.from_private_key(io.StringIO(text), password=passphrase)
        except paramiko.PasswordRequiredException as exc:
            raise CredentialsInvalid(
                "the private key is encrypted: add its passphrase to the Secret (key 'passphrase')"
            ) from exc
        except (paramiko.SSHException, ValueError) as exc:
            errors.append(f"{key_class.__name__}: {exc}")
    raise CredentialsInvalid(
        "ssh-privatekey is not a private key paramiko can read (or the passphrase is wrong)"
    )


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


class Connection:
    """One authenticated SSH transport to one VM."""

    def __init__(self, target: SSHTarget, pool: ConnectionPool | None = None) -> None:
        self.target = target
        self.pool = pool  # where a bastion's connection comes from (proxyJump)
        self.transport: paramiko.Transport | None = None
        self.server_key: paramiko.PKey | None = None

    def _socket(self) -> socket.socket | paramiko.Channel:
        """A TCP connection to the VM, or a direct-tcpip channel through its bastion."""
        target = self.target
        if target.jump is None:
            try:
                sock = socket.create_connection((target.host, target.port),
                                                timeout=target.connect_timeout)
            except OSError as exc:
                raise TransportError(f"cannot connect to {target.host}:{target.port}: {exc}") from exc
            # SSH sends small packets and waits for replies (channel open, exec, the go):
            # with Nagle's algorithm each waits for the peer's delayed ACK, ~40 ms. OpenSSH
            # sets this too.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        # The bastion's own host key is verified when its pooled connection opens.
        bastion = (self.pool or ConnectionPool()).get(target.jump)
        assert bastion.transport is not None
        try:
            return bastion.transport.open_channel(
                "direct-tcpip", (target.host, target.port), ("127.0.0.1", 0),
                timeout=target.connect_timeout,
            )
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise TransportError(
                f"bastion {target.jump.address} cannot reach {target.host}:{target.port}: {exc}"
            ) from exc

    def open(self) -> Connection:
        target = self.target
        pinned = [PinnedKey.parse(line) for line in target.host_keys]
        if not pinned and not target.trust_on_first_use:
            raise HostKeyMismatch("no host keys are pinned for this VM: refusing to connect")
        pkey = load_private_key(target.private_key, target.passphrase)
        sock = self._socket()
        transport = SignalTransport(sock)
        try:
            options = transport.get_security_options()
            wanted: list[str] = []
            for key in pinned:
                for name in _NEGOTIATED_TYPES.get(key.key_type, (key.key_type,)):
                    if name in options.key_types and name not in wanted:
                        wanted.append(name)
            if wanted:
                options.key_types = tuple(wanted)
            transport.start_client(timeout=target.connect_timeout)
            server_key = transport.get_remote_server_key()
            if pinned and not any(
                key.blob == server_key.asbytes() for key in pinned
            ):
                raise HostKeyMismatch(
                    f"host key {server_key.get_name()} {fingerprint(server_key)} of "
                    f"{target.host}:{target.port} does not match the pinned keys; not connecting"
                )
            self.server_key = server_key
            try:
                transport.auth_publickey(target.user, pkey)
            except paramiko.AuthenticationException as exc:
                raise AuthFailed(
                    f"{target.user}@{target.host} refused the key from the credentials Secret: {exc}"
                ) from exc
            transport.set_keepalive(KEEPALIVE_SECONDS)
        except SSHError:
            transport.close()
            raise
        except (paramiko.SSHException, OSError, EOFError) as exc:
            transport.close()
            raise TransportError(f"SSH handshake with {target.host}:{target.port} failed: {exc}") from exc
        self.transport = transport
        return self

    @property
    def active(self) -> bool:
        return self.transport is not None and self.transport.is_active()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def sftp(self, window_size: int = SFTP_WINDOW) -> paramiko.SFTPClient:
        """An SFTP session on a new channel of this pooled connection; the caller closes it.

        No shell is involved: paths sent over SFTP are data. The larger channel window lets
        pipelined reads and writes keep the link busy (memory stays bounded by the window).
        """
        assert self.transport is not None
        try:
            client = paramiko.SFTPClient.from_transport(self.transport, window_size=window_size)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise ChannelOpenFailed(f"cannot open an SFTP session to {self.target.host}: {exc}") from exc
        if client is None:
            raise ChannelOpenFailed(f"cannot open an SFTP session to {self.target.host}")
        return client

    def run(
        self,
        line: str,
        stdin: bytes | None,
        max_bytes: int,
        on_stdout: Callable[[str], None] | None = None,
        on_stderr: Callable[[str], None] | None = None,
        *,
        nonce: str | None = None,
        deadline: Deadline | None = None,
        gate: Callable[[int | None, str], bool] | None = None,
        tick: Callable[[], str | None] | None = None,
        kill_grace: float = DEFAULT_KILL_GRACE,
        become: Become | None = None,
        control: AttemptControl | None = None,
        output: OutputSink | None = None,
        read_rate: float | Callable[[], float] = 0,
    ) -> ExecResult:
        """Run ``line`` on a new channel and collect its output until it exits.

        With ``nonce`` the line is expected to come from ``shell.wrap``: its first stdout
        line reports the remote process group (not kept as output) and the wrapper waits
        for a go. ``gate(pgid, nonce)`` is called once, then: True sends the go (then
        ``stdin``), False closes the channel and raises ``NotStarted``. If the channel ends
        before the wrapper reported (the login shell failed, say), the gate is never
        called. The attempt is ended (process group terminated: TERM,
        grace, KILL) when ``deadline`` passes or when ``tick`` (called about twice a second)
        returns a reason, or at once when another thread calls ``control.terminate``.

        With ``become`` (the line from ``shell.sudo_line``), sudo speaks first on stderr: the
        password is sent at its prompt (``SudoDialogue``), and stdin only once the action
        reported that it runs; a refused or missing password ends the attempt at once
        (``ExecResult.become_failed``). A command killed by a signal has ``signal`` set.
        ``output`` gets every byte of each stream as it is read (the output store).
        ``read_rate`` (bytes/s, 0: none; or a function giving it now): past a burst of a
        second's worth (``ReadBudget``), the command's output is read no faster than
        this; SSH flow control then holds a command that keeps printing faster back, so
        that it cannot take the worker from the other commands it runs.
        """
        assert self.transport is not None
        out = StreamTail(max_bytes, on_stdout, output.stdout if output is not None else None)
        err = StreamTail(max_bytes, on_stderr, output.stderr if output is not None else None)
        try:
            chan = self.transport.open_session(timeout=self.target.connect_timeout)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise ChannelOpenFailed(f"cannot open a channel to {self.target.host}: {exc}") from exc
        started = time.time()
        session = _Session(self, chan, stdin, out, err, nonce=nonce, deadline=deadline, gate=gate,
                           tick=tick, kill_grace=kill_grace, become=become, control=control,
                           read_rate=read_rate)
        try:
            session.drive(line)
            status, killed_by = session.outcome()
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise TransportError(
                f"connection to {self.target.host} broke: {exc}", pgid=session.pgid, nonce=nonce
            ) from exc
        finally:
            session.close()
        return ExecResult(
            exit_code=status if status >= 0 else None,
            stdout=out,
            stderr=err,
            started=started,
            finished=time.time(),
            host_key=fingerprint(self.server_key) if self.server_key is not None else None,
            pgid=session.pgid,
            ended_by=session.ended_by,
            signal=killed_by,
            become_failed=session.become_failed,
        )

    def _settles_dead(self, within: float = 1.0) -> bool:
        """Whether the transport turns out dead. paramiko closes a dead transport's
        channels before it marks the transport inactive, so a channel that closed without
        an exit status waits a moment: a dead connection (sshd gone) is a transport error,
        a live one means the command was killed by a signal."""
        assert self.transport is not None
        deadline = time.monotonic() + within
        while self.transport.is_active() and time.monotonic() < deadline:
            time.sleep(0.05)
        return not self.transport.is_active()

    def terminate(self, pgid: int | None, grace: float = DEFAULT_KILL_GRACE,
                  nonce: str | None = None, become: Become | None = None) -> None:
        """End an attempt: TERM, up to ``grace`` seconds, then KILL, sent to its process
        group (only if its leader still carries the ``nonce``, when one is given) and to
        every process of the remote user whose environment carries the attempt's marker.

        Thread-safe: a new channel of this connection, usable while the command's own
        channel is open. With ``become`` it runs as that user through sudo (the password,
        if any, on stdin)."""
        assert self.transport is not None
        chan = self.transport.open_session(timeout=self.target.connect_timeout)
        try:
            chan.settimeout(grace + 15)
            chan.exec_command(terminate_line(pgid, grace, nonce,
                                             as_user=become.user if become else None))
            if become is not None and become.password is not None:
                chan.sendall(become.password_line())
            shutdown_write(chan)
            chan.recv_exit_status()
        finally:
            chan.close()


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


class _Session:
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
        if not reported and self.ended_by is None and self.conn._settles_dead():
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
        select.select([chan], [], [], TICK_SECONDS)
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


class ConnectionPool:
    """One live connection per VM target, shared by all threads of the worker process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._connections: dict[SSHTarget, Connection] = {}
        self._connecting: dict[SSHTarget, threading.Lock] = {}
        metrics.track_pool(self)

    def get(self, target: SSHTarget) -> Connection:
        with self._lock:
            conn = self._connections.get(target)
            if conn is not None and conn.active:
                return conn
            gate = self._connecting.setdefault(target, threading.Lock())
        # Only connecting is serialised (per target); commands never are.
        with gate:
            with self._lock:
                conn = self._connections.get(target)
                if conn is not None and conn.active:
                    return conn
            with metrics.ssh_connecting():
                fresh = Connection(target, self).open()
            log.info("Connected to %s (host key %s)", target.address,
                     fingerprint(fresh.server_key) if fresh.server_key else "?")
            with self._lock:
                stale = self._connections.get(target)
                self._connections[target] = fresh
            if stale is not None:
                stale.close()
            return fresh

    def discard(self, target: SSHTarget) -> None:
        with self._lock:
            conn = self._connections.pop(target, None)
        if conn is not None:
            conn.close()

    def close_all(self) -> None:
        with self._lock:
            conns = list(self._connections.values())
            self._connections.clear()
        for conn in conns:
            conn.close()

    def __len__(self) -> int:
        with self._lock:
            return sum(1 for conn in self._connections.values() if conn.active)


def run_command(
    pool: ConnectionPool,
    target: SSHTarget,
    line: str,
    stdin: bytes | None,
    max_bytes: int,
    on_stdout: Callable[[str], None] | None = None,
    on_stderr: Callable[[str], None] | None = None,
    **options: Any,
) -> ExecResult:
    """Run on a pooled connection (``options`` as for ``Connection.run``).

    A pooled connection found dead when the channel is opened is replaced once: the
    command had not started. A connection that breaks while the command runs is never
    retried here (that would run it twice); the attempt ends with ``TransportError``.
    """
    for attempt in (1, 2):
        conn = pool.get(target)
        try:
            return conn.run(line, stdin, max_bytes, on_stdout, on_stderr, **options)
        except ChannelOpenFailed:
            pool.discard(target)
            if attempt == 2:
                raise
        except TransportError:
            pool.discard(target)
            raise
    raise AssertionError("unreachable")
