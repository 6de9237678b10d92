"""Import refund requests from a CSV file, streamed, with one result per row.

The file is read lazily (``csv.reader`` over the open file's lines) and its rows are
accepted in bounded batches of concurrent ``enqueue_refund`` calls on one asyncpg
pool, so a file of any length is imported in flat memory. Every row goes through the
same validation (``refunds.requests.RefundRequest``) and idempotency as the intake API,
so importing the same file again creates nothing: its rows come back as replays. Cells are
taken as written: one with leading or trailing spaces is refused by name, as the API does.

The header (first line) names the columns, in any order; ``reason`` may be left out::

    merchant_id,original_transaction_id,amount,currency,external_ref,reason
    seller-1,2900123,10.50,PEN,order-1234-refund-1,damaged item

Within a batch, rows that share an ``external_ref`` or a payment are accepted in file
order (later ones wait for earlier ones), so which of two competing rows wins never
depends on timing: the earlier line does.
"""

from __future__ import annotations

import asyncio
import csv
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import BinaryIO

import asyncpg

from refunds.delivery import Courier
from refunds.errors import RefundRefused, RefundsError

from .enqueue import enqueue_refund

COLUMNS = ("merchant_id", "original_transaction_id", "amount", "currency", "external_ref", "reason")
REQUIRED = COLUMNS[:5]
HEADER = ",".join(COLUMNS)
BATCH_SIZE = 500
CONCURRENCY = 8


class CsvHeaderError(RefundsError):
    """The file's first line is not a usable header; no row was imported."""


@dataclass(frozen=True)
class RowResult:
    line: int  # the line (1-based, the header is line 1) where the row starts
    outcome: str  # "accepted", "replayed" or "refused"
    position: int  # bytes of the file read when this row was: drives a progress bar
    external_ref: str | None = None
    refund_id: str | None = None
    state: str | None = None
    code: str | None = None
    message: str | None = None
    field: str | None = None

    @property
    def ok(self) -> bool:
        return self.outcome != "refused"

    def to_json(self) -> dict:
        document = {"line": self.line, "outcome": self.outcome, "external_ref": self.external_ref}
        if self.ok:
            document.update(refund_id=self.refund_id, state=self.state)
        else:
            document.update(code=self.code, message=self.message, field=self.field)
        return document


@dataclass
class _Row:
    line: int
    position: int
    cells: list[str] | None  # None: the line could not be parsed (see error)
    error: str | None = None


class _Source:
    """The file's lines, decoded one at a time, counting the bytes read."""

    def __init__(self, raw: BinaryIO):
        self.raw = raw
        self.position = 0

    def lines(self) -> Iterator[str]:
        first = True
        for chunk in self.raw:
            self.position += len(chunk)
            # invalid UTF-8 survives as lone surrogates; the row holding it is refused by name
            text = chunk.decode("utf-8", "surrogateescape")
            if first:
                text, first = text.removeprefix("\ufeff"), False  # a BOM, as Excel writes
            yield text


def _header(reader) -> dict[str, int]:
    try:
        names = next(reader)
    except StopIteration:
        raise CsvHeaderError(f"line 1: the file is empty; its first line must be the header {HEADER}") from None
    except csv.Error as exc:
        raise CsvHeaderError(f"line 1: the header is not valid CSV ({exc})") from None
    names = [name.strip() for name in names]
    unknown = [name for name in names if name not in COLUMNS]
    if unknown:
        raise CsvHeaderError(f"line 1: unknown column {unknown[0]!r}; the header is {HEADER} (reason optional)")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise CsvHeaderError(f"line 1: column {repeated[0]!r} appears more than once")
    missing = [name for name in REQUIRED if name not in names]
    if missing:
        raise CsvHeaderError(f"line 1: missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)}; "
                             f"the header is {HEADER} (reason optional)")
    return {name: index for index, name in enumerate(names)}


def _rows(source: _Source) -> tuple[dict[str, int], Iterator[_Row]]:
    reader = csv.reader(source.lines(), strict=True)
    columns = _header(reader)

    def rows() -> Iterator[_Row]:
        while True:
            start = reader.line_num + 1
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield _Row(start, source.position, None, f"not valid CSV: {exc}")
                continue
            if cells:  # blank lines are skipped
                yield _Row(start, source.position, cells)

    return columns, rows()


