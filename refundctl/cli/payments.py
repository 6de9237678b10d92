"""refundctl payment: original paid transactions."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone

from .common import (
    Usage, emit, emit_page, merchant_id, page, table, with_conn, with_json, with_page,
)


def cmd_payment_record(args) -> int:
    from refunds.money import parse_amount, parse_currency
    from refunds.payments import record_payment

    try:
        paid_at = datetime.fromisoformat(args.paid_at) if args.paid_at else datetime.now(timezone.utc)
    except ValueError:
        paid_at = None
    if paid_at is None or paid_at.tzinfo is None:
        raise Usage("--paid-at must be ISO-8601 with a UTC offset, e.g. 2026-11-20T10:00:00-05:00")
    amount, currency = parse_amount(args.amount), parse_currency(args.currency)

    async def run(conn):
        return await record_payment(
            conn, merchant_id=args.merchant, transaction_id=args.transaction, amount=amount, currency=currency,
            method=args.method, paid_at=paid_at,
        )

    payment, created = asyncio.run(with_conn(run))
    emit(args, payment.to_json(), lambda: print(
        f"payment {payment.transaction_id} {'recorded' if created else 'already recorded'}: "
        f"{payment.amount} {payment.currency}"
    ))
    return 0


def cmd_payment_list(args) -> int:
    from refunds.payments import list_payments

    payments = asyncio.run(with_conn(lambda conn: list_payments(conn, args.merchant)))
    shown, cursor = page(args, payments, lambda p: (p.merchant_id, p.transaction_id), parts=2)
    views = [p.to_json() for p in shown]
    emit_page(args, "payments", views, cursor, lambda: table(
        "payments", ["merchant", "transaction", "amount", "currency", "method", "paid at", "refunded"],
        [[v["merchant_id"], v["transaction_id"], v["amount"], v["currency"], v["method"], v["paid_at"], v["refunded_amount"]] for v in views],
    ))
    return 0



def register(sub) -> None:
    payment = sub.add_parser("payment").add_subparsers(dest="payment_command", required=True)
    record = with_json(payment.add_parser("record", help="record a paid original transaction"))
    record.add_argument("--merchant", required=True)
    record.add_argument("--transaction", required=True)
    record.add_argument("--amount", required=True)
    record.add_argument("--currency", required=True)
    record.add_argument("--method", default="cash", choices=["cash", "bank_transfer"])
    record.add_argument("--paid-at", default=None, help="ISO-8601 with offset (default: now)")
    record.set_defaults(func=cmd_payment_record)
    plist = with_page(payment.add_parser("list", help="by merchant and transaction"))
    plist.add_argument("--merchant", type=merchant_id, default=None)
    plist.set_defaults(func=cmd_payment_list)
