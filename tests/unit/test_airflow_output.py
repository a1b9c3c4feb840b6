"""The command's output in the Airflow task log while the task is deferred
(vmfleet.airflow.output and the trigger's use of it), against a fake of the API server on
loopback (tests/fake_log_api.py): real HTTP, real kubernetes_asyncio, no cluster.

What a user sees: each line once, ``[vm]``-prefixed, stderr and later attempts marked; a
dropped stream costs no line; after the trigger starts again (a triggerer restart) no
line is lost and every line shown twice carries ``(repeat)``; the read position is written
before the lines it covers and at most once per interval.

Airflow lives in its own virtualenv (``make airflow-venv``); elsewhere this module skips.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml

from tests.airflow_env import use_airflow

use_airflow(__file__, "kubernetes_asyncio")  # skips this module without Airflow; a throwaway AIRFLOW_HOME

import structlog  # noqa: E402
from kubernetes_asyncio import client  # noqa: E402

from tests.fake_log_api import FakeLogApi  # noqa: E402
from vmfleet.airflow import RemoteCommandOperator, RemoteCommandTrigger  # noqa: E402
from vmfleet.airflow import triggers as triggers_module  # noqa: E402
from vmfleet.airflow.naming import ANNOTATION_OUTPUT_POSITION  # noqa: E402
from vmfleet.airflow.output import (  # noqa: E402
    AnnotationStore,
    LineFormatter,
    OutputFollower,
    OutputUnavailable,
    Position,
    as_repeat,
    read_records,
)
from vmfleet.airflow.watches import FINISHED, Outcome  # noqa: E402
from vmfleet.api.logs import LogRecord  # noqa: E402


def rec(vm: str, seq: int, data: str, stream: str = "stdout", attempt: int = 1) -> LogRecord:
    return LogRecord(vm=vm, attempt=attempt, stream=stream, seq=seq,  # type: ignore[arg-type]
                     time="2026-12-07T00:00:00.000000Z", data=data, cursor=f"{vm}-{seq}")


# ------------------------------------------------------------------------------ lines

def test_lines_are_prefixed_with_their_vm_and_stderr_attempts_and_repeats_are_marked():
    f = LineFormatter()
    out = [*f.feed(rec("vm1", 1, "hello\n"), False),
           *f.feed(rec("vm2", 1, "disk full\n", stream="stderr"), False),
           *f.feed(rec("vm1", 1, "again\n", attempt=2), False),
           *f.feed(rec("vm1", 2, "shown before\n"), True),
           *f.feed(rec("vm1", 3, "two\nlines\n"), False),
           *f.feed(rec("vm1", 4, "\n"), False), *f.flush()]
    assert out == ["[vm1] hello", "[vm2 stderr] disk full", "[vm1 attempt 2] again",
                   "[vm1] (repeat) shown before", "[vm1] two", "[vm1] lines", "[vm1] "]


def test_a_line_printed_in_pieces_is_joined_within_a_batch_and_marked_across_batches():
    f = LineFormatter()
    # Pieces of one line in one batch: one task-log line; stdout and stderr kept apart.
    assert [*f.feed(rec("vm1", 1, "Downloading"), False),
            *f.feed(rec("vm1", 2, "warn: slow\n", stream="stderr"), False),
            *f.feed(rec("vm1", 3, " 50%"), False), *f.feed(rec("vm1", 4, " 100%\n"), False),
            *f.flush()] == ["[vm1 stderr] warn: slow", "[vm1] Downloading 50% 100%"]
    # A piece whose rest comes in a later batch.
    assert [*f.feed(rec("vm1", 5, "Compiling"), False), *f.flush()] == ["[vm1] Compiling (continues)"]
    assert [*f.feed(rec("vm1", 6, " done\n"), False), *f.flush()] == ["[vm1] (continued)  done"]
    # The last piece of the output, with no newline ever: shown as it is.
    assert [*f.feed(rec("vm1", 7, "no newline at the end"), False), *f.flush(final=True)] == [
        "[vm1] no newline at the end"]


def test_a_line_shown_again_is_marked_once():
    assert as_repeat("[vm1] text") == "[vm1] (repeat) text"
    assert as_repeat("[vm1 stderr] (repeat) text") == "[vm1 stderr] (repeat) text"
    assert as_repeat("[vm1] ] x") == "[vm1] (repeat) ] x"


def test_the_position_annotation_round_trips_and_garbage_is_refused():
    position = Position(after="c42", upto={"vm2/1": 7, "vm1/2": 3})
    text = position.to_annotation()
    assert text == '{"after":"c42","upto":{"vm1/2":3,"vm2/1":7}}'
    assert Position.from_annotation(text) == position
    assert Position.from_annotation(None) is None and Position.from_annotation("") is None
    assert position.may_have_shown(rec("vm2", 7, "x")) and not position.may_have_shown(rec("vm2", 8, "x"))
    assert not position.may_have_shown(rec("vm3", 1, "x"))
    for garbled in ("[1]", '{"upto": [1]}', "not json"):
        with pytest.raises(ValueError):
            Position.from_annotation(garbled)


# ------------------------------------------------------------------------------ HTTP

@pytest.fixture
async def api() -> AsyncIterator[FakeLogApi]:
    server = await FakeLogApi().start()
    yield server
    await server.stop()


def _client(url: str) -> client.ApiClient:
    configuration = client.Configuration(host=url)
    configuration.api_key = {"BearerToken": "secret-token"}
    configuration.api_key_prefix = {"BearerToken": "Bearer"}
    return client.ApiClient(configuration)


async def test_the_reader_follows_the_aggregated_api_path_and_resumes_after_a_cursor(api):
    api.print_lines("vm1", "one\n", "two\n")
    api.print_lines("vm2", "oops\n", stream="stderr")
    api.end()
    async with _client(api.url) as c:
        got = [r async for r in read_records(c, "ops", "c")]
        again = [r async for r in read_records(c, "ops", "c", after=got[0].cursor)]
    assert [(r.vm, r.stream, r.seq, r.data) for r in got] == [
        ("vm1", "stdout", 1, "one\n"), ("vm1", "stdout", 2, "two\n"), ("vm2", "stderr", 1, "oops\n")]
    assert again == got[1:]
    first, second = api.log_requests()
    assert first.path == "/apis/logs.vmfleet.io/v1alpha1/namespaces/ops/remotecommands/c/log"
    assert first.query == {"follow": "true"} and second.query == {"follow": "true", "after": "c1"}
    assert first.headers["Accept"] == "application/x-ndjson"
    assert first.headers["Authorization"] == "Bearer secret-token"  # the caller's own identity


async def test_a_refusal_says_what_to_grant_and_a_busy_server_is_an_api_error(api):
    from kubernetes_asyncio.client.exceptions import ApiException

    api.fail_next = [403, 404, (503, "this controller keeps no output (VMFLEET_OUTPUT_URL is not set)"), 503]
    async with _client(api.url) as c:
        with pytest.raises(OutputUnavailable, match=r"\(403\).*needs get on remotecommands in vmfleet.io "
                                                     r"and on remotecommands/log in logs.vmfleet.io"):
            [r async for r in read_records(c, "ops", "c")]
        with pytest.raises(OutputUnavailable, match=r"\(404\).*APIService v1alpha1.logs.vmfleet.io"):
            [r async for r in read_records(c, "ops", "c")]
        with pytest.raises(OutputUnavailable, match=r"\(503\).*keeps no output"):  # for good
            [r async for r in read_records(c, "ops", "c")]
        with pytest.raises(ApiException) as busy:
            [r async for r in read_records(c, "ops", "c")]
    assert busy.value.status == 503


class Shown:
    """The task log as a list, with the moment each line was logged."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.times: list[float] = []

    def __call__(self, line: str) -> None:
        self.lines.append(line)
        self.times.append(time.monotonic())


