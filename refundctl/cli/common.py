"""Helpers every refundctl command module shares."""

from __future__ import annotations

import json
import re

from refunds.errors import ConfigError, NotFound, RefundRefused, RefundsError  # noqa: F401  (re-exported)


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
    Console().print(shown)


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

