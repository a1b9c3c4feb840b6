"""Leader election on a ``coordination.k8s.io`` Lease, as controller-runtime's
``--leader-elect`` (client-go's ``leaderelection``) does it.

Several controller replicas may run; one holds the Lease and only it dispatches and
writes (the DESIGN's one writer). The others are warm standbys: kopf's watches keep
their caches filled, they stay Ready, and they read no report (the reports stay
pending in Redis until a leader reads and acknowledges them).

The timings are controller-runtime's defaults: a Lease lasts 15 s, the leader renews
it every 2 s (the retry period) and gives up leading when no renewal landed within
10 s (the renew deadline) of the last one it sent. A candidate counts a Lease as
expired only a whole lease duration after it last *saw the Lease change*, on its own
monotonic clock (never the holder's timestamps), so clocks that disagree cannot make
two leaders: the leader's last renewal was sent before the candidate saw it, and
``renew deadline < lease duration`` keeps the leader's writing window inside the
time the candidate waits. A leader that stops gracefully releases the Lease (empty
holder, duration 1 s): the standby takes over at its next retry.

:class:`Elector` holds the logic with an injectable clock and Lease store (unit tests
run it against a fake one); :class:`KubeLeaseStore` is the API seam.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, cast

log = logging.getLogger("controller.leader")


@dataclass(frozen=True)
class Timing:
    """controller-runtime's defaults; ``renew_deadline < lease_duration`` is required."""

    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.retry_period < self.renew_deadline < self.lease_duration:
            raise ValueError(
                "leader election needs retry period < renew deadline < lease duration (got "
                f"{self.retry_period:g} s, {self.renew_deadline:g} s, {self.lease_duration:g} s)")


class Conflict(Exception):
    """The Lease changed (or was created) since it was read."""


class LeaseStore(Protocol):
    """The Lease as a dict (``metadata.resourceVersion`` and ``spec``), read and written
    with optimistic concurrency."""

    def get(self) -> dict[str, Any] | None: ...

    def create(self, spec: dict[str, Any]) -> dict[str, Any]: ...

    def update(self, resource_version: str, spec: dict[str, Any]) -> dict[str, Any]: ...


def micro_time(at: datetime | None = None) -> str:
    """A ``MicroTime`` (RFC 3339 with microseconds, always present)."""
    return (at or datetime.now(UTC)).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Elector:
    """One candidate. ``run`` acquires, then renews until it cannot or ``stop`` is set;
    ``leading()`` is the gate every writer checks."""

    def __init__(self, store: LeaseStore, identity: str, timing: Timing = Timing(), *,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], str] = micro_time, name: str = "lease") -> None:
        self.store = store
        self.identity = identity
        self.timing = timing
        self.clock = clock
        self.wall = wall
        self.name = name
        self._lock = threading.Lock()
        self._renewed_at: float | None = None  # when the last renewal that landed was sent
        self._done = False  # lost or released: never leads again (the process restarts)
        self._observed_version: str | None = None
        self._observed_at = 0.0
        self._record: dict[str, Any] = {}
        self.acquired_at: float | None = None

    # ------------------------------------------------------------------ the gate

    def leading(self) -> bool:
        """True while a renewal sent less than the renew deadline ago has landed."""
        with self._lock:
            return (not self._done and self._renewed_at is not None
                    and self.clock() < self._renewed_at + self.timing.renew_deadline)

    # ------------------------------------------------------------------ one round

    def try_acquire_or_renew(self) -> bool:
        """Read the Lease; take it when free or expired, renew it when ours. True when
        this round made (or kept) us the holder."""
        if self._done:
            return False
        sent = self.clock()
        try:
            lease = self.store.get()
            if lease is None:
                written = self.store.create(self._spec({}, taking=True))
            else:
                spec = self._observe(lease, sent)
                holder = spec.get("holderIdentity") or ""
                duration = float(spec.get("leaseDurationSeconds") or self.timing.lease_duration)
                if holder and holder != self.identity and sent < self._observed_at + duration:
                    return False  # held by another, not expired
                version = str((lease.get("metadata") or {}).get("resourceVersion") or "")
                written = self.store.update(version, self._spec(spec, taking=holder != self.identity))
        except Conflict:
            return False
        except Exception as exc:  # noqa: BLE001 - the API server is away: the next round
            log.warning("Could not read or write Lease %s: %s", self.name, exc)
            return False
        with self._lock:
            if self._done:
                return False
            self._observe(written, self.clock())
            self._renewed_at = sent
        return True

    def _observe(self, lease: dict[str, Any], now: float) -> dict[str, Any]:
        version = (lease.get("metadata") or {}).get("resourceVersion")
        spec = cast(dict[str, Any], lease.get("spec") or {})
        if version != self._observed_version:
            self._observed_version = version
            self._observed_at = now
            self._record = spec
        return spec

    def _spec(self, previous: dict[str, Any], *, taking: bool) -> dict[str, Any]:
        now = self.wall()
        transitions = int(previous.get("leaseTransitions") or 0)
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": round(self.timing.lease_duration),
            "acquireTime": now if taking else previous.get("acquireTime") or now,
            "renewTime": now,
            "leaseTransitions": transitions + 1 if taking and previous else transitions,
        }

    # ------------------------------------------------------------------ the thread

    def run(self, stop: threading.Event, on_started: Callable[[], None],
            on_stopped: Callable[[], None]) -> None:
        """Acquire (every retry period, with jitter), call ``on_started``, renew; when a
        renewal cannot land before the renew deadline, stop leading for good and call
        ``on_stopped``. Returns when ``stop`` is set (then the caller may ``release``)."""
        while not stop.is_set():
            if self.try_acquire_or_renew():
                break
            stop.wait(self.timing.retry_period * (1 + 0.2 * random.random()))
        else:
            return
        self.acquired_at = self.clock()
        log.info("Became the leader (Lease %s, holder %s)", self.name, self.identity)
        try:
            on_started()
        except Exception:
            log.exception("Could not start leading; giving the Lease up")
            self.release()
            on_stopped()
            return
        while not stop.wait(self.timing.retry_period):
            if self.try_acquire_or_renew():
                continue
            if not self.leading():
                with self._lock:
                    self._done = True
                log.error("Lost the Lease %s: no renewal landed within %g s; stopped writing",
                          self.name, self.timing.renew_deadline)
                on_stopped()
                return

    def release(self) -> bool:
        """Hand the Lease back (a graceful stop): the gate closes first, then the holder is
        emptied so a standby takes over at once. False when we did not hold it."""
        with self._lock:
            was_leading = (not self._done and self._renewed_at is not None
                           and self.clock() < self._renewed_at + self.timing.renew_deadline)
            self._done = True
        if not was_leading:
            return False
        try:
            lease = self.store.get()
            if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                return False
            spec = dict(lease.get("spec") or {})
            spec.update({"holderIdentity": "", "leaseDurationSeconds": 1, "renewTime": self.wall()})
            self.store.update(str(lease["metadata"]["resourceVersion"]), spec)
        except Exception as exc:  # noqa: BLE001 - it expires on its own
            log.warning("Could not release Lease %s (it expires in %g s): %s", self.name,
                        self.timing.lease_duration, exc)
            return False
        log.info("Released the Lease %s", self.name)
        return True


