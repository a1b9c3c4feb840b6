"""The output API on one machine (``Process`` runtime: ``vmfleet dev up``, the tests).

The controller serves ``logs.vmfleet.io`` on a loopback port; the API server reaches it
through the APIService ``v1alpha1.logs.vmfleet.io`` whose Service is of type
``ExternalName`` (the aggregator resolves such a Service to
``https://<externalName>:<port>``), and checks the serving certificate against the
APIService's ``caBundle`` for the name ``<service>.<namespace>.svc``. The chart does the
same with a ClusterIP Service in front of the controller pods.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vmfleet.api.logs import GROUP, RESOURCE, SUBRESOURCE, VERSION
from vmfleet.dev.certs import Pair, ensure_ca, ensure_leaf

SERVICE_NAME = "vmfleet-dev-logs-api"  # not the chart's (<release>-logs-api)
SERVICE_NAMESPACE = "default"
APISERVICE_NAME = f"{VERSION}.{GROUP}"
LOOPBACK = "127.0.0.1"

KubectlRun = Callable[..., Any]


def serving_pki(directory: Path, service: str = SERVICE_NAME,
                namespace: str = SERVICE_NAMESPACE) -> tuple[Pair, Pair]:
    """(CA, serving pair) of the output API, made once in ``directory``."""
    ca = ensure_ca(Pair(directory / "logs-api-ca.crt", directory / "logs-api-ca.key"),
                   "vmfleet-logs-api-ca")
    serving = ensure_leaf(Pair(directory / "logs-api.crt", directory / "logs-api.key"), ca,
                          f"{service}.{namespace}.svc", server=True,
                          dns_names=(f"{service}.{namespace}.svc", service, "localhost"),
                          ips=(LOOPBACK,))
    return ca, serving


def reader_roles() -> list[dict[str, Any]]:
    """Who may `get` a RemoteCommand through view/edit/admin may read its output too
    (the controller still checks `get` on the RemoteCommand itself)."""
    roles = []
    for role in ("view", "edit", "admin"):
        roles.append({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": f"vmfleet-logs-{role}", "labels": {
                f"rbac.authorization.k8s.io/aggregate-to-{role}": "true"}},
            "rules": [{"apiGroups": [GROUP], "resources": [f"{RESOURCE}/{SUBRESOURCE}"],
                       "verbs": ["get"]}],
        })
    return roles


def manifests(port: int, ca_pem: bytes, host: str = LOOPBACK) -> list[dict[str, Any]]:
    """The Service (ExternalName, to the controller on ``host``), the APIService and the
    aggregated reader roles."""
    return [
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": SERVICE_NAME, "namespace": SERVICE_NAMESPACE},
         "spec": {"type": "ExternalName", "externalName": host,
                  "ports": [{"name": "https", "port": port, "protocol": "TCP"}]}},
        {"apiVersion": "apiregistration.k8s.io/v1", "kind": "APIService",
         "metadata": {"name": APISERVICE_NAME},
         "spec": {"group": GROUP, "version": VERSION,
                  "service": {"name": SERVICE_NAME, "namespace": SERVICE_NAMESPACE, "port": port},
                  "caBundle": base64.b64encode(ca_pem).decode(),
                  "groupPriorityMinimum": 1000, "versionPriority": 15}},
        *reader_roles(),
    ]


def register(kubectl_run: KubectlRun, port: int, ca_pem: bytes) -> None:
    """Apply :func:`manifests` with ``kubectl_run`` (a ``ControlPlane.kubectl_run``)."""
    body = {"apiVersion": "v1", "kind": "List", "items": manifests(port, ca_pem)}
    kubectl_run("apply", "-f", "-", input=json.dumps(body))


def wait_available(kubectl_run: KubectlRun, timeout: int = 60) -> None:
    kubectl_run("wait", "--for=condition=Available", f"apiservice/{APISERVICE_NAME}",
                f"--timeout={timeout}s", timeout=timeout + 30)


def unregister(kubectl_run: KubectlRun) -> None:
    kubectl_run("delete", "apiservice", APISERVICE_NAME, "--ignore-not-found", check=False)
    kubectl_run("delete", "service", "-n", SERVICE_NAMESPACE, SERVICE_NAME, "--ignore-not-found",
                check=False)


__all__ = ["APISERVICE_NAME", "manifests", "register", "serving_pki", "unregister",
           "wait_available"]
