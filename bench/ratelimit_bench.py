"""Rate-limit utilisation and fairness: each merchant's allowance used, never exceeded, not stolen.

    .venv/bin/python bench/ratelimit_bench.py                 # ~3 minutes
    .venv/bin/python bench/ratelimit_bench.py --duration 60 --backlog 10000
    .venv/bin/python bench/ratelimit_bench.py --smoke         # short phases, 1,000 backlog (CI smoke test)

One set of services for both parts, as in the Procfile (receiver, scheduler, ``dramatiq
workers`` 2x8 by default), and the
sandbox gateway enforcing each merchant's limit itself (``merchant_rate_limits``: any request
over it in any one-second window is answered 429, so an excess cannot hide: it is counted).
Refunds are accepted with ``producers.enqueue_refund`` (the intake is not measured here).

1. Utilisation: 5 merchants with limits 2/5/10/20/50 per second (the same in the database,
   which the workers' limiter reads, and in the sandbox), each with a backlog of
   ``limit × duration`` refunds enqueued at once (so each takes about ``--duration`` seconds
   to send). Until its backlog runs out: each merchant's executions per second (from the gateway's ledger, per second of
   its clock) as a fraction of its limit (goal: 0.9-1.0, never above, +1 at a boundary), the
   most in any sliding one-second window (from the times the answers were recorded), and
   the 429s it got (a retried request shows as a second claim of the same refund).
2. Fairness: a small merchant (limit 5/s) sends ``--small`` refunds at ``--small-rate`` per
   second; the p95 of their time to final state alone, and again right after a large
   merchant (limit 50/s) was handed a backlog of ``--backlog`` (10,000) refunds, on the same
   services. Goal: with the backlog ≤ 2× alone.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness as h

LIMITS = {"rl-02": 2, "rl-05": 5, "rl-10": 10, "rl-20": 20, "rl-50": 50}
SMALL, LARGE = "fair-small", "fair-large"
SMALL_LIMIT, LARGE_LIMIT = 5, 50


def limits_json(limits: dict[str, float]) -> str:
    import json

    return json.dumps(limits)


# --- 1. utilisation -------------------------------------------------------------------------------

def utilisation(env, system, args) -> dict:
    per_merchant = {m: h.refund_requests(m, math.ceil(limit * args.duration), f"U-{m}") for m, limit in LIMITS.items()}
    requests: list[dict] = []
    longest = max(len(r) for r in per_merchant.values())
    for i in range(longest):  # interleaved, as a mixed backlog would arrive
        requests += [r[i] for r in per_merchant.values() if i < len(r)]
    asyncio.run(h.seed_payments(env, requests))
    h.log(f"utilisation: backlogs {', '.join(f'{m} {len(r)}' for m, r in per_merchant.items())}")
    waits_before = {m: system.worker_metric("refund_rate_limit_waits_total", merchant=m) for m in LIMITS}
    rejected_before = system.worker_metric("refund_gateway_requests_total", outcome="rate_limited")
    started = time.time()
    asyncio.run(h.enqueue_direct(requests))
    asyncio.run(h.wait_final(len(requests), timeout=args.duration * 3 + 120, system=system, merchants=list(LIMITS)))
    ledger = system.ledger()
    rejected_429 = system.worker_metric("refund_gateway_requests_total", outcome="rate_limited") - rejected_before
    waits = {m: system.worker_metric("refund_rate_limit_waits_total", merchant=m) - waits_before[m] for m in LIMITS}
    answered, attempts = asyncio.run(_answer_times(list(LIMITS)))
    results = {}
    for merchant, limit in LIMITS.items():
        stamps = sorted(datetime.fromisoformat(e["executedAt"]).timestamp() for e in ledger
                        if e["merchantId"] == merchant)
        per_second = Counter(int(s) for s in stamps)
        if not per_second:
            results[merchant] = {"limit": limit, "executed": 0}
            continue
        # whole seconds only: the first started mid-way, the last ended when the backlog ran out
        seconds = list(range(min(per_second) + 1, max(per_second)))
        series = [per_second.get(s, 0) for s in seconds]
        precise = sorted(answered.get(merchant, []))
        results[merchant] = {
            "limit": limit, "executed": len(stamps), "seconds": len(seconds),
            "first_after_s": min(stamps) - started, "last_after_s": max(stamps) - started,
            "series": series,
            "utilisation": sum(series) / (limit * len(series)) if series else float("nan"),
            "min_fraction": min(series) / limit if series else float("nan"),
            "max_fraction": max(series) / limit if series else float("nan"),
            "seconds_above": sum(1 for c in series if c > limit),
            "seconds_above_plus_one": sum(1 for c in series if c > limit + 1),
            "max_in_sliding_second": _max_in_window(precise, 1.0),
            "retried_after_429": attempts.get(merchant, 0),
            "rate_limit_waits": waits[merchant],
        }
    return {"merchants": results, "gateway_429_total": rejected_429, "duration": args.duration}


async def _answer_times(merchants: list[str]) -> tuple[dict[str, list[float]], dict[str, int]]:
    """When each refund's gateway answer was recorded (the refund left ``submitted``), per merchant;
    and how many claims beyond the first each merchant's refunds needed (a 429 makes one)."""
    import asyncpg

    from refunds.settings import get_settings

    conn = await asyncpg.connect(get_settings().require("database_url"))
    try:
        rows = await conn.fetch(
            """SELECT r.merchant_id, EXTRACT(EPOCH FROM e.occurred_at)::float8 AS t
               FROM refund_events e JOIN refunds r USING (refund_id)
               WHERE e.from_state = 'submitted' AND r.merchant_id = ANY($1::text[])""", merchants)
        extra = await conn.fetch(
            """SELECT r.merchant_id, count(*) - count(DISTINCT e.refund_id) AS extra
               FROM refund_events e JOIN refunds r USING (refund_id)
               WHERE e.to_state = 'submitted' AND r.merchant_id = ANY($1::text[]) GROUP BY r.merchant_id""",
            merchants)
    finally:
        await conn.close()
    times: dict[str, list[float]] = {}
    for row in rows:
        times.setdefault(row["merchant_id"], []).append(row["t"])
    return times, {row["merchant_id"]: row["extra"] for row in extra}