class Leadership:
    """The controller's view of leading: always leading without an elector (leader
    election off, one controller), else the elector's gate, its thread and its end."""

    def __init__(self, elector: Elector | None = None) -> None:
        self.elector = elector
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def leading(self) -> bool:
        return self.elector is None or self.elector.leading()

    def start(self, on_started: Callable[[], None], on_lost: Callable[[], None]) -> None:
        """Lead now (no elector), or campaign in a thread and call ``on_started`` when the
        Lease is ours and ``on_lost`` if it is lost."""
        if self.elector is None:
            on_started()
            return
        elector = self.elector
        self._thread = threading.Thread(
            target=elector.run, args=(self._stop, on_started, on_lost),
            name="vmfleet-leader", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop campaigning and renewing (the gate stays open until ``release``)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    def release(self) -> None:
        if self.elector is not None:
            self.elector.release()


class KubeLeaseStore:
    """A Lease of the API server, read and written as plain JSON (the client's models
    would format a ``MicroTime`` without microseconds now and then)."""

    def __init__(self, api_client: Any, namespace: str, name: str, timeout: float = 5.0) -> None:
        from kubernetes.client import CoordinationV1Api

        self.api: Any = CoordinationV1Api(api_client)  # raw JSON in and out
        self.namespace = namespace
        self.name = name
        self.timeout = timeout

    def get(self) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            response = self.api.read_namespaced_lease(self.name, self.namespace,
                                                      _preload_content=False,
                                                      _request_timeout=self.timeout)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return cast(dict[str, Any], json.loads(response.data))

    def create(self, spec: dict[str, Any]) -> dict[str, Any]:
        body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace}, "spec": spec}
        return self._write(lambda: self.api.create_namespaced_lease(
            self.namespace, body, _preload_content=False, _request_timeout=self.timeout))

    def update(self, resource_version: str, spec: dict[str, Any]) -> dict[str, Any]:
        body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace,
                             "resourceVersion": resource_version}, "spec": spec}
        return self._write(lambda: self.api.replace_namespaced_lease(
            self.name, self.namespace, body, _preload_content=False,
            _request_timeout=self.timeout))

    @staticmethod
    def _write(call: Callable[[], Any]) -> dict[str, Any]:
        from kubernetes.client.exceptions import ApiException

        try:
            response = call()
        except ApiException as exc:
            if exc.status == 409:
                raise Conflict(str(exc.reason)) from exc
            raise
        return cast(dict[str, Any], json.loads(response.data))


__all__ = [
    "Conflict",
    "Elector",
    "KubeLeaseStore",
    "Leadership",
    "LeaseStore",
    "Timing",
    "micro_time",
]
