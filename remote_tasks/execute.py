"""Run one attempt of a RemoteCommand on one VM and write its result.

Plain code behind the Celery task: it re-checks the RemoteCommand, claims the VM's
result entry, runs the command over the pooled SSH connection and writes the outcome.
"""

from __future__ import annotations

import logging
import os
import random
import time
import uuid
from datetime import timedelta
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko
from pydantic import ValidationError

from vmfleet.api import constants as c
from vmfleet.api.constants import Phase, Reason
from vmfleet.api.envelope import Envelope, now_rfc3339, parse_rfc3339
from vmfleet.api.models import RemoteCommandSpec, RemoteVMSpec
from vmfleet.kube import ApiException, Kube
from vmfleet.policy import backoff_seconds, should_retry
from vmfleet import metrics

from vmfleet.celeryconf import broker_url

from . import claims
from .become import Become, PasswordInvalid, become_for, read_become_password, refusal
from .signals import signal_outcome
from .slots import write_turn
from .shell import InvalidCommand, build_invocation
from .ssh import (
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

CREDENTIALS_DIR_ENV = "VMFLEET_CREDENTIALS_DIR"
HEARTBEAT_SECONDS = float(os.environ.get("VMFLEET_HEARTBEAT_SECONDS", "5"))
# How long a resolved target (the RemoteVM and its key) is reused by the next commands
# before it is read again: saves two API reads per command on a busy VM.
TARGET_CACHE_SECONDS = float(os.environ.get("VMFLEET_TARGET_CACHE_SECONDS", "5"))
KILL_GRACE = float(os.environ.get("VMFLEET_KILL_GRACE_SECONDS", "3"))
LOST = "Lost"  # an attempt the controller declared lost while it still ran


class AttemptFailed(Exception):
    """The attempt ended before the command could run."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class Outcome:
    """What an attempt ended as (written into the VM's result entry)."""

    phase: str
    reason: str
    message: str | None = None
    exit_code: int | None = None
    result: ExecResult | None = None

    def fields(self, completion_time: str) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "phase": self.phase,
            "reason": self.reason,
            "message": self.message,
            "exitCode": self.exit_code,
            "completionTime": completion_time,
        }
        if self.result is not None:
            fields.update(signal_outcome(self.result.signal, self.exit_code))
            out, err = self.result.stdout, self.result.stderr
            fields.update(
                stdout=out.text(),
                stderr=err.text(),
                stdoutBytes=out.total,
                stderrBytes=err.total,
                outputTruncated=out.truncated or err.truncated,
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


# Outcomes after which the next attempt reads its RemoteVM and key again.
_CONNECTION_REASONS = frozenset({Reason.HOST_KEY_MISMATCH, Reason.AUTH_FAILED,
                                 Reason.TRANSPORT_ERROR, Reason.CREDENTIALS_INVALID})

# Fields of a result entry that belong to one attempt and go when it ends.
_ATTEMPT_FIELDS = ("pgid", "processMarker", "heartbeatTime", "lostPgid", "lostMarker", "retryAfter")


# A claim or result write the API server could not finish (a 5xx: e.g. etcd timing out
# while 50 workers write one fan-out's object at once) is tried again this many times.
WRITE_TRIES = int(os.environ.get("VMFLEET_WRITE_TRIES", "8"))


def _server_side(exc: ApiException) -> bool:
    return exc.status is None or exc.status == 0 or exc.status >= 500 or exc.status == 429


class Attempt:
    """One delivery's attempt: it claims the VM's result entry, then writes only to it,
    only while it still owns it.

    The claim is a single JSON Patch: ``claim`` once the remote wrapper reported its
    process group (the SSH layer's gate), or ``finish`` for an attempt that ended before
    the command could start (claim and outcome at once).
    """

    def __init__(self, kube: Kube, envelope: Envelope, index: int, worker: str,
                 entry: dict[str, Any], status: dict[str, Any] | None = None) -> None:
        self.kube = kube
        self.envelope = envelope
        self.index = index
        self.worker = worker
        self.entry = entry  # as read before the claim
        self.status = status or {}  # likewise: for folding a single-VM command
        self.fan_out = len(self.status.get("results") or []) > 1  # writes take turns
        self.current = {key: value for key, value in entry.items() if value is not None}
        # Fields the entry has: what the attempt read, or what the envelope lists.
        self.present = set(self.current) | set(envelope.entry_keys)
        self.claimed = False
        self.claim_lost = False  # another delivery claimed it, or the command is gone
        self.lost = False
        self.deleting = False
        self.claimed_at = 0.0
        self._next_heartbeat = time.monotonic() + HEARTBEAT_SECONDS

    def _write(self, patch: claims.Patch, landed: dict[str, Any]) -> dict[str, Any]:
        """Apply a JSON Patch, again after a server-side error (jittered backoff).

        A retry that fails its ``test`` operations (422) may mean the first try did land
        before the error: if the entry, written by this worker, shows the ``landed``
        fields (phase and attempt as this patch sets them), it did, and the object is
        returned; else the 422 stands.
        """
        delay = 0.2
        for attempt_no in range(1, WRITE_TRIES + 1):
            try:
                if self.fan_out:
                    with write_turn(broker_url(), self.envelope.uid):
                        return self.kube.patch_command_status(
                            self.envelope.namespace, self.envelope.name, patch)
                return self.kube.patch_command_status(self.envelope.namespace, self.envelope.name,
                                                      patch)
            except ApiException as exc:
                if exc.status == 422 and attempt_no > 1:
                    obj = self.kube.get_command(self.envelope.namespace, self.envelope.name)
                    results = ((obj or {}).get("status") or {}).get("results") or []
                    entry = results[self.index] if self.index < len(results) else {}
                    if obj is not None and entry.get("worker") == self.worker and all(
                            entry.get(key) == value for key, value in landed.items()):
                        return obj
                if not _server_side(exc) or attempt_no == WRITE_TRIES:
                    raise
                log.warning("Writing %s on %s failed (%s %s); trying again in %.1fs",
                            self.envelope.ref, self.envelope.vm, exc.status, exc.reason, delay)
            time.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, 5.0)
        raise AssertionError("unreachable")

    def _landed(self, entry: dict[str, Any] | None = None) -> dict[str, Any]:
        """What the entry shows once a patch leading to ``entry`` (default: the current
        state) has landed."""
        entry = self.current if entry is None else entry
        return {"phase": entry.get("phase"), "attempt": entry.get("attempt")}

    def _claim_ops(self, fields: dict[str, Any], remove: tuple[str, ...]) -> claims.Patch:
        now = now_rfc3339()
        after = {**self.current, "phase": Phase.RUNNING, "startTime": now, "worker": self.worker}
        ops = [{"op": "test", "path": "/metadata/uid", "value": self.envelope.uid},
               *claims.claim_patch(self.index, self.envelope.vm, self.envelope.attempt,
                                   self.worker, now)]
        base = f"/status/results/{self.index}"
        for key, value in fields.items():
            if value is not None:
                ops.append({"op": "add", "path": f"{base}/{key}", "value": value})
                after[key] = value
        gone = set()
        for key in remove:
            if key in self.present and fields.get(key) is None:
                ops.append({"op": "remove", "path": f"{base}/{key}"})
                after.pop(key, None)
                gone.add(key)
        self.current = after
        self.present = (self.present | set(after)) - gone
        return ops + claims.fold_ops(self.status, after, now)

    def claim(self, pgid: int | None, nonce: str) -> bool:
        """The gate: claim the attempt with its remote process group; False if it is not ours."""
        fields = {"pgid": pgid, "processMarker": nonce if pgid is not None else None,
                  "heartbeatTime": now_rfc3339()}
        before = dict(self.current), set(self.present)
        try:
            obj = self._write(self._claim_ops(fields, remove=("lostPgid", "lostMarker")),
                              landed=self._landed())
        except ApiException as exc:
            self.current, self.present = before
            if exc.status in (404, 409, 422):
                self.claim_lost = True
                log.info("Skipped RemoteCommand %s on %s: %s", self.envelope.ref, self.envelope.vm,
                         "it no longer exists" if exc.status == 404 else "claimed by another delivery")
                return False
            raise
        self._claimed(obj)
        return not self.deleting  # deleted meanwhile: claimed, but never started

    def _claimed(self, obj: dict[str, Any]) -> None:
        self.claimed = True
        self.claimed_at = metrics.command_claimed(self.envelope.dispatch_time)
        self._next_heartbeat = time.monotonic() + HEARTBEAT_SECONDS
        if obj.get("metadata", {}).get("deletionTimestamp"):
            self.deleting = True
        log.info("Claimed RemoteCommand %s on %s (attempt %s)", self.envelope.ref,
                 self.envelope.vm, self.envelope.attempt)

    def _patch(self, fields: dict[str, Any], remove: tuple[str, ...] = (), *,
               fold: bool = False) -> dict[str, Any]:
        gone = tuple(key for key in remove if key in self.present and fields.get(key) is None)
        after = {key: value for key, value in {**self.current, **fields}.items()
                 if value is not None and key not in gone}
        patch = claims.finish_patch(self.index, self.envelope.vm, self.envelope.attempt,
                                    self.worker, fields, remove=gone)
        if fold:
            patch += claims.fold_ops(self.status, after, now_rfc3339())
        obj = self._write(patch, landed=self._landed(after))
        self.current = after
        self.present = (self.present | set(after)) - set(gone)
        if obj.get("metadata", {}).get("deletionTimestamp"):
            self.deleting = True
        return obj

    def tick(self) -> str | None:
        """Heartbeat; returns a reason to end the attempt (cancelled, or taken over)."""
        if not self.claimed:
            return None
        if self.lost:
            return LOST
        if self.deleting:
            return Reason.CANCELLED
        now = time.monotonic()
        if now < self._next_heartbeat:
            return None
        self._next_heartbeat = now + HEARTBEAT_SECONDS
        try:
            self._patch({"heartbeatTime": now_rfc3339()})
        except ApiException as exc:
            if exc.status == 404:
                return Reason.CANCELLED
            self._lost_or_log(exc)
            return LOST if self.lost else None
        return Reason.CANCELLED if self.deleting else None

    def finish(self, fields: dict[str, Any]) -> bool:
        """Write the outcome (claiming the attempt first if it ended before it started);
        False if the attempt was not this delivery's to write."""
        remove = tuple(key for key, value in fields.items() if value is None) + _ATTEMPT_FIELDS
        if not self.claimed:
            try:
                obj = self._write(self._claim_ops(fields, remove), landed=self._landed())
            except ApiException as exc:
                if exc.status in (404, 409, 422):
                    self.claim_lost = True
                    log.info("Skipped RemoteCommand %s on %s: %s", self.envelope.ref,
                             self.envelope.vm, "it no longer exists" if exc.status == 404
                             else "claimed by another delivery")
                    return False
                raise
            self._claimed(obj)
            return True
        try:
            self._patch(fields, remove=remove, fold=True)
        except ApiException as exc:
            if exc.status in (404, 409, 422):
                log.warning("Could not write the result of %s on %s attempt %s: %s",
                            self.envelope.ref, self.envelope.vm, self.envelope.attempt,
                            "the object is gone" if exc.status == 404 else "the attempt was taken over")
                return False
            raise
        return True

    def _lost_or_log(self, exc: ApiException) -> None:
        if exc.status == 422:
            self.lost = True  # the controller declared this attempt lost meanwhile
        else:
            log.warning("Heartbeat of %s on %s failed: %s", self.envelope.ref, self.envelope.vm,
                        exc.reason)


class CommandExecutor:
    """Everything one worker process needs to run attempts: the API and the SSH pool."""

    def __init__(self, kube: Kube, pool: ConnectionPool, credentials_dir: Path | None = None) -> None:
        self.kube = kube
        self.pool = pool
        self.credentials_dir = credentials_dir
        self._targets: dict[tuple[str, str], tuple[float, SSHTarget]] = {}

    def command_target(self, namespace: str, vm: str) -> SSHTarget:
        """``resolve_target`` for running commands, reused for ``TARGET_CACHE_SECONDS``."""
        now = time.monotonic()
        cached = self._targets.get((namespace, vm))
        if cached is not None and now - cached[0] < TARGET_CACHE_SECONDS:
            return cached[1]
        target = self.resolve_target(namespace, vm)
        self._targets[(namespace, vm)] = (now, target)
        return target

    @classmethod
    def from_environment(cls) -> CommandExecutor:
        directory = os.environ.get(CREDENTIALS_DIR_ENV)
        return cls(Kube(), ConnectionPool(), Path(directory) if directory else None)

    def execute(self, envelope: Envelope, worker: str) -> str:
        """Run the attempt if this delivery wins the claim. Returns what happened, for logs."""
        if envelope.index is not None:
            # The envelope says where the attempt's entry is: no read before the claim
            # (whose test operations check uid, vm, phase and attempt).
            index = envelope.index
            entry = {"vm": envelope.vm, "phase": Phase.QUEUED, "attempt": envelope.attempt,
                     "lostPgid": envelope.lost_pgid, "lostMarker": envelope.lost_marker}
            status: dict[str, Any] = {"startTime": envelope.command_start,
                                      "results": [entry] * max(envelope.targets, 1)}
            spec_body = envelope.spec
        else:
            obj = self.kube.get_command(envelope.namespace, envelope.name)
            if obj is None or obj["metadata"].get("uid") != envelope.uid:
                log.info("Skipped RemoteCommand %s on %s: it no longer exists", envelope.ref, envelope.vm)
                return "gone"
            found = claims.result_index(obj.get("status"), envelope.vm)
            entry = obj["status"]["results"][found] if found is not None else {}
            if entry.get("phase") != Phase.QUEUED or entry.get("attempt") != envelope.attempt:
                log.info(
                    "Skipped RemoteCommand %s on %s attempt %s: already %s",
                    envelope.ref, envelope.vm, envelope.attempt, entry.get("phase", "unknown"),
                )
                return "duplicate"
            if obj["metadata"].get("deletionTimestamp"):
                log.info("Skipped RemoteCommand %s on %s: it is being deleted", envelope.ref, envelope.vm)
                return "cancelled"
            assert found is not None
            index, status, spec_body = found, obj.get("status") or {}, obj["spec"]
        attempt = Attempt(self.kube, envelope, index, worker, entry, status)
        host: str | None = None
        spec: RemoteCommandSpec | None = None
        try:
            spec = RemoteCommandSpec.model_validate(spec_body)
            target = self.command_target(envelope.namespace, envelope.vm)
            host = target.host
            outcome = self.run(envelope, spec, target, attempt, status)
        except NotStarted:
            if not attempt.claimed:
                return "duplicate"  # another delivery claimed it (or the command is gone)
            # Claimed, but the command is being deleted: it never started.
            outcome = Outcome(Phase.CANCELLED, Reason.CANCELLED,
                              "cancelled before it started: the RemoteCommand was deleted")
        except AttemptFailed as failed:
            outcome = Outcome(Phase.FAILED, failed.reason, failed.message)
        except ValidationError as exc:
            outcome = Outcome(Phase.FAILED, Reason.INVALID_SPEC, f"invalid spec: {exc}")
        if outcome.reason in _CONNECTION_REASONS:
            self._targets.pop((envelope.namespace, envelope.vm), None)  # read the VM afresh
        if attempt.lost:
            log.warning("Stopped RemoteCommand %s on %s attempt %s: the attempt was taken over "
                        "(marked lost); its result is not written", envelope.ref, envelope.vm,
                        envelope.attempt)
            return "lost"
        now = now_rfc3339()
        fields = outcome.fields(now)
        if host is not None:
            fields["host"] = host
        if (
            spec is not None
            and outcome.phase == Phase.FAILED
            and not attempt.deleting
            and should_retry(spec, envelope.attempt, outcome.reason, outcome.exit_code)
        ):
            delay = backoff_seconds(spec, envelope.attempt)
            fields.update(
                phase=Phase.PENDING,
                attempt=envelope.attempt + 1,
                retryAfter=(parse_rfc3339(now) + timedelta(seconds=delay)).isoformat(
                    timespec="milliseconds").replace("+00:00", "Z"),
                completionTime=None,
                message=f"attempt {envelope.attempt} failed ({outcome.reason}): "
                f"{outcome.message or outcome.reason}; next attempt after {delay:.0f}s",
            )
        if not attempt.finish(fields) and attempt.claim_lost:
            return "duplicate"
        log.info("Finished RemoteCommand %s on %s attempt %s: %s (%s)", envelope.ref, envelope.vm,
                 envelope.attempt, fields["phase"], outcome.reason)
        metrics.command_finished(envelope.namespace, envelope.vm, outcome.phase, outcome.reason,
                                 attempt.claimed_at)
        return str(fields["phase"])

    def run(
        self, envelope: Envelope, spec: RemoteCommandSpec, target: SSHTarget, attempt: Attempt,
        status: dict[str, Any],
    ) -> Outcome:
        nonce = uuid.uuid4().hex
        try:
            invocation = build_invocation(spec, nonce)
        except InvalidCommand as exc:
            return Outcome(Phase.FAILED, Reason.INVALID_SPEC, str(exc))
        deadlines = attempt_deadlines(spec, status.get("startTime"))
        if deadlines.overall is not None and deadlines.overall.expired(time.monotonic()):
            return Outcome(Phase.FAILED, Reason.DEADLINE_EXCEEDED,
                           f"activeDeadlineSeconds ({spec.active_deadline_seconds}s) passed "
                           "before this attempt could start")
        if (refused := refusal(envelope.vm, target.allow_become, invocation.become_user)):
            return Outcome(Phase.FAILED, Reason.BECOME_FAILED, refused)
        lost_pgid = attempt.entry.get("lostPgid")
        become = become_for(invocation.become_user, target.become_password)
        prefix = f"[{envelope.ref} {envelope.vm}"
        try:
            if lost_pgid:
                # The previous attempt's worker was lost: its processes end before this starts.
                self.pool.get(target).terminate(int(lost_pgid), KILL_GRACE,
                                                attempt.entry.get("lostMarker"), become)
                log.info("Terminated process group %s of the lost attempt of %s on %s",
                         lost_pgid, envelope.ref, envelope.vm)
            result = run_command(
                self.pool, target, invocation.line, invocation.stdin, spec.output.max_bytes,
                on_stdout=lambda line: output_log.info("%s stdout] %s", prefix, line),
                on_stderr=lambda line: output_log.info("%s stderr] %s", prefix, line),
                nonce=nonce,
                deadline=Deadline.earliest(deadlines.attempt, deadlines.overall),
                gate=attempt.claim,
                tick=attempt.tick,
                kill_grace=KILL_GRACE,
                become=become,
            )
        except TransportError as exc:
            if exc.pgid is not None:
                self.terminate(target, exc.pgid, exc.nonce, become)
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
        if result.ended_by is None and result.exit_code is None and not attempt.deleting:
            # Killed by a signal: the controller terminates the group when the command is
            # deleted, sometimes before our heartbeat saw the deletion.
            current = self.kube.get_command(envelope.namespace, envelope.name)
            if current is None or current["metadata"].get("deletionTimestamp"):
                attempt.deleting = True
        if result.ended_by == Reason.CANCELLED or (result.ended_by is None and attempt.deleting):
            return Outcome(Phase.CANCELLED, Reason.CANCELLED,
                           "cancelled: the RemoteCommand was deleted; the remote process group "
                           "was terminated", None, result)
        return judge(result, spec.success_exit_codes)

    def terminate(self, target: SSHTarget, pgid: int, nonce: str | None,
                  become: Become | None = None) -> bool:
        """Best effort: end a remote process group (and the attempt's marked processes)
        over a fresh connection."""
        self.pool.discard(target)
        try:
            self.pool.get(target).terminate(pgid, KILL_GRACE, nonce, become)
        except (SSHError, OSError, paramiko.SSHException) as exc:
            log.warning("Could not terminate process group %s on %s: %s", pgid, target.address, exc)
            return False
        log.info("Terminated process group %s on %s", pgid, target.address)
        return True

    def terminate_attempt(self, namespace: str, vm: str, pgid: int, nonce: str | None) -> bool:
        """Task body: end the process group of a lost attempt on one VM."""
        try:
            target = self.resolve_target(namespace, vm)
        except AttemptFailed as failed:
            log.warning("Could not terminate process group %s on %s/%s: %s", pgid, namespace, vm,
                        failed.message)
            return False
        return self.terminate(target, pgid, nonce)

    def resolve_target(
        self, namespace: str, vm_name: str, bastion_of: str | None = None, first_use: bool = False
    ) -> SSHTarget:
        """How to reach a VM. ``first_use``: a TrustOnFirstUse VM with no recorded key may be
        connected to (the health probe, which records the key); otherwise it is refused."""
        vm = self.kube.get_vm(namespace, vm_name)
        if vm is None:
            raise AttemptFailed(Reason.VM_NOT_FOUND, f"RemoteVM {namespace}/{vm_name} does not exist")
        try:
            spec = RemoteVMSpec.model_validate(vm["spec"])
        except ValidationError as exc:
            raise AttemptFailed(Reason.INVALID_SPEC, f"RemoteVM {vm_name} is invalid: {exc}") from exc
        private_key, passphrase = self.credentials(namespace, spec.credentials_secret_ref.name,
                                                   bastion=bastion_of is not None)
        host_keys = tuple(spec.host_keys or ())
        if spec.host_key_policy == c.HOST_KEY_TOFU:
            recorded = ((vm.get("status") or {}).get("hostKey") or {}).get("publicKey")
            host_keys = (recorded,) if recorded else host_keys
            if not host_keys and not first_use:
                # Only the health probe may connect to an unknown key: it records it (once,
                # under a resourceVersion precondition) and every later connection checks it.
                raise AttemptFailed(
                    Reason.TRANSPORT_ERROR,
                    f"RemoteVM {vm_name} uses TrustOnFirstUse and its host key is not recorded "
                    "yet: the first health probe records it (status.hostKey); retry after that",
                )
        try:
            become_password = read_become_password(
                self.credentials_dir, lambda: self.kube.read_secret(
                    namespace, spec.credentials_secret_ref.name)) if spec.allow_become else None
        except (OSError, ApiException, PasswordInvalid) as exc:
            raise AttemptFailed(Reason.CREDENTIALS_INVALID,
                                f"cannot read the become-password of RemoteVM {vm_name}: {exc}") from exc
        return SSHTarget(
            allow_become=spec.allow_become and bastion_of is None,
            become_password=become_password,
            trust_on_first_use=spec.host_key_policy == c.HOST_KEY_TOFU and not host_keys,
            jump=self.resolve_bastion(namespace, vm_name, spec, bastion_of),
            host=spec.host,
            port=spec.port,
            user=spec.user,
            private_key=private_key,
            passphrase=passphrase,
            host_keys=host_keys,
            connect_timeout=float(spec.connect_timeout_seconds),
        )

    def resolve_bastion(
        self, namespace: str, vm_name: str, spec: RemoteVMSpec, bastion_of: str | None
    ) -> SSHTarget | None:
        """The bastion's target for ``spec.proxyJump`` (one hop; its own keys verified)."""
        if spec.proxy_jump is None:
            return None
        if bastion_of is not None or spec.proxy_jump.vm == vm_name:
            raise AttemptFailed(
                Reason.INVALID_SPEC,
                f"RemoteVM {vm_name} cannot be reached: proxyJump supports one bastion hop "
                f"(bastion {spec.proxy_jump.vm} must not use proxyJump itself)",
            )
        return self.resolve_target(namespace, spec.proxy_jump.vm, bastion_of=vm_name)

    def credentials(
        self, namespace: str, secret_name: str, bastion: bool = False
    ) -> tuple[str, str | None]:
        """The private key and passphrase: from the mounted Secret, else read through the API.

        A bastion's Secret is mounted beside the VM's own, in ``<dir>-bastion``."""
        if self.credentials_dir is not None:
            directory = (self.credentials_dir.with_name(self.credentials_dir.name + "-bastion")
                         if bastion else self.credentials_dir)
            key_file = directory / c.SECRET_KEY_PRIVATE_KEY
            phrase_file = directory / c.SECRET_KEY_PASSPHRASE
            try:
                key = key_file.read_text()
            except OSError as exc:
                raise AttemptFailed(Reason.CREDENTIALS_INVALID,
                                    f"cannot read the mounted key {key_file}: {exc.strerror}") from exc
            phrase = phrase_file.read_text().strip() if phrase_file.exists() else None
            return key, phrase or None
        try:
            data = self.kube.read_secret(namespace, secret_name)
        except ApiException as exc:
            raise AttemptFailed(
                Reason.CREDENTIALS_INVALID,
                f"cannot read Secret {namespace}/{secret_name}: {exc.reason} ({exc.status})",
            ) from exc
        key = data.get(c.SECRET_KEY_PRIVATE_KEY, "")
        if not key:
            raise AttemptFailed(
                Reason.CREDENTIALS_INVALID,
                f"Secret {namespace}/{secret_name} has no key {c.SECRET_KEY_PRIVATE_KEY!r}",
            )
        return key, (data.get(c.SECRET_KEY_PASSPHRASE) or "").strip() or None


__all__ = ["AttemptFailed", "CommandExecutor", "CredentialsInvalid", "Outcome", "judge"]
