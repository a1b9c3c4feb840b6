"""The output store's layout, the worker's writer (batching, cap, quota, end mark) and the
reader's records and cursors, against a small in-memory stand-in for Redis streams."""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any

import pytest

from controller.logsapi import BadRequest, LogQuery, OutputReader
from vmfleet import outputstore as store
from vmfleet.api.logs import LogRecord


class MemoryStreams:
    """XADD/XRANGE/XREVRANGE/XREAD/HSET/HGETALL/INCRBY/EXPIRE on dicts (unit tests only)."""

    def __init__(self) -> None:
        self.streams: dict[str, list[tuple[str, dict[bytes, Any]]]] = {}
        self.hashes: dict[str, dict[bytes, bytes]] = {}
        self.counters: dict[str, int] = {}
        self.ttls: dict[str, int] = {}
        self._ids = itertools.count(1)
        self.fail = False
        self.lock = threading.Lock()

    def pipeline(self, transaction: bool = False) -> Pipeline:
        return Pipeline(self)

    def xadd(self, key: str, fields: dict[str, Any]) -> str:
        if self.fail:
            raise ConnectionError("gone")
        with self.lock:
            entry_id = f"{int(time.time() * 1000)}-{next(self._ids)}"
            enc = {k.encode(): (v if isinstance(v, bytes) else str(v).encode())
                   for k, v in fields.items()}
            self.streams.setdefault(key, []).append((entry_id, enc))
            return entry_id

    def hset(self, key: str, field: str, value: str) -> int:
        self.hashes.setdefault(key, {})[field.encode()] = value.encode()
        return 1

    def hgetall(self, key: str) -> dict[bytes, bytes]:
        return dict(self.hashes.get(key, {}))

    def incrby(self, key: str, amount: int) -> int:
        self.counters[key] = self.counters.get(key, 0) + amount
        return self.counters[key]

    def expire(self, key: str, seconds: int) -> bool:
        self.ttls[key] = seconds
        return True

    @staticmethod
    def _key(entry_id: str) -> tuple[int, int]:
        ms, seq = entry_id.split("-")
        return int(ms), int(seq)

    def _in(self, entry_id: str, low: str, high: str) -> bool:
        def bound(b: str, default: tuple[int, int]) -> tuple[tuple[int, int], bool]:
            if b in ("-", "+"):
                return default, False
            exclusive = b.startswith("(")
            b = b.lstrip("(")
            return (self._key(b) if "-" in b else (int(b), 0)), exclusive

        (lo, lo_ex), (hi, hi_ex) = bound(low, (0, 0)), bound(high, (1 << 62, 0))
        k = self._key(entry_id)
        return (k > lo if lo_ex else k >= lo) and (k < hi if hi_ex else k <= hi)

    def xrange(self, key: str, low: str, high: str, count: int | None = None) -> list[Any]:
        found = [e for e in self.streams.get(key, []) if self._in(e[0], low, high)]
        return [(i.encode(), f) for i, f in found[:count]]

    def xrevrange(self, key: str, high: str, low: str, count: int | None = None) -> list[Any]:
        found = [e for e in self.streams.get(key, []) if self._in(e[0], low, high)][::-1]
        return [(i.encode(), f) for i, f in found[:count]]

    def xread(self, streams: dict[str, str], count: int = 100, block: int = 0) -> list[Any]:
        out = []
        for key, after in streams.items():
            start = "-" if after in ("0-0", "0") else f"({after}"
            entries = self.xrange(key, start, "+", count)
            if entries:
                out.append((key.encode(), entries))
        if not out and block:
            time.sleep(block / 1000)
        return out


class Pipeline:
    def __init__(self, redis: MemoryStreams) -> None:
        self.redis = redis
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def __getattr__(self, name: str) -> Any:
        def call(*args: Any) -> Pipeline:
            self.calls.append((name, args))
            return self
        return call

    def execute(self) -> list[Any]:
        if self.redis.fail:
            raise ConnectionError("gone")
        return [getattr(self.redis, name)(*args) for name, args in self.calls]


LIMITS = store.Limits(max_bytes=1000, retention=600, namespace_quota=0)


