"""refundctl report and reconcile: the books, for finance and for the gateway."""

from __future__ import annotations

import asyncio
import csv
import json
import sys
from datetime import date, datetime, time, timedelta, timezone
from pathlib import Path

from .common import Unavailable, Usage, settings, table, vault, with_conn, with_json

LIMA = timezone(timedelta(hours=-5))


def _bounds(args) -> tuple[datetime, datetime]:
    """--from/--to as Lima calendar days (inclusive), or full ISO-8601 instants."""
    def parse(text: str, end: bool) -> datetime:
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise Usage(f"{'--to' if end else '--from'} {text!r} is not a date (YYYY-MM-DD)") from None
        if len(text) == 10:  # a calendar day
            day = date.fromisoformat(text) + timedelta(days=1 if end else 0)
            return datetime.combine(day, time(), LIMA)
        if moment.tzinfo is None:
            raise Usage(f"{text!r} needs a UTC offset")
        return moment

    start, stop = parse(args.date_from, False), parse(args.date_to, True)
    if stop <= start:
        raise Usage("--to is before --from")
    return start, stop


def cmd_report_refunds(args) -> int:
    from refunds.reports import COLUMNS, Totals, as_text, refund_rows

    start, stop = _bounds(args)
    totals = Totals()

    async def run(conn):
        out = sys.stdout
        if args.format == "csv" and not args.json:
            writer = csv.DictWriter(out, fieldnames=COLUMNS)
            writer.writeheader()
            async for row in refund_rows(conn, start, stop, totals):
                writer.writerow(as_text(row))
        else:
            out.write('{"refunds": [')
            first = True
            async for row in refund_rows(conn, start, stop, totals):
                out.write(("" if first else ",") + "\n  " + json.dumps(as_text(row)))
                first = False
            out.write('\n], "totals": ' + json.dumps(totals.to_json()) + "}\n")

    asyncio.run(with_conn(run))
    if args.format == "csv" and not args.json:  # the CSV stays machine-readable; totals go to stderr
        print("totals: " + json.dumps(totals.to_json()), file=sys.stderr)
    return 0


def cmd_reconcile(args) -> int:
    import aiohttp

    from pagoefectivo.client import PagoEfectivoClient
    from pagoefectivo.errors import GatewayError

    from ..reconcile import reconcile

    start, stop = _bounds(args)
    config, sealer = settings(), vault()
    found = []

    async def run(conn):
        ledger = await _load_ledger(args.ledger) if args.ledger else None
        async with aiohttp.ClientSession() as session:
            client = PagoEfectivoClient(session, base_url=config.base_url, env=config.pagoefectivo_env)
            async for disagreement in reconcile(conn, client, sealer, start, stop, ledger=ledger):
                found.append(disagreement)

    try:
        asyncio.run(with_conn(run))
    except (aiohttp.ClientError, GatewayError) as exc:  # a dependency away (exit 3), not a finding (exit 1)
        raise Unavailable(f"gateway unavailable: {exc or type(exc).__name__}") from None
    if args.json:
        print(json.dumps([d.to_json() for d in found], indent=2))
    elif found:
        table("disagreements", ["kind", "merchant", "external ref", "ours", "gateway"],
              [[d.kind, d.merchant_id, d.external_ref, d.ours, d.theirs] for d in found])
    else:
        print("books agree: no disagreement")
    return 1 if found else 0


async def _load_ledger(source: str) -> list[dict]:
    """A gateway ledger from a JSON file or an HTTP URL (e.g. the sandbox's /sandbox/ledger)."""
    from pagoefectivo.protocol import loads

    if source.startswith(("http://", "https://")):
        import aiohttp

        async with aiohttp.ClientSession() as session, session.get(source) as response:
            if response.status != 200:
                raise Unavailable(f"--ledger {source}: HTTP {response.status}")
            return loads(await response.read())
    try:
        return loads(Path(source).read_bytes())
    except (OSError, ValueError) as exc:
        raise Usage(f"--ledger {source}: {exc}") from None


def register(sub) -> None:
    report = sub.add_parser("report").add_subparsers(dest="report_command", required=True)
    refunds = report.add_parser("refunds", help="every refund with its original transaction (reconciliation export)")
    refunds.add_argument("--from", dest="date_from", required=True, help="YYYY-MM-DD (Lima) or ISO-8601")
    refunds.add_argument("--to", dest="date_to", required=True, help="YYYY-MM-DD inclusive (Lima) or ISO-8601")
    refunds.add_argument("--format", choices=["csv", "json"], default="csv")
    with_json(refunds)  # the same as --format json
    refunds.set_defaults(func=cmd_report_refunds)

    rec = sub.add_parser("reconcile", help="ask the gateway about every refund of a period; list disagreements")
    rec.add_argument("--from", dest="date_from", required=True)
    rec.add_argument("--to", dest="date_to", required=True)
    rec.add_argument("--ledger", help="the gateway's ledger: a JSON file or URL of executed refunds")
    with_json(rec)
    rec.set_defaults(func=cmd_reconcile)