def _follower(api: FakeLogApi, c: client.ApiClient, emit, **kwargs) -> OutputFollower:
    kwargs.setdefault("checkpoint_seconds", 0.2)
    kwargs.setdefault("backoff", 0.05)
    return OutputFollower(lambda after: read_records(c, "ops", "c", after),
                          AnnotationStore(c, "ops", "c"), emit, describe="ops/c", **kwargs)


async def _printing(api: FakeLogApi, count: int, every: float, vm: str = "vm1", start: int = 1) -> None:
    for i in range(start, start + count):
        api.print_lines(vm, f"line {i}\n")
        await asyncio.sleep(every)


async def test_lines_are_shown_while_the_command_runs_and_a_dropped_stream_loses_none(api):
    shown = Shown()
    api.print_lines("vm1", "line 1\n", "line 2\n", "line 3\n")
    api.drop_after = 2  # the first stream is cut after two records, mid-output
    api.fail_next = [503]  # and the API server is busy at first (the position's GET)
    async with _client(api.url) as c:
        follower = asyncio.ensure_future(_follower(api, c, shown).run())
        await asyncio.wait_for(_until(lambda: len(shown.lines) == 3), 5)
        await _printing(api, 3, 0.02, start=4)
        await asyncio.wait_for(_until(lambda: len(shown.lines) == 6), 5)
        assert not follower.done()  # still following: the command has not ended
        api.end()
        assert await asyncio.wait_for(follower, 10) is True
    assert shown.lines == [f"[vm1] line {i}" for i in range(1, 7)]
    # Resumed after the last record received, not from the start.
    assert [r.query.get("after") for r in api.log_requests()] == [None, "c2"]
    assert [r.method for r in api.requests[:2]] == ["GET", "GET"]  # the busy answer retried


