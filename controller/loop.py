"""The controller's threads: the reports reader, the status writer and the loop.

- ``ReportReader`` reads the workers' reports (``vmfleet.state``), first those a previous
  controller read but never acknowledged, and folds them into ``Commands`` (or hands
  probe reports to the fleet). Reports that change nothing are acknowledged at once.
- ``Writer`` writes each command whose copy is due (``Tracked.due``), several at once,
  one patch per command carrying everything that arrived for it; only then are the
  reports it carries acknowledged. A command written in an end state is let go.
- ``Loop`` ticks once a second over the controller's own caches: commands (retries,
  deadlines, lost workers, TTLs) and the fleet (scaling, probes, conditions). There is
  no kopf timer per object.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from vmfleet import metrics
from vmfleet.api import constants as c
from vmfleet.api.reports import AttemptReport, ProbeReport, UnsupportedReport, read_report
from vmfleet.api.times import now_rfc3339
from vmfleet.kube import ApiException, Kube
from vmfleet.state import State

from .audit import Pending, RunRecords, layout_of
from .commands import Commands
from .status import UnknownField, internal_error_status, status_patch
from .tracked import Tracked

log = logging.getLogger("controller.loop")

#: A command with this many targets or more is a big fan-out: its writes before the end
#: are spaced (``Writer.spacing`` times its last write's duration apart).
SPACED_TARGETS = 50


class Writer:
    """Writes due commands' status; the only code that writes RemoteCommand status."""

    def __init__(self, kube: Kube, state: State, commands: Commands, threads: int = 8,
                 gate: Callable[[], bool] = lambda: True, spacing: float = 2.0) -> None:
        self.kube = kube
        self.gate = gate  # leading: only the Lease holder writes
        self.state = state
        self.commands = commands
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="vmfleet-write")
        self.writes = 0
        # Each status write of a big fan-out costs the API server the whole object (every
        # result entry decoded, validated, stored, sent to each watch): on a busy one a
        # 200-result write took seconds, and its claims and results, due a tenth of a
        # second apart, kept a write in flight, so the write that ends it waited for it.
        # Until it ends, such a command is written again no sooner than ``spacing`` times
        # its last write's duration after that write (uid: when).
        self.spacing = spacing
        self.spaced: dict[str, float] = {}

    def due(self, now: float) -> tuple[list[Tracked], float | None]:
        """Commands due now, and when the next one is."""
        ready, soonest = [], None
        seen: set[str] = set()
        for tracked in self.commands.tracked():
            seen.add(tracked.uid)
            due = tracked.due
            if due is None:
                continue
            held = self.spaced.get(tracked.uid)
            if held is not None and due < held and not tracked.finished:
                due = held
            if due <= now:
                ready.append(tracked)
            elif soonest is None or due < soonest:
                soonest = due
        for uid in self.spaced.keys() - seen:  # deleted meanwhile: let them go
            self.spaced.pop(uid, None)
        return ready, soonest

    def flush(self, now: float | None = None) -> float | None:
        """Write every due command (in parallel); returns when the next is due."""
        ready, soonest = self.due(time.monotonic() if now is None else now)
        if ready:
            list(self.pool.map(self.write, ready))
        return soonest

    def write(self, tracked: Tracked) -> None:
        with tracked.lock:
            desired = copy.deepcopy(tracked.status)
            acks = list(tracked.acks)
            records = list(tracked.records)
            tracked.due = None
            try:
                patch = status_patch(tracked.written, desired)
            except (UnknownField, ValueError) as exc:  # pydantic's ValidationError is one
                self.refused(tracked, exc)
                return
        if patch is not None and not self.gate():
            with tracked.lock:
                tracked.want(1.0)  # not leading (any more): the next leader writes it
            return
        if patch is not None:
            try:
                started = time.monotonic()
                self.kube.patch_command_status(tracked.namespace, tracked.name, patch)
                self.writes += 1
                self._space(tracked, desired, started)
            except ApiException as exc:
                if exc.status == 404:
                    self.commands.deleted({"metadata": {"uid": tracked.uid}})
                    self.state.ack(self._recorded(tracked, None, records, acks))
                    return
                tracked.failures += 1
                delay = min(0.2 * 2 ** tracked.failures, 10.0)
                log.warning("Writing the status of RemoteCommand %s failed (%s %s); trying again "
                            "in %.1fs", tracked.ref, exc.status, exc.reason, delay)
                metrics.RECONCILE_ERRORS.labels(c.COMMAND_KIND).inc()
                with tracked.lock:
                    tracked.want(delay)
                    if exc.status == 422:
                        tracked.written = None  # write it whole next time
                return
            except Exception as exc:  # noqa: BLE001 - the API server is away: try again
                tracked.failures += 1
                log.warning("Writing the status of RemoteCommand %s failed: %s", tracked.ref, exc)
                with tracked.lock:
                    tracked.want(min(0.2 * 2 ** tracked.failures, 10.0))
                return
        with tracked.lock:
            tracked.failures = 0
            tracked.written = desired
            tracked.acks = tracked.acks[len(acks):]
            tracked.records = tracked.records[len(records):]
            done = tracked.status == desired and tracked.finished and not tracked.acks \
                and not tracked.records
        acks = self._recorded(tracked, layout_of(desired), records, acks)
        try:
            self.state.ack(acks)
        except Exception as exc:  # noqa: BLE001 - redelivered later and applied as a no-op
            log.warning("Could not acknowledge %s reports: %s", len(acks), exc)
        if done:
            self.spaced.pop(tracked.uid, None)
            self.commands.forget(tracked)
            log.info("RemoteCommand %s %s (%s)", tracked.ref, desired.get("phase"),
                     desired.get("completions"))

    def _space(self, tracked: Tracked, written: dict[str, Any], started: float) -> None:
        """After a write of a big fan-out that did not end it: when the next may go."""
        if len(written.get("results") or []) < SPACED_TARGETS or written.get("phase") in c.Phase.TERMINAL:
            self.spaced.pop(tracked.uid, None)
            return
        ended = time.monotonic()
        self.spaced[tracked.uid] = ended + self.spacing * (ended - started)

    def _recorded(self, tracked: Tracked, layout: tuple[tuple[str, str, int], ...] | None,
                  records: list[Pending], acks: list[str]) -> list[str]:
        """Hand the attempts whose end just landed to the run records (never waited on);
        returns the reports to acknowledge now: not those, which are acknowledged once
        their Event is written."""
        runs: RunRecords | None = self.commands.records
        if runs is None:
            return acks
        runs.submit(tracked.uid, layout, records)
        held = {rid for pending in records for rid in pending.report_ids}
        return [a for a in acks if a not in held]

    def refused(self, tracked: Tracked, exc: ValueError) -> None:
        """The wanted status failed validation (a bug): never treated as written. The
        command ends ``Failed``, reason ``InternalError``, its remote processes are
        cancelled, and that status is written next; the reports it carries are
        acknowledged only once it landed. Called with ``tracked.lock`` held."""
        metrics.STATUS_WRITE_ERRORS.labels(c.COMMAND_KIND).inc()
        tracked.refusals += 1
        detail = str(exc).replace("\n", " ")[:600]
        if tracked.refusals > 2:
            # Not even the failure could be written: drop it rather than retry for ever.
            log.error("Giving up on the status of RemoteCommand %s: %s", tracked.ref, detail)
            acks, tracked.acks = tracked.acks, []
            self.state.ack(acks)
            self.commands.forget(tracked)
            return
        running = any(e.get("phase") not in c.Phase.TERMINAL
                      for e in tracked.status.get("results") or [])
        message = f"the controller could not write this command's status: {detail}"
        tracked.status = internal_error_status(tracked.status, message, now_rfc3339(),
                                               bare=tracked.refusals > 1)
        tracked.written = None  # written whole
        tracked.want(0.0)
        log.error("RemoteCommand %s failed (%s): %s", tracked.ref, c.Reason.INTERNAL_ERROR, message)
        if running:
            self.state.cancel(tracked.uid, tracked.namespace)  # its remote processes are killed

    def close(self) -> None:
        self.pool.shutdown(wait=True)


