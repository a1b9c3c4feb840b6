"""Signing and verifying one command's message: CPU per command (issue 22: ≤ 0.2 ms).

No servers: the controller's half (``Signer.sign``: canonical JSON of the whole message,
Ed25519) and the worker's (``Guard.open`` + ``check_envelope``: canonical JSON again,
the signature, the expiry, the served set) on the envelope of a typical command (a
shell line, a pinned host key, the dispatch fields), timed with the process's CPU clock
over many messages per round. ``python -m bench.scenarios.signing`` prints the table
alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from bench.harness import Bench
from remote_tasks.guard import Guard
from vmfleet.api.constants import TASK_EXECUTE
from vmfleet.api.envelope import Envelope, Target
from vmfleet.api.served import Served
from vmfleet.api.signing import Signer, Verifier, generate_private_key

SCENARIOS = ("signing",)
HOST_KEY = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl "
            "vm1")


def envelope() -> dict[str, Any]:
    target = Target("vm1", "10.0.0.1", 22, "ops", "vm1-ssh", host_keys=(HOST_KEY,),
                    max_concurrent=4)
    spec = {"vm": "vm1", "command": "systemctl restart nginx && curl -fsS localhost/health",
            "timeoutSeconds": 60, "output": {"maxBytes": 262144}, "retries": 2}
    return Envelope(namespace="team-a", name="restart-nginx-7", uid="0b6f6c1e-8d7e-4bd1-9a9b",
                    vm="vm1", attempt=1, dispatch_time="2026-12-06T21:00:00.000000Z", spec=spec,
                    target=target, command_start="2026-12-06T21:00:00.000000Z",
                    scope="fleet.rel-vmfleet").to_message()


def cpu_ms_per(op: Callable[[], Any], n: int) -> float:
    start = time.process_time()
    for _ in range(n):
        op()
    return (time.process_time() - start) * 1000 / n


def measure(rounds: int, n: int) -> dict[str, list[float]]:
    key = generate_private_key()
    signer = Signer(key, 360)
    guard = Guard(Verifier(key.public_key()), Served.of("team-a", [("vm1", "vm1-ssh")]))
    body = envelope()
    message = signer.sign(TASK_EXECUTE, body)

    def verify() -> None:
        guard.check_envelope(TASK_EXECUTE, Envelope.from_message(guard.open(message, TASK_EXECUTE)))

    out: dict[str, list[float]] = {"sign": [], "verify": [], "both": []}
    for _ in range(rounds):
        sign_ms = cpu_ms_per(lambda: signer.sign(TASK_EXECUTE, body), n)
        verify_ms = cpu_ms_per(verify, n)
        out["sign"].append(sign_ms)
        out["verify"].append(verify_ms)
        out["both"].append(sign_ms + verify_ms)
    return out


def run(bench: Bench, wanted: list[str]) -> None:
    rounds, n = bench.rounds(7, 3), 2000 if not bench.quick else 500
    got = measure(rounds, n)
    bench.record("signing", "vmfleet_controller", "cpu_ms", got["sign"],
                 note=f"Signer.sign of a command's envelope, {n} per round")
    bench.record("signing", "vmfleet_worker", "cpu_ms", got["verify"],
                 note="verify + expiry + served set (Guard), per message")
    bench.record("signing", "vmfleet", "cpu_ms", got["both"],
                 note="signing plus verifying, per command (target ≤ 0.2 ms)")


if __name__ == "__main__":
    results = measure(5, 2000)
    print("| signing, CPU per command | median ms | max ms |")
    print("|---|---|---|")
    for name, values in results.items():
        ordered = sorted(values)
        print(f"| {name} | {ordered[len(ordered) // 2]:.4f} | {ordered[-1]:.4f} |")