def writer(redis: MemoryStreams, limits: store.Limits = LIMITS, vm: str = "vm1",
           attempt: int = 1) -> store.AttemptOutput:
    return store.AttemptOutput(redis, "ops", "uid-1", vm, attempt, limits)


def read_all(redis: MemoryStreams, query: str = "") -> list[LogRecord]:
    reader = OutputReader(redis, block_ms=10)
    return [r for batch in reader.read("ops", "uid-1", LogQuery.parse(query), lambda: True)
            for r in batch]


def test_keys_are_under_the_namespace_prefix():
    assert store.attempt_key("ops", "u", "vm1", 2) == "vmfleet.ops:output:u:vm1:2"
    assert store.command_key("ops", "u") == "vmfleet.ops:output:u"
    assert store.quota_key("ops") == "vmfleet.ops:output:used"


@pytest.mark.parametrize(("ttl", "configured", "kept"), [
    (None, 86400, 86400), (3600, 86400, 3600), (0, 86400, 60), (10**6, 86400, 86400)])
def test_retention_is_the_shorter_of_the_ttl_and_the_setting(ttl, configured, kept):
    assert store.retention_seconds(ttl, configured) == kept


@pytest.mark.parametrize(("data", "end"), [
    (b"abc", 3), ("é".encode(), 2), ("é".encode()[:1], 0), (b"a" + "€".encode()[:2], 1),
    (b"a" + "€".encode(), 4), (b"", 0), (b"x" + "😀".encode()[:3], 1)])
def test_a_flush_never_splits_a_utf8_character(data, end):
    assert store.utf8_safe_end(data) == end


def test_lines_of_both_streams_are_kept_in_order_with_seq_and_end_mark():
    redis = MemoryStreams()
    out = writer(redis)
    out.stdout(b"one\ntw")
    out.stderr(b"oops\n")
    out.flush()
    out.stdout(b"o\nthree")
    out.close()
    records = read_all(redis)
    assert [(r.stream, r.data, r.seq) for r in records] == [
        ("stdout", "one\n", 1), ("stdout", "tw", 2), ("stderr", "oops\n", 3),
        ("stdout", "o\n", 4), ("stdout", "three", 5)]
    entries = redis.streams[store.attempt_key("ops", "uid-1", "vm1", 1)]
    assert entries[-1][1][b"s"] == b"x"  # the end mark
    assert redis.ttls[store.attempt_key("ops", "uid-1", "vm1", 1)] == 600
    assert redis.ttls[store.command_key("ops", "uid-1")] == 600


def test_a_partial_line_is_stored_within_the_flush_interval_without_any_flush_call():
    redis = MemoryStreams()
    out = writer(redis)
    out.stdout(b"Password: ")
    deadline = time.monotonic() + 2
    key = store.attempt_key("ops", "uid-1", "vm1", 1)
    while time.monotonic() < deadline and not redis.streams.get(key):
        time.sleep(0.02)
    assert redis.streams[key][0][1][b"d"] == b"Password: "
    out.close()


def test_output_past_the_cap_is_cut_once_and_marked():
    redis = MemoryStreams()
    out = writer(redis, store.Limits(max_bytes=10, retention=600))
    out.stdout(b"0123456789abcdef\n")
    out.flush()
    out.stdout(b"more\n")
    out.close()
    records = read_all(redis)
    assert "".join(r.data for r in records if r.stream == "stdout") == "0123456789"
    assert records[-1].stream == "stderr" and "output cut at 10 bytes" in records[-1].data
    assert sum("output cut" in r.data for r in records) == 1
    assert out.stored == 10


def test_the_namespace_quota_cuts_further_output():
    redis = MemoryStreams()
    redis.counters[store.quota_key("ops")] = 990
    out = writer(redis, store.Limits(max_bytes=1000, retention=600, namespace_quota=1000))
    out.stdout(b"x" * 20 + b"\n")
    out.flush()
    out.stdout(b"dropped\n")
    out.close()
    data = "".join(r.data for r in read_all(redis))
    assert "reached its output quota (1000 bytes" in data and "dropped" not in data


def test_a_failing_store_never_fails_the_attempt():
    redis = MemoryStreams()
    redis.fail = True
    out = writer(redis)
    out.stdout(b"line\n" * 100_000)  # several flushes' worth: all dropped, none raise
    out.close()
    assert out.failed and not redis.streams


