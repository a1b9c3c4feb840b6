"""How ``vmfleet exec`` prints results at a terminal: each VM's output once its result is
final (:class:`Printer`), a progress line while a fan-out runs (:class:`Progress`), and
the output as the VMs print it, read from the output API (:class:`LiveOutput`)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, TextIO

from .api.constants import Phase
from .logscli import LinePrinter
from .outcome import failure_message, is_final, truncation_notices, write


def prefix_lines(prefix: str, text: str) -> str:
    """Every line of ``text`` with ``prefix`` in front; the last line always ends in \\n."""
    if not text:
        return ""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return "".join(f"{prefix}{line}\n" for line in lines)


class Progress:
    """One status line on stderr while a fan-out runs; silent when stderr is not a terminal."""

    def __init__(self, stream: TextIO, enabled: bool | None = None) -> None:
        self.stream = stream
        self.enabled = stream.isatty() if enabled is None else enabled
        self.shown = ""

    @staticmethod
    def text(results: Sequence[dict[str, Any]]) -> str:
        total = len(results)
        done = sum(1 for r in results if is_final(r))
        failed = sum(1 for r in results if is_final(r) and r.get("phase") != Phase.SUCCEEDED)
        running = sum(1 for r in results if r.get("phase") == Phase.RUNNING)
        text = f"vmfleet: {done}/{total} done, {failed} failed"
        if running:
            text += f", {running} running"
        return text

    def update(self, results: Sequence[dict[str, Any]]) -> None:
        if not self.enabled or len(results) < 2:
            return
        text = self.text(results)
        if text != self.shown:
            self.stream.write(f"\r\033[K{text}")
            self.stream.flush()
            self.shown = text

    def clear(self) -> None:
        if self.enabled and self.shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self.shown = ""


# --------------------------------------------------------------------------- printing


class Printer:
    """Writes each VM's output once, when its result is final (``live``: the output
    was printed as it came, so only what went wrong)."""

    def __init__(self, out: TextIO, err: TextIO, prefixed: bool, progress: Progress) -> None:
        self.out, self.err = out, err
        self.prefixed = prefixed
        self.progress = progress
        self.printed: set[str] = set()
        self.live = False
        self.live_vms: set[str] = set()  # VMs whose output was printed live
        self.held = False  # the live output may still come: print nothing yet

    def show(self, results: Sequence[dict[str, Any]]) -> None:
        if self.held:
            self.progress.update(results)
            return
        fresh = [r for r in results if is_final(r) and r.get("vm") not in self.printed]
        if fresh:
            self.progress.clear()
        for result in sorted(fresh, key=lambda r: str(r.get("vm"))):
            self.printed.add(str(result.get("vm")))
            self.write(result)
        self.progress.update(results)

    def write(self, result: dict[str, Any]) -> None:
        if self.live and str(result.get("vm")) in self.live_vms:
            message = failure_message(result)
            if message:
                write(self.err, message + "\n")
                self.err.flush()
            return
        stdout, stderr = result.get("stdout") or "", result.get("stderr") or ""
        if self.prefixed:
            prefix = f"[{result.get('vm')}] "
            stdout, stderr = prefix_lines(prefix, stdout), prefix_lines(prefix, stderr)
        write(self.out, stdout)
        self.out.flush()
        write(self.err, stderr)
        for line in truncation_notices(result):
            write(self.err, line + "\n")
        message = failure_message(result)
        if message:
            write(self.err, message + "\n")
        self.err.flush()


class LiveOutput:
    """Prints the command's output as the VMs print it, from the output API
    (:func:`vmfleet.logs.read_log`, followed in a thread of its own). When the API is not
    there (no APIService, a controller keeping no output) the output is printed from
    the status at the end, as before (``failed``)."""

    def __init__(self, kube: Any, namespace: str, name: str, printer: Printer) -> None:
        self.kube, self.namespace, self.name = kube, namespace, name
        self.printer = printer
        self.lines = LinePrinter(printer.out, printer.err, printer.prefixed)
        self.answered = threading.Event()  # the API answered (or refused)
        self.failed = False
        self.error: str | None = None
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="vmfleet-exec-logs",
                                        daemon=True)

    def start(self) -> LiveOutput:
        self.printer.held = True
        self._thread.start()
        return self

    def _follow(self) -> None:
        from .logs import iter_records, open_log

        try:
            raw = open_log(self.kube, self.namespace, self.name, follow=True)
        except Exception as exc:  # noqa: BLE001 - no live output: the tails at the end
            self.failed, self.error = True, str(getattr(exc, "status", exc))
            self.answered.set()
            self.done.set()
            return
        self.answered.set()
        try:
            for record in iter_records(raw):
                self.printer.progress.clear()
                self.lines.write([record])
        except BrokenPipeError:
            self.error = "broken pipe"
        except Exception as exc:  # noqa: BLE001 - the connection broke: the tails at the end
            self.failed, self.error = True, str(exc)
        finally:
            self.done.set()

    def finish(self, wait: float = 30.0) -> bool:
        """Wait for the rest of the output; True when it was all printed live."""
        self.answered.wait(wait)
        self.done.wait(wait)
        self.lines.end()
        live = self.answered.is_set() and self.done.is_set() and not self.failed
        self.printer.held = False
        self.printer.live = live
        # A VM with no live output at all (its worker keeps none): its tails, as before.
        self.printer.live_vms = set(self.lines.printed)
        return live


__all__ = ["LiveOutput", "Printer", "Progress", "prefix_lines"]
