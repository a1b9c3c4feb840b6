"""Run one attempt of a RemoteCommand on one VM and write its result.

Plain code behind the Celery task: it re-checks the RemoteCommand, claims the VM's
result entry, runs the command over the pooled SSH connection and writes the outcome.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from vmfleet.api import constants as c
from vmfleet.api.constants import Phase, Reason
from vmfleet.api.envelope import Envelope, now_rfc3339
from vmfleet.api.models import RemoteCommandSpec, RemoteVMSpec
from vmfleet.kube import ApiException, Kube
from vmfleet import metrics

from . import claims
from .shell import InvalidCommand, build_invocation
from .ssh import ConnectionPool, CredentialsInvalid, ExecResult, SSHError, SSHTarget, run_command

log = logging.getLogger("remote_tasks")
output_log = logging.getLogger("remote_tasks.output")

CREDENTIALS_DIR_ENV = "VMFLEET_CREDENTIALS_DIR"


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
    """Everything one worker process needs to run attempts: the API and the SSH pool."""

    def __init__(self, kube: Kube, pool: ConnectionPool, credentials_dir: Path | None = None) -> None:
        self.kube = kube
        self.pool = pool
        self.credentials_dir = credentials_dir

    @classmethod
    def from_environment(cls) -> CommandExecutor:
        directory = os.environ.get(CREDENTIALS_DIR_ENV)
        return cls(Kube(), ConnectionPool(), Path(directory) if directory else None)

    def execute(self, envelope: Envelope, worker: str) -> str:
        """Run the attempt if this delivery wins the claim. Returns what happened, for logs."""
        obj = self.kube.get_command(envelope.namespace, envelope.name)
        if obj is None or obj["metadata"].get("uid") != envelope.uid:
            log.info("Skipped RemoteCommand %s on %s: it no longer exists", envelope.ref, envelope.vm)
            return "gone"
        index = claims.result_index(obj.get("status"), envelope.vm)
        entry = obj["status"]["results"][index] if index is not None else {}
        if entry.get("phase") != Phase.QUEUED or entry.get("attempt") != envelope.attempt:
            log.info(
                "Skipped RemoteCommand %s on %s attempt %s: already %s",
                envelope.ref, envelope.vm, envelope.attempt, entry.get("phase", "unknown"),
            )
            return "duplicate"
        assert index is not None
        try:
            self.kube.patch_command_status(
                envelope.namespace, envelope.name,
                claims.claim_patch(index, envelope.vm, envelope.attempt, worker, now_rfc3339()),
            )
        except ApiException as exc:
            if exc.status in (409, 422):
                log.info("Skipped RemoteCommand %s on %s: claimed by another delivery",
                         envelope.ref, envelope.vm)
                return "duplicate"
            raise
        log.info("Claimed RemoteCommand %s on %s (attempt %s)", envelope.ref, envelope.vm,
                 envelope.attempt)
        started = metrics.command_claimed(envelope.dispatch_time)
        host: str | None = None
        try:
            spec = RemoteCommandSpec.model_validate(obj["spec"])
            target = self.resolve_target(envelope.namespace, envelope.vm)
            host = target.host
            outcome = self.run(envelope, spec, target)
        except AttemptFailed as failed:
            outcome = Outcome(Phase.FAILED, failed.reason, failed.message)
        except ValidationError as exc:
            outcome = Outcome(Phase.FAILED, Reason.INVALID_SPEC, f"invalid spec: {exc}")
        fields = outcome.fields(now_rfc3339())
        if host is not None:
            fields["host"] = host
        self.kube.patch_command_status(
            envelope.namespace, envelope.name,
            claims.finish_patch(index, envelope.vm, envelope.attempt, worker, fields),
        )
        log.info("Finished RemoteCommand %s on %s: %s (%s)", envelope.ref, envelope.vm,
                 outcome.phase, outcome.reason)
        metrics.command_finished(envelope.namespace, envelope.vm, outcome.phase, outcome.reason,
                                 started)
        return outcome.phase

    def run(self, envelope: Envelope, spec: RemoteCommandSpec, target: SSHTarget) -> Outcome:
        try:
            invocation = build_invocation(spec)
        except InvalidCommand as exc:
            return Outcome(Phase.FAILED, Reason.INVALID_SPEC, str(exc))
        prefix = f"[{envelope.ref} {envelope.vm}"
        try:
            result = run_command(
                self.pool, target, invocation.line, invocation.stdin, spec.output.max_bytes,
                on_stdout=lambda line: output_log.info("%s stdout] %s", prefix, line),
                on_stderr=lambda line: output_log.info("%s stderr] %s", prefix, line),
            )
        except SSHError as exc:
            return Outcome(Phase.FAILED, exc.reason, str(exc))
        return judge(result, spec.success_exit_codes)

    def resolve_target(self, namespace: str, vm_name: str) -> SSHTarget:
        vm = self.kube.get_vm(namespace, vm_name)
        if vm is None:
            raise AttemptFailed(Reason.VM_NOT_FOUND, f"RemoteVM {namespace}/{vm_name} does not exist")
        try:
            spec = RemoteVMSpec.model_validate(vm["spec"])
        except ValidationError as exc:
            raise AttemptFailed(Reason.INVALID_SPEC, f"RemoteVM {vm_name} is invalid: {exc}") from exc
        private_key, passphrase = self.credentials(namespace, spec.credentials_secret_ref.name)
        host_keys = tuple(spec.host_keys or ())
        if spec.host_key_policy == c.HOST_KEY_TOFU:
            recorded = ((vm.get("status") or {}).get("hostKey") or {}).get("publicKey")
            host_keys = (recorded,) if recorded else host_keys
        return SSHTarget(
            host=spec.host,
            port=spec.port,
            user=spec.user,
            private_key=private_key,
            passphrase=passphrase,
            host_keys=host_keys,
            connect_timeout=float(spec.connect_timeout_seconds),
        )

    def credentials(self, namespace: str, secret_name: str) -> tuple[str, str | None]:
        """The private key and passphrase: from the mounted Secret, else read through the API."""
        if self.credentials_dir is not None:
            key_file = self.credentials_dir / c.SECRET_KEY_PRIVATE_KEY
            phrase_file = self.credentials_dir / c.SECRET_KEY_PASSPHRASE
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
