"""Runs N RemoteCommandTriggers in one asyncio loop, as an Airflow triggerer's trigger
runner does (run from .venv-airflow by bench/scenarios/airflow_deferred.py).

    python bench/airflow_trigger_runner.py KUBECONFIG NAMESPACE NAME...

Prints ``IMPORTED`` once Airflow and the trigger are imported (the bench takes the idle
RSS then and answers with a line on stdin), ``SUBSCRIBED`` once every trigger has read its
object, ``EVENT <name> <unix time> <kind>`` per event, then ``STATS <json>`` and exits.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time


async def main(kubeconfig: str, namespace: str, names: list[str]) -> None:
    from vmfleet.airflow import watches
    from vmfleet.airflow.triggers import RemoteCommandTrigger

    async def one(name: str) -> None:
        trigger = RemoteCommandTrigger(name=name, namespace=namespace, config_file=kubeconfig)
        async for event in trigger.run():
            print(f"EVENT {name} {time.time():.6f} {event.payload['event']}", flush=True)

    tasks = [asyncio.create_task(one(n)) for n in names]
    while watches.stats.gets < len(names):
        await asyncio.sleep(0.2)
    print("SUBSCRIBED", flush=True)
    await asyncio.gather(*tasks)
    print("STATS " + json.dumps(watches.stats.__dict__), flush=True)


if __name__ == "__main__":
    import vmfleet.airflow.triggers  # noqa: F401 - the imports a triggerer has loaded

    print("IMPORTED", flush=True)
    sys.stdin.readline()
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3:]))
