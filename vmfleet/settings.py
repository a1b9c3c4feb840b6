"""vmfleet's settings: every ``VMFLEET_*`` environment variable the product reads, once.

Each setting is one field of :class:`Settings`, with its variable, type, default, who
reads it (the controller, the workers, or both) and a one-line description. Each
composition root reads the environment once at start (:func:`load`: the controller in
``controller.context.Context.from_environment``, which keeps them as ``Context.settings``;
a worker in ``remote_tasks.app``) and hands the :class:`Settings` to what needs them;
deep code takes them as an argument, never from ``os.environ`` or a global. A bad value
stops the process at start with an error that names the variable
("VMFLEET_HEARTBEAT_SECONDS='x' is not a number"), not at the first command.

"Where am I running?" has one answer, :func:`in_cluster`.

The README's settings table and the chart's notes on them are generated from here
(:mod:`vmfleet.settingsdoc`: ``vmfleet settings --write``; ``vmfleet settings --check``
and a unit test fail when they drift).

Not product settings: the local environment's and the tests' variables
(``VMFLEET_DEV_DIR``, ``VMFLEET_E2E_*``, ``VMFLEET_CONTROLPLANE_*``, ``VMFLEET_CACHE_DIR``,
``VMFLEET_HELM_*``, ``VMFLEET_TEST_*``) are read by the dev kit and the test suite only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from vmfleet.api.constants import RUNTIME_DEPLOYMENT, RUNTIME_PROCESS
from vmfleet.api.output import STATUS_OUTPUT_BUDGET
from vmfleet.tenancy import is_redis

Reader = Literal["controller", "worker", "both"]
CONTROLLER: Final = "controller"
WORKER: Final = "worker"
BOTH: Final = "both"
READERS: Final = (CONTROLLER, WORKER, BOTH)

CONTROLLER_METRICS_PORT: Final = 9807
WORKER_METRICS_PORT: Final = 9808
DEFAULT_BROKER_URL: Final = "redis://127.0.0.1:6379/0"
REDISPATCH_SECONDS: Final = 300.0
DEFAULT_API_CONNECTIONS: Final = 32

#: Variables of the dev kit and the tests (prefixes): documented as not product settings.
NOT_PRODUCT_SETTINGS: Final = ("VMFLEET_DEV_DIR", "VMFLEET_E2E_", "VMFLEET_CONTROLPLANE_",
                               "VMFLEET_CACHE_DIR", "VMFLEET_HELM_", "VMFLEET_TEST_")


class SettingsError(ValueError):
    """A ``VMFLEET_*`` variable holds a value vmfleet cannot use."""


def setting(env: str, default: Any, reader: Reader, doc: str, *,
            minimum: float | None = None, maximum: float | None = None,
            choices: tuple[str, ...] = (), default_doc: str | None = None,
            hint: str = "", parse: Callable[[str, str], Any] | None = None) -> Any:
    """A field of :class:`Settings` read from ``env``.

    ``default_doc`` describes a default that depends on where the process runs (the
    field's default is then None and :meth:`Settings.from_environment` fills it in);
    ``hint`` ends the error about a bad value (what to do); ``parse(env, raw)`` reads a
    value that is not a plain bool, number or string (raising :class:`SettingsError`).
    """
    return field(default=default, hash=False if parse is not None else None, metadata={
        "env": env, "reader": reader, "doc": doc, "minimum": minimum, "maximum": maximum,
        "choices": choices, "default_doc": default_doc, "hint": hint, "parse": parse,
    })


def in_cluster(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process runs in a Kubernetes pod and reaches the API server with the
    pod's service account: ``KUBERNETES_SERVICE_HOST`` is set (the kubelet sets it in every
    pod) and no ``KUBECONFIG`` names another way in. The one rule for "where am I
    running?": it picks the defaults below (worker runtime, listen addresses) and how
    :mod:`vmfleet.kube` and the Airflow hook load their client configuration."""
    environ = os.environ if environ is None else environ
    return bool(environ.get("KUBERNETES_SERVICE_HOST")) and not environ.get("KUBECONFIG")


def env_entries(env: str, raw: str) -> tuple[dict[str, Any], ...]:
    """A JSON list of container env entries (``{"name": …, "value": …}`` objects)."""
    try:
        entries = json.loads(raw)
    except ValueError as exc:
        raise SettingsError(f"{env} is not JSON: {exc}") from None
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "name" in e
                                                for e in entries):
        raise SettingsError(f"{env} must be a JSON list of {{name, value}} objects")
    return tuple(entries)


