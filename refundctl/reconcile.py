"""Compare our books with the gateway's: every disagreement, named.

For each refund of the period that reached the gateway, its status is asked (``GET
/v1/refunds/{externalRef}``, docs/PROTOCOL.md). Optionally a settlement ledger from the gateway (a JSON list of executed refunds,
such as the sandbox's /sandbox/ledger) is checked too, which also finds refunds the
gateway executed that we have no record of.

A run talks to one environment, the gateway client's (PAGOEFECTIVO_ENV): only the refunds of
that environment's merchants are asked about (the client refuses the other's credentials), and
``count_left_out`` says how many of the other's were passed over.

A month of refunds is many thousands of lookups, so they run concurrently, each merchant's
within its rate limit. The limit is the workers' own ``RateLimiter`` in Redis (``admit``,
then ``permit``), not a pacing of our own: the gateway counts a merchant's calls whoever
makes them, and the workers may be sending that merchant's refunds meanwhile; sharing
the window keeps both together under the limit (reconcile takes turns with them).

The period is streamed, never held: its refunds are read in keyset pages
(``refunds.records.refunds_in_period``), each merchant's handed to that merchant's lookups,
and the next page is read once the refunds waiting are down to half a page, as many as fill it
again. At most ``page_size`` refunds wait at once, and at most ``max_in_flight`` are being
asked about. A merchant slower than the rest holds the reading back only once its own refunds
fill the waiting room. Pages are short queries, not a cursor held open: a run takes hours at
the merchants' rate limits, and no transaction (or snapshot) stays open that long.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from decimal import Decimal, InvalidOperation

import asyncpg
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential_jitter

from pagoefectivo.client import Credentials, PagoEfectivoClient, RefundAnswer
from pagoefectivo.errors import RateLimited, TransientError

from refunds.errors import RefundRefused
from refunds.merchants import Merchant, find_merchant
from refunds.money import parse_amount
from refunds.ratelimit import RateLimiter
from refunds.records import Refund, count_in_period, refunds_in_period
from refunds.states import STATES
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
MAX_IN_FLIGHT = 64  # lookups in flight at once, all merchants together
PAGE_SIZE = 500  # refunds read at once, and waiting at most
FAULT_TRIES = 6  # tries of a lookup that meets transient faults (5xx, code 166, no connection)
MAX_RATE_LIMITED = 60  # 429s one lookup waits out before the run stops


@dataclass(frozen=True)
class Disagreement:
    kind: str  # state | amount | currency | missing_at_gateway | missing_in_database
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


_FAULT_WAIT = wait_exponential_jitter(multiplier=0.1, max=2)


def lookup_retries() -> AsyncRetrying:
    """The workers' in-attempt policy (workers.retries), longer: reconcile has no delayed retry to
    fall back on, so a fault outliving FAULT_TRIES tries ends the run (exit 3, resumable). A 429 is
    a wait, not a fault, as for the workers: the merchant is paused for its Retry-After and the
    lookup goes again without using a try, up to MAX_RATE_LIMITED times. Not imported from
    workers: that package sets up the dramatiq broker."""
    met = {"faults": 0, "rate_limited": 0}

    def limited(state: RetryCallState) -> bool:
        return isinstance(state.outcome.exception(), RateLimited)

    def stop(state: RetryCallState) -> bool:
        met["rate_limited" if limited(state) else "faults"] += 1
        return met["faults"] >= FAULT_TRIES or met["rate_limited"] >= MAX_RATE_LIMITED

    def wait(state: RetryCallState) -> float:
        return 0.0 if limited(state) else _FAULT_WAIT(state)  # a 429's wait is the merchant's pause

    return AsyncRetrying(retry=retry_if_exception_type(TransientError), stop=stop, wait=wait, reraise=True)


OTHER_ENV = {"sandbox": "production", "production": "sandbox"}


async def count_to_check(conn: asyncpg.Connection, date_from: datetime, date_to: datetime,
                         env: str | None = None) -> int:
    """How many refunds of the period may have reached the gateway (``check_period`` asks about them):
    of ``env``'s merchants, the environment of its client; of every merchant when None."""
    return await count_in_period(conn, date_from, date_to, not_states=NEVER_SENT, env=env)


async def count_left_out(conn: asyncpg.Connection, date_from: datetime, date_to: datetime, env: str) -> int:
    """How many refunds of the period that may have reached a gateway are of the other environment's
    merchants: a run that talks to ``env`` passes them over."""
    return await count_to_check(conn, date_from, date_to, OTHER_ENV[env])


