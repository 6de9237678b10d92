"""End-to-end throughput: refunds from the intake API to their final state, against dramatiq's own.

    .venv/bin/python bench/e2e_bench.py                    # 20,000 refunds, 2 processes x 8 threads, ~3 minutes
    .venv/bin/python bench/e2e_bench.py --smoke            # 1,000 refunds, < 30 s of measuring (CI smoke test)
    .venv/bin/python bench/e2e_bench.py --refunds 5000 --processes 2 --threads 32 --json out.json
    .venv/bin/python bench/e2e_bench.py --profile DIR      # also py-spy every service (collapsed stacks in DIR)
    .venv/bin/python bench/e2e_bench.py --profile DIR --profile-gil   # only the thread holding the GIL

What runs, every service its own process as in the Procfile, all on loopback: the sandbox
gateway (no faults, no latency, every refund answered ``pending`` so that its final state
arrives by notification; ``--status-mix`` changes that), the receiver, the intake API
(``python -m producers.http``), ``dramatiq workers --processes P --threads T`` and the
scheduler. Merchants have a rate limit far above what the system can reach.

A separate load process POSTs N distinct valid refunds over ``--connections`` keep-alive
connections; the clock runs from its first request until the last of those refunds is final
in Postgres (intake → Postgres → Redis → worker → sandbox → signed notification → receiver →
final state). A warm-up batch goes through first, unmeasured, then ``ANALYZE`` (as autovacuum
would have done on a live system; ``--no-analyze`` measures a brand-new database).

Baseline, in the same run, on the same Redis: ``dramatiq bench.noop_actor`` with the same
processes and threads draining N no-op messages, measured before and after the system (the
mean of the two is the baseline; their spread shows the noise of the machine).

Printed last: refunds/s, no-op messages/s, their ratio (goal ≥ 0.30), CPU seconds per 1,000
refunds of each process kind (the service's whole process tree, from /proc), p50/p99 time to
final state (completed_at - created_at), and a ledger check (each refund executed once).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness as h

HIGH_LIMIT = 100_000  # per second: never reached
OWN_KINDS = ("intake", "worker", "receiver", "scheduler", "postgres", "redis")  # the sandbox is PagoEfectivo's
SANDBOX_PROGRAM = "pagoefectivo.sandbox"  # its Postgres backends' application_name (refunds.db)


def run(args) -> dict:
    merchants = [f"e2e-{i:02d}" for i in range(args.merchants)]
    warmup = max(100, min(1000, args.refunds // 10))
    with h.seeded_environment("e2e", args, {m: HIGH_LIMIT for m in merchants}) as (env, figures):
        warm_requests = h.spread(merchants, warmup, "W")
        requests = h.spread(merchants, args.refunds, "M")
        h.log(f"seeding {args.refunds + warmup} refunds' payments")
        asyncio.run(h.seed_payments(env, warm_requests + requests))
        token = asyncio.run(h.create_intake_token(env))

        baselines = [h.noop_baseline_of(env, args, "before")]
        sandbox = ("--sync-status-mix", args.status_mix)
        with h.system_for(env, args, sandbox, intake=True) as system:
            h.log(f"warm-up: {warmup} refunds through the whole system")
            load = h.HttpLoad(f"{system.intake_url}/v1/refunds", token, warm_requests, args.connections, env.work)
            load.go()
            load.result()
            asyncio.run(h.wait_final(warmup, timeout=300, system=system))
            if not args.no_analyze:
                asyncio.run(h.analyze())

            h.log(f"measuring: {args.refunds} refunds, {args.connections} connections, "
                  f"workers {args.processes}x{args.threads}")
            messages_before = system.worker_metric("dramatiq_messages_total")
            # an idle backend publishes its counters within 10 s (PGSTAT_IDLE_INTERVAL); the load
            # connects after that wait, which would outlast the intake's HTTP_HEADER_TIMEOUT (10 s)
            time.sleep(0 if args.smoke else 11)
            load = h.HttpLoad(f"{system.intake_url}/v1/refunds", token, requests, args.connections, env.work)
            try:
                profiler = h.Profiler(Path(args.profile), {k: v for k, v in system.roots().items()
                                                           if k in h.KINDS}, gil=args.profile_gil) if args.profile else None
                pg_before = asyncio.run(h.pg_stats())
                backends_before = asyncio.run(h.backend_cpu_by_program())
                with h.CpuMeter(system) as meter:
                    if profiler:
                        profiler.__enter__()
                    load.go()
                    asyncio.run(h.wait_final(warmup + args.refunds, timeout=args.timeout, system=system, every=0.25))
                    if profiler:
                        profiler.__exit__(None, None, None)
                intake = load.result()
                backends_after = asyncio.run(h.backend_cpu_by_program())
            finally:
                load.kill()
            meter.add("load client", intake["cpu_s"])
            time.sleep(1 if args.smoke else 11)
            pg_after = asyncio.run(h.pg_stats())
            times = asyncio.run(h.completion_times(since=intake["started_at"] - 1))
            times = [t for t in times if t[0] >= intake["started_at"] - 0.01]
            counts = asyncio.run(h.state_counts())
            figures["ledger"] = h.check_ledger(system, counts)
            figures["messages_processed"] = system.worker_metric("dramatiq_messages_total") - messages_before
            figures["rate_limit_waits"] = system.worker_metric("refund_rate_limit_waits_total")
            figures["gateway_outcomes"] = {o: system.worker_metric("refund_gateway_requests_total", outcome=o)
                                           for o in ("success", "pending", "failure", "rate_limited", "timeout",
                                                     "error")}
            if profiler:
                figures["profile"] = profiler.summary()
        baselines.append(h.noop_baseline_of(env, args, "after"))

    last_done = max(done for _, done, _ in times)
    elapsed = last_done - intake["started_at"]
    latency = [done - created for created, done, _ in times]
    baseline = sum(b["per_second"] for b in baselines) / len(baselines)
    # our own processes: the services, Redis and Postgres, less the sandbox's Postgres backends
    sandbox_backends = max(0.0, backends_after.get(SANDBOX_PROGRAM, 0.0) - backends_before.get(SANDBOX_PROGRAM, 0.0))
    own_cpu = sum(meter.seconds.get(kind, 0.0) for kind in OWN_KINDS) - sandbox_backends
    noop_per_cpu_s = sum(b["per_cpu_s"] for b in baselines) / len(baselines)
    figures.update({
        "refunds": len(times), "seconds": elapsed, "refunds_per_s": len(times) / elapsed,
        "intake": {"accepted_per_s": intake["statuses"].get("202", 0) / intake["elapsed"],
                   "statuses": intake["statuses"], "p50_ms": intake["p50_ms"], "p99_ms": intake["p99_ms"]},
        "baselines": baselines, "noop_per_s": baseline,
        "ratio": len(times) / elapsed / baseline,
        "cpu_s_per_1000": meter.per_thousand(len(times)),
        "sandbox_postgres_cpu_s_per_1000": 1000 * sandbox_backends / max(1, len(times)),
        "own_refunds_per_cpu_s": len(times) / max(own_cpu, 1e-9), "noop_per_cpu_s": noop_per_cpu_s,
        "cpu_ratio": len(times) / max(own_cpu, 1e-9) / noop_per_cpu_s,
        "postgres_per_refund": {k: (pg_after[k] - pg_before[k]) / max(1, len(times)) for k in pg_after},
        "other_cores": meter.other_cores,
        "final_p50_s": h.percentile(latency, 50), "final_p99_s": h.percentile(latency, 99),
        "final_max_s": max(latency), "states": counts,
    })
    return figures


def report(f: dict) -> None:
    a = f["args"]
    h.print_report_header(f)
    print(f"workers: {a['processes']} processes x {a['threads']} threads ({a['worker_module']}); {a['merchants']} merchants; "
          f"sandbox sync status mix {a['status_mix']}; intake load {a['connections']} connections")
    print(f"intake alone: {f['intake']['accepted_per_s']:.0f} accepted/s while the system ran "
          f"(p50 {f['intake']['p50_ms']:.1f} ms, p99 {f['intake']['p99_ms']:.1f} ms, {f['intake']['statuses']})")
    print(f"messages processed by the workers: {f['messages_processed']:.0f} for {f['refunds']} refunds; "
          f"gateway answers {json.dumps({k: int(v) for k, v in f['gateway_outcomes'].items() if v})}")
    print(f"states: {f['states']}; ledger: {f['ledger']}; other jobs used {f['other_cores']:.2f} cores meanwhile")
    if "profile" in f:
        for kind, summary in f["profile"].items():
            print(f"profile {kind} ({summary['samples']} samples), self: "
                  + "; ".join(f"{name} {pct}%" for name, pct in summary["self"][:8]))
    print("CPU seconds per 1,000 refunds: " + ", ".join(
        f"{kind} {s:.2f}" for kind, s in sorted(f["cpu_s_per_1000"].items(), key=lambda kv: -kv[1])))
    print(f"total {sum(f['cpu_s_per_1000'].values()):.2f} CPU s per 1,000 refunds "
          f"(the no-op baseline: {sum(b['cpu_s_per_1000'] for b in f['baselines']) / len(f['baselines']):.2f} "
          "per 1,000 messages, workers only)")
    print("Postgres per refund (all processes, pg_stat_database): " + ", ".join(
        f"{k.replace('xact_', 'transactions ').replace('tup_', 'rows ')} {v:.1f}"
        for k, v in f["postgres_per_refund"].items() if v >= 0.05))
    print(f"time to final state: p50 {f['final_p50_s']:.2f} s, p99 {f['final_p99_s']:.2f} s, max {f['final_max_s']:.2f} s")
    print("no-op dramatiq baseline: " + ", ".join(f"{b['when']} {b['per_second']:.0f}/s" for b in f["baselines"])
          + f" -> {f['noop_per_s']:.0f} messages/s")
    print(f"end to end: {f['refunds']} refunds in {f['seconds']:.1f} s = {f['refunds_per_s']:.0f} refunds/s")
    print(f"our own processes (intake, workers, receiver, scheduler, Redis, Postgres less the sandbox's backends "
          f"{f['sandbox_postgres_cpu_s_per_1000']:.2f} CPU s per 1,000): {f['own_refunds_per_cpu_s']:.0f} refunds per "
          f"CPU-second; no-op dramatiq (workers and Redis): {f['noop_per_cpu_s']:.0f} messages per CPU-second; "
          f"CPU RATIO {f['cpu_ratio']:.3f}")
    print(f"RATIO refunds/s : no-op messages/s = {f['ratio']:.3f} (goal >= 0.30)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--refunds", "--size", dest="refunds", type=int, default=20_000,
                        help="refunds measured (a 10%% warm-up, up to 1,000, goes first)")
    parser.add_argument("--baseline", type=int, default=None, help="no-op messages per baseline (default: --refunds)")
    parser.add_argument("--merchants", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64, help="keep-alive connections of the load process")
    parser.add_argument("--status-mix", default='{"pending": 1}',
                        help="the sandbox's sync_status_mix (default: every refund settles by notification)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for every refund to be final")
    parser.add_argument("--profile", metavar="DIR", help="py-spy record every service during the measurement")
    parser.add_argument("--profile-gil", action="store_true",
                        help="with --profile: sample only the thread holding the GIL (Python's own CPU time)")
    parser.add_argument("--no-analyze", action="store_true",
                        help="skip the ANALYZE after the warm-up (planner statistics of a brand-new database)")
    parser.add_argument("--smoke", action="store_true", help="a tiny run for CI: 1,000 refunds")
    h.add_common_options(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        args.refunds = min(args.refunds, 1000)
    args.baseline = args.baseline or max(2000, args.refunds)
    return h.run_and_report(args, run, report)


if __name__ == "__main__":
    sys.exit(main())
