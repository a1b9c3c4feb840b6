"""VmfleetHook: RemoteCommand objects through an Airflow ``kubernetes`` connection.

The operators and the sensor (:mod:`vmfleet.airflow.operators`,
:mod:`vmfleet.airflow.sensors`) make every synchronous API call through this hook, as
``SSHOperator`` does through its ``ssh_hook``: create-or-attach, get (the brief wait and
the ``only_failed`` look-up of earlier tries) and delete (``on_kill``). The hook itself
holds no Kubernetes code of its own: it wraps :class:`vmfleet.kube.Kube`, the one access
layer for RemoteCommands that the CLI and the controller use too, bound to a client
built from the connection (:class:`~vmfleet.airflow.connection.KubeSettings`). Only the
trigger, which runs on asyncio, has its own (``kubernetes_asyncio``) client.

A custom operator or a ``@task`` may use it to read or cancel RemoteCommands itself.
"""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseHook
from airflow.sdk.exceptions import AirflowException

from .connection import DEFAULT_CONN_ID, KubeSettings

if TYPE_CHECKING:
    from vmfleet.kube import Kube

__all__ = ["VmfleetHook"]


class VmfleetHook(BaseHook):
    """Create, read, list and delete RemoteCommands in the cluster a ``kubernetes``
    connection names.

    :param kubernetes_conn_id: a connection of type ``kubernetes`` (default
        ``kubernetes_default``; a missing default means in-cluster or ``$KUBECONFIG``;
        None: no connection, only the other arguments and the defaults).
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
        """A new ``kubernetes.client.ApiClient`` (close it, or use it in a ``with``)."""
        return self.settings.api_client()

    @cached_property
    def kube(self) -> Kube:
        """:class:`vmfleet.kube.Kube` on one client, made at first use and kept for the
        hook's life (as the cncf-kubernetes hook keeps its API objects)."""
        from vmfleet.kube import Kube

        return Kube(self.get_conn())

    def namespace(self, explicit: str | None = None) -> str:
        return self.settings.namespace(explicit)

    def get_command(self, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        """The RemoteCommand, or None when it does not exist."""
        return self.kube.get_command(self.namespace(namespace), name)

    def create_or_get_command(self, body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Create the RemoteCommand ``body`` (its metadata names namespace and name):
        ``(created, True)``; when one of that name exists, ``(existing, False)``. Any other
        refusal raises AirflowException with the API server's answer."""
        from vmfleet.kube import ApiException

        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        try:
            return self.kube.create_command(namespace, body), True
        except ApiException as exc:
            if exc.status != 409:
                raise AirflowException(
                    f"Creating RemoteCommand {namespace}/{name} failed: "
                    f"{exc.status} {exc.reason}: {exc.body}"
                ) from exc
        existing = self.kube.get_command(namespace, name)
        if existing is None:
            raise AirflowException(f"RemoteCommand {namespace}/{name} existed, then was "
                                   "deleted while this task attached to it")
        return existing, False

    def list_commands(self, namespace: str | None = None, label_selector: str = "") -> list[dict[str, Any]]:
        return self.kube.list_commands(self.namespace(namespace), label_selector)

    def delete_command(self, name: str, namespace: str | None = None) -> bool:
        """Delete (cancel) a RemoteCommand; False if it was already gone."""
        return self.kube.delete_command(self.namespace(namespace), name)

    def test_connection(self) -> tuple[bool, str]:
        try:
            self.list_commands(label_selector="vmfleet.io/none-such=1")
        except Exception as exc:  # noqa: BLE001 - reported to the UI
            return False, str(exc)
        return True, "RemoteCommands can be listed"
