"""Airflow operators for vmfleet (``pip install vmfleet[airflow]``).

``RemoteCommandOperator`` and ``RemoteFileTransferOperator`` create a RemoteCommand and
defer to ``RemoteCommandTrigger``, which watches that one object until it has finished;
``RemoteFileSensor`` waits for files on a VM with one RemoteCommand. Nothing here
imports kopf, and nothing outside this package imports Airflow.

The classes are imported on first use, so the pure helpers (``naming``, ``results``)
import without Airflow installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .operators import RemoteCommandOperator, RemoteFileTransferOperator
    from .sensors import RemoteFileSensor
    from .triggers import RemoteCommandTrigger

__all__ = [
    "RemoteCommandOperator",
    "RemoteCommandTrigger",
    "RemoteFileSensor",
    "RemoteFileTransferOperator",
]

_WHERE = {
    "RemoteCommandOperator": "operators",
    "RemoteFileTransferOperator": "operators",
    "RemoteFileSensor": "sensors",
    "RemoteCommandTrigger": "triggers",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f"{__name__}.{module}"), name)
