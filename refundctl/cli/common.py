"""Helpers every refundctl command module shares."""

from __future__ import annotations

import argparse
import json
import math
import re
from datetime import datetime, timezone

from refunds.errors import ConfigError, NotFound, RefundRefused, RefundsError  # noqa: F401  (re-exported)
from refunds.service import Unavailable, Usage  # noqa: F401  (re-exported)


def settings():
    from refunds.settings import get_settings

    return get_settings()


def dsn() -> str:
    return settings().require("database_url")


def vault():
    from refunds.vault import vault_from_settings

    return vault_from_settings(settings())


def emit(args, document, human) -> None:
    """Print one JSON document with --json, else the human form."""
    if getattr(args, "json", False):
        print(json.dumps(document, indent=2, default=str))
    else:
        human()


# C0 and C1 control characters and DEL: an ESC starts an ANSI or OSC sequence, a CR or LF forges lines
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def terminal_safe(value) -> str:
    """Text from callers (a refund's reason, a note, a provider message) as an operator's terminal
    may show it: each control character written out as ``\\xNN``, so that no escape sequence runs."""
    text = "" if value is None else str(value)
    return _CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", text)


def table(title: str, columns: list[str], rows: list[list]) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    shown = Table(title=title)
    for column in columns:
        shown.add_column(column)
    for row in rows:
        shown.add_row(*[Text(terminal_safe(value)) for value in row])  # Text: never read as Rich markup
    console = Console()
    console.on_broken_pipe = _closed_pipe
    console.print(shown)


def _closed_pipe():
    """Rich's own answer to a closed pipe is exit 1; refundctl's is the one in refundctl.cli.main."""
    raise BrokenPipeError


async def with_conn(fn):
    from refunds import db

    conn = await db.connect(dsn())
    try:
        return await fn(conn)
    finally:
        await conn.close()


def with_json(parser):
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    return parser


# --- lists: --limit and an --after cursor ------------------------------------------------------

DEFAULT_LIMIT = 100


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return value


def positive_up_to(maximum: int):
    """A type: a whole number from 1 to ``maximum`` (a --limit that reaches SQL as it is)."""
    def parse(text: str) -> int:
        value = positive(text)
        if value > maximum:
            raise argparse.ArgumentTypeError(f"{text!r} is over {maximum}")
        return value

    return parse


def hours(maximum: float):
    """A type: hours from 0 to ``maximum``, fractions allowed (an --overlap-hours)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not 0 <= value <= maximum:  # nan and inf too
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of hours from 0 to {maximum:g}")
        return value

    return parse


def http_url(text: str) -> str:
    """A type: an absolute http(s) URL with a host (a notify URL, a gateway to talk to)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(text)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname) and text.isprintable() and " " not in text
    except ValueError:  # a malformed port or IPv6 address
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(f"{text!r} is not an absolute http(s) URL")
    return text


def name(text: str) -> str:
    """A type: a token's or an operator's name (``refunds.tokens.NAME``)."""
    from refunds.tokens import NAME, NAME_RULE

    if not NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not {NAME_RULE}")
    return text


def merchant_id(text: str) -> str:
    """--merchant as a filter: a malformed id is a usage error, not an empty list."""
    from refunds.requests import MERCHANT_ID

    if not re.fullmatch(MERCHANT_ID, text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a merchant id (1-64 letters, digits, _ . -)")
    return text


def with_page(parser):
    """--json, --limit and --after on a list command (README "Lists")."""
    with_json(parser)
    parser.add_argument("--limit", type=positive, default=DEFAULT_LIMIT, help=f"rows at most (default {DEFAULT_LIMIT})")
    parser.add_argument("--after", metavar="CURSOR", default=None,
                        help="start after this cursor: the next cursor the previous page printed")
    return parser


def stamp(moment: datetime) -> str:
    """A time as a cursor part: UTC, fixed width, so that text order is time order."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def page(args, items: list, key, *, parts: int, newest_first: bool = False) -> tuple[list, str | None]:
    """Keyset paging: at most --limit of ``items`` after the --after cursor, in the order of ``key``
    (a tuple of ``parts`` texts, the last one free, joined by commas as the cursor); and the next
    cursor, None on the last page. A row added or changed between pages never shifts the rest."""
    ordered = sorted(items, key=key, reverse=newest_first)
    if args.after is not None:
        after = tuple(args.after.split(",", parts - 1))
        if len(after) != parts:
            raise Usage(f"--after {args.after!r} is not a cursor of this list ({parts} parts joined by commas)")
        ordered = [item for item in ordered if (key(item) < after if newest_first else key(item) > after)]
    shown = ordered[:args.limit]
    return shown, ",".join(key(shown[-1])) if len(ordered) > args.limit else None


def emit_page(args, name: str, views: list[dict], cursor: str | None, human) -> None:
    """A page of a list: ``{name: [...], "next_cursor": ...}`` with --json, else ``human()`` and how
    to ask for the next page."""
    if getattr(args, "json", False):
        print(json.dumps({name: views, "next_cursor": cursor}, indent=2, default=str))
        return
    human()
    if cursor is not None:
        import shlex

        print(f"more: add --after {terminal_safe(shlex.quote(cursor))}")
