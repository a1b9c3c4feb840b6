"""Output is bytes: tails, exact counts, and safe decoding."""

from remote_tasks.output import StreamTail


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
