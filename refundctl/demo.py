"""`refundctl demo`: the whole system on the embedded default, driven end to end.

Every service runs as its own process, as in the Procfile. Payments arrive as real
signed `cip.paid` notifications from the sandbox gateway; refunds go in through the
intake API; the run ends with a summary and a check of the sandbox ledger against the
database. Exit 0 only if every accepted refund reached a final state and they agree.

Once the services are up it prints one line ``METRICS {"targets": {...}, "logs": DIR}``
(what a Prometheus should scrape). Hooks for tests, from the environment:
REFUNDS_DEMO_LOG_DIR (keep the services' logs there), REFUNDS_DEMO_HOLD_FILE (wait for
that file before sending traffic), REFUNDS_DEMO_SECRET_KEY and REFUNDS_DEMO_PRIVATE_KEY_FILE
(known credentials for every merchant, to prove they never reach a log).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import secrets
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import aiohttp
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pagoefectivo.protocol import dumps, loads, public_key_pem

from refunds import db
from .embedded import provide_services
from refunds.merchants import add_merchant, get_merchant
from refunds.payments import record_payment
from .onboarding import onboard, record_paid
from .processes import ServiceGroup, free_port
from refunds.service import Usage
from refunds.states import FINAL
from refunds.tokens import create_token
from refunds.vault import Vault, generate_master_key, vault_from_settings

console = Console()
PAYMENT_AMOUNT = Decimal("300.00")
REFUNDS_PER_PAYMENT = 3
INTAKE_CONCURRENCY = 32
INVALID_KINDS = ("amount_over_refundable", "unknown_transaction", "refund_window_closed")


@dataclass
class Plan:
    """What the demo will ask for, and what it expects to be refused."""

    requests: list[dict] = field(default_factory=list)
    expected_refusals: Counter = field(default_factory=Counter)


@dataclass
class Outcome:
    accepted: dict[str, str] = field(default_factory=dict)  # refund_id -> merchant
    refused: Counter = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)


def run_demo(*, refunds: int = 1000, merchants: int = 5, chaos: bool = False, keep_running: bool = False,
             log_dir: str | None = None) -> int:
    """``log_dir`` (or REFUNDS_DEMO_LOG_DIR): keep each service's log there instead of in the temp dir."""
    if refunds < 1 or merchants < 1:
        raise Usage("--refunds and --merchants must be at least 1")
    log_dir = log_dir or os.environ.get("REFUNDS_DEMO_LOG_DIR") or None
    with provide_services() as services, tempfile.TemporaryDirectory(prefix="refunds-demo-") as work:
        work_dir = Path(work)
        metrics_dir = work_dir / "metrics"
        metrics_dir.mkdir()
        logs_dir = Path(log_dir) if log_dir else work_dir
        logs_dir.mkdir(parents=True, exist_ok=True)
        ports = {name: free_port() for name in ("sandbox", "receiver", "intake", "metrics", "scheduler_metrics",
                                                 "intake_metrics", "receiver_metrics")}
        env = {
            **os.environ,
            "DATABASE_URL": services.database_url,
            "REDIS_URL": services.redis_url,
            "REFUNDS_MASTER_KEY": os.environ.get("REFUNDS_MASTER_KEY") or generate_master_key(),
            "PAGOEFECTIVO_ENV": "sandbox",
            "PAGOEFECTIVO_BASE_URL": f"http://127.0.0.1:{ports['sandbox']}",
            "REFUNDS_NOTIFY_URL": f"http://127.0.0.1:{ports['receiver']}",
            "RECEIVER_PORT": str(ports["receiver"]),
            "RECEIVER_JOURNAL_DIR": str(work_dir / "receiver-journal"),
            "RECEIVER_HOST": "127.0.0.1",
            "INTAKE_PORT": str(ports["intake"]),
            "INTAKE_HOST": "127.0.0.1",
            "METRICS_PORT": str(ports["metrics"]),
            "METRICS_HOST": "127.0.0.1",
            "SCHEDULER_METRICS_PORT": str(ports["scheduler_metrics"]),
            "INTAKE_METRICS_PORT": str(ports["intake_metrics"]),
            "RECEIVER_METRICS_PORT": str(ports["receiver_metrics"]),
            "SCHEDULER_INTERVAL": "1",
        }
        os.environ.update({k: env[k] for k in ("DATABASE_URL", "REDIS_URL", "REFUNDS_MASTER_KEY")})
        from refunds.settings import get_settings

        get_settings.cache_clear()
        console.print(f"[bold]refundctl demo[/bold]: {refunds} refunds across {merchants} merchants"
                      f" ({'embedded' if services.embedded else 'external'} Postgres and Redis)")
        asyncio.run(db.migrate(services.database_url))
        vault = vault_from_settings(get_settings())
        merchant_ids, token = asyncio.run(_seed_merchants(services.database_url, vault, merchants))

        group = ServiceGroup(env=env, log_dir=logs_dir)
        try:
            # notifications as PagoEfectivo publishes them (an attempt and a second one), the wait compressed
            sandbox_args = ["-m", "pagoefectivo.sandbox", "--port", str(ports["sandbox"]),
                            "--notification-time-scale", "0.01"]
            if chaos:
                sandbox_args += ["--error-rate", "0.05", "--timeout-after-commit-rate", "0.02",
                                 "--notification-duplicate-rate", "0.2", "--notification-reorder-rate", "0.1"]
            sandbox = group.start("sandbox", *sandbox_args)
            receiver = group.start("receiver", "-m", "receiver")
            intake = group.start("intake", "-m", "producers.http")
            worker = group.start("worker", "-m", "dramatiq", "workers", "--processes", "2", "--threads", "8",
                                 extra_env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)})
            scheduler = group.start("scheduler", "-m", "workers.scheduler")
            group.wait_healthy(sandbox, f"{env['PAGOEFECTIVO_BASE_URL']}/healthz")
            # the gateway keeps its own registry: each seller hands it its keys and notify URL
            asyncio.run(_onboard(services.database_url, vault, merchant_ids, env["PAGOEFECTIVO_BASE_URL"],
                                 env["REFUNDS_NOTIFY_URL"]))
            group.wait_healthy(receiver, f"{env['REFUNDS_NOTIFY_URL']}/healthz")
            group.wait_healthy(intake, f"http://127.0.0.1:{ports['intake']}/healthz")
            scrape = {"intake": f"127.0.0.1:{ports['intake_metrics']}",
                      "receiver": f"127.0.0.1:{ports['receiver_metrics']}",
                      "worker": f"127.0.0.1:{ports['metrics']}", "scheduler": f"127.0.0.1:{ports['scheduler_metrics']}"}
            group.wait_healthy(worker, f"http://{scrape['worker']}/metrics")
            group.wait_healthy(scheduler, f"http://{scrape['scheduler']}/metrics")
            # one machine-readable line: what to scrape (a Prometheus can follow the run) and where the logs are
            print("METRICS " + json.dumps({"targets": scrape, "logs": str(logs_dir)}), flush=True)
            if os.environ.get("REFUNDS_DEMO_HOLD_FILE"):  # test hook: let a Prometheus scrape the idle services first
                _hold_until(Path(os.environ["REFUNDS_DEMO_HOLD_FILE"]), group)
            ok = asyncio.run(_drive(
                group, env, services.database_url, merchant_ids, token, refunds, ports, metrics_dir,
            ))
            if keep_running:
                console.print(f"services keep running; intake on http://127.0.0.1:{ports['intake']}. Ctrl-C to stop.")
                try:
                    while True:
                        group.check_alive()
                        time.sleep(1)
                except KeyboardInterrupt:
                    pass
        except RuntimeError as exc:
            console.print(f"[red]demo failed:[/red] {exc}")
            ok = False
        finally:
            group.stop()
        return 0 if ok else 1


