"""refundctl payment: original paid transactions."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone

from .common import (
    RefundRefused, RefundsError, Usage, emit, emit_page, merchant_id, page, table, with_conn, with_json, with_page,
)


def cmd_payment_record(args) -> int:
    """One payment, checked as a row of ``payment import`` is; held already with other terms is a
    conflict (exit 1), never reported as recorded."""
    from refunds.payments import record_payment

    from ..payment_import import paid_row

    cells = {"merchant_id": args.merchant, "transaction_id": args.transaction, "amount": args.amount,
             "currency": args.currency, "method": args.method, "paid_at": args.paid_at or ""}
    try:
        row = paid_row(cells, datetime.now(timezone.utc))
    except RefundRefused as refused:  # a bad argument, not a refund refused
        option = {"merchant_id": "merchant", "transaction_id": "transaction"}.get(refused.field, refused.field or "")
        raise Usage(f"--{option.replace('_', '-')}: {refused.message}") from None

    async def run(conn):
        return await record_payment(conn, **row.payment)

    payment, created = asyncio.run(with_conn(run))
    if (payment.amount, payment.currency) != (row.amount, row.currency):
        raise RefundsError(f"payment {payment.transaction_id} is already recorded with {payment.amount} "
                           f"{payment.currency}, not {row.amount} {row.currency}; nothing was changed")
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



def cmd_payment_import(args) -> int:
    """Payments whose cip.paid never came (docs/OPERATIONS.md): which we lack, and filling them."""
    from ..payment_import import PaymentFileError, import_payments, read_rows

    try:
        rows = read_rows(args.file)
        outcomes = asyncio.run(with_conn(lambda conn: import_payments(conn, rows, dry_run=args.dry_run)))
    except PaymentFileError as exc:
        raise Usage(str(exc)) from None
    views = [o.to_json() for o in outcomes]
    counts = {kind: sum(1 for v in views if v["outcome"] == kind) for kind in ("missing", "recorded", "known",
                                                                                "conflict")}
    emit(args, {"payments": views, "counts": counts}, lambda: (table(
        "payments" + (" (dry run: nothing recorded)" if args.dry_run else ""),
        ["line", "merchant", "transaction", "amount", "currency", "outcome", "held"],
        [[v["line"], v["merchant_id"], v["transaction_id"], v["amount"], v["currency"], v["outcome"],
          v["held"] or ""] for v in views if v["outcome"] != "known" or args.verbose]),
        print(", ".join(f"{count} {kind}" for kind, count in counts.items()))))
    return 1 if counts["missing"] or counts["conflict"] else 0


def register(sub) -> None:
    payment = sub.add_parser("payment", help="original paid transactions: record, list, import").add_subparsers(dest="payment_command", required=True)
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
    imp = with_json(payment.add_parser(
        "import", help="payments whose cip.paid never came, from a CSV of paid CIPs (docs/OPERATIONS.md)"))
    imp.add_argument("file", help="CSV: merchant_id,transaction_id,amount,currency[,method][,paid_at]")
    imp.add_argument("--dry-run", action="store_true", help="only say which payments we lack (exit 1 if any)")
    imp.add_argument("--verbose", action="store_true", help="list the rows we already hold too")
    imp.set_defaults(func=cmd_payment_import)