@dataclass(frozen=True)
class Settings:
    # ------------------------------------------------------------------ both
    broker_url: str = setting(
        "VMFLEET_BROKER_URL", DEFAULT_BROKER_URL, BOTH,
        "Celery broker (`redis://…` or `amqp://…`); the chart sets it from `broker.*`.")
    metrics_port: int | None = setting(
        "VMFLEET_METRICS_PORT", None, BOTH,
        "Port of `/metrics`; `0` turns it off (chart: `metrics.controllerPort`, "
        "`metrics.workerPort`).",
        minimum=0, maximum=65535, hint="use 0 to turn metrics off",
        default_doc=f"{CONTROLLER_METRICS_PORT} (controller), {WORKER_METRICS_PORT} (worker)")
    metrics_address: str | None = setting(
        "VMFLEET_METRICS_ADDRESS", None, BOTH,
        "Address `/metrics` listens on.",
        default_doc="`0.0.0.0` in a cluster, else `127.0.0.1`")
    state_url: str | None = setting(
        "VMFLEET_STATE_URL", None, BOTH,
        "Redis of claims, heartbeats, reports, cancels and the VM slots (default: "
        "`VMFLEET_SLOTS_URL`, else the broker, which must then be Redis).")
    output_url: str | None = setting(
        "VMFLEET_OUTPUT_URL", None, BOTH,
        "A Redis of its own (never the broker) keeping each attempt's whole output for "
        "`vmfleet logs`; unset: only the status tails (chart: `outputStore`).")
    api_connections: int = setting(
        "VMFLEET_API_CONNECTIONS", DEFAULT_API_CONNECTIONS, BOTH,
        "Pooled HTTP connections to the Kubernetes API server per process.", minimum=1)
    # ------------------------------------------------------------------ controller
    worker_runtime: str | None = setting(
        "VMFLEET_WORKER_RUNTIME", None, CONTROLLER,
        "Where workers run: `Deployment` (one per RemoteVM) or `Process` (local child "
        "processes; dev and tests). Chart: `controller.workerRuntime`.",
        choices=(RUNTIME_PROCESS, RUNTIME_DEPLOYMENT),
        default_doc="`Deployment` in a cluster, else `Process`")
    controller_id: str | None = setting(
        "VMFLEET_CONTROLLER_ID", None, CONTROLLER,
        "This controller's scope in Redis (its reports stream, heartbeats, live set): "
        "controllers sharing one Redis need different ones (the chart sets the release).",
        default_doc="derived from the namespaces it watches")
    watch_namespaces: str | None = setting(
        "VMFLEET_WATCH_NAMESPACES", None, CONTROLLER,
        "Comma-separated namespaces the controller lists at start (unset: every namespace); "
        "the chart sets it with `watchNamespaces`.")
    worker_image: str = setting(
        "VMFLEET_WORKER_IMAGE", "vmfleet:0.1.0", CONTROLLER,
        "Image of the worker Deployments (the chart sets its own image).")
    worker_image_pull_policy: str = setting(
        "VMFLEET_WORKER_IMAGE_PULL_POLICY", "IfNotPresent", CONTROLLER,
        "Image pull policy of the worker Deployments (chart: `image.pullPolicy`).",
        choices=("Always", "IfNotPresent", "Never"))
    worker_host_network: bool = setting(
        "VMFLEET_WORKER_HOST_NETWORK", False, CONTROLLER,
        "Worker pods on the node's network (chart: `hostNetwork`; the local node's VMs are "
        "on its loopback).")
    worker_extra_env: tuple[dict[str, Any], ...] = setting(
        "VMFLEET_WORKER_EXTRA_ENV", (), CONTROLLER,
        "Extra env entries of the worker containers, a JSON list of `{name, value}` objects "
        "(chart: `workers.extraEnv`).", parse=env_entries, default_doc="unset")
    broker_secret_name: str = setting(
        "VMFLEET_BROKER_SECRET_NAME", "vmfleet-broker", CONTROLLER,
        "Secret in each namespace with worker pods, holding its broker URL (and `state-url`); "
        "the pods reference it, never a literal URL (the chart creates it).")
    broker_secret_key: str = setting(
        "VMFLEET_BROKER_SECRET_KEY", "url", CONTROLLER,
        "Key of the broker URL in that Secret (chart: `broker.external.secretKey`).")
    broker_users: str = setting(
        "VMFLEET_BROKER_USERS", "Derived", CONTROLLER,
        "`Process` runtime: `Derived` makes a Redis ACL user per namespace for its workers; "
        "`Shared` gives workers the controller's own URLs (a Redis without ACLs).",
        choices=("Derived", "Shared"))
    transfer_service_account: str | None = setting(
        "VMFLEET_TRANSFER_SERVICE_ACCOUNT", None, CONTROLLER,
        "Per-namespace ServiceAccount of the transfer workers (chart: one per watched "
        "namespace); unset: they hold no token.")
    worker_log_dir: str = setting(
        "VMFLEET_WORKER_LOG_DIR", ".vmfleet/workers", CONTROLLER,
        "`Process` runtime: where the worker processes' logs go.")
    worker_lost_seconds: float = setting(
        "VMFLEET_WORKER_LOST_SECONDS", 30.0, CONTROLLER,
        "A running attempt whose heartbeat is older than this is lost (retried or failed).",
        minimum=0)
    redispatch_seconds: float = setting(
        "VMFLEET_REDISPATCH_SECONDS", REDISPATCH_SECONDS, CONTROLLER,
        "A queued attempt no worker claimed within this is sent again.", minimum=0)
    signing_key_file: str | None = setting(
        "VMFLEET_SIGNING_KEY_FILE", None, CONTROLLER,
        "Required: the Ed25519 private key (PEM) every message to the workers is signed with "
        "(chart: Secret `<release>-signing-key`).")
    message_ttl_seconds: float | None = setting(
        "VMFLEET_MESSAGE_TTL_SECONDS", None, CONTROLLER,
        "A signed message expires this long after it is sent (keep it above "
        "`VMFLEET_REDISPATCH_SECONDS`: an unclaimed attempt is resent, signed anew).",
        minimum=1, default_doc="`VMFLEET_REDISPATCH_SECONDS` + 60")
    verify_key_configmap: str | None = setting(
        "VMFLEET_VERIFY_KEY_CONFIGMAP", None, CONTROLLER,
        "ConfigMap (in `POD_NAMESPACE`) the controller writes its public key into at start, "
        "for the chart's transfer worker.")
    status_output_budget_bytes: int = setting(
        "VMFLEET_STATUS_OUTPUT_BUDGET_BYTES", STATUS_OUTPUT_BUDGET, CONTROLLER,
        "Output tails one RemoteCommand's status keeps over all its VMs (each: "
        "min(output.maxBytes, budget / VMs / 2); cut: `outputTruncated`).",
        minimum=0, maximum=8 * 1024 * 1024)
    disk_pressure_ratio: float = setting(
        "VMFLEET_DISK_PRESSURE_RATIO", 0.90, CONTROLLER,
        "`DiskPressure` when the VM's root filesystem is at least this full.",
        minimum=0, maximum=1)
    memory_pressure_available_ratio: float = setting(
        "VMFLEET_MEMORY_PRESSURE_AVAILABLE_RATIO", 0.10, CONTROLLER,
        "`MemoryPressure` when less than this fraction of the VM's memory is available.",
        minimum=0, maximum=1)
    leader_election: bool = setting(
        "VMFLEET_LEADER_ELECTION", False, CONTROLLER,
        "Leader election on a Lease: of several controller replicas only the holder "
        "dispatches and writes, the others wait warm (the chart turns it on).")
    leader_election_namespace: str | None = setting(
        "VMFLEET_LEADER_ELECTION_NAMESPACE", None, CONTROLLER,
        "Namespace of the Lease (the chart: the release namespace).",
        default_doc="the kubeconfig context's namespace (in a pod: its own)")
    leader_election_name: str | None = setting(
        "VMFLEET_LEADER_ELECTION_NAME", None, CONTROLLER,
        "Name of the Lease (the chart pre-creates `<fullname>-controller` and names it in "
        "the controller's Role).", default_doc="`vmfleet-controller-<controller id>`")
    lease_duration_seconds: float = setting(
        "VMFLEET_LEASE_DURATION_SECONDS", 15.0, CONTROLLER,
        "How long a candidate waits after it last saw the Lease change before it takes it.",
        minimum=1)
    renew_deadline_seconds: float = setting(
        "VMFLEET_RENEW_DEADLINE_SECONDS", 10.0, CONTROLLER,
        "The leader stops writing when no renewal landed within this (less than the lease "
        "duration).", minimum=1)
    retry_period_seconds: float = setting(
        "VMFLEET_RETRY_PERIOD_SECONDS", 2.0, CONTROLLER,
        "How often the leader renews and a candidate tries to acquire.", minimum=0.1)
    health_port: int = setting(
        "VMFLEET_HEALTH_PORT", 0, CONTROLLER,
        "Port of the controller's `/readyz` (caches synced, broker and API reachable; a "
        "standby is Ready too); `0`: off (chart: `controller.readinessPort`).",
        minimum=0, maximum=65535)
    logs_api_port: int = setting(
        "VMFLEET_LOGS_API_PORT", 0, CONTROLLER,
        "HTTPS port of the output API (`logs.vmfleet.io`, behind the API server's "
        "aggregation layer); `0`: off (chart: `logsApi.port`).", minimum=0, maximum=65535)
    logs_api_address: str | None = setting(
        "VMFLEET_LOGS_API_ADDRESS", None, CONTROLLER,
        "Address the output API listens on.",
        default_doc="`0.0.0.0` in a cluster, else `127.0.0.1`")
    logs_api_cert_file: str | None = setting(
        "VMFLEET_LOGS_API_CERT_FILE", None, CONTROLLER,
        "Serving certificate (PEM) of the output API for `<service>.<namespace>.svc`, signed "
        "by the APIService's caBundle.")
    logs_api_key_file: str | None = setting(
        "VMFLEET_LOGS_API_KEY_FILE", None, CONTROLLER,
        "Its private key (PEM).")
    # ------------------------------------------------------------------ worker
    heartbeat_seconds: float = setting(
        "VMFLEET_HEARTBEAT_SECONDS", 5.0, WORKER,
        "How often a worker reports that a running attempt is alive.", minimum=0)
    kill_grace_seconds: float = setting(
        "VMFLEET_KILL_GRACE_SECONDS", 3.0, WORKER,
        "On timeout or cancel: TERM, then KILL of the remote process group after this.",
        minimum=0)
    slots_url: str | None = setting(
        "VMFLEET_SLOTS_URL", None, WORKER,
        "Redis holding the VM-wide `maxConcurrentCommands` slots (default: the state's "
        "Redis, `VMFLEET_STATE_URL`, else the broker if it is Redis).")
    max_concurrent_commands: int | None = setting(
        "VMFLEET_MAX_CONCURRENT_COMMANDS", None, WORKER,
        "Set by the controller: the VM's `maxConcurrentCommands` (no VM-wide limit if unset).",
        minimum=1)
    probe_dir: str | None = setting(
        "VMFLEET_PROBE_DIR", None, WORKER,
        "Where the worker keeps its readiness and liveness files for exec probes (set by the "
        "controller and the chart; unset: no probe files).")
    pod_name: str | None = setting(
        "VMFLEET_POD_NAME", None, WORKER,
        "Set by the controller: the worker's pod (downward API), named as the worker that ran "
        "an attempt in its result, Event and audit line.",
        default_doc="unset: Celery's node name")
    namespace: str | None = setting(
        "VMFLEET_NAMESPACE", None, WORKER,
        "Set by the controller: the namespace a worker serves (its broker keys are under "
        "`vmfleet.<namespace>:`).")
    credentials_dir: str | None = setting(
        "VMFLEET_CREDENTIALS_DIR", None, WORKER,
        "Where the workers' VMs' credentials Secrets are mounted, one folder per Secret "
        "(set by the controller).", default_doc="`/var/run/secrets/vmfleet.io/ssh`")

    output_max_bytes: int = setting(
        "VMFLEET_OUTPUT_MAX_BYTES", 16 * 1024 * 1024, WORKER,
        "Output kept per attempt in the output store (both streams); past it the rest is "
        "cut, the cut marked.", minimum=0, maximum=1024 * 1024 * 1024)
    output_retention_seconds: float = setting(
        "VMFLEET_OUTPUT_RETENTION_SECONDS", 86400.0, WORKER,
        "How long an attempt's output is kept after its last line (a shorter "
        "`ttlSecondsAfterFinished` wins).", minimum=60)
    output_read_rate_bytes: int = setting(
        "VMFLEET_OUTPUT_READ_RATE_BYTES", 4 * 1024 * 1024, WORKER,
        "Past a first second's worth, a command's output is read at most this fast "
        "(bytes/s; SSH flow control holds a louder one back); `0`: no limit.", minimum=0)
    output_namespace_quota_bytes: int = setting(
        "VMFLEET_OUTPUT_NAMESPACE_QUOTA_BYTES", 256 * 1024 * 1024, WORKER,
        "Output one namespace may store within a retention period; past it, output is "
        "cut (marked); `0`: no quota.", minimum=0)

    verify_key: str | None = setting(
        "VMFLEET_VERIFY_KEY", None, WORKER,
        "Set by the controller: its Ed25519 public key (PEM); without it (or the file) a "
        "worker runs nothing.")
    verify_key_file: str | None = setting(
        "VMFLEET_VERIFY_KEY_FILE", None, WORKER,
        "A file holding that public key instead (chart: the transfer worker).")
    served_vms: str | None = setting(
        "VMFLEET_SERVED_VMS", None, WORKER,
        "Set by the controller: the VMs this worker serves with their Secrets, JSON "
        "`{\"<ns>/<vm>\": \"<secret>\"}`; others are refused.")

    # ------------------------------------------------------------------ reading

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Every setting from ``environ`` (default: ``os.environ``); an unset or empty
        variable keeps its default. Raises :class:`SettingsError` naming each bad value."""
        environ = os.environ if environ is None else environ
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        problems: list[str] = []
        for f in dataclasses.fields(cls):
            raw = environ.get(f.metadata["env"], "").strip()
            if not raw:
                continue
            try:
                parse = f.metadata["parse"]
                values[f.name] = (parse(f.metadata["env"], raw) if parse is not None
                                  else _parse(f, hints[f.name], raw))
            except SettingsError as exc:
                hint = f.metadata["hint"]
                problems.append(f"{exc} ({hint})" if hint else str(exc))
        if problems:
            raise SettingsError("; ".join(problems))
        pod = in_cluster(environ)
        values.setdefault("worker_runtime", RUNTIME_DEPLOYMENT if pod else RUNTIME_PROCESS)
        values.setdefault("metrics_address", "0.0.0.0" if pod else "127.0.0.1")
        values.setdefault("logs_api_address", "0.0.0.0" if pod else "127.0.0.1")
        values.setdefault("message_ttl_seconds",
                          values.get("redispatch_seconds", REDISPATCH_SECONDS) + 60.0)
        return cls(**values)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    def state_redis_url(self) -> str | None:
        """The Redis of the shared state (``vmfleet.state``): ``VMFLEET_STATE_URL``, else
        ``VMFLEET_SLOTS_URL``, else a Redis broker; None with another broker and neither."""
        explicit = self.state_url or self.slots_url
        if explicit:
            return explicit
        return self.broker_url if is_redis(self.broker_url) else None

    def slots_redis_url(self) -> str | None:
        """The Redis of the VMs' ``maxConcurrentCommands`` slots: ``VMFLEET_SLOTS_URL``,
        else the state's (:meth:`state_redis_url`). So with RabbitMQ the controller's
        ``VMFLEET_STATE_URL`` holds the slots too and the limit holds across a VM's worker
        replicas; None (the limit holds per replica) only when no Redis is named at all."""
        return self.slots_url or self.state_redis_url()

    def metrics_port_or(self, default: int) -> int:
        """The metrics port, or the role's ``default`` when ``VMFLEET_METRICS_PORT`` is unset."""
        return default if self.metrics_port is None else self.metrics_port


