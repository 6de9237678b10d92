"""Webhooks beside the refund path: deliveries per second to a local endpoint, and what turning
webhooks on costs the refunds.

    .venv/bin/python bench/webhooks_bench.py                     # 4,000 refunds a round, 3 rounds each way, ~6 minutes
    .venv/bin/python bench/webhooks_bench.py --refunds 5000 --rounds 2 --json out.json
    .venv/bin/python bench/webhooks_bench.py --small             # 60 refunds a round, one round each way (test suite)

What runs, every service its own process as in the Procfile (bench/harness.py ``System``): the
sandbox gateway (every refund answered ``pending``, so each settles through a signed
notification: three events a refund, ``refund.accepted``, ``refund.pending`` and its final one),
the receiver, ``dramatiq workers --processes P --threads T`` and the scheduler (its default
5 s interval; deliveries are handed over as their trigger notifies it). A calling service's
webhook endpoint runs as a process of its own (``webhooks_bench.py _endpoint``): aiohttp on
loopback, answering 204 to every POST after reading its body and noting its ``webhook-id``
(no signature check: the receiving side's cost is not ours to measure). The workers may reach
it: ``WEBHOOK_ALLOWED_NETWORKS=127.0.0.1/32``.

Rounds alternate (off, on, then on, off, ...: a trend of the shared machine or of the growing
tables hits both alike); each accepts ``--refunds`` new refunds with ``producers.enqueue_refund``
as fast as it goes, and ends when every one is final and, webhooks on, every event delivered:

* **off**: no webhook endpoint registered: the trigger on the audit rows looks at the empty
  endpoints table once a row and writes nothing. The baseline.
* **on**: one endpoint subscribed to every event of every merchant: the trigger writes an event
  and a delivery per move, the scheduler hands them over, the workers deliver them beside the
  refunds. The endpoint is deleted after the round (the next "off" has none again).

Per round: refunds/s (N ÷ from the first acceptance to the last ``completed_at``); webhooks on,
deliveries/s over the same span (to the last ``delivered_at``) and each delivery's lag from its
event (``delivered_at - occurred_at``); CPU seconds of each process kind (bench/harness.py
``CpuMeter``), and of **our own processes** (workers, receiver, scheduler, Redis, Postgres
less the sandbox's backends) per refund. Printed last: on ÷ off of refunds/s and of our CPU per
refund (means of the rounds, and the spread of adjacent pairs). Then a **trickle**: ``--trickle``
refunds accepted one at a time, ten a second, for a new endpoint: each event's lag when its
endpoint is idle (what the scheduler's immediate hand-over is for). Then a **drain**: ``--drain``
deliveries of events already written, made due at once for a new endpoint with nothing else
running: deliveries/s alone (one endpoint: at most ``WEBHOOK_ENDPOINT_CONCURRENCY`` in flight)
and our CPU per delivery.

Checked (an ``!!`` line if not): every refund final; webhooks on, every event of the round
delivered and received by the endpoint, none written while off; the sandbox's ledger agrees
with the database (each succeeded refund executed exactly once). Nothing asserts timings.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Self

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness as h

HIGH_LIMIT = 100_000  # per second and merchant: never reached
OWN_KINDS = ("worker", "receiver", "scheduler", "postgres", "redis")  # the sandbox is PagoEfectivo's
SANDBOX_PROGRAM = "pagoefectivo.sandbox"  # its Postgres backends' application_name (refunds.db)
ALLOWED = "127.0.0.1/32"  # WEBHOOK_ALLOWED_NETWORKS: the endpoint is on loopback
TRICKLE_PER_S = 10


# --- the calling service's endpoint, a process of its own -----------------------------------------

async def _serve_endpoint() -> None:
    """POST /hooks: note the webhook-id, answer 204. GET /received: every distinct id and the
    number of requests so far. Runs until stdin closes."""
    from aiohttp import web

    received: set[str] = set()
    requests = 0

    async def hook(request: web.Request) -> web.Response:
        nonlocal requests
        await request.read()
        requests += 1
        received.add(request.headers.get("webhook-id", ""))
        return web.Response(status=204)

    async def report(_request: web.Request) -> web.Response:
        return web.json_response({"requests": requests, "ids": sorted(received)})

    app = web.Application()
    app.router.add_post("/hooks", hook)
    app.router.add_get("/received", report)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(f"ready {site._server.sockets[0].getsockname()[1]}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await runner.cleanup()


class Endpoint:
    """The endpoint's process: ``url`` to subscribe, ``received()`` what it got, ``cpu()`` its CPU so far."""

    def __enter__(self) -> Self:
        self.process = subprocess.Popen([sys.executable, __file__, "_endpoint"], cwd=h.ROOT, text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        line = self.process.stdout.readline().split()
        if line[:1] != ["ready"]:
            self.process.kill()
            raise RuntimeError(f"the endpoint did not start: {line!r}")
        self.base = f"http://127.0.0.1:{line[1]}"
        self.url = f"{self.base}/hooks"
        return self

    def __exit__(self, *exc) -> None:
        self.process.stdin.close()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def received(self) -> dict:
        import urllib.request

        with urllib.request.urlopen(f"{self.base}/received", timeout=60) as response:
            return json.loads(response.read())

    def cpu(self) -> float:
        return h.tree_cpu(self.process.pid)


# --- the database side: subscribing, and what became of a round's events ---------------------------

async def subscribe(env: h.Environment, url: str) -> str:
    """One endpoint, every event type of every merchant; its id."""
    from refunds import db as dbmod
    from refunds import webhooks

    conn = await dbmod.connect(env.database_url)
    try:
        endpoint, _secret = await webhooks.add_endpoint(
            conn, h.vault_of(env), name=f"bench-{time.monotonic_ns()}", url=url, merchants=list(env.merchants),
            event_types=list(webhooks.EVENT_TYPES), allowed_networks=webhooks.parse_networks(ALLOWED))
        return str(endpoint.endpoint_id)
    finally:
        await conn.close()


async def unsubscribe(env: h.Environment, endpoint_id: str) -> None:
    """The endpoint gone, with its deliveries and attempts (its events stay)."""
    await _sql(env, "execute", "DELETE FROM webhook_endpoints WHERE endpoint_id = $1::uuid", endpoint_id)


def own_cpu(meter: h.CpuMeter, backends_before: dict[str, float]) -> float:
    """CPU seconds of our own processes over the meter's span: OWN_KINDS, less the sandbox's
    Postgres backends (``backends_before``: ``h.backend_cpu_by_program()`` at its start)."""
    sandbox = max(0.0, asyncio.run(h.backend_cpu_by_program()).get(SANDBOX_PROGRAM, 0.0)
                  - backends_before.get(SANDBOX_PROGRAM, 0.0))
    return sum(meter.seconds.get(kind, 0.0) for kind in OWN_KINDS) - sandbox


async def _sql(env: h.Environment, method: str, query: str, *args):
    import asyncpg

    conn = await asyncpg.connect(env.database_url)
    try:
        return await getattr(conn, method)(query, *args)
    finally:
        await conn.close()


async def wait_delivered(env: h.Environment, endpoint_id: str, timeout: float, system: h.System) -> None:
    """Until none of the endpoint's deliveries is left to make."""
    deadline = time.monotonic() + timeout
    while left := await _sql(env, "fetchval", "SELECT count(*) FROM webhook_deliveries WHERE endpoint_id = $1"
                             " AND state <> 'delivered'", endpoint_id):
        system.check_alive()
        if time.monotonic() > deadline:
            raise RuntimeError(f"{left} webhook deliveries not delivered after {timeout:.0f}s")
        await asyncio.sleep(0.25)


async def most_in_flight(env: h.Environment, endpoint_id: str) -> int:
    """The most attempts to the endpoint in flight at once: each attempt spans its latency up to
    its record (``attempted_at``, millisecond resolution)."""
    return await _sql(env, "fetchval", """
        WITH spans AS (
            SELECT attempted_at - make_interval(secs => latency_ms / 1000.0) AS began, attempted_at AS ended
            FROM webhook_attempts WHERE endpoint_id = $1::uuid),
        edges AS (SELECT began AS at, 1 AS step FROM spans UNION ALL SELECT ended, -1 FROM spans)
        SELECT COALESCE(max(running), 0) FROM (SELECT sum(step) OVER (ORDER BY at, step ROWS UNBOUNDED PRECEDING)
                                               AS running FROM edges) x""", endpoint_id)


async def round_events(env: h.Environment, refund_ids: list[str], endpoint_id: str | None) -> dict:
    """The round's events and what became of their deliveries to ``endpoint_id``."""
    row = await _sql(env, "fetchrow", """
        SELECT count(*) AS events, count(d.event_id) FILTER (WHERE d.state = 'delivered') AS delivered,
               COALESCE(sum(d.attempts), 0) AS attempts,
               EXTRACT(EPOCH FROM max(d.delivered_at))::float8 AS last_delivered,
               percentile_cont(0.5) WITHIN GROUP (ORDER BY EXTRACT(EPOCH FROM d.delivered_at - e.occurred_at)) AS lag_p50,
               percentile_cont(0.99) WITHIN GROUP (ORDER BY EXTRACT(EPOCH FROM d.delivered_at - e.occurred_at)) AS lag_p99,
               array_agg(e.event_id) AS ids
        FROM webhook_events e LEFT JOIN webhook_deliveries d ON d.event_id = e.event_id AND d.endpoint_id = $2::uuid
        WHERE e.refund_id = ANY($1::uuid[])""", refund_ids, endpoint_id)
    return dict(row)


# --- a round ---------------------------------------------------------------------------------------

def measure_round(env: h.Environment, system: h.System, endpoint: Endpoint, batch: list[dict], mode: str,
                  expected_final: int, args) -> dict:
    """Accept ``batch`` with webhooks ``mode`` (off/on) and wait until it is all final (and delivered)."""
    endpoint_id = asyncio.run(subscribe(env, endpoint.url)) if mode == "on" else None
    backends = asyncio.run(h.backend_cpu_by_program())
    endpoint_cpu = endpoint.cpu()
    with h.CpuMeter(system) as meter:
        started = time.time()
        ids = asyncio.run(h.enqueue_direct(batch))
        asyncio.run(h.wait_final(expected_final, timeout=args.timeout, system=system, every=0.25))
        if endpoint_id:
            asyncio.run(wait_delivered(env, endpoint_id, args.timeout, system))
    meter.add("endpoint", endpoint.cpu() - endpoint_cpu)
    times = asyncio.run(h.completion_times(refund_ids=ids))
    events = asyncio.run(round_events(env, ids, endpoint_id))
    event_ids = set(events.pop("ids") or []) if events["events"] else set()
    own = own_cpu(meter, backends)
    seconds = max(done for _, done, _ in times) - started
    result = {
        "mode": mode, "refunds": len(times), "seconds": seconds, "refunds_per_s": len(times) / seconds,
        "own_cpu_ms_per_refund": 1000 * own / max(1, len(times)),
        "cpu_s_per_1000": meter.per_thousand(len(times)), "other_cores": meter.other_cores, **events,
    }
    if endpoint_id:
        received = set(endpoint.received()["ids"])
        result["deliveries_per_s"] = events["delivered"] / max(1e-9, events["last_delivered"] - started)
        result["most_in_flight"] = asyncio.run(most_in_flight(env, endpoint_id))
        result["check"] = ("ok" if events["delivered"] == events["events"] and event_ids <= received else
                           f"!! {events['events'] - events['delivered']} events not delivered, "
                           f"{len(event_ids - received)} never received by the endpoint")
        asyncio.run(unsubscribe(env, endpoint_id))
    else:
        result["check"] = "ok" if not events["events"] else f"!! {events['events']} events written with webhooks off"
    h.log(f"  {mode}: {result['refunds_per_s']:.0f} refunds/s, {result['own_cpu_ms_per_refund']:.2f} CPU ms a refund"
          + (f", {result['deliveries_per_s']:.0f} deliveries/s" if endpoint_id else "") + f"; {result['check']}")
    return result


def trickle(env: h.Environment, system: h.System, endpoint: Endpoint, batch: list[dict], expected_final: int,
            args) -> dict:
    """Refunds accepted one at a time, TRICKLE_PER_S a second, for an idle endpoint: their
    events' lag (``delivered_at - occurred_at``)."""
    from producers import enqueue_refund
    from refunds import db as dbmod

    async def accept() -> list[str]:
        pool = await dbmod.create_pool(env.database_url, min_size=1, max_size=1)
        try:
            ids = []
            for request in batch:
                ids.append(str((await enqueue_refund(pool, **request, requested_by="bench")).refund.refund_id))
                await asyncio.sleep(1 / TRICKLE_PER_S)
            return ids
        finally:
            await pool.close()

    endpoint_id = asyncio.run(subscribe(env, endpoint.url))
    ids = asyncio.run(accept())
    asyncio.run(h.wait_final(expected_final, timeout=args.timeout, system=system, every=0.25))
    asyncio.run(wait_delivered(env, endpoint_id, args.timeout, system))
    events = asyncio.run(round_events(env, ids, endpoint_id))
    asyncio.run(unsubscribe(env, endpoint_id))
    return {"refunds": len(ids), "events": events["events"], "delivered": events["delivered"],
            "lag_p50": events["lag_p50"], "lag_p99": events["lag_p99"]}


def drain(env: h.Environment, system: h.System, endpoint: Endpoint, count: int, args) -> dict:
    """``count`` deliveries of events already written, due for a new endpoint since their events'
    times (as the trigger would have made them), and nothing else running: the delivery
    machinery alone. The clock runs from the first attempt (the scheduler's next pass hands the
    first ones over) to the last delivery."""
    endpoint_id = asyncio.run(subscribe(env, endpoint.url))
    backends = asyncio.run(h.backend_cpu_by_program())
    endpoint_cpu = endpoint.cpu()
    with h.CpuMeter(system) as meter:
        made = asyncio.run(_sql(env, "execute", """
            INSERT INTO webhook_deliveries (event_id, endpoint_id, next_attempt_at)
            SELECT event_id, $1::uuid, occurred_at FROM webhook_events ORDER BY occurred_at LIMIT $2""",
            endpoint_id, count))
        asyncio.run(wait_delivered(env, endpoint_id, args.timeout, system))
    meter.add("endpoint", endpoint.cpu() - endpoint_cpu)
    row = asyncio.run(_sql(env, "fetchrow", """
        SELECT count(*) AS delivered, EXTRACT(EPOCH FROM max(d.delivered_at) - min(a.first))::float8 AS seconds,
               sum(d.attempts) AS attempts
        FROM webhook_deliveries d,
             LATERAL (SELECT min(attempted_at) AS first FROM webhook_attempts WHERE endpoint_id = $1::uuid) a
        WHERE d.endpoint_id = $1::uuid AND d.state = 'delivered'""", endpoint_id))
    delivered = row["delivered"]
    in_flight = asyncio.run(most_in_flight(env, endpoint_id))
    own = own_cpu(meter, backends)
    return {"deliveries": int(made.split()[-1]), "delivered": delivered, "attempts": row["attempts"],
            "seconds": row["seconds"], "deliveries_per_s": delivered / max(1e-9, row["seconds"] or 0),
            "own_cpu_ms_per_delivery": 1000 * own / max(1, delivered), "most_in_flight": in_flight,
            "cpu_ms_per_delivery": {k: 1000 * v / max(1, delivered) for k, v in meter.seconds.items()},
            "other_cores": meter.other_cores}


def run(args) -> dict:
    merchants = [f"wh-{i:02d}" for i in range(args.merchants)]
    modes = [mode for i in range(args.rounds) for mode in (("off", "on") if i % 2 == 0 else ("on", "off"))]
    warmup = max(50, min(1000, args.refunds // 4))
    extra_env = {"WEBHOOK_ALLOWED_NETWORKS": ALLOWED}
    if args.endpoint_concurrency:
        extra_env["WEBHOOK_ENDPOINT_CONCURRENCY"] = str(args.endpoint_concurrency)
    with h.seeded_environment("webhooks", args, {m: HIGH_LIMIT for m in merchants}) as (env, figures):
        batches = [h.spread(merchants, warmup, "W")] + [h.spread(merchants, args.refunds, f"R{i}")
                                                        for i in range(len(modes))]
        batches.append(h.spread(merchants, args.trickle, "T"))
        h.log(f"seeding the payments of {sum(len(b) for b in batches)} refunds")
        asyncio.run(h.seed_payments(env, [r for batch in batches for r in batch]))
        system = h.System(env, processes=args.processes, threads=args.threads, extra_env=extra_env,
                          sandbox_args=("--sync-status-mix", args.status_mix), worker_command=h.worker_command(args))
        with Endpoint() as endpoint, system:
            h.log(f"warm-up: {warmup} refunds, webhooks on")
            measure_round(env, system, endpoint, batches[0], "on", warmup, args)
            asyncio.run(h.analyze())
            rounds, total = [], warmup
            for index, mode in enumerate(modes, start=1):
                total += len(batches[index])
                h.log(f"round {index} of {len(modes)}: {len(batches[index])} refunds, webhooks {mode}")
                rounds.append(measure_round(env, system, endpoint, batches[index], mode, total, args))
            total += args.trickle
            h.log(f"trickle: {args.trickle} refunds one at a time, {TRICKLE_PER_S} a second, webhooks on")
            figures["trickle"] = trickle(env, system, endpoint, batches[-1], total, args)
            h.log(f"drain: {args.drain} deliveries to a new endpoint, nothing else running")
            figures["drain"] = drain(env, system, endpoint, args.drain, args)
            figures["endpoint_requests"] = endpoint.received()["requests"]
            figures["states"] = asyncio.run(h.state_counts())
            figures["ledger"] = h.check_ledger(system, figures["states"])
            figures["webhook_attempts"] = {r: system.worker_metric("refund_webhook_attempts_total", result=r)
                                           for r in ("delivered", "retry", "failed")}
    figures["rounds"] = rounds
    figures["final"] = figures["states"] and sum(figures["states"].get(s, 0) for s in h.FINAL_STATES) == total
    by_mode = {mode: [r for r in rounds if r["mode"] == mode] for mode in ("off", "on")}
    mean = {mode: {key: sum(r[key] for r in found) / len(found) for key in ("refunds_per_s", "own_cpu_ms_per_refund")}
            for mode, found in by_mode.items()}
    figures["mean"] = mean
    figures["ratio"] = {key: mean["on"][key] / mean["off"][key] for key in mean["off"]}
    figures["pair_ratios"] = {key: [on[key] / off[key] for off, on in zip(by_mode["off"], by_mode["on"])]
                              for key in mean["off"]}
    on = by_mode["on"]
    figures["deliveries_per_s"] = sum(r["deliveries_per_s"] for r in on) / len(on)
    figures["deliveries_per_refund"] = sum(r["events"] for r in on) / sum(r["refunds"] for r in on)
    return figures


def report(f: dict) -> None:
    a = f["args"]
    h.print_report_header(f)
    print(f"workers: {a['processes']} processes x {a['threads']} threads ({a['worker_module']}); {a['merchants']} "
          f"merchants; sandbox sync status mix {a['status_mix']}; WEBHOOK_ENDPOINT_CONCURRENCY "
          f"{a['endpoint_concurrency'] or 'default (4)'}; {a['refunds']} refunds a round")
    print()
    print(f"{'round':<7}{'webhooks':<10}{'refunds/s':>10}{'our CPU ms/refund':>19}{'deliveries/s':>14}"
          f"{'lag p50':>9}{'lag p99':>9}  CPU ms a refund: {', '.join(OWN_KINDS)} "
          f"(sandbox, endpoint, driver); other jobs' cores")
    for index, r in enumerate(f["rounds"], start=1):
        c = r["cpu_s_per_1000"]
        hooks = (f"{r['deliveries_per_s']:>14.0f}{r['lag_p50']:>8.2f}s{r['lag_p99']:>8.2f}s" if r["mode"] == "on"
                 else f"{'-':>14}{'-':>9}{'-':>9}")
        print(f"{index:<7}{r['mode']:<10}{r['refunds_per_s']:>10.0f}{r['own_cpu_ms_per_refund']:>19.2f}{hooks}  "
              + ", ".join(f"{c.get(k, 0):.2f}" for k in OWN_KINDS)
              + f" ({c.get('sandbox', 0):.2f}, {c.get('endpoint', 0):.2f}, {c.get('bench driver', 0):.2f}); "
              f"{r['other_cores']:.2f}")
    print()
    problems = [f"round {i}: {r['check']}" for i, r in enumerate(f["rounds"], start=1) if r["check"] != "ok"]
    on = [r for r in f["rounds"] if r["mode"] == "on"]
    if problems:
        for problem in problems:
            print(problem if problem.startswith("!!") else f"!! {problem}")
    else:
        print(f"delivered: all {sum(r['events'] for r in on)} events of the {sum(r['refunds'] for r in on)} refunds "
              f"of the 'on' rounds, each received by the endpoint; none written with webhooks off")
    if not f["final"]:
        print(f"!! not every refund is final: {f['states']}")
    print(f"states: {f['states']}; ledger: {f['ledger']}")
    print(f"webhook attempts (workers): { {k: int(v) for k, v in f['webhook_attempts'].items()} }; "
          f"the endpoint answered {f['endpoint_requests']} requests; the most in flight at once (from the "
          f"attempts' times): {max(r.get('most_in_flight', 0) for r in f['rounds'] + [f['drain']])} "
          f"(WEBHOOK_ENDPOINT_CONCURRENCY {a['endpoint_concurrency'] or 4})")
    d = f["drain"]
    if d["delivered"] != d["deliveries"]:
        print(f"!! drain: {d['delivered']} of {d['deliveries']} delivered")
    t = f["trickle"]
    if t["delivered"] != t["events"]:
        print(f"!! trickle: {t['delivered']} of {t['events']} events delivered")
    print(f"trickle ({t['refunds']} refunds one at a time, {TRICKLE_PER_S} a second; the endpoint idle): "
          f"{t['events']} events delivered {t['lag_p50'] * 1000:.0f} ms after they happened at the median, "
          f"{t['lag_p99'] * 1000:.0f} ms at p99 (the scheduler passes every 5 s)")
    print(f"drain (nothing else running): {d['delivered']} deliveries in {d['seconds']:.2f} s = "
          f"{d['deliveries_per_s']:.0f} deliveries/s to one endpoint; our CPU {d['own_cpu_ms_per_delivery']:.2f} ms a "
          "delivery (" + ", ".join(f"{k} {v:.2f}" for k, v in sorted(d["cpu_ms_per_delivery"].items(),
                                                                     key=lambda kv: -kv[1]) if v >= 0.005) + ")")
    print(f"webhooks on: {f['deliveries_per_s']:.0f} deliveries/s beside {f['mean']['on']['refunds_per_s']:.0f} "
          f"refunds/s ({f['deliveries_per_refund']:.2f} events a refund)")
    spread = {key: f"{min(v):.3f}-{max(v):.3f}" for key, v in f["pair_ratios"].items()}
    print(f"RESULT webhooks on / off: refunds/s {f['ratio']['refunds_per_s']:.3f} (pairs {spread['refunds_per_s']}), "
          f"our CPU per refund {f['ratio']['own_cpu_ms_per_refund']:.3f} (pairs {spread['own_cpu_ms_per_refund']}); "
          f"off {f['mean']['off']['refunds_per_s']:.0f} refunds/s at {f['mean']['off']['own_cpu_ms_per_refund']:.2f} "
          f"CPU ms, on {f['mean']['on']['refunds_per_s']:.0f} at {f['mean']['on']['own_cpu_ms_per_refund']:.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--refunds", "--size", dest="refunds", type=int, default=4000, help="refunds a round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds with webhooks off, and as many on")
    parser.add_argument("--trickle", type=int, default=50, help="refunds accepted one at a time, 10 a second")
    parser.add_argument("--drain", type=int, default=None, help="deliveries of the drain (default: --refunds)")
    parser.add_argument("--merchants", type=int, default=10)
    parser.add_argument("--status-mix", default='{"pending": 1}',
                        help="the sandbox's sync_status_mix (default: every refund settles by notification)")
    parser.add_argument("--endpoint-concurrency", type=int, default=None,
                        help="WEBHOOK_ENDPOINT_CONCURRENCY for the workers (default: the setting's)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds a round may take")
    parser.add_argument("--small", action="store_true", help="the test suite's size: 60 refunds, one round each way")
    h.add_common_options(parser)
    args = parser.parse_args(argv)
    if args.small:
        args.refunds, args.rounds, args.merchants = min(args.refunds, 60), 1, min(args.merchants, 3)
        args.trickle = min(args.trickle, 10)
    args.drain = args.drain or args.refunds
    return h.run_and_report(args, run, report)


if __name__ == "__main__":
    if sys.argv[1:] == ["_endpoint"]:
        asyncio.run(_serve_endpoint())
    else:
        sys.exit(main())