async def _seed_merchants(dsn: str, vault: Vault, count: int) -> tuple[list[str], str]:
    # test hooks: known credentials for every merchant, so a test can prove they never reach a log
    known_secret = os.environ.get("REFUNDS_DEMO_SECRET_KEY") or None
    known_key_file = os.environ.get("REFUNDS_DEMO_PRIVATE_KEY_FILE")
    known_private_pem = Path(known_key_file).read_bytes() if known_key_file else None
    conn = await db.connect(dsn)
    try:
        ids = []
        for index in range(count):
            merchant_id = f"demo-seller-{index + 1}"
            private_pem = known_private_pem or _new_private_pem()
            await add_merchant(
                conn, vault, merchant_id=merchant_id, env="sandbox", service_id=1000 + index,
                access_key=f"AKDEMO{index + 1:04d}", secret_key=known_secret or secrets.token_urlsafe(30),
                private_key_pem=private_pem, public_key_pem=public_key_pem(private_pem),
                rate_limit=Decimal(40 + 20 * index),
            )
            ids.append(merchant_id)
        await conn.execute("DELETE FROM api_tokens WHERE name = 'demo'")
        token = await create_token(conn, "demo", ids)
        return ids, token
    finally:
        await conn.close()


async def _onboard(dsn: str, vault: Vault, merchant_ids: list[str], sandbox_url: str, receiver_url: str) -> None:
    conn = await db.connect(dsn)
    try:
        async with aiohttp.ClientSession() as http:
            for merchant_id in merchant_ids:
                await onboard(http, sandbox_url, await get_merchant(conn, merchant_id), vault,
                              receiver_url=receiver_url)
    finally:
        await conn.close()


