"""How the operators and the trigger reach Kubernetes, spelled as the cncf-kubernetes
provider spells it: in-cluster config, or ``config_file=`` / ``cluster_context=``, or an
Airflow connection of type ``kubernetes`` (extras ``in_cluster``, ``kube_config_path``,
``kube_config``, ``cluster_context``, ``namespace``, ``disable_verify_ssl``).

Explicit arguments win over the connection's extras. With neither, the in-cluster
config is used inside a pod and ``$KUBECONFIG`` / ``~/.kube/config`` elsewhere. A
missing ``kubernetes_default`` connection means "use those defaults", as in the provider.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import yaml

from vmfleet.settings import in_cluster

if TYPE_CHECKING:
    import kubernetes.client
    import kubernetes_asyncio.client

__all__ = ["DEFAULT_CONN_ID", "DEFAULT_NAMESPACE", "KubeSettings"]

DEFAULT_NAMESPACE = "default"
DEFAULT_CONN_ID = "kubernetes_default"


def _extra(extras: dict[str, Any], key: str) -> Any:
    # Older connections prefix their extras with the connection type.
    value = extras.get(key)
    if value in (None, ""):
        value = extras.get(f"extra__kubernetes__{key}")
    return None if value == "" else value


def _as_bool(value: Any) -> bool | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


@dataclass(frozen=True)
class KubeSettings:
    """Where the API server is. Holds no credentials itself: only names and paths."""

    kubernetes_conn_id: str | None = None
    config_file: str | None = None
    cluster_context: str | None = None
    in_cluster: bool | None = None

    def to_kwargs(self) -> dict[str, Any]:
        return asdict(self)

    # -------------------------------------------------------------- resolution
    def _merge_extras(self, extras: dict[str, Any]) -> tuple[KubeSettings, dict[str, Any] | None, bool]:
        kube_config = _extra(extras, "kube_config")
        config_dict: dict[str, Any] | None = None
        if kube_config is not None and not self.config_file:
            config_dict = kube_config if isinstance(kube_config, dict) else (
                json.loads(kube_config) if str(kube_config).lstrip().startswith("{")
                else yaml.safe_load(str(kube_config))
            )
        merged = replace(
            self,
            config_file=self.config_file or _extra(extras, "kube_config_path"),
            cluster_context=self.cluster_context or _extra(extras, "cluster_context"),
            in_cluster=self.in_cluster if self.in_cluster is not None
            else _as_bool(_extra(extras, "in_cluster")),
        )
        return merged, config_dict, bool(_as_bool(_extra(extras, "disable_verify_ssl")))

    def _check(self, config_dict: dict[str, Any] | None) -> None:
        if self.in_cluster and (self.config_file or config_dict is not None):
            raise ValueError(
                "in_cluster cannot be combined with config_file or a kube_config in the connection: "
                "choose one way to reach the cluster"
            )

    def _use_in_cluster(self, config_dict: dict[str, Any] | None) -> bool:
        if self.in_cluster is not None:
            return self.in_cluster
        if self.config_file or config_dict is not None:
            return False
        return in_cluster()

    def connection_extras(self) -> dict[str, Any]:
        """The Airflow connection's extras (empty without a connection id)."""
        if not self.kubernetes_conn_id:
            return {}
        from airflow.sdk import BaseHook
        from airflow.sdk.exceptions import AirflowNotFoundException

        try:
            return dict(BaseHook.get_connection(self.kubernetes_conn_id).extra_dejson or {})
        except AirflowNotFoundException:
            if self.kubernetes_conn_id != DEFAULT_CONN_ID:
                raise
            return {}  # as the provider does: no "kubernetes_default" means the defaults

    async def async_connection_extras(self) -> dict[str, Any]:
        if not self.kubernetes_conn_id:
            return {}
        from airflow.sdk import BaseHook
        from airflow.sdk.exceptions import AirflowNotFoundException

        try:
            conn = await BaseHook.aget_connection(self.kubernetes_conn_id)
        except AirflowNotFoundException:
            if self.kubernetes_conn_id != DEFAULT_CONN_ID:
                raise
            return {}
        return dict(conn.extra_dejson or {})

    def namespace(self, explicit: str | None) -> str:
        """``namespace=`` if given, else the connection's, else ``"default"``."""
        if explicit:
            return explicit
        return str(_extra(self.connection_extras(), "namespace") or DEFAULT_NAMESPACE)

    # -------------------------------------------------------------- clients
    def api_client(self) -> kubernetes.client.ApiClient:
        """A synchronous client (kubernetes package); the global default config is untouched."""
        import kubernetes

        settings, config_dict, insecure = self._merge_extras(self.connection_extras())
        settings._check(config_dict)
        configuration = kubernetes.client.Configuration()
        if settings._use_in_cluster(config_dict):
            kubernetes.config.load_incluster_config(client_configuration=configuration)
        elif config_dict is not None:
            kubernetes.config.load_kube_config_from_dict(
                config_dict, context=settings.cluster_context, client_configuration=configuration
            )
        else:
            kubernetes.config.load_kube_config(
                config_file=settings.config_file or os.environ.get("KUBECONFIG") or None,
                context=settings.cluster_context, client_configuration=configuration,
            )
        if insecure:
            configuration.verify_ssl = False
        return kubernetes.client.ApiClient(configuration)

    async def async_api_client(self) -> kubernetes_asyncio.client.ApiClient:
        """An asynchronous client (kubernetes_asyncio), for the trigger."""
        import kubernetes_asyncio

        settings, config_dict, insecure = self._merge_extras(await self.async_connection_extras())
        settings._check(config_dict)
        configuration = kubernetes_asyncio.client.Configuration()
        if settings._use_in_cluster(config_dict):
            kubernetes_asyncio.config.load_incluster_config(client_configuration=configuration)
        elif config_dict is not None:
            await kubernetes_asyncio.config.load_kube_config_from_dict(
                config_dict, context=settings.cluster_context, client_configuration=configuration
            )
        else:
            await kubernetes_asyncio.config.load_kube_config(
                config_file=settings.config_file or os.environ.get("KUBECONFIG") or None,
                context=settings.cluster_context, client_configuration=configuration,
            )
        if insecure:
            configuration.verify_ssl = False
        return kubernetes_asyncio.client.ApiClient(configuration)
