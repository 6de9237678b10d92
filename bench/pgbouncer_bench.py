"""End to end through PgBouncer (transaction pooling) beside direct connections, in one run.

    .venv/bin/python bench/pgbouncer_bench.py                       # 3 rounds each of 3,000 refunds, alternated
    .venv/bin/python bench/pgbouncer_bench.py --refunds 1000 --rounds 1 --json out.json
    .venv/bin/python bench/pgbouncer_bench.py --modes direct,pgbouncer,direct-nocache   # the cache's share

One scratch database, one Redis database, the merchants and every payment seeded once. Then
rounds alternate: direct (DATABASE_POOLER=none, asyncpg's statement cache on), then through
PgBouncer (DATABASE_POOLER=transaction, no cache), each with the Procfile's services started
afresh (sandbox, receiver, intake, 2 worker processes x 8 threads, scheduler) and a warm-up
batch first. The clock runs from the first intake request to the last of its refunds final in
Postgres; CPU is that of our processes (services, Postgres, Redis, PgBouncer; not the sandbox)
meanwhile. Printed last: each mode's mean refunds/s and CPU ms per refund and their ratios to
direct, after every round's figures and ledger check (each refund executed once).
``direct-nocache`` (direct, DATABASE_POOLER=transaction) tells the statement cache's share
from PgBouncer's own. PgBouncer is /usr/sbin/pgbouncer (Debian's package), run here with its
own ini (``PgBouncer``; tests/system/test_pgbouncer.py uses it too).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness as h

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
HIGH_LIMIT = 100_000  # per second: never reached


class PgBouncer:
    """A PgBouncer of our own in front of the Postgres of ``server_url``: its own ini in a temp
    folder, a free loopback port, trust from clients, the URL's credentials to the server.
    As root it runs as ``nobody`` (PgBouncer refuses root)."""

    def __init__(self, server_url: str, *, pool_mode: str = "transaction", pool_size: int = 20):
        from refundctl.processes import free_port

        self.server = urlsplit(server_url)
        self.port = free_port()
        self.pool_mode, self.pool_size = pool_mode, pool_size
        self.folder = Path(tempfile.mkdtemp(prefix="pgbouncer-"))
        self.log_path = self.folder / "pgbouncer.log"
        self.process: subprocess.Popen | None = None

    def url(self, database_url: str) -> str:
        """``database_url`` (a database on the same server) through this PgBouncer."""
        parts = urlsplit(database_url)
        user = f"{parts.username}@" if parts.username else ""
        return urlunsplit(parts._replace(netloc=f"{user}127.0.0.1:{self.port}"))

    def _ini(self) -> str:
        user = unquote(self.server.username or os.environ.get("USER") or "postgres")
        password = f" password={unquote(self.server.password)}" if self.server.password else ""
        (self.folder / "userlist.txt").write_text(f'"{user}" ""\n')
        return f"""[databases]
* = host={self.server.hostname or '127.0.0.1'} port={self.server.port or 5432} user={user}{password}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
auth_type = trust
auth_file = {self.folder / 'userlist.txt'}
pool_mode = {self.pool_mode}
default_pool_size = {self.pool_size}
max_client_conn = 1000
ignore_startup_parameters = extra_float_digits
"""

    def start(self) -> "PgBouncer":
        from refundctl.processes import die_with_parent

        if not os.access(PGBOUNCER, os.X_OK):
            raise RuntimeError(f"{PGBOUNCER} not found: apt-get install -y pgbouncer")
        ini = self.folder / "pgbouncer.ini"
        ini.write_text(self._ini())
        self.folder.chmod(0o755)  # read by nobody when we are root
        for path in self.folder.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        as_user = ["-u", "nobody"] if os.geteuid() == 0 else []
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([PGBOUNCER, *as_user, str(ini)], stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, preexec_fn=die_with_parent,
                                            start_new_session=True)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"pgbouncer exited with {self.process.returncode}:\n{self.log()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return self
            time.sleep(0.05)
        raise RuntimeError(f"pgbouncer did not listen on {self.port} within 15 s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> "PgBouncer":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


def pgbouncer_version() -> str:
    run = subprocess.run([PGBOUNCER, "--version"], capture_output=True, text=True, timeout=10)
    return run.stdout.splitlines()[0] if run.stdout else "?"


MODES = {  # extra environment of the services: DATABASE_URL through PgBouncer or not, and DATABASE_POOLER
    "direct": lambda env, bouncer: {"DATABASE_POOLER": "none"},
    "pgbouncer": lambda env, bouncer: {"DATABASE_URL": bouncer.url(env.database_url), "DATABASE_POOLER": "transaction"},
    # direct, but as behind PgBouncer (no statement cache): what the setting costs without the hop
    "direct-nocache": lambda env, bouncer: {"DATABASE_POOLER": "transaction"},
}
OWN = ("intake", "worker", "receiver", "scheduler", "postgres", "redis", "pgbouncer")  # the sandbox is PagoEfectivo's


def one_round(env: h.Environment, args, mode: str, bouncer: PgBouncer, token: str,
              warm: list[dict], measured: list[dict], final_before: int) -> dict:
    """The services started with ``mode``'s settings, a warm-up, then ``measured`` timed."""
    system = h.System(env, processes=args.processes, threads=args.threads, intake=True,
                      sandbox_args=("--sync-status-mix", '{"pending": 1}'), extra_env=MODES[mode](env, bouncer),
                      worker_command=h.worker_command(args))
    with system:
        load = h.HttpLoad(f"{system.intake_url}/v1/refunds", token, warm, args.connections, env.work)
        load.go()
        load.result()
        asyncio.run(h.wait_final(final_before + len(warm), timeout=300, system=system))
        load = h.HttpLoad(f"{system.intake_url}/v1/refunds", token, measured, args.connections, env.work)
        try:
            bouncer_cpu = h.tree_cpu(bouncer.process.pid)
            with h.CpuMeter(system) as meter:
                load.go()
                done_at = asyncio.run(h.wait_final(final_before + len(warm) + len(measured), timeout=args.timeout,
                                                   system=system, every=0.25))
            meter.add("pgbouncer", h.tree_cpu(bouncer.process.pid) - bouncer_cpu)
            intake = load.result()
        finally:
            load.kill()
        ledger = h.check_ledger(system)
    seconds = done_at - intake["started_at"]
    own_cpu = sum(meter.seconds.get(kind, 0.0) for kind in OWN)
    return {"mode": mode, "refunds": len(measured), "seconds": seconds, "refunds_per_s": len(measured) / seconds,
            "own_cpu_ms_per_refund": 1000 * own_cpu / len(measured), "cpu_s_per_1000": meter.per_thousand(len(measured)),
            "other_cores": meter.other_cores, "intake_statuses": intake["statuses"], "intake_p99_ms": intake["p99_ms"],
            "ledger": ledger}


