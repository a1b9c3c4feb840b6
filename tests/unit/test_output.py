"""Output is bytes: tails, exact counts, and safe decoding."""

import pytest

from remote_tasks.output import ReadBudget, StreamTail
from remote_tasks.session import READ_QUANTUM


def test_tail_keeps_last_bytes_and_counts_all():
    lines = []
    tail = StreamTail(8, lines.append)
    for chunk in (b"line one\nline ", b"two\n", b"three"):
        tail.feed(chunk)
    tail.close()
    assert tail.total == len(b"line one\nline two\nthree")
    assert tail.text() == "wo\nthree"
    assert tail.truncated
    assert lines == ["line one", "line two", "three"]


def test_small_output_is_not_truncated():
    tail = StreamTail(16384)
    tail.feed(b"hello\n")
    assert (tail.text(), tail.total, tail.truncated) == ("hello\n", 6, False)


def test_non_utf8_bytes_become_replacement_characters():
    lines = []
    tail = StreamTail(100, lines.append)
    tail.feed(b"ok \xff\xfe bytes\n")
    assert tail.text() == "ok \ufffd\ufffd bytes\n"
    assert tail.total == 12
    assert lines == ["ok \ufffd\ufffd bytes"]


def test_cut_multibyte_character_at_tail_start():
    tail = StreamTail(3)
    tail.feed("é€".encode())  # 2 + 3 bytes; the tail starts inside nothing but the euro sign
    assert tail.text() == "€"
    tail.feed(b"x")
    assert tail.text() == "\ufffd\ufffdx"
    assert tail.total == 6


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_of_a_seconds_worth_is_read_at_once():
    # `seq 1 300000` prints 1.9 MB in one go: at 4 MiB/s, it is never held back, whatever
    # the pieces its output arrives in (it was: +50 ms on a 60 ms command).
    clock = FakeClock()
    budget = ReadBudget(4 * 2**20, clock=clock)
    for _ in range(30):
        assert budget.available() and budget.delay(READ_QUANTUM) == 0
        budget.spend(65536)  # 1.9 MB in 30 reads, no time passing
    assert budget.available()


def test_a_loud_command_is_read_at_the_rate_past_the_burst():
    clock = FakeClock()
    rate = 1_000_000
    budget = ReadBudget(rate, clock=clock)
    read = 0
    while clock.now < 110:  # ten seconds of a command that prints as fast as it is read
        while budget.available():
            budget.spend(65536)
            read += 65536
        wait = budget.delay(READ_QUANTUM)
        assert 0 < wait <= READ_QUANTUM / rate + 65536 / rate
        clock.now += wait
    assert rate * 10 <= read <= rate * 11 + 2 * 65536  # the rate, and one burst


def test_a_quiet_spell_refills_the_bucket_only_to_its_size():
    clock = FakeClock()
    budget = ReadBudget(1000, clock=clock)
    budget.spend(1000)
    assert not budget.available() and budget.delay(200) == pytest.approx(0.2)
    clock.now += 3600  # an hour of silence earns one second's worth, no more
    budget.spend(1000)
    assert not budget.available()
    assert budget.delay(10_000) == pytest.approx(1.0)  # a quantum is at most the bucket


def test_no_rate_means_no_limit_and_no_debt_carried_over():
    clock = FakeClock()
    rate = {"now": 1000.0}
    budget = ReadBudget(lambda: rate["now"], clock=clock)
    budget.spend(5000)
    assert not budget.available()
    rate["now"] = 0
    budget.spend(10**9)
    assert budget.available() and budget.delay(READ_QUANTUM) == 0
    rate["now"] = 1000.0  # limited again: a full bucket, not the debt of the unlimited reads
    assert budget.available()