async def _until(condition) -> None:
    while not condition():
        await asyncio.sleep(0.01)


async def test_the_position_is_written_before_the_lines_it_covers_and_at_most_every_interval(api):
    shown = Shown()
    async with _client(api.url) as c:
        follower = asyncio.ensure_future(_follower(api, c, shown, checkpoint_seconds=0.3).run())
        await _printing(api, 40, 0.025)  # a line every 25 ms for a second
        api.end()
        assert await asyncio.wait_for(follower, 10) is True
    assert shown.lines == [f"[vm1] line {i}" for i in range(1, 41)]
    times = [t for t, _, _ in api.patches]
    assert {ct for _, _, ct in api.patches} == {"application/merge-patch+json"}
    assert 2 <= len(times) <= 1 + 1.0 / 0.3 + 2  # batched: not one write per line
    assert all(b - a >= 0.29 for a, b in zip(times, times[1:], strict=False))
    # Write-ahead: when line i was logged, a checkpoint covering it had been written.
    for i, at in enumerate(shown.times, start=1):
        covering = [t for t, body, _ in api.patches if t <= at
                    and Position.from_annotation(body["metadata"]["annotations"][ANNOTATION_OUTPUT_POSITION])
                    .upto.get("vm1/1", 0) >= i]
        assert covering, f"line {i} was logged before a checkpoint covered it"
    final = Position.from_annotation(api.annotations[ANNOTATION_OUTPUT_POSITION])
    assert final is not None and final.upto == {"vm1/1": 40}


class Crash(Exception):
    """The triggerer died (SIGKILL): nothing after this point happens."""


@pytest.mark.parametrize("crash_at", [1, 7, 13, 20])
async def test_a_restarted_trigger_loses_no_line_and_marks_every_line_shown_twice(api, crash_at):
    first = Shown()

    def dying(line: str) -> None:
        if len(first.lines) == crash_at:
            raise Crash
        first(line)

    api.print_lines("vm1", *(f"a{i}\n" for i in range(1, 16)))
    api.print_lines("vm2", *(f"b{i}\n" for i in range(1, 11)), stream="stderr")
    async with _client(api.url) as c:
        with pytest.raises(Crash):
            await asyncio.wait_for(_follower(api, c, dying).run(), 10)
        at_crash = Position.from_annotation(api.annotations[ANNOTATION_OUTPUT_POSITION])
        assert at_crash is not None
        second = Shown()
        api.print_lines("vm1", "a16\n")
        api.end()
        assert await asyncio.wait_for(_follower(api, c, second).run(), 10) is True

    everything = [f"[vm1] a{i}" for i in range(1, 17)] + [f"[vm2 stderr] b{i}" for i in range(1, 11)]
    again = [line.replace("(repeat) ", "") for line in second.lines]
    # No line lost: each one is in the task log; the second trigger shows each VM's lines
    # in order, from where the first one surely got to.
    assert set(first.lines) | set(again) == set(everything)
    assert len(again) == len(set(again))
    for prefix in ("[vm1] a", "[vm2 stderr] b"):
        mine, theirs = [x for x in again if x.startswith(prefix)], [x for x in everything if x.startswith(prefix)]
        assert mine == theirs[len(theirs) - len(mine):]
    # Every line shown twice is marked the second time; a marked line is one the crashed
    # trigger had shown or was about to (its last checkpoint covered it).
    for line in second.lines:
        if line.replace("(repeat) ", "") in first.lines:
            assert "(repeat) " in line, line
    for line in second.lines:
        if "(repeat) " in line:
            vm, seq = ("vm1", line.split(" a")[-1]) if line.startswith("[vm1]") else ("vm2", line.split(" b")[-1])
            assert int(seq) <= at_crash.upto[f"{vm}/1"], line
    assert any("(repeat)" in x for x in second.lines)  # the crashed batch is shown again


