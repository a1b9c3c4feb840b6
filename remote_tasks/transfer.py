"""File transfers between VMs: streamed SFTP to SFTP, atomic, verified, memory-bounded.

The controller sends one message per destination VM to its namespace's transfer queue
(``vmfleet.<namespace>:transfers``, consumed by that namespace's transfer worker); it
carries, in ``Envelope.targets``, how to reach the source VM and the destination (by VM
name). The delivery claims its destination's attempt in Redis (``State.claim``). On a
first attempt it also claims, one by one, every *other* destination named in
``targets``, so that one read of the source serves them all (their own messages then find
the claims taken and run nothing): the controller must therefore name there only
destinations whose first attempt it has sent (Queued), never one held back by fan-out
limits. A retry (attempt 2 and later) goes alone.

The worker writes no status: it reports ``claimed``, ``progress`` (bytes copied, every
``PROGRESS_SECONDS``) and ``finished`` per destination to the controller's report stream,
renews each destination's heartbeat, and stops when its command is cancelled (deleted):
the attempt protocol commands use too (``remote_tasks.attempt``). Which failures run
again is the controller's decision (``controller.policy``).

The parts: the source (``transfer_sources``: a VM's file, a ConfigMap or Secret key), the
destinations (``transfer_dests``: a temporary file beside the target, renamed over it
once complete, so readers see the old file or the whole new one) and the SFTP pieces
and named errors both use (``transfer_files``). This module claims, runs and reports.

Deadlines: ``timeoutSeconds`` (from this attempt's start) and ``activeDeadlineSeconds``
(from the command's ``startTime``, ``Envelope.command_start``) are checked for every block
copied or hashed, and a watchdog timer closes the SFTP channels a stalled source or
destination holds the copy on at the deadline. Timeout, deadline or cancel remove the
partial file on every destination; the ``finished`` report says so (its message and
``transfer.partialRemoved``).

Memory: the source is read in windows of ``WINDOW`` bytes (paramiko prefetch, many read
requests in flight), each chunk hashed and written (pipelined) to every destination before
the next window is requested, so a transfer holds at most about one window plus the SSH
channel windows, whatever the file size. Paths only ever travel as SFTP strings.

Keys: a namespace's transfer worker reaches every VM of its namespace, and only those:
the kubelet mounts their credentials Secrets at ``<credentials dir>/<secret name>/`` (the
Process runtime writes the same files). Its Kubernetes token (the chart's per-namespace
ServiceAccount: ``get`` on Secrets and ConfigMaps of its namespace) serves ConfigMap and
Secret sources only; the client is created on first use. A Secret is copied only when it
is labelled ``vmfleet.io/transferable: "true"``, is not of a type that holds tokens or
registry or SSH credentials, and is no RemoteVM's credentials (``secret_refusal``).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import paramiko

from vmfleet.api.constants import Phase, Reason
from vmfleet.api.envelope import Envelope, Target
from vmfleet.api.plan import InvalidPlan, Location, Plan
from vmfleet.api.plan import Source as SourceSpec
from vmfleet.api.reports import Event, ResultFields
from vmfleet.api.times import now_rfc3339

from .attempt import TRANSFER, Attempt, attempt_deadlines
from .execute import AttemptFailed, CommandExecutor
from .session import Deadline
from .sshtarget import SSHTarget
from .transfer_dests import Destination, Run, complete, deadline_message, discard, prepare, watchdog
from .transfer_files import (
    READ_BLOCK,
    TEMP_MARK,
    WINDOW,
    Aborted,
    TransferFailed,
    classify,
    parse_mode,
    read_windows,
    remove_quietly,
    temp_path,
    temp_tag,
    throughput,
)
from .transfer_sources import Source, object_source, protected_secrets, secret_refusal, vm_source

if TYPE_CHECKING:
    from vmfleet.kube import Kube

log = logging.getLogger("remote_tasks.transfer")

PROGRESS_SECONDS = 5.0  # how often a running transfer reports the bytes it copied
# Failures after which the next attempt must reconnect (the pooled connection is dropped).
RECONNECT = frozenset({Reason.TRANSPORT_ERROR, Reason.AUTH_FAILED})


def transfer_deadline(plan: Plan, command_start: str | None, now: float) -> Deadline | None:
    """When this attempt must end (``now``: the executor's clock): timeoutSeconds from now,
    activeDeadlineSeconds from the command's startTime, whichever comes first."""
    return attempt_deadlines(plan, command_start, now).earliest


def _kube_of(api_connections: int) -> Kube:
    from vmfleet.kube import Kube, load_api_client

    return Kube(load_api_client(api_connections))


class TransferExecutor:
    """Runs transfer attempts with the command executor's Redis state and SSH pool."""

    def __init__(
        self,
        executor: CommandExecutor,
        clock: Callable[[], float] = time.monotonic,
        kube: Callable[[], Kube] | None = None,
    ) -> None:
        self.executor = executor
        self.state = executor.state
        self.pool = executor.pool
        self.clock = clock
        self._make_kube = kube or (lambda: _kube_of(executor.conf.api_connections))
        self._kube: Kube | None = None
        self._kube_lock = threading.Lock()

    @property
    def kube(self) -> Kube:
        """The Kubernetes client (ConfigMap and Secret sources only), made once."""
        with self._kube_lock:
            if self._kube is None:
                self._kube = self._make_kube()
            return self._kube

    # ---------------------------------------------------------------- claim

    def execute(self, envelope: Envelope, worker: str) -> str:
        """Claim this message's destination (and, on a first attempt, the envelope's other
        destinations), copy, and report each. Returns what happened, for logs."""
        # The claim's holder is this delivery, not just this worker: a worker's threads
        # (or a redelivery to it) must not win a claim another of its deliveries holds.
        attempt = Attempt(self.state, envelope, worker, holder=f"{worker}/{uuid.uuid4().hex[:12]}",
                          words=TRANSFER, clock=self.clock,
                          interval=self.executor.conf.heartbeat_seconds)
        with self.executor.cancels.running(attempt):
            return self._execute(attempt)

    def _execute(self, attempt: Attempt) -> str:
        envelope, worker = attempt.envelope, attempt.worker
        try:
            plan = envelope.work()
            if plan.transfer is None:
                raise InvalidPlan("the message has no transfer")
        except InvalidPlan as exc:
            return self._reject(attempt, str(exc))
        transfer = plan.transfer
        own = next((loc for loc in transfer.to if loc.vm == envelope.vm), None)
        if own is None:
            return self._reject(attempt, f"{envelope.vm} is not a destination of this transfer")
        if not attempt.take():
            return "cancelled" if attempt.cancelled else "duplicate"
        wanted: list[Location] = [own]
        if envelope.attempt == 1:
            # Every other destination the controller sent with this one: one read serves all.
            wanted += [loc for loc in transfer.to
                       if loc.vm != envelope.vm and loc.vm in envelope.targets
                       and attempt.take(loc.vm)]
        now = now_rfc3339()
        dests = []
        for loc in wanted:
            dests.append(Destination(loc.vm, loc.path, envelope.attempt,
                                     temp_path(loc.path, envelope.uid, loc.vm, envelope.attempt)))
            target = self._find_target(envelope, loc.vm)
            attempt.report(Event.CLAIMED, ResultFields(
                phase=Phase.RUNNING, start_time=now, worker=worker, heartbeat_time=now,
                host=target.host if target else None,
                transfer={"source": transfer.source.describe(), "path": loc.path}), loc.vm)
        started = self.clock()
        run = Run(envelope, worker, plan, transfer, dests, attempt, self.clock, started,
                  next_progress=started + PROGRESS_SECONDS,
                  deadline=transfer_deadline(plan, envelope.command_start, started))
        with attempt.beating():
            return self.run(run)

    def _reject(self, attempt: Attempt, message: str) -> str:
        """The message cannot run (the controller validated the spec: rare): fail its entry."""
        env = attempt.envelope
        if not attempt.finish(ResultFields(phase=Phase.FAILED, reason=Reason.INVALID_SPEC,
                                           message=message, completion_time=now_rfc3339())):
            return "cancelled" if attempt.cancelled else "duplicate"
        log.info("Finished transfer %s to %s attempt %s: %s (%s)", env.ref, env.vm, env.attempt,
                 Phase.FAILED, Reason.INVALID_SPEC)
        return Phase.FAILED

    # ---------------------------------------------------------------- run

    def run(self, run: Run) -> str:
        """Open the source, prepare each destination, stream, complete and report each;
        returns the worst phase (Cancelled, then Failed, else Succeeded)."""
        timer = watchdog(run)
        try:
            self._copy(run)
        except Aborted:
            log.info("Stopped transfer %s: the RemoteCommand was deleted", run.envelope.ref)
            for dest in run.dests:
                if dest.active:
                    discard(self.pool, dest)
                    left = "" if dest.partial_removed else \
                        f"; {dest.path} on {dest.vm} was left as it was"
                    dest.failure = TransferFailed(
                        Reason.CANCELLED, f"cancelled: the RemoteCommand was deleted{left}")
        except TransferFailed as exc:  # the source or the deadline: every destination alike
            # The watchdog cut a stalled read or write: that is the deadline.
            failure = run.deadline_failure(run.expired[0]) if run.expired else exc
            for dest in run.dests:
                if dest.active:
                    dest.failure = failure
        finally:
            if timer is not None:
                timer.cancel()
            self._close(run)
        self.flush(run, every=True)
        for dest in run.dests:
            if dest.failure is not None and dest.failure.reason in RECONNECT and dest.target:
                self.pool.discard(dest.target)  # the next attempt reconnects
        phases = {self._phase(dest) for dest in run.dests}
        for phase in (Phase.CANCELLED, Phase.FAILED):
            if phase in phases:
                return phase
        return Phase.SUCCEEDED

    def _copy(self, run: Run) -> None:
        self.tick(run)  # cancelled, or past the deadline, meanwhile?
        run.source = self.open_source(run.envelope, run.transfer.source, lambda: self.tick(run))
        self.tick(run)  # the watchdog may have fired before there was a source to cut
        for dest in run.dests:
            self.prepare(run, dest)
            self.flush(run)
            self.tick(run)
        if any(dest.active for dest in run.dests):
            run.digest = self.stream(run)
        elif any(dest.unchanged for dest in run.dests):
            run.digest = run.source.digest()
        for dest in run.dests:
            if dest.active:
                complete(run, dest, lambda: self.tick(run))
                self.flush(run)

    def _close(self, run: Run) -> None:
        """The source closed, every unreported temporary file removed, sessions closed."""
        if run.source is not None:
            try:
                run.source.close()
            except (OSError, paramiko.SSHException, EOFError):
                pass
        for dest in run.dests:
            if dest.fh is not None or (dest.failure is not None and not dest.reported):
                discard(self.pool, dest)
            if dest.sftp is not None:
                dest.sftp.close()
                dest.sftp = None

    def tick(self, run: Run) -> None:
        """Called for every block copied or hashed: heartbeats, progress, cancels, deadline."""
        if run.attempt.cancelled:
            raise Aborted()
        now = self.clock()
        run.attempt.beat_if_due(now)
        if run.attempt.cancelled:
            raise Aborted()
        # After the beat: the cleanup that follows a deadline sends none until it reports.
        if run.expired:  # the watchdog fired (it cut what was stalled): stop the others too
            raise run.deadline_failure(run.expired[0])
        if run.deadline is not None and (reason := run.deadline.expired(now)):
            raise run.deadline_failure(reason)
        if now >= run.next_progress and run.source is not None:
            run.next_progress = now + PROGRESS_SECONDS
            self.progress(run, run.source)

    def progress(self, run: Run, source: Source) -> None:
        """Report the bytes each running destination has so far (best effort)."""
        now = now_rfc3339()
        for dest in run.dests:
            if dest.reported or not dest.active:
                continue
            try:
                run.attempt.report(Event.PROGRESS, ResultFields(
                    heartbeat_time=now,
                    transfer={"source": source.description, "path": dest.path,
                              "bytes": dest.written, "totalBytes": source.size,
                              "updateTime": now}), dest.vm)
            except Exception as exc:  # noqa: BLE001 - the next report carries the count
                log.warning("Progress of transfer %s to %s not reported: %s", run.envelope.ref,
                            dest.vm, exc)

    # ---------------------------------------------------------------- source and targets

    def open_source(self, envelope: Envelope, source: SourceSpec,
                    tick: Callable[[], None] = lambda: None) -> Source:
        if source.vm is not None:
            assert source.path is not None
            return vm_source(self.pool, self.ssh_target(envelope, source.vm), source.vm,
                             source.path, tick)
        return object_source(self.kube, envelope, source)

    def _find_target(self, envelope: Envelope, vm: str) -> Target | None:
        target = envelope.targets.get(vm)
        if target is None and envelope.target is not None and envelope.target.vm == vm:
            target = envelope.target
        return target

    def ssh_target(self, envelope: Envelope, vm: str) -> SSHTarget:
        """How to reach ``vm``: its ``Target`` from the envelope, its key mounted or read."""
        target = self._find_target(envelope, vm)
        if target is None:
            raise TransferFailed(Reason.VM_NOT_FOUND,
                                 f"the message does not say how to reach RemoteVM {vm}")
        try:
            return self.executor.ssh_target(target)
        except AttemptFailed as failed:
            raise TransferFailed(failed.reason, failed.message) from failed

    # ---------------------------------------------------------------- destinations

    def prepare(self, run: Run, dest: Destination) -> None:
        """Reach the destination and make it ready for the copy (``transfer_dests.prepare``)."""
        try:
            dest.target = self.ssh_target(run.envelope, dest.vm)
        except TransferFailed as failed:
            dest.failure = failed
            return
        prepare(self.pool, run, dest, lambda: self.tick(run))

    def stream(self, run: Run) -> str:
        """Copy the source's blocks to every active destination; returns the sha256."""
        source = run.source
        assert source is not None
        digest = hashlib.sha256()
        for chunk in source.chunks():
            digest.update(chunk)
            for dest in run.dests:
                if not dest.active:
                    continue
                assert dest.fh is not None
                try:
                    dest.fh.write(chunk)
                    dest.written += len(chunk)
                except (OSError, paramiko.SSHException, EOFError) as exc:
                    dest.failure = classify(exc, dest.vm, dest.path, writing=True)
                    self.flush(run)  # its temp goes and the controller hears of it now
            if not any(dest.active for dest in run.dests):
                break
            self.tick(run)  # and the deadline, checked per block
        return digest.hexdigest()

    # ---------------------------------------------------------------- results

    def flush(self, run: Run, every: bool = False) -> None:
        """Report each destination that ended (failed now; with ``every``: all of them)."""
        for dest in run.unreported:
            if not every and dest.failure is None:
                continue
            if dest.failure is not None:
                if run.expired:  # the watchdog cut what it was blocked on: the deadline ended it
                    dest.failure = run.deadline_failure(run.expired[0])
                discard(self.pool, dest)
            self._finish(run, dest)

    def _result(self, run: Run, dest: Destination) -> dict[str, Any]:
        source = run.source
        duration = (dest.finished_at or self.clock()) - run.started
        fields: dict[str, Any] = {
            "source": source.description if source else run.transfer.source.describe(),
            "path": dest.path,
            "durationSeconds": round(duration, 3),
        }
        if dest.failure is None and source is not None:
            fields.update(bytes=source.size, totalBytes=source.size, sha256=run.digest,
                          bytesPerSecond=throughput(dest.written, duration),
                          verified=dest.verified or None, unchanged=dest.unchanged or None)
        else:
            fields.update(bytes=dest.written, totalBytes=source.size if source else None,
                          partialRemoved=dest.partial_removed or None)
        return fields

    @staticmethod
    def _phase(dest: Destination) -> str:
        if dest.failure is None:
            return Phase.SUCCEEDED
        return Phase.CANCELLED if dest.failure.reason == Reason.CANCELLED else Phase.FAILED

    def _finish(self, run: Run, dest: Destination) -> None:
        """Report the destination's outcome and end its heartbeats."""
        phase = self._phase(dest)
        if dest.failure is None:
            reason = Reason.COMPLETED
            message = ("unchanged: the destination already had the same content"
                       if dest.unchanged else None)
        else:
            reason, message = dest.failure.reason, dest.failure.message
            if dest.partial_removed and "partial file" not in message:
                message = (f"{message}; the partial file on {dest.vm} was removed ({dest.path} "
                           "was left as it was)")
        transfer = self._result(run, dest)
        run.attempt.finish(ResultFields(
            phase=phase, reason=reason, message=message, worker=run.worker,
            completion_time=now_rfc3339(), host=dest.target.host if dest.target else None,
            transfer={k: v for k, v in transfer.items() if v is not None} or None), dest.vm)
        dest.reported = True
        log.info("Finished transfer %s to %s attempt %s: %s (%s)", run.envelope.ref, dest.vm,
                 dest.attempt, phase, reason)

    # ---------------------------------------------------------------- cleanup task

    def clean(self, envelope: Envelope) -> int:
        """Remove the temporary files attempts 1..``envelope.attempt`` left on one destination."""
        try:
            transfer = envelope.work().transfer
        except InvalidPlan as exc:
            log.warning("Could not remove the temporary files of transfer %s on %s: %s",
                        envelope.ref, envelope.vm, exc)
            return 0
        loc = next((loc for loc in transfer.to if loc.vm == envelope.vm), None) \
            if transfer is not None else None
        if loc is None:
            return 0
        try:
            target = self.ssh_target(envelope, envelope.vm)
        except TransferFailed as failed:
            log.warning("Could not remove the temporary files of transfer %s on %s: %s",
                        envelope.ref, envelope.vm, failed.message)
            return 0
        sftp = self.pool.get(target).sftp()
        try:
            removed = sum(
                remove_quietly(sftp, temp_path(loc.path, envelope.uid, envelope.vm, attempt))
                for attempt in range(1, envelope.attempt + 1)
            )
        finally:
            sftp.close()
        log.info("Removed %s temporary file(s) of transfer %s on %s", removed, envelope.ref,
                 envelope.vm)
        return removed


# The pieces' names stay importable from here (the tests and the bench use them).
__all__ = ["PROGRESS_SECONDS", "READ_BLOCK", "RECONNECT", "TEMP_MARK", "WINDOW", "Aborted",
           "TransferExecutor", "TransferFailed", "classify", "deadline_message", "parse_mode",
           "protected_secrets", "read_windows", "secret_refusal", "temp_path", "temp_tag",
           "throughput", "transfer_deadline"]
