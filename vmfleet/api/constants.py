"""Names shared by the controller, the workers, the CLI and the chart.

Nothing here imports anything of ours: every part of vmfleet reads its names from here
instead of spelling them again.
"""

from __future__ import annotations

import re
from typing import Final

GROUP: Final = "vmfleet.io"
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"

VM_KIND: Final = "RemoteVM"
VM_PLURAL: Final = "remotevms"
VM_SINGULAR: Final = "remotevm"
VM_SHORT_NAMES: Final = ("rvm",)

COMMAND_KIND: Final = "RemoteCommand"
COMMAND_PLURAL: Final = "remotecommands"
COMMAND_SINGULAR: Final = "remotecommand"
COMMAND_SHORT_NAMES: Final = ("rcmd",)

CATEGORIES: Final = ("vmfleet",)

# Celery task names (the controller sends by name; it never imports remote_tasks).
TASK_EXECUTE: Final = "remote_tasks.execute_on_vm"
TASK_CHECK_VM: Final = "remote_tasks.check_vm_status"
TASK_TERMINATE: Final = "remote_tasks.terminate_attempt"
TASK_TRANSFER: Final = "remote_tasks.transfer_file"
TASK_TRANSFER_CLEANUP: Final = "remote_tasks.clean_transfer"

# Labels and annotations.
LABEL_PREFIX: Final = GROUP
LABEL_VM: Final = f"{GROUP}/vm"
LABEL_POOL: Final = f"{GROUP}/pool"
LABEL_COMPONENT: Final = "app.kubernetes.io/component"
LABEL_MANAGED_BY: Final = "app.kubernetes.io/managed-by"
LABEL_NAME: Final = "app.kubernetes.io/name"
MANAGED_BY: Final = "vmfleet"
FINALIZER: Final = f"{GROUP}/cancel-remote-processes"
# A Secret a transfer may copy onto a VM carries this label with the value "true".
LABEL_TRANSFERABLE: Final = f"{GROUP}/transferable"
# Secrets a transfer never copies, labelled or not: tokens, registry and SSH credentials.
SECRET_TYPES_NEVER_TRANSFERRED: Final = frozenset({
    "kubernetes.io/service-account-token",
    "kubernetes.io/dockerconfigjson",
    "kubernetes.io/dockercfg",
    "kubernetes.io/ssh-auth",
})

# Worker runtimes.
RUNTIME_PROCESS: Final = "Process"
RUNTIME_DEPLOYMENT: Final = "Deployment"
WORKER_DEPLOYMENT_PREFIX: Final = "vmfleet-worker-"
CREDENTIALS_MOUNT_PATH: Final = "/var/run/secrets/vmfleet.io/ssh"
SECRET_KEY_PRIVATE_KEY: Final = "ssh-privatekey"
SECRET_KEY_PASSPHRASE: Final = "passphrase"
# The sudo password of spec.become (optional: NOPASSWD needs none). Read by the worker
# from the mounted Secret (a file of this name) or the Secret's data; sent to sudo on stdin.
SECRET_KEY_BECOME_PASSWORD: Final = "become-password"
# Every attempt's processes carry this environment variable (value: the attempt's
# processMarker); terminating an attempt also kills what left its process group.
ATTEMPT_MARKER_ENV: Final = "VMFLEET_ATTEMPT"
SECRET_TYPE_SSH_AUTH: Final = "kubernetes.io/ssh-auth"

# Host key policies.
HOST_KEY_PINNED: Final = "Pinned"
HOST_KEY_TOFU: Final = "TrustOnFirstUse"


class Phase:
    """``RemoteCommand.status.phase`` and ``status.results[].phase``."""

    PENDING: Final = "Pending"
    QUEUED: Final = "Queued"  # results only: sent to the VM's queue, not yet claimed
    RUNNING: Final = "Running"
    SUCCEEDED: Final = "Succeeded"
    FAILED: Final = "Failed"
    CANCELLED: Final = "Cancelled"
    # The command only: spec.dryRun resolved its targets and blockers and ran nothing.
    DRY_RUN: Final = "DryRun"

    TERMINAL: Final = frozenset({SUCCEEDED, FAILED, CANCELLED, DRY_RUN})


class Condition:
    """Condition types of both kinds."""

    # RemoteCommand (as a Job has), plus Finished: true in every end state.
    COMPLETE: Final = "Complete"
    FAILED: Final = "Failed"
    FINISHED: Final = "Finished"
    # RemoteVM
    READY: Final = "Ready"
    REACHABLE: Final = "Reachable"
    HOST_KEY_VERIFIED: Final = "HostKeyVerified"
    DISK_PRESSURE: Final = "DiskPressure"
    MEMORY_PRESSURE: Final = "MemoryPressure"
    WORKERS_READY: Final = "WorkersReady"


