"""Run one attempt of a RemoteCommand on one VM and report what happened.

Plain code behind the Celery task. The worker holds no Kubernetes client: the envelope
says how to reach the VM, the key comes from the VM's mounted credentials Secret, the
claim is taken in Redis (``vmfleet.state``), and the claim, heartbeats and the outcome
are reported to the controller, which alone writes the RemoteCommand's status.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import paramiko
from pydantic import ValidationError

from vmfleet import metrics, settings
from vmfleet.api import constants as c
from vmfleet.api.constants import Phase, Reason
from vmfleet.api.envelope import Envelope, Target, now_rfc3339, parse_rfc3339
from vmfleet.api.models import RemoteCommandSpec
from vmfleet.api.reports import AttemptReport, Event, ResultFields
from vmfleet.api.signing import Refused
from vmfleet.state import CANCELLED, CLAIMED, State

from .become import Become, PasswordInvalid, become_for, read_become_password, refusal
from .shell import InvalidCommand, build_invocation
from .signals import signal_outcome
from .ssh import (
    AttemptControl,
    ConnectionPool,
    CredentialsInvalid,
    Deadline,
    ExecResult,
    NotStarted,
    SSHError,
    SSHTarget,
    TransportError,
    run_command,
)

log = logging.getLogger("remote_tasks")
output_log = logging.getLogger("remote_tasks.output")



def _heartbeat_seconds() -> float:
    return settings.current().heartbeat_seconds


def _kill_grace() -> float:
    return settings.current().kill_grace_seconds


class AttemptFailed(Exception):
    """The attempt ended before the command could run."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class Outcome:
    """What an attempt ended as (reported as the VM's result entry)."""

    phase: str
    reason: str
    message: str | None = None
    exit_code: int | None = None
    result: ExecResult | None = None

    def fields(self, completion_time: str) -> ResultFields:
        fields = ResultFields(phase=self.phase, reason=self.reason, message=self.message,
                              exit_code=self.exit_code, completion_time=completion_time)
        if self.result is not None:
            signalled = signal_outcome(self.result.signal, self.exit_code)
            out, err = self.result.stdout, self.result.stderr
            fields = fields.replace(
                signal=signalled.get("signal"),
                exit_code=signalled.get("exitCode", self.exit_code),
                stdout=out.text(),
                stderr=err.text(),
                stdout_bytes=out.total,
                stderr_bytes=err.total,
                output_truncated=out.truncated or err.truncated,
            )
        return fields


def judge(result: ExecResult, success_exit_codes: list[int]) -> Outcome:
    """Succeeded or Failed, from the exit code and the spec's successExitCodes."""
    if result.exit_code is None and result.signal is not None:
        return Outcome(Phase.FAILED, Reason.SIGNALED, f"killed by signal {result.signal}", None,
                       result)
    if result.exit_code is None:
        return Outcome(
            Phase.FAILED, Reason.EXIT_CODE,
            "the command ended without an exit status (killed by a signal?)", None, result,
        )
    if result.exit_code in success_exit_codes:
        return Outcome(Phase.SUCCEEDED, Reason.COMPLETED, None, result.exit_code, result)
    return Outcome(
        Phase.FAILED, Reason.EXIT_CODE, f"exit code {result.exit_code}", result.exit_code, result
    )


@dataclass(frozen=True)
class AttemptDeadlines:
    attempt: Deadline | None
    overall: Deadline | None


def attempt_deadlines(spec: RemoteCommandSpec, command_start: str | None) -> AttemptDeadlines:
    """timeoutSeconds from now, and activeDeadlineSeconds from the command's startTime."""
    now = time.monotonic()
    per_attempt = (
        Deadline(now + spec.timeout_seconds, Reason.TIMEOUT) if spec.timeout_seconds else None
    )
    overall = None
    if spec.active_deadline_seconds and command_start:
        started = parse_rfc3339(command_start).timestamp()
        remaining = started + spec.active_deadline_seconds - time.time()
        overall = Deadline(now + remaining, Reason.DEADLINE_EXCEEDED)
    return AttemptDeadlines(per_attempt, overall)


