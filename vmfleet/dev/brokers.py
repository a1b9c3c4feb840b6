"""Celery brokers for the local environment and the e2e tests: real Redis and RabbitMQ.

Both run as the current user from a work directory of their own, listen on
``127.0.0.1`` only, on free ports, and are started directly (never through systemd or
the packages' init scripts; ``scripts/install-system-deps.sh`` installs them without
starting anything).

* ``RedisServer``: append-only file (``appendfsync everysec``) in the work directory, so
  queued messages survive ``restart()`` (and a ``kill()`` loses at most ~1 s). It asks
  who is there, as the chart's Redis does: the ``default`` user is off, ``url`` is the
  controller's user (every ``vmfleet`` key, and ``ACL SETUSER`` for the namespaces'
  users), ``admin_url`` a user that may do anything (tests), ``anonymous_url`` no user at
  all (refused). Passwords are generated once per work directory (``redis.secrets``,
  mode 0600); the users live in its ACL file (``users.acl``), where the controller saves
  the namespaces' users it creates, so a restarted Redis knows them at once.
  ``maxmemory`` with ``noeviction``: a full Redis refuses writes, it never drops a queued
  message.
* ``RabbitMQServer``: a standalone node with its own epmd (started by us on a free
  loopback port), Erlang cookie, mnesia and log directories in the work directory, no
  plugins. Durable queues and persistent messages (Celery's defaults) survive
  ``restart()``. The guest user is allowed, from loopback only (RabbitMQ's default).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
from pathlib import Path
from typing import Any

from vmfleet import tenancy
from vmfleet.procs import (
    ManagedProcess,
    free_port,
    port_open,
    stop_pid_file,
    wait_until,
    write_pid_file,
)

REDIS_SERVER = "redis-server"
RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"  # not /usr/sbin's su wrapper
EPMD = "epmd"

LOOPBACK = "127.0.0.1"


def _which(program: str) -> str:
    path = program if os.path.isabs(program) else shutil.which(program)
    if not path or not os.access(path, os.X_OK):
        raise FileNotFoundError(
            f"{program} not found: run scripts/install-system-deps.sh to install it"
        )
    return path


def _resp(*args: str) -> bytes:
    out = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def redis_ping(host: str, port: int, timeout: float = 1.0, user: str | None = None,
               password: str | None = None) -> bool:
    """True when a Redis server answers PING with PONG (a loading server does not),
    after ``AUTH user password`` when given."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        if password is not None:
            sock.sendall(_resp("AUTH", user or "default", password))
            if not sock.recv(64).startswith(b"+OK"):
                return False
        sock.sendall(b"PING\r\n")
        return sock.recv(64).startswith(b"+PONG")


ADMIN_USER = "vmfleet-admin"
DEFAULT_MAXMEMORY = "256mb"


