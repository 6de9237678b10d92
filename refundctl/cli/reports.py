"""refundctl report and reconcile: the books, for finance and for the gateway."""

from __future__ import annotations

import asyncio
import csv
import json
import os
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
    import redis.asyncio as aioredis
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from pagoefectivo.client import PagoEfectivoClient
    from pagoefectivo.errors import GatewayError

    from refunds.ratelimit import RateLimiter

    from ..reconcile import OTHER_ENV, against_ledger, check_period, count_left_out, count_to_check

    start, stop = _bounds(args)
    config, sealer = settings(), vault()
    env = config.pagoefectivo_env  # the one gateway the run talks to: only its merchants' refunds
    ledger = asyncio.run(_load_ledger(args.ledger)) if args.ledger else None  # all of it checked before the run
    state = _ResumeFile(args.resume, start, stop) if args.resume else None
    found = [d for checked in (state.checked.values() if state else ()) for d in checked.found]
    console = Console(stderr=True)
    counts = {"total": 0, "checked": 0, "left_out": 0}

    async def run(conn):
        counts["total"] = await count_to_check(conn, start, stop, env)
        counts["left_out"] = await count_left_out(conn, start, stop, env)
        redis_client = aioredis.from_url(config.require("redis_url"))
        with Progress(TextColumn("reconciling"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=console, disable=args.json or not console.is_terminal) as progress:
            task = progress.add_task("reconcile", total=counts["total"])

            def advance() -> None:  # a refund checked now, or by the run --resume goes on from
                counts["checked"] += 1
                progress.advance(task)

            def on_checked(checked) -> None:
                found.extend(checked.found)
                advance()
                if state is not None:
                    state.add(checked)

            try:
                async with aiohttp.ClientSession() as session:
                    client = PagoEfectivoClient(session, base_url=config.base_url, env=config.pagoefectivo_env,
                                                timeout=config.pagoefectivo_timeout_seconds)
                    await check_period(conn, client, sealer, RateLimiter(redis_client), start, stop, on_checked,
                                       already=state.checked if state is not None else frozenset(), on_skipped=advance)
            finally:
                await redis_client.aclose()
        if ledger is not None:
            found.extend([d async for d in against_ledger(conn, ledger, start, stop, env=env)])

    try:
        asyncio.run(with_conn(run))
    except (aiohttp.ClientError, GatewayError) as exc:  # a dependency away (exit 3), not a finding (exit 1)
        where = f"; {counts['checked']} of {counts['total']} refunds checked"
        where += f", run again with --resume {args.resume} to go on" if args.resume else ""
        raise Unavailable(f"gateway unavailable: {exc or type(exc).__name__}{where}") from None
    finally:
        if state is not None:
            state.close()
    left_out = (f"{counts['left_out']} refunds of {OTHER_ENV[env]} merchants left out: this run talks to the {env}"
                f" gateway (PAGOEFECTIVO_ENV); run it with PAGOEFECTIVO_ENV={OTHER_ENV[env]} for them")
    if args.json:
        print(json.dumps([d.to_json() for d in found], indent=2))
    elif found:
        table("disagreements", ["kind", "merchant", "external ref", "ours", "gateway"],
              [[d.kind, d.merchant_id, d.external_ref, d.ours, d.theirs] for d in found])
    else:
        print(f"books agree: no disagreement ({counts['total']} refunds asked about)")
    if counts["left_out"]:  # with --json, stdout is the list alone
        print(left_out, file=sys.stderr if args.json else sys.stdout)
    return 1 if found else 0


class _ResumeFile:
    """``--resume FILE``: the refunds already checked, one JSON line each, written as they are, so
    that a run stopped (Ctrl-C, the gateway away) goes on where it stopped. Its first line names
    the period; a file of another period is refused rather than mixed in."""

    def __init__(self, path: str, start: datetime, stop: datetime):
        from ..reconcile import Checked, Disagreement

        self.period = {"from": start.isoformat(), "to": stop.isoformat()}
        self.checked: dict[tuple[str, str], Checked] = {}
        try:
            raw = Path(path).read_bytes()
        except FileNotFoundError:
            raw = b""
        except OSError as exc:
            raise Usage(f"--resume {path}: {exc.strerror}") from None
        whole = raw[:raw.rfind(b"\n") + 1]  # without the line being written when the run stopped
        try:
            entries = [json.loads(line) for line in whole.decode().splitlines()]
            if entries and entries[0] != {"period": self.period}:
                raise Usage(f"--resume {path} is of another period ({entries[0].get('period')}); "
                            "give another file or the same --from/--to")
            for entry in entries[1:]:
                key = (entry["merchant_id"], entry["external_ref"])
                self.checked[key] = Checked(*key, tuple(Disagreement(**d) for d in entry["found"]))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise Usage(f"--resume {path} is not a reconcile state file: {exc}") from None
        if len(whole) < len(raw):
            os.truncate(path, len(whole))
        self._file = open(path, "a", encoding="utf-8")
        if not entries:
            self._write({"period": self.period})

    def add(self, checked) -> None:
        self._write({"merchant_id": checked.merchant_id, "external_ref": checked.external_ref,
                     "found": [d.to_json() for d in checked.found]})

    def _write(self, entry: dict) -> None:
        self._file.write(json.dumps(entry) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


async def _load_ledger(source: str) -> list:
    """A gateway ledger from a JSON file or an HTTP URL (e.g. the sandbox's /sandbox/ledger), every
    entry checked (``reconcile.read_ledger``): a bad one is named before the run, not after it."""
    from pagoefectivo.protocol import loads

    from ..reconcile import LedgerError, read_ledger

    if source.startswith(("http://", "https://")):
        import aiohttp

        try:
            async with aiohttp.ClientSession() as session, session.get(source) as response:
                if response.status != 200:
                    raise Unavailable(f"--ledger {source}: HTTP {response.status}")
                raw = await response.read()
        except aiohttp.ClientError as exc:
            raise Unavailable(f"--ledger {source}: {exc or type(exc).__name__}") from None
    else:
        try:
            raw = Path(source).read_bytes()
        except OSError as exc:
            raise Usage(f"--ledger {source}: {exc.strerror or exc}") from None
    try:
        return read_ledger(loads(raw))
    except (LedgerError, ValueError) as exc:  # ValueError: not JSON (nor UTF-8)
        raise Usage(f"--ledger {source}: {exc}") from None


def register(sub) -> None:
    report = sub.add_parser("report", help="reconciliation exports: every refund with its original transaction").add_subparsers(dest="report_command", required=True)
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
    rec.add_argument("--resume", metavar="FILE",
                     help="keep the refunds checked in FILE as it goes; a run stopped goes on from it")
    with_json(rec)
    rec.set_defaults(func=cmd_reconcile)