class ReportReader:
    """Reads the reports stream and applies each report."""

    def __init__(self, state: State, commands: Commands, consumer: str,
                 on_probe: Callable[[ProbeReport], bool]) -> None:
        self.state = state
        self.commands = commands
        self.consumer = consumer
        self.on_probe = on_probe
        self.probes = ThreadPoolExecutor(max_workers=4, thread_name_prefix="vmfleet-probe")

    def apply(self, report_id: str, body: dict[str, Any]) -> None:
        """Read one stream entry through the report contract (``vmfleet.api.reports``); one
        it cannot read is logged, counted and acknowledged (dropped)."""
        try:
            report = read_report(body)
        except UnsupportedReport as exc:
            metrics.REPORTS_DROPPED.labels(exc.reason).inc()
            log.error("Dropped report %s (%s): %s", report_id, exc.reason, exc)
            self.state.ack([report_id])
            return
        if isinstance(report, AttemptReport):
            obj = {"metadata": {"namespace": report.namespace, "name": report.name,
                                "uid": report.uid}}
            applied = False
            # A report that cannot be applied is recorded on its command and acknowledged:
            # read again and again, it would hold up every other command's reports.
            with self.commands.recorder.guard(c.COMMAND_KIND, obj, "apply a worker's report"):
                applied = self.commands.apply(report, report_id)
            if applied:
                return  # acknowledged with its write
        else:
            # Written beside the reader: command results must not queue behind VM writes.
            self.probes.submit(self._probe, report_id, report)
            return
        self.state.ack([report_id])

    def _probe(self, report_id: str, report: ProbeReport) -> None:
        try:
            self.on_probe(report)
        except Exception as exc:  # noqa: BLE001 - left pending: a later controller reads it
            log.warning("Could not apply the probe of %s/%s: %s", report.namespace, report.vm, exc)
            return
        try:
            self.state.ack([report_id])
        except Exception as exc:  # noqa: BLE001 - redelivered and written again: harmless
            log.warning("Could not acknowledge a probe report: %s", exc)

    def catch_up(self) -> int:
        """Reports a previous controller read but did not acknowledge."""
        count = 0
        for report in self.state.pending_reports(self.consumer):
            self.apply(report.id, report.body)
            count += 1
        if count:
            log.info("Picked up %s reports a previous controller left unacknowledged", count)
        return count

    def run(self, stop: threading.Event, gate: Callable[[], bool] = lambda: True) -> None:
        """Read until ``stop`` is set or ``gate()`` (leading) no longer holds: a standby
        reads nothing, so the reports stay pending for the leader."""
        if not gate():
            return
        self.state.ensure_group()
        self.catch_up()
        idle_since: float | None = None
        while not stop.is_set() and gate():
            try:
                reports = self.state.read_reports(self.consumer, block_ms=200)
            except Exception as exc:  # noqa: BLE001 - Redis restarting
                log.warning("Reading reports failed: %s; trying again", exc)
                stop.wait(1.0)
                try:
                    self.state.ensure_group()
                    self.catch_up()
                except Exception:  # noqa: BLE001
                    pass
                continue
            for report in reports:
                self.apply(report.id, report.body)
            if reports:
                idle_since = None
                with self.commands.changed:
                    self.commands.changed.notify_all()
            elif idle_since is None:
                idle_since = time.monotonic()