def test_a_duplicate_delivery_marks_no_end_in_the_attempt_it_did_not_run():
    redis = MemoryStreams()
    writer(redis).close(mark_end=False)
    assert not redis.streams


def test_memory_waiting_in_the_writer_stays_bounded():
    redis = MemoryStreams()
    out = writer(redis, store.Limits(max_bytes=10**9, retention=600))
    for _ in range(200):
        out.stdout(b"y" * 8192)
        assert all(len(b) < store.FLUSH_BYTES + 8192 for b in out._pending.values())
    out.close()
    assert out.stored == 200 * 8192


def test_a_cursor_resumes_right_after_its_record_across_vms_and_attempts():
    redis = MemoryStreams()
    for vm, attempt in (("vm1", 1), ("vm1", 2), ("vm2", 1)):
        out = writer(redis, vm=vm, attempt=attempt)
        out.stdout(f"{vm}-{attempt}-a\n{vm}-{attempt}-b\n".encode())
        out.close()
    whole = read_all(redis)
    assert [(r.vm, r.attempt) for r in whole] == [
        ("vm1", 1), ("vm1", 1), ("vm1", 2), ("vm1", 2), ("vm2", 1), ("vm2", 1)]
    for index, record in enumerate(whole):
        rest = read_all(redis, f"after={record.cursor}")
        assert [r.data for r in rest] == [r.data for r in whole[index + 1:]]


def test_tail_since_vm_and_attempt_select_records():
    redis = MemoryStreams()
    out = writer(redis)
    out.stdout(b"".join(b"line-%d\n" % i for i in range(10)))
    out.close()
    other = writer(redis, vm="vm2", attempt=3)
    other.stdout(b"elsewhere\n")
    other.close()
    assert [r.data for r in read_all(redis, "vm=vm1&tailLines=2")] == ["line-8\n", "line-9\n"]
    assert [r.data for r in read_all(redis, "vm=vm2&attempt=3")] == ["elsewhere\n"]
    assert read_all(redis, "attempt=2") == []
    assert len(read_all(redis, "sinceSeconds=60")) == 11


def test_follow_reads_what_comes_until_the_command_ended():
    redis = MemoryStreams()
    out = writer(redis)
    reader = OutputReader(redis, block_ms=20)
    ended = threading.Event()
    got: list[str] = []

    def follow() -> None:
        for batch in reader.read("ops", "uid-1", LogQuery.parse("follow=true"), ended.is_set):
            got.extend(r.data for r in batch)

    thread = threading.Thread(target=follow)
    thread.start()
    out.stdout(b"first\n")
    out.flush()
    deadline = time.monotonic() + 5
    while not got and time.monotonic() < deadline:
        time.sleep(0.01)
    assert got == ["first\n"]  # before the end
    out.stdout(b"second\n")
    out.close()
    ended.set()
    thread.join(timeout=10)
    assert not thread.is_alive() and got == ["first\n", "second\n"]


@pytest.mark.parametrize("query", ["attempt=0", "tailLines=-1", "follow=maybe", "after=%%%",
                                   "sinceSeconds=x"])
def test_bad_queries_are_refused_naming_the_parameter(query):
    with pytest.raises(BadRequest):
        LogQuery.parse(query)


def test_follow_ends_after_the_command_ended_even_when_a_worker_was_lost_mid_output():
    redis = MemoryStreams()
    lost = writer(redis)
    lost.stdout(b"half a job\n")
    lost.flush()  # ... and its worker died: no end mark
    reader = OutputReader(redis, block_ms=10, lost_end_grace=0.3)
    started = time.monotonic()
    got = [r.data for batch in reader.read("ops", "uid-1", LogQuery.parse("follow=true"),
                                           lambda: True) for r in batch]
    assert got == ["half a job\n"]
    assert time.monotonic() - started < 5


def _reading_session(chan, rate):
    from remote_tasks.output import ReadBudget, StreamTail
    from remote_tasks.session import Session

    session = Session.__new__(Session)
    session.chan, session.head, session.become_failed = chan, None, None
    session.out, session.err = StreamTail(1024), StreamTail(1024)
    session.budget = ReadBudget(rate)
    session.conn = type("Conn", (), {"transport": type("T", (), {"is_active": lambda s: True})()})()
    return session


