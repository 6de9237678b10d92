"""refundctl refund: operator work on refunds.

``create`` and ``import`` go through ``producers.enqueue_refund`` (the intake API's
validation and idempotency); ``approve`` and ``reject`` through ``producers.approvals``
(the API's four-eyes rules); ``retry`` through the state machine's ``retry``. A REF is a
refund id or an external ref (when only one merchant uses that external ref).
"""

from __future__ import annotations

import asyncio
import json
import sys

from .common import (
    NotFound, RefundRefused, Unavailable, Usage, dsn, emit, emit_page, merchant_id, name, page, stamp, table,
    positive, terminal_safe, with_conn, with_json, with_page,
)

OPERATOR = "refundctl"  # requested_by / actor when the operator gives no name


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
    from refunds.requests import refund_view

    document = {**refund_view(result.refund), "replay": not result.created}
    emit(args, document, lambda: print(
        f"refund {result.refund.refund_id} {'accepted' if result.created else 'already accepted'}: {result.refund.state}"
    ))
    return 0


def cmd_refund_list(args) -> int:
    from refunds.records import list_refunds
    from refunds.requests import refund_view

    refunds = asyncio.run(with_conn(lambda conn: list_refunds(conn, merchant_id=args.merchant, state=args.state)))
    shown, cursor = page(args, refunds, lambda r: (stamp(r.created_at), str(r.refund_id)), parts=2)
    views = [refund_view(r) for r in shown]
    emit_page(args, "refunds", views, cursor, lambda: table(
        "refunds", ["refund", "merchant", "external ref", "transaction", "amount", "state", "updated"],
        [[v["refund_id"], v["merchant_id"], v["external_ref"], v["original_transaction_id"],
          f'{v["amount"]} {v["currency"]}', v["state"], v["updated_at"]] for v in views],
    ))
    return 0


async def resolve(conn, ref: str):
    """The refund a REF names: its id, else its external ref if only one merchant uses it."""
    from uuid import UUID

    from refunds.records import find_by_external_ref, find_refund

    refund = None
    try:
        refund = await find_refund(conn, UUID(ref))
    except ValueError:
        pass
    if refund is None:
        rows = await conn.fetch("SELECT merchant_id FROM refunds WHERE external_ref = $1", ref)
        if len(rows) > 1:
            raise Usage(f"external ref {ref!r} is used by several merchants; give the refund id")
        if rows:
            refund = await find_by_external_ref(conn, rows[0]["merchant_id"], ref)
    if refund is None:
        raise NotFound(f"no refund with id or external ref {ref!r}")
    return refund


def _show(args, refund, events) -> None:
    from refunds.requests import refund_view

    document = {**refund_view(refund), "events": events}

    def human():
        for key, value in refund_view(refund).items():
            print(f"{key:>24}: {terminal_safe(value)}")
        table("history", ["at", "from", "to", "by", "code", "message"],
              [[e["occurred_at"], e["from_state"], e["to_state"], e["actor"], e["code"], e["message"]] for e in events])

    emit(args, document, human)


def cmd_refund_show(args) -> int:
    from refunds.records import refund_events

    async def run(conn):
        refund = await resolve(conn, args.ref)
        return refund, await refund_events(conn, refund.refund_id)

    _show(args, *asyncio.run(with_conn(run)))
    return 0


def cmd_refund_decide(args) -> int:
    """approve / reject: the same rules as the intake API (producers.approvals)."""
    from producers.approvals import decide

    from refunds.records import refund_events

    approver = args.by

    async def run(conn):
        refund = await resolve(conn, args.ref)
        moved = await decide(conn, refund.refund_id, decision=args.decision, approver=approver, note=args.message)
        return moved, await refund_events(conn, moved.refund_id)

    refund, events = asyncio.run(with_conn(run))  # ApprovalError is a RefundsError: exit 1 with its message
    if args.json:
        _show(args, refund, events)
    else:
        print(f"refund {refund.refund_id} {'approved' if args.decision == 'approve' else 'rejected'} by {approver}: "
              f"{refund.state}")
    return 0


def cmd_refund_retry(args) -> int:
    from refunds.delivery import deliver

    from refunds.records import refund_events
    from refunds.states import retry

    actor = f"operator:{args.by}" if args.by else "operator"

    async def run(conn):
        refund = await resolve(conn, args.ref)
        moved = await retry(conn, refund.refund_id, actor=actor)  # its own transaction: committed on return
        return moved, await refund_events(conn, moved.refund_id)

    refund, events = asyncio.run(with_conn(run))
    delivered = deliver(refund.refund_id)  # after COMMIT; if Redis is down the outbox sweep delivers it
    if args.json:
        _show(args, refund, events)
    else:
        print(f"refund {refund.refund_id} queued again"
              + ("" if delivered else " (Redis unreachable: the scheduler will deliver it)"))
    return 0


