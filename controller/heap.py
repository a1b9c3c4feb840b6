"""The controller process's heap: few malloc arenas, free memory given back, old objects
frozen.

The controller runs many threads (kopf's handler pool, the fleet's tick pool, the
command watch, the status writer, the run records). glibc gives each thread that
contends for the heap an arena of its own (up to 8 per core), and the memory freed in
an arena — a page of 500 listed RemoteCommands parsed in the watch thread, a thousand
Deployment apply answers in the tick pool — stays resident there, in holes that only
that arena reuses. So the resident size after the start-up was the sum of every
thread's peak. Here: at most two arenas (``mallopt(M_ARENA_MAX)``, set at import,
before kopf starts its threads), and the free memory of the heap returned to the
system (``malloc_trim(0)``) after start-up and then every ``TRIM_SECONDS``. Neither is
a correctness matter: without glibc (musl, macOS) both are skipped.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import threading

log = logging.getLogger("controller.heap")

M_ARENA_MAX = -8  # glibc's mallopt parameter
ARENAS = 2
TRIM_SECONDS = 30.0


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim, libc.mallopt  # noqa: B018 - glibc only: AttributeError elsewhere
    except (OSError, AttributeError):
        return None
    return libc


LIBC = _libc()


def limit_arenas(arenas: int = ARENAS) -> bool:
    """At most ``arenas`` malloc arenas for the threads started from now on."""
    return LIBC is not None and bool(LIBC.mallopt(M_ARENA_MAX, arenas))


def trim() -> bool:
    """Give the heap's free memory back to the system; True when some was."""
    return LIBC is not None and bool(LIBC.malloc_trim(0))


def freeze() -> None:
    """Collect once, then move every object alive into the collector's permanent
    generation: the start's objects (modules, caches) are never scanned again, so a full
    collection walks only what was made since (short, and rare). Then trim."""
    gc.collect()
    gc.freeze()
    trim()


def start_trimming(stop: threading.Event, every: float = TRIM_SECONDS) -> threading.Thread:
    """A daemon thread that trims the heap every ``every`` seconds until ``stop``."""

    def run() -> None:
        while not stop.wait(every):
            trim()

    thread = threading.Thread(target=run, daemon=True, name="vmfleet-heap-trim")
    thread.start()
    return thread


__all__ = ["ARENAS", "TRIM_SECONDS", "freeze", "limit_arenas", "start_trimming", "trim"]
