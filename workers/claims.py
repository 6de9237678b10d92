"""The claims this worker process holds, kept alive while it works on them.

A claim (``refunds.states.claim_many``) gives one worker the right to talk to the gateway about
a refund until its ``claimed_until``. It is short (REFUND_CLAIM_SECONDS, 20 s), so that the
refunds a dead worker held are taken over within seconds, and renewed every quarter of it
for as long as this process holds it (one statement for all of them), so that a live worker
never loses one mid-request.

A request may leave only while its claim has at least half its length to run by this
process's own clock, counted from before the claim (or its last renewal) was asked: a worker
whose renewals fail (Postgres away, its loop stalled) stops sending long before its claims
could expire under a request still in flight. The settings refuse a claim shorter than twice
the gateway client's timeout (PAGOEFECTIVO_TIMEOUT_SECONDS), so every request sent under a
claim has ended before the claim does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime
from uuid import UUID

import asyncpg

from refunds import db
from refunds.states import renew_claims

log = logging.getLogger(__name__)


class Claims:
    """The refunds this process has claimed: the ``claimed_until`` it set for each, and until
    when (on the monotonic clock) it may count on it."""

    def __init__(self, pool: asyncpg.Pool, claim_seconds: float):
        self._pool = pool
        self.claim_seconds = claim_seconds
        self._held: dict[UUID, tuple[datetime, float]] = {}
        self._renewing: asyncio.Task | None = None

    def hold(self, refund_id: UUID, claimed_until: datetime, asked_at: float) -> None:
        """Record a claim taken; ``asked_at``: ``time.monotonic()`` before it was asked for."""
        self._held[refund_id] = (claimed_until, asked_at + self.claim_seconds)
        if self._renewing is None:
            self._renewing = asyncio.get_running_loop().create_task(self._renew_forever())

    def drop(self, refund_id: UUID) -> None:
        """The attempt is over: the claim was released, or the refund moved on."""
        self._held.pop(refund_id, None)

    def may_send(self, refund_id: UUID) -> bool:
        """Whether a request about this refund may leave now (see the module's docstring)."""
        held = self._held.get(refund_id)
        return held is not None and held[1] - time.monotonic() >= self.claim_seconds / 2

    async def renew(self) -> None:
        """Extend every claim still held, in one statement."""
        if not self._held:
            return
        held = list(self._held.items())
        asked_at = time.monotonic()
        async with db.acquire(self._pool) as conn:
            renewed = await renew_claims(conn, [(refund_id, until) for refund_id, (until, _) in held],
                                         claim_seconds=self.claim_seconds)
        for refund_id, (until, _) in held:
            if refund_id in renewed and self._held.get(refund_id, (None,))[0] == until:
                self._held[refund_id] = (renewed[refund_id], asked_at + self.claim_seconds)

    async def close(self) -> None:
        if self._renewing is not None:
            self._renewing.cancel()
            await asyncio.gather(self._renewing, return_exceptions=True)
            self._renewing = None

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.claim_seconds / 4)
            try:
                await self.renew()
            except Exception as exc:  # whatever it was, the loop goes on: it alone keeps the claims
                # the claims run down meanwhile; requests stop leaving before they could expire
                log.warning("claims of %d refunds not renewed: %s", len(self._held), type(exc).__name__)
