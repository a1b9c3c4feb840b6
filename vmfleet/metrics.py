"""Prometheus metrics of the controller and the workers (the names of DESIGN.md, exactly).

Labels are bounded: namespaces, VM names, queue names, phases, reasons and error kinds —
never command text, output or per-command ids. Both processes expose the same registry
(``prometheus_client.REGISTRY``); each sets the series it knows about:

- workers: ``vmfleet_commands_total``, ``vmfleet_command_duration_seconds``,
  ``vmfleet_command_queue_wait_seconds``, ``vmfleet_ssh_connect_seconds``,
  ``vmfleet_ssh_connections_open``, ``vmfleet_ssh_errors_total``;
- the controller: ``vmfleet_queue_depth`` and ``vmfleet_broker_memory_used_ratio`` (read
  from the broker at scrape time),
  ``vmfleet_vm_up`` and the VM facts (from RemoteVM status), ``vmfleet_worker_replicas``,
  ``vmfleet_reconcile_errors_total``.

The HTTP endpoint is started with :func:`start_metrics_server` (port from
``VMFLEET_METRICS_PORT``: 9807 for the controller, 9808 for a worker, ``0`` = off).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

import prometheus_client
from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from vmfleet import settings as settings_
from vmfleet.api.times import parse_rfc3339
from vmfleet.queues import QueueDepth
from vmfleet.settings import CONTROLLER_METRICS_PORT as CONTROLLER_PORT
from vmfleet.settings import WORKER_METRICS_PORT as WORKER_PORT
from vmfleet.settings import Settings

log = logging.getLogger("vmfleet.metrics")

PORT_ENV = settings_.env_of("metrics_port")
ADDRESS_ENV = settings_.env_of("metrics_address")

prometheus_client.disable_created_metrics()

DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 1800, 3600)
WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
CONNECT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

# ----------------------------------------------------------------------------- workers

COMMANDS = Counter(
    "vmfleet_commands_total",
    "Command attempts finished by workers, by outcome (result: Succeeded/Failed; reason: "
    "Completed, ExitCode, HostKeyMismatch, ...).",
    ["namespace", "vm", "result", "reason"],
)
COMMAND_DURATION = Histogram(
    "vmfleet_command_duration_seconds",
    "Time from a worker's claim of an attempt to its result being written.",
    ["namespace", "vm"],
    buckets=DURATION_BUCKETS,
)
COMMAND_QUEUE_WAIT = Histogram(
    "vmfleet_command_queue_wait_seconds",
    "Time from the controller's dispatch of an attempt to a worker's claim of it.",
    buckets=WAIT_BUCKETS,
)
SSH_CONNECT = Histogram(
    "vmfleet_ssh_connect_seconds",
    "Time to open an authenticated SSH connection (TCP, key exchange, host key check, auth).",
    buckets=CONNECT_BUCKETS,
)
SSH_CONNECTIONS_OPEN = Gauge(
    "vmfleet_ssh_connections_open",
    "Live pooled SSH connections in this process.",
)
SSH_ERRORS = Counter(
    "vmfleet_ssh_errors_total",
    "SSH connections that could not be opened, by kind (TransportError, AuthFailed, "
    "HostKeyMismatch, CredentialsInvalid, ...).",
    ["kind"],
)
# The kinds of vmfleet's SSH layer start at 0, so that rate() and increase() see the first one.
SSH_ERROR_KINDS = ("TransportError", "ChannelOpenFailed", "AuthFailed", "HostKeyMismatch",
                   "CredentialsInvalid")
for _kind in SSH_ERROR_KINDS:
    SSH_ERRORS.labels(_kind)

# ----------------------------------------------------------------------------- controller

QUEUE_DEPTH_NAME = "vmfleet_queue_depth"
BROKER_MEMORY_NAME = "vmfleet_broker_memory_used_ratio"
VM_UP = Gauge(
    "vmfleet_vm_up",
    "1 when the RemoteVM's last probe reached it (condition Reachable), 0 when it did not.",
    ["namespace", "vm"],
)
VM_LOAD1 = Gauge("vmfleet_vm_load1", "The VM's 1-minute load average (status.facts.load1).",
                 ["namespace", "vm"])
VM_MEMORY_AVAILABLE = Gauge(
    "vmfleet_vm_memory_available_bytes", "The VM's available memory (status.facts).",
    ["namespace", "vm"],
)
VM_ROOT_DISK_USED = Gauge(
    "vmfleet_vm_root_disk_used_ratio", "Used fraction of the VM's root filesystem (status.facts).",
    ["namespace", "vm"],
)
WORKER_REPLICAS = Gauge(
    "vmfleet_worker_replicas",
    "Worker replicas of a RemoteVM's queue by state (desired, ready).",
    ["namespace", "vm", "state"],
)
RECONCILE_ERRORS = Counter(
    "vmfleet_reconcile_errors_total",
    "Controller handler runs that raised, by resource kind (RemoteVM, RemoteCommand).",
    ["kind"],
)
MESSAGES_REFUSED = Counter(
    "vmfleet_messages_refused_total",
    "Messages a worker refused and did not run, by reason (BadSignature, Expired, "
    "VMNotServed, SecretMismatch, Unsigned, WrongTask, NoVerifyKey).",
    ["reason"],
)
STATUS_WRITE_ERRORS = Counter(
    "vmfleet_status_write_errors_total",
    "Status writes the controller refused before sending (the status failed validation: a "
    "bug), by resource kind; a RemoteCommand then ends Failed, reason InternalError.",
    ["kind"],
)
RUN_EVENTS = Counter(
    "vmfleet_run_events_total",
    "Events recording the end of attempts (one per attempt, one per 50 on a fan-out over 50 "
    "VMs), by result: Created; Exists (another controller, or this one before a restart, "
    "wrote it: no second audit line); Failed (an API error, tried again); GaveUp (dropped "
    "after the last try; the audit line is still logged).",
    ["result"],
)
for _result in ("Created", "Exists", "Failed", "GaveUp"):
    RUN_EVENTS.labels(_result)  # exported at 0 from the start

REPORTS_DROPPED = Counter(
    "vmfleet_reports_dropped_total",
    "Worker reports the controller could not read and dropped, by reason (Version: "
    "another major version; Malformed).",
    ["reason"],
)

#: Every metric name of the contract, as it appears in a scrape.
METRIC_NAMES: tuple[str, ...] = (
    "vmfleet_commands_total",
    "vmfleet_command_duration_seconds",
    "vmfleet_command_queue_wait_seconds",
    QUEUE_DEPTH_NAME,
    BROKER_MEMORY_NAME,
    "vmfleet_vm_up",
    "vmfleet_vm_load1",
    "vmfleet_vm_memory_available_bytes",
    "vmfleet_vm_root_disk_used_ratio",
    "vmfleet_ssh_connect_seconds",
    "vmfleet_ssh_connections_open",
    "vmfleet_ssh_errors_total",
    "vmfleet_worker_replicas",
    "vmfleet_reconcile_errors_total",
    "vmfleet_messages_refused_total",
    "vmfleet_status_write_errors_total",
    "vmfleet_reports_dropped_total",
    "vmfleet_run_events_total",
)


# ----------------------------------------------------------------------------- HTTP


def metrics_port(default: int, settings: Settings) -> int:
    """The port from ``VMFLEET_METRICS_PORT`` (``0`` turns the endpoint off), else ``default``."""
    return settings.metrics_port_or(default)


def metrics_address(settings: Settings) -> str:
    """``VMFLEET_METRICS_ADDRESS``: by default all interfaces in a cluster (Prometheus
    scrapes the pod IP), loopback elsewhere."""
    return settings.metrics_address or "127.0.0.1"


_server_lock = threading.Lock()
_server_port: int | None = None


def start_metrics_server(port: int, address: str = "127.0.0.1") -> int | None:
    """Serve ``/metrics`` on ``address:port`` in a daemon thread; once per process.

    Returns the port, or None when ``port`` is 0 or the port cannot be bound (logged: a
    taken metrics port must not stop the controller or a worker from working).
    """
    global _server_port
    if port == 0:
        log.info("Metrics are off (%s=0)", PORT_ENV)
        return None
    with _server_lock:
        if _server_port is not None:
            return _server_port
        try:
            prometheus_client.start_http_server(port, addr=address)
        except OSError as exc:
            log.error("Could not serve metrics on %s:%s: %s; set %s to a free port (0 = off)",
                      address, port, exc.strerror or exc, PORT_ENV)
            return None
        _server_port = port
    log.info("Serving metrics on http://%s:%s/metrics", address, port)
    return port


# ----------------------------------------------------------------------------- workers


def command_claimed(dispatch_time: str) -> float:
    """Observe the queue wait of a claimed attempt; return the start for its duration."""
    if dispatch_time:
        try:
            sent = parse_rfc3339(dispatch_time)
            COMMAND_QUEUE_WAIT.observe(max(0.0, (datetime.now(UTC) - sent).total_seconds()))
        except ValueError:
            log.debug("Ignored an unparsable dispatch time %r", dispatch_time)
    return time.monotonic()


def command_finished(namespace: str, vm: str, result: str, reason: str, started: float) -> None:
    COMMANDS.labels(namespace, vm, result, reason).inc()
    COMMAND_DURATION.labels(namespace, vm).observe(max(0.0, time.monotonic() - started))


@contextmanager
def ssh_connecting() -> Iterator[None]:
    """Time an SSH connect; count a failure by the exception's class name."""
    start = time.monotonic()
    try:
        yield
    except Exception as exc:
        SSH_ERRORS.labels(type(exc).__name__).inc()
        raise
    SSH_CONNECT.observe(time.monotonic() - start)