def _max_in_window(stamps: list[float], width: float) -> int:
    best, start = 0, 0
    for end, t in enumerate(stamps):
        while t - stamps[start] >= width:
            start += 1
        best = max(best, end - start + 1)
    return best


# --- 2. fairness ----------------------------------------------------------------------------------

async def _trickle(requests: list[dict], per_second: float) -> list[str]:
    """Accept the small merchant's refunds one by one at a steady pace."""
    from producers import enqueue_refund
    from refunds import db as dbmod
    from refunds.delivery import Courier
    from refunds.settings import get_settings

    pool = await dbmod.create_pool(get_settings().require("database_url"), min_size=1, max_size=2)
    ids = []
    try:
        async with Courier() as courier:
            start = time.monotonic()
            for index, request in enumerate(requests):
                await asyncio.sleep(max(0.0, start + index / per_second - time.monotonic()))
                result = await enqueue_refund(pool, **request, requested_by="bench", courier=courier)
                ids.append(str(result.refund.refund_id))
    finally:
        await pool.close()
    return ids


def _p95_of(ids: list[str]) -> dict:
    times = asyncio.run(h.completion_times(refund_ids=ids))
    latency = sorted(done - created for created, done, _ in times)
    return {"refunds": len(latency), "p50_s": h.percentile(latency, 50), "p95_s": h.percentile(latency, 95),
            "max_s": latency[-1] if latency else float("nan")}


def fairness(env, system, args) -> dict:
    alone = h.refund_requests(SMALL, args.small, "FA")
    shared = h.refund_requests(SMALL, args.small, "FB")
    backlog = h.refund_requests(LARGE, args.backlog, "FL")
    asyncio.run(h.seed_payments(env, alone + shared + backlog))
    h.log(f"fairness: {args.small} refunds of {SMALL} at {args.small_rate}/s, alone")
    ids = asyncio.run(_trickle(alone, args.small_rate))
    asyncio.run(h.wait_final(len(ids), timeout=300, system=system, merchants=[SMALL]))
    result_alone = _p95_of(ids)
    h.log(f"  alone: p95 {result_alone['p95_s']:.2f} s")
    h.log(f"fairness: {LARGE} handed a backlog of {args.backlog}")
    messages_before = system.worker_metric("dramatiq_messages_total")
    rejected_before = system.worker_metric("refund_gateway_requests_total", outcome="rate_limited")
    started = time.monotonic()
    asyncio.run(h.enqueue_direct(backlog))
    backlog_enqueue_s = time.monotonic() - started
    h.log(f"  backlog accepted in {backlog_enqueue_s:.1f} s; now {args.small} refunds of {SMALL} again")
    ids = asyncio.run(_trickle(shared, args.small_rate))
    asyncio.run(h.wait_final(2 * len(ids), timeout=900, system=system, merchants=[SMALL]))
    result_shared = _p95_of(ids)
    large_done = asyncio.run(h.completion_times(merchants=[LARGE]))
    waits = system.worker_metric("refund_rate_limit_waits_total", merchant=LARGE)
    rejected_429 = system.worker_metric("refund_gateway_requests_total", outcome="rate_limited") - rejected_before
    messages = system.worker_metric("dramatiq_messages_total") - messages_before
    h.log(f"  with the backlog: p95 {result_shared['p95_s']:.2f} s")
    return {"alone": result_alone, "with_backlog": result_shared, "backlog": args.backlog,
            "backlog_enqueue_s": backlog_enqueue_s, "large_done_meanwhile": len(large_done),
            "large_rate_limit_waits": waits, "gateway_429_total": rejected_429, "messages_processed": messages,
            "ratio": result_shared["p95_s"] / result_alone["p95_s"]}


