"""What workers and the controller share besides the Celery queues: one Redis.

The controller is the only writer of RemoteCommand status; workers hold no Kubernetes
client. Everything they must tell the controller, and everything that must hold across
a worker, controller or broker restart, lives here. Every key a worker touches is under
its namespace's prefix ``vmfleet.<ns>:`` (``vmfleet.tenancy``), which is all its Redis
ACL user reaches:

- **Claims** (exactly once). ``vmfleet.<ns>:claim:<uid>/<vm>/<attempt>`` is set once
  (``SET NX`` in a Lua script that also checks the cancel key): two deliveries of one
  message can never both run the attempt, a redelivery after a worker crash finds the
  claim taken, and a command deleted before its claim is never started. The claim holds
  the delivery's own token, so the same delivery claiming again (its first try's reply
  was lost to a Redis restart) is told ``claimed`` again.
- **A Redis restarting** (the broker pod deleted, a rolling update): a worker's claim,
  reports and release are retried for ``WRITE_RETRY_SECONDS`` while Redis refuses
  connections or loads its append-only file, so an attempt that ends during the restart
  still reports its result (heartbeats are not retried: the next one lands).
- **Heartbeats**: the sorted set ``vmfleet.<ns>:heartbeats:<scope>`` scores each running
  attempt with the Redis server's time of its last sign of life (set at the claim,
  renewed by the worker, added again if the set was lost). The controller declares an
  attempt lost when its score is stale, or when a running attempt has had no score at
  all for as long (the set was lost and its worker is gone too).
- **Reports**: the stream ``vmfleet.<ns>:reports:<scope>`` (one per namespace and
  controller). Workers append claims, progress and results; the controller reads the
  streams of every namespace it serves with one ``XREADGROUP`` in the consumer group
  ``controller``, folds them into status writes, and acknowledges (and deletes) an entry
  only once the write that carries it has landed. Entries a dead controller had read but
  not acknowledged stay pending and are claimed again by the next one (``XAUTOCLAIM``):
  nothing is lost. A report whose body names another namespace than its stream's is
  dropped: a namespace's credentials write only that namespace's reports.
- **Cancels**: ``vmfleet.<ns>:cancel:<uid>`` (read at the claim and with each heartbeat)
  plus a message on the namespace's channel ``vmfleet.<ns>:cancels``, which its worker
  processes listen to, so a deleted command's processes are killed within a second.
- **Live commands** (the controller's own, no worker reaches it): the set
  ``vmfleet:live:<scope>`` of ``<namespace>/<uid>`` of commands with attempts sent. A
  controller that starts cancels the members whose RemoteCommand no longer exists (it
  was deleted while no controller ran).

Redis is the broker by default; with RabbitMQ as the broker, ``VMFLEET_STATE_URL``
names the Redis. The rule is :meth:`vmfleet.settings.Settings.state_redis_url`; the VMs'
``maxConcurrentCommands`` slots live in the same Redis unless ``VMFLEET_SLOTS_URL`` names
another (:meth:`~vmfleet.settings.Settings.slots_redis_url`).
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
from vmfleet.tenancy import key_prefix

log = logging.getLogger("vmfleet.state")

STATE_URL_ENV = settings.env_of("state_url")
GROUP = "controller"
DEFAULT_SCOPE = "default"
CLAIM_TTL_SECONDS = 7 * 24 * 3600
#: How long a worker's claim, report or release is retried while Redis is away (a
#: restart takes seconds; past this the write fails and the attempt ends lost).
WRITE_RETRY_SECONDS = 60.0
CANCEL_TTL_SECONDS = 24 * 3600

CLAIMED = "claimed"
TAKEN = "taken"
CANCELLED = "cancelled"

# KEYS: claim, cancel, heartbeats. ARGV: holder (worker and delivery token), ttl seconds,
# member, '1' when the holder names a delivery (then the same holder claiming again wins).
_CLAIM = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 'cancelled' end
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', tonumber(ARGV[2])) then
  if ARGV[4] ~= '1' or redis.call('GET', KEYS[1]) ~= ARGV[1] then return 'taken' end
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


def state_url(conf: settings.Settings) -> str:
    """The Redis of the shared state (:meth:`~vmfleet.settings.Settings.state_redis_url`);
    raises ValueError, saying what to set, when there is none."""
    url = conf.state_redis_url()
    if url is None:
        raise ValueError(
            f"the broker {conf.broker_url.split('@')[-1]!r} is not Redis: set {STATE_URL_ENV} to "
            "a Redis URL (claims, heartbeats, reports and cancels live in Redis)")
    return url


def reports_key(namespace: str, scope: str) -> str:
    return f"{key_prefix(namespace)}reports:{scope}"


def heartbeats_key(namespace: str, scope: str) -> str:
    return f"{key_prefix(namespace)}heartbeats:{scope}"


def live_key(scope: str) -> str:
    """The controller's own set (``vmfleet:``, outside every namespace's prefix)."""
    return f"vmfleet:live:{scope}"


def attempt_member(uid: str, vm: str, attempt: int) -> str:
    return f"{uid}/{vm}/{attempt}"


def claim_key(namespace: str, uid: str, vm: str, attempt: int) -> str:
    return f"{key_prefix(namespace)}claim:{attempt_member(uid, vm, attempt)}"


def cancel_key(namespace: str, uid: str) -> str:
    return f"{key_prefix(namespace)}cancel:{uid}"


def cancels_channel(namespace: str) -> str:
    return f"{key_prefix(namespace)}cancels"


#: Every namespace's cancel channel (for a worker that serves several: the legacy shared
#: transfer worker, whose user reaches every namespace).
ALL_CANCELS = "vmfleet.*:cancels"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class Report:
    """One entry of a reports stream, as the controller reads it. ``id`` is
    ``<namespace>/<stream id>``: what :meth:`State.ack` takes."""

    id: str
    body: dict[str, Any]


class State:
    """A Redis client with the scripts above; thread-safe (redis-py pools connections).

    ``scope`` is the controller's: several controllers (releases watching different
    namespaces) can share one Redis, each with its own reports streams, heartbeats and
    live set. A worker writes into the scope its message names (``Envelope.scope``).
    The controller reads the streams of the namespaces it serves (:meth:`serve`)."""

    def __init__(self, url: str, scope: str = DEFAULT_SCOPE) -> None:
        import redis

        self.url = url
        self.scope = scope
        self.client: Any = redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=10,
                                                health_check_interval=30)
        self._claim = self.client.register_script(_CLAIM)
        self._beat = self.client.register_script(_BEAT)
        self._now = self.client.register_script(_NOW_MS)
        self._lock = threading.Lock()
        self._served: dict[str, bool] = {}  # namespace -> its stream's group exists
        self.write_retry_seconds = WRITE_RETRY_SECONDS

    # ------------------------------------------------------------------ workers

    def claim(self, uid: str, vm: str, attempt: int, worker: str,
              scope: str = DEFAULT_SCOPE, *, namespace: str, delivery: str = "") -> str:
        """``claimed`` (ours now), ``taken`` (by any delivery before, even one of this
        worker's: a redelivery after a crash never runs the attempt again) or ``cancelled``.
        ``delivery``: this delivery's token; the same delivery claiming again (retried
        across a Redis restart) is ``claimed`` again."""
        member = attempt_member(uid, vm, attempt)
        holder = f"{worker} {delivery}" if delivery else worker
        result = self._retrying("claim", lambda: self._claim(
            keys=[claim_key(namespace, uid, vm, attempt), cancel_key(namespace, uid),
                  heartbeats_key(namespace, scope)],
            args=[holder, CLAIM_TTL_SECONDS, member, "1" if delivery else "0"]))
        return _text(result)

    def heartbeat(self, uid: str, vm: str, attempt: int, scope: str = DEFAULT_SCOPE, *,
                  namespace: str) -> bool:
        """Renew the attempt's heartbeat; True when its command was cancelled."""
        return bool(self._beat(keys=[heartbeats_key(namespace, scope), cancel_key(namespace, uid),
                                     claim_key(namespace, uid, vm, attempt)],
                               args=[attempt_member(uid, vm, attempt)]))

    def release(self, uid: str, vm: str, attempt: int, scope: str = DEFAULT_SCOPE, *,
                namespace: str) -> None:
        """The attempt ended (its result is reported): no more heartbeats expected. The
        claim stays (a redelivery still finds it taken) and says ``released``."""
        def release() -> None:
            pipe = self.client.pipeline(transaction=False)
            pipe.zrem(heartbeats_key(namespace, scope), attempt_member(uid, vm, attempt))
            pipe.set(claim_key(namespace, uid, vm, attempt), "released", xx=True, keepttl=True)
            pipe.execute()
        self._retrying("release", release)

    def report(self, body: dict[str, Any], scope: str = DEFAULT_SCOPE,
               namespace: str | None = None) -> str:
        """Append a report for the controller of ``scope``, to the stream of the report's
        namespace (``body["namespace"]`` unless given); returns its stream id."""
        stream = reports_key(namespace or str(body.get("namespace") or ""), scope)
        fields = {"r": json.dumps(body, separators=(",", ":"))}
        # Retried, a report may land twice (its first reply lost): the controller applies
        # a report it already applied as stale.
        return _text(self._retrying("report", lambda: self.client.xadd(stream, fields)))

    def _retrying(self, what: str, call: Callable[[], Any]) -> Any:
        """``call()``, again while Redis is away (refusing connections, restarting,
        loading its append-only file), for up to ``write_retry_seconds``."""
        import redis

        deadline = time.monotonic() + self.write_retry_seconds
        delay = 0.2
        while True:
            try:
                return call()
            except (redis.ConnectionError, redis.TimeoutError) as exc:  # BusyLoadingError too
                if isinstance(exc, redis.AuthenticationError) or time.monotonic() + delay > deadline:
                    raise
                log.warning("Redis %s failed (%s); retrying in %.1fs", what, exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def cancelled(self, uid: str, *, namespace: str) -> bool:
        return bool(self.client.exists(cancel_key(namespace, uid)))

    def listen_cancels(self, on_cancel: Callable[[str], None], stop: threading.Event,
                       namespace: str | None = None) -> threading.Thread:
        """Call ``on_cancel(uid)`` for every cancel published in ``namespace`` (None: in
        every namespace, for a user that reaches them all), in a daemon thread that
        reconnects after errors (the heartbeat's cancel check covers the gap)."""

        def run() -> None:
            while not stop.is_set():
                pubsub = self.client.pubsub(ignore_subscribe_messages=True)
                try:
                    if namespace:
                        pubsub.subscribe(cancels_channel(namespace))
                    else:
                        pubsub.psubscribe(ALL_CANCELS)
                    while not stop.is_set():
                        # Blocks until a cancel comes (5 s at most: an idle worker's
                        # thread wakes rarely; `stop` is only read between waits).
                        message = pubsub.get_message(timeout=5.0)
                        if message and message.get("type") in ("message", "pmessage"):
                            on_cancel(_text(message["data"]))
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

    def serve(self, namespace: str) -> None:
        """Read this namespace's reports stream from now on (its group is created at the
        next read)."""
        key_prefix(namespace)  # a namespace name, or ValueError
        with self._lock:
            self._served.setdefault(namespace, False)

    def served(self) -> list[str]:
        with self._lock:
            return sorted(self._served)

    def sent(self, uid: str, namespace: str) -> None:
        """An attempt of this command was sent: it is live until ``finished`` (and its
        namespace's reports are read)."""
        self.serve(namespace)
        self.client.sadd(live_key(self.scope), f"{namespace}/{uid}")

    def finished(self, uid: str, namespace: str) -> None:
        self.client.srem(live_key(self.scope), f"{namespace}/{uid}")

    def live(self) -> set[tuple[str, str]]:
        """``(namespace, uid)`` of the commands with attempts sent and not finished."""
        found = set()
        for member in self.client.smembers(live_key(self.scope)):
            namespace, _, uid = _text(member).rpartition("/")
            if namespace:
                found.add((namespace, uid))
        return found

    def cancel(self, uid: str, namespace: str) -> None:
        """The command is gone: its unclaimed attempts never start, running ones are killed."""
        pipe = self.client.pipeline(transaction=False)
        pipe.set(cancel_key(namespace, uid), "1", ex=CANCEL_TTL_SECONDS)
        pipe.publish(cancels_channel(namespace), uid)
        pipe.srem(live_key(self.scope), f"{namespace}/{uid}")
        pipe.execute()

    def stale_heartbeats(self, older_than_seconds: float) -> set[tuple[str, str]]:
        """``(namespace, uid/vm/attempt)`` whose last heartbeat is older than that, in
        every namespace served."""
        cutoff = self.now_ms() - int(older_than_seconds * 1000)
        namespaces = self.served()
        if not namespaces:
            return set()
        pipe = self.client.pipeline(transaction=False)
        for namespace in namespaces:
            pipe.zrangebyscore(heartbeats_key(namespace, self.scope), "-inf", cutoff)
        return {(namespace, _text(m))
                for namespace, members in zip(namespaces, pipe.execute(), strict=True) for m in members}

    def absent_heartbeats(self, members: list[tuple[str, str]]) -> set[tuple[str, str]]:
        """``(namespace, uid/vm/attempt)`` that have no heartbeat at all (released, or
        Redis lost the set)."""
        if not members:
            return set()
        pipe = self.client.pipeline(transaction=False)
        for namespace, member in members:
            pipe.zscore(heartbeats_key(namespace, self.scope), member)
        return {m for m, score in zip(members, pipe.execute(), strict=True) if score is None}

    def forget_heartbeat(self, namespace: str, member: str) -> None:
        self.client.zrem(heartbeats_key(namespace, self.scope), member)

    def ensure_group(self, namespaces: list[str] | None = None) -> list[str]:
        """Create the consumer group of each namespace's stream that has none yet (all
        served namespaces again when None: Redis may have restarted empty). Returns the
        namespaces whose streams can be read."""
        import redis

        with self._lock:
            if namespaces is None:
                todo = list(self._served)
            else:
                todo = [ns for ns in namespaces if not self._served.get(ns)]
        for namespace in todo:
            try:
                self.client.xgroup_create(reports_key(namespace, self.scope), GROUP, id="0",
                                          mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
            with self._lock:
                self._served[namespace] = True
        return self.served()

    def pending_reports(self, consumer: str, count: int = 1000) -> Iterator[Report]:
        """Reports read but never acknowledged by any controller (one that died), now ours."""
        for namespace in self.ensure_group():
            stream = reports_key(namespace, self.scope)
            start = "0-0"
            while True:
                reply = self.client.xautoclaim(stream, GROUP, consumer, min_idle_time=0,
                                               start_id=start, count=count)
                start, entries = reply[0], reply[1]
                yield from _reports(namespace, entries)
                if start in (b"0-0", "0-0") or not entries:
                    break

    def read_reports(self, consumer: str, block_ms: int, count: int = 1000) -> list[Report]:
        """New reports of every namespace served, in one ``XREADGROUP``."""
        namespaces = self.ensure_group(self.served())
        if not namespaces:
            time.sleep(block_ms / 1000)
            return []
        streams = {reports_key(ns, self.scope): ">" for ns in namespaces}
        by_stream = {reports_key(ns, self.scope): ns for ns in namespaces}
        reply = self.client.xreadgroup(GROUP, consumer, streams, count=count, block=block_ms)
        reports: list[Report] = []
        for stream, entries in reply or []:
            reports.extend(_reports(by_stream[_text(stream)], entries))
        return reports

    def ack(self, ids: list[str]) -> None:
        """The reports' writes landed: acknowledge and drop them (``Report.id`` values)."""
        if not ids:
            return
        by_namespace: dict[str, list[str]] = {}
        for ident in ids:
            namespace, _, entry_id = ident.partition("/")
            by_namespace.setdefault(namespace, []).append(entry_id)
        pipe = self.client.pipeline(transaction=False)
        for namespace, entry_ids in by_namespace.items():
            stream = reports_key(namespace, self.scope)
            pipe.xack(stream, GROUP, *entry_ids)
            pipe.xdel(stream, *entry_ids)
        pipe.execute()


def _reports(namespace: str, entries: Any) -> Iterator[Report]:
    for entry_id, fields in entries or []:
        if fields is None:  # deleted meanwhile
            continue
        ident = f"{namespace}/{_text(entry_id)}"
        raw = fields.get(b"r") or fields.get("r")
        try:
            body = json.loads(raw)
        except (TypeError, ValueError):
            log.warning("Dropped report %s: not JSON", ident)
            body = {}
        if not isinstance(body, dict):
            log.warning("Dropped report %s: not an object", ident)
            body = {}
        elif body and body.get("namespace") != namespace:
            # Written with namespace's credentials about another namespace: never applied.
            log.warning("Dropped report %s: it names namespace %r, not its stream's", ident,
                        body.get("namespace"))
            body = {}
        yield Report(ident, body)


__all__ = ["CANCELLED", "CLAIMED", "TAKEN", "Report", "State", "attempt_member", "cancel_key",
           "cancels_channel", "claim_key", "heartbeats_key", "live_key", "reports_key",
           "state_url"]
