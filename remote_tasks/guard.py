"""The worker's gate: only what the controller signed, for the VMs this worker serves.

Every task body first goes through :class:`Guard`: the message must verify with the
controller's public key, be meant for this task and not have expired
(``vmfleet.api.signing``), and every VM it names, with its Secret, must be one this
worker serves (``vmfleet.api.served``). A refused message is logged without its content
and counted (``vmfleet_messages_refused_total{reason}``).

What a refusal does to the attempt depends on what can be trusted:

- a message that does not verify (or no key to verify it): nothing in it is trusted,
  not even its uid, so nothing is reported; it is dropped (acknowledged);
- a genuine message that has expired: dropped without a report (its content is the
  controller's, but the controller has sent it again, signed anew, if the attempt is
  still unclaimed; a replay after its expiry changes nothing);
- a genuine message naming a VM or Secret this worker does not serve: its attempt ends
  ``Failed``, reason ``MessageRefused`` (claimed first, so it runs nowhere else and is
  not sent again).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from vmfleet import metrics, settings
from vmfleet.api.envelope import Envelope, Target
from vmfleet.api.served import Served
from vmfleet.api.signing import Refusal, Refused, SigningKeyError, Verifier, load_public_key

log = logging.getLogger("remote_tasks.guard")


@dataclass(frozen=True)
class Guard:
    verifier: Verifier
    served: Served = field(default_factory=Served)

    @classmethod
    def from_settings(cls, conf: settings.Settings) -> Guard:
        """From ``VMFLEET_VERIFY_KEY`` (or ``_FILE``) and ``VMFLEET_SERVED_VMS``; a missing or
        bad key is logged and the worker refuses everything."""
        text = conf.verify_key
        try:
            if not text and conf.verify_key_file:
                with open(conf.verify_key_file) as fh:
                    text = fh.read()
            key = load_public_key(text) if text else None
        except (OSError, SigningKeyError) as exc:
            log.error("Cannot load the controller's verify key: %s; this worker runs nothing", exc)
            key = None
        if key is None:
            log.error("No verify key (VMFLEET_VERIFY_KEY or VMFLEET_VERIFY_KEY_FILE): this "
                      "worker refuses every message")
        return cls(Verifier(key), Served.parse(conf.served_vms))

    def open(self, message: object, task: str) -> dict[str, Any]:
        """The verified body of ``message``; raises :class:`Refused` (logged and counted)."""
        try:
            return self.verifier.open(message, task)
        except Refused as refused:
            self.refused(task, refused)
            raise

    def check_envelope(self, task: str, envelope: Envelope) -> None:
        """Every VM the envelope names (and its Secret) is served; raises :class:`Refused`."""
        try:
            if envelope.target is not None and envelope.target.vm != envelope.vm:
                raise Refused(Refusal.NOT_SERVED, "the envelope's target is another VM")
            self.served.check_vm(envelope.namespace, envelope.vm)
            for target in ([envelope.target] if envelope.target else []) + list(envelope.targets.values()):
                self.served.check(envelope.namespace, target)
        except Refused as refused:
            self.refused(task, refused)
            raise

    def check_vm(self, task: str, namespace: str, vm: str) -> None:
        try:
            self.served.check_vm(namespace, vm)
        except Refused as refused:
            self.refused(task, refused)
            raise

    def check_target(self, task: str, namespace: str, target: Target) -> None:
        try:
            self.served.check(namespace, target)
        except Refused as refused:
            self.refused(task, refused)
            raise

    @staticmethod
    def refused(task: str, refused: Refused) -> None:
        metrics.MESSAGES_REFUSED.labels(refused.reason).inc()
        log.warning("Refused a message of task %s: %s (%s)", task, refused.reason, refused.detail)


__all__ = ["Guard"]
