"""refundctl refund: operator work on refunds."""

from __future__ import annotations

import asyncio
import json
import sys

from .common import (
    NotFound, RefundRefused, RefundsError, emit, table, with_conn, with_json,
)


def cmd_refund_create(args) -> int:
    from producers import enqueue_refund

    async def run(conn):
        return await enqueue_refund(
            conn, merchant_id=args.merchant, original_transaction_id=args.transaction, amount=args.amount,
            currency=args.currency, external_ref=args.external_ref, reason=args.reason, requested_by=args.requested_by,
        )

    try:
        result = asyncio.run(with_conn(run))
    except RefundRefused as refused:
        error = {"code": refused.code, "message": refused.message, "field": refused.field}
        if args.json:
            print(json.dumps({"error": error}, indent=2))
        print(f"refused: {refused.message}", file=sys.stderr)
        return 1
    document = {**result.refund.to_json(), "replay": not result.created}
    emit(args, document, lambda: print(
        f"refund {result.refund.refund_id} {'accepted' if result.created else 'already accepted'}: {result.refund.state}"
    ))
    return 0


def cmd_refund_list(args) -> int:
    from ..records import list_refunds

    refunds = asyncio.run(with_conn(lambda conn: list_refunds(conn, merchant_id=args.merchant, state=args.state)))
    views = [r.to_json() for r in refunds]
    emit(args, views, lambda: table(
        "refunds", ["refund", "merchant", "external ref", "transaction", "amount", "state", "updated"],
        [[v["refund_id"], v["merchant_id"], v["external_ref"], v["original_transaction_id"],
          f'{v["amount"]} {v["currency"]}', v["state"], v["updated_at"]] for v in views],
    ))
    return 0


def cmd_refund_show(args) -> int:
    from uuid import UUID

    from ..records import find_by_external_ref, find_refund, refund_events

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

    refund, events = asyncio.run(with_conn(run))
    document = {**refund.to_json(), "events": events}

    def human():
        for key, value in refund.to_json().items():
            print(f"{key:>24}: {'' if value is None else value}")
        table("history", ["at", "from", "to", "by", "code", "message"],
               [[e["occurred_at"], e["from_state"], e["to_state"], e["actor"], e["code"], e["message"]] for e in events])

    emit(args, document, human)
    return 0



def register(sub) -> None:
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
