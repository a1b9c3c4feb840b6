"""A thin layer over the Kubernetes API for vmfleet objects: the controller, the CLI, the Airflow
hook and the transfer worker (ConfigMap and Secret sources) use it; command workers do not."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from functools import cached_property
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import quote

import kubernetes
from kubernetes.client import ApiClient, CustomObjectsApi
from kubernetes.client.exceptions import ApiException

if TYPE_CHECKING:
    from kubernetes.client import CoreV1Api

from .api import constants as c
from .settings import DEFAULT_API_CONNECTIONS, in_cluster

__all__ = ["ApiException", "Kube", "RawApi", "context_namespace", "load_api_client"]


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


APPS = "/apis/apps/v1"


class RawApi:
    """The built-in API calls the controller makes (core/v1 Events, ConfigMaps and Secret
    reads; apps/v1 worker Deployments), as plain JSON through the ``ApiClient``: importing
    the typed ``CoreV1Api`` loads a pydantic model for every core type (~20 MiB resident,
    the largest import of the controller; ``AppsV1Api`` ~11 MiB more), and each typed
    call validates its arguments and builds models of the answer. The core/v1 methods
    have ``CoreV1Api``'s names and arguments; answers are dicts."""

    def __init__(self, api_client: ApiClient) -> None:
        self.api_client = api_client

    def request(self, method: str, path: str, body: Any = None,
                content_type: str = "application/json",
                query: list[tuple[str, Any]] | None = None) -> dict[str, Any]:
        """One call; a non-2xx answer raises ``ApiException`` (as the typed methods do)."""
        client: Any = self.api_client
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        if not hasattr(client, "param_serialize"):
            # kubernetes < 37 (what Airflow's cncf-kubernetes provider may hold): the older
            # generator's call_api, which raises ApiException itself on a non-2xx answer.
            raw = client.call_api(path, method, query_params=query or None,
                                  header_params=headers, body=body,
                                  auth_settings=["BearerToken"], _preload_content=False)
            data = raw.data
            return cast(dict[str, Any], json.loads(data)) if data else {}
        method, url, headers, body, _ = client.param_serialize(
            method=method, resource_path=path, query_params=query or None,
            header_params=headers, body=body, auth_settings=["BearerToken"])
        response = client.call_api(method, url, headers, body)
        data = response.read()
        if not 200 <= response.status <= 299:
            raise ApiException.from_response(http_resp=response, body=data.decode(errors="replace"),
                                             data=None)
        return cast(dict[str, Any], json.loads(data)) if data else {}

    @staticmethod
    def _path(namespace: str | None, plural: str, name: str | None = None,
              group: str = "/api/v1") -> str:
        path = f"{group}/{plural}" if namespace is None else \
            f"{group}/namespaces/{quote(namespace, safe='')}/{plural}"
        return path if name is None else f"{path}/{quote(name, safe='')}"

    def status_path(self, namespace: str, plural: str, name: str) -> str:
        """The status subresource of one vmfleet object."""
        return self._path(namespace, plural, name, f"/apis/{c.GROUP}/{c.VERSION}") + "/status"

    def apply_deployment(self, namespace: str, name: str, body: dict[str, Any],
                         field_manager: str) -> dict[str, Any]:
        """Server-side apply of a Deployment (forced: the controller owns its fields)."""
        return self.request("PATCH", self._path(namespace, "deployments", name, APPS), body,
                            "application/apply-patch+yaml",
                            [("fieldManager", field_manager), ("force", "true")])

    def list_deployments(self, namespace: str | None, label_selector: str, limit: int,
                         token: str | None = None) -> dict[str, Any]:
        """One page of the Deployments of a namespace (None: every namespace)."""
        query: list[tuple[str, Any]] = [("labelSelector", label_selector), ("limit", limit)]
        if token:
            query.append(("continue", token))
        return self.request("GET", self._path(namespace, "deployments", group=APPS),
                            query=query)

    def create_namespaced_event(self, namespace: str, body: Any) -> dict[str, Any]:
        return self.request("POST", self._path(namespace, "events"), body)

    def create_namespaced_config_map(self, namespace: str, body: Any) -> dict[str, Any]:
        return self.request("POST", self._path(namespace, "configmaps"), body)

    def patch_namespaced_config_map(self, name: str, namespace: str, body: Any) -> dict[str, Any]:
        return self.request("PATCH", self._path(namespace, "configmaps", name), body,
                            "application/merge-patch+json")

    def read_namespaced_secret(self, name: str, namespace: str) -> dict[str, Any]:
        return self.request("GET", self._path(namespace, "secrets", name))

    def read_namespaced_config_map(self, name: str, namespace: str) -> dict[str, Any]:
        return self.request("GET", self._path(namespace, "configmaps", name))


class Kube:
    """The calls vmfleet makes, named for what they do."""

    def __init__(self, api_client: ApiClient | None = None) -> None:
        self.api_client = api_client or load_api_client()
        self.custom = CustomObjectsApi(self.api_client)
        self.raw = RawApi(self.api_client)  # what the controller uses of core/v1

    @cached_property
    def core(self) -> CoreV1Api:
        """The typed core/v1 API, imported on first use (the controller never uses it)."""
        from kubernetes.client import CoreV1Api

        return CoreV1Api(self.api_client)

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
        # The controller's write per command: plain JSON (RawApi), not the typed method's
        # argument validation and answer deserialization.
        return self.raw.request("PATCH", self.raw.status_path(namespace, c.COMMAND_PLURAL, name),
                                patch, content_type)

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
        return self.raw.request("PATCH", self.raw.status_path(namespace, c.VM_PLURAL, name),
                                patch, "application/merge-patch+json")

    def read_secret(self, namespace: str, name: str) -> dict[str, str]:
        """The Secret's data, base64-decoded to text."""
        import base64

        secret = self.raw.read_namespaced_secret(name, namespace)
        return {
            key: base64.b64decode(value).decode("utf-8", errors="replace")
            for key, value in (secret.get("data") or {}).items()
        }

    # RemoteCommandTemplate and its ConfigMap
    def get_template(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._get(c.TEMPLATE_PLURAL, namespace, name)

    def get_config_map_data(self, namespace: str, name: str) -> dict[str, str] | None:
        """A ConfigMap's ``data`` (None when it does not exist)."""
        try:
            found = self.raw.read_namespaced_config_map(name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return dict(found.get("data") or {})

    def _get(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return cast(dict[str, Any], self.custom.get_namespaced_custom_object(
                c.GROUP, c.VERSION, namespace, plural, name
            ))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