def run(args) -> dict:
    limits = {**LIMITS, SMALL: SMALL_LIMIT, LARGE: LARGE_LIMIT}
    with h.seeded_environment("ratelimit", args, limits) as (env, figures):
        sandbox = ("--merchant-rate-limits", limits_json(limits), "--sync-status-mix", args.status_mix)
        with h.system_for(env, args, sandbox) as system:
            if not args.skip_utilisation:
                figures["utilisation"] = utilisation(env, system, args)
            if not args.skip_fairness:
                figures["fairness"] = fairness(env, system, args)
    return figures


def report(f: dict) -> None:
    a = f["args"]
    h.print_report_header(f)
    print(f"workers {a['processes']}x{a['threads']}; sandbox sync status mix {a['status_mix']}")
    if "utilisation" in f:
        u = f["utilisation"]
        print(f"utilisation, backlogs of {u['duration']:g} s each: executions per second of the gateway's clock / limit:")
        for merchant, r in u["merchants"].items():
            if not r.get("executed"):
                print(f"  {merchant} limit {r['limit']}/s: nothing executed")
                continue
            series = " ".join(f"{c / r['limit']:.2f}" for c in r["series"])
            print(f"  {merchant} limit {r['limit']:>2}/s: {series}")
        print(f"{'merchant':>9} {'limit/s':>7} {'used':>6} {'min':>5} {'max':>5} {'s>limit':>7} {'s>limit+1':>9} "
              f"{'max in any 1s':>13} {'429s':>5}")
        for merchant, r in u["merchants"].items():
            if r.get("executed"):
                print(f"{merchant:>9} {r['limit']:>7} {r['utilisation']:>6.3f} {r['min_fraction']:>5.2f} "
                      f"{r['max_fraction']:>5.2f} {r['seconds_above']:>7} {r['seconds_above_plus_one']:>9} "
                      f"{r['max_in_sliding_second']:>13} {r['retried_after_429']:>5}")
        print(f"gateway 429s seen by the workers: {u['gateway_429_total']:.0f}")
    if "fairness" in f:
        fa = f["fairness"]
        print(f"fairness: {SMALL} ({SMALL_LIMIT}/s) sends {a['small']} refunds at {a['small_rate']}/s; "
              f"{LARGE} ({LARGE_LIMIT}/s) backlog {fa['backlog']} accepted in {fa['backlog_enqueue_s']:.1f} s")
        for label, r in (("alone", fa["alone"]), ("with backlog", fa["with_backlog"])):
            print(f"  {label:>12}: p50 {r['p50_s']:.2f} s, p95 {r['p95_s']:.2f} s, max {r['max_s']:.2f} s "
                  f"({r['refunds']} refunds)")
        print(f"  meanwhile {fa['large_done_meanwhile']} of the large merchant's refunds were final; "
              f"its rate-limit waits {fa['large_rate_limit_waits']:.0f}; 429s {fa['gateway_429_total']:.0f}; "
              f"messages processed {fa['messages_processed']:.0f}")
    if "utilisation" in f:
        used = [r["utilisation"] for r in f["utilisation"]["merchants"].values() if r.get("executed")]
        over = sum(r["seconds_above_plus_one"] for r in f["utilisation"]["merchants"].values() if r.get("executed"))
        print(f"RESULT utilisation {min(used):.3f}-{max(used):.3f} of the limits (goal 0.9-1.0), "
              f"seconds above limit+1: {over}, 429s: {f['utilisation']['gateway_429_total']:.0f}")
    if "fairness" in f:
        fa = f["fairness"]
        print(f"RESULT fairness p95 with backlog / alone = {fa['with_backlog']['p95_s']:.2f} / "
              f"{fa['alone']['p95_s']:.2f} s = {fa['ratio']:.2f} (goal <= 2)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of sending in the utilisation phase")
    parser.add_argument("--backlog", "--size", "--refunds", dest="backlog", type=int, default=10_000,
                        help="the large merchant's backlog in the fairness phase")
    parser.add_argument("--small", type=int, default=40, help="the small merchant's refunds per fairness phase")
    parser.add_argument("--small-rate", type=float, default=2.0, help="their pace, per second")
    parser.add_argument("--status-mix", default='{"pending": 1}')
    parser.add_argument("--skip-utilisation", action="store_true")
    parser.add_argument("--skip-fairness", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="short phases for CI: 4 s, backlog 500, 6 refunds at 3/s")
    h.add_common_options(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        args.duration, args.backlog = min(args.duration, 4), min(args.backlog, 500)
        args.small, args.small_rate = min(args.small, 6), 3.0
    return h.run_and_report(args, run, report)


if __name__ == "__main__":
    sys.exit(main())
