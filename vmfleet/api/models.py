"""The vmfleet API (group ``vmfleet.io``, version ``v1alpha1``): the single source of truth.

Each field is defined once here, with its description, default and bounds; the CRDs in
``crds/`` are generated from these models (``vmfleet crds generate``) and CI fails when
they drift. Field names are snake_case in Python and camelCase on the wire.
"""

from __future__ import annotations

import re
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    StrictInt,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from .constants import (
    DNS_LABEL_PATTERN,
    ENV_NAME_PATTERN,
    HOST_KEY_PINNED,
    QUEUE_PATTERN,
    Phase,
    is_env_name,
    reserved_parameter,
)
from .counts import PERCENT_PATTERN
from .plan import KeyRef, Source

# Bounds keep every CEL rule's estimated cost inside the API server's budget and every
# object far below etcd's size limit.
MAX_NAME = 253
MAX_COMMAND = 64 * 1024
MAX_ARG = 4096
MAX_SCRIPT = 256 * 1024
MAX_STDIN = 256 * 1024
MAX_PATH = 4096
MAX_ITEMS = 256
MAX_OUTPUT_BYTES = 256 * 1024
MAX_MESSAGE = 32 * 1024
#: A worker pod's default grace to finish what it runs when it is stopped (seconds).
DEFAULT_WORKER_GRACE_SECONDS = 300

K8sName = Annotated[str, Field(min_length=1, max_length=MAX_NAME, pattern=DNS_LABEL_PATTERN)]
MAX_TARGETS = 10000


def cel(rule: str, message: str, field_path: str | None = None) -> JsonValue:
    """One ``x-kubernetes-validations`` entry."""
    entry: dict[str, JsonValue] = {"rule": rule, "message": message}
    if field_path:
        entry["fieldPath"] = field_path
    return entry


def api_config(*rules: JsonValue) -> ConfigDict:
    """Model config of spec objects: camelCase on the wire, unknown fields refused, and
    ``rules`` (``cel(...)`` entries) as the object's ``x-kubernetes-validations``."""
    config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", use_enum_values=True
    )
    if rules:
        config["json_schema_extra"] = {"x-kubernetes-validations": list(rules)}
    return config


def _int_or_percent(minimum: int) -> WithJsonSchema:
    """The CRD schema of a count given as a number (at least ``minimum``) or as a
    percentage of the matched VMs: ``x-kubernetes-int-or-string`` with a CEL rule."""
    rule = (f"type(self) == int ? (self >= {minimum} && self <= {MAX_TARGETS}) "
            f": self.matches('{PERCENT_PATTERN}')")
    return WithJsonSchema({
        "x-kubernetes-int-or-string": True,
        "x-kubernetes-validations": [cel(
            rule, f"must be a number from {minimum} to {MAX_TARGETS} or a percentage from "
            "1% to 100% (a string such as \"10%\")")],
    })


_Percent = Annotated[str, Field(pattern=PERCENT_PATTERN, max_length=4)]
# A number of VMs, or a percentage of the matched VMs ("10%": rounded down, at least 1).
CountOrPercent = Annotated[Annotated[int, Field(ge=1, le=MAX_TARGETS)] | _Percent,
                           _int_or_percent(1)]
CountOrPercentFromZero = Annotated[Annotated[int, Field(ge=0, le=MAX_TARGETS)] | _Percent,
                                   _int_or_percent(0)]


class ApiModel(BaseModel):
    """Spec models: camelCase on the wire, unknown fields refused (as the API server does)."""

    model_config = api_config()

    def wire(self) -> dict[str, Any]:
        """The JSON body as the API server stores it (camelCase, no unset optionals)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class StatusModel(ApiModel):
    """Status models tolerate fields written by newer versions."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="ignore", use_enum_values=True
    )


# --------------------------------------------------------------------------- shared


