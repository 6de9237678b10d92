"""Compare our books with the gateway's: every disagreement, named.

For each refund of the period that reached the gateway, its status is asked (``GET
/v1/refunds/{externalRef}``, docs/PROTOCOL.md). Optionally a settlement ledger from the gateway (a JSON list of executed refunds,
such as the sandbox's /sandbox/ledger) is checked too, which also finds refunds the
gateway executed that we have no record of.

A month of refunds is many thousands of lookups, so they run concurrently, each merchant's
within its rate limit. The limit is the workers' own ``RateLimiter`` in Redis (``admit``,
then ``permit``), not a pacing of our own: the gateway counts a merchant's calls whoever
makes them, and the workers may be sending that merchant's refunds meanwhile; sharing
the window keeps both together under the limit (reconcile takes turns with them).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import asdict, dataclass
from datetime import datetime
from decimal import Decimal

import asyncpg
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from pagoefectivo.client import Credentials, PagoEfectivoClient, RefundAnswer
from pagoefectivo.errors import RateLimited, TransientError

from refunds.merchants import Merchant, find_merchant
from refunds.ratelimit import RateLimiter
from refunds.vault import Vault

NEVER_SENT = ("queued", "awaiting_approval", "rejected")
EXPECTED = {  # gateway status -> our states that agree with it
    "success": {"succeeded"},
    "failure": {"failed"},
    "pending": {"submitted", "pending"},
}
# Lookups of one merchant in flight at once, at most: its rate limit paces them anyway; this
# only bounds the connections a fast merchant takes.
MAX_IN_FLIGHT_PER_MERCHANT = 8


@dataclass(frozen=True)
class Disagreement:
    kind: str  # state | amount | missing_at_gateway | missing_in_database
    merchant_id: str
    external_ref: str
    ours: str
    theirs: str

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Checked:
    """One refund asked about, with what it showed (nothing when the books agree)."""
    merchant_id: str
    external_ref: str
    found: tuple[Disagreement, ...]


def lookup_retries() -> AsyncRetrying:
    """The workers' in-attempt policy (workers.retries), longer: reconcile has no delayed retry to
    fall back on, so a fault outliving these ends the run (exit 3, resumable). A 429 is retried too,
    after the merchant's pause. Not imported from workers: that package sets up the dramatiq broker."""
    return AsyncRetrying(retry=retry_if_exception_type(TransientError), stop=stop_after_attempt(6),
                         wait=wait_exponential_jitter(multiplier=0.1, max=2), reraise=True)


async def refunds_to_check(conn: asyncpg.Connection, date_from: datetime, date_to: datetime) -> list[asyncpg.Record]:
    """The refunds of the period that may have reached the gateway, oldest first."""
    return await conn.fetch(
        """SELECT merchant_id, external_ref, state FROM refunds
           WHERE created_at >= $1 AND created_at < $2 AND NOT state = ANY($3::text[])
           ORDER BY created_at, refund_id""", date_from, date_to, list(NEVER_SENT))


async def check_refunds(conn: asyncpg.Connection, client: PagoEfectivoClient, vault: Vault, limiter: RateLimiter,
                        rows: Iterable[asyncpg.Record], on_checked: Callable[[Checked], None]) -> None:
    """Ask the gateway about each refund of ``rows``, concurrently within each merchant's rate limit;
    ``on_checked`` is called as each answer is compared. A gateway fault that outlives the retries
    propagates (the refunds checked so far have been passed to ``on_checked``)."""
    by_merchant: dict[str, list] = {}
    for row in rows:
        by_merchant.setdefault(row["merchant_id"], []).append(row)
    tasks = []
    for merchant_id, mine in by_merchant.items():
        merchant = await find_merchant(conn, merchant_id)
        creds = Credentials(**merchant.gateway_credentials(vault))
        queue = iter(mine)  # shared by the merchant's lookups: each takes the next refund
        lanes = max(1, min(MAX_IN_FLIGHT_PER_MERCHANT, math.ceil(merchant.rate_limit), len(mine)))
        tasks += [asyncio.create_task(_lane(client, limiter, merchant, creds, queue, on_checked)) for _ in range(lanes)]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _lane(client, limiter: RateLimiter, merchant: Merchant, creds: Credentials, queue, on_checked) -> None:
    for row in queue:
        answer = await _status(client, limiter, merchant, creds, row["external_ref"])
        found = _compare(row, answer)
        on_checked(Checked(row["merchant_id"], row["external_ref"], () if found is None else (found,)))


async def _status(client: PagoEfectivoClient, limiter: RateLimiter, merchant: Merchant, creds: Credentials,
                  external_ref: str) -> RefundAnswer | None:
    async for attempt in lookup_retries():
        with attempt:
            await client.token(creds)  # ready before the turn (cached 2 h): the turn counts the lookup alone
            await _turn(limiter, merchant)
            try:
                return await client.refund_status(creds, external_ref)
            except RateLimited as exc:  # every caller of this merchant waits it out, the workers too
                await limiter.pause(merchant.merchant_id, exc.retry_after)
                raise
    raise AssertionError("unreachable")


async def _turn(limiter: RateLimiter, merchant: Merchant) -> None:
    """Wait for a turn in the merchant's schedule and room in its window, as a worker's send does."""
    slot = None
    while (decision := await limiter.admit(merchant.merchant_id, merchant.rate_limit, slot_ms=slot)).wait_ms:
        slot = decision.slot_ms if decision.slot_ms is not None else slot
        await asyncio.sleep(decision.wait_ms / 1000)
    while wait := await limiter.permit(merchant.merchant_id, merchant.rate_limit):  # a pause (a 429)
        await asyncio.sleep(wait / 1000)


def _compare(row, answer: RefundAnswer | None) -> Disagreement | None:
    merchant_id, external_ref, state = row["merchant_id"], row["external_ref"], row["state"]
    if answer is None:
        if state in ("succeeded", "pending"):
            return Disagreement("missing_at_gateway", merchant_id, external_ref, state, "unknown")
        return None
    if state not in EXPECTED.get(answer.status, set()) and state != "manual_review":
        return Disagreement("state", merchant_id, external_ref, state, answer.status)
    return None


async def against_ledger(conn, ledger: list[dict], date_from: datetime, date_to: datetime
                         ) -> AsyncIterator[Disagreement]:
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
