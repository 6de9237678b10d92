"""CSV import (producers.csv_import and `refundctl refund import`) against real Postgres and Redis."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

import pytest
import pytest_asyncio

from producers.csv_import import HEADER, CsvHeaderError, import_refunds
from refunds import db as dbmod
from refunds.payments import find_payment
from tests.producers.test_producers import queued_refund_ids
from tests.helpers import ROOT, paid

REDIS_DB = 12  # module_redis_url: a Redis database of our own (no worker of another test picks our deliveries up)


@pytest_asyncio.fixture
async def pool(db, database_url):
    pool = await dbmod.create_pool(database_url, min_size=1, max_size=8)
    yield pool
    await pool.close()



def write(tmp_path: Path, text: str, name: str = "refunds.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(textwrap.dedent(text).lstrip("\n").encode() if isinstance(text, str) else text)
    return path


async def collect(pool, path, **options) -> list:
    return [result async for result in import_refunds(pool, path, **options)]


MIXED = f"""
    {HEADER}
    m1,CIP-1,10.00,PEN,R-1,damaged
    m1,CIP-1,10.505,PEN,R-2,three decimals
    m1,NOPE,5.00,PEN,R-3,
    m1,CIP-1,5.00,PEN
    m1,CIP-1,5.00,PEN,R-4,"a reason, with a comma
    and a second line"
    m1,CIP-1,5.00,USD,R-5,

    m1,CIP-1,500.00,PEN,R-6,too much
    m1,CIP-1,11.00,PEN,R-1,same ref other amount
    m1,CIP-1,10.00,PEN,R-1,damaged
    ghost,CIP-1,1.00,PEN,R-7,
    m1,CIP-1,1.00,PEN,bad ref!,
    m1,CIP-1,"1.00,PEN,R-8,unterminated quote
