"""The vmfleet API: models, constants and the CRDs generated from them.

The pydantic models are imported on first use of one of their names here
(``vmfleet.api.RemoteCommandSpec``), not with the package: a worker imports
``vmfleet.api.constants``, ``.envelope`` and ``.plan`` and never loads pydantic.
"""

from typing import TYPE_CHECKING, Any

from .constants import API_VERSION, GROUP, VERSION, Condition, Phase, Reason

if TYPE_CHECKING:
    from .models import (
        ObjectCondition,
        RemoteCommandSpec,
        RemoteCommandStatus,
        RemoteVMSpec,
        RemoteVMStatus,
        TargetResult,
    )

_MODELS = frozenset({"ObjectCondition", "RemoteCommandSpec", "RemoteCommandStatus", "RemoteVMSpec",
                     "RemoteVMStatus", "TargetResult"})


def __getattr__(name: str) -> Any:
    if name in _MODELS:
        from . import models

        return getattr(models, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "API_VERSION",
    "GROUP",
    "VERSION",
    "Condition",
    "ObjectCondition",
    "Phase",
    "Reason",
    "RemoteCommandSpec",
    "RemoteCommandStatus",
    "RemoteVMSpec",
    "RemoteVMStatus",
    "TargetResult",
]