def env_of(name: str) -> str:
    """The variable of the field ``name`` of :class:`Settings`."""
    for f in dataclasses.fields(Settings):
        if f.name == name:
            return str(f.metadata["env"])
    raise KeyError(name)


def _parse(f: dataclasses.Field[Any], hint: Any, raw: str) -> Any:
    env = f.metadata["env"]
    kinds = {t for t in typing.get_args(hint) if t is not type(None)} or {hint}
    (kind,) = kinds
    value: Any
    if kind is bool:
        lowered = raw.strip().lower()
        if lowered not in ("true", "false", "1", "0", "yes", "no"):
            raise SettingsError(f"{env}={raw!r} is not true or false")
        return lowered in ("true", "1", "yes")
    if kind is int:
        try:
            value = int(raw)
        except ValueError:
            raise SettingsError(f"{env}={raw!r} is not a whole number") from None
    elif kind is float:
        try:
            value = float(raw)
        except ValueError:
            raise SettingsError(f"{env}={raw!r} is not a number") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise SettingsError(f"{env}={raw!r} is not a finite number")
    else:
        value = raw
    minimum, maximum, choices = f.metadata["minimum"], f.metadata["maximum"], f.metadata["choices"]
    if minimum is not None and value < minimum or maximum is not None and value > maximum:
        bounds = (f"between {minimum:g} and {maximum:g}" if minimum is not None and maximum is not None
                  else f"at least {minimum:g}" if minimum is not None else f"at most {maximum:g}")
        raise SettingsError(f"{env}={raw!r} is out of range: use a value {bounds}")
    if choices and value not in choices:
        raise SettingsError(f"{env}={raw!r} is not one of {', '.join(choices)}")
    return value