class _Sized(Protocol):
    def __len__(self) -> int: ...


_pools: weakref.WeakSet[Any] = weakref.WeakSet()


def track_pool(pool: _Sized) -> None:
    """Count the live connections of ``pool`` in ``vmfleet_ssh_connections_open``."""
    _pools.add(pool)


def _open_connections() -> float:
    return float(sum(len(pool) for pool in list(_pools)))


SSH_CONNECTIONS_OPEN.set_function(_open_connections)


# ----------------------------------------------------------------------------- controller

F = TypeVar("F", bound=Callable[..., Any])


def counts_errors(kind: str) -> Callable[[F], F]:
    """Decorate a handler: count its exceptions in ``vmfleet_reconcile_errors_total{kind}``."""

    RECONCILE_ERRORS.labels(kind)  # exported at 0 from the start

    def decorate(func: F) -> F:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return func(*args, **kwargs)
            except Exception:
                RECONCILE_ERRORS.labels(kind).inc()
                raise

        return wrapper  # type: ignore[return-value]

    return decorate


def observe_workers(namespace: str, vm: str, workers: dict[str, Any]) -> None:
    """Record ``status.workers`` of a RemoteVM (desired and ready replicas)."""
    WORKER_REPLICAS.labels(namespace, vm, "desired").set(workers.get("replicas") or 0)
    WORKER_REPLICAS.labels(namespace, vm, "ready").set(workers.get("readyReplicas") or 0)
    if workers.get("queue"):
        watch_queue(namespace, vm, str(workers["queue"]))


