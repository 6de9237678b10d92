"""Helpers every refundctl command module shares."""

from __future__ import annotations

import json

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


def table(title: str, columns: list[str], rows: list[list]) -> None:
    from rich.console import Console
    from rich.table import Table

    shown = Table(title=title)
    for column in columns:
        shown.add_column(column)
    for row in rows:
        shown.add_row(*["" if v is None else str(v) for v in row])
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

