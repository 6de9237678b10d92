"""Compare our books with the gateway's: every disagreement, named.

For each refund of the period that reached the gateway, its status is asked (``GET
/v1/refunds/{externalRef}``, docs/PROTOCOL.md). Optionally a settlement ledger from the gateway (a JSON list of executed refunds,
such as the sandbox's /sandbox/ledger) is checked too, which also finds refunds the
gateway executed that we have no record of.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from datetime import datetime
from decimal import Decimal

import asyncpg

from pagoefectivo.client import Credentials, PagoEfectivoClient

from refunds.merchants import find_merchant
from refunds.vault import Vault

NEVER_SENT = ("queued", "awaiting_approval", "rejected")
EXPECTED = {  # gateway status -> our states that agree with it
    "success": {"succeeded"},
    "failure": {"failed"},
    "pending": {"submitted", "pending"},
}


@dataclass(frozen=True)
class Disagreement:
    kind: str  # state | amount | missing_at_gateway | missing_in_database
    merchant_id: str
    external_ref: str
    ours: str
    theirs: str

    def to_json(self) -> dict:
        return asdict(self)


async def reconcile(
    conn: asyncpg.Connection, client: PagoEfectivoClient, vault: Vault, date_from: datetime, date_to: datetime,
    *, ledger: list[dict] | None = None,
) -> AsyncIterator[Disagreement]:
    rows = await conn.fetch(
        """SELECT merchant_id, external_ref, amount, state FROM refunds
           WHERE created_at >= $1 AND created_at < $2 ORDER BY created_at""", date_from, date_to)
    credentials = {}
    for row in rows:
        if row["state"] in NEVER_SENT:
            continue
        merchant_id = row["merchant_id"]
        if merchant_id not in credentials:
            credentials[merchant_id] = Credentials(**(await find_merchant(conn, merchant_id)).gateway_credentials(vault))
        answer = await client.refund_status(credentials[merchant_id], row["external_ref"])
        if answer is None:
            if row["state"] in ("succeeded", "pending"):
                yield Disagreement("missing_at_gateway", merchant_id, row["external_ref"], row["state"], "unknown")
            continue
        if row["state"] not in EXPECTED.get(answer.status, set()) and row["state"] != "manual_review":
            yield Disagreement("state", merchant_id, row["external_ref"], row["state"], answer.status)
    if ledger is not None:
        async for disagreement in _against_ledger(conn, ledger, date_from, date_to):
            yield disagreement


async def _against_ledger(conn, ledger: list[dict], date_from: datetime, date_to: datetime):
    ours = {
        (r["merchant_id"], r["external_ref"]): r
        for r in await conn.fetch(
            """SELECT merchant_id, external_ref, amount, state FROM refunds
               WHERE created_at >= $1 AND created_at < $2""", date_from, date_to)
    }
    seen = set()
    for entry in ledger:
        key = (entry["merchantId"], entry["externalRef"])
        seen.add(key)
        theirs = Decimal(str(entry["refundAmount"]))
        row = ours.get(key)
        if row is None:
            known = await conn.fetchval(
                "SELECT 1 FROM refunds WHERE merchant_id = $1 AND external_ref = $2", *key)
            if not known:
                yield Disagreement("missing_in_database", key[0], key[1], "none", f"executed {theirs}")
            continue
        if row["amount"] != theirs:
            yield Disagreement("amount", key[0], key[1], str(row["amount"]), str(theirs))
    for key, row in ours.items():
        if row["state"] == "succeeded" and key not in seen:
            yield Disagreement("missing_at_gateway", key[0], key[1], "succeeded", "not in ledger")