class ConditionStatus(str, Enum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class ObjectCondition(StatusModel):
    """A condition in the Kubernetes style (as ``metav1.Condition``)."""

    type: str = Field(max_length=316, description="Type of the condition, e.g. Complete or Ready.")
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str | None = Field(
        None, max_length=1024, description="One CamelCase word saying why the condition is set."
    )
    message: str | None = Field(None, max_length=MAX_MESSAGE, description="Details for a person.")
    last_transition_time: str | None = Field(
        None, description="When the status last changed (RFC 3339)."
    )
    observed_generation: int | None = Field(None, ge=0)


class LocalObjectReference(ApiModel):
    name: K8sName = Field(description="Name of the object in the same namespace.")


class LabelSelectorRequirement(ApiModel):
    key: str = Field(min_length=1, max_length=317)
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: list[Annotated[str, Field(max_length=63)]] | None = Field(None, max_length=MAX_ITEMS)


class LabelSelector(ApiModel):
    """A label selector over RemoteVMs (as in Deployments and Jobs)."""

    match_labels: dict[str, Annotated[str, Field(max_length=63)]] | None = Field(
        None, max_length=64, description="Labels a RemoteVM must all have."
    )
    match_expressions: list[LabelSelectorRequirement] | None = Field(
        None, max_length=64, description="Requirements a RemoteVM must all meet."
    )


# --------------------------------------------------------------------------- RemoteVM


# A resource quantity as Kubernetes writes it ("100m", "1Gi", 2), not negative: the schema
# controller-gen writes for resource.Quantity (int-or-string: an integer, or a string of
# this grammar from k8s.io/apimachinery), which pydantic checks the same way. (A CEL isQuantity() rule per
# map value exceeds the API server's cost budget.)
QUANTITY_PATTERN = (r"^[+]?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
                    r"(([KMGTPE]i)|[numkMGTPE]|([eE][+-]?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$")
_QUANTITY_RE = re.compile(QUANTITY_PATTERN)
QUANTITY_MESSAGE = "must be a resource quantity such as 100m, 1, 512Mi or 2Gi (not negative)"


def _quantity(value: int | str) -> int | str:
    if isinstance(value, bool) or (isinstance(value, int) and value < 0):
        raise ValueError(QUANTITY_MESSAGE)
    if isinstance(value, str) and (len(value) > 64 or not _QUANTITY_RE.fullmatch(value)):
        raise ValueError(QUANTITY_MESSAGE)
    return value


Quantity = Annotated[
    int | str,
    AfterValidator(_quantity),
    WithJsonSchema({
        "minimum": 0,
        "pattern": QUANTITY_PATTERN,
        "x-kubernetes-int-or-string": True,
    }),
]
ResourceName = Annotated[str, Field(min_length=1, max_length=253)]


class ResourceClaim(ApiModel):
    name: str = Field(min_length=1, max_length=MAX_NAME, description="A claim of the pod spec.")
    request: str | None = Field(None, max_length=MAX_NAME)


class ResourceRequirements(ApiModel):
    """A core/v1 ResourceRequirements: requests and limits as quantities."""

    limits: dict[ResourceName, Quantity] | None = Field(
        None, max_length=32, description="Most of each resource a worker pod may use.")
    requests: dict[ResourceName, Quantity] | None = Field(
        None, max_length=32, description="Resources a worker pod is scheduled with.")
    claims: list[ResourceClaim] | None = Field(None, max_length=16)


class Autoscale(ApiModel):
    model_config = api_config(cel(
        "self.minReplicas <= self.maxReplicas",
        "workers.autoscale.minReplicas must not exceed maxReplicas", ".minReplicas"))

    min_replicas: int = Field(0, ge=0, le=100, description="Fewest workers; 0 scales to zero when idle.")
    max_replicas: int = Field(1, ge=1, le=100, description="Most workers.")
    target_backlog_per_replica: int = Field(
        4, ge=1, le=10000, description="Queued plus running commands one worker should carry."
    )
    scale_down_delay_seconds: int = Field(
        300, ge=0, le=86400, description="Idle time before workers are removed."
    )

    @model_validator(mode="after")
    def _floor_below_ceiling(self) -> Autoscale:
        if self.min_replicas > self.max_replicas:
            raise ValueError("workers.autoscale.minReplicas must not exceed maxReplicas")
        return self


class WorkersSpec(ApiModel):
    """How many Celery workers serve this VM's queue."""

    model_config = api_config(cel(
        "!(has(self.replicas) && has(self.autoscale))",
        "set workers.replicas or workers.autoscale, not both"))

    replicas: int | None = Field(None, ge=0, le=100, description="A fixed number of workers.")
    autoscale: Autoscale | None = Field(None, description="Size the workers to the queue backlog.")
    resources: ResourceRequirements | None = Field(
        None,
        description="Resource requests and limits of worker pods (a core/v1 "
        "ResourceRequirements: quantities such as 100m or 1Gi).",
    )
    termination_grace_period_seconds: int = Field(
        DEFAULT_WORKER_GRACE_SECONDS, ge=0, le=86400,
        description="Seconds a stopping worker pod (a drain, a rollout, a scale-down) has to "
        "finish the commands it runs; it takes no new one meanwhile. An attempt still running "
        "when it runs out ends WorkerLost and is retried without counting against "
        "retries.limit (unless retries.countDisruptions). A pool takes its VMs' largest.",
    )

    @model_validator(mode="after")
    def _one_mode(self) -> WorkersSpec:
        if self.replicas is not None and self.autoscale is not None:
            raise ValueError("set workers.replicas or workers.autoscale, not both")
        return self


class HealthCheck(ApiModel):
    period_seconds: int = Field(60, ge=5, le=86400, description="Seconds between health probes.")
    timeout_seconds: int = Field(10, ge=1, le=600, description="A probe that takes longer fails.")


class ProxyJump(ApiModel):
    vm: K8sName = Field(description="A RemoteVM in the same namespace used as the SSH bastion.")


class RemoteVMSpec(ApiModel):
    """A VM reachable over SSH. Nothing is installed on it."""

    model_config = api_config(
        cel(
            "self.hostKeyPolicy != 'Pinned' || (has(self.hostKeys) && size(self.hostKeys) > 0)",
            "hostKeyPolicy Pinned needs hostKeys: list the VM's public host keys "
            "(ssh-keyscan output lines), or set hostKeyPolicy: TrustOnFirstUse",
            ".hostKeys",
        ),
    )

    host: str = Field(
        min_length=1, max_length=MAX_NAME, pattern=r"^[A-Za-z0-9.:_\[\]-]+$",
        description="DNS name or IP address of the VM.",
    )
    port: int = Field(22, ge=1, le=65535, description="SSH port.")
    user: str = Field(
        min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$",
        description="Remote user commands run as.",
    )
    credentials_secret_ref: LocalObjectReference = Field(
        alias="credentialsSecretRef",
        description="Secret of type kubernetes.io/ssh-auth with key ssh-privatekey "
        "(and optionally passphrase). Keys are never in the RemoteVM itself.",
    )
    host_key_policy: Literal["Pinned", "TrustOnFirstUse"] = Field(
        HOST_KEY_PINNED,
        description="Pinned: only the keys in hostKeys are accepted. TrustOnFirstUse: the first "
        "key seen is recorded in status.hostKey and enforced from then on. A key that does not "
        "match is refused, never added.",
    )
    host_keys: list[Annotated[str, Field(min_length=1, max_length=16384)]] | None = Field(
        None, max_length=16, description="The VM's OpenSSH public host key lines."
    )
    queue: str | None = Field(
        None, min_length=1, max_length=MAX_NAME, pattern=QUEUE_PATTERN,
        description="Celery queue of this VM (default vmfleet.<namespace>.<name>).",
    )
    max_concurrent_commands: int = Field(
        2, ge=1, le=256, description="SSH channels in use on this VM at once."
    )
    workers: WorkersSpec | None = Field(None, description="Worker sizing (default: 1 replica).")
    worker_pool: str | None = Field(
        None, min_length=1, max_length=40, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        description="RemoteVMs naming the same pool share one worker Deployment "
        "(vmfleet-pool-<pool>) that consumes all their queues, sized on their summed backlog; "
        "maxConcurrentCommands still holds per VM. Unset: the VM has workers of its own.",
    )
    health_check: HealthCheck = Field(default_factory=lambda: HealthCheck(), description="Health probes.")
    connect_timeout_seconds: int = Field(30, ge=1, le=600, description="SSH connect timeout.")
    proxy_jump: ProxyJump | None = Field(None, description="Connect through a bastion RemoteVM.")
    paused: bool = Field(False, description="Stop dispatching; queued commands wait.")
    allow_become: bool = Field(
        False,
        description="Whether RemoteCommands may run as another user here (spec.become). A sudo "
        "password, when the VM needs one, is the credentials Secret's key become-password; "
        "NOPASSWD sudoers entries need none.",
    )
    description: str | None = Field(None, max_length=1024, description="Free text for people.")


class VMFacts(StatusModel):
    hostname: str | None = None
    os: str | None = None
    kernel: str | None = None
    uptime_seconds: float | None = None
    load1: float | None = None
    load5: float | None = None
    load15: float | None = None
    memory_total_bytes: int | None = None
    memory_available_bytes: int | None = None
    root_disk_total_bytes: int | None = None
    root_disk_used_bytes: int | None = None
    last_probe_time: str | None = None
    probe_latency_seconds: float | None = None


class VMWorkersStatus(StatusModel):
    runtime: str | None = Field(None, description="Process or Deployment.")
    deployment: str | None = None
    replicas: int | None = None
    ready_replicas: int | None = None
    queue: str | None = None
    queue_depth: int | None = None


class HostKeyStatus(StatusModel):
    fingerprint: str | None = Field(None, description="SHA256 fingerprint of the key seen.")
    key_type: str | None = None
    public_key: str | None = Field(None, max_length=16384, description="Recorded key (TOFU).")
    recorded_time: str | None = None


class ProbeStatus(StatusModel):
    """The outcome of the last health probe, as the worker that ran it reported it."""

    time: str | None = Field(None, description="When the probe ended (RFC 3339).")
    succeeded: bool | None = Field(None, description="True when the VM answered every check.")
    reason: str | None = Field(
        None, max_length=128, description="Named reason: Completed, Timeout, TransportError, "
        "AuthFailed, HostKeyMismatch, CredentialsInvalid, ..."
    )
    message: str | None = Field(None, max_length=MAX_MESSAGE)
    latency_seconds: float | None = Field(None, description="How long the probe took.")
    worker: str | None = Field(
        None, max_length=MAX_NAME, description="The worker pod that ran the probe (the "
        "downward API's metadata.name; the Process runtime: local/<deployment>-<index>.<namespace>)."
    )


class RemoteVMStatus(StatusModel):
    conditions: list[ObjectCondition] | None = Field(
        None, max_length=32,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    host_key: HostKeyStatus | None = None
    facts: VMFacts | None = None
    last_probe: ProbeStatus | None = Field(
        None, description="Written by the worker that probed the VM; folded into conditions."
    )
    workers: VMWorkersStatus | None = None
    observed_generation: int | None = None


# --------------------------------------------------------------------------- RemoteCommand


class FileLocation(ApiModel):
    vm: K8sName = Field(description="RemoteVM name (same namespace).")
    path: str = Field(
        min_length=1, max_length=MAX_PATH, pattern=r"^/",
        description="Absolute path on that VM. Copied literally: never seen by a shell.",
    )


class KeySelector(ApiModel):
    """One key of a ConfigMap or Secret in the same namespace."""

    name: K8sName = Field(description="Name of the ConfigMap or Secret (same namespace).")
    key: str = Field(
        min_length=1, max_length=MAX_NAME, pattern=r"^[-._a-zA-Z0-9]+$", description="The key."
    )


class TransferSource(ApiModel):
    """Where a transfer reads from: a file on a VM, or one key of a ConfigMap or Secret."""

    model_config = api_config(
        cel(
            "[has(self.vm), has(self.configMapKeyRef), has(self.secretKeyRef)]"
            ".filter(x, x).size() == 1",
            "transfer.from needs exactly one source: vm (with path), configMapKeyRef "
            "or secretKeyRef",
        ),
        cel("has(self.vm) == has(self.path)", "transfer.from.vm and .path go together"),
    )

    vm: K8sName | None = Field(None, description="RemoteVM holding the source file.")
    path: str | None = Field(
        None, min_length=1, max_length=MAX_PATH, pattern=r"^/",
        description="Absolute path of the source file on that VM.",
    )
    config_map_key_ref: KeySelector | None = Field(
        None, description="Copy the value of this ConfigMap key (data or binaryData)."
    )
    secret_key_ref: KeySelector | None = Field(
        None, description="Copy the value of this Secret key. Its content is never logged."
    )

    @model_validator(mode="after")
    def _one_source(self) -> TransferSource:
        sources = [self.vm is not None, self.config_map_key_ref is not None,
                   self.secret_key_ref is not None]
        if sum(sources) != 1:
            raise ValueError("transfer.from needs exactly one source: vm (with path), "
                             "configMapKeyRef or secretKeyRef")
        if (self.vm is None) != (self.path is None):
            raise ValueError("transfer.from.vm and transfer.from.path go together")
        return self

    def plan_source(self) -> Source:
        """The plan's form of this ``transfer.from`` (what the transfer worker reads)."""

        def ref(selector: KeySelector | None) -> KeyRef | None:
            return KeyRef(selector.name, selector.key) if selector is not None else None

        return Source(vm=self.vm, path=self.path,
                      config_map_key_ref=ref(self.config_map_key_ref),
                      secret_key_ref=ref(self.secret_key_ref))

    def describe(self) -> str:
        """``vm1:/path``, ``configMap/name/key`` or ``secret/name/key`` (as the plan says it)."""
        return self.plan_source().describe()


class TransferSpec(ApiModel):
    """Copy one file to one or more VMs over SFTP (no shell), streamed and verified."""

    model_config = api_config(
        cel(
            "self.to.all(a, self.to.exists_one(b, b.vm == a.vm))",
            "each destination VM may appear once in transfer.to",
            ".to",
        ),
    )

    from_: TransferSource = Field(alias="from", description="Source file.")
    to: list[FileLocation] = Field(
        min_length=1, max_length=64, description="Destinations, at most one per VM."
    )
    mode: str | None = Field(
        None, pattern=r"^0?[0-7]{3,4}$", max_length=5,
        description="Octal file mode, e.g. 0644 (default: the source file's mode, else 0644).",
    )
    create_dirs: bool = Field(False, description="Create missing parent directories.")
    overwrite: Literal["Always", "Never", "IfDifferent"] = Field(
        "Always",
        description="What to do when the destination exists: replace it (atomically), fail "
        "with DestinationExists, or replace it only when size or sha256 differ.",
    )
    verify: bool = Field(
        False, description="Re-read each destination after writing and compare its sha256."
    )

    @field_validator("to")
    @classmethod
    def _one_per_vm(cls, to: list[FileLocation]) -> list[FileLocation]:
        seen: set[str] = set()
        for loc in to:
            if loc.vm in seen:
                raise ValueError(f"each destination VM may appear once in transfer.to ({loc.vm})")
            seen.add(loc.vm)
        return to


class Retries(ApiModel):
    limit: int = Field(0, ge=0, le=100, description="Extra attempts after the first.")
    count_disruptions: bool | None = Field(
        None, description="Count attempts lost to a planned disruption (their worker pod was "
        "stopped and its grace period ran out) against limit. Unset or false: they are retried "
        "without counting, as the Job controller ignores DisruptionTarget failures.",
    )
    backoff_seconds: int = Field(60, ge=0, le=86400, description="Wait before a retry.")
    on_exit_codes: list[Annotated[int, Field(ge=0, le=255)]] = Field(
        default_factory=list, max_length=256,
        description="Exit codes that are retried; transport errors always are (within limit).",
    )


class OutputSpec(ApiModel):
    max_bytes: int = Field(
        16384, ge=0, le=MAX_OUTPUT_BYTES,
        description="Tail of stdout and of stderr kept in status (each).",
    )


class BecomeSpec(ApiModel):
    """Run the action as another user of the VM (through sudo)."""

    user: str = Field(
        "root", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$",
        description="The user the action runs as.",
    )
    method: Literal["sudo"] = Field(
        "sudo", description="How: sudo -S (a password, if needed, reaches it on stdin).",
    )


class HealthGate(ApiModel):
    timeout_seconds: int = Field(
        300, ge=1, le=86400,
        description="After each wave the controller probes its VMs at once; the next wave "
        "starts only when every VM the wave succeeded on reports Ready from a probe newer than "
        "the wave's end. A VM reporting not Ready, or no fresh Ready within this many seconds, "
        "stops the rollout (the VMs not started end Cancelled, reason HealthGateFailed).",
    )


class Rollout(ApiModel):
    """Run in waves: the next wave starts when the previous one is complete."""

    batch_size: CountOrPercent | None = Field(
        None, description="VMs per wave: a number, or a percentage of the matched VMs such as "
        "\"25%\" (rounded down, at least 1). Unset: one wave (per partition).",
    )
    batch_wait_seconds: int = Field(0, ge=0, le=86400,
                                    description="Pause between the end of a wave and the next.")
    partition_by: str | None = Field(
        None, min_length=1, max_length=317,
        description="A RemoteVM label key: one label value at a time, values in sorted order, "
        "VMs without the label last; a wave never mixes two values.",
    )
    health_gate: HealthGate | None = Field(None, description="Probe each wave's VMs before "
                                           "the next wave starts.")


_ACTIONS = ("[has(self.command), has(self.argv), has(self.script), has(self.transfer), "
            "has(self.templateRef)]")
_RESERVED = "['PATH', 'LD_PRELOAD', 'LD_LIBRARY_PATH', 'BASH_ENV', 'ENV', 'IFS']"
# A template parameter's value: a string or an integer (a boolean is written "true" or
# "false"), checked against the template's declared type by the controller.
ParameterValue = Annotated[StrictInt | Annotated[str, Field(max_length=MAX_ARG)], WithJsonSchema(
    {"x-kubernetes-int-or-string": True,
     "description": "A string or an integer, as the template's parameter says (booleans: "
                    "\"true\" or \"false\")."})]
_TARGETS = "[has(self.vm), has(self.vms), has(self.selector)]"


class RemoteCommandSpec(ApiModel):
    """A command (or file transfer) to run on one VM or on every VM a selector matches."""

    model_config = api_config(
        cel(
            f"{_ACTIONS}.filter(x, x).size() == 1",
            "exactly one action must be set: command, argv, script, transfer or templateRef",
        ),
        cel("!has(self.parameters) || has(self.templateRef)",
            "parameters go with templateRef", ".parameters"),
        cel(
            f"has(self.transfer) || {_TARGETS}.filter(x, x).size() == 1",
            "exactly one target must be set: vm, vms or selector",
        ),
        cel(
            "!has(self.transfer) || (!has(self.vm) && !has(self.vms) && !has(self.selector))",
            "a transfer names its VMs in transfer.from and transfer.to; "
            "do not set vm, vms or selector",
        ),
        cel(
            "!has(self.transfer) || !has(self.become)",
            "become applies to command, argv and script, not to a transfer",
        ),
        cel("!has(self.transfer) || !has(self.rollout)",
            "rollout applies to commands on VMs, not to a transfer"),
    )

    vm: K8sName | None = Field(None, description="Target: one RemoteVM (same namespace).")
    vms: list[K8sName] | None = Field(
        None, min_length=1, max_length=MAX_TARGETS,
        description="Target: these RemoteVMs (same namespace), each named once; a name with no "
        "RemoteVM fails on that VM with VMNotFound. `vmfleet rerun --failed` writes this.",
    )
    selector: LabelSelector | None = Field(
        None, description="Target: every RemoteVM of the namespace that matches."
    )
    command: str | None = Field(
        None, min_length=1, max_length=MAX_COMMAND,
        description="A shell line run by the remote user's shell (sh -c).",
    )
    argv: list[Annotated[str, Field(max_length=MAX_ARG)]] | None = Field(
        None, min_length=1, max_length=MAX_ITEMS,
        description="A program and its arguments; each item is quoted before it reaches the shell.",
    )
    script: str | None = Field(
        None, min_length=1, max_length=MAX_SCRIPT, description="A script fed to sh -s on stdin."
    )
    transfer: TransferSpec | None = Field(None, description="Copy a file between VMs over SFTP.")
    template_ref: LocalObjectReference | None = Field(
        None, description="Run this RemoteCommandTemplate's script (same namespace). Its script "
        "and sha256 are recorded in status.template when the command starts: editing the "
        "template later never changes this command.",
    )
    parameters: dict[str, ParameterValue] | None = Field(
        None, max_length=64,
        description="Values of the template's parameters. Each reaches the script only as the "
        "environment variable of the same name, never as shell text; a value that breaks the "
        "parameter's type, pattern, enum or bounds fails the command (InvalidSpec) before "
        "anything runs.",
        json_schema_extra={"x-kubernetes-validations": [cel(
            f"self.all(k, k.matches('{ENV_NAME_PATTERN}') && !(k in {_RESERVED}) "
            "&& !k.startsWith('VMFLEET_'))",
            "parameter names are environment variable names (letters, digits, underscores), "
            "not PATH, LD_PRELOAD, LD_LIBRARY_PATH, BASH_ENV, ENV, IFS or VMFLEET_*",
        )]},
    )
    env: dict[str, Annotated[str, Field(max_length=MAX_ARG)]] | None = Field(
        None, max_length=MAX_ITEMS,
        description="Environment variables for the command; names must match "
        + ENV_NAME_PATTERN + ".",
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    f"self.all(k, k.matches('{ENV_NAME_PATTERN}'))",
                    "env names must be letters, digits and underscores, not starting with a digit",
                )
            ]
        },
    )
    working_dir: str | None = Field(
        None, min_length=1, max_length=MAX_PATH, description="Directory the command starts in."
    )
    stdin: str | None = Field(None, max_length=MAX_STDIN, description="Text fed to stdin.")
    become: BecomeSpec | None = Field(
        None,
        description="Run command, argv or script as another user (sudo). Only on a RemoteVM with "
        "allowBecome: true (the worker refuses it otherwise: a CRD rule cannot read the "
        "RemoteVM). The password comes only from the VM's credentials Secret (become-password).",
    )
    timeout_seconds: int | None = Field(
        None, ge=1, le=7 * 86400,
        description="Per attempt (commands and transfers); on expiry the remote process group "
        "and every process carrying the attempt's marker are terminated (TERM, grace, KILL); a "
        "transfer removes its partial files.",
    )
    active_deadline_seconds: int | None = Field(
        None, ge=1, le=30 * 86400, description="For the whole command, all attempts included."
    )
    retries: Retries = Field(default_factory=lambda: Retries(), description="Retry policy.")
    success_exit_codes: list[Annotated[int, Field(ge=0, le=255)]] = Field(
        default_factory=lambda: [0], min_length=1, max_length=256,
        description="Exit codes that count as success.",
    )
    max_parallel: CountOrPercent | None = Field(
        None, description="VMs running at once (a rolling window): a number, or a percentage "
        "of the matched VMs such as \"10%\" (rounded down, at least 1).",
    )
    max_failures: CountOrPercentFromZero | None = Field(
        None, description="Stop starting new VMs once this many have failed: a number, or a "
        "percentage of the matched VMs such as \"20%\" (rounded down, at least 1).",
    )
    output: OutputSpec = Field(default_factory=lambda: OutputSpec(), description="Output kept in status.")
    ttl_seconds_after_finished: int | None = Field(
        None, ge=0, le=365 * 86400, description="Delete the object this long after it finished."
    )
    rollout: Rollout | None = Field(
        None, description="Run in waves (batchSize, batchWaitSeconds, partitionBy, "
        "healthGate); maxParallel and maxFailures still hold within and across waves.",
    )
    dry_run: bool | None = Field(
        None, description="Run nothing: resolve the targets and report in status.dryRun which "
        "VMs match and which would block (missing, not Ready, paused, become without "
        "allowBecome, a failure budget the blocked VMs would exhaust); the command ends in "
        "phase DryRun with condition Finished=True, reason DryRun (never Complete).",
    )

    @field_validator("env")
    @classmethod
    def _env_names(cls, env: dict[str, str] | None) -> dict[str, str] | None:
        for name in env or {}:
            if not is_env_name(name):
                raise ValueError(
                    f"env name {name!r} is invalid: use letters, digits and underscores, "
                    "not starting with a digit"
                )
        return env

    @field_validator("vms")
    @classmethod
    def _vms_once(cls, vms: list[str] | None) -> list[str] | None:
        seen: set[str] = set()
        for name in vms or []:
            if name in seen:
                raise ValueError(f"each VM may appear once in vms ({name})")
            seen.add(name)
        return vms

    @model_validator(mode="after")
    def _one_of(self) -> RemoteCommandSpec:
        actions = [a for a in ("command", "argv", "script", "transfer", "template_ref")
                   if getattr(self, a) is not None]
        if len(actions) != 1:
            raise ValueError("exactly one action must be set: command, argv, script, transfer "
                             "or templateRef")
        if self.parameters is not None and self.template_ref is None:
            raise ValueError("parameters go with templateRef")
        for name in self.parameters or {}:
            if not is_env_name(name) or reserved_parameter(name):
                raise ValueError(f"parameter name {name!r} is not allowed: use an environment "
                                 "variable name, not PATH, LD_PRELOAD, LD_LIBRARY_PATH, "
                                 "BASH_ENV, ENV, IFS or VMFLEET_*")
        if self.transfer is not None:
            if self.vm is not None or self.vms is not None or self.selector is not None:
                raise ValueError("a transfer names its VMs in transfer.from and transfer.to")
        elif sum(t is not None for t in (self.vm, self.vms, self.selector)) != 1:
            raise ValueError("exactly one target must be set: vm, vms or selector")
        if self.transfer is not None and self.become is not None:
            raise ValueError("become applies to command, argv and script, not to a transfer")
        if self.transfer is not None and self.rollout is not None:
            raise ValueError("rollout applies to commands on VMs, not to a transfer")
        return self

    @property
    def action(self) -> str:
        for name in ("command", "argv", "script", "transfer", "template_ref"):
            if getattr(self, name) is not None:
                return name
        raise AssertionError("validated spec has an action")


