"""File transfers, the source side: a file on a VM, or one key of a ConfigMap or Secret.

A :class:`Source` hands out the bytes in blocks (``chunks``) and their sha256 (``digest``).
A VM's file is read over SFTP one prefetch window at a time (``read_windows``); a
ConfigMap or Secret key is read through the transfer worker's Kubernetes token (the
chart's per-namespace Role: ``get`` on Secrets and ConfigMaps of its namespace), and a
Secret only when its owner allows it (``secret_refusal``).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import paramiko

from vmfleet.api import constants as c
from vmfleet.api.constants import Reason
from vmfleet.api.envelope import Envelope, Target
from vmfleet.api.plan import Source as SourceSpec

from .ssh import ConnectionPool
from .sshtarget import SSHError, SSHTarget
from .transfer_files import (
    READ_BLOCK,
    SOURCE_CHANNEL_WINDOW,
    TransferFailed,
    classify,
    close_file,
    closed,
    read_windows,
)

if TYPE_CHECKING:
    from vmfleet.kube import Kube


@dataclass
class Source:
    """An open source: its bytes in blocks, their sha256, how to close it and how to cut a
    stalled read from another thread (the deadline's watchdog)."""

    description: str
    size: int
    mode: int
    chunks: Callable[[], Iterator[bytes]]
    digest: Callable[[], str]
    close: Callable[[], None] = lambda: None
    abort: Callable[[], None] = lambda: None  # from another thread: unblock a stalled read


def protected_secrets(envelope: Envelope) -> set[str]:
    """Secrets a transfer never copies: those the namespace's RemoteVMs name as credentials
    (the controller lists them in the envelope) and those of the VMs the message names."""
    names = set(envelope.protected_secrets)
    for target in [*envelope.targets.values(), *([envelope.target] if envelope.target else [])]:
        hop: Target | None = target
        while hop is not None:
            names.add(hop.secret)
            hop = hop.bastion
    return names


def secret_refusal(ref: str, secret_type: str | None, labels: dict[str, str],
                   credentials: bool) -> str | None:
    """Why a Secret may not be a transfer's source, or None: it must carry the label
    ``vmfleet.io/transferable: "true"``, not be of a type that holds tokens or registry
    or SSH credentials, and not be a RemoteVM's credentials (``credentials``)."""
    opt_in = f'{c.LABEL_TRANSFERABLE}: "true"'
    if secret_type in c.SECRET_TYPES_NEVER_TRANSFERRED:
        return (f"Secret {ref} is of type {secret_type}: vmfleet never copies it, even "
                f"labelled {opt_in}")
    if credentials:
        return (f"Secret {ref} holds a RemoteVM's SSH credentials: vmfleet never copies it, "
                f"even labelled {opt_in}")
    if labels.get(c.LABEL_TRANSFERABLE) != "true":
        return (f"Secret {ref} is not labelled {opt_in}: a transfer copies a Secret only "
                "when its owner allows it with that label")
    return None


def vm_source(pool: ConnectionPool, target: SSHTarget, vm: str, path: str,
              tick: Callable[[], None]) -> Source:
    """The file ``path`` on ``vm``, opened over a new SFTP session of the pooled
    connection (``tick`` is called per block hashed by ``digest``)."""
    try:
        sftp = pool.get(target).sftp(window_size=SOURCE_CHANNEL_WINDOW)
    except SSHError as exc:
        pool.discard(target)
        raise classify(exc, vm, path, writing=False) from exc
    try:
        attrs = sftp.stat(path)
        if not stat.S_ISREG(attrs.st_mode or 0):
            raise TransferFailed(Reason.SOURCE_NOT_FOUND,
                                 f"source {path} on {vm} is not a regular file")
        fh = sftp.open(path, "rb")
    except (OSError, paramiko.SSHException, EOFError) as exc:
        sftp.close()
        raise classify(exc, vm, path, writing=False) from exc
    except TransferFailed:
        sftp.close()
        raise
    size = attrs.st_size or 0

    def chunks() -> Iterator[bytes]:
        try:
            yield from read_windows(fh, size)
        except (OSError, paramiko.SSHException, EOFError) as exc:
            raise classify(exc, vm, path, writing=False) from exc

    @functools.cache
    def digest() -> str:
        h = hashlib.sha256()
        for chunk in chunks():
            tick()
            h.update(chunk)
        return h.hexdigest()

    def close() -> None:
        close_file(fh, session_gone=closed(sftp))
        sftp.close()

    def abort() -> None:
        channel = sftp.get_channel()
        if channel is not None:
            channel.close()

    return Source(f"{vm}:{path}", size, stat.S_IMODE(attrs.st_mode or 0o644), chunks, digest,
                  close, abort)

def object_source(kube: Kube, envelope: Envelope, source: SourceSpec) -> Source:
    """One key of a ConfigMap or Secret of the command's namespace, read into memory (a
    Kubernetes object holds at most about 1 MiB)."""
    from kubernetes.client.exceptions import ApiException

    namespace = envelope.namespace
    ref = source.config_map_key_ref or source.secret_key_ref
    assert ref is not None
    kind = "ConfigMap" if source.config_map_key_ref is not None else "Secret"
    try:
        if kind == "ConfigMap":
            cm = kube.core.read_namespaced_config_map(ref.name, namespace)
            if cm.data and ref.key in cm.data:
                data = cm.data[ref.key].encode()
            elif cm.binary_data and ref.key in cm.binary_data:
                data = base64.b64decode(cm.binary_data[ref.key])
            else:
                raise TransferFailed(Reason.SOURCE_NOT_FOUND,
                                     f"ConfigMap {namespace}/{ref.name} has no key {ref.key}")
        else:
            secret = kube.core.read_namespaced_secret(ref.name, namespace)
            labels = (secret.metadata.labels if secret.metadata is not None else None) or {}
            refusal = secret_refusal(f"{namespace}/{ref.name}", secret.type, labels,
                                     ref.name in protected_secrets(envelope))
            if refusal is not None:
                raise TransferFailed(Reason.PERMISSION_DENIED, refusal)
            if not secret.data or ref.key not in secret.data:
                raise TransferFailed(Reason.SOURCE_NOT_FOUND,
                                     f"Secret {namespace}/{ref.name} has no key {ref.key}")
            data = base64.b64decode(secret.data[ref.key])
    except ApiException as exc:
        if exc.status == 404:
            raise TransferFailed(Reason.SOURCE_NOT_FOUND,
                                 f"{kind} {namespace}/{ref.name} does not exist") from exc
        if exc.status == 403:
            raise TransferFailed(Reason.PERMISSION_DENIED,
                                 f"the worker may not read {kind} {namespace}/{ref.name}") from exc
        raise TransferFailed(Reason.TRANSPORT_ERROR,
                             f"cannot read {kind} {namespace}/{ref.name}: {exc.reason}") from exc
    mode = 0o600 if kind == "Secret" else 0o644
    label = source.describe()

    def chunks() -> Iterator[bytes]:
        for offset in range(0, len(data), READ_BLOCK):
            yield data[offset:offset + READ_BLOCK]

    return Source(label, len(data), mode, chunks, lambda: hashlib.sha256(data).hexdigest())


__all__ = ["Source", "object_source", "protected_secrets", "secret_refusal", "vm_source"]
