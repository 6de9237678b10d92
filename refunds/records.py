"""The refund record and its read queries."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from uuid import UUID

import asyncpg

from .merchants import Merchant

COLUMNS = (
    "refund_id, merchant_id, external_ref, original_transaction_id, amount, currency, reason, state,"
    " requested_by, attempts, claimed_until, delivered_at, status_checks, next_check_at, provider_refund_id, provider_code, provider_message,"
    " created_at, updated_at, completed_at, request_id"
)


@dataclass(frozen=True)
class Refund:
    refund_id: UUID
    merchant_id: str
    external_ref: str
    original_transaction_id: str
    amount: Decimal
    currency: str
    reason: str | None
    state: str
    requested_by: str | None
    attempts: int
    claimed_until: datetime | None
    delivered_at: datetime | None
    status_checks: int
    next_check_at: datetime | None
    provider_refund_id: str | None
    provider_code: str | None
    provider_message: str | None
    created_at: datetime
    updated_at: datetime
    completed_at: datetime | None
    request_id: str | None = None  # the intake call that created it (refunds.http_api), for the logs

    def same_terms(self, *, original_transaction_id: str, amount: Decimal, currency: str, reason: str | None) -> bool:
        """Whether a repeated request asks for exactly this refund (idempotent replay)."""
        return (
            self.original_transaction_id == original_transaction_id
            and self.amount == amount
            and self.currency == currency
            and (self.reason or None) == (reason or None)
        )


def from_row(row: asyncpg.Record) -> Refund:
    return Refund(**{name: row[name] for name in Refund.__dataclass_fields__})


async def find_refund(conn: asyncpg.Connection, refund_id: UUID | str) -> Refund | None:
    row = await conn.fetchrow(f"SELECT {COLUMNS} FROM refunds WHERE refund_id = $1", _uuid(refund_id))
    return from_row(row) if row else None


async def find_with_merchants(conn: asyncpg.Connection, refund_ids: Sequence[UUID]) -> list[tuple[Refund, Merchant] | None]:
    """Refunds and their merchants in one round trip (composite values decode to records); in order."""
    rows = await conn.fetch(
        "SELECT r, m FROM refunds r JOIN merchants m USING (merchant_id) WHERE r.refund_id = ANY($1::uuid[])",
        list(refund_ids))
    found = {row["r"]["refund_id"]: (from_row(row["r"]), Merchant.from_row(row["m"])) for row in rows}
    return [found.get(refund_id) for refund_id in refund_ids]


async def find_by_external_ref(conn: asyncpg.Connection, merchant_id: str, external_ref: str) -> Refund | None:
    row = await conn.fetchrow(
        f"SELECT {COLUMNS} FROM refunds WHERE merchant_id = $1 AND external_ref = $2", merchant_id, external_ref
    )
    return from_row(row) if row else None


async def list_refunds(
    conn: asyncpg.Connection, *, merchant_id: str | None = None, state: str | None = None,
    after: tuple[datetime, UUID] | None = None, limit: int | None = None,
) -> list[Refund]:
    """Refunds oldest first, after the (created_at, refund_id) of ``after``: keyset paging, so a
    refund added between pages never shifts the rest."""
    after_at, after_id = after or (None, None)
    rows = await conn.fetch(
        f"""SELECT {COLUMNS} FROM refunds
            WHERE ($1::text IS NULL OR merchant_id = $1) AND ($2::text IS NULL OR state = $2)
              AND ($3::timestamptz IS NULL OR (created_at, refund_id) > ($3, $4::uuid))
            ORDER BY created_at, refund_id LIMIT $5""",
        merchant_id, state, after_at, after_id, limit,
    )
    return [from_row(row) for row in rows]


def page_cursor(refund: Refund) -> str:
    """An opaque cursor for the page after ``refund`` (``list_refunds(after=parse_cursor(...))``)."""
    raw = f"{refund.created_at.isoformat()}|{refund.refund_id}".encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def parse_cursor(cursor: str) -> tuple[datetime, UUID]:
    """The position a ``page_cursor`` names; ValueError when it is not one.

    Its time must have an offset, and its instant must fall within the years 1-9999 in UTC: the
    driver sends it in UTC, so a crafted ``0001-01-01T00:00:00+14:00`` (year 0 in UTC) would
    overflow there and fail the query; it is refused here like any other bad cursor. Every
    instant within those years is within Postgres's range.
    """
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
        at, _, refund_id = raw.partition("|")
        moment, position_id = datetime.fromisoformat(at), UUID(refund_id)
        offset = moment.utcoffset()
        if offset is None:
            raise ValueError("no offset")
        moment - offset  # the instant in UTC: OverflowError outside the years 1-9999
    except (ValueError, OverflowError):  # UnicodeDecodeError and binascii.Error are ValueErrors too
        raise ValueError(f"{cursor!r} is not a cursor of this list") from None
    return moment, position_id


async def refund_events(conn: asyncpg.Connection, refund_id: UUID | str) -> list[dict]:
    rows = await conn.fetch(
        """SELECT from_state, to_state, actor, code, message, occurred_at
           FROM refund_events WHERE refund_id = $1 ORDER BY event_id""",
        _uuid(refund_id),
    )
    return [{**dict(row), "occurred_at": row["occurred_at"].isoformat()} for row in rows]


async def queued_since(conn: asyncpg.Connection, refund_id: UUID | str) -> datetime | None:
    """When the refund last entered ``queued``: accepted, approved, or retried by an operator.
    The worker's retries run for a horizon from then (``workers.retries``), not from its creation."""
    return await conn.fetchval(
        """SELECT occurred_at FROM refund_events WHERE refund_id = $1 AND to_state = 'queued'
           ORDER BY event_id DESC LIMIT 1""",
        _uuid(refund_id),
    )


