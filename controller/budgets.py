"""PodDisruptionBudgets of the worker Deployments.

A VM's workers with more than one replica (fixed, or an autoscale ceiling above one) and
every pool's workers get a PodDisruptionBudget beside their Deployment, same name, owned
by the same RemoteVMs (garbage collected with them): a drain evicts one worker pod at a
time, and each stopping pod finishes what it runs (``terminationGracePeriodSeconds``)
while the others keep taking work. A single-replica VM gets none: a budget would block
a drain of its node for ever.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from typing import Any

from kubernetes.client.exceptions import ApiException

from .runtime import WorkerGroup, owner_references

log = logging.getLogger("controller.budgets")


def wants_budget(group: WorkerGroup) -> bool:
    if group.pool:
        return True
    workers = group.workers
    if workers is None:
        return False
    if workers.replicas is not None:
        return workers.replicas > 1
    return workers.autoscale is not None and workers.autoscale.max_replicas > 1


def worker_budget(group: WorkerGroup, labels: dict[str, str],
                  owners: list[dict[str, Any]]) -> dict[str, Any]:
    """The group's PodDisruptionBudget (pure): one pod of the Deployment at a time."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": group.deployment, "namespace": group.namespace, "labels": labels,
                     "ownerReferences": owners},
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": labels}},
    }


class Budgets:
    """Applies each group's budget once per content (server-side apply; a restarted
    controller applies each again once, a no-op for the API server)."""

    def __init__(self, api_client: Any = None, policy: Any = None) -> None:
        if policy is None:
            from kubernetes.client import PolicyV1Api

            policy = PolicyV1Api(api_client)
        self.policy: Any = policy
        self._lock = threading.Lock()
        self._applied: dict[tuple[str, str], str] = {}

    def ensure(self, group: WorkerGroup, labels: dict[str, str]) -> None:
        if not wants_budget(group):
            return
        body = worker_budget(group, labels, owner_references(group))
        digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        key = (group.namespace, group.deployment)
        with self._lock:
            if self._applied.get(key) == digest:
                return
        try:
            self.policy.patch_namespaced_pod_disruption_budget(
                group.deployment, group.namespace, body, field_manager="vmfleet-controller",
                force=True, _content_type="application/apply-patch+yaml")
        except ApiException as exc:  # the Deployment works without it: tried again later
            log.warning("Could not apply PodDisruptionBudget %s/%s: %s %s", group.namespace,
                        group.deployment, exc.status, exc.reason)
            return
        with self._lock:
            self._applied[key] = digest
        log.info("Applied PodDisruptionBudget %s/%s (maxUnavailable 1)", group.namespace,
                 group.deployment)


__all__ = ["Budgets", "wants_budget", "worker_budget"]
