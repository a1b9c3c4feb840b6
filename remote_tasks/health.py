"""Health probes of a VM: the body of ``remote_tasks.check_vm_status``.

One SSH exec runs a small fixed script (no user input in it) that prints the same
things the original guide's health check looked at — hostname, uptime, root disk usage,
memory, load average — plus OS and kernel, each section behind a marker line. Pure
parsers turn that text into the numbers of ``status.facts``.

The probe has a hard deadline (``healthCheck.timeoutSeconds``): connecting, opening
the channel and reading are all bounded, and a probe that never returns (a hung
filesystem under ``df``) ends as ``Timeout`` while the worker thread moves on.
The worker reports what it saw (``status.lastProbe``, ``facts``, ``hostKey``); the
controller writes it and folds it into conditions.
"""

from __future__ import annotations

import dataclasses
import logging
import shlex
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import paramiko

from vmfleet.api.constants import Reason
from vmfleet.api.envelope import Target
from vmfleet.api.facts import Facts
from vmfleet.api.reports import ProbeReport
from vmfleet.api.times import now_rfc3339

from .execute import AttemptFailed, CommandExecutor
from .session import shutdown_write, wait_readable
from .ssh import ConnectionPool
from .sshtarget import HostKeyMismatch, SSHError, SSHTarget, fingerprint

log = logging.getLogger("remote_tasks.health")

MARKER = "@@vmfleet-probe:"
MAX_PROBE_OUTPUT = 256 * 1024
REASON_PROBE_FAILED = "ProbeFailed"

# Fixed text: nothing from a spec is formatted into it.
PROBE_SCRIPT = f"""\
LC_ALL=C; export LC_ALL
m() {{ printf '\\n{MARKER}%s@@\\n' "$1"; }}
m hostname; hostname 2>/dev/null || cat /proc/sys/kernel/hostname
m uptime; cat /proc/uptime
m loadavg; cat /proc/loadavg
m meminfo; cat /proc/meminfo 2>/dev/null || free -b
m df; df -P -k /
m os-release; cat /etc/os-release 2>/dev/null || cat /usr/lib/os-release 2>/dev/null
m uname; uname -sr
m end
"""


def probe_line(timeout_seconds: int) -> str:
    """The exec line: the script under ``timeout -s KILL`` where the VM has it, so a hung
    command does not linger on the VM either (killed a little after the worker gave up)."""
    script = shlex.quote(PROBE_SCRIPT)
    limit = max(1, int(timeout_seconds)) + 2
    return (
        f"if command -v timeout >/dev/null 2>&1; then exec timeout -s KILL {limit} sh -c {script}; "
        f"else exec sh -c {script}; fi"
    )


# --------------------------------------------------------------------------- parsers


class ProbeParseError(ValueError):
    """The VM's answer is not what the probe script prints."""


def split_sections(text: str) -> dict[str, str]:
    """``{section: body}`` from the probe output (bodies stripped)."""
    sections: dict[str, str] = {}
    current: str | None = None
    lines: list[str] = []
    for line in text.splitlines():
        if line.startswith(MARKER) and line.endswith("@@"):
            if current is not None:
                sections[current] = "\n".join(lines).strip()
            current = line[len(MARKER):-2]
            lines = []
        elif current is not None:
            lines.append(line)
    if current is not None:
        sections[current] = "\n".join(lines).strip()
    return sections


def parse_hostname(text: str) -> str | None:
    first = text.strip().splitlines()[0].strip() if text.strip() else ""
    return first or None


def parse_uptime(text: str) -> float:
    """``/proc/uptime``: seconds since boot (first field)."""
    try:
        return float(text.split()[0])
    except (IndexError, ValueError) as exc:
        raise ProbeParseError(f"uptime: unexpected {text[:80]!r}") from exc


def parse_loadavg(text: str) -> tuple[float, float, float]:
    """``/proc/loadavg``: the 1, 5 and 15 minute load averages."""
    fields = text.split()
    try:
        return float(fields[0]), float(fields[1]), float(fields[2])
    except (IndexError, ValueError) as exc:
        raise ProbeParseError(f"loadavg: unexpected {text[:80]!r}") from exc


def parse_meminfo(text: str) -> tuple[int, int]:
    """``/proc/meminfo`` (or ``free -b``): total and available memory in bytes."""
    if text.lstrip().startswith(("total", "Mem:")) or "\nMem:" in text:
        return parse_free(text)
    values: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if not parts or not parts[0].isdigit():
            continue
        scale = 1024 if len(parts) > 1 and parts[1].lower() == "kb" else 1
        values[name.strip()] = int(parts[0]) * scale
    if "MemTotal" not in values:
        raise ProbeParseError("meminfo: no MemTotal line")
    available = values.get("MemAvailable")
    if available is None:  # kernels before 3.14
        available = sum(values.get(k, 0) for k in ("MemFree", "Buffers", "Cached"))
    return values["MemTotal"], available


