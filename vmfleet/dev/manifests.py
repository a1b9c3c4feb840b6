"""Kubernetes manifests for VMs reached over SSH: the credentials Secret and the RemoteVM.

Used by ``vmfleet dev up`` and the e2e tests; takes anything shaped like ``SshdVM``.
"""

from __future__ import annotations

from typing import Any, Protocol

from vmfleet.api import constants as c


class SSHServer(Protocol):
    name: str
    host: str
    port: int
    user: str
    key_passphrase: str | None

    @property
    def host_public_keys(self) -> list[str]: ...

    @property
    def user_private_key_pem(self) -> str: ...


def credentials_secret(vm: SSHServer, namespace: str, name: str | None = None) -> dict[str, Any]:
    data = {c.SECRET_KEY_PRIVATE_KEY: vm.user_private_key_pem}
    if vm.key_passphrase:
        data[c.SECRET_KEY_PASSPHRASE] = vm.key_passphrase
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": c.SECRET_TYPE_SSH_AUTH,
        "metadata": {"name": name or f"{vm.name}-ssh", "namespace": namespace},
        "stringData": data,
    }


def remote_vm(
    vm: SSHServer,
    namespace: str,
    secret_name: str | None = None,
    labels: dict[str, str] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "host": vm.host,
        "port": vm.port,
        "user": vm.user,
        "credentialsSecretRef": {"name": secret_name or f"{vm.name}-ssh"},
        "hostKeyPolicy": c.HOST_KEY_PINNED,
        "hostKeys": list(vm.host_public_keys),
        "description": f"local sshd {vm.host}:{vm.port}",
    }
    body.update(spec)
    return {
        "apiVersion": c.API_VERSION,
        "kind": c.VM_KIND,
        "metadata": {"name": vm.name, "namespace": namespace, "labels": labels or {}},
        "spec": body,
    }


def vm_manifests(
    vm: SSHServer, namespace: str, labels: dict[str, str] | None = None, **spec: Any
) -> list[dict[str, Any]]:
    """The Secret and the RemoteVM for one VM, with its host key pinned."""
    return [credentials_secret(vm, namespace), remote_vm(vm, namespace, labels=labels, **spec)]
