"""What workers and the controller share besides the Celery queues: one Redis.

The controller is the only writer of RemoteCommand status; workers hold no Kubernetes
client. Everything they must tell the controller, and everything that must hold across
a worker, controller or broker restart, lives here:

- **Claims** (exactly once). ``vmfleet:claim:<uid>/<vm>/<attempt>`` is set once
  (``SET NX`` in a Lua script that also checks the cancel key): two deliveries of one
  message can never both run the attempt, a redelivery after a worker crash finds the
  claim taken, and a command deleted before its claim is never started.
- **Heartbeats**: the sorted set ``vmfleet:heartbeats:<scope>`` scores each running attempt
  with the Redis server's time of its last sign of life (set at the claim, renewed by
  the worker, added again if the set was lost). The controller declares an attempt lost
  when its score is stale, or when a running attempt has had no score at all for as
  long (the set was lost and its worker is gone too).
- **Reports**: the stream ``vmfleet:reports:<scope>`` (one per controller). Workers append claims, progress and
  results; the controller reads them in the consumer group ``controller``, folds them
  into status writes, and acknowledges (and deletes) an entry only once the write that
  carries it has landed. Entries a dead controller had read but not acknowledged stay
  pending and are claimed again by the next one (``XAUTOCLAIM``): nothing is lost.
- **Cancels**: ``vmfleet:cancel:<uid>`` (read at the claim and with each heartbeat)
  plus a message on the channel ``vmfleet:cancels``, which every worker process
  listens to, so a deleted command's processes are killed within a second.
- **Live commands**: the set ``vmfleet:live:<scope>`` of command uids with attempts sent. A
  controller that starts cancels the members whose RemoteCommand no longer exists (it
  was deleted while no controller ran).

Redis is the broker by default; with RabbitMQ as the broker, ``VMFLEET_STATE_URL``
names the Redis (it also holds the VMs' ``maxConcurrentCommands`` slots).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from vmfleet import settings

log = logging.getLogger("vmfleet.state")

STATE_URL_ENV = settings.env_of("state_url")
GROUP = "controller"
DEFAULT_SCOPE = "default"
CANCELS = "vmfleet:cancels"
CLAIM_TTL_SECONDS = 7 * 24 * 3600
CANCEL_TTL_SECONDS = 24 * 3600

CLAIMED = "claimed"
TAKEN = "taken"
CANCELLED = "cancelled"

# KEYS: claim, cancel, heartbeats. ARGV: worker, ttl seconds, member.
_CLAIM = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 'cancelled' end
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', tonumber(ARGV[2])) then
  return 'taken'
end
local t = redis.call('TIME')
redis.call('ZADD', KEYS[3], tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), ARGV[3])
return 'claimed'
"""

# KEYS: heartbeats, cancel, claim. ARGV: member. Returns 1 when the command was cancelled.
# Renews the member; one that is missing is added back unless its claim says the attempt
# was released (ended): a Redis that lost the set (restarted without its data, a key
# deleted) learns again at the next beat which attempts are alive, and a beat racing the
# release never brings an ended attempt back.
_BEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('ZSCORE', KEYS[1], ARGV[1]) or redis.call('GET', KEYS[3]) ~= 'released' then
  redis.call('ZADD', KEYS[1], now, ARGV[1])
end
return redis.call('EXISTS', KEYS[2])
"""

_NOW_MS = """
local t = redis.call('TIME')
return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""


def state_url(broker_url: str) -> str:
    """The Redis of the shared state: ``VMFLEET_STATE_URL``, else a Redis broker's URL."""
    conf = settings.current()
    explicit = conf.state_url or conf.slots_url
    if explicit:
        return explicit
    if broker_url.startswith(("redis://", "rediss://", "unix://")):
        return broker_url
    raise ValueError(
        f"the broker {broker_url.split('@')[-1]!r} is not Redis: set {STATE_URL_ENV} to a Redis "
        "URL (claims, heartbeats, reports and cancels live in Redis)"
    )


def reports_key(scope: str) -> str:
    return f"vmfleet:reports:{scope}"


def heartbeats_key(scope: str) -> str:
    return f"vmfleet:heartbeats:{scope}"


