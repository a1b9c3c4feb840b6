"""The worker's intake on Redis: every message waiting on its queues per broker round trip.

kombu's Redis transport takes one message per round trip: a BRPOP naming every queue the
worker consumes, then (``task_acks_late``) a second round trip recording the message as
unacknowledged. A pool worker consumes a queue per VM (``vmfleet.<namespace>.<vm>``),
so a fan-out to its 200 VMs is 200 BRPOPs of 200 keys and 200 more round trips, each
waiting for the event loop's thread to get the GIL back from the attempts' threads:
~100 messages a second at load 10, most of a 200-VM fan-out's wall time.

``Transport`` here is kombu's with one change: when a BRPOP returns a message, one Lua
script (:data:`DRAIN`) then pops one message from each further queue that has one, as
many as the prefetch limit still allows, and records each as unacknowledged (kombu's own
``unacked`` hash and ``unacked_index`` sorted set, what its QoS writes and restores from)
in the same atomic step; the messages are then delivered as if each came from a BRPOP
(in the queues' round-robin order, each queue moved to the end of it). Every queue is
still its VM's own queue, under the namespace's key prefix, and the served-set check
refuses what a worker does not serve, as before. Sending is unchanged.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

log = logging.getLogger("remote_tasks.intake")

#: A drain takes at most this many messages (one round trip, one script run).
DRAIN_MAX = 256

# KEYS: the unacked hash, the unacked index, then the queues' lists in round-robin order;
# ARGV: how many messages at most, the time to index them at. Pops one message from each
# list (the right end, as BRPOP) until the count is reached; each is recorded as
# unacknowledged as kombu's QoS.append records it ([message, exchange, routing key] under
# its delivery tag). Returns {list index, message, ...}.
DRAIN = """
local want = tonumber(ARGV[1])
local out = {}
for i = 3, #KEYS do
  if want <= 0 then break end
  local item = redis.call('RPOP', KEYS[i])
  if item then
    local props = cjson.decode(item)['properties']
    local info = props['delivery_info']
    local tag = props['delivery_tag']
    redis.call('ZADD', KEYS[2], ARGV[2], tag)
    redis.call('HSET', KEYS[1], tag, '[' .. item .. ',' .. cjson.encode(info['exchange'])
      .. ',' .. cjson.encode(info['routing_key']) .. ']')
    out[#out + 1] = i - 2
    out[#out + 1] = item
    want = want - 1
  end
end
return out
"""


class QoS(kombu_redis.QoS):
    """kombu's Redis QoS; a message the drain already recorded as unacknowledged is not
    written again when the consumer takes it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.recorded: set[str] = set()

    def append(self, message: Any, delivery_tag: str) -> None:
        if delivery_tag in self.recorded:
            self.recorded.discard(delivery_tag)
            virtual.QoS.append(self, message, delivery_tag)
            return
        super().append(message, delivery_tag)


class Channel(kombu_redis.Channel):
    """kombu's Redis channel that drains its queues after each message a BRPOP brought."""

    QoS = QoS

    def _brpop_read(self, **options: Any) -> bool:
        got: bool = super()._brpop_read(**options)
        if got:
            try:
                self.drain()
            except self.connection_errors as exc:
                # Nothing was taken (the script is atomic) or its reply was lost: those
                # messages are in the unacked hash and come back with the visibility timeout.
                log.warning("Draining the queues failed (%s); BRPOP goes on", exc)
        return got

    def drain(self) -> int:
        """Take and deliver up to the prefetch limit's room of waiting messages; how many."""
        room = self.qos.can_consume_max_estimate()
        want = DRAIN_MAX if room is None else min(int(room), DRAIN_MAX)
        queues = self._queue_cycle.consume(len(self.active_queues))
        if want <= 0 or not queues:
            return 0
        prefix = self.global_keyprefix or ""
        keys = [self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues]
        names = [queue for pri in self.priority_steps for queue in queues]
        with self.conn_or_acquire() as client:
            # EVAL is not among the commands kombu's prefixing client rewrites: every key
            # is prefixed here.
            reply = client.execute_command(
                "EVAL", DRAIN, 2 + len(keys), prefix + self.unacked_key,
                prefix + self.unacked_index_key, *(prefix + key for key in keys),
                want, time.time())
        taken = 0
        for index, item in zip(reply[::2], reply[1::2], strict=True):
            queue = names[int(index) - 1]
            payload = loads(bytes_to_str(item))
            self.qos.recorded.add(payload["properties"]["delivery_tag"])
            self._queue_cycle.rotate(queue)
            self.connection._deliver(payload, queue)
            taken += 1
        return taken


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with :class:`Channel` (``broker_transport``)."""

    Channel = Channel
