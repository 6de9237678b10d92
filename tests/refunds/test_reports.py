"""Reconciliation: the export links every refund to its payment; reconcile names every disagreement."""

import asyncio
import csv
import io
import json
import os
import sys
from datetime import datetime, timedelta, timezone

import pytest

from tests.stack import start_stack
from tests.workers.test_worker import accepted_refund, chaos, ledger, settle_all

TODAY = datetime.now(timezone(timedelta(hours=-5))).date()
PERIOD = ["--from", (TODAY - timedelta(days=1)).isoformat(), "--to", (TODAY + timedelta(days=1)).isoformat()]


async def refundctl(*args: str, **env: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "refundctl", *args, env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await process.communicate()
    return process.returncode, out.decode(), err.decode()


@pytest.mark.slow
async def test_export_links_refunds_to_their_payments_with_totals(db, make_merchant):
    await make_merchant("m1")
    await make_merchant("m2")
    await accepted_refund(None, db, external_ref="A-1", amount="10.00", merchant="m1")
    await accepted_refund(None, db, external_ref="A-2", amount="2.50", merchant="m1")
    await accepted_refund(None, db, external_ref="B-1", amount="7.25", merchant="m2")
    code, out, err = await refundctl("report", "refunds", *PERIOD, "--format", "csv")
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [(r["merchant_id"], r["external_ref"], r["original_transaction_id"], r["amount"], r["payment_amount"])
            for r in rows] == [("m1", "A-1", "CIP-9", "10.00", "100.00"), ("m1", "A-2", "CIP-9", "2.50", "100.00"),
                               ("m2", "B-1", "CIP-9", "7.25", "100.00")]
    assert all(r["state"] == "queued" and r["created_at"] and r["paid_at"] for r in rows)
    totals = json.loads(err.split("totals: ", 1)[1])
    assert {(t["merchant_id"], t["refunds"], t["requested"]) for t in totals} == {("m1", 2, "12.50"), ("m2", 1, "7.25")}
    code, out, _ = await refundctl("report", "refunds", *PERIOD, "--format", "json")
    document = json.loads(out)
    assert len(document["refunds"]) == 3 and len(document["totals"]) == 2
    code, out, _ = await refundctl("report", "refunds", "--from", "2020-01-01", "--to", "2020-01-31")
    assert code == 0 and list(csv.DictReader(io.StringIO(out))) == []
    code, _, err = await refundctl("report", "refunds", "--from", "yesterday", "--to", "2020-01-31")
    assert code == 2 and "--from" in err  # a usage error


@pytest.mark.slow
async def test_reconcile_names_a_tampered_refund_on_each_side(db, make_merchant, database_url, redis_url, vault,
                                                             monkeypatch, tmp_path):
    await make_merchant("m1")
    async with start_stack(database_url, redis_url, vault, monkeypatch) as stack:
        res, sandbox_url, http = stack.res, stack.sandbox_url, stack.http
        await chaos(http, sandbox_url, sync_status_mix={"success": 1})
        ids = [(await accepted_refund(stack, db, external_ref=f"R-{i}", amount="5.00")).refund_id for i in range(4)]
        await settle_all(res, db, ids)
        entries = await ledger(http, sandbox_url)
        path = tmp_path / "ledger.json"
        path.write_text(json.dumps(entries))
        env = {"PAGOEFECTIVO_BASE_URL": sandbox_url}
        code, out, err = await refundctl("reconcile", *PERIOD, "--ledger", str(path), "--json", **env)
        assert (code, json.loads(out)) == (0, []), err

        await db.execute("UPDATE refunds SET state = 'failed' WHERE external_ref = 'R-1'")  # our side
        next(e for e in entries if e["externalRef"] == "R-2")["refundAmount"] = "50.00"  # the gateway's side
        path.write_text(json.dumps(entries))
        code, out, err = await refundctl("reconcile", *PERIOD, "--ledger", str(path), "--json", **env)
    assert code == 1, err
    found = {(d["kind"], d["external_ref"], d["ours"], d["theirs"]) for d in json.loads(out)}
    assert ("state", "R-1", "failed", "success") in found
    assert ("amount", "R-2", "5.00", "50.00") in found
    assert len(found) == 2
