"""VmfleetHook: RemoteCommand objects through an Airflow ``kubernetes`` connection.

For a custom operator or a ``@task`` that wants to read or cancel RemoteCommands itself;
the operators use the same resolution (:class:`~vmfleet.airflow.connection.KubeSettings`).
"""

from __future__ import annotations

from typing import Any, cast

from airflow.sdk import BaseHook

from vmfleet.api import constants as c

from .connection import DEFAULT_CONN_ID, KubeSettings

__all__ = ["VmfleetHook"]


class VmfleetHook(BaseHook):
    """Read, list and delete RemoteCommands in the cluster a ``kubernetes`` connection names.

    :param kubernetes_conn_id: a connection of type ``kubernetes`` (default
        ``kubernetes_default``; a missing default means in-cluster or ``$KUBECONFIG``).
    :param config_file / cluster_context / in_cluster: as in the operators; they win over
        the connection's extras.
    """

    conn_name_attr = "kubernetes_conn_id"
    default_conn_name = DEFAULT_CONN_ID
    conn_type = "kubernetes"
    hook_name = "vmfleet (Kubernetes cluster connection)"

    def __init__(
        self,
        kubernetes_conn_id: str | None = DEFAULT_CONN_ID,
        config_file: str | None = None,
        cluster_context: str | None = None,
        in_cluster: bool | None = None,
    ) -> None:
        super().__init__()
        self.settings = KubeSettings(
            kubernetes_conn_id=kubernetes_conn_id, config_file=config_file,
            cluster_context=cluster_context, in_cluster=in_cluster,
        )

    def get_conn(self) -> Any:
        """A ``kubernetes.client.ApiClient`` (close it, or use it in a ``with``)."""
        return self.settings.api_client()

    def namespace(self, explicit: str | None = None) -> str:
        return self.settings.namespace(explicit)

    def get_command(self, name: str, namespace: str | None = None) -> dict[str, Any]:
        from kubernetes.client import CustomObjectsApi

        with self.get_conn() as api_client:
            return cast(dict[str, Any], CustomObjectsApi(api_client).get_namespaced_custom_object(
                c.GROUP, c.VERSION, self.namespace(namespace), c.COMMAND_PLURAL, name))

    def list_commands(self, namespace: str | None = None, label_selector: str = "") -> list[dict[str, Any]]:
        from kubernetes.client import CustomObjectsApi

        with self.get_conn() as api_client:
            listing = cast(dict[str, Any], CustomObjectsApi(api_client).list_namespaced_custom_object(
                c.GROUP, c.VERSION, self.namespace(namespace), c.COMMAND_PLURAL,
                label_selector=label_selector))
        return list(listing.get("items") or [])

    def delete_command(self, name: str, namespace: str | None = None) -> bool:
        """Delete (cancel) a RemoteCommand; False if it was already gone."""
        from kubernetes.client import CustomObjectsApi
        from kubernetes.client.exceptions import ApiException

        try:
            with self.get_conn() as api_client:
                CustomObjectsApi(api_client).delete_namespaced_custom_object(
                    c.GROUP, c.VERSION, self.namespace(namespace), c.COMMAND_PLURAL, name)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def test_connection(self) -> tuple[bool, str]:
        try:
            self.list_commands(label_selector="vmfleet.io/none-such=1")
        except Exception as exc:  # noqa: BLE001 - reported to the UI
            return False, str(exc)
        return True, "RemoteCommands can be listed"