class Reason:
    """``status.results[].reason`` and condition reasons: named, never free text."""

    COMPLETED: Final = "Completed"
    EXIT_CODE: Final = "ExitCode"
    SIGNALED: Final = "Signaled"  # killed by a signal vmfleet did not send (exitCode 128+N)
    BECOME_FAILED: Final = "BecomeFailed"  # sudo refused (wrong or missing password, not allowed)
    TIMEOUT: Final = "Timeout"
    DEADLINE_EXCEEDED: Final = "DeadlineExceeded"
    TRANSPORT_ERROR: Final = "TransportError"
    AUTH_FAILED: Final = "AuthFailed"
    HOST_KEY_MISMATCH: Final = "HostKeyMismatch"
    WORKER_LOST: Final = "WorkerLost"
    CANCELLED: Final = "Cancelled"
    MAX_FAILURES: Final = "MaxFailuresReached"
    VM_NOT_FOUND: Final = "VMNotFound"
    CREDENTIALS_INVALID: Final = "CredentialsInvalid"
    INVALID_SPEC: Final = "InvalidSpec"
    NO_TARGETS: Final = "NoTargets"
    QUEUED: Final = "Queued"
    RUNNING: Final = "Running"
    SUCCEEDED: Final = "Succeeded"
    FAILED: Final = "Failed"
    # File transfers
    SOURCE_NOT_FOUND: Final = "SourceNotFound"
    DESTINATION_NOT_FOUND: Final = "DestinationNotFound"
    PERMISSION_DENIED: Final = "PermissionDenied"
    DESTINATION_EXISTS: Final = "DestinationExists"
    CHECKSUM_MISMATCH: Final = "ChecksumMismatch"
    # A status the controller could not write as computed (it failed validation): the
    # command fails visibly and its processes are killed.
    INTERNAL_ERROR: Final = "InternalError"
    # spec.dryRun: the condition Finished's reason (never Complete), and what would block
    # a VM (status.dryRun.blocked[].reason).
    DRY_RUN: Final = "DryRun"
    PAUSED: Final = "Paused"
    NOT_READY: Final = "NotReady"
    BECOME_NOT_ALLOWED: Final = "BecomeNotAllowed"
    # spec.rollout.healthGate: a wave's VMs did not report Ready; the rest never started.
    HEALTH_GATE_FAILED: Final = "HealthGateFailed"
    # A worker refused the message (bad or missing signature, expired, a VM or Secret it
    # does not serve): nothing ran.
    MESSAGE_REFUSED: Final = "MessageRefused"


# Kinds of the fleet operations (DESIGN.md "More kinds").
TEMPLATE_KIND: Final = "RemoteCommandTemplate"
TEMPLATE_PLURAL: Final = "remotecommandtemplates"
TEMPLATE_SINGULAR: Final = "remotecommandtemplate"
TEMPLATE_SHORT_NAMES: Final = ("rcmdt",)
CRON_KIND: Final = "RemoteCronCommand"
CRON_PLURAL: Final = "remotecroncommands"
CRON_SINGULAR: Final = "remotecroncommand"
CRON_SHORT_NAMES: Final = ("rcron",)

# Template parameters reach the script as environment variables of the same name; these
# names would change how the shell or the loader behaves, or are vmfleet's own.
RESERVED_PARAMETER_NAMES: Final = frozenset(
    {"PATH", "LD_PRELOAD", "LD_LIBRARY_PATH", "BASH_ENV", "ENV", "IFS"})
RESERVED_PARAMETER_PREFIX: Final = "VMFLEET_"

ENV_NAME_PATTERN: Final = r"^[A-Za-z_][A-Za-z0-9_]*$"
_ENV_NAME_RE: Final = re.compile(ENV_NAME_PATTERN)
# Kubernetes object names that are also safe inside a queue name.
DNS_LABEL_PATTERN: Final = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
QUEUE_PATTERN: Final = r"^[A-Za-z0-9_.:-]+$"


def is_env_name(name: str) -> bool:
    # fullmatch: with match, ``$`` also matches before a trailing newline ("A\n").
    return bool(_ENV_NAME_RE.fullmatch(name))


def default_queue(namespace: str, vm: str) -> str:
    """The Celery queue of a RemoteVM when ``spec.queue`` is not set."""
    return f"vmfleet.{namespace}.{vm}"


def queue_prefix(namespace: str) -> str:
    """Every queue of a namespace's RemoteVMs starts with this: the broker's tenancy fence."""
    return f"vmfleet.{namespace}."


def transfer_queue(namespace: str) -> str:
    """The namespace's transfer queue. A ':' never appears in a RemoteVM's queue after its
    prefix, so no VM (not even one named ``transfers``) can collide with it."""
    return f"vmfleet.{namespace}:transfers"


# The namespace's transfer worker: a Deployment (or local processes) the controller runs
# like the VM workers, consuming ``transfer_queue(namespace)``.
TRANSFER_DEPLOYMENT: Final = "vmfleet-transfers"


def worker_deployment_name(vm: str) -> str:
    return f"{WORKER_DEPLOYMENT_PREFIX}{vm}"


POOL_DEPLOYMENT_PREFIX: Final = "vmfleet-pool-"


def pool_deployment_name(pool: str) -> str:
    return f"{POOL_DEPLOYMENT_PREFIX}{pool}"


def reserved_parameter(name: str) -> bool:
    """True for a name a template parameter may not have."""
    return name in RESERVED_PARAMETER_NAMES or name.startswith(RESERVED_PARAMETER_PREFIX)
