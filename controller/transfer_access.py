"""Process runtime: each namespace's transfer worker gets a kubeconfig as narrow as the
chart's transfer ServiceAccount.

In a cluster the chart pre-creates, per watched namespace, the ServiceAccount
``<release>-vmfleet-transfer-worker`` and a Role allowing ``get`` on that namespace's
Secrets and ConfigMaps; the transfer worker's pod runs as it. On one machine the
controller runs with the user's (admin) kubeconfig, which a local transfer worker must
not inherit: ``TransferAccess`` creates the same ServiceAccount, Role and RoleBinding in
the namespace (``vmfleet-transfer-worker``), asks the API server for a token of that
ServiceAccount (TokenRequest, valid ``TOKEN_SECONDS``) and writes a kubeconfig holding
only that token. Anything failing on the way leaves a kubeconfig without credentials:
Secret and ConfigMap sources then fail, nothing else gets more reach.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from vmfleet.kube import ApiException, Kube

log = logging.getLogger("controller.transfer_access")

TRANSFER_ACCOUNT = "vmfleet-transfer-worker"
TOKEN_SECONDS = 7 * 24 * 3600
RULES = [{"apiGroups": [""], "resources": ["secrets", "configmaps"], "verbs": ["get"]}]


def objects(namespace: str) -> list[tuple[str, dict[str, Any]]]:
    """The ServiceAccount, Role and RoleBinding of a namespace's transfer worker (pure)."""
    meta = {"name": TRANSFER_ACCOUNT, "namespace": namespace,
            "labels": {"app.kubernetes.io/managed-by": "vmfleet",
                       "app.kubernetes.io/component": "transfer-worker"}}
    return [
        ("ServiceAccount", {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta}),
        ("Role", {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                  "metadata": meta, "rules": RULES}),
        ("RoleBinding", {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                         "metadata": meta,
                         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                     "name": TRANSFER_ACCOUNT},
                         "subjects": [{"kind": "ServiceAccount", "name": TRANSFER_ACCOUNT,
                                       "namespace": namespace}]}),
    ]


def kubeconfig(server: str, ca_data: bytes | None, token: str | None, namespace: str,
               insecure: bool = False) -> dict[str, Any]:
    """A kubeconfig with one cluster and (when ``token``) one ServiceAccount token (pure)."""
    cluster: dict[str, Any] = {"server": server}
    if ca_data:
        cluster["certificate-authority-data"] = base64.b64encode(ca_data).decode()
    if insecure:
        cluster["insecure-skip-tls-verify"] = True
    return {
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "vmfleet", "cluster": cluster}],
        "users": [{"name": TRANSFER_ACCOUNT, "user": {"token": token} if token else {}}],
        "contexts": [{"name": "transfer", "context": {"cluster": "vmfleet", "namespace": namespace,
                                                      "user": TRANSFER_ACCOUNT}}],
        "current-context": "transfer",
    }


class TransferAccess:
    """Kubeconfigs of the namespaces' local transfer workers, under ``directory``."""

    def __init__(self, kube: Kube, directory: Path) -> None:
        self.kube = kube
        self.directory = directory
        self._lock = threading.Lock()
        self._issued: dict[str, float] = {}  # namespace -> when its token was issued

    def kubeconfig(self, namespace: str) -> Path:
        """The namespace's kubeconfig (made, or renewed after half its lifetime)."""
        path = self.directory / f"{namespace}.kubeconfig"
        with self._lock:
            issued = self._issued.get(namespace)
            if issued is not None and time.monotonic() - issued < TOKEN_SECONDS / 2 \
                    and path.exists():
                return path
            token = self._token(namespace)
            self._write(path, namespace, token)
            if token is not None:
                self._issued[namespace] = time.monotonic()
        return path

    def _token(self, namespace: str) -> str | None:
        # Imported here: the typed core/v1 and RBAC modules cost ~22 MiB of the
        # controller's memory; only the Process runtime's transfer worker needs them.
        from kubernetes.client import CoreV1Api, RbacAuthorizationV1Api

        core = CoreV1Api(self.kube.api_client)
        rbac = RbacAuthorizationV1Api(self.kube.api_client)
        create: dict[str, Callable[..., Any]] = {"ServiceAccount": core.create_namespaced_service_account,
                  "Role": rbac.create_namespaced_role,
                  "RoleBinding": rbac.create_namespaced_role_binding}
        try:
            for kind, body in objects(namespace):
                try:
                    create[kind](namespace, body)
                except ApiException as exc:
                    if exc.status != 409:
                        raise
            request = core.create_namespaced_service_account_token(
                TRANSFER_ACCOUNT, namespace,
                cast(Any, {"spec": {"expirationSeconds": TOKEN_SECONDS}}))
        except ApiException as exc:
            log.warning("Could not give the transfer worker of namespace %s its token: %s (%s); "
                        "its Secret and ConfigMap sources will fail", namespace, exc.reason,
                        exc.status)
            return None
        log.info("Issued a token of ServiceAccount %s/%s to the local transfer worker",
                 namespace, TRANSFER_ACCOUNT)
        return str(request.status.token) if request.status is not None else None

    def _write(self, path: Path, namespace: str, token: str | None) -> None:
        conf = self.kube.api_client.configuration
        ca_data = Path(conf.ssl_ca_cert).read_bytes() if conf.ssl_ca_cert else None
        body = kubeconfig(conf.host, ca_data, token, namespace, insecure=not conf.verify_ssl)
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(body, fh)  # JSON is YAML: any kubeconfig reader takes it
        os.replace(tmp, path)


__all__ = ["TRANSFER_ACCOUNT", "TransferAccess", "kubeconfig", "objects"]