class EndlessChannel:
    """A channel of a command that prints as fast as it is read: each read lets the VM
    send more (paramiko's window adjust), so there is always more to read."""

    def __init__(self):
        import socket

        self._ready, self._other = socket.socketpair()
        self._other.send(b"x")  # select() finds it readable
        self.read = 0
        self.closed = False
        self.eof_received = False

    def fileno(self):
        return self._ready.fileno()

    def recv_ready(self):
        assert self.read < 64 * 2**20, "drained a loud channel past its read budget"
        return True

    def recv(self, size):
        self.read += size
        return b"x" * size

    def recv_stderr_ready(self):
        return False

    def exit_status_ready(self):
        return False


def test_a_loud_channel_is_read_no_faster_than_the_rate():
    chan = EndlessChannel()
    session = _reading_session(chan, 1_000_000)  # a burst of 1 MB, then 1 MB/s
    started = time.monotonic()
    assert session.read()  # the burst, at once
    assert 1_000_000 <= chan.read <= 1_000_000 + 65536
    assert time.monotonic() - started < 0.3
    while time.monotonic() - started < 1.5:
        assert session.read()
    assert 2_000_000 <= chan.read <= 2_700_000  # the burst and ~1.5 s at the rate


class EndedChannel(EndlessChannel):
    """A command's channel after the VM's EOF, before its exit status: paramiko keeps
    its pipe readable from EOF on (select returns at once), with nothing to read."""

    def __init__(self):
        import threading

        super().__init__()
        self.eof_received = True
        self.status_event = threading.Event()

    def recv_ready(self):
        return False

    def exit_status_ready(self):
        return self.status_event.is_set()


def test_after_eof_the_worker_waits_for_the_exit_status_without_spinning():
    import threading

    chan = EndedChannel()
    session = _reading_session(chan, 0)
    threading.Timer(0.3, chan.status_event.set).start()  # sshd reaps the command
    reads, started = 1, time.monotonic()
    while session.read():
        reads += 1
    assert 0.25 < time.monotonic() - started < 1.0
    assert reads <= 3, f"{reads} reads while waiting 0.3 s for the exit status"


def test_a_short_loud_command_is_not_held_back_and_no_rate_means_no_wait():
    from remote_tasks.session import Session

    rate = {"now": 4 * 2**20}
    session = Session.__new__(Session)
    from remote_tasks.output import ReadBudget

    session.budget = ReadBudget(lambda: rate["now"])
    started = time.monotonic()
    for _ in range(30):  # 1.9 MB, as `seq 1 300000` prints, read in 30 pieces
        session.hold_back()
        session.counted(b"x" * 65536)
    session.hold_back()
    assert time.monotonic() - started < 0.1
    session.counted(b"x" * 4 * 2**20)  # past the burst: held back
    started = time.monotonic()
    session.hold_back()
    assert 0.3 < time.monotonic() - started < 0.7  # at most a tick
    rate["now"] = 0  # no limit: no wait, and no debt carried over
    session.counted(b"x" * 10_000_000)
    started = time.monotonic()
    session.hold_back()
    assert time.monotonic() - started < 0.05


class HighChannel(EndlessChannel):
    """A channel whose descriptor is past 1,023, as in a pool worker with hundreds of
    connections and a pipe per open channel."""

    def __init__(self):
        import os

        super().__init__()
        self.fd = os.dup2(self._ready.fileno(), 1500)

    def fileno(self):
        return self.fd

    def close(self):
        import os

        os.close(self.fd)
        self._ready.close()
        self._other.close()


def test_a_channel_past_descriptor_1023_is_read():
    import select

    from remote_tasks.session import wait_readable

    chan = HighChannel()
    try:
        with pytest.raises(ValueError):
            select.select([chan], [], [], 0)  # what the read loop used, and failed with
        assert wait_readable(chan, 0.1)  # the byte the channel holds
        session = _reading_session(chan, 1_000_000)
        assert session.read() and chan.read >= 65536
        chan._ready.recv(1)
        started = time.monotonic()
        assert not wait_readable(chan, 0.2)
        assert time.monotonic() - started >= 0.15
    finally:
        chan.close()