def _uuid(value: UUID | str) -> UUID:
    return value if isinstance(value, UUID) else UUID(str(value))


# a refund of a merchant of environment {0}, any when {0} is NULL
_OF_ENV = "({0}::text IS NULL OR merchant_id IN (SELECT merchant_id FROM merchants WHERE env = {0}))"


async def refunds_in_period(
    conn: asyncpg.Connection, date_from: datetime, date_to: datetime, *, not_states: Sequence[str] = (),
    after: tuple[datetime, UUID] | None = None, limit: int, env: str | None = None,
) -> list[Refund]:
    """A page of the refunds created in [date_from, date_to) whose state is not one of ``not_states``,
    oldest first, after the (created_at, refund_id) of ``after``: keyset paging through a period, a
    short query a page, so that no transaction stays open between pages (nor a named statement
    behind a transaction pooler) however long the pages take to work through. With ``env``, only
    the refunds of that environment's merchants (a gateway client talks to one)."""
    # one row comparison, the index's range (refunds_created_idx) from the first page to the last;
    # the first page starts before every refund of date_from (no refund_id is the nil UUID)
    after_at, after_id = after or (date_from, UUID(int=0))
    rows = await conn.fetch(
        f"""SELECT {COLUMNS} FROM refunds
            WHERE (created_at, refund_id) > ($1, $2::uuid) AND created_at >= $3 AND created_at < $4
              AND NOT state = ANY($5::text[]) AND {_OF_ENV.format("$7")}
            ORDER BY created_at, refund_id LIMIT $6""",
        after_at, after_id, date_from, date_to, list(not_states), limit, env,
    )
    return [from_row(row) for row in rows]


async def count_in_period(conn: asyncpg.Connection, date_from: datetime, date_to: datetime, *,
                          not_states: Sequence[str] = (), env: str | None = None) -> int:
    """How many refunds ``refunds_in_period`` pages through."""
    return await conn.fetchval(
        f"""SELECT count(*) FROM refunds
            WHERE created_at >= $1 AND created_at < $2 AND NOT state = ANY($3::text[]) AND {_OF_ENV.format("$4")}""",
        date_from, date_to, list(not_states), env)