class Loop:
    """The three threads, started and stopped together; each does its work only while
    ``gate()`` (leading) holds."""

    def __init__(self, writer: Writer, reader: ReportReader, ticks: list[Callable[[], None]],
                 tick_seconds: float = 1.0, gate: Callable[[], bool] = lambda: True) -> None:
        self.records = writer.commands.records  # the Events and audit lines of ended attempts
        self.writer = writer
        self.gate = gate
        self.reader = reader
        self.ticks = ticks
        self.tick_seconds = tick_seconds
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        threads = [("vmfleet-reports", self._read), ("vmfleet-writer", self._write),
                   ("vmfleet-loop", self._tick)]
        if self.records is not None:
            threads.append(("vmfleet-records", self._record))
        for name, target in threads:
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self.threads.append(thread)

    def alive(self) -> bool:
        """Started, not stopped, and each of its threads running."""
        return bool(self.threads) and not self.stop.is_set() \
            and all(thread.is_alive() for thread in self.threads)

    def _read(self) -> None:
        while not self.stop.is_set():
            if not self.gate():
                self.stop.wait(0.5)
                continue
            try:
                self.reader.run(self.stop, self.gate)
            except Exception:  # noqa: BLE001
                log.exception("The reports reader failed; starting it again")
                self.stop.wait(1.0)

    def _write(self) -> None:
        changed = self.writer.commands.changed
        while not self.stop.is_set():
            if not self.gate():
                self.stop.wait(0.5)
                continue
            try:
                soonest = self.writer.flush()
            except Exception:  # noqa: BLE001
                log.exception("Writing statuses failed")
                soonest = None
            wait = 0.5 if soonest is None else max(0.0, soonest - time.monotonic())
            if wait > 0:
                with changed:
                    # Looked at again under the lock: a change made (``Tracked.want``, then a
                    # notify) after ``flush`` and before this wait would otherwise be missed
                    # and wait out the timeout — the half-second stall of the latency tail.
                    ready, soonest = self.writer.due(time.monotonic())
                    if not ready:
                        wait = 0.5 if soonest is None else max(0.0, soonest - time.monotonic())
                        changed.wait(min(wait, 0.5))

    def _record(self) -> None:
        assert self.records is not None
        self.records.run(self.stop, self.gate)

    def _tick(self) -> None:
        while not self.stop.wait(self.tick_seconds):
            for tick in self.ticks:
                if not self.gate():
                    break
                try:
                    tick()
                except Exception:  # noqa: BLE001
                    log.exception("The controller loop failed in %s", getattr(tick, "__name__", tick))

    def halt(self) -> None:
        """Stop the threads (no last flush: leadership was lost)."""
        self.stop.set()
        with self.writer.commands.changed:
            self.writer.commands.changed.notify_all()
        for thread in self.threads:
            if thread is not threading.current_thread():
                thread.join(timeout=10)

    def close(self) -> None:
        self.halt()
        try:
            if self.gate():
                self.writer.flush(now=float("inf"))  # what is still owed goes out before we stop
                if self.records is not None:
                    self.records.flush()  # and the Events of what it carried
        finally:
            self.writer.close()


__all__ = ["Loop", "ReportReader", "Writer"]