class RedisServer:
    """A redis-server on 127.0.0.1 with its data in ``workdir``, authenticated (``acl``)."""

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        persistent: bool = True,
        name: str = "redis",
        acl: bool = True,
        maxmemory: str = DEFAULT_MAXMEMORY,
        eviction: str = "noeviction",
    ) -> None:
        """``eviction``: the ``maxmemory-policy`` (the broker's is ``noeviction``; the
        output store's, :func:`output_store`, evicts)."""
        self.workdir = Path(workdir).resolve()
        self.host = LOOPBACK
        self.port = port if port is not None else free_port(self.host)
        self.persistent = persistent
        self.name = name
        self.acl = acl
        self.maxmemory = maxmemory
        self.eviction = eviction
        self._process: ManagedProcess | None = None
        self._passwords: dict[str, str] | None = None

    @property
    def secrets_path(self) -> Path:
        return self.workdir / "redis.secrets"

    def passwords(self) -> dict[str, str]:
        """The users' passwords (made once per work directory, kept across restarts)."""
        if self._passwords is None:
            try:
                self._passwords = dict(json.loads(self.secrets_path.read_text()))
            except (OSError, ValueError):
                self._passwords = {tenancy.CONTROLLER_USER: secrets.token_hex(24),
                                   ADMIN_USER: secrets.token_hex(24)}
                self.workdir.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.secrets_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w") as fh:
                    json.dump(self._passwords, fh)
        return self._passwords

    def _url_of(self, user: str | None) -> str:
        base = f"redis://{self.host}:{self.port}/0"
        if user is None or not self.acl:
            return base
        return tenancy.with_credentials(base, user, self.passwords()[user])

    @property
    def url(self) -> str:
        """The controller's URL (every vmfleet key; it creates the namespaces' users)."""
        return self._url_of(tenancy.CONTROLLER_USER)

    @property
    def admin_url(self) -> str:
        """A user that may do anything (tests, diagnostics)."""
        return self._url_of(ADMIN_USER)

    @property
    def anonymous_url(self) -> str:
        """No credentials at all: refused when ``acl`` is on."""
        return self._url_of(None)

    def namespace_url(self, namespace: str, password: str | None = None) -> str:
        """Create (or reset) the namespace's ACL user, as the controller or the chart
        would, and return its URL (``password``: derived from the controller's)."""
        import redis

        if password is None:
            password = tenancy.derive_password(self.passwords()[tenancy.CONTROLLER_USER], namespace)
        user = tenancy.namespace_user(namespace)
        client: Any = redis.Redis.from_url(self.admin_url)
        try:
            client.execute_command("ACL", "SETUSER", user, "reset", "on",
                                   tenancy.password_hash(password),
                                   *tenancy.namespace_rules(namespace))
        finally:
            client.close()
        return tenancy.with_credentials(f"redis://{self.host}:{self.port}/0", user, password)

    @property
    def config_path(self) -> Path:
        return self.workdir / "redis.conf"

    @property
    def log_path(self) -> Path:
        return self.workdir / "redis.log"

    @property
    def pid_file(self) -> Path:
        """The running server's process group, so another process can stop it."""
        return self.workdir / "redis.pgid"

    def _write_config(self) -> Path:
        lines = [
            "# vmfleet dev Redis (generated; rewritten at every start)",
            f"bind {self.host}",
            f"port {self.port}",
            "protected-mode yes",
            "daemonize no",
            'logfile ""',  # stdout, captured in redis.log
            "loglevel notice",
            f'dir "{self.workdir}"',
            'save ""',  # no RDB snapshots; the AOF below is the persistence
            f"appendonly {'yes' if self.persistent else 'no'}",
            "appendfsync everysec",
            'appenddirname "appendonly"',
            "databases 16",
            f"maxmemory {self.maxmemory}",
            f"maxmemory-policy {self.eviction}",
            *([f'aclfile "{self._write_acl_file()}"'] if self.acl else []),
            "",
        ]
        self.config_path.write_text("\n".join(lines))
        return self.config_path

    @property
    def acl_path(self) -> Path:
        return self.workdir / "users.acl"

    def _write_acl_file(self) -> Path:
        """The ACL file: ours (default off, the controller, the admin), then the users the
        controller created and saved (``ACL SAVE``), kept across restarts."""
        ours = self._acl_lines()
        names = {line.split()[1] for line in ours}
        try:
            saved = [line for line in self.acl_path.read_text().splitlines()
                     if line.startswith("user ") and line.split()[1] not in names]
        except OSError:
            saved = []
        fd = os.open(self.acl_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write("\n".join([*ours, *saved, ""]))
        return self.acl_path

    def _acl_lines(self) -> list[str]:
        passwords = self.passwords()
        return [
            tenancy.DEFAULT_USER_ACL,
            tenancy.acl_line(tenancy.CONTROLLER_USER, passwords[tenancy.CONTROLLER_USER],
                             tenancy.controller_rules(provision=True)),
            tenancy.acl_line(ADMIN_USER, passwords[ADMIN_USER], ["~*", "&*", "+@all"]),
        ]

    def running(self) -> bool:
        return self._process is not None and self._process.running()

    def start(self, timeout: float = 30) -> RedisServer:
        if self.running():
            return self
        self.workdir.mkdir(parents=True, exist_ok=True)
        stop_pid_file(self.pid_file)  # a stale server of this work dir
        self._write_config()
        self._process = ManagedProcess(
            self.name, [_which(REDIS_SERVER), str(self.config_path)], self.log_path, cwd=self.workdir
        )
        self._process.start()
        write_pid_file(self._process, self.pid_file)
        process = self._process

        password = self.passwords()[ADMIN_USER] if self.acl else None

        def ready() -> bool:
            process.check_running()
            return redis_ping(self.host, self.port, user=ADMIN_USER, password=password)

        try:
            wait_until(ready, timeout, interval=0.05, what=f"redis on {self.host}:{self.port}")
        except Exception:
            self.kill()
            raise
        return self

    def stop(self, grace: float = 15.0) -> None:
        """Shut down cleanly (TERM: Redis flushes its AOF), then KILL after ``grace``.
        Without a process of its own, stops the one recorded in ``pid_file``."""
        if self._process is not None:
            self._process.stop(grace)
            self._process = None
        stop_pid_file(self.pid_file, grace)

    def kill(self) -> None:
        """SIGKILL: a crashed broker."""
        if self._process is not None:
            self._process.signal(signal.SIGKILL)
            self._process.stop(grace=5)
            self._process = None
        stop_pid_file(self.pid_file, grace=0)

    def restart(self, timeout: float = 30) -> RedisServer:
        self.stop()
        return self.start(timeout)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"RedisServer({self.anonymous_url})"


OUTPUT_MAXMEMORY = "256mb"


def output_store(workdir: Path, maxmemory: str = OUTPUT_MAXMEMORY) -> RedisServer:
    """The output store (``VMFLEET_OUTPUT_URL``): a Redis of its own, never the broker, in
    memory only, that evicts the least recently used output (every output key has a TTL:
    ``volatile-lru``) rather than refuse a write. The same users as the broker's Redis:
    the controller's creates each namespace's, confined to ``vmfleet.<ns>:*``."""
    return RedisServer(workdir, name="output", persistent=False, maxmemory=maxmemory,
                       eviction="volatile-lru")


def amqp_ready(url: str, timeout: float = 2.0) -> bool:
    """True when an AMQP connection to ``url`` opens (and logs in)."""
    from kombu.connection import Connection

    with Connection(url, connect_timeout=timeout) as conn:
        conn.ensure_connection(max_retries=1)
        return bool(conn.connected)


class RabbitMQServer:
    """A standalone RabbitMQ node on 127.0.0.1 with everything in ``workdir``."""

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        dist_port: int | None = None,
        epmd_port: int | None = None,
        name: str = "rabbitmq",
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.host = LOOPBACK
        self.port = port if port is not None else free_port(self.host)
        self.dist_port = dist_port if dist_port is not None else free_port(self.host)
        self.epmd_port = epmd_port if epmd_port is not None else free_port(self.host)
        self.name = name
        # Fixed for the life of this object: mnesia data is kept per node name, so a
        # restarted node finds its durable queues again.
        self.nodename = f"vmfleet-{self.port}@localhost"
        self._epmd: ManagedProcess | None = None
        self._process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@{self.host}:{self.port}//"

    @property
    def log_path(self) -> Path:
        return self.workdir / "rabbitmq.log"

    @property
    def pid_files(self) -> tuple[Path, Path]:
        """The node's and its epmd's process groups (stopped in that order)."""
        return (self.workdir / "rabbitmq.pgid", self.workdir / "epmd.pgid")

    def _env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("RABBITMQ_", "ERL_")) and k not in ("HOME",)
        }
        w = self.workdir
        env.update(
            {
                "HOME": str(w / "home"),  # .erlang.cookie lives here
                "RABBITMQ_NODENAME": self.nodename,
                "RABBITMQ_USE_LONGNAME": "false",
                "RABBITMQ_NODE_IP_ADDRESS": self.host,
                "RABBITMQ_NODE_PORT": str(self.port),
                "RABBITMQ_DIST_PORT": str(self.dist_port),
                "ERL_EPMD_ADDRESS": self.host,
                "ERL_EPMD_PORT": str(self.epmd_port),
                "RABBITMQ_CONF_ENV_FILE": str(w / "rabbitmq-env.conf"),
                "RABBITMQ_CONFIG_FILE": str(w / "rabbitmq.conf"),
                "RABBITMQ_ADVANCED_CONFIG_FILE": str(w / "advanced.config"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(w / "enabled_plugins"),
                "RABBITMQ_MNESIA_BASE": str(w / "mnesia"),
                "RABBITMQ_LOG_BASE": str(w / "log"),
                "RABBITMQ_LOGS": "-",  # console, captured in rabbitmq.log
                "RABBITMQ_PID_FILE": str(w / "rabbitmq.pid"),
                # The Erlang distribution listener (dist port) on loopback only too.
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            }
        )
        return env

    def _write_config(self) -> None:
        w = self.workdir
        for sub in ("home", "mnesia", "log"):
            (w / sub).mkdir(parents=True, exist_ok=True)
        (w / "rabbitmq-env.conf").write_text("# vmfleet: everything is set in the environment\n")
        (w / "enabled_plugins").write_text("[].\n")  # no management or other plugins
        (w / "advanced.config").write_text("[].\n")
        (w / "rabbitmq.conf").write_text(
            "\n".join(
                [
                    "# vmfleet dev RabbitMQ (generated; rewritten at every start)",
                    f"listeners.tcp.default = {self.host}:{self.port}",
                    "loopback_users.guest = true",
                    "log.console = true",
                    "log.console.level = info",
                    "log.file = false",
                    "disk_free_limit.absolute = 50MB",
                    "",
                ]
            )
        )

    def running(self) -> bool:
        return self._process is not None and self._process.running()

    def start(self, timeout: float = 90) -> RabbitMQServer:
        if self.running():
            return self
        self.workdir.mkdir(parents=True, exist_ok=True)
        for pid_file in self.pid_files:  # a stale node of this work dir
            stop_pid_file(pid_file, 30)
        self._write_config()
        env = self._env()
        # Our own epmd, in our own process group, so stop() can end it (an epmd that
        # erl starts by itself daemonizes and would outlive the node).
        self._epmd = ManagedProcess(
            f"{self.name}-epmd",
            [_which(EPMD), "-address", self.host, "-port", str(self.epmd_port)],
            self.workdir / "epmd.log",
            env=env,
        )
        self._epmd.start()
        write_pid_file(self._epmd, self.pid_files[1])
        epmd = self._epmd
        try:

            def epmd_ready() -> bool:
                epmd.check_running()
                return port_open(self.host, self.epmd_port)

            wait_until(
                epmd_ready,
                10,
                interval=0.05,
                what=f"epmd on {self.host}:{self.epmd_port}",
            )
            self._process = ManagedProcess(
                self.name, [_which(RABBITMQ_SERVER)], self.log_path, env=env, cwd=self.workdir
            )
            self._process.start()
            write_pid_file(self._process, self.pid_files[0])
            process = self._process

            def ready() -> bool:
                process.check_running()
                return port_open(self.host, self.port) and amqp_ready(self.url)

            wait_until(ready, timeout, interval=0.25, what=f"RabbitMQ on {self.host}:{self.port}")
        except Exception:
            self.kill()
            raise
        return self

    def stop(self, grace: float = 30.0) -> None:
        """Stop the node cleanly (TERM), then KILL after ``grace``; then its epmd. Without
        processes of its own, stops the ones recorded in ``pid_files``."""
        if self._process is not None:
            self._process.stop(grace)
            self._process = None
        if self._epmd is not None:
            self._epmd.stop(5)
            self._epmd = None
        node_pid_file, epmd_pid_file = self.pid_files
        stop_pid_file(node_pid_file, grace)
        stop_pid_file(epmd_pid_file, 5)

    def kill(self) -> None:
        """SIGKILL the node and its epmd: a crashed broker."""
        for attr in ("_process", "_epmd"):
            proc: ManagedProcess | None = getattr(self, attr)
            if proc is not None:
                proc.signal(signal.SIGKILL)
                proc.stop(grace=5)
                setattr(self, attr, None)
        for pid_file in self.pid_files:
            stop_pid_file(pid_file, grace=0)

    def restart(self, timeout: float = 90) -> RabbitMQServer:
        self.stop()
        return self.start(timeout)

    def __enter__(self) -> RabbitMQServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"RabbitMQServer({self.url}, node={self.nodename})"


__all__ = ["RabbitMQServer", "RedisServer", "amqp_ready", "output_store", "redis_ping"]
