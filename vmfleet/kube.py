"""A thin layer over the Kubernetes API for vmfleet objects (used by controller and workers)."""

from __future__ import annotations

import os
from typing import Any, cast

import kubernetes
from kubernetes.client import ApiClient, CoreV1Api, CustomObjectsApi
from kubernetes.client.exceptions import ApiException

from .api import constants as c

__all__ = ["ApiException", "Kube", "load_api_client"]


def load_api_client() -> ApiClient:
    """In-cluster config when running in a pod, else ``$KUBECONFIG`` / ``~/.kube/config``."""
    configuration = kubernetes.client.Configuration()
    if os.environ.get("KUBERNETES_SERVICE_HOST") and not os.environ.get("KUBECONFIG"):
        kubernetes.config.load_incluster_config(client_configuration=configuration)
    else:
        # $KUBECONFIG is read now, not when the kubernetes package was imported.
        kubernetes.config.load_kube_config(
            config_file=os.environ.get("KUBECONFIG") or None, client_configuration=configuration
        )
    return ApiClient(configuration)


class Kube:
    """The calls vmfleet makes, named for what they do."""

    def __init__(self, api_client: ApiClient | None = None) -> None:
        self.api_client = api_client or load_api_client()
        self.custom = CustomObjectsApi(self.api_client)
        self.core = CoreV1Api(self.api_client)

    # RemoteCommand
    def get_command(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._get(c.COMMAND_PLURAL, namespace, name)

    def patch_command_status(
        self, namespace: str, name: str, patch: dict[str, Any] | list[dict[str, Any]]
    ) -> dict[str, Any]:
        """JSON Patch (a list, with ``test`` operations) or merge patch (a dict)."""
        content_type = (
            "application/json-patch+json" if isinstance(patch, list) else "application/merge-patch+json"
        )
        return cast(dict[str, Any], self.custom.patch_namespaced_custom_object_status(
            c.GROUP, c.VERSION, namespace, c.COMMAND_PLURAL, name, patch,
            _content_type=content_type,
        ))

    # RemoteVM
    def get_vm(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._get(c.VM_PLURAL, namespace, name)

    def list_vms(self, namespace: str, label_selector: str | None = None) -> list[dict[str, Any]]:
        result = cast(dict[str, Any], self.custom.list_namespaced_custom_object(
            c.GROUP, c.VERSION, namespace, c.VM_PLURAL, label_selector=label_selector or ""
        ))
        return list(result.get("items", []))

    def patch_vm_status(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        return cast(dict[str, Any], self.custom.patch_namespaced_custom_object_status(
            c.GROUP, c.VERSION, namespace, c.VM_PLURAL, name, patch,
            _content_type="application/merge-patch+json",
        ))

    def read_secret(self, namespace: str, name: str) -> dict[str, str]:
        """The Secret's data, base64-decoded to text."""
        import base64

        secret = self.core.read_namespaced_secret(name, namespace)
        return {
            key: base64.b64decode(value).decode("utf-8", errors="replace")
            for key, value in (secret.data or {}).items()
        }

    def _get(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return cast(dict[str, Any], self.custom.get_namespaced_custom_object(
                c.GROUP, c.VERSION, namespace, plural, name
            ))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
