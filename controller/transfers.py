"""RemoteCommands with a ``transfer`` action: one result entry per destination VM.

Transfers are scheduled like commands (``Commands``, ``schedule.plan``): each
destination's attempt goes as ``remote_tasks.transfer_file`` to the namespace's transfer
queue (``vmfleet.<namespace>:transfers``), with the targets of the source and that
destination and the names of the namespace's credentials Secrets (never copied), and
wakes the namespace's transfer worker if it is scaled to zero. The worker
claims it in Redis, heartbeats and reports progress; a lost attempt (stale heartbeat) is
retried or ends ``WorkerLost`` by the one retry policy, and a cleanup task removes its
temporary file.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from vmfleet.api.constants import TASK_TRANSFER, Phase, Reason, transfer_queue
from vmfleet.api.envelope import Envelope
from vmfleet.api.models import RemoteCommandSpec
from vmfleet.api.reports import F
from vmfleet.api.times import now_rfc3339
from vmfleet.kube import ApiException

from .targets import initial_results

if TYPE_CHECKING:
    from .commands import Commands
    from .tracked import Tracked

log = logging.getLogger("controller.transfers")


def initial_transfer_results(
    spec: RemoteCommandSpec, vms: dict[str, dict[str, Any]], now: str
) -> list[dict[str, Any]]:
    """One entry per destination VM (pure). A missing source VM fails every destination."""
    transfer = spec.transfer
    assert transfer is not None
    names = [loc.vm for loc in transfer.to]
    results = initial_results(names, vms, now)
    source = transfer.from_.describe()
    paths = {loc.vm: loc.path for loc in transfer.to}
    missing_source = transfer.from_.vm is not None and transfer.from_.vm not in vms
    for entry in results:
        entry["transfer"] = {"source": source, "path": paths[entry["vm"]]}
        if missing_source and entry["phase"] == Phase.QUEUED:
            entry.update({F.COMPLETION_TIME: now}, phase=Phase.FAILED, reason=Reason.VM_NOT_FOUND,
                         message=f"source RemoteVM {transfer.from_.vm} does not exist in this "
                         "namespace")
            entry.pop("dispatchTime", None)
    return results


def send_transfer(commands: Commands, tracked: Tracked, entry: dict[str, Any], attempt: int,
                  task: str = TASK_TRANSFER) -> None:
    """Send one destination's attempt (or, ``TASK_TRANSFER_CLEANUP``, the removal of a lost
    attempt's temporary file) to the namespace's transfer queue, with every VM it touches."""
    spec = tracked.spec
    transfer = spec.transfer
    assert transfer is not None
    names = [entry["vm"]] + ([transfer.from_.vm] if transfer.from_.vm else [])
    if transfer.from_.secret_key_ref is not None and task == TASK_TRANSFER:
        # The namespace's RemoteVMs read from the API, not only those the watch has brought
        # so far: the key of a VM created just before this transfer is protected too.
        try:
            commands.list_vms(tracked.namespace, "")
        except ApiException as exc:
            log.warning("Could not list the RemoteVMs of %s (%s): the transfer of %s protects "
                        "the credentials Secrets the watch has seen", tracked.namespace,
                        exc.reason, tracked.ref)
    targets = {}
    for name in names:
        obj = commands.get_vm(tracked.namespace, name)
        if obj is not None:
            targets[name] = commands.target_of(obj)
    envelope = Envelope(namespace=tracked.namespace, name=tracked.name, uid=tracked.uid,
                        vm=entry["vm"], attempt=attempt, dispatch_time=now_rfc3339(),
                        spec=tracked.spec_wire, plan=tracked.plan, target=targets.get(entry["vm"]),
                        command_start=tracked.status.get(F.START_TIME), targets=targets,
                        scope=commands.state.scope,
                        protected_secrets=tuple(commands.protected_secrets(tracked.namespace)))
    if task == TASK_TRANSFER:
        commands.state.sent(tracked.uid, tracked.namespace)
    queue = transfer_queue(tracked.namespace)
    commands.send(task, envelope.to_message(), queue, tracked.namespace)
    commands.wake_transfers(tracked.namespace)  # a transfer worker at zero starts now
    verb = "Dispatched transfer" if task == TASK_TRANSFER else "Sent cleanup of transfer"
    log.info("%s %s to %s (attempt %s, queue %s)", verb, tracked.ref, entry["vm"], attempt,
             queue)


__all__ = ["initial_transfer_results", "send_transfer"]
