"""Idle cost: the CPU that worker processes with nothing to do take, against dramatiq's own.

    .venv/bin/python bench/idle_bench.py                  # 30 s each, workers 2x8, ~1.5 minutes
    .venv/bin/python bench/idle_bench.py --smoke          # 3 s each (CI smoke test)

The refund workers' consumers poll Redis at least every 100 ms (``workers.broker.POLL_MS``:
a refund released from the delay queue at its rate-limit slot waits for the next poll),
where dramatiq's own back off to its 1 s worker timeout. This measures what that costs when
there is no work: ``dramatiq workers`` and, as the baseline in the same run, dramatiq's
plain no-op worker (``bench.noop_actor``, default broker and middleware), each with the same
processes and threads on the same Redis, idle for ``--seconds`` after a warm-up. Printed:
the share of one core each takes (utime + stime of the whole process tree, from /proc).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness as h
from refundctl.processes import ServiceGroup

WARM_UP_S = 5.0


def idle_share(group: ServiceGroup, name: str, command: tuple[str, ...], args) -> float:
    """Share of one core that ``command`` takes while idle."""
    service = group.start(name, *command, "--processes", str(args.processes), "--threads", str(args.threads))
    time.sleep(WARM_UP_S)
    group.check_alive()
    cpu, started = h.tree_cpu(service.process.pid), time.monotonic()
    time.sleep(args.seconds)
    group.check_alive()
    return (h.tree_cpu(service.process.pid) - cpu) / (time.monotonic() - started)


def run(args) -> dict:
    with h.seeded_environment("idle", args, {}) as (env, figures):
        group = ServiceGroup(env={**os.environ, "METRICS_PORT": "0"}, log_dir=env.work)
        try:
            figures["workers"] = idle_share(group, "worker", h.worker_command(args), args)
            figures["noop"] = idle_share(group, "noop", ("-m", "dramatiq", "bench.noop_actor", "--path",
                                                         str(h.ROOT)), args)
        finally:
            group.stop()
    return figures


def report(f: dict) -> None:
    a = f["args"]
    h.print_report_header(f)
    print(f"idle for {a['seconds']:g} s, {a['processes']}x{a['threads']}: refund workers {100 * f['workers']:.2f}% "
          f"of a core, dramatiq's no-op worker {100 * f['noop']:.2f}%")
    print(f"RESULT idle refund workers take {100 * f['workers']:.2f}% of a core "
          f"({100 * (f['workers'] - f['noop']):+.2f} points against dramatiq's own idle worker)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="idle seconds measured for each")
    parser.add_argument("--smoke", action="store_true", help="3 s each, for CI")
    h.add_common_options(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        args.seconds = min(args.seconds, 3.0)
    return h.run_and_report(args, run, report)


if __name__ == "__main__":
    sys.exit(main())
