"""controller.heap: memory freed by the controller's threads goes back to the system."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from controller import heap

REPO = Path(__file__).resolve().parents[2]

SCRIPT = """
import threading
from controller import heap

def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS'):
            return int(line.split()[1]) / 1024

heap.limit_arenas()
keep = []

def work():  # a page of parsed objects, a few of which outlive it (as a cache keeps some)
    junk = [bytes(1000 + i % 7) for i in range(100_000)]
    keep.extend(junk[::50])
    del junk

threads = [threading.Thread(target=work) for _ in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
before = rss()
heap.trim()
print(before, rss())
"""


@pytest.mark.skipif(heap.LIBC is None or not Path("/proc/self/status").exists(),
                    reason="glibc and /proc only")
def test_memory_freed_in_threads_is_resident_until_the_heap_is_trimmed() -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    before, after = map(float, out.stdout.split())
    assert before - after > 200, (before, after)  # ~400 MiB freed, ~10 kept
