"""Memory: resident memory of the workers and the receiver after 10,000 and after 100,000 refunds.

    .venv/bin/python bench/memory_bench.py                          # 10,000 then 100,000 refunds: ~10+ minutes
    .venv/bin/python bench/memory_bench.py --refunds 30000          # checkpoints at 10,000 and 30,000
    .venv/bin/python bench/memory_bench.py --smoke                  # 500 then 1,500 (CI smoke test)

What runs: the sandbox gateway (no faults), the receiver, the scheduler and ``dramatiq workers``
(2x8 by default), as in the Procfile. Refunds are accepted with ``producers.enqueue_refund``
in batches of ``--batch`` (a backlog that the workers drain), spread over 10 merchants, and
settle by notification. After ``--first`` (10,000) refunds are final, and again after
``--refunds`` (100,000): the RSS (and PSS, which splits the pages forked processes share)
of each service's whole process tree from /proc, in a quiet moment (every refund final,
then ``--settle`` seconds). The figure: growth of the worker and of the receiver between the
two checkpoints (goal: under 10%). The sandbox keeps every refund it executed in memory (it
stands in for PagoEfectivo's own database) so it grows by design; it is shown, not judged.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness as h

HIGH_LIMIT = 100_000
JUDGED = ("worker", "receiver")


def run(args) -> dict:
    merchants = [f"mem-{i:02d}" for i in range(10)]
    with h.seeded_environment("memory", args, {m: HIGH_LIMIT for m in merchants}, checkpoints=[],
                              series=[]) as (env, figures):
        requests = h.spread(merchants, args.refunds, "MEM")
        h.log(f"seeding {args.refunds} refunds' payments")
        asyncio.run(h.seed_payments(env, requests))
        sandbox = ("--sync-status-mix", args.status_mix)
        with h.system_for(env, args, sandbox) as system:
            figures["start"] = {"refunds": 0, "memory": system.memory()}
            done = 0
            started = time.time()
            for checkpoint in sorted({min(args.first, args.refunds), args.refunds}):
                while done < checkpoint:
                    batch = requests[done:min(checkpoint, done + args.batch)]
                    asyncio.run(h.enqueue_direct(batch))
                    done += len(batch)
                    asyncio.run(h.wait_final(done, timeout=args.timeout, system=system))
                    memory = system.memory()
                    figures["series"].append({"refunds": done, **{k: memory[k]["rss"] for k in JUDGED}})
                    h.log(f"  {done} refunds final ({done / (time.time() - started):.0f}/s so far); "
                          + ", ".join(f"{k} {h.mb(memory[k]['rss'])}" for k in JUDGED))
                time.sleep(args.settle)
                memory = system.memory()
                figures["checkpoints"].append({"refunds": done, "memory": memory, "at_s": time.time() - started})
                h.log(f"checkpoint {done}: " + ", ".join(f"{k} {h.mb(v['rss'])}" for k, v in memory.items()))
            counts = asyncio.run(h.state_counts())
            figures["ledger"] = h.check_ledger(system, counts)
            figures["states"] = counts
    first, last = figures["checkpoints"][0], figures["checkpoints"][-1]
    figures["growth"] = {
        kind: {"rss": last["memory"][kind]["rss"] / first["memory"][kind]["rss"] - 1,
               "pss": last["memory"][kind]["pss"] / max(1, first["memory"][kind]["pss"]) - 1}
        for kind in first["memory"] if kind in last["memory"] and first["memory"][kind]["rss"]
    }
    return figures


def report(f: dict) -> None:
    a = f["args"]
    h.print_report_header(f)
    print(f"workers {a['processes']}x{a['threads']}; batches of {a['batch']}; states {f['states']}; ledger {f['ledger']}")
    points = [f["start"]] + f["checkpoints"]
    kinds = [k for k in f["checkpoints"][-1]["memory"]]
    print(f"{'RSS (PSS) MB':>14} " + " ".join(f"{k:>19}" for k in kinds))
    for point in points:
        label = "at start" if point["refunds"] == 0 else f"after {point['refunds']:,}"
        print(f"{label:>14} " + " ".join(
            f"{point['memory'][k]['rss'] / 2**20:>9.1f} ({point['memory'][k]['pss'] / 2**20:>6.1f})"
            if k in point["memory"] else f"{'-':>19}" for k in kinds))
    print(f"{'processes':>14} " + " ".join(f"{f['checkpoints'][-1]['memory'][k]['processes']:>19}" for k in kinds))
    step = max(1, len(f["series"]) // 10)
    for kind in JUDGED:  # after every batch (not in a quiet moment): is it levelling off?
        print(f"{kind} RSS MB after each batch: " + " ".join(
            f"{p['refunds']:,}:{p[kind] / 2**20:.1f}" for p in f["series"][::step]))
    first, last = f["checkpoints"][0]["refunds"], f["checkpoints"][-1]["refunds"]
    for kind in JUDGED:
        g = f["growth"][kind]
        print(f"RESULT {kind} RSS growth from {first:,} to {last:,} refunds: {100 * g['rss']:+.1f}% "
              f"(PSS {100 * g['pss']:+.1f}%) (goal < 10%)")
    others = ", ".join(f"{k} {100 * g['rss']:+.1f}%" for k, g in f["growth"].items() if k not in JUDGED)
    print(f"others (not judged): {others}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--refunds", "--size", dest="refunds", type=int, default=100_000,
                        help="refunds at the second checkpoint")
    parser.add_argument("--first", type=int, default=10_000, help="refunds at the first checkpoint")
    parser.add_argument("--batch", type=int, default=5_000, help="refunds accepted at once (then drained)")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds of quiet before reading memory")
    parser.add_argument("--status-mix", default='{"pending": 1}')
    parser.add_argument("--timeout", type=float, default=3600, help="seconds to wait for a batch to be final")
    parser.add_argument("--smoke", action="store_true", help="checkpoints at 500 and 1,500 refunds (CI)")
    h.add_common_options(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        args.first, args.refunds, args.batch, args.settle = 500, 1500, 500, 1.0
    if args.refunds < args.first:
        parser.error("--refunds must be at least --first")
    return h.run_and_report(args, run, report)


if __name__ == "__main__":
    sys.exit(main())
