"""Each namespace's broker credentials: what a namespace's workers connect with.

Two ways, one per worker runtime:

- ``Process`` runtime (one machine, ``vmfleet dev up``, the tests), ``VMFLEET_BROKER_USERS``
  ``Derived`` (the default): the controller creates a Redis ACL user per namespace
  (``ACL SETUSER vmfleet-ns-<ns>``, reaching only ``vmfleet.<ns>:*``) with a password
  derived from its own (``vmfleet.tenancy.derive_password``), saves them in the Redis' ACL
  file (``ACL SAVE``: a restarted Redis knows them at once), and hands the worker
  processes of that namespace, and only them, URLs with those credentials. The users are
  applied again every few seconds, so a Redis that restarted without them has them back.
  ``Shared``: workers get the controller's own URLs (a Redis without ACLs; no fence).
- ``Deployment`` runtime (the chart): the chart generates one Secret per watched namespace
  (``VMFLEET_BROKER_SECRET_NAME``) holding that namespace's URLs, and the Redis ACL file
  from the same passwords; worker pods reference the Secret (``secretKeyRef``), and the
  controller needs no ACL rights.

Either way the namespace's reports stream is read from then on (``State.serve``).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from vmfleet import tenancy
from vmfleet.state import State

log = logging.getLogger("controller.tenants")

DERIVED = "Derived"
SHARED = "Shared"
REFRESH_SECONDS = 5.0


@dataclass(frozen=True)
class WorkerURLs:
    """A namespace's worker connection strings: the broker, and the state Redis when it is
    not the broker."""

    broker: str
    state: str | None
    output: str | None = None  # the output store, when one is set


class BrokerTenants:
    def __init__(self, state: State, broker_url: str, state_url: str | None,
                 mode: str = DERIVED, output_url: str | None = None,
                 output_client: Any = None) -> None:
        self.state = state
        self.broker_url = broker_url
        self.state_url = state_url
        self.mode = mode
        # The output store (a Redis of its own): the same users, derived from its password.
        self.output_url = output_url
        self.output_client = output_client
        self._output_secret: str | None = None
        self._lock = threading.Lock()
        self._applied: dict[str, float] = {}  # namespace -> when its user was last applied
        self._save_failed = False
        if mode == DERIVED:
            _user, password = tenancy.url_credentials(state.url)
            if not password:
                raise ValueError(
                    f"VMFLEET_BROKER_USERS={DERIVED} needs a Redis URL with a user and password "
                    f"that may run ACL SETUSER (got {tenancy.redacted(state.url)}); set "
                    f"VMFLEET_BROKER_USERS={SHARED} for a Redis without ACLs")
            self._secret = password
            if output_url:
                _user, self._output_secret = tenancy.url_credentials(output_url)
                if not self._output_secret:
                    raise ValueError(
                        f"VMFLEET_BROKER_USERS={DERIVED} needs an output store URL with a user "
                        "and password that may run ACL SETUSER (got "
                        f"{tenancy.redacted(output_url)})")
        elif mode != SHARED:
            raise ValueError(f"VMFLEET_BROKER_USERS={mode!r} is not one of {DERIVED}, {SHARED}")

    def ensure(self, namespace: str) -> WorkerURLs:
        """The namespace's URLs, its ACL user created first (Derived)."""
        self.state.serve(namespace)
        if self.mode == SHARED:
            return WorkerURLs(self.broker_url, self.state_url, self.output_url)
        with self._lock:
            known = namespace in self._applied
        if not known:
            self._apply([namespace])
        password = tenancy.derive_password(self._secret, namespace)
        user = tenancy.namespace_user(namespace)
        broker = (tenancy.with_credentials(self.broker_url, user, password)
                  if tenancy.is_redis(self.broker_url) else self.broker_url)
        state = tenancy.with_credentials(self.state_url, user, password) if self.state_url else None
        output = None
        if self.output_url and self._output_secret:
            output = tenancy.with_credentials(
                self.output_url, user, tenancy.derive_password(self._output_secret, namespace))
        return WorkerURLs(broker, state, output)

    def refresh(self, every: float = REFRESH_SECONDS) -> None:
        """Apply the namespaces' users again (a Redis restarted without them), at most
        every ``every`` seconds: a loop tick."""
        if self.mode != DERIVED:
            return
        now = time.monotonic()
        with self._lock:
            due = [ns for ns, at in self._applied.items() if now - at >= every]
        if due:
            self._apply(due)

    def _apply(self, namespaces: list[str]) -> None:
        pipe: Any = self.state.client.pipeline(transaction=False)
        for namespace in namespaces:
            pipe.execute_command("ACL", "SETUSER", *acl_setuser_args(self._secret, namespace))
        try:
            pipe.execute()
            if self.output_client is not None and self._output_secret:
                out: Any = self.output_client.pipeline(transaction=False)
                for namespace in namespaces:
                    out.execute_command("ACL", "SETUSER",
                                        *acl_setuser_args(self._output_secret, namespace))
                out.execute()
        except Exception as exc:  # noqa: BLE001 - Redis away: the next refresh applies them
            log.warning("Could not create the broker users of %s: %s", ", ".join(namespaces), exc)
            with self._lock:
                for namespace in namespaces:
                    self._applied.setdefault(namespace, float("-inf"))
            return
        self._save()
        now = time.monotonic()
        with self._lock:
            for namespace in namespaces:
                if self._applied.get(namespace, float("-inf")) == float("-inf"):
                    log.info("Created broker user %s for namespace %s",
                             tenancy.namespace_user(namespace), namespace)
                self._applied[namespace] = now


    def _save(self) -> None:
        """``ACL SAVE``: a Redis with an ACL file keeps the users across a restart (without
        one, the next refresh creates them again: workers reconnect meanwhile)."""
        try:
            self.state.client.execute_command("ACL", "SAVE")
        except Exception as exc:  # noqa: BLE001 - no ACL file, or not allowed: refresh covers it
            if not self._save_failed:
                log.info("Could not save the broker users in Redis' ACL file (%s); they are "
                         "created again after a Redis restart", exc)
            self._save_failed = True


def acl_setuser_args(secret: str, namespace: str) -> list[str]:
    """``ACL SETUSER`` arguments of the namespace's user (reset first: exactly these rules)."""
    password = tenancy.derive_password(secret, namespace)
    return [tenancy.namespace_user(namespace), "reset", "on", tenancy.password_hash(password),
            *tenancy.namespace_rules(namespace)]


__all__ = ["DERIVED", "SHARED", "BrokerTenants", "WorkerURLs", "acl_setuser_args"]
