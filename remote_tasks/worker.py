"""The worker's command: ``python -m remote_tasks.worker -Q <queues> [options]``.

It starts the same Celery worker as ``celery -A remote_tasks worker --pool threads``
(``app.Worker(...).start()``, what Celery's ``worker`` command calls), without Celery's
command line: click, click-repl, prompt_toolkit and pygments (~8.5 MiB of a worker's
resident memory) are never imported. Both runtimes start workers with it
(``controller.runtime.worker_argv``).

The options are the ones of ``celery worker`` the runtimes pass; nothing else is accepted.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

POOL = "threads"  # the only pool: tasks share the executor's SSH connections


def parser() -> argparse.ArgumentParser:
    found = argparse.ArgumentParser(
        prog="python -m remote_tasks.worker",
        description="A vmfleet worker: Celery's worker with the thread pool, on the given queues.")
    found.add_argument("-Q", "--queues", required=True,
                       help="the queues to consume, comma-separated")
    found.add_argument("-P", "--pool", default=POOL, choices=[POOL])
    found.add_argument("-c", "--concurrency", type=int, default=8,
                       help="threads: attempts run at once (default 8)")
    found.add_argument("-n", "--hostname", default=None,
                       help="the node name (%%h: the host name), as with celery worker")
    found.add_argument("-l", "--loglevel", default="INFO",
                       choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
                       type=str.upper)
    found.add_argument("--without-gossip", action="store_true")
    found.add_argument("--without-mingle", action="store_true")
    found.add_argument("--without-heartbeat", action="store_true",
                       help="no worker-heartbeat event every 2 s (events are off anyway)")
    return found


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.concurrency < 1:
        parser().error("--concurrency must be at least 1")
    queues = [q for q in args.queues.split(",") if q]
    if not queues:
        parser().error("-Q names no queue")
    # Imported here: `--help` and a usage error cost no Celery.
    from celery.utils.nodenames import default_nodename, host_format

    from .app import app  # the package registered the tasks (remote_tasks/__init__.py)

    worker = app.Worker(
        hostname=host_format(default_nodename(args.hostname)),
        pool_cls=args.pool,
        concurrency=args.concurrency,
        queues=queues,
        loglevel=logging.getLevelName(args.loglevel),
        logfile=None, pidfile=None, statedb=None,
        without_gossip=args.without_gossip,
        without_mingle=args.without_mingle,
        without_heartbeat=args.without_heartbeat,
    )
    worker.start()
    return int(worker.exitcode or 0)


if __name__ == "__main__":
    sys.exit(main())
