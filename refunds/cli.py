"""refundctl: the operator's command line (CONTRACT §1)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

from .errors import ConfigError, NotFound, RefundRefused, RefundsError


def _settings():
    from .settings import get_settings

    return get_settings()


def _dsn() -> str:
    return _settings().require("database_url")


def _vault():
    from .vault import Vault

    return Vault(_settings().master_key())


def _emit(args, document, human) -> None:
    """Print one JSON document with --json, else the human form."""
    if getattr(args, "json", False):
        print(json.dumps(document, indent=2, default=str))
    else:
        human()


def _table(title: str, columns: list[str], rows: list[list]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*["" if v is None else str(v) for v in row])
    Console().print(table)


async def _with_conn(fn):
    from . import db

    conn = await db.connect(_dsn())
    try:
        return await fn(conn)
    finally:
        await conn.close()


# --- db / keys ----------------------------------------------------------------------

def cmd_db_migrate(args) -> int:
    from . import db

    asyncio.run(db.migrate(_dsn()))
    print("schema applied")
    return 0


def cmd_keys_generate(args) -> int:
    from .vault import generate_master_key

    print(generate_master_key())
    return 0


# --- merchants ----------------------------------------------------------------------

def cmd_merchant_add(args) -> int:
    from pagoefectivo.protocol import public_key_pem

    from .merchants import add_merchant

    secret = Path(args.secret_key_file).read_text().strip()
    private_pem = Path(args.private_key_file).read_bytes()
    try:
        public_pem = public_key_pem(private_pem)
    except (ValueError, TypeError) as exc:
        raise RefundsError(f"--private-key-file is not an unencrypted PEM RSA private key: {exc}") from None
    if not secret:
        raise RefundsError("--secret-key-file is empty")
    vault = _vault()

    async def run(conn):
        return await add_merchant(
            conn, vault, merchant_id=args.id, env=args.env, service_id=args.service_id, access_key=args.access_key,
            secret_key=secret, private_key_pem=private_pem, public_key_pem=public_pem,
            rate_limit=Decimal(args.rate_limit), refund_mode=args.refund_mode, notify_url=args.notify_url,
            approval_threshold=Decimal(args.approval_threshold) if args.approval_threshold else None,
        )

    merchant = asyncio.run(_with_conn(run))
    _emit(args, merchant.public_view(), lambda: print(f"merchant {merchant.merchant_id} saved ({merchant.env})"))
    return 0


def cmd_merchant_list(args) -> int:
    from .merchants import list_merchants

    merchants = asyncio.run(_with_conn(list_merchants))
    views = [m.public_view() for m in merchants]
    _emit(args, views, lambda: _table(
        "merchants", ["merchant", "env", "service id", "rate/s", "mode", "approval above"],
        [[v["merchant_id"], v["env"], v["service_id"], v["rate_limit"], v["refund_mode"], v["approval_threshold"]] for v in views],
    ))
    return 0


# --- tokens -------------------------------------------------------------------------

def cmd_token_create(args) -> int:
    from .tokens import create_token

    token = asyncio.run(_with_conn(lambda conn: create_token(conn, args.name, args.merchant)))
    _emit(args, {"name": args.name, "token": token}, lambda: print(token))
    return 0


# --- payments -----------------------------------------------------------------------

def cmd_payment_record(args) -> int:
    from .money import parse_amount, parse_currency
    from .payments import record_payment

    paid_at = datetime.fromisoformat(args.paid_at) if args.paid_at else datetime.now(timezone.utc)
    if paid_at.tzinfo is None:
        raise RefundsError("--paid-at must carry a UTC offset, e.g. 2026-11-20T10:00:00-05:00")
    amount, currency = parse_amount(args.amount), parse_currency(args.currency)

    async def run(conn):
        return await record_payment(
            conn, merchant_id=args.merchant, transaction_id=args.transaction, amount=amount, currency=currency,
            method=args.method, paid_at=paid_at,
        )

    payment, created = asyncio.run(_with_conn(run))
    _emit(args, payment.to_json(), lambda: print(
        f"payment {payment.transaction_id} {'recorded' if created else 'already recorded'}: "
        f"{payment.amount} {payment.currency}"
    ))
    return 0


def cmd_payment_list(args) -> int:
    from .payments import list_payments

    payments = asyncio.run(_with_conn(lambda conn: list_payments(conn, args.merchant)))
    views = [p.to_json() for p in payments]
    _emit(args, views, lambda: _table(
        "payments", ["merchant", "transaction", "amount", "currency", "method", "paid at", "refunded"],
        [[v["merchant_id"], v["transaction_id"], v["amount"], v["currency"], v["method"], v["paid_at"], v["refunded_amount"]] for v in views],
    ))
    return 0


# --- refunds ------------------------------------------------------------------------

def cmd_refund_create(args) -> int:
    from producers import enqueue_refund

    async def run(conn):
        return await enqueue_refund(
            conn, merchant_id=args.merchant, original_transaction_id=args.transaction, amount=args.amount,
            currency=args.currency, external_ref=args.external_ref, reason=args.reason, requested_by=args.requested_by,
        )

    try:
        result = asyncio.run(_with_conn(run))
    except RefundRefused as refused:
        error = {"code": refused.code, "message": refused.message, "field": refused.field}
        if args.json:
            print(json.dumps({"error": error}, indent=2))
        print(f"refused: {refused.message}", file=sys.stderr)
        return 1
    document = {**result.refund.to_json(), "replay": not result.created}
    _emit(args, document, lambda: print(
        f"refund {result.refund.refund_id} {'accepted' if result.created else 'already accepted'}: {result.refund.state}"
    ))
    return 0


def cmd_refund_list(args) -> int:
    from .records import list_refunds

    refunds = asyncio.run(_with_conn(lambda conn: list_refunds(conn, merchant_id=args.merchant, state=args.state)))
    views = [r.to_json() for r in refunds]
    _emit(args, views, lambda: _table(
        "refunds", ["refund", "merchant", "external ref", "transaction", "amount", "state", "updated"],
        [[v["refund_id"], v["merchant_id"], v["external_ref"], v["original_transaction_id"],
          f'{v["amount"]} {v["currency"]}', v["state"], v["updated_at"]] for v in views],
    ))
    return 0


def cmd_refund_show(args) -> int:
    from uuid import UUID

    from .records import find_by_external_ref, find_refund, refund_events

    async def run(conn):
        refund = None
        try:
            refund = await find_refund(conn, UUID(args.ref))
        except ValueError:
            pass
        if refund is None:
            rows = await conn.fetch("SELECT merchant_id FROM refunds WHERE external_ref = $1", args.ref)
            if len(rows) > 1:
                raise RefundsError(f"external ref {args.ref!r} is used by several merchants; give the refund id")
            if rows:
                refund = await find_by_external_ref(conn, rows[0]["merchant_id"], args.ref)
        if refund is None:
            raise NotFound(f"no refund with id or external ref {args.ref!r}")
        return refund, await refund_events(conn, refund.refund_id)

    refund, events = asyncio.run(_with_conn(run))
    document = {**refund.to_json(), "events": events}

    def human():
        for key, value in refund.to_json().items():
            print(f"{key:>24}: {'' if value is None else value}")
        _table("history", ["at", "from", "to", "by", "code", "message"],
               [[e["occurred_at"], e["from_state"], e["to_state"], e["actor"], e["code"], e["message"]] for e in events])

    _emit(args, document, human)
    return 0


# --- services -----------------------------------------------------------------------

def cmd_sandbox_serve(args, extra: list[str]) -> int:
    from pagoefectivo.sandbox import main as sandbox_main

    return sandbox_main(extra)


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(refunds=args.refunds, merchants=args.merchants, chaos=args.chaos, keep_running=args.keep_running)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="refundctl", description="PagoEfectivo refunds for marketplaces")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_json(p):
        p.add_argument("--json", action="store_true", help="print one JSON document")
        return p

    demo = sub.add_parser("demo", help="run the whole system on the embedded default")
    demo.add_argument("--refunds", type=int, default=1000)
    demo.add_argument("--merchants", type=int, default=5)
    demo.add_argument("--chaos", action="store_true", help="turn on gateway faults")
    demo.add_argument("--keep-running", action="store_true", help="keep the services up after the summary")
    demo.set_defaults(func=cmd_demo)

    dbp = sub.add_parser("db").add_subparsers(dest="db_command", required=True)
    dbp.add_parser("migrate", help="apply schema.sql (safe to run again)").set_defaults(func=cmd_db_migrate)

    keys = sub.add_parser("keys").add_subparsers(dest="keys_command", required=True)
    keys.add_parser("generate", help="print a new REFUNDS_MASTER_KEY").set_defaults(func=cmd_keys_generate)

    merchant = sub.add_parser("merchant").add_subparsers(dest="merchant_command", required=True)
    add = with_json(merchant.add_parser("add", help="add or update a seller and its credentials"))
    add.add_argument("--id", required=True)
    add.add_argument("--env", required=True, choices=["sandbox", "production"])
    add.add_argument("--service-id", required=True, type=int)
    add.add_argument("--access-key", required=True)
    add.add_argument("--secret-key-file", required=True)
    add.add_argument("--private-key-file", required=True)
    add.add_argument("--rate-limit", default="10", help="refunds per second at the gateway")
    add.add_argument("--approval-threshold", default=None)
    add.add_argument("--refund-mode", default="auto", choices=["auto", "approval", "off"])
    add.add_argument("--notify-url", default=None)
    add.set_defaults(func=cmd_merchant_add)
    with_json(merchant.add_parser("list")).set_defaults(func=cmd_merchant_list)

    token = sub.add_parser("token").add_subparsers(dest="token_command", required=True)
    create = with_json(token.add_parser("create", help="an intake API token scoped to merchants"))
    create.add_argument("--name", required=True)
    create.add_argument("--merchant", required=True, action="append")
    create.set_defaults(func=cmd_token_create)

    payment = sub.add_parser("payment").add_subparsers(dest="payment_command", required=True)
    record = with_json(payment.add_parser("record", help="record a paid original transaction"))
    record.add_argument("--merchant", required=True)
    record.add_argument("--transaction", required=True)
    record.add_argument("--amount", required=True)
    record.add_argument("--currency", required=True)
    record.add_argument("--method", default="cash", choices=["cash", "bank_transfer"])
    record.add_argument("--paid-at", default=None, help="ISO-8601 with offset (default: now)")
    record.set_defaults(func=cmd_payment_record)
    plist = with_json(payment.add_parser("list"))
    plist.add_argument("--merchant", default=None)
    plist.set_defaults(func=cmd_payment_list)

    refund = sub.add_parser("refund").add_subparsers(dest="refund_command", required=True)
    rcreate = with_json(refund.add_parser("create", help="request a refund"))
    rcreate.add_argument("--merchant", required=True)
    rcreate.add_argument("--transaction", required=True)
    rcreate.add_argument("--amount", required=True)
    rcreate.add_argument("--currency", required=True)
    rcreate.add_argument("--external-ref", required=True)
    rcreate.add_argument("--reason", default=None)
    rcreate.add_argument("--requested-by", default="refundctl")
    rcreate.set_defaults(func=cmd_refund_create)
    rlist = with_json(refund.add_parser("list"))
    rlist.add_argument("--merchant", default=None)
    rlist.add_argument("--state", default=None)
    rlist.set_defaults(func=cmd_refund_list)
    show = with_json(refund.add_parser("show", help="a refund and its whole event history"))
    show.add_argument("ref", help="refund id or external ref")
    show.set_defaults(func=cmd_refund_show)

    sandbox = sub.add_parser("sandbox").add_subparsers(dest="sandbox_command", required=True)
    serve = sandbox.add_parser("serve", help="the PagoEfectivo sandbox gateway (all sandbox flags pass through)",
                               add_help=False)
    serve.set_defaults(func=cmd_sandbox_serve, passthrough=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        if getattr(args, "passthrough", False):
            return args.func(args, extra)
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return args.func(args)
    except ConfigError as exc:
        print(f"refundctl: {exc}", file=sys.stderr)
        return 2
    except (RefundsError, OSError) as exc:
        print(f"refundctl: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