class CommandSummary(StatusModel):
    targets: int = 0
    pending: int = 0
    running: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0


class TransferResult(StatusModel):
    """What a transfer wrote to one destination VM."""

    source: str | None = Field(None, max_length=MAX_PATH + MAX_NAME, description="vm:path, "
                               "configMap/name/key or secret/name/key.")
    path: str | None = Field(None, max_length=MAX_PATH, description="Destination path.")
    bytes: int | None = Field(None, ge=0, description="Bytes written (so far, while running).")
    total_bytes: int | None = Field(None, ge=0, description="Size of the source.")
    sha256: str | None = Field(None, max_length=64, description="sha256 of the bytes written.")
    duration_seconds: float | None = Field(None, ge=0)
    bytes_per_second: float | None = Field(None, ge=0, description="Throughput of the copy.")
    verified: bool | None = Field(None, description="True when the destination was re-read.")
    unchanged: bool | None = Field(
        None, description="True when overwrite IfDifferent found the same content (not copied)."
    )
    update_time: str | None = Field(None, description="Last progress report of the worker.")
    partial_removed: bool | None = Field(
        None, description="True when the attempt ended early (timeout, deadline, cancel) and "
        "the partial file it had written on this destination was removed."
    )


class TargetResult(StatusModel):
    """The result on one VM. Workers write only their own VM's entry."""

    vm: str = Field(max_length=MAX_NAME, description="RemoteVM name.")
    host: str | None = Field(None, max_length=MAX_NAME)
    phase: Literal["Pending", "Queued", "Running", "Succeeded", "Failed", "Cancelled"] = Phase.PENDING
    attempt: int = Field(1, ge=0, description="Current attempt, from 1.")
    exit_code: int | None = Field(
        None, description="Exit code of the last attempt (128+N when killed by signal N)."
    )
    signal: str | None = Field(
        None, max_length=32, description="Name of the signal that ended the command (KILL, "
        "TERM, ...), as the VM reported it; reason Signaled unless vmfleet sent it (Timeout, "
        "DeadlineExceeded, Cancelled).",
    )
    reason: str | None = Field(None, max_length=128, description="Named reason, e.g. ExitCode.")
    message: str | None = Field(None, max_length=MAX_MESSAGE)
    stdout: str | None = Field(None, description="Tail of stdout (output.maxBytes).")
    stderr: str | None = Field(None, description="Tail of stderr (output.maxBytes).")
    stdout_bytes: int | None = Field(None, ge=0, description="Exact stdout size in bytes.")
    stderr_bytes: int | None = Field(None, ge=0, description="Exact stderr size in bytes.")
    output_truncated: bool | None = Field(None, description="True when a tail was cut.")
    dispatch_time: str | None = Field(None, description="When the attempt was sent to the queue.")
    start_time: str | None = None
    completion_time: str | None = None
    worker: str | None = Field(
        None, max_length=MAX_NAME, description="The worker pod that ran the attempt (the "
        "downward API's metadata.name; the Process runtime: local/<deployment>-<index>.<namespace>)."
    )
    stdout_sha256: str | None = Field(
        None, max_length=64, description="SHA-256 (hex) of the attempt's whole stdout as the "
        "worker read it (not only the tail); stdoutBytes is its size."
    )
    stderr_sha256: str | None = Field(
        None, max_length=64, description="SHA-256 (hex) of the attempt's whole stderr."
    )
    host_key_fingerprint: str | None = Field(
        None, max_length=128, description="SHA256 fingerprint of the host key the VM showed "
        "for this attempt (as ssh-keygen -l prints it)."
    )
    pgid: int | None = Field(
        None, ge=1, description="Remote process group of the running attempt (terminated on "
        "timeout, cancellation or a lost worker)."
    )
    process_marker: str | None = Field(
        None, max_length=64, description="The attempt's marker: in the command line of its "
        "process group leader and in the environment (VMFLEET_ATTEMPT) of every process it "
        "starts. A terminate kills the group and every process of the remote user carrying it, "
        "and never signals a recycled process group."
    )
    heartbeat_time: str | None = Field(None, description="Last sign of life of the running attempt.")
    retry_after: str | None = Field(None, description="The next attempt starts after this time.")
    lost_pgid: int | None = Field(
        None, ge=1, description="Process group of a lost attempt, terminated before the next one."
    )
    lost_marker: str | None = Field(None, max_length=64, description="processMarker of that attempt.")
    disruption: str | None = Field(
        None, max_length=MAX_MESSAGE, description="Set while the running attempt's worker is "
        "stopping (a drain, a rollout): it finishes the attempt within its grace period."
    )
    disruptions: int | None = Field(
        None, ge=0, description="Attempts lost to planned disruptions so far (not counted "
        "against retries.limit unless retries.countDisruptions)."
    )
    transfer: TransferResult | None = Field(None, description="File transfers: what was copied.")
    wave: int | None = Field(None, ge=0, description="spec.rollout: the wave of this VM, from 0.")


