"""A thin layer over the Kubernetes API for vmfleet objects: the controller, the CLI, the Airflow
hook and the transfer worker (ConfigMap and Secret sources) use it; command workers do not."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any, cast

import kubernetes
from kubernetes.client import ApiClient, CoreV1Api, CustomObjectsApi
from kubernetes.client.exceptions import ApiException

from .api import constants as c
from .settings import DEFAULT_API_CONNECTIONS, in_cluster

__all__ = ["ApiException", "Kube", "context_namespace", "load_api_client"]


def load_api_client(api_connections: int = DEFAULT_API_CONNECTIONS) -> ApiClient:
    """In-cluster config when running in a pod (:func:`vmfleet.settings.in_cluster`), else
    ``$KUBECONFIG`` / ``~/.kube/config``; ``api_connections``: ``VMFLEET_API_CONNECTIONS``
    of the controller's or worker's settings."""
    configuration = kubernetes.client.Configuration()
    if in_cluster():
        kubernetes.config.load_incluster_config(client_configuration=configuration)
    else:
        # $KUBECONFIG is read now, not when the kubernetes package was imported.
        kubernetes.config.load_kube_config(
            config_file=os.environ.get("KUBECONFIG") or None, client_configuration=configuration
        )
    # Controllers call from many threads (kopf's sync handlers, Celery worker threads):
    # a pool smaller than that discards connections and makes a TLS handshake per request.
    configuration.connection_pool_maxsize = api_connections
    return ApiClient(configuration)


SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def context_namespace() -> str:
    """The namespace of the kubeconfig's current context (in a pod: the pod's), else default."""
    if in_cluster():
        try:
            with open(SERVICE_ACCOUNT_NAMESPACE) as f:
                return f.read().strip() or "default"
        except OSError:
            return "default"
    try:
        _, current = kubernetes.config.list_kube_config_contexts(
            config_file=os.environ.get("KUBECONFIG") or None
        )
    except (kubernetes.config.ConfigException, OSError):
        return "default"
    return str(((current or {}).get("context") or {}).get("namespace") or "default")


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

    def create_command(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        return cast(dict[str, Any], self.custom.create_namespaced_custom_object(
            c.GROUP, c.VERSION, namespace, c.COMMAND_PLURAL, body
        ))

    def delete_command(self, namespace: str, name: str) -> bool:
        """Delete (background propagation); False when it was already gone."""
        try:
            self.custom.delete_namespaced_custom_object(
                c.GROUP, c.VERSION, namespace, c.COMMAND_PLURAL, name,
                propagation_policy="Background",
            )
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def list_commands(
        self, namespace: str, label_selector: str | None = None
    ) -> list[dict[str, Any]]:
        result = cast(dict[str, Any], self.custom.list_namespaced_custom_object(
            c.GROUP, c.VERSION, namespace, c.COMMAND_PLURAL, label_selector=label_selector or ""
        ))
        return list(result.get("items", []))

    def watch_command(
        self, namespace: str, name: str, resource_version: str | None, timeout_seconds: int = 60
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """Watch one RemoteCommand: yields (event type, object) until the server ends the
        watch after ``timeout_seconds``. An expired resourceVersion raises ApiException 410."""
        watch = kubernetes.watch.Watch()
        kwargs: dict[str, Any] = {
            "field_selector": f"metadata.name={name}",
            "timeout_seconds": timeout_seconds,
            "_request_timeout": timeout_seconds + 30,
        }
        if resource_version:
            kwargs["resource_version"] = resource_version
        try:
            for event in watch.stream(
                self.custom.list_namespaced_custom_object,
                c.GROUP, c.VERSION, namespace, c.COMMAND_PLURAL, **kwargs,
            ):
                yield str(event["type"]), cast(dict[str, Any], event["raw_object"])
        finally:
            watch.stop()

    def list_events(self, namespace: str, kind: str, name: str) -> list[dict[str, Any]]:
        """core/v1 Events about one object, oldest first, as plain dicts (camelCase)."""
        events = self.core.list_namespaced_event(
            namespace, field_selector=f"involvedObject.kind={kind},involvedObject.name={name}"
        )
        items = cast(list[dict[str, Any]], self.api_client.sanitize_for_serialization(events.items))
        return sorted(items, key=lambda e: str(
            e.get("lastTimestamp") or e.get("eventTime")
            or (e.get("metadata") or {}).get("creationTimestamp") or ""
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

    # RemoteCommandTemplate and its ConfigMap
    def get_template(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._get(c.TEMPLATE_PLURAL, namespace, name)

    def get_config_map_data(self, namespace: str, name: str) -> dict[str, str] | None:
        """A ConfigMap's ``data`` (None when it does not exist)."""
        try:
            found = self.core.read_namespaced_config_map(name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return dict(found.data or {})

    def _get(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return cast(dict[str, Any], self.custom.get_namespaced_custom_object(
                c.GROUP, c.VERSION, namespace, plural, name
            ))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