def run(args) -> dict:
    merchants = [f"pgb-{i:02d}" for i in range(args.merchants)]
    modes = args.modes.split(",") * args.rounds
    if set(modes) - set(MODES) or "direct" not in modes:
        raise SystemExit(f"--modes: a comma-separated choice of {', '.join(MODES)}, direct among them")
    warmup = max(100, args.refunds // 10)
    with h.seeded_environment("pgbouncer", args, {m: HIGH_LIMIT for m in merchants}) as (env, figures):
        batches = [(h.spread(merchants, warmup, f"W{i}"), h.spread(merchants, args.refunds, f"M{i}"))
                   for i in range(len(modes))]
        h.log(f"seeding {len(modes) * (warmup + args.refunds)} refunds' payments")
        asyncio.run(h.seed_payments(env, [r for warm, measured in batches for r in warm + measured]))
        token = asyncio.run(h.create_intake_token(env))
        figures["pooler"] = {"version": pgbouncer_version(), "pool_mode": "transaction",
                                "default_pool_size": args.pool_size}
        rounds, final = [], 0
        with PgBouncer(env.admin_url, pool_size=args.pool_size) as bouncer:
            for index, (mode, (warm, measured)) in enumerate(zip(modes, batches)):
                h.log(f"round {index + 1}/{len(modes)}: {mode}, {args.refunds} refunds")
                rounds.append(one_round(env, args, mode, bouncer, token, warm, measured, final))
                final += len(warm) + len(measured)
                h.log(f"  {rounds[-1]['refunds_per_s']:.0f} refunds/s; ledger {rounds[-1]['ledger']}")
    figures["rounds"] = rounds
    figures["modes"] = {}
    for mode in dict.fromkeys(modes):
        mine = [r for r in rounds if r["mode"] == mode]
        figures["modes"][mode] = {key: sum(r[key] for r in mine) / len(mine)
                                  for key in ("refunds_per_s", "own_cpu_ms_per_refund", "other_cores")}
    return figures


def report(f: dict) -> None:
    a = f["args"]
    h.print_report_header(f)
    p = f["pooler"]
    print(f"workers: {a['processes']} processes x {a['threads']} threads; {a['merchants']} merchants; intake load "
          f"{a['connections']} connections; {p['version']}, pool_mode {p['pool_mode']}, "
          f"default_pool_size {p['default_pool_size']}")
    for r in f["rounds"]:
        print(f"  {r['mode']:<14} {r['refunds']} refunds in {r['seconds']:.1f} s = {r['refunds_per_s']:.0f}/s, "
              f"{r['own_cpu_ms_per_refund']:.2f} CPU ms per refund (ours, PgBouncer included), other jobs "
              f"{r['other_cores']:.2f} cores; intake p99 {r['intake_p99_ms']:.0f} ms {r['intake_statuses']}; "
              f"ledger: {r['ledger']}")
    direct = f["modes"]["direct"]
    for mode, m in f["modes"].items():
        print(f"{mode:<14} mean {m['refunds_per_s']:.0f} refunds/s, {m['own_cpu_ms_per_refund']:.2f} CPU ms per refund"
              + ("" if mode == "direct" else
                 f"; RATIO {mode} : direct = {m['refunds_per_s'] / direct['refunds_per_s']:.3f} in refunds/s, "
                 f"{m['own_cpu_ms_per_refund'] / direct['own_cpu_ms_per_refund']:.3f} in CPU per refund"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--refunds", type=int, default=3000, help="refunds measured per round (a 10%% warm-up first)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each mode, alternated")
    parser.add_argument("--modes", default="direct,pgbouncer",
                        help=f"comma-separated, in the order of each round: {', '.join(MODES)}")
    parser.add_argument("--merchants", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64, help="keep-alive connections of the load process")
    parser.add_argument("--pool-size", type=int, default=20, help="PgBouncer's default_pool_size (server connections)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds to wait for a round's refunds")
    h.add_common_options(parser)
    args = parser.parse_args(argv)
    return h.run_and_report(args, run, report)


if __name__ == "__main__":
    sys.exit(main())