def attempt_report(envelope: Envelope, worker: str, event: Event, fields: ResultFields,
                   vm: str | None = None, attempt: int | None = None) -> AttemptReport:
    """A report about one result entry (``vm``: a transfer's destination)."""
    return AttemptReport(
        event=event, namespace=envelope.namespace, name=envelope.name, uid=envelope.uid,
        vm=vm or envelope.vm, attempt=envelope.attempt if attempt is None else attempt,
        worker=worker, time=now_rfc3339(), fields=fields)


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
        counting against retries.limit. Returns how many were told."""
        told = 0
        for attempt in self.attempts():
            if not attempt.claimed:
                continue
            try:
                attempt.report(Event.PROGRESS, ResultFields(disruption=why))
                told += 1
            except Exception as exc:  # noqa: BLE001 - Redis away: a plain WorkerLost then
                log.warning("Could not report the disruption of %s on %s: %s",
                            attempt.envelope.ref, attempt.envelope.vm, exc)
        return told

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


class Attempt:
    """One delivery's attempt: it claims in Redis, then reports only what it owns."""

    def __init__(self, state: State, envelope: Envelope, worker: str) -> None:
        self.state = state
        self.envelope = envelope
        self.worker = worker
        self.claimed = False
        self.claim_lost = False  # another delivery claimed it, or the command is gone
        self.cancelled = False
        self.control = AttemptControl()  # ends the running attempt from another thread
        self.claimed_at = 0.0
        # This delivery's token in the claim: claiming again after a lost reply is ours.
        self.delivery = uuid.uuid4().hex[:16]
        self._next_heartbeat = time.monotonic() + _heartbeat_seconds()

    def _claim(self) -> bool:
        env = self.envelope
        result = self.state.claim(env.uid, env.vm, env.attempt, self.worker, env.scope,
                                   namespace=env.namespace, delivery=self.delivery)
        if result != CLAIMED:
            self.claim_lost = True
            self.cancelled = result == CANCELLED
            log.info("Skipped RemoteCommand %s on %s attempt %s: %s", env.ref, env.vm, env.attempt,
                     "it was deleted" if result == CANCELLED else "claimed by another delivery")
            return False
        self.claimed = True
        self.claimed_at = metrics.command_claimed(env.dispatch_time)
        self._next_heartbeat = time.monotonic() + _heartbeat_seconds()
        log.info("Claimed RemoteCommand %s on %s (attempt %s)", env.ref, env.vm, env.attempt)
        return True

    def report(self, event: Event, fields: ResultFields) -> None:
        self.state.report(attempt_report(self.envelope, self.worker, event, fields).to_message(),
                          self.envelope.scope)

    def claim(self, pgid: int | None, nonce: str) -> bool:
        """The gate: claim the attempt once the remote wrapper reported its process group;
        False if it is not ours to run."""
        if not self._claim():
            return False
        now = now_rfc3339()
        self.report(Event.CLAIMED, ResultFields(
            phase=Phase.RUNNING, start_time=now, worker=self.worker, heartbeat_time=now,
            pgid=pgid, process_marker=nonce if pgid is not None else None))
        return not self.cancelled

    def tick(self) -> str | None:
        """Called about twice a second while the command runs: the reason to end it now."""
        if not self.claimed:
            return None
        if self.cancelled:
            return Reason.CANCELLED
        now = time.monotonic()
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + _heartbeat_seconds()
            env = self.envelope
            try:
                if self.state.heartbeat(env.uid, env.vm, env.attempt, env.scope,
                                        namespace=env.namespace):
                    self.cancelled = True
            except Exception as exc:  # noqa: BLE001 - Redis restarting: the next beat may land
                log.warning("Heartbeat of %s on %s failed: %s", env.ref, env.vm, exc)
        return Reason.CANCELLED if self.cancelled else None

    def finish(self, fields: ResultFields) -> bool:
        """Report the outcome (claiming first if it ended before it started); False if the
        attempt was not this delivery's."""
        started = self.claimed
        if not started and not self._claim():
            return False
        env = self.envelope
        fields = fields.replace(worker=fields.worker or self.worker)
        if not started and fields.start_time is None:
            # Ended before it could start: no claim report carried a startTime.
            fields = fields.replace(start_time=fields.completion_time)
        self.report(Event.FINISHED, fields)
        self.state.release(env.uid, env.vm, env.attempt, env.scope, namespace=env.namespace)
        return True