class DryRunBlocker(StatusModel):
    """A VM a dry run found would not run the command (or would fail it)."""

    vm: str = Field(max_length=MAX_NAME, description="RemoteVM name.")
    reason: str = Field(max_length=128, description="VMNotFound, NotReady, Paused or "
                        "BecomeNotAllowed.")
    message: str | None = Field(None, max_length=MAX_MESSAGE, description="Details.")


class DryRunReport(StatusModel):
    """What a dry run (spec.dryRun) found: the command itself ran nothing."""

    matched: list[str] = Field(default_factory=list, max_length=MAX_TARGETS,
                               description="Every VM the target names or matches, sorted.")
    runnable: list[str] = Field(default_factory=list, max_length=MAX_TARGETS,
                                description="The matched VMs nothing blocks.")
    blocked: list[DryRunBlocker] = Field(default_factory=list, max_length=MAX_TARGETS,
                                         description="The matched VMs that would block, and why.")
    max_parallel: int | None = Field(None, description="maxParallel resolved against the "
                                     "matched VMs (percentages rounded down, at least 1).")
    max_failures: int | None = Field(None, description="maxFailures resolved likewise.")
    budget: str | None = Field(None, max_length=MAX_MESSAGE, description="Set when the blocked "
                               "VMs alone would reach maxFailures: the run would stop there.")
    waves: list[list[str]] | None = Field(None, max_length=MAX_TARGETS,
                                          description="spec.rollout: the VMs of each wave, in "
                                          "order.")


