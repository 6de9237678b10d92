"""Payments whose cip.paid never came: found and filled from a CSV file, against a real Postgres."""

from __future__ import annotations

from decimal import Decimal

import pytest

from refundctl.payment_import import PaymentFileError, import_payments, read_rows
from refunds.payments import find_payment
from tests.helpers import paid

HEADER = "merchant_id,transaction_id,amount,currency,method,paid_at\n"


def write(tmp_path, text: str):
    path = tmp_path / "paid.csv"
    path.write_text(text)
    return path


async def test_dry_run_finds_what_we_lack_and_the_import_fills_it_once(db, make_merchant, tmp_path):
    await make_merchant("m1")
    await paid(db, "m1", "2900001", "100.00")  # its cip.paid arrived
    await paid(db, "m1", "2900002", "50.00")  # arrived, but the marketplace says 55.00
    path = write(tmp_path, HEADER + "m1,2900001,100.00,PEN,cash,2026-11-20T10:00:00-05:00\n"
                                    "m1,2900002,55.00,PEN,,\n"
                                    "m1,2900003,70.00,PEN,bank_transfer,2026-11-21T09:30:00-05:00\n")
    rows = read_rows(path)
    found = [(o.row.transaction_id, o.outcome, o.held) for o in await import_payments(db, rows, dry_run=True)]
    assert found == [("2900001", "known", None), ("2900002", "conflict", "50.00 PEN"), ("2900003", "missing", None)]
    assert await find_payment(db, "m1", "2900003") is None  # a dry run writes nothing

    filled = [(o.row.transaction_id, o.outcome) for o in await import_payments(db, rows, dry_run=False)]
    assert filled == [("2900001", "known"), ("2900002", "conflict"), ("2900003", "recorded")]
    payment = await find_payment(db, "m1", "2900003")
    assert (payment.amount, payment.method, payment.paid_at.isoformat()) == (
        Decimal("70.00"), "bank_transfer", "2026-11-21T14:30:00+00:00")
    assert (await find_payment(db, "m1", "2900002")).amount == Decimal("50.00")  # a conflict is left alone
    again = [o.outcome for o in await import_payments(db, rows, dry_run=False)]
    assert again == ["known", "conflict", "known"]


@pytest.mark.parametrize("body, named", [
    ("m1,1,10.005,PEN,,\n", "line 2: amount 10.005 has more than 2 decimals"),
    ("m1,1,10.00,EUR,,\n", "line 2: currency must be one of"),
    ("m1,1,10.00,PEN,card,\n", "line 2: method must be one of"),
    ("m1,1,10.00,PEN,,2026-11-20T10:00:00\n", "line 2: paid_at must be ISO-8601 with its offset"),
    ("m1,1,10.00,PEN,,2999-01-01T00:00:00-05:00\n", "line 2: paid_at is in the future"),
    ("m1,,10.00,PEN,,\n", "line 2: transaction_id is empty"),
    ("m1,1,10.00,PEN,,\nm1,1,10.00,PEN,,\n", "line 3: 1 of m1 is on line 2 too"),
    ("m1,1,10.00,PEN,,,extra\n", "line 2: more cells than the header names"),
])
def test_a_bad_row_is_named_and_nothing_is_read(tmp_path, body, named):
    with pytest.raises(PaymentFileError, match="nothing was recorded") as caught:
        read_rows(write(tmp_path, HEADER + body))
    assert named in str(caught.value)


def test_a_header_without_the_required_columns_is_refused(tmp_path):
    with pytest.raises(PaymentFileError, match="line 1: .*missing: amount.*") as caught:
        read_rows(write(tmp_path, "merchant_id,transaction_id,currency,colour\nm1,1,PEN,red\n"))
    assert "unknown: colour" in str(caught.value)


async def test_a_row_of_an_unknown_merchant_stops_the_whole_file(db, make_merchant, tmp_path):
    await make_merchant("m1")
    rows = read_rows(write(tmp_path, HEADER + "m1,1,10.00,PEN,,\nghost,2,10.00,PEN,,\n"))
    with pytest.raises(PaymentFileError, match="line 3: no merchant 'ghost'"):
        await import_payments(db, rows, dry_run=False)
    assert await find_payment(db, "m1", "1") is None
