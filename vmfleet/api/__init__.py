"""The vmfleet API: models, constants and the CRDs generated from them."""

from .constants import API_VERSION, GROUP, VERSION, Condition, Phase, Reason
from .models import (
    ObjectCondition,
    RemoteCommandSpec,
    RemoteCommandStatus,
    RemoteVMSpec,
    RemoteVMStatus,
    TargetResult,
)

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