class CommandExecutor:
    """Everything one worker process needs to run attempts: Redis and the SSH pool."""

    def __init__(self, state: State, pool: ConnectionPool, credentials_dir: Path) -> None:
        self.state = state
        self.pool = pool
        self.credentials_dir = credentials_dir
        self.cancels = Cancels()

    @classmethod
    def from_environment(cls) -> CommandExecutor:
        from vmfleet.state import state_url

        conf = settings.current()
        directory = conf.credentials_dir or c.CREDENTIALS_MOUNT_PATH
        return cls(State(state_url(conf.broker_url)), ConnectionPool(), Path(directory))

    def listen_for_cancels(self, stop: threading.Event) -> None:
        self.state.listen_cancels(self.cancels.cancel, stop, settings.current().namespace)

    # ------------------------------------------------------------------ targets

    def ssh_target(self, target: Target, first_use: bool = False, *, bastion: bool = False
                   ) -> SSHTarget:
        """The SSH target for an envelope's ``Target``, with the key from its mounted Secret.

        ``first_use``: a TrustOnFirstUse VM with no recorded key may be connected to (the
        health probe, whose report records the key); otherwise it is refused."""
        if target.trust_on_first_use and not target.host_keys and not first_use:
            raise AttemptFailed(
                Reason.TRANSPORT_ERROR,
                f"RemoteVM {target.vm} uses TrustOnFirstUse and its host key is not recorded "
                "yet: the first health probe records it (status.hostKey); retry after that",
            )
        if target.bastion is not None and bastion:
            raise AttemptFailed(
                Reason.INVALID_SPEC,
                f"RemoteVM {target.vm} cannot be reached: proxyJump supports one bastion hop",
            )
        private_key, passphrase = self.credentials(target.secret)
        become_password = None
        if target.allow_become and not bastion:
            try:
                become_password = read_become_password(self.credentials_dir / target.secret,
                                                       lambda: {})
            except (OSError, PasswordInvalid) as exc:
                raise AttemptFailed(
                    Reason.CREDENTIALS_INVALID,
                    f"cannot read the become-password of RemoteVM {target.vm}: {exc}") from exc
        return SSHTarget(
            allow_become=target.allow_become and not bastion,
            become_password=become_password,
            trust_on_first_use=target.trust_on_first_use and not target.host_keys,
            jump=self.ssh_target(target.bastion, bastion=True) if target.bastion else None,
            host=target.host,
            port=target.port,
            user=target.user,
            private_key=private_key,
            passphrase=passphrase,
            host_keys=target.host_keys,
            connect_timeout=target.connect_timeout,
        )

    def credentials(self, secret_name: str) -> tuple[str, str | None]:
        """The private key and passphrase from the Secret mounted at
        ``<credentials dir>/<secret name>/``."""
        directory = self.credentials_dir / secret_name
        key_file = directory / c.SECRET_KEY_PRIVATE_KEY
        phrase_file = directory / c.SECRET_KEY_PASSPHRASE
        try:
            key = key_file.read_text()
        except OSError as exc:
            raise AttemptFailed(
                Reason.CREDENTIALS_INVALID,
                f"cannot read Secret {secret_name}: {key_file}: {exc.strerror} "
                "(does the Secret exist, and is it mounted in this worker?)",
            ) from exc
        if not key.strip():
            raise AttemptFailed(Reason.CREDENTIALS_INVALID,
                                f"Secret {secret_name} has an empty {c.SECRET_KEY_PRIVATE_KEY!r}")
        phrase = phrase_file.read_text().strip() if phrase_file.exists() else None
        return key, phrase or None

    # ------------------------------------------------------------------ attempts

    def execute(self, envelope: Envelope, worker: str) -> str:
        """Run the attempt if this delivery wins the claim. Returns what happened, for logs."""
        if envelope.target is None:
            # Not from a controller of this version: claiming it would end the attempt.
            log.error("Dropped a message for RemoteCommand %s on %s: it names no target (sent "
                      "by an older controller?)", envelope.ref, envelope.vm)
            return "invalid"
        attempt = Attempt(self.state, envelope, worker)
        spec: RemoteCommandSpec | None = None
        with self.cancels.running(attempt):
            try:
                spec = RemoteCommandSpec.model_validate(envelope.spec)
                target = self.ssh_target(envelope.target)
                outcome = self.run(envelope, spec, target, attempt)
            except NotStarted:
                if not attempt.claimed:
                    return "cancelled" if attempt.cancelled else "duplicate"
                outcome = Outcome(Phase.CANCELLED, Reason.CANCELLED,
                                  "cancelled before it started: the RemoteCommand was deleted")
            except AttemptFailed as failed:
                outcome = Outcome(Phase.FAILED, failed.reason, failed.message)
            except ValidationError as exc:
                outcome = Outcome(Phase.FAILED, Reason.INVALID_SPEC, f"invalid spec: {exc}")
        fields = outcome.fields(now_rfc3339())
        if envelope.target is not None:
            fields = fields.replace(host=envelope.target.host)
        if not attempt.finish(fields):
            return "cancelled" if attempt.cancelled else "duplicate"
        log.info("Finished RemoteCommand %s on %s attempt %s: %s (%s)", envelope.ref, envelope.vm,
                 envelope.attempt, outcome.phase, outcome.reason)
        metrics.command_finished(envelope.namespace, envelope.vm, outcome.phase, outcome.reason,
                                 attempt.claimed_at)
        return str(outcome.phase)

    def refuse(self, envelope: Envelope, worker: str, refused: Refused) -> str:
        """A signed message this worker must not run (a VM or Secret it does not serve):
        its attempt ends ``Failed``, reason ``MessageRefused``, so it is not sent again."""
        attempt = Attempt(self.state, envelope, worker)
        fields = ResultFields(phase=Phase.FAILED, reason=Reason.MESSAGE_REFUSED,
                              message=f"the worker refused the message: {refused.detail}",
                              completion_time=now_rfc3339())
        if not attempt.finish(fields):
            return "cancelled" if attempt.cancelled else "duplicate"
        log.warning("Refused RemoteCommand %s on %s attempt %s: %s", envelope.ref, envelope.vm,
                    envelope.attempt, refused)
        return "refused"

    def run(self, envelope: Envelope, spec: RemoteCommandSpec, target: SSHTarget,
            attempt: Attempt) -> Outcome:
        nonce = uuid.uuid4().hex
        try:
            invocation = build_invocation(spec, nonce)
        except InvalidCommand as exc:
            return Outcome(Phase.FAILED, Reason.INVALID_SPEC, str(exc))
        deadlines = attempt_deadlines(spec, envelope.command_start)
        if deadlines.overall is not None and deadlines.overall.expired(time.monotonic()):
            return Outcome(Phase.FAILED, Reason.DEADLINE_EXCEEDED,
                           f"activeDeadlineSeconds ({spec.active_deadline_seconds}s) passed "
                           "before this attempt could start")
        if (refused := refusal(envelope.vm, target.allow_become, invocation.become_user)):
            return Outcome(Phase.FAILED, Reason.BECOME_FAILED, refused)
        become = become_for(invocation.become_user, target.become_password)
        prefix = f"[{envelope.ref} {envelope.vm}"
        try:
            if envelope.lost_pgid:
                # The previous attempt's worker was lost: its processes end before this starts.
                self.pool.get(target).terminate(envelope.lost_pgid, _kill_grace(),
                                                envelope.lost_marker, become)
                log.info("Terminated process group %s of the lost attempt of %s on %s",
                         envelope.lost_pgid, envelope.ref, envelope.vm)
            result = run_command(
                self.pool, target, invocation.line, invocation.stdin, spec.output.max_bytes,
                on_stdout=lambda line: output_log.info("%s stdout] %s", prefix, line),
                on_stderr=lambda line: output_log.info("%s stderr] %s", prefix, line),
                nonce=nonce,
                deadline=Deadline.earliest(deadlines.attempt, deadlines.overall),
                gate=attempt.claim,
                tick=attempt.tick,
                kill_grace=_kill_grace(),
                become=become,
                control=attempt.control,
            )
        except TransportError as exc:
            if exc.pgid is not None:
                self.terminate(target, exc.pgid, exc.nonce, become, broken=True)
            return Outcome(Phase.FAILED, exc.reason, str(exc))
        except SSHError as exc:
            return Outcome(Phase.FAILED, exc.reason, str(exc))
        if result.become_failed is not None:
            return Outcome(Phase.FAILED, Reason.BECOME_FAILED, result.become_failed, None, result)
        if result.ended_by == Reason.TIMEOUT:
            return Outcome(Phase.FAILED, Reason.TIMEOUT,
                           f"timed out after {spec.timeout_seconds}s; the remote process group "
                           "was terminated", None, result)
        if result.ended_by == Reason.DEADLINE_EXCEEDED:
            return Outcome(Phase.FAILED, Reason.DEADLINE_EXCEEDED,
                           f"activeDeadlineSeconds ({spec.active_deadline_seconds}s) passed; the "
                           "remote process group was terminated", None, result)
        if result.ended_by is None and result.exit_code is None and not attempt.cancelled:
            # Killed by a signal: a cancel may have terminated it before our tick saw it.
            attempt.cancelled = self.state.cancelled(envelope.uid, namespace=envelope.namespace)
        if result.ended_by == Reason.CANCELLED or (result.ended_by is None and attempt.cancelled):
            return Outcome(Phase.CANCELLED, Reason.CANCELLED,
                           "cancelled: the RemoteCommand was deleted; the remote process group "
                           "was terminated", None, result)
        return judge(result, spec.success_exit_codes)

    def terminate(self, target: SSHTarget, pgid: int, nonce: str | None,
                  become: Become | None = None, *, broken: bool = False) -> bool:
        """Best effort: end a remote process group (and the attempt's marked processes).

        On the pooled connection, beside the other commands running on it; ``broken``:
        that connection just failed, so a new one is made first."""
        if broken:
            self.pool.discard(target)
        try:
            self.pool.get(target).terminate(pgid, _kill_grace(), nonce, become)
        except (SSHError, OSError, paramiko.SSHException) as exc:
            log.warning("Could not terminate process group %s on %s: %s", pgid, target.address, exc)
            return False
        log.info("Terminated process group %s on %s", pgid, target.address)
        return True

    def terminate_attempt(self, target: Target, pgid: int, nonce: str | None,
                          become_user: str | None = None) -> bool:
        """Task body: end the process group of a lost attempt on one VM (as the user it
        ran as, through sudo, when it used ``become``)."""
        try:
            ssh_target = self.ssh_target(target)
        except AttemptFailed as failed:
            log.warning("Could not terminate process group %s on %s: %s", pgid, target.vm,
                        failed.message)
            return False
        become = become_for(become_user, ssh_target.become_password) \
            if become_user and ssh_target.allow_become else None
        return self.terminate(ssh_target, pgid, nonce, become)


__all__ = ["AttemptFailed", "CommandExecutor", "CredentialsInvalid", "Outcome", "judge"]