async def test_a_trigger_stopped_gracefully_leaves_a_position_that_repeats_nothing(api, caplog):
    caplog.set_level("INFO", logger="vmfleet.airflow.output")
    first, second = Shown(), Shown()
    async with _client(api.url) as c:
        follower = asyncio.ensure_future(_follower(api, c, first).run())
        await _printing(api, 6, 0.05)
        await asyncio.wait_for(_until(lambda: len(first.lines) == 6), 5)
        follower.cancel()  # the triggerer stops: the trigger is cancelled
        with pytest.raises(asyncio.CancelledError):
            await follower
        await _printing(api, 2, 0.01, start=7)
        api.end()
        assert await asyncio.wait_for(_follower(api, c, second).run(), 10) is True
    assert first.lines == [f"[vm1] line {i}" for i in range(1, 7)]
    assert second.lines == ["[vm1] line 7", "[vm1] line 8"]  # nothing lost, nothing repeated
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("Resuming")] == [
        "Resuming the output of RemoteCommand ops/c in the task log where an earlier trigger left it"]


async def test_refused_position_writes_stop_the_output_with_what_to_grant(api):
    api.print_lines("vm1", "one\n")
    api.fail_next = [403]  # the position GET
    async with _client(api.url) as c:
        with pytest.raises(OutputUnavailable, match="needs get and patch on remotecommands"):
            await _follower(api, c, Shown()).run()


async def test_a_slow_task_log_holds_the_reader_back_instead_of_buffering():
    produced = []

    async def source(after: str | None) -> AsyncIterator[LogRecord]:
        for i in range(1, 201):
            produced.append(i)
            yield rec("vm1", i, "x" * 1000 + "\n")

    class Store:
        async def load(self):
            return None

        async def save(self, position):
            pass

    shown = Shown()
    follower = OutputFollower(source, Store(), shown, describe="ops/c", checkpoint_seconds=0.1,
                              max_pending_bytes=10_000)
    task = asyncio.ensure_future(follower.run())
    await asyncio.sleep(0.25)
    assert len(produced) - follower.shown <= 11  # at most max_pending_bytes waiting
    assert await asyncio.wait_for(task, 10) is True
    assert len(shown.lines) == 200


# ------------------------------------------------------------------------------ trigger

class _Watch:
    """The shared watch, answering when the test says the command finished."""

    def __init__(self) -> None:
        self.done = asyncio.Event()
        self.status = {"phase": "Succeeded", "results": [
            {"vm": "vm1", "phase": "Succeeded", "exitCode": 0, "stdout": "line 1\nline 2\n"}]}

    async def wait(self, name, alone):
        await self.done.wait()
        return Outcome(FINISHED, {"status": self.status})


def _kubeconfig(path: Path, url: str) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": url}}],
        "users": [{"name": "u", "user": {"token": "secret-token"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "u"}}],
    }))
    return path


def _messages(logs: list[dict], level: str | None = None) -> list[str]:
    """What Airflow's structlog loggers logged (the task log's lines), formatted."""
    return [e["event"] % tuple(e.get("positional_args", ())) for e in logs
            if level is None or e.get("log_level") == level]


async def _run_trigger(trigger: RemoteCommandTrigger, watch: _Watch, api: FakeLogApi, monkeypatch):
    monkeypatch.setattr(triggers_module, "shared_watch", lambda *a, **k: watch)
    events = trigger.run()
    first = asyncio.ensure_future(events.__anext__())
    return first, events


async def test_the_trigger_shows_the_lines_in_its_log_while_it_waits(api, tmp_path, monkeypatch):
    watch = _Watch()
    trigger = RemoteCommandTrigger(name="c", namespace="ops", in_cluster=False,
                                   config_file=str(_kubeconfig(tmp_path / "kc", api.url)),
                                   stream_output=True, output_checkpoint_seconds=0.2)
    with structlog.testing.capture_logs() as logs:
        first, events = await _run_trigger(trigger, watch, api, monkeypatch)
        api.print_lines("vm1", "line 1\n")
        api.print_lines("vm1", "failing\n", stream="stderr")

        def logged() -> list[str]:
            return [m for m in _messages(logs) if m.startswith("[vm1")]

        await asyncio.wait_for(_until(lambda: len(logged()) == 2), 5)
        assert not first.done()  # shown while the task waits
        api.print_lines("vm1", "line 2\n")
        api.end()
        watch.done.set()
        event = await asyncio.wait_for(first, 20)
        await events.aclose()
    assert logged() == ["[vm1] line 1", "[vm1 stderr] failing", "[vm1] line 2"]
    assert event.payload["output_streamed"] is True and event.payload["phase"] == "Succeeded"
    # The lines of the trigger's last seconds travel with the event (the triggerer may
    # not have written them to the task's log before it heard that the trigger ended).
    assert event.payload["output_last_lines"] == ["[vm1] line 1", "[vm1 stderr] failing", "[vm1] line 2"]

    # The task then logs those again, marked, and each VM's outcome; not the tails.
    op = RemoteCommandOperator(task_id="t", vm="vm1", command="x")
    with structlog.testing.capture_logs() as logs:
        op.execute_complete({}, event.payload)
    assert _messages(logs)[:5] == [
        "The output's last lines again (the triggerer may not have written them to this log "
        "before the task resumed):",
        "[vm1] (repeat) line 1", "[vm1 stderr] (repeat) failing", "[vm1] (repeat) line 2",
        "The output is above, shown while the task was deferred"]
    text = "\n".join(_messages(logs))
    assert "vm1 (?): Succeeded, exit code 0" in text
    assert "vm1 stdout:" not in text