def observe_vm(body: Mapping[str, Any], deleted: bool = False) -> None:
    """Record what a RemoteVM's status says (reachability, facts); forget it when deleted."""
    meta = body.get("metadata") or {}
    namespace, name = meta.get("namespace", ""), meta.get("name", "")
    if deleted:
        forget_vm(namespace, name)
        return
    spec = body.get("spec") or {}
    watch_queue(namespace, name, spec.get("queue") or f"vmfleet.{namespace}.{name}")
    status = body.get("status") or {}
    conditions = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
    reachable = conditions.get("Reachable", conditions.get("Ready"))
    if reachable in ("True", "False"):
        VM_UP.labels(namespace, name).set(1 if reachable == "True" else 0)
    facts = status.get("facts") or {}
    if isinstance(facts.get("load1"), int | float):
        VM_LOAD1.labels(namespace, name).set(facts["load1"])
    if isinstance(facts.get("memoryAvailableBytes"), int | float):
        VM_MEMORY_AVAILABLE.labels(namespace, name).set(facts["memoryAvailableBytes"])
    total, used = facts.get("rootDiskTotalBytes"), facts.get("rootDiskUsedBytes")
    if isinstance(total, int | float) and isinstance(used, int | float) and total > 0:
        VM_ROOT_DISK_USED.labels(namespace, name).set(used / total)


def forget_vm(namespace: str, name: str) -> None:
    for gauge in (VM_UP, VM_LOAD1, VM_MEMORY_AVAILABLE, VM_ROOT_DISK_USED):
        try:
            gauge.remove(namespace, name)
        except KeyError:
            pass
    for state in ("desired", "ready"):
        try:
            WORKER_REPLICAS.remove(namespace, name, state)
        except KeyError:
            pass
    unwatch_queue(namespace, name)


# Queue depth: read from the broker when Prometheus scrapes, for the queues of known VMs.
_queues_lock = threading.Lock()
_queues: dict[tuple[str, str], str] = {}


def watch_queue(namespace: str, vm: str, queue: str) -> None:
    with _queues_lock:
        _queues[(namespace, vm)] = queue


def unwatch_queue(namespace: str, vm: str) -> None:
    with _queues_lock:
        _queues.pop((namespace, vm), None)


def watched_queues(extra: Iterable[str] = ()) -> list[str]:
    with _queues_lock:
        return sorted(set(_queues.values()) | set(extra))