async def _pages(conn: asyncpg.Connection, date_from: datetime, date_to: datetime, not_states: Collection[str],
                 room: Callable[[], Awaitable[int]], env: str | None = None) -> AsyncIterator[list[Refund]]:
    """The period's refunds (of ``env``'s merchants, when given), oldest first, a keyset page at a
    time, each as large as ``room()`` says when its turn comes."""
    after = None
    while True:
        limit = await room()
        page = await refunds_in_period(conn, date_from, date_to, not_states=list(not_states), after=after, limit=limit,
                                       env=env)
        if page:
            yield page
        if len(page) < limit:
            return
        after = (page[-1].created_at, page[-1].refund_id)


async def check_period(conn: asyncpg.Connection, client: PagoEfectivoClient, vault: Vault, limiter: RateLimiter,
                       date_from: datetime, date_to: datetime, on_checked: Callable[[Checked], None], *,
                       already: Collection[tuple[str, str]] = frozenset(), on_skipped: Callable[[], None] = lambda: None,
                       page_size: int = PAGE_SIZE, max_in_flight: int = MAX_IN_FLIGHT) -> None:
    """Ask the gateway about each refund of [date_from, date_to) that may have reached it, of the
    merchants of the client's environment (``count_left_out`` counts the others'),
    concurrently within each merchant's rate limit, reading the period a page at a time;
    ``on_checked`` is called as each answer is compared, ``on_skipped`` for each refund passed
    over because its (merchant_id, external_ref) is in ``already`` (a resumed run). A gateway
    fault that outlives the retries propagates (the refunds checked so far have been passed to
    ``on_checked``)."""
    run = _Run(conn, client, vault, limiter, on_checked, max_in_flight, low=page_size // 2)

    async def room() -> int:
        await run.room()
        return page_size - run.waiting

    try:
        async with asyncio.TaskGroup() as lookups:
            async for page in _pages(conn, date_from, date_to, NEVER_SENT, room, client.env):
                for refund in page:
                    if (refund.merchant_id, refund.external_ref) in already:
                        on_skipped()
                    else:
                        await run.queue(refund, lookups)
    except BaseExceptionGroup as group:  # the first failure, as a single lookup raises it
        raise group.exceptions[0] from None


@dataclass
class _Merchant:
    """One merchant's refunds waiting to be asked about, and its lookups running (at most ``width``)."""
    merchant: Merchant
    creds: Credentials
    width: int
    waiting: deque[Refund] = field(default_factory=deque)
    running: int = 0


class _Run:
    def __init__(self, conn, client, vault, limiter, on_checked, max_in_flight: int, *, low: int):
        self.conn, self.client, self.vault, self.limiter, self.on_checked = conn, client, vault, limiter, on_checked
        self.merchants: dict[str, _Merchant] = {}
        self.slots = asyncio.Semaphore(max_in_flight)
        self.waiting = 0  # refunds read and not yet taken up by a lookup
        self.low = low
        self.drained = asyncio.Event()

    async def room(self) -> None:
        """Until the refunds waiting are down to ``low`` (half a page): the next page is read then."""
        while self.waiting > self.low:
            self.drained.clear()
            await self.drained.wait()

    async def queue(self, refund: Refund, lookups: asyncio.TaskGroup) -> None:
        mine = self.merchants.get(refund.merchant_id)
        if mine is None:
            merchant = await find_merchant(self.conn, refund.merchant_id)
            mine = self.merchants[refund.merchant_id] = _Merchant(
                merchant, Credentials(**merchant.gateway_credentials(self.vault)),
                width=max(1, min(MAX_IN_FLIGHT_PER_MERCHANT, math.ceil(merchant.rate_limit))))
        mine.waiting.append(refund)
        self.waiting += 1
        if mine.running < mine.width:
            mine.running += 1
            lookups.create_task(self._lane(mine))

    async def _lane(self, mine: _Merchant) -> None:
        """Ask about the merchant's waiting refunds one after another, while there are any."""
        try:
            while mine.waiting:
                async with self.slots:
                    if not mine.waiting:  # taken by another of its lanes meanwhile
                        break
                    refund = mine.waiting.popleft()
                    self.waiting -= 1
                    if self.waiting <= self.low:
                        self.drained.set()
                    answer = await _status(self.client, self.limiter, mine.merchant, mine.creds, refund.external_ref)
                found = _compare(refund, answer)
                self.on_checked(Checked(refund.merchant_id, refund.external_ref, () if found is None else (found,)))
        finally:
            mine.running -= 1


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


def _compare(refund: Refund, answer: RefundAnswer | None) -> Disagreement | None:
    merchant_id, external_ref, state = refund.merchant_id, refund.external_ref, refund.state
    if answer is None:
        if state in ("succeeded", "pending"):
            return Disagreement("missing_at_gateway", merchant_id, external_ref, state, "unknown")
        return None
    if state not in EXPECTED.get(answer.status, set()) and state != "manual_review":
        return Disagreement("state", merchant_id, external_ref, state, answer.status)
    return None


class LedgerError(ValueError):
    """A ledger that is not a list of executed refunds: the first entry that is not one, named."""


@dataclass(frozen=True)
class LedgerEntry:
    """One refund the gateway executed, as its ledger lists it (docs/PROTOCOL.md, /sandbox/ledger):
    ``{"merchantId", "externalRef", "refundAmount", "currency", "executedAt"}``; a ledger without
    ``currency`` is compared on amounts alone."""
    merchant_id: str
    external_ref: str
    amount: Decimal
    currency: str | None = None

    @property
    def key(self) -> tuple[str, str]:
        return self.merchant_id, self.external_ref


_JSON_KINDS = {dict: "an object", list: "a list", str: "a string", bool: "true or false", type(None): "null"}


def _kind(value) -> str:
    return _JSON_KINDS.get(type(value), "a number")


def read_ledger(document) -> list[LedgerEntry]:
    """A ledger's JSON document as entries, every one checked before any is used: LedgerError names
    the first entry (counting from 0, as ``jq '.[N]'`` does) that is not an executed refund."""
    if not isinstance(document, list):
        raise LedgerError(f"not a list of executed refunds: the document is {_kind(document)}")
    return [_ledger_entry(index, entry) for index, entry in enumerate(document)]


def _ledger_entry(index: int, entry) -> LedgerEntry:
    def wrong(problem: str) -> LedgerError:
        return LedgerError(f"entry {index} (counting from 0): {problem}")

    if not isinstance(entry, dict):
        raise wrong(f"{_kind(entry)}, not an object")
    for name in ("merchantId", "externalRef", "refundAmount"):
        if entry.get(name) is None:
            raise wrong(f"{name} is missing")
    for name in ("merchantId", "externalRef", "currency"):  # currency: the ledger's own, when it has one
        value = entry.get(name)
        if value is not None and not (isinstance(value, str) and value):
            raise wrong(f"{name} is empty" if value == "" else f"{name} is {_kind(value)}, not a string")
    raw, amount = entry["refundAmount"], None
    if isinstance(raw, (str, int, float, Decimal)) and not isinstance(raw, bool):
        with contextlib.suppress(InvalidOperation):
            amount = Decimal(str(raw))
    if amount is None or not amount.is_finite():
        shown = repr(raw[:40]) if isinstance(raw, str) else raw if amount is not None else _kind(raw)
        raise wrong(f"refundAmount {shown} is not an amount")
    try:  # an executed refund's amount: over 0, cents, within numeric(14, 2), as every amount of ours
        amount = parse_amount(amount, "refundAmount")
    except RefundRefused as refused:
        raise wrong(refused.message) from None
    return LedgerEntry(entry["merchantId"], entry["externalRef"], amount, entry.get("currency"))


async def against_ledger(conn: asyncpg.Connection, ledger: Sequence[LedgerEntry], date_from: datetime,
                         date_to: datetime, *, env: str | None = None,
                         page_size: int = PAGE_SIZE) -> AsyncIterator[Disagreement]:
    """The gateway's ledger (``read_ledger``) against our books: an amount or a currency that differs,
    a refund it executed that we have no record of, one we hold succeeded that it did not execute
    (of ``env``'s merchants, the gateway's environment, when given). Our side is read a page at a
    time: the ledger's refunds by their keys, then the period's succeeded ones in keyset pages."""
    seen = set()
    for start in range(0, len(ledger), page_size):
        entries = ledger[start:start + page_size]
        keys = [entry.key for entry in entries]
        ours = {(row["merchant_id"], row["external_ref"]): row for row in await conn.fetch(
            """SELECT r.merchant_id, r.external_ref, r.amount, r.currency, r.created_at
               FROM refunds r JOIN unnest($1::text[], $2::text[]) AS k (merchant_id, external_ref)
                 ON r.merchant_id = k.merchant_id AND r.external_ref = k.external_ref""",
            [key[0] for key in keys], [key[1] for key in keys])}
        for entry, key in zip(entries, keys):
            seen.add(key)
            row = ours.get(key)
            if row is None:
                yield Disagreement("missing_in_database", *key, "none", f"executed {entry.amount}")
            elif date_from <= row["created_at"] < date_to:
                if row["amount"] != entry.amount:
                    yield Disagreement("amount", *key, str(row["amount"]), str(entry.amount))
                if entry.currency is not None and row["currency"] != entry.currency:
                    yield Disagreement("currency", *key, row["currency"], entry.currency)

    async def whole_page() -> int:
        return page_size

    not_succeeded = [state for state in STATES if state != "succeeded"]
    async for page in _pages(conn, date_from, date_to, not_succeeded, whole_page, env):
        for refund in page:
            if (refund.merchant_id, refund.external_ref) not in seen:
                yield Disagreement("missing_at_gateway", refund.merchant_id, refund.external_ref, "succeeded",
                                   "not in ledger")