# ---------------------------------------------------------------------- the process's


def load(environ: Mapping[str, str] | None = None) -> Settings:
    """Read the environment once, at a composition root (``controller.context.Context``,
    the worker's ``remote_tasks.app``, the CLI), which passes the result down: nothing
    reads the environment again later."""
    return Settings.from_environment(environ)


# ---------------------------------------------------------------------- documentation


@dataclass(frozen=True)
class Doc:
    name: str  # the field of Settings
    env: str
    reader: str
    default: str
    doc: str


def documented() -> list[Doc]:
    """Every setting, controller first, then both, then worker (the table's order)."""
    order = {CONTROLLER: 0, BOTH: 1, WORKER: 2}
    docs = []
    for f in dataclasses.fields(Settings):
        meta = f.metadata
        if meta["default_doc"] is not None:
            default = meta["default_doc"]
        elif f.default is None:
            default = "unset"
        else:
            default = f"`{f.default:g}`" if isinstance(f.default, float) else f"`{f.default}`"
        docs.append(Doc(f.name, meta["env"], meta["reader"], default, meta["doc"]))
    return sorted(docs, key=lambda d: order[d.reader])


__all__ = ["BOTH", "CONTROLLER", "WORKER", "Doc", "Settings", "SettingsError",
           "documented", "env_entries", "env_of", "in_cluster", "load"]
