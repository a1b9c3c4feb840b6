"""Cancelling an attempt from another thread: the kill is sent once, at once."""

import threading

from remote_tasks.ssh import AttemptControl
from remote_tasks.running import RunningAttempts


class FakeConnection:
    def __init__(self) -> None:
        self.kills: list[tuple] = []
        self.thread: str | None = None

    def terminate(self, pgid, grace, nonce, become):  # noqa: ANN001
        self.kills.append((pgid, grace, nonce, become))
        self.thread = threading.current_thread().name


def test_terminate_kills_once_from_the_calling_thread():
    control, conn = AttemptControl(), FakeConnection()
    control.attach(conn, 4242, "abc", None, 1.5)  # type: ignore[arg-type]
    done = []
    t = threading.Thread(target=lambda: done.append(control.terminate("Cancelled")), name="cancel")
    t.start()
    t.join()
    assert done == [True] and conn.thread == "cancel"
    assert conn.kills == [(4242, 1.5, "abc", None)]
    assert control.terminate("Timeout") is False  # once; the first reason stays
    assert control.reason == "Cancelled"


def test_a_control_not_attached_only_records_the_reason():
    control = AttemptControl()
    assert control.terminate("Cancelled") is False
    assert control.reason == "Cancelled"
    conn = FakeConnection()
    control.attach(conn, 4242, "abc", None, 1)  # type: ignore[arg-type]
    # the run loop sees the reason and claims the kill itself
    assert control.terminate("Cancelled") is True and len(conn.kills) == 1


def test_running_attempts_reach_a_running_one_and_remember_an_early_cancel():
    clock = [0.0]
    running = RunningAttempts(forget_after=10, clock=lambda: clock[0])
    conn = FakeConnection()
    with running.track(("ns", "c", "vm1", 1)) as control:
        control.attach(conn, 7, "n", None, 1)  # type: ignore[arg-type]
        assert len(running) == 1
        assert running.terminate(("ns", "c", "vm1", 1), "Cancelled") is True
    assert conn.kills == [(7, 1, "n", None)] and len(running) == 0
    # cancelled before it started here: the attempt starts already ended (never runs)
    assert running.terminate(("ns", "c", "vm2", 1), "Cancelled") is False
    with running.track(("ns", "c", "vm2", 1)) as control:
        assert control.reason == "Cancelled"
    # an early cancel is forgotten after forget_after
    running.terminate(("ns", "c", "vm3", 1), "Cancelled")
    clock[0] = 11
    with running.track(("ns", "c", "vm3", 1)) as control:
        assert control.reason is None