def parse_free(text: str) -> tuple[int, int]:
    """``free -b``: total and available (or free, on old procps) bytes of the Mem: line."""
    lines = text.strip().splitlines()
    header = lines[0].split() if lines else []
    for line in lines:
        if line.startswith("Mem:"):
            numbers = line.split()[1:]
            try:
                row = {name: int(value) for name, value in zip(header, numbers, strict=False)}
            except ValueError as exc:
                raise ProbeParseError(f"free: unexpected {line[:80]!r}") from exc
            if "total" not in row:
                raise ProbeParseError("free: no total column")
            return row["total"], row.get("available", row.get("free", 0))
    raise ProbeParseError("free: no Mem: line")


def parse_df(text: str) -> tuple[int, int]:
    """``df -P -k /``: total and used bytes of the root filesystem.

    Read from the right: the device name may contain spaces, the numbers never do.
    """
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if len(lines) < 2:
        raise ProbeParseError(f"df: unexpected {text[:80]!r}")
    fields = lines[-1].split()
    try:
        total_k, used_k = int(fields[-5]), int(fields[-4])
    except (IndexError, ValueError) as exc:
        raise ProbeParseError(f"df: unexpected {lines[-1][:80]!r}") from exc
    return total_k * 1024, used_k * 1024


def parse_os_release(text: str) -> str | None:
    """``/etc/os-release``: PRETTY_NAME, else NAME and VERSION."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        try:
            parsed = shlex.split(value)
        except ValueError:
            parsed = [value]
        values[key.strip()] = parsed[0] if parsed else ""
    if values.get("PRETTY_NAME"):
        return values["PRETTY_NAME"]
    name = " ".join(v for v in (values.get("NAME"), values.get("VERSION")) if v)
    return name or None


def parse_uname(text: str) -> str | None:
    """``uname -sr``: e.g. ``Linux 6.1.0-18-amd64``."""
    return text.strip().splitlines()[0].strip() if text.strip() else None


class Probed(NamedTuple):
    """What the VM answered: the facts of ``status.facts`` and each section it could not
    answer (empty: every check answered)."""

    facts: Facts
    problems: list[str]


def parse_probe(text: str) -> Probed:
    """Every section the VM answered; a section it could not answer is listed in ``problems``."""
    sections = split_sections(text)
    if "end" not in sections:
        raise ProbeParseError("the probe output ended early (no end marker)")
    values: dict[str, Any] = {}
    problems: list[str] = []

    def section(name: str, apply: Callable[[str], dict[str, Any]]) -> None:
        body = sections.get(name, "")
        if not body:
            problems.append(f"{name}: no output")
            return
        try:
            values.update(apply(body))
        except ProbeParseError as exc:
            problems.append(str(exc))

    def load(body: str) -> dict[str, Any]:
        load1, load5, load15 = parse_loadavg(body)
        return {"load1": load1, "load5": load5, "load15": load15}

    def memory(body: str) -> dict[str, Any]:
        total, available = parse_meminfo(body)
        return {"memory_total_bytes": total, "memory_available_bytes": available}

    def disk(body: str) -> dict[str, Any]:
        total, used = parse_df(body)
        return {"root_disk_total_bytes": total, "root_disk_used_bytes": used}

    section("hostname", lambda body: {"hostname": parse_hostname(body)})
    section("uptime", lambda body: {"uptime_seconds": parse_uptime(body)})
    section("loadavg", load)
    section("meminfo", memory)
    section("df", disk)
    section("os-release", lambda body: {"os": parse_os_release(body)})
    section("uname", lambda body: {"kernel": parse_uname(body)})
    return Probed(Facts(**values), problems)


# --------------------------------------------------------------------------- probing


@dataclass
class ProbeResult:
    succeeded: bool
    reason: str
    message: str
    latency_seconds: float
    facts: Facts | None = None
    server_key: paramiko.PKey | None = None


class ProbeTimeout(Exception):
    pass


def _exec_with_deadline(transport: paramiko.Transport, line: str, deadline: float,
                        holder: dict[str, paramiko.Channel]) -> bytes:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise ProbeTimeout()
    chan = transport.open_session(timeout=remaining)
    holder["chan"] = chan
    try:
        chan.exec_command(line)
        shutdown_write(chan)
        out = bytearray()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ProbeTimeout()
            wait_readable(chan, min(0.5, remaining))
            while chan.recv_ready():
                data = chan.recv(65536)
                if len(out) < MAX_PROBE_OUTPUT:
                    out += data
            while chan.recv_stderr_ready():
                chan.recv_stderr(65536)  # not needed; drained so the VM never blocks
            if chan.exit_status_ready() and chan.eof_received and not chan.recv_ready():
                return bytes(out)
            if chan.closed and not chan.recv_ready():
                return bytes(out)
            if not transport.is_active():
                raise paramiko.SSHException("the connection broke during the probe")
    finally:
        chan.close()


def probe_vm(pool: ConnectionPool, target: SSHTarget, timeout_seconds: float) -> ProbeResult:
    """Probe one VM within ``timeout_seconds`` in all (connect included), whatever happens."""
    started = time.monotonic()
    deadline = started + timeout_seconds
    # The probe's own connection (connect bounded by the probe's timeout): a hung probe
    # never holds up the commands' connection, and vice versa.
    probe_target = dataclasses.replace(
        target, connect_timeout=min(target.connect_timeout, float(timeout_seconds))
    )
    holder: dict[str, paramiko.Channel] = {}
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            conn = pool.get(probe_target)
            outcome["key"] = conn.server_key
            assert conn.transport is not None
            outcome["output"] = _exec_with_deadline(
                conn.transport, probe_line(int(timeout_seconds)), deadline, holder
            )
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=work, name="vmfleet-probe", daemon=True)
    thread.start()
    thread.join(timeout_seconds + 0.5)
    latency = round(time.monotonic() - started, 3)
    if thread.is_alive() or isinstance(outcome.get("error"), ProbeTimeout):
        chan = holder.get("chan")
        if chan is not None:
            chan.close()
        else:
            pool.discard(probe_target)  # stuck connecting: a fresh connection next time
        return ProbeResult(False, Reason.TIMEOUT,
                           f"the health probe did not finish within {timeout_seconds:g}s", latency)
    error = outcome.get("error")
    if isinstance(error, HostKeyMismatch):
        return ProbeResult(False, error.reason, str(error), latency)
    if isinstance(error, SSHError):
        pool.discard(probe_target)
        return ProbeResult(False, error.reason, str(error), latency)
    if isinstance(error, (paramiko.SSHException, OSError, EOFError)):
        pool.discard(probe_target)
        return ProbeResult(False, Reason.TRANSPORT_ERROR,
                           f"the probe of {target.host}:{target.port} failed: {error}", latency)
    if error is not None:
        raise error
    key = outcome.get("key")
    text = bytes(outcome.get("output", b"")).decode("utf-8", errors="replace")
    try:
        facts, problems = parse_probe(text)
    except ProbeParseError as exc:
        return ProbeResult(False, REASON_PROBE_FAILED, str(exc), latency, server_key=key)
    message = "; ".join(problems) if problems else "the VM answered every check"
    return ProbeResult(True, Reason.COMPLETED, message, latency, facts, key)


def host_key_status(key: paramiko.PKey, now: str, record: bool) -> dict[str, Any]:
    """``status.hostKey`` for the key seen (with the key itself when TOFU records it)."""
    status: dict[str, Any] = {"fingerprint": fingerprint(key), "keyType": key.get_name()}
    if record:
        status["publicKey"] = f"{key.get_name()} {key.get_base64()}"
        status["recordedTime"] = now
    return status


def probe_status(result: ProbeResult, now: str, worker: str) -> dict[str, Any]:
    """``status.lastProbe``."""
    return {
        "time": now,
        "succeeded": result.succeeded,
        "reason": result.reason,
        "message": result.message[:4096],
        "latencySeconds": result.latency_seconds,
        "worker": worker,
    }


class HealthChecker:
    """The body of ``remote_tasks.check_vm_status``: probe, then report what was seen
    (the controller writes ``status.lastProbe``, ``facts`` and ``hostKey``)."""

    def __init__(self, executor: CommandExecutor) -> None:
        self.executor = executor

    def check(self, message: dict[str, Any], worker: str) -> str:
        namespace, name = str(message["namespace"]), str(message["vm"])
        timeout = float(message.get("timeoutSeconds") or 10)
        target = Target.from_message(message["target"]) if message.get("target") else None
        record = False
        if target is None:
            result = ProbeResult(False, Reason.INVALID_SPEC, "the probe names no target", 0.0)
        else:
            try:
                ssh_target = self.executor.ssh_target(target, first_use=True)
            except AttemptFailed as failed:
                result = ProbeResult(False, failed.reason, failed.message, 0.0)
            else:
                record = ssh_target.trust_on_first_use
                result = probe_vm(self.executor.pool, ssh_target, timeout)
        now = now_rfc3339()
        status: dict[str, Any] = {"lastProbe": probe_status(result, now, worker)}
        if result.facts is not None:
            status["facts"] = result.facts.replace(
                last_probe_time=now, probe_latency_seconds=result.latency_seconds).wire()
        if result.server_key is not None:
            status["hostKey"] = host_key_status(result.server_key, now, record)
        uid = message.get("uid")
        report = ProbeReport(namespace=namespace, vm=name, uid=str(uid) if uid else None,
                             worker=worker, time=now, status=status)
        self.executor.state.report(report.to_message(), str(message.get("scope") or "default"))
        log.info("Probed RemoteVM %s/%s: %s (%s, %.3fs)", namespace, name,
                 "up" if result.succeeded else "down", result.reason, result.latency_seconds)
        return result.reason


__all__ = [
    "HealthChecker",
    "ProbeParseError", "Probed", "ProbeResult", "host_key_status", "parse_df", "parse_free",
    "parse_hostname", "parse_loadavg", "parse_meminfo", "parse_os_release", "parse_probe",
    "parse_uname", "parse_uptime", "probe_line", "probe_status", "probe_vm", "split_sections",
]
