"""refundctl notifications: what PagoEfectivo told the receiver, for an operator to follow up.

``list --result unknown`` shows refund outcomes for refunds we never created and event
types we do not handle; ``--result mismatch`` those that contradict our records. Both were
answered 200 (so they are not sent again) and need a person.
"""

from __future__ import annotations

import asyncio

from .common import emit, emit_page, merchant_id, page, stamp, table, with_conn, with_json, with_page


def cmd_notifications_list(args) -> int:
    from receiver.inbox import list_notifications

    found = asyncio.run(with_conn(lambda conn: list_notifications(
        conn, result=args.result, merchant_id=args.merchant, event_type=args.event_type, limit=None)))
    shown, cursor = page(args, found, lambda n: (stamp(n.received_at), n.merchant_id, n.operation_number), parts=3,
                         newest_first=True)
    views = [n.to_json() for n in shown]
    emit_page(args, "notifications", views, cursor, lambda: table(
        "notifications", ["received", "merchant", "operation", "event", "result", "reference", "amount"],
        [[v["received_at"], v["merchant_id"], v["operation_number"], v["event_type"], v["result"], v["reference"],
          f'{v["amount"]} {v["currency"] or ""}'.strip() if v["amount"] is not None else None] for v in views],
    ))
    return 0


def cmd_notifications_purge(args) -> int:
    from refunds.retention import purge_notifications

    deleted = asyncio.run(with_conn(lambda conn: purge_notifications(conn, older_than_days=args.older_than_days)))
    emit(args, {"deleted": deleted, "older_than_days": args.older_than_days},
         lambda: print(f"{deleted} notification rows older than {args.older_than_days} days deleted"))
    return 0


def _days(text: str) -> int:
    import argparse

    from refunds.retention import MIN_NOTIFICATION_DAYS

    try:
        days = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of days") from None
    if days < MIN_NOTIFICATION_DAYS:
        raise argparse.ArgumentTypeError(f"notification rows are kept at least {MIN_NOTIFICATION_DAYS} days")
    return days


def register(sub) -> None:
    from receiver.inbox import RESULTS

    group = sub.add_parser("notifications", help="notifications the receiver kept").add_subparsers(
        dest="notifications_command", required=True)
    nlist = with_page(group.add_parser("list", help="newest first"))
    nlist.add_argument("--result", default=None, choices=RESULTS,
                       help="unknown: refund or event type we do not know; mismatch: contradicts our record")
    nlist.add_argument("--merchant", type=merchant_id, default=None)
    nlist.add_argument("--event-type", default=None)
    nlist.set_defaults(func=cmd_notifications_list)
    purge = with_json(group.add_parser("purge", help="delete deduplication rows past the retention window"))
    purge.add_argument("--older-than-days", type=_days, default=30)
    purge.set_defaults(func=cmd_notifications_purge)