QueueSizer = Callable[[list[str]], dict[str, int]]


def broker_queue_sizer(broker_url: str, timeout: float = 3.0) -> QueueSizer:
    """Ready messages per queue (``vmfleet.queues.QueueDepth``, the autoscaler's reading):
    a queue that could not be read has no sample (logged), never a 0."""
    return QueueDepth(broker_url, timeout).sizes


class QueueDepthCollector(Collector):
    """``vmfleet_queue_depth{queue}``, measured at scrape time (a broken broker: no samples)."""

    def __init__(self, sizer: QueueSizer, extra_queues: Iterable[str] = ()) -> None:
        self.sizer = sizer
        self.extra_queues = tuple(extra_queues)

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return [GaugeMetricFamily(QUEUE_DEPTH_NAME, self._help, labels=["queue"])]

    _help = "Messages waiting in a Celery queue (the VMs' queues and the transfer queue)."

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily(QUEUE_DEPTH_NAME, self._help, labels=["queue"])
        queues = watched_queues(self.extra_queues)
        if queues:
            try:
                sizes = self.sizer(queues)
            except Exception as exc:  # noqa: BLE001 - the scrape still returns the rest
                log.warning("Could not read queue depths from the broker: %s", exc)
                sizes = {}
            for queue in queues:
                if queue in sizes:
                    family.add_metric([queue], sizes[queue])
        yield family


_collector: QueueDepthCollector | None = None


def register_queue_depth(sizer: QueueSizer, extra_queues: Iterable[str] = ()) -> None:
    """Register the queue depth collector once per process."""
    global _collector
    with _queues_lock:
        if _collector is not None:
            return
        _collector = QueueDepthCollector(sizer, extra_queues)
    prometheus_client.REGISTRY.register(_collector)


class BrokerMemoryCollector(Collector):
    """``vmfleet_broker_memory_used_ratio``: the state Redis' ``used_memory`` over its
    ``maxmemory`` (``INFO memory``), at scrape time; no sample without a ``maxmemory``."""

    _help = ("Used fraction of the Redis' maxmemory (claims, reports and, with the Redis "
             "broker, queued messages); writes fail when it reaches 1 (noeviction).")

    def __init__(self, info: Callable[[], Mapping[str, Any]]) -> None:
        self.info = info

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return [GaugeMetricFamily(BROKER_MEMORY_NAME, self._help)]

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily(BROKER_MEMORY_NAME, self._help)
        try:
            info = self.info()
            used, limit = float(info.get("used_memory", 0)), float(info.get("maxmemory", 0))
        except Exception as exc:  # noqa: BLE001 - the scrape still returns the rest
            log.warning("Could not read the broker's memory use: %s", exc)
            limit = 0.0
        if limit > 0:
            family.add_metric([], used / limit)
        yield family


def start_controller_metrics(conf: Settings, extra_queues: Iterable[str] = (),
                             sizer: QueueSizer | None = None,
                             memory_info: Callable[[], Mapping[str, Any]] | None = None
                             ) -> int | None:
    """The controller's endpoint (default port 9807) with queue depths from the broker
    (``sizer``, default read through kombu) and, given ``memory_info`` (Redis ``INFO
    memory``), the broker's memory use."""
    port = metrics_port(CONTROLLER_PORT, conf)
    if port == 0:
        log.info("Metrics are off (%s=0)", PORT_ENV)
        return None
    register_queue_depth(sizer or broker_queue_sizer(conf.broker_url), extra_queues)
    if memory_info is not None:
        register_broker_memory(memory_info)
    return start_metrics_server(port, metrics_address(conf))


_memory_collector: BrokerMemoryCollector | None = None


def register_broker_memory(info: Callable[[], Mapping[str, Any]]) -> None:
    """Register the broker memory collector once per process."""
    global _memory_collector
    with _queues_lock:
        if _memory_collector is not None:
            return
        _memory_collector = BrokerMemoryCollector(info)
    prometheus_client.REGISTRY.register(_memory_collector)


def start_worker_metrics(conf: Settings) -> int | None:
    """A worker's endpoint (default port 9808)."""
    return start_metrics_server(metrics_port(WORKER_PORT, conf), metrics_address(conf))


__all__ = [
    "CONTROLLER_PORT", "METRIC_NAMES", "PORT_ENV", "WORKER_PORT", "QueueDepthCollector",
    "command_claimed", "command_finished", "counts_errors", "forget_vm", "observe_vm",
    "observe_workers", "ssh_connecting", "start_controller_metrics", "start_metrics_server",
    "start_worker_metrics", "track_pool",
]
