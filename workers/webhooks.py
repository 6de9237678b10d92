"""Sending webhooks: one delivery per message, signed, with an SSRF guard and no redirects.

The scheduler leases due deliveries (``refunds.webhooks.due_deliveries``) and hands each to
this actor; a worker that dies mid-delivery leaves the lease to run out, and the delivery
goes again (at least once: receivers deduplicate on ``webhook-id``). Only a 2xx counts as
delivered; a redirect is an answer like any other non-2xx (never followed). A host is
resolved here and its addresses checked against the guard, so that a name pointing at a
loopback, link-local or private address (DNS rebinding too) is refused unless
WEBHOOK_ALLOWED_NETWORKS allows it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time

import aiohttp
from aiohttp.abc import AbstractResolver
from aiohttp.resolver import DefaultResolver

from refunds import db, metrics, webhooks
from refunds.errors import RefundRefused

log = logging.getLogger(__name__)

ATTEMPT_RESULTS = ("delivered", "retry", "failed")
for _result in ATTEMPT_RESULTS:  # each series exists from the start (at 0): a first failure is an increase
    metrics.refund_webhook_attempts_total.labels(_result)


class DestinationRefused(OSError):
    """The endpoint's address is one the SSRF guard refuses."""


class GuardedResolver(AbstractResolver):
    """The default resolver, keeping only the addresses the guard allows."""

    def __init__(self, allowed_networks: tuple) -> None:
        self._inner = DefaultResolver()
        self._allowed = allowed_networks

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET):
        found = await self._inner.resolve(host, port, family)
        kept = [entry for entry in found if webhooks.destination_allowed(entry["host"], self._allowed)]
        if not kept:
            raise DestinationRefused(f"{host} resolves only to addresses webhooks may not reach")
        return kept

    async def close(self) -> None:
        await self._inner.close()


def webhook_session(allowed_networks: tuple, timeout: float) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(resolver=GuardedResolver(allowed_networks), limit=64, limit_per_host=16),
        timeout=aiohttp.ClientTimeout(total=timeout), headers={"User-Agent": "pagoefectivo-refunds-webhooks"})


async def deliver(pool, session: aiohttp.ClientSession, vault, event_id: str, endpoint_id, *,
                  allowed_networks: tuple) -> str | None:
    """Send one leased delivery and record the attempt; its new state, or None if it was not ours."""
    state, _ = await _deliver(pool, session, vault, event_id, endpoint_id, allowed_networks=allowed_networks)
    return state


async def _deliver(pool, session: aiohttp.ClientSession, vault, event_id: str, endpoint_id, *,
                   allowed_networks: tuple, pass_on_seconds: float | None = None) -> tuple[str | None, str | None]:
    """``deliver``; with ``pass_on_seconds``, a delivery that succeeded passes its slot of the
    endpoint's cap on to the endpoint's next due one in the same transaction (leased for that
    long): the state, and that next event id or None."""
    async with db.acquire(pool) as conn:
        delivery = await webhooks.outgoing(conn, event_id, endpoint_id)
    if delivery is None:
        return None, None
    timestamp = int(time.time())
    headers = {"Content-Type": "application/json", "webhook-id": event_id, "webhook-timestamp": str(timestamp),
               "webhook-signature": webhooks.signature_header(delivery.endpoint.secrets(vault), event_id, timestamp,
                                                              delivery.body)}
    status, error = None, None
    started = time.perf_counter()
    try:
        try:  # a URL naming an address is not resolved: its address is checked here, as at registration
            webhooks.check_url(delivery.endpoint.url, allowed_networks=allowed_networks)
        except RefundRefused as exc:
            raise DestinationRefused(exc.message) from None
        async with session.post(delivery.endpoint.url, data=delivery.body, headers=headers,
                                allow_redirects=False) as response:
            status = response.status
            await response.read()
    except DestinationRefused as exc:
        error = f"destination not allowed: {exc}"
    except asyncio.TimeoutError:
        error = "timed out"
    except aiohttp.ClientError as exc:
        refused = getattr(exc, "os_error", None) or exc.__cause__  # aiohttp wraps what the resolver raised
        error = (f"destination not allowed: {refused}" if isinstance(refused, DestinationRefused)
                 else f"{type(exc).__name__}: {exc}"[:500])
    latency_ms = int((time.perf_counter() - started) * 1000)
    async with db.acquire(pool) as conn, conn.transaction():
        # one transaction: the scheduler never sees the slot free between the two (it would lease
        # a delivery beside the one passed on, over the cap)
        state = await webhooks.record_attempt(conn, delivery, status=status, error=error, latency_ms=latency_ms)
        following = (await webhooks.next_due(conn, delivery.endpoint.endpoint_id, lease_seconds=pass_on_seconds)
                     if state == "delivered" and pass_on_seconds is not None else None)
    metrics.refund_webhook_attempts_total.labels("retry" if state == "pending" else state).inc()
    metrics.refund_webhook_attempt_seconds.observe(latency_ms / 1000)
    if state != "delivered":
        log.info("webhook %s to %s: %s (%s)", event_id, delivery.endpoint.name, state, error or f"HTTP {status}",
                 extra={"endpoint_id": str(endpoint_id)})
    return state, following


async def deliver_in_turn(pool, session: aiohttp.ClientSession, vault, event_id: str, endpoint_id, *,
                          allowed_networks: tuple, lease_seconds: float, budget_seconds: float = 20.0) -> int:
    """Send the leased delivery, then, while the endpoint answers 2xx, its next due ones in
    turn (the lease passes on: at most the endpoint's cap in flight, none waiting for the
    scheduler's next pass); stops at the first failure (the backoff takes over) or when
    ``budget_seconds`` are spent. Returns how many were delivered."""
    delivered = 0
    deadline = time.monotonic() + budget_seconds
    while event_id is not None:
        passing_on = time.monotonic() < deadline
        state, following = await _deliver(pool, session, vault, event_id, endpoint_id, allowed_networks=allowed_networks,
                                           pass_on_seconds=lease_seconds if passing_on else None)
        if state != "delivered":
            break
        delivered += 1
        event_id = following
    return delivered
