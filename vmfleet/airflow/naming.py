"""Deterministic RemoteCommand names for Airflow task instances (pure; no Airflow import).

One task try owns one RemoteCommand. Its name is derived from the task instance's
identity (dag id, task id, run id, map index, try number), so a task that restarts or
resumes within the same try finds its RemoteCommand again instead of running the command
twice, and a new try (a retry, a clear) gets a new object that runs anew.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Final

from vmfleet.api.constants import GROUP

# Object names stay DNS-1123 labels (they end up in label values and log prefixes).
MAX_NAME: Final = 63
_HASH_LEN: Final = 10
_PREFIX_BUDGET: Final = MAX_NAME - _HASH_LEN - 1
_NOT_DNS: Final = re.compile(r"[^a-z0-9]+")

ANNOTATION_PREFIX: Final = f"airflow.{GROUP}"
ANNOTATION_DAG_ID: Final = f"{ANNOTATION_PREFIX}/dag-id"
ANNOTATION_TASK_ID: Final = f"{ANNOTATION_PREFIX}/task-id"
ANNOTATION_RUN_ID: Final = f"{ANNOTATION_PREFIX}/run-id"
ANNOTATION_MAP_INDEX: Final = f"{ANNOTATION_PREFIX}/map-index"
ANNOTATION_TRY_NUMBER: Final = f"{ANNOTATION_PREFIX}/try-number"
ANNOTATION_SPEC_HASH: Final = f"{ANNOTATION_PREFIX}/spec-hash"
# Where the trigger keeps how far it has shown the command's output in the task log
# (vmfleet.airflow.output.Position): JSON, written at most every few seconds.
ANNOTATION_OUTPUT_POSITION: Final = f"{ANNOTATION_PREFIX}/output-position"
LABEL_CREATED_BY: Final = f"{GROUP}/created-by"
LABEL_DAG_ID: Final = f"{ANNOTATION_PREFIX}/dag-id"
LABEL_TASK_ID: Final = f"{ANNOTATION_PREFIX}/task-id"
CREATED_BY_AIRFLOW: Final = "airflow"


@dataclass(frozen=True)
class TaskIdentity:
    """What identifies one try of one task instance."""

    dag_id: str
    task_id: str
    run_id: str
    map_index: int = -1
    try_number: int = 1

    def digest(self) -> str:
        key = "\0".join(
            (self.dag_id, self.task_id, self.run_id, str(self.map_index), str(self.try_number))
        )
        return hashlib.sha256(key.encode()).hexdigest()

    def annotations(self) -> dict[str, str]:
        return {
            ANNOTATION_DAG_ID: self.dag_id,
            ANNOTATION_TASK_ID: self.task_id,
            ANNOTATION_RUN_ID: self.run_id,
            ANNOTATION_MAP_INDEX: str(self.map_index),
            ANNOTATION_TRY_NUMBER: str(self.try_number),
        }

    def labels(self) -> dict[str, str]:
        """Label values (at most 63 characters of ``[a-z0-9-]``) for ``kubectl -l``."""
        return {
            LABEL_CREATED_BY: CREATED_BY_AIRFLOW,
            LABEL_DAG_ID: label_value(self.dag_id),
            LABEL_TASK_ID: label_value(self.task_id),
        }

    def matches(self, annotations: dict[str, str] | None) -> bool:
        """True when an existing object's annotations name this very task try."""
        return all((annotations or {}).get(k) == v for k, v in self.annotations().items())


def slug(text: str) -> str:
    """Lower-case ``[a-z0-9-]`` with no leading, trailing or doubled dashes."""
    return _NOT_DNS.sub("-", text.lower()).strip("-")


def label_value(text: str) -> str:
    value = slug(text)
    if len(value) <= MAX_NAME:
        return value
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    return f"{value[: MAX_NAME - 9].rstrip('-')}-{digest}"


def command_name(identity: TaskIdentity) -> str:
    """``<dag>-<task>-<hash>``: readable, at most 63 characters, a valid DNS-1123 label.

    The hash covers the whole identity (run id, map index and try number included), so
    two task tries never share a name while one try always gets the same one.
    """
    dag, task = slug(identity.dag_id), slug(identity.task_id)
    # Share the budget, giving the task id what the dag id leaves unused.
    dag_budget = max(_PREFIX_BUDGET // 2 - 1, _PREFIX_BUDGET - 1 - len(task))
    dag = dag[:dag_budget].rstrip("-")
    task = task[: max(_PREFIX_BUDGET - 1 - len(dag), 0)].rstrip("-")
    prefix = "-".join(part for part in (dag, task) if part) or "airflow"
    return f"{prefix}-{identity.digest()[:_HASH_LEN]}"


def spec_hash(wire_spec: dict[str, object]) -> str:
    """A stable digest of a spec body, to tell our own object from a clashing one."""
    import json

    return hashlib.sha256(
        json.dumps(wire_spec, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()[:16]
