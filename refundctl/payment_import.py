"""Payments whose ``cip.paid`` never reached us: find them, and fill them from a CSV file.

PagoEfectivo makes one attempt and one second attempt at a notification (docs/PROTOCOL.md
§5). A payment both of whose notifications were lost before the receiver could keep them
leaves every refund of that order refused as ``unknown_transaction``. The marketplace knows
those orders as paid; the operator exports them (from its own orders, or from PagoEfectivo's
payment report) as CSV, header first, columns in any order, ``method`` and ``paid_at``
optional::

    merchant_id,transaction_id,amount,currency,method,paid_at
    seller-1,2900123,100.00,PEN,cash,2026-11-20T10:00:00-05:00

Every row is checked before anything is written, so a file with one bad row records
nothing. Each row is then ``missing`` (we hold no such payment: only reported with
``dry_run``), ``recorded`` (now held, as its cip.paid would have recorded it), ``known``
(held already, same amount and currency) or ``conflict`` (held with another amount or
currency: left as it is, for a person to look at).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import asyncpg

from refunds.errors import RefundRefused, RefundsError
from refunds.merchants import list_merchants
from refunds.money import format_amount, parse_amount, parse_currency
from refunds.payments import METHODS, find_payment, record_payment

COLUMNS = ("merchant_id", "transaction_id", "amount", "currency", "method", "paid_at")
REQUIRED = COLUMNS[:4]
MAX_IDENTIFIER = 64


class PaymentFileError(RefundsError):
    """The file cannot be imported as it is; the message names each line and what is wrong."""


@dataclass(frozen=True)
class PaidRow:
    line: int
    payment: dict  # record_payment's keywords: merchant_id, transaction_id, amount, currency, method, paid_at

    def __getattr__(self, name: str):
        try:
            return self.payment[name]
        except KeyError:
            raise AttributeError(name) from None


@dataclass(frozen=True)
class RowOutcome:
    row: PaidRow
    outcome: str  # missing | recorded | known | conflict
    held: str | None = None  # what we hold, for a conflict: "100.00 PEN"

    def to_json(self) -> dict:
        row = self.row
        return {"line": row.line, "merchant_id": row.merchant_id, "transaction_id": row.transaction_id,
                "amount": format_amount(row.amount), "currency": row.currency, "outcome": self.outcome,
                "held": self.held}


def read_rows(path: str | Path, *, now: datetime | None = None) -> list[PaidRow]:
    """Every row of the file, checked; PaymentFileError naming every bad line otherwise."""
    now = now or datetime.now(timezone.utc)
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = reader.fieldnames or []
            unknown = [name for name in header if name not in COLUMNS]
            absent = [name for name in REQUIRED if name not in header]
            if unknown or absent:
                raise PaymentFileError(
                    f"{path}: line 1: the header must name {', '.join(REQUIRED)} (and may name method, paid_at)"
                    + (f"; unknown: {', '.join(unknown)}" if unknown else "")
                    + (f"; missing: {', '.join(absent)}" if absent else ""))
            rows, problems, seen = [], [], {}
            for cells in reader:
                line = reader.line_num
                try:
                    row = paid_row(cells, now, line=line)
                except RefundRefused as exc:
                    problems.append(f"line {line}: {exc.message}")
                    continue
                key = (row.merchant_id, row.transaction_id)
                if key in seen:
                    problems.append(f"line {line}: {row.transaction_id} of {row.merchant_id} is on line {seen[key]} too")
                    continue
                seen[key] = line
                rows.append(row)
    except OSError as exc:
        raise PaymentFileError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise PaymentFileError(f"{path}: not a UTF-8 CSV file: {exc}") from None
    if problems:
        raise PaymentFileError(f"{path}: nothing was recorded; " + "; ".join(problems))
    return rows


def paid_row(cells: dict, now: datetime, *, line: int = 0) -> PaidRow:
    """A payment from its fields as text (a CSV row's cells, or ``payment record``'s options), checked
    as a refund will need them: identifiers a refund can name, the amount rule, a time not ahead of
    ``now``; RefundRefused names the first bad field."""
    if None in cells:
        raise RefundRefused("invalid_row", "more cells than the header names", None)
    values = {name: (cells.get(name) or "") for name in COLUMNS}
    for name in REQUIRED:
        if not values[name]:
            raise RefundRefused("invalid_row", f"{name} is empty", name)
    for name in ("merchant_id", "transaction_id"):
        if len(values[name]) > MAX_IDENTIFIER or values[name] != values[name].strip():
            raise RefundRefused("invalid_row", f"{name} must be at most {MAX_IDENTIFIER} characters without"
                                " surrounding spaces", name)
    method = values["method"] or "cash"
    if method not in METHODS:
        raise RefundRefused("invalid_row", f"method must be one of {', '.join(METHODS)}", "method")
    paid_at = now
    if values["paid_at"]:
        try:
            paid_at = datetime.fromisoformat(values["paid_at"])
        except ValueError:
            paid_at = None
        if paid_at is None or paid_at.tzinfo is None:
            raise RefundRefused("invalid_row", "paid_at must be ISO-8601 with its offset, e.g."
                                " 2026-11-20T10:00:00-05:00", "paid_at")
        if paid_at > now:
            raise RefundRefused("invalid_row", "paid_at is in the future", "paid_at")
    return PaidRow(line, {"merchant_id": values["merchant_id"], "transaction_id": values["transaction_id"],
                          "amount": parse_amount(values["amount"]), "currency": parse_currency(values["currency"]),
                          "method": method, "paid_at": paid_at})


async def import_payments(conn: asyncpg.Connection, rows: list[PaidRow], *, dry_run: bool) -> list[RowOutcome]:
    """Record the rows we hold no payment for (or, with ``dry_run``, only say which they are)."""
    merchants = {m.merchant_id for m in await list_merchants(conn)}
    strangers = sorted({f"line {r.line}: no merchant {r.merchant_id!r}" for r in rows if r.merchant_id not in merchants})
    if strangers:
        raise PaymentFileError("nothing was recorded; " + "; ".join(strangers))
    outcomes = []
    async with conn.transaction():  # all of the file, or nothing of it
        for row in rows:
            held = await find_payment(conn, row.merchant_id, row.transaction_id)
            if held is None and dry_run:
                outcomes.append(RowOutcome(row, "missing"))
                continue
            if held is None:
                await record_payment(conn, **row.payment)
                outcomes.append(RowOutcome(row, "recorded"))
            elif (held.amount, held.currency) == (row.amount, row.currency):
                outcomes.append(RowOutcome(row, "known"))
            else:
                outcomes.append(RowOutcome(row, "conflict", f"{format_amount(held.amount)} {held.currency}"))
    return outcomes
