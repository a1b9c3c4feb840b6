"""Run one attempt of a RemoteCommand on one VM and report what happened.

Plain code behind the Celery task. The worker holds no Kubernetes client and no API
models: the envelope carries what to run (its ``Plan``) and how to reach the VM, the key
comes from the VM's mounted credentials Secret, and the attempt protocol (``.attempt``:
the claim in Redis, heartbeats, reports to the controller, which alone writes the
RemoteCommand's status) is the one transfers use too.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko

from vmfleet import metrics, outputstore, settings
from vmfleet.api import constants as c
from vmfleet.api.constants import Phase, Reason
from vmfleet.api.envelope import Envelope, Target
from vmfleet.api.plan import InvalidPlan, Plan
from vmfleet.api.reports import ResultFields
from vmfleet.api.signing import Refused
from vmfleet.api.times import now_rfc3339
from vmfleet.state import State

from .attempt import Attempt, AttemptDeadlines, Cancels, attempt_deadlines, attempt_report
from .become import Become, PasswordInvalid, become_for, read_become_password, refusal
from .session import Deadline, ExecResult
from .shell import InvalidCommand, build_invocation
from .signals import signal_outcome
from .ssh import ConnectionPool, run_command
from .sshtarget import (
    CredentialsInvalid,
    NotStarted,
    SSHError,
    SSHTarget,
    TransportError,
)

log = logging.getLogger("remote_tasks")
output_log = logging.getLogger("remote_tasks.output")


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
                stdout_sha256=out.sha256,
                stderr_sha256=err.sha256,
                host_key_fingerprint=self.result.host_key,
                output_truncated=out.truncated or err.truncated,
            )
        return fields


def judge(result: ExecResult, success_exit_codes: Sequence[int]) -> Outcome:
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


class CommandExecutor:
    """Everything one worker process needs to run attempts: Redis, the SSH pool and the
    worker's settings (``conf``; default: every setting at its default)."""

    def __init__(self, state: State, pool: ConnectionPool, credentials_dir: Path,
                 output_store: Any = None, conf: settings.Settings | None = None) -> None:
        self.conf = conf or settings.Settings()
        self.state = state
        self.pool = pool
        self.credentials_dir = credentials_dir
        self.cancels = Cancels()
        self.output_store = output_store  # a Redis client of the output store, or None

    @classmethod
    def from_settings(cls, conf: settings.Settings) -> CommandExecutor:
        from vmfleet.state import state_url

        directory = conf.credentials_dir or c.CREDENTIALS_MOUNT_PATH
        store = None
        if conf.output_url:
            import redis

            store = redis.Redis.from_url(conf.output_url, socket_timeout=10,
                                         socket_connect_timeout=5, health_check_interval=30)
        return cls(State(state_url(conf)), ConnectionPool(), Path(directory), store, conf)

    def read_rate(self) -> float:
        """How fast an attempt's output is read (bytes/s, 0: no limit): a loud command is
        held back by SSH flow control so that it cannot take the worker (its CPU, its
        GIL) from the other attempts it runs or is about to start."""
        return float(self.conf.output_read_rate_bytes)

    def attempt_output(self, envelope: Envelope, spec: Plan
                       ) -> outputstore.AttemptOutput | None:
        """The writer of this attempt's whole output, when an output store is set."""
        if self.output_store is None:
            return None
        conf = self.conf
        limits = outputstore.Limits(
            max_bytes=conf.output_max_bytes,
            retention=outputstore.retention_seconds(spec.ttl_seconds_after_finished,
                                                    conf.output_retention_seconds),
            namespace_quota=conf.output_namespace_quota_bytes)
        return outputstore.AttemptOutput(self.output_store, envelope.namespace, envelope.uid,
                                         envelope.vm, envelope.attempt, limits)

    def listen_for_cancels(self, stop: threading.Event) -> None:
        self.state.listen_cancels(self.cancels.cancel, stop, self.conf.namespace)

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
        attempt = Attempt(self.state, envelope, worker, interval=self.conf.heartbeat_seconds)
        with self.cancels.running(attempt):
            try:
                plan = envelope.work()
                target = self.ssh_target(envelope.target)
                outcome = self.run(envelope, plan, target, attempt)
            except NotStarted:
                if not attempt.claimed:
                    return "cancelled" if attempt.cancelled else "duplicate"
                outcome = Outcome(Phase.CANCELLED, Reason.CANCELLED,
                                  "cancelled before it started: the RemoteCommand was deleted")
            except AttemptFailed as failed:
                outcome = Outcome(Phase.FAILED, failed.reason, failed.message)
            except InvalidPlan as exc:
                outcome = Outcome(Phase.FAILED, Reason.INVALID_SPEC, str(exc))
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
        attempt = Attempt(self.state, envelope, worker, interval=self.conf.heartbeat_seconds)
        fields = ResultFields(phase=Phase.FAILED, reason=Reason.MESSAGE_REFUSED,
                              message=f"the worker refused the message: {refused.detail}",
                              completion_time=now_rfc3339())
        if not attempt.finish(fields):
            return "cancelled" if attempt.cancelled else "duplicate"
        log.warning("Refused RemoteCommand %s on %s attempt %s: %s", envelope.ref, envelope.vm,
                    envelope.attempt, refused)
        return "refused"

    def run(self, envelope: Envelope, spec: Plan, target: SSHTarget,
            attempt: Attempt) -> Outcome:
        nonce = uuid.uuid4().hex
        try:
            invocation = build_invocation(spec, nonce)
        except InvalidCommand as exc:
            return Outcome(Phase.FAILED, Reason.INVALID_SPEC, str(exc))
        deadlines = attempt_deadlines(spec, envelope.command_start, time.monotonic())
        if deadlines.overall is not None and deadlines.overall.expired(time.monotonic()):
            return Outcome(Phase.FAILED, Reason.DEADLINE_EXCEEDED,
                           f"activeDeadlineSeconds ({spec.active_deadline_seconds}s) passed "
                           "before this attempt could start")
        if (refused := refusal(envelope.vm, target.allow_become, invocation.become_user)):
            return Outcome(Phase.FAILED, Reason.BECOME_FAILED, refused)
        become = become_for(invocation.become_user, target.become_password)
        prefix = f"[{envelope.ref} {envelope.vm}"
        output = self.attempt_output(envelope, spec)
        try:
            if envelope.lost_pgid:
                # The previous attempt's worker was lost: its processes end before this starts.
                self.pool.get(target).terminate(envelope.lost_pgid, self.conf.kill_grace_seconds,
                                                envelope.lost_marker, become)
                log.info("Terminated process group %s of the lost attempt of %s on %s",
                         envelope.lost_pgid, envelope.ref, envelope.vm)
            result = run_command(
                self.pool, target, invocation.line, invocation.stdin, spec.output_max_bytes,
                # Without an output store the worker's log is where the whole output is;
                # with one, the store has it (a line per log record would cost the worker
                # more than the command's own output does).
                on_stdout=None if output is not None else
                lambda line: output_log.info("%s stdout] %s", prefix, line),
                on_stderr=None if output is not None else
                lambda line: output_log.info("%s stderr] %s", prefix, line),
                nonce=nonce,
                deadline=Deadline.earliest(deadlines.attempt, deadlines.overall),
                gate=attempt.claim,
                tick=attempt.tick,
                kill_grace=self.conf.kill_grace_seconds,
                become=become,
                control=attempt.control,
                output=output,
                read_rate=self.read_rate,
            )
        except TransportError as exc:
            if exc.pgid is not None:
                self.terminate(target, exc.pgid, exc.nonce, become, broken=True)
            return Outcome(Phase.FAILED, exc.reason, str(exc))
        except SSHError as exc:
            return Outcome(Phase.FAILED, exc.reason, str(exc))
        finally:
            if output is not None:
                # Written, with its end mark, before the attempt reports its end: a reader
                # that sees the command finished finds every attempt's output complete.
                output.close(mark_end=attempt.claimed)
        return self.outcome_of(result, envelope, spec, attempt)

    def outcome_of(self, result: ExecResult, envelope: Envelope, spec: Plan,
                   attempt: Attempt) -> Outcome:
        """What a command that ran ended as: become refused, timed out, past its
        deadline, cancelled, else judged by its exit code."""
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
            self.pool.get(target).terminate(pgid, self.conf.kill_grace_seconds, nonce, become)
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


# Importable from here too: the attempt protocol lives in .attempt, shared with transfers.
__all__ = ["Attempt", "AttemptDeadlines", "AttemptFailed", "Cancels", "CommandExecutor",
           "CredentialsInvalid", "Outcome", "attempt_deadlines", "attempt_report", "judge"]
