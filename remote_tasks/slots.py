"""``maxConcurrentCommands`` across all replicas of a VM's worker: a semaphore in Redis.

Each running command holds a lease: a member of the sorted set
``vmfleet.<namespace>:slots:<vm>`` (under the namespace's key prefix) scored with its expiry time (Redis server time, so
worker clocks do not matter). Taking a slot first drops expired leases, then adds ours
if fewer than the limit are held — one Lua script, atomic. The holder renews its lease
every few seconds; a worker that dies stops renewing and its slot frees itself after
``LEASE_SECONDS``. A command waits for a slot before it is claimed, so it stays
``Queued`` (not ``Running``) while the VM is at its limit.

Where it lives (:meth:`vmfleet.settings.Settings.slots_redis_url`): ``VMFLEET_SLOTS_URL``
if set, else the Redis of the shared state (``VMFLEET_STATE_URL``, which the controller
sets on its workers when the broker is RabbitMQ), else the Redis broker — the same Redis
``vmfleet.state.state_url`` picks. Only with RabbitMQ and no Redis named at all does the
limit hold per worker replica (each replica runs ``--concurrency maxConcurrentCommands``).
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from vmfleet import settings
from vmfleet.tenancy import key_prefix

log = logging.getLogger("remote_tasks.slots")

SLOTS_URL_ENV = settings.env_of("slots_url")
MAX_CONCURRENT_ENV = settings.env_of("max_concurrent_commands")
LEASE_SECONDS = 30.0
RENEW_SECONDS = 5.0
POLL_SECONDS = 0.2

# KEYS[1] set; ARGV: lease id, limit, lease ms. Returns 1 when the lease is held.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local mine = redis.call('ZSCORE', KEYS[1], ARGV[1])
if mine or redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]) * 2)
  return 1
end
return 0
"""

# Renew only a lease that is still ours (an expired one was dropped: report it).
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local until_ = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not until_ or tonumber(until_) < now then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 2)
return 1
"""


def slots_key(namespace: str, vm: str) -> str:
    return f"{key_prefix(namespace)}slots:{vm}"


class VMSlots:
    """Leases on one Redis; shared by the threads of a worker process."""

    def __init__(self, url: str, lease_seconds: float = LEASE_SECONDS) -> None:
        import redis

        self.client: Any = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=10)
        self.lease_ms = int(lease_seconds * 1000)
        self._acquire = self.client.register_script(_ACQUIRE)
        self._renew = self.client.register_script(_RENEW)
        # The leases held now (lease: key), renewed every RENEW_SECONDS by one thread of
        # the process (started with the first lease): a thread per command cost the
        # worker a thread start (and its stack) per command.
        self._held: dict[str, str] = {}
        self._held_changed = threading.Condition()
        self._renewer: threading.Thread | None = None

    def try_acquire(self, key: str, lease: str, limit: int) -> bool:
        return bool(self._acquire(keys=[key], args=[lease, limit, self.lease_ms]))

    def renew(self, key: str, lease: str) -> bool:
        return bool(self._renew(keys=[key], args=[lease, self.lease_ms]))

    def release(self, key: str, lease: str) -> None:
        self.client.zrem(key, lease)

    def held(self, key: str) -> int:
        """Leases held now (expired ones not counted)."""
        now_s, now_us = self.client.time()
        now_ms = int(now_s) * 1000 + int(now_us) // 1000
        return int(self.client.zcount(key, now_ms, "+inf"))

    @contextmanager
    def slot(self, key: str, limit: int, worker: str = "") -> Iterator[None]:
        """Wait for a slot, hold it (renewed) while the block runs, then free it."""
        lease = f"{worker}:{uuid.uuid4().hex}"
        waited = time.monotonic()
        logged = False
        while not self.try_acquire(key, lease, limit):
            if not logged and time.monotonic() - waited > 1:
                log.info("Waiting for a free slot on %s (maxConcurrentCommands %s)", key, limit)
                logged = True
            time.sleep(POLL_SECONDS * (0.5 + random.random()))
        self._hold(lease, key)
        try:
            yield
        finally:
            with self._held_changed:
                del self._held[lease]
            try:
                self.release(key, lease)
            except Exception as exc:  # noqa: BLE001 - the lease expires by itself
                log.warning("Could not release slot lease on %s: %s", key, exc)

    def _hold(self, lease: str, key: str) -> None:
        with self._held_changed:
            self._held[lease] = key
            if self._renewer is None:
                self._renewer = threading.Thread(target=self._renew_held, daemon=True,
                                                 name="vmfleet-slot-renew")
                self._renewer.start()
            self._held_changed.notify()

    def _renew_held(self) -> None:
        """Every RENEW_SECONDS while a lease is held, renew each one still held; idle (no
        lease) it waits without waking up. A lease is at most RENEW_SECONDS old at its
        first renewal, as with a renewal thread of its own."""
        while True:
            with self._held_changed:
                while not self._held:
                    self._held_changed.wait()
            time.sleep(RENEW_SECONDS)
            with self._held_changed:
                held = list(self._held.items())
            for lease, key in held:
                try:
                    if not self.renew(key, lease) and lease in self._held:
                        log.warning("The slot lease %s on %s expired while held", lease, key)
                except Exception as exc:  # noqa: BLE001 - try again at the next renewal
                    log.warning("Could not renew slot lease on %s: %s", key, exc)


_slots: VMSlots | None = None
_slots_lock = threading.Lock()


def shared_slots(conf: settings.Settings) -> VMSlots | None:
    """The worker process's slots on the Redis its settings name (None: no Redis)."""
    global _slots
    url = conf.slots_redis_url()
    if url is None:
        return None
    with _slots_lock:
        if _slots is None:
            _slots = VMSlots(url)
        return _slots


@contextmanager
def vm_slot(conf: settings.Settings, namespace: str, vm: str, worker: str,
            limit: int | None = None) -> Iterator[None]:
    """Hold one of the VM's ``maxConcurrentCommands`` slots (no-op without a limit or Redis).

    ``limit`` comes with the message (a pool's worker serves VMs with different limits);
    else the worker's ``VMFLEET_MAX_CONCURRENT_COMMANDS`` (``conf``)."""
    limit = limit or conf.max_concurrent_commands
    slots = shared_slots(conf) if limit else None
    if slots is None or not limit:
        yield
        return
    try:
        context = slots.slot(slots_key(namespace, vm), limit, worker)
        context.__enter__()
    except Exception as exc:  # noqa: BLE001 - Redis unreachable: run rather than stall
        log.warning("Could not take a slot for %s/%s (%s): running without the VM-wide limit",
                    namespace, vm, exc)
        yield
        return
    try:
        yield
    except BaseException as exc:
        if not context.__exit__(type(exc), exc, exc.__traceback__):
            raise
    else:
        context.__exit__(None, None, None)


__all__ = ["VMSlots", "shared_slots", "slots_key", "vm_slot"]