def _hold_until(path: Path, group: ServiceGroup, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear within {timeout:.0f}s (REFUNDS_DEMO_HOLD_FILE)")
        group.check_alive()
        time.sleep(0.1)


def _new_private_pem() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


async def _drive(group, env, dsn, merchant_ids, token, total, ports, metrics_dir) -> bool:
    sandbox_url = env["PAGOEFECTIVO_BASE_URL"]
    intake_url = f"http://127.0.0.1:{ports['intake']}"
    conn = await db.connect(dsn)
    started = time.monotonic()
    try:
        async with aiohttp.ClientSession() as http:
            invalid = max(3, total // 50) if total >= 20 else 0
            valid = total - invalid
            payments = await _create_payments(http, conn, group, sandbox_url, merchant_ids, valid)
            old = await _record_old_payments(http, conn, sandbox_url, merchant_ids)
            plan = _plan(payments, old, merchant_ids, valid, invalid)
            outcome = await _submit(http, intake_url, token, plan)
            finished = await _await_final(conn, group, outcome)
            ledger = loads(await (await http.get(f"{sandbox_url}/sandbox/ledger")).read())
            receiver_metrics = await (await http.get(f"http://127.0.0.1:{ports['receiver_metrics']}/metrics")).text()
        return await _summarise(conn, outcome, plan, ledger, receiver_metrics, metrics_dir, finished,
                                time.monotonic() - started)
    finally:
        await conn.close()


async def _create_payments(http, conn, group, sandbox_url, merchant_ids, valid) -> list[tuple[str, str]]:
    """Pay through the sandbox; each payment reaches us as a signed cip.paid notification."""
    count = max(1, -(-valid // REFUNDS_PER_PAYMENT))
    payments = []
    with _progress() as progress:
        task = progress.add_task("paying orders (cip.paid)", total=count)
        for index in range(count):
            merchant_id = merchant_ids[index % len(merchant_ids)]
            response = await http.post(f"{sandbox_url}/sandbox/payments", data=dumps({
                "merchantId": merchant_id, "transactionCode": f"ORDER-{index + 1:06d}",
                "amount": PAYMENT_AMOUNT, "currency": "PEN", "method": "cash",
            }), headers={"Content-Type": "application/json"})
            body = loads(await response.read())
            if response.status != 200:
                raise RuntimeError(f"sandbox refused a payment: {body}")
            payments.append((merchant_id, str(body["cip"])))
            progress.update(task, advance=1)
        task = progress.add_task("payments recorded by the receiver", total=count)
        deadline = time.monotonic() + 60
        while True:
            recorded = await conn.fetchval("SELECT count(*) FROM payments WHERE transaction_code LIKE 'ORDER-%'")
            progress.update(task, completed=recorded)
            if recorded >= count:
                return payments
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {recorded} of {count} cip.paid notifications were recorded")
            group.check_alive()
            await asyncio.sleep(0.1)


async def _record_old_payments(http, conn, sandbox_url, merchant_ids) -> list[tuple[str, str]]:
    """Payments made long ago, known to both parties: refunds against them must be refused
    (window closed)."""
    paid_at = datetime.now(timezone.utc) - timedelta(days=120)
    old = []
    for merchant_id in merchant_ids:
        transaction_id = f"OLD-{merchant_id}"
        payment = dict(merchant_id=merchant_id, transaction_id=transaction_id, amount=PAYMENT_AMOUNT,
                       currency="PEN", method="cash", paid_at=paid_at)
        await record_paid(http, sandbox_url, **payment)
        await record_payment(conn, **payment)
        old.append((merchant_id, transaction_id))
    return old


def _plan(payments, old, merchant_ids, valid, invalid) -> Plan:
    rng = random.Random(7)
    plan = Plan()
    run = secrets.token_hex(3)
    for index in range(valid):
        merchant_id, cip = payments[index // REFUNDS_PER_PAYMENT]
        amount = Decimal(rng.randint(100, 10000)) / 100  # 1.00 .. 100.00: three always fit in 300.00
        plan.requests.append(_request(merchant_id, cip, amount, f"demo-{run}-{index + 1:06d}"))
    for index in range(invalid):
        kind = INVALID_KINDS[index % len(INVALID_KINDS)]
        merchant_id = merchant_ids[index % len(merchant_ids)]
        ref = f"demo-{run}-bad-{index + 1:04d}"
        if kind == "amount_over_refundable":
            _, cip = payments[(index * 7) % len(payments)]
            merchant_id = payments[(index * 7) % len(payments)][0]
            plan.requests.append(_request(merchant_id, cip, PAYMENT_AMOUNT + 1, ref))
        elif kind == "unknown_transaction":
            plan.requests.append(_request(merchant_id, f"NO-SUCH-CIP-{index}", Decimal("5.00"), ref))
        else:
            _, transaction_id = old[index % len(old)]
            plan.requests.append(_request(old[index % len(old)][0], transaction_id, Decimal("5.00"), ref))
        plan.expected_refusals[kind] += 1
    rng.shuffle(plan.requests)
    return plan


def _request(merchant_id: str, transaction_id: str, amount: Decimal, external_ref: str) -> dict:
    return {"merchant_id": merchant_id, "original_transaction_id": transaction_id, "amount": f"{amount:.2f}",
            "currency": "PEN", "external_ref": external_ref, "reason": "demo"}


async def _submit(http, intake_url, token, plan: Plan) -> Outcome:
    outcome = Outcome()
    queue: asyncio.Queue = asyncio.Queue()
    for request in plan.requests:
        queue.put_nowait(request)
    headers = {"Authorization": f"Bearer {token}"}

    with _progress() as progress:
        task = progress.add_task("refund requests (intake API)", total=len(plan.requests))

        async def sender():
            while not queue.empty():
                request = queue.get_nowait()
                async with http.post(f"{intake_url}/v1/refunds", json=request, headers=headers) as response:
                    body = await response.json()
                if response.status in (200, 202):
                    outcome.accepted[body["refund_id"]] = request["merchant_id"]
                elif response.status == 422:
                    outcome.refused[body["error"]["code"]] += 1
                else:
                    outcome.unexpected.append(f"{response.status} {body}")
                progress.update(task, advance=1)

        await asyncio.gather(*(sender() for _ in range(INTAKE_CONCURRENCY)))
    return outcome


async def _await_final(conn, group, outcome: Outcome) -> bool:
    """Show progress until every accepted refund is final (or stop making progress)."""
    total, ids = len(outcome.accepted), list(outcome.accepted)
    stall_limit, last_count, last_change = 120.0, -1, time.monotonic()
    with _progress() as progress:
        task = progress.add_task("refunds reaching a final state", total=total)
        while True:
            done = await conn.fetchval(
                "SELECT count(*) FROM refunds WHERE refund_id = ANY($1::uuid[]) AND state = ANY($2::text[])",
                ids, list(FINAL))
            progress.update(task, completed=done)
            if done >= total:
                return True
            if done != last_count:
                last_count, last_change = done, time.monotonic()
            elif time.monotonic() - last_change > stall_limit:
                return False
            group.check_alive()
            await asyncio.sleep(0.2)


async def _summarise(conn, outcome, plan, ledger, receiver_metrics, metrics_dir, finished, elapsed) -> bool:
    ids = list(outcome.accepted)
    states = dict(await conn.fetch(
        "SELECT state, count(*) FROM refunds WHERE refund_id = ANY($1::uuid[]) GROUP BY state", ids))
    p50, p95, p99 = await conn.fetchval(
        """SELECT percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP
                  (ORDER BY EXTRACT(EPOCH FROM completed_at - created_at))
           FROM refunds WHERE refund_id = ANY($1::uuid[]) AND completed_at IS NOT NULL""", ids) or (None, None, None)
    span = await conn.fetchval(
        """SELECT EXTRACT(EPOCH FROM max(completed_at) - min(created_at))
           FROM refunds WHERE refund_id = ANY($1::uuid[]) AND completed_at IS NOT NULL""", ids)
    # the sandbox started with this run, so its ledger must hold exactly this run's succeeded refunds
    succeeded = {
        (r["merchant_id"], r["external_ref"]): r["amount"]
        for r in await conn.fetch(
            "SELECT merchant_id, external_ref, amount FROM refunds WHERE state = 'succeeded' AND refund_id = ANY($1::uuid[])",
            ids)
    }
    executed = Counter((e["merchantId"], e["externalRef"]) for e in ledger)
    ledger_amounts = {(e["merchantId"], e["externalRef"]): Decimal(str(e["refundAmount"])) for e in ledger}
    twice = [key for key, n in executed.items() if n > 1]
    ledger_agrees = not twice and ledger_amounts == succeeded
    duplicates = _sum_metric(receiver_metrics, "refund_notifications_total", 'result="duplicate"')
    waits = _multiprocess_total(metrics_dir, "refund_rate_limit_waits_total")
    refusals_ok = outcome.refused == plan.expected_refusals and not outcome.unexpected

    table = Table(title="refundctl demo: summary")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("requests sent", str(len(plan.requests)))
    table.add_row("accepted", str(len(outcome.accepted)))
    for reason, count in sorted(outcome.refused.items()):
        table.add_row(f"refused: {reason}", str(count))
    for state in ("succeeded", "failed", "rejected", "manual_review", "pending", "submitted", "queued"):
        if states.get(state):
            table.add_row(f"final state: {state}" if state in FINAL else f"NOT final: {state}", str(states[state]))
    for label, value in (("p50", p50), ("p95", p95), ("p99", p99)):
        table.add_row(f"time to final state {label}", f"{value:.3f} s" if value is not None else "-")
    table.add_row("refunds/s (accepted → final)", f"{len(outcome.accepted) / float(span):.1f}" if span else "-")
    table.add_row("duplicate notifications suppressed", str(int(duplicates)))
    table.add_row("rate-limit waits", str(int(waits)))
    table.add_row("sandbox ledger entries", str(len(ledger)))
    table.add_row("ledger agrees with database", "yes" if ledger_agrees else "NO")
    table.add_row("wall time", f"{elapsed:.1f} s")
    console.print(table)
    if outcome.unexpected:
        console.print(f"[red]unexpected intake answers:[/red] {outcome.unexpected[:5]}")
    if not refusals_ok:
        console.print(f"[red]refusals differ from plan:[/red] expected {dict(plan.expected_refusals)}")
    if twice:
        console.print(f"[red]executed more than once:[/red] {twice[:5]}")
    ok = finished and ledger_agrees and refusals_ok
    console.print("[green]OK[/green]: every accepted refund is final and the ledger agrees" if ok
                  else "[red]FAILED[/red]")
    return ok


def _sum_metric(text: str, name: str, selector: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and selector in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def _multiprocess_total(path: Path, name: str) -> float:
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(path))
    return sum(sample.value for metric in registry.collect() for sample in metric.samples
               if sample.name == name)


def _progress() -> Progress:
    return Progress(TextColumn("{task.description:<34}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=False)