"""


async def test_good_rows_are_accepted_and_every_bad_row_is_named_by_its_line(db, make_merchant, pool, queue, tmp_path):
    await make_merchant("m1")
    await paid(db)
    results = await collect(pool, write(tmp_path, MIXED), requested_by="ops-alice")
    summary = [(r.line, r.outcome, r.code) for r in results]
    assert summary == [
        (2, "accepted", None),
        (3, "refused", "invalid_amount"),
        (4, "refused", "unknown_transaction"),
        (5, "refused", "wrong_field_count"),
        (6, "accepted", None),  # a quoted field over two lines: the next row starts on line 8
        (8, "refused", "currency_mismatch"),
        (10, "refused", "amount_over_refundable"),  # line 9 is blank
        (11, "refused", "external_ref_conflict"),
        (12, "replayed", None),  # the same row as line 2: a replay within the file
        (13, "refused", "unknown_merchant"),
        (14, "refused", "invalid_field"),
        (15, "refused", "malformed_csv"),
    ], summary
    by_line = {r.line: r for r in results}
    assert by_line[3].field == "amount" and by_line[14].field == "external_ref"
    assert "expected 6 fields" in by_line[5].message and "found 4" in by_line[5].message
    assert by_line[12].refund_id == by_line[2].refund_id
    assert by_line[2].to_json()["refund_id"] == by_line[2].refund_id
    assert set(by_line[10].to_json()) == {"line", "outcome", "external_ref", "code", "message", "field"}

    rows = await db.fetch("SELECT external_ref, reason, requested_by, state FROM refunds ORDER BY external_ref")
    assert [(r["external_ref"], r["requested_by"], r["state"]) for r in rows] == [
        ("R-1", "ops-alice", "queued"), ("R-4", "ops-alice", "queued")]
    assert rows[1]["reason"] == "a reason, with a comma\nand a second line"
    assert queued_refund_ids(queue) == {by_line[2].refund_id, by_line[6].refund_id}
    assert (await find_payment(db, "m1", "CIP-1")).refunded_amount == Decimal("15.00")
    assert results[-1].position == (tmp_path / "refunds.csv").stat().st_size


async def test_importing_the_same_file_again_creates_nothing(db, make_merchant, pool, queue, tmp_path):
    await make_merchant("m1")
    await paid(db)
    path = write(tmp_path, f"""
        {HEADER}
        m1,CIP-1,10.00,PEN,A-1,
        m1,CIP-1,20.00,PEN,A-2,late delivery
        m1,CIP-1,90.00,PEN,A-3,over what is left
    """)
    first = await collect(pool, path)
    assert [r.outcome for r in first] == ["accepted", "accepted", "refused"]
    messages = queued_refund_ids(queue)
    again = await collect(pool, path)
    assert [r.outcome for r in again] == ["replayed", "replayed", "refused"]
    assert [r.refund_id for r in again[:2]] == [r.refund_id for r in first[:2]]
    assert await db.fetchval("SELECT count(*) FROM refunds") == 2
    assert await db.fetchval("SELECT count(*) FROM refund_events") == 2
    assert queued_refund_ids(queue) == messages  # replays are not delivered again


async def test_rows_competing_for_one_payment_are_decided_in_file_order(db, make_merchant, pool, queue, tmp_path):
    """Within a batch, rows of one payment wait for the earlier ones: the later line is the one refused."""
    await make_merchant("m1")
    await paid(db, amount="100.00")
    lines = [HEADER] + [f"m1,CIP-1,30.00,PEN,F-{i},{i}" for i in range(6)]
    results = await collect(pool, write(tmp_path, "\n".join(lines) + "\n"), concurrency=6)
    assert [r.outcome for r in results] == ["accepted"] * 3 + ["refused"] * 3


@pytest.mark.parametrize("content, message", [
    (b"", "the file is empty"),
    (b"merchant_id,original_transaction_id,amount,currency,ref\n", "unknown column 'ref'"),
    (b"merchant_id,original_transaction_id,amount,external_ref\nm1,CIP-1,1.00,X\n", "missing column currency"),
    (b"merchant_id,amount,amount,currency,external_ref,original_transaction_id\n", "'amount' appears more than once"),
])
async def test_an_unusable_header_stops_before_any_row(db, make_merchant, pool, queue, tmp_path, content, message):
    await make_merchant("m1")
    await paid(db)
    with pytest.raises(CsvHeaderError, match=message) as error:
        await collect(pool, write(tmp_path, content))
    assert str(error.value).startswith("line 1: ")
    assert await db.fetchval("SELECT count(*) FROM refunds") == 0


async def test_columns_in_any_order_reason_optional_bom_and_invalid_utf8(db, make_merchant, pool, queue, tmp_path):
    await make_merchant("m1")
    await paid(db)
    content = ("\ufeffexternal_ref, currency ,amount,original_transaction_id,merchant_id\r\n"
               "O-1,PEN,1.00,CIP-1,m1\r\n").encode() + b"O-\xff,PEN,1.00,CIP-1,m1\r\n"
    results = await collect(pool, write(tmp_path, content))
    assert [(r.line, r.outcome, r.code) for r in results] == [(2, "accepted", None), (3, "refused", "invalid_field")]
    assert await db.fetchval("SELECT reason FROM refunds WHERE external_ref = 'O-1'") is None


# --- the command --------------------------------------------------------------------------------

def _refundctl(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "refundctl", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture
def cli_env(database_url, module_redis_url):
    return {**os.environ, "DATABASE_URL": database_url, "REDIS_URL": module_redis_url}


@pytest.mark.slow
async def test_refundctl_refund_import_reports_lines_and_exits_by_outcome(db, make_merchant, queue, tmp_path, cli_env):
    await make_merchant("m1")
    await paid(db)
    path = write(tmp_path, MIXED)
    done = await asyncio.to_thread(_refundctl, "refund", "import", str(path), "--requested-by", "ops-bob", "--json",
                                   env=cli_env)
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    assert (report["rows"], report["accepted"], report["replayed"], report["refused"]) == (12, 2, 1, 9)
    assert [e["line"] for e in report["errors"]] == [3, 4, 5, 8, 10, 11, 13, 14, 15]
    assert report["errors"][0]["code"] == "invalid_amount" and report["errors"][0]["field"] == "amount"
    for error in report["errors"]:
        assert f"line {error['line']}: " in done.stderr
    assert "line 10: amount 500.00 is over the" in done.stderr
    assert await db.fetchval("SELECT count(*) FROM refunds WHERE requested_by = 'ops-bob'") == 2

    good = write(tmp_path, f"{HEADER}\nm1,CIP-1,10.00,PEN,R-1,damaged\nm1,CIP-1,5.00,PEN,G-2,\n", "good.csv")
    done = await asyncio.to_thread(_refundctl, "refund", "import", str(good), env=cli_env)
    assert done.returncode == 0, done.stderr
    assert "2 rows, 1 accepted, 1 already accepted, 0 refused" in done.stdout
    done = await asyncio.to_thread(_refundctl, "refund", "import", str(good), env=cli_env)
    assert done.returncode == 0 and "0 accepted, 2 already accepted" in done.stdout

    bad_header = write(tmp_path, "merchant,amount\n", "bad.csv")
    done = await asyncio.to_thread(_refundctl, "refund", "import", str(bad_header), "--json", env=cli_env)
    assert done.returncode == 1 and "line 1: unknown column 'merchant'" in done.stderr
    assert json.loads(done.stdout)["errors"][0]["line"] == 1
    missing = await asyncio.to_thread(_refundctl, "refund", "import", str(tmp_path / "nowhere.csv"), env=cli_env)
    assert missing.returncode == 2 and "nowhere.csv" in missing.stderr  # a usage error
    folder = await asyncio.to_thread(_refundctl, "refund", "import", str(tmp_path), env=cli_env)
    assert folder.returncode == 2 and folder.stderr == f"refundctl: {tmp_path}: Is a directory\n"  # not "import again"


async def test_refundctl_import_without_postgres_says_how_to_finish(tmp_path, cli_env):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    path = write(tmp_path, f"{HEADER}\nm1,CIP-1,10.00,PEN,R-1,\n")
    env = {**cli_env, "DATABASE_URL": f"postgresql://refunds:s3cret@127.0.0.1:{port}/refunds"}
    done = await asyncio.to_thread(_refundctl, "refund", "import", str(path), env=env)
    assert done.returncode == 3  # a dependency unavailable
    assert "import stopped after 0 rows" in done.stderr and "import the same file again" in done.stderr
    assert "s3cret" not in done.stderr and "Traceback" not in done.stderr


MEMORY_PROBE = """
import asyncio, json, resource, sys
from refundctl.cli import main