def _waves(batch: list[_Row], columns: dict[str, int]) -> list[list[_Row]]:
    """Split a batch so that rows sharing an external_ref or a payment run one after another, in file order."""
    waves: list[list[_Row]] = []
    last: dict[tuple, int] = {}
    for row in batch:
        wave = 0
        keys = ()
        if row.cells is not None and len(row.cells) == len(columns):
            merchant = row.cells[columns["merchant_id"]]  # cells as validated: surrounding spaces are refused
            keys = (("ref", merchant, row.cells[columns["external_ref"]]),
                    ("payment", merchant, row.cells[columns["original_transaction_id"]]))
            wave = max((last.get(key, -1) for key in keys), default=-1) + 1
            for key in keys:
                last[key] = wave
        while len(waves) <= wave:
            waves.append([])
        waves[wave].append(row)
    return waves


async def _accept(pool: asyncpg.Pool, row: _Row, columns: dict[str, int], requested_by: str | None,
                  courier: Courier) -> RowResult:
    if row.cells is None:
        return RowResult(row.line, "refused", row.position, code="malformed_csv", message=row.error)
    if len(row.cells) != len(columns):
        return RowResult(
            row.line, "refused", row.position, code="wrong_field_count",
            message=f"expected {len(columns)} fields ({', '.join(columns)}), found {len(row.cells)}",
        )
    values = {name: row.cells[index] for name, index in columns.items()}
    external_ref = values["external_ref"]
    try:
        result = await enqueue_refund(
            pool, merchant_id=values["merchant_id"], original_transaction_id=values["original_transaction_id"],
            amount=values["amount"], currency=values["currency"], external_ref=values["external_ref"],
            reason=values.get("reason") or None, requested_by=requested_by, courier=courier,
        )
    except RefundRefused as refused:  # IdempotencyConflict included
        return RowResult(row.line, "refused", row.position, external_ref, code=refused.code,
                         message=refused.message, field=refused.field)
    return RowResult(row.line, "accepted" if result.created else "replayed", row.position, external_ref,
                     refund_id=str(result.refund.refund_id), state=result.refund.state)


async def import_refunds(
    pool: asyncpg.Pool,
    source: str | os.PathLike | BinaryIO,
    *,
    requested_by: str | None = None,
    batch_size: int = BATCH_SIZE,
    concurrency: int = CONCURRENCY,
) -> AsyncIterator[RowResult]:
    """Yield one RowResult per data row, in file order.

    Raises CsvHeaderError before any row if the header is unusable. A database outage
    stops the import with its error; rows accepted before it stay accepted, so running
    the file again completes it without creating anything twice.
    """
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as raw:
            async for result in import_refunds(pool, raw, requested_by=requested_by, batch_size=batch_size,
                                               concurrency=concurrency):
                yield result
        return
    columns, rows = _rows(_Source(source))
    gate = asyncio.Semaphore(concurrency)
    async with Courier() as courier:  # the file's refunds are handed over in shared writes

        async def accept(row: _Row) -> RowResult:
            async with gate:
                return await _accept(pool, row, columns, requested_by, courier)

        batch: list[_Row] = []
        for row in rows:
            batch.append(row)
            if len(batch) >= batch_size:
                for result in await _run(batch, columns, accept):
                    yield result
                batch = []
        if batch:
            for result in await _run(batch, columns, accept):
                yield result


async def _run(batch: list[_Row], columns: dict[str, int], accept) -> list[RowResult]:
    results: dict[int, RowResult] = {}
    for wave in _waves(batch, columns):
        try:
            async with asyncio.TaskGroup() as group:  # one failure (an outage) cancels the rest
                tasks = [(row, group.create_task(accept(row))) for row in wave]
        except BaseExceptionGroup as failed:  # the caller sees the error itself, as from one call
            raise failed.exceptions[0] from None
        for row, task in tasks:
            results[id(row)] = task.result()
    return [results[id(row)] for row in batch]
