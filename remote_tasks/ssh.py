"""The SSH layer: one authenticated connection per VM per worker process, a channel per command.

There is no per-host lock around commands: paramiko multiplexes channels over one
transport, so commands on one VM run side by side (the VM's ``maxConcurrentCommands`` is
the worker's concurrency). Host keys are always verified against the pinned keys; a key
that does not match is refused and never added anywhere. What a VM's target is and the
errors: ``.sshtarget``; one command on its channel: ``.session``.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import paramiko

from vmfleet import metrics

from .become import Become
from .output import StreamTail
from .session import (
    DEFAULT_KILL_GRACE,
    EXIT_SIGNAL_KEY,
    AttemptControl,
    Deadline,
    ExecResult,
    OutputSink,
    Session,
    shutdown_write,
)
from .shell import terminate_line
from .sshtarget import (
    NEGOTIATED_TYPES,
    AuthFailed,
    ChannelOpenFailed,
    HostKeyMismatch,
    PinnedKey,
    SSHError,
    SSHTarget,
    TransportError,
    fingerprint,
    load_private_key,
)

log = logging.getLogger(__name__)

KEEPALIVE_SECONDS = 30
SFTP_WINDOW = 8 * 1024 * 1024


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
        chan.__dict__[EXIT_SIGNAL_KEY] = name
        chan.status_event.set()


SignalTransport._channel_handler_table[paramiko.common.MSG_CHANNEL_REQUEST] = (
    SignalTransport._handle_channel_request)


class Connection:
    """One authenticated SSH transport to one VM."""

    def __init__(self, target: SSHTarget, pool: ConnectionPool | None = None) -> None:
        self.target = target
        self.pool = pool  # where a bastion's connection comes from (proxyJump)
        self.transport: paramiko.Transport | None = None
        self.server_key: paramiko.PKey | None = None
        self.host_key: str | None = None  # the server key's fingerprint, for each result

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
                for name in NEGOTIATED_TYPES.get(key.key_type, (key.key_type,)):
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
            self.host_key = fingerprint(server_key)
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
        session = Session(self, chan, stdin, out, err, nonce=nonce, deadline=deadline, gate=gate,
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
            host_key=self.host_key,
            pgid=session.pgid,
            ended_by=session.ended_by,
            signal=killed_by,
            become_failed=session.become_failed,
        )

    def settles_dead(self, within: float = 1.0) -> bool:
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