class TemplateRecord(StatusModel):
    """The template a command runs, as it was when the command started."""

    name: str = Field(max_length=MAX_NAME, description="The RemoteCommandTemplate.")
    script: str | None = Field(None, max_length=MAX_SCRIPT, description="Its script, as "
                               "recorded: what runs, whatever the template says later.")
    sha256: str | None = Field(None, max_length=64, description="sha256 of that script.")
    resource_version: str | None = Field(None, max_length=64,
                                         description="The template's resourceVersion read.")
    parameters: dict[str, Annotated[str, Field(max_length=MAX_ARG)]] | None = Field(
        None, max_length=64, description="The parameters' values as the script's environment "
        "variables (defaults included), as checked when the command started.")


class RolloutStatus(StatusModel):
    """Where a rollout (spec.rollout) stands."""

    waves: int | None = Field(None, ge=0, description="How many waves there are.")
    current_wave: int | None = Field(None, ge=1, description="The wave running now, from 1.")
    wave_complete_time: str | None = Field(None, description="When the current wave ended.")
    health_gate_since: str | None = Field(None, description="When its health probes were asked.")
    next_wave_after: str | None = Field(None, description="The next wave starts after this.")
    stopped: str | None = Field(None, max_length=MAX_MESSAGE,
                                description="Why the rollout stopped before its last wave.")


class RemoteCommandStatus(StatusModel):
    phase: Literal["Pending", "Running", "Succeeded", "Failed", "Cancelled", "DryRun"] | None = None
    target: str | None = Field(None, max_length=1024, description="What the command runs on.")
    completions: str | None = Field(None, max_length=64, description="succeeded/targets.")
    conditions: list[ObjectCondition] | None = Field(
        None, max_length=32,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    start_time: str | None = None
    completion_time: str | None = None
    summary: CommandSummary | None = None
    results: list[TargetResult] | None = Field(
        None, max_length=10000,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["vm"]},
    )
    observed_generation: int | None = None
    dry_run: DryRunReport | None = Field(None, description="spec.dryRun: what would run and "
                                         "what would block; nothing ran.")
    rollout: RolloutStatus | None = Field(None, description="spec.rollout: the waves' progress.")
    template: TemplateRecord | None = Field(None, description="spec.templateRef: the script "
                                            "recorded when the command started, and its sha256.")