def cmd_refund_import(args) -> int:
    """Stream a CSV file through enqueue_refund; bad rows to stderr (and the JSON) with their line."""
    import os

    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    import asyncpg

    from producers.csv_import import CsvHeaderError, import_refunds

    from refunds import db

    counts = {"accepted": 0, "replayed": 0, "refused": 0}
    errors: list[dict] = []
    console = Console(stderr=True, highlight=False)
    with open(args.file, "rb"):  # missing, a folder, unreadable: one line (exit 2) before anything starts
        total = os.path.getsize(args.file)

    async def run() -> None:
        pool = await db.create_pool(dsn(), min_size=1, max_size=args.concurrency)
        try:
            with Progress(TextColumn("importing"), BarColumn(), DownloadColumn(), TextColumn("{task.fields[rows]} rows"),
                          TimeRemainingColumn(), console=console, transient=False) as progress:
                task = progress.add_task("import", total=total, rows=0)
                done = 0
                async for result in import_refunds(pool, args.file, requested_by=args.requested_by,
                                                   concurrency=args.concurrency):
                    counts[result.outcome] += 1
                    done += 1
                    if not result.ok:
                        if args.json:
                            errors.append(result.to_json())
                        field = f" ({result.field})" if result.field else ""
                        progress.console.print(terminal_safe(f"line {result.line}: {result.message}{field} [{result.code}]"),
                                               markup=False, soft_wrap=True)
                    if done % 200 == 0:
                        progress.update(task, completed=result.position, rows=done)
                progress.update(task, completed=total, rows=done)
        finally:
            await pool.close()

    try:
        asyncio.run(run())
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        if isinstance(exc, OSError) and exc.filename == args.file:  # missing, a folder, unreadable: a bad argument
            raise
        done = sum(counts.values())
        raise Unavailable(
            f"import stopped after {done} rows ({type(exc).__name__}: {exc}); the rows accepted so far stay "
            "accepted: import the same file again to finish it") from None
    except CsvHeaderError as exc:
        if args.json:
            print(json.dumps({"file": args.file, "rows": 0, **counts,
                              "errors": [{"line": 1, "code": "bad_header", "message": str(exc), "field": None}]},
                             indent=2))
        print(f"refundctl: {exc}", file=sys.stderr)
        return 1
    rows = sum(counts.values())
    document = {"file": args.file, "rows": rows, **counts, "errors": errors}
    emit(args, document, lambda: print(
        f"{args.file}: {rows} rows, {counts['accepted']} accepted, {counts['replayed']} already accepted, "
        f"{counts['refused']} refused"
    ))
    return 1 if counts["refused"] else 0


def register(sub) -> None:
    refund = sub.add_parser("refund", help="create, show, list, approve or reject, retry, import refunds").add_subparsers(dest="refund_command", required=True)
    rcreate = with_json(refund.add_parser("create", help="request a refund"))
    rcreate.add_argument("--merchant", required=True)
    rcreate.add_argument("--transaction", required=True)
    rcreate.add_argument("--amount", required=True)
    rcreate.add_argument("--currency", required=True)
    rcreate.add_argument("--external-ref", required=True)
    rcreate.add_argument("--reason", default=None)
    rcreate.add_argument("--requested-by", default=OPERATOR)
    rcreate.set_defaults(func=cmd_refund_create)

    rimport = with_json(refund.add_parser(
        "import", help="request refunds from a CSV file",
        description="Request one refund per row of a CSV file, with the same validation and idempotency as the "
                    "intake API. The first line is the header: "
                    "merchant_id,original_transaction_id,amount,currency,external_ref,reason (any order; reason "
                    "may be left out). Amounts are decimal strings such as 10.50. Each refused row is reported on "
                    "stderr (and in --json) with its line number and reason; importing the same file again "
                    "creates nothing new. Exit status: 0 when every row was accepted or already accepted, 1 when "
                    "any row was refused (or the header is unusable), 2 when FILE cannot be read, 3 when the database "
                    "is away (import the same file again later to finish)."))
    rimport.add_argument("file", metavar="FILE.csv")
    rimport.add_argument("--requested-by", default=OPERATOR, metavar="NAME",
                         help=f"recorded as each refund's requester (default {OPERATOR}); an approver must differ")
    rimport.add_argument("--concurrency", type=positive, default=8, help="refunds accepted at once (pool size)")
    rimport.set_defaults(func=cmd_refund_import)

    from refunds.states import STATES

    rlist = with_page(refund.add_parser("list", help="oldest first"))
    rlist.add_argument("--merchant", type=merchant_id, default=None)
    rlist.add_argument("--state", default=None, choices=STATES)
    rlist.set_defaults(func=cmd_refund_list)
    show = with_json(refund.add_parser("show", help="a refund and its whole event history"))
    show.add_argument("ref", help="refund id or external ref")
    show.set_defaults(func=cmd_refund_show)

    for decision, verb in (("approve", "approve"), ("reject", "reject")):
        decide = with_json(refund.add_parser(decision, help=f"{verb} a refund waiting for approval (four eyes)"))
        decide.add_argument("ref", help="refund id or external ref")
        decide.add_argument("--by", required=True, type=name, help="the approver's name; must not be the requester")
        decide.add_argument("--message", default=None, help="a note kept in the refund's history")
        decide.set_defaults(func=cmd_refund_decide, decision=decision)

    rretry = with_json(refund.add_parser("retry", help="send a refund in manual_review (or failed) again"))
    rretry.add_argument("ref", help="refund id or external ref")
    rretry.add_argument("--by", default=None, type=name, help="the operator's name, for the audit trail")
    rretry.set_defaults(func=cmd_refund_retry)