def live_key(scope: str) -> str:
    return f"vmfleet:live:{scope}"


def attempt_member(uid: str, vm: str, attempt: int) -> str:
    return f"{uid}/{vm}/{attempt}"


def claim_key(uid: str, vm: str, attempt: int) -> str:
    return f"vmfleet:claim:{attempt_member(uid, vm, attempt)}"


def cancel_key(uid: str) -> str:
    return f"vmfleet:cancel:{uid}"


@dataclass(frozen=True)
class Report:
    """One entry of the reports stream, as the controller reads it."""

    id: str
    body: dict[str, Any]


class State:
    """A Redis client with the scripts above; thread-safe (redis-py pools connections).

    ``scope`` is the controller's: several controllers (releases watching different
    namespaces) can share one Redis, each with its own reports stream, heartbeats and
    live set. A worker writes into the scope its message names (``Envelope.scope``)."""

    def __init__(self, url: str, scope: str = DEFAULT_SCOPE) -> None:
        import redis

        self.url = url
        self.scope = scope
        self.client: Any = redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=10,
                                                health_check_interval=30)
        self._claim = self.client.register_script(_CLAIM)
        self._beat = self.client.register_script(_BEAT)
        self._now = self.client.register_script(_NOW_MS)

    # ------------------------------------------------------------------ workers

    def claim(self, uid: str, vm: str, attempt: int, worker: str,
              scope: str = DEFAULT_SCOPE) -> str:
        """``claimed`` (ours now), ``taken`` (by any delivery before, even one of this
        worker's: a redelivery after a crash never runs the attempt again) or ``cancelled``."""
        member = attempt_member(uid, vm, attempt)
        result = self._claim(keys=[claim_key(uid, vm, attempt), cancel_key(uid), heartbeats_key(scope)],
                             args=[worker, CLAIM_TTL_SECONDS, member])
        return result.decode() if isinstance(result, bytes) else str(result)

    def heartbeat(self, uid: str, vm: str, attempt: int, scope: str = DEFAULT_SCOPE) -> bool:
        """Renew the attempt's heartbeat; True when its command was cancelled."""
        return bool(self._beat(keys=[heartbeats_key(scope), cancel_key(uid),
                                     claim_key(uid, vm, attempt)],
                               args=[attempt_member(uid, vm, attempt)]))

    def release(self, uid: str, vm: str, attempt: int, scope: str = DEFAULT_SCOPE) -> None:
        """The attempt ended (its result is reported): no more heartbeats expected. The
        claim stays (a redelivery still finds it taken) and says ``released``."""
        pipe = self.client.pipeline(transaction=False)
        pipe.zrem(heartbeats_key(scope), attempt_member(uid, vm, attempt))
        pipe.set(claim_key(uid, vm, attempt), "released", xx=True, keepttl=True)
        pipe.execute()

    def report(self, body: dict[str, Any], scope: str = DEFAULT_SCOPE) -> str:
        """Append a report for the controller of ``scope``; returns its stream id."""
        entry_id = self.client.xadd(reports_key(scope), {"r": json.dumps(body, separators=(",", ":"))})
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)

    def cancelled(self, uid: str) -> bool:
        return bool(self.client.exists(cancel_key(uid)))

    def listen_cancels(self, on_cancel: Callable[[str], None],
                       stop: threading.Event) -> threading.Thread:
        """Call ``on_cancel(uid)`` for every cancel published, in a daemon thread that
        reconnects after errors (the heartbeat's cancel check covers the gap)."""

        def run() -> None:
            while not stop.is_set():
                pubsub = self.client.pubsub(ignore_subscribe_messages=True)
                try:
                    pubsub.subscribe(CANCELS)
                    while not stop.is_set():
                        message = pubsub.get_message(timeout=1.0)
                        if message and message.get("type") == "message":
                            data = message["data"]
                            on_cancel(data.decode() if isinstance(data, bytes) else str(data))
                except Exception as exc:  # noqa: BLE001 - Redis restarted: listen again
                    log.warning("Listening for cancels failed (%s); listening again in 1s", exc)
                    stop.wait(1.0)
                finally:
                    try:
                        pubsub.close()
                    except Exception:  # noqa: BLE001
                        pass

        thread = threading.Thread(target=run, name="vmfleet-cancels", daemon=True)
        thread.start()
        return thread

    # ------------------------------------------------------------------ controller

    def now_ms(self) -> int:
        return int(self._now())

    def sent(self, uid: str) -> None:
        """An attempt of this command was sent: it is live until ``finished``."""
        self.client.sadd(live_key(self.scope), uid)

    def finished(self, uid: str) -> None:
        self.client.srem(live_key(self.scope), uid)

    def live(self) -> set[str]:
        return {m.decode() if isinstance(m, bytes) else str(m) for m in self.client.smembers(live_key(self.scope))}

    def cancel(self, uid: str) -> None:
        """The command is gone: its unclaimed attempts never start, running ones are killed."""
        pipe = self.client.pipeline(transaction=False)
        pipe.set(cancel_key(uid), "1", ex=CANCEL_TTL_SECONDS)
        pipe.publish(CANCELS, uid)
        pipe.srem(live_key(self.scope), uid)
        pipe.execute()

    def stale_heartbeats(self, older_than_seconds: float) -> set[str]:
        """Members (``uid/vm/attempt``) whose last heartbeat is older than that."""
        cutoff = self.now_ms() - int(older_than_seconds * 1000)
        return {m.decode() if isinstance(m, bytes) else str(m)
                for m in self.client.zrangebyscore(heartbeats_key(self.scope), "-inf", cutoff)}

    def absent_heartbeats(self, members: list[str]) -> set[str]:
        """Members that have no heartbeat at all (released, or Redis lost the set)."""
        if not members:
            return set()
        pipe = self.client.pipeline(transaction=False)
        for member in members:
            pipe.zscore(heartbeats_key(self.scope), member)
        return {m for m, score in zip(members, pipe.execute(), strict=True) if score is None}

    def forget_heartbeat(self, member: str) -> None:
        self.client.zrem(heartbeats_key(self.scope), member)

    def ensure_group(self) -> None:
        import redis

        try:
            self.client.xgroup_create(reports_key(self.scope), GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def pending_reports(self, consumer: str, count: int = 1000) -> Iterator[Report]:
        """Reports read but never acknowledged by any controller (one that died), now ours."""
        start = "0-0"
        while True:
            reply = self.client.xautoclaim(reports_key(self.scope), GROUP, consumer, min_idle_time=0,
                                           start_id=start, count=count)
            start, entries = reply[0], reply[1]
            yield from _reports(entries)
            if start in (b"0-0", "0-0") or not entries:
                return

    def read_reports(self, consumer: str, block_ms: int, count: int = 1000) -> list[Report]:
        reply = self.client.xreadgroup(GROUP, consumer, {reports_key(self.scope): ">"}, count=count,
                                       block=block_ms)
        reports: list[Report] = []
        for _stream, entries in reply or []:
            reports.extend(_reports(entries))
        return reports

    def ack(self, ids: list[str]) -> None:
        """The reports' writes landed: acknowledge and drop them."""
        if not ids:
            return
        pipe = self.client.pipeline(transaction=False)
        pipe.xack(reports_key(self.scope), GROUP, *ids)
        pipe.xdel(reports_key(self.scope), *ids)
        pipe.execute()


def _reports(entries: Any) -> Iterator[Report]:
    for entry_id, fields in entries or []:
        if fields is None:  # deleted meanwhile
            continue
        ident = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        raw = fields.get(b"r") or fields.get("r")
        try:
            body = json.loads(raw)
        except (TypeError, ValueError):
            log.warning("Dropped report %s: not JSON", ident)
            body = {}
        yield Report(ident, body)


def wait_for_redis(state: State, timeout: float = 60.0) -> None:
    """Block until Redis answers (a worker or controller starting before its Redis)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            state.client.ping()
            return
        except Exception as exc:  # noqa: BLE001
            if time.monotonic() > deadline:
                raise RuntimeError(f"Redis at {state.url.split('@')[-1]} did not answer: {exc}") from exc
            time.sleep(0.5)


__all__ = ["CANCELLED", "CLAIMED", "TAKEN", "Report", "State", "attempt_member", "state_url"]