async def test_without_stream_output_the_trigger_opens_no_stream_and_the_task_logs_the_tails(
        api, tmp_path, monkeypatch):
    watch = _Watch()
    trigger = RemoteCommandTrigger(name="c", namespace="ops", in_cluster=False,
                                   config_file=str(_kubeconfig(tmp_path / "kc", api.url)))
    first, events = await _run_trigger(trigger, watch, api, monkeypatch)
    api.print_lines("vm1", "line 1\n")
    await asyncio.sleep(0.3)
    watch.done.set()
    event = await asyncio.wait_for(first, 5)
    await events.aclose()
    assert api.requests == [] and event.payload["output_streamed"] is False
    op = RemoteCommandOperator(task_id="t", vm="vm1", command="x", stream_output=False)
    with structlog.testing.capture_logs() as logs:
        op.execute_complete({}, event.payload)
    assert "vm1 stdout:\nline 1\nline 2" in "\n".join(_messages(logs))


async def test_an_output_api_that_is_not_served_leaves_the_task_as_it_was(
        api, tmp_path, monkeypatch):
    api.log_status = 404
    watch = _Watch()
    trigger = RemoteCommandTrigger(name="c", namespace="ops", in_cluster=False,
                                   config_file=str(_kubeconfig(tmp_path / "kc", api.url)),
                                   stream_output=True)
    with structlog.testing.capture_logs() as logs:
        first, events = await _run_trigger(trigger, watch, api, monkeypatch)
        await asyncio.wait_for(_until(lambda: api.log_requests()), 5)
        watch.done.set()
        event = await asyncio.wait_for(first, 20)
        await events.aclose()
    assert event.payload["output_streamed"] is False  # the task logs the tails instead
    # Said once, not as a warning: a cluster without the output API is no error of the task.
    said = _messages(logs, "info")
    assert any("Not showing the output in the task log: Cannot read the output of RemoteCommand "
               "ops/c (404)" in m for m in said), said
    assert _messages(logs, "warning") == []
    assert len(api.log_requests()) == 1  # not retried: retrying cannot change a 404


async def test_output_that_does_not_end_in_time_is_cut_and_the_task_logs_the_tails_said_again(
        api, tmp_path, monkeypatch):
    monkeypatch.setattr(triggers_module, "OUTPUT_DRAIN_SECONDS", 0.3)
    watch = _Watch()
    trigger = RemoteCommandTrigger(name="c", namespace="ops", in_cluster=False,
                                   config_file=str(_kubeconfig(tmp_path / "kc", api.url)),
                                   stream_output=True, output_checkpoint_seconds=0.1)
    with structlog.testing.capture_logs() as logs:
        first, events = await _run_trigger(trigger, watch, api, monkeypatch)
        api.print_lines("vm1", "line 1\n")
        await asyncio.wait_for(_until(lambda: "[vm1] line 1" in _messages(logs)), 5)
        watch.done.set()  # finished, but the server never ends the stream
        event = await asyncio.wait_for(first, 10)
        api.print_lines("vm1", "line 2\n")
        await asyncio.sleep(0.5)
        await events.aclose()
    assert "[vm1] line 2" not in _messages(logs)  # nothing shown after the event
    assert event.payload["output_streamed"] is False and event.payload["output_shown"] == 1
    assert any("did not end within 0 s of the command" in m for m in _messages(logs, "warning"))

    op = RemoteCommandOperator(task_id="t", vm="vm1", command="x")
    with structlog.testing.capture_logs() as logs:
        op.execute_complete({}, event.payload)
    assert ("vm1 stdout (again: part of it is above, shown while the task was deferred):\n"
            "line 1\nline 2") in "\n".join(_messages(logs))