def peak_kib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

warm = main(["refund", "import", sys.argv[1]])  # imports, pool, statement caches, rich: all warm now
before = peak_kib()
code = main(["refund", "import", sys.argv[2]])
print(json.dumps({"warm": warm, "code": code, "before_kib": before, "after_kib": peak_kib()}))
"""


@pytest.mark.timeout(180)
@pytest.mark.slow
async def test_twenty_thousand_rows_stream_in_flat_memory(db, make_merchant, queue, tmp_path, cli_env):
    """The peak RSS of importing 20,000 rows stays where importing 1,000 left it (generous margin)."""
    await make_merchant("m1")
    payments = 5_250
    paid_at = datetime.now(timezone.utc)
    await db.copy_records_to_table(
        "payments", columns=["merchant_id", "transaction_id", "amount", "currency", "method", "paid_at"],
        records=[("m1", f"CIP-{i}", Decimal("100.00"), "PEN", "cash", paid_at) for i in range(payments)],
    )

    def rows(start: int, count: int) -> str:
        return "".join(f"m1,CIP-{i // 4},25.00,PEN,BULK-{i},refund {i}: item returned by the buyer in its box\n"
                       for i in range(start, start + count))

    warm = write(tmp_path, HEADER + "\n" + rows(0, 1_000), "warm.csv")
    big = write(tmp_path, HEADER + "\n" + rows(1_000, 20_000), "big.csv")
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", MEMORY_PROBE, str(warm), str(big)], cwd=ROOT, env=cli_env,
        capture_output=True, text=True, timeout=170,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    assert probe["warm"] == 0 and probe["code"] == 0, done.stderr[-3000:]
    assert await db.fetchval("SELECT count(*) FROM refunds") == 21_000
    assert len(queued_refund_ids(queue)) == 21_000
    growth_mib = (probe["after_kib"] - probe["before_kib"]) / 1024
    # streaming adds ~0 MiB here; holding the 20,000 rows alone (not even their results) adds ~15 MiB
    assert growth_mib < 8, probe
