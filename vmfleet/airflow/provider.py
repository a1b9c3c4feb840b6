"""vmfleet as an Airflow provider: what the ``apache_airflow_provider`` entry point returns.

``pip install 'vmfleet[airflow]'`` registers this function (pyproject.toml), so that
``airflow providers list`` / ``providers get vmfleet`` / ``providers triggers`` know the
operators, the sensor, the trigger and the hook. Pure: importing it needs no Airflow.

No connection type of its own: vmfleet reaches Kubernetes through the ``kubernetes``
connection type (``kubernetes_default``) that the cncf-kubernetes provider registers, a
dependency of the ``airflow`` extra, with the same extras (``in_cluster``,
``kube_config_path``, ``kube_config``, ``cluster_context``, ``namespace``,
``disable_verify_ssl``).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

__all__ = ["INTEGRATION", "get_provider_info"]

INTEGRATION = "vmfleet"


def _version() -> str:
    try:
        return version("vmfleet")
    except PackageNotFoundError:  # a source tree that was not installed
        return "0.0.0"


def _modules(name: str) -> list[dict[str, Any]]:
    return [{"integration-name": INTEGRATION, "python-modules": [f"vmfleet.airflow.{name}"]}]


def get_provider_info() -> dict[str, Any]:
    return {
        "package-name": "vmfleet",
        "name": "vmfleet",
        "description": "Run commands and file transfers on a fleet of plain VMs over SSH, "
                       "driven from Kubernetes (RemoteCommand objects)",
        "versions": [_version()],
        "integrations": [{
            "integration-name": INTEGRATION,
            "tags": ["software"],
        }],
        "operators": _modules("operators"),
        "sensors": _modules("sensors"),
        "triggers": _modules("triggers"),
        "hooks": _modules("hooks"),
    }
