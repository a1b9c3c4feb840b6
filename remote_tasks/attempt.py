"""The attempt protocol that commands and transfers share: claim, report, beat, finish.

An attempt of a RemoteCommand on one VM is a result entry ``(uid, vm, attempt)``. The
delivery that runs it first claims it in Redis (``State.claim``: atomic, once, whatever
the number of deliveries), then reports only what it claimed: ``claimed``, ``progress``
and ``finished`` (``vmfleet.api.reports``), renews each claimed entry's heartbeat while
it runs, and releases it when its outcome is reported. A command claims its one VM; a
transfer claims its destination and, on a first attempt, the other destinations one
read of the source serves (:class:`Attempt` holds them all). A published cancel (the
command was deleted) marks the attempts of that command this process runs
(:class:`Cancels`); a heartbeat that finds the cancel does the same.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

from vmfleet import metrics
from vmfleet.api.constants import Phase, Reason
from vmfleet.api.envelope import Envelope
from vmfleet.api.plan import Plan
from vmfleet.api.reports import AttemptReport, Event, ResultFields
from vmfleet.api.times import now_rfc3339, parse_rfc3339
from vmfleet.settings import Settings
from vmfleet.state import CANCELLED, CLAIMED, State

from .session import AttemptControl, Deadline

log = logging.getLogger("remote_tasks")


class Words(NamedTuple):
    """How the log names an attempt: ``Claimed RemoteCommand ns/c on vm1``."""

    noun: str
    on: str


COMMAND = Words("RemoteCommand", "on")
TRANSFER = Words("transfer", "to")


@dataclass(frozen=True)
class AttemptDeadlines:
    attempt: Deadline | None
    overall: Deadline | None

    @property
    def earliest(self) -> Deadline | None:
        return Deadline.earliest(self.attempt, self.overall)


def attempt_deadlines(plan: Plan, command_start: str | None, now: float) -> AttemptDeadlines:
    """timeoutSeconds from ``now`` (the caller's monotonic clock), and
    activeDeadlineSeconds from the command's startTime."""
    per_attempt = (
        Deadline(now + plan.timeout_seconds, Reason.TIMEOUT) if plan.timeout_seconds else None
    )
    overall = None
    if plan.active_deadline_seconds and command_start:
        started = parse_rfc3339(command_start).timestamp()
        remaining = started + plan.active_deadline_seconds - time.time()
        overall = Deadline(now + remaining, Reason.DEADLINE_EXCEEDED)
    return AttemptDeadlines(per_attempt, overall)


def attempt_report(envelope: Envelope, worker: str, event: Event, fields: ResultFields,
                   vm: str | None = None, attempt: int | None = None) -> AttemptReport:
    """A report about one result entry (``vm``: a transfer's destination)."""
    return AttemptReport(
        event=event, namespace=envelope.namespace, name=envelope.name, uid=envelope.uid,
        vm=vm or envelope.vm, attempt=envelope.attempt if attempt is None else attempt,
        worker=worker, time=now_rfc3339(), fields=fields)


#: Seconds between heartbeats when the worker's settings do not say (their default).
HEARTBEAT_SECONDS = Settings.heartbeat_seconds


class Attempt:
    """One delivery's attempt: the entries it claimed in Redis and what it reports of them.

    ``holder`` names the claim's owner in Redis (default: the worker); ``clock`` is the
    monotonic clock heartbeats are timed on (a transfer's executor passes its own);
    ``interval``: seconds between heartbeats (the worker's ``VMFLEET_HEARTBEAT_SECONDS``)."""

    def __init__(self, state: State, envelope: Envelope, worker: str, *,
                 holder: str | None = None, words: Words = COMMAND,
                 clock: Callable[[], float] = time.monotonic,
                 interval: float = HEARTBEAT_SECONDS) -> None:
        self.state = state
        self.envelope = envelope
        self.worker = worker
        self.holder = holder or worker
        self.words = words
        self.clock = clock
        self.held: list[str] = []  # the VMs whose entry this delivery claimed, in order
        self.ended: set[str] = set()  # ...and whose outcome it reported
        self.claim_lost = False  # another delivery claimed it, or the command is gone
        self.cancelled = False
        self.control = AttemptControl()  # ends the running command from another thread
        self.claimed_at = 0.0
        # This delivery's token in the claim: claiming again after a lost reply is ours.
        self.delivery = uuid.uuid4().hex[:16]
        self.start_time: str | None = None  # when the claim report said it started
        self.interval = interval
        self._next_beat = clock() + self.interval

    @property
    def claimed(self) -> bool:
        return bool(self.held)

    @property
    def running(self) -> list[str]:
        """The claimed entries whose outcome is not reported yet."""
        return [vm for vm in self.held if vm not in self.ended]

    def _name(self, vm: str) -> str:
        return f"{self.words.noun} {self.envelope.ref} {self.words.on} {vm}"

    def take(self, vm: str | None = None) -> bool:
        """Claim ``vm``'s entry (default: the envelope's VM) in Redis; False if it is not
        this delivery's to run (taken by another, or the command was deleted)."""
        env = self.envelope
        vm = vm or env.vm
        result = self.state.claim(env.uid, vm, env.attempt, self.holder, env.scope,
                                  namespace=env.namespace, delivery=self.delivery)
        if result != CLAIMED:
            self.claim_lost = self.claim_lost or vm == env.vm
            self.cancelled = self.cancelled or result == CANCELLED
            log.info("Skipped %s attempt %s: %s", self._name(vm), env.attempt,
                     "it was deleted" if result == CANCELLED else "claimed by another delivery")
            return False
        if not self.held:
            if self.words is COMMAND:
                self.claimed_at = metrics.command_claimed(env.dispatch_time)
            self._next_beat = self.clock() + self.interval
        self.held.append(vm)
        log.info("Claimed %s (attempt %s)", self._name(vm), env.attempt)
        return True

    def report(self, event: Event, fields: ResultFields, vm: str | None = None) -> None:
        self.state.report(
            attempt_report(self.envelope, self.worker, event, fields, vm=vm).to_message(),
            self.envelope.scope)

    def claim(self, pgid: int | None, nonce: str) -> bool:
        """A command's gate: claim the attempt once the remote wrapper reported its process
        group, and report it; False if it is not ours to run."""
        if not self.take():
            return False
        now = self.start_time = now_rfc3339()
        self.report(Event.CLAIMED, ResultFields(
            phase=Phase.RUNNING, start_time=now, worker=self.worker, heartbeat_time=now,
            pgid=pgid, process_marker=nonce if pgid is not None else None))
        return not self.cancelled

    def beat(self) -> None:
        """Renew the heartbeat of every running entry; one that finds its command
        cancelled marks the attempt cancelled. Redis away: logged, the next beat may land."""
        env = self.envelope
        for vm in self.running:
            try:
                if self.state.heartbeat(env.uid, vm, env.attempt, env.scope,
                                        namespace=env.namespace):
                    self.cancelled = True
            except Exception as exc:  # noqa: BLE001 - Redis restarting: the next beat may land
                log.warning("Heartbeat of %s failed: %s", self._name(vm), exc)

    def beat_if_due(self, now: float | None = None) -> None:
        """A heartbeat when one is due (every ``heartbeat_seconds`` once claimed; ``now``:
        the caller's reading of ``clock``)."""
        if not self.held:
            return
        now = self.clock() if now is None else now
        if now >= self._next_beat:
            self._next_beat = now + self.interval
            self.beat()

    def tick(self) -> str | None:
        """Called about twice a second while a command runs: the reason to end it now."""
        if not self.claimed:
            return None
        if self.cancelled:
            return Reason.CANCELLED
        self.beat_if_due()
        return Reason.CANCELLED if self.cancelled else None

    @contextmanager
    def beating(self) -> Iterator[None]:
        """Heartbeats from a thread of their own while the body runs: connecting, a slow
        first block or the cleanup after a deadline call no ``tick``, and a silence as long
        as the controller's lost-worker limit would end the attempt WorkerLost."""
        stop = threading.Event()
        if self.interval > 0:
            def beat() -> None:
                while not stop.wait(self.interval):
                    self.beat()

            threading.Thread(target=beat, name="vmfleet-attempt-beat", daemon=True).start()
        try:
            yield
        finally:
            stop.set()

    def finish(self, fields: ResultFields, vm: str | None = None) -> bool:
        """Report ``vm``'s outcome (claiming it first if it ended before it started) and
        release its heartbeat; False if the entry was not this delivery's."""
        env = self.envelope
        vm = vm or env.vm
        started = vm in self.held
        if not started and not self.take(vm):
            return False
        fields = fields.replace(worker=fields.worker or self.worker)
        if not started and fields.start_time is None:
            # Ended before it could start: no claim report carried a startTime.
            fields = fields.replace(start_time=fields.completion_time)
        elif fields.start_time is None and self.start_time is not None:
            # The outcome carries its start too: its record is whole without the claim.
            fields = fields.replace(start_time=self.start_time)
        self.report(Event.FINISHED, fields, vm)
        self.ended.add(vm)
        self.state.release(env.uid, vm, env.attempt, env.scope, namespace=env.namespace)
        return True

    def disrupted(self, why: str) -> int:
        """This worker is being stopped: each running entry reports it (a ``progress``
        report with ``disruption``). Returns how many were told."""
        told = 0
        for vm in self.running:
            try:
                self.report(Event.PROGRESS, ResultFields(disruption=why), vm)
                told += 1
            except Exception as exc:  # noqa: BLE001 - Redis away: a plain WorkerLost then
                log.warning("Could not report the disruption of %s: %s", self._name(vm), exc)
        return told


class Cancels:
    """The attempts this process runs, by command uid: a published cancel marks them at
    once (their next tick, within half a second, ends them)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[str, set[Attempt]] = {}

    @contextmanager
    def running(self, attempt: Attempt) -> Iterator[None]:
        uid = attempt.envelope.uid
        with self._lock:
            self._running.setdefault(uid, set()).add(attempt)
        try:
            yield
        finally:
            with self._lock:
                attempts = self._running.get(uid)
                if attempts is not None:
                    attempts.discard(attempt)
                    if not attempts:
                        del self._running[uid]

    def attempts(self) -> list[Attempt]:
        """Every attempt this process runs now."""
        with self._lock:
            return [a for attempts in self._running.values() for a in attempts]

    def draining(self, why: str) -> int:
        """This worker is being stopped (SIGTERM: a drain, a rollout) and finishes what it
        runs: each running attempt reports it (``disruption``), so that an attempt the
        grace period cannot cover ends WorkerLost naming the disruption, retried without
        counting against retries.limit. Returns how many entries were told."""
        return sum(attempt.disrupted(why) for attempt in self.attempts())

    def cancel(self, uid: str) -> None:
        with self._lock:
            attempts = list(self._running.get(uid, ()))
        for attempt in attempts:
            attempt.cancelled = True
            # The kill goes out now, from a thread of its own (TERM, grace, KILL), while the
            # attempt's thread still reads the command's channel.
            threading.Thread(target=attempt.control.terminate, args=(Reason.CANCELLED,),
                             name="vmfleet-cancel", daemon=True).start()
        if attempts:
            log.info("Cancelling RemoteCommand %s on %s: it was deleted",
                     attempts[0].envelope.ref, ", ".join(a.envelope.vm for a in attempts))


__all__ = ["COMMAND", "TRANSFER", "Attempt", "AttemptDeadlines", "Cancels", "Words",
           "attempt_deadlines", "attempt_report"]
