"""Signed notification delivery, as PagoEfectivo does it: retried until answered 200.

Each notification's body is serialized once and signed once (``PE-Signature``: HMAC-SHA256
of those exact bytes with the merchant's secretKey), so retries and chaos duplicates send
the very same bytes and the same operationNumber. Deliveries run as background tasks that
are kept (so they are not garbage collected mid-flight) and cancelled on shutdown.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

from pagoefectivo import protocol

from .chaos import Chaos

log = logging.getLogger("pagoefectivo.sandbox.notifier")


@dataclass(frozen=True)
class Notification:
    url: str
    merchant_id: str
    event_type: str
    operation_number: str
    body: bytes = field(repr=False)
    signature: str = field(repr=False)


class Notifier:
    def __init__(self, chaos: Chaos, *, first_backoff: float = 0.2, max_backoff: float = 5.0,
                 give_up_after: float = 600.0, attempt_timeout: float = 10.0):
        self._chaos = chaos
        self._first_backoff = first_backoff
        self._max_backoff = max_backoff
        self._give_up_after = give_up_after
        self._timeout = aiohttp.ClientTimeout(total=attempt_timeout)
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task] = set()
        self.delivered = 0
        self.abandoned = 0

    async def start(self) -> None:
        self._session = aiohttp.ClientSession()

    async def close(self) -> None:
        """Cancel what is still in flight (its sender is going away) and close the session."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def send(self, url: str, merchant_id: str, payload: dict, secret_key: str, *, delay: float = 0.0,
             on_due: Callable[[], None] | None = None) -> Notification:
        """Deliver ``payload`` in the background after ``delay`` (plus chaos delays).

        ``on_due`` runs once, just before the first attempt: a pending refund is settled at
        that moment, so a status lookup never disagrees with a notification already sent.
        """
        body = protocol.dumps(payload)
        note = Notification(url, merchant_id, payload["eventType"], payload["operationNumber"], body,
                            protocol.notification_signature(body, secret_key))
        self._spawn(self._run(note, delay + self._chaos.notification_delay(), on_due))
        return note

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, note: Notification, delay: float, on_due: Callable[[], None] | None) -> None:
        if delay > 0:
            await asyncio.sleep(delay)
        if on_due is not None:
            on_due()
        if await self._deliver(note) and self._chaos.duplicate_notification():
            await asyncio.sleep(self._chaos.uniform(0.0, 0.3))
            await self._deliver(note)

    async def _deliver(self, note: Notification) -> bool:
        """POST until a 200, backing off 0.2 s doubling to 5 s; give up after ~10 minutes."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._give_up_after
        backoff = self._first_backoff
        headers = {"Content-Type": "application/json", protocol.SIGNATURE_HEADER: note.signature}
        attempt = 0
        while True:
            attempt += 1
            try:
                assert self._session is not None, "the notifier is not started"
                async with self._session.post(note.url, data=note.body, headers=headers,
                                              timeout=self._timeout) as response:
                    await response.read()
                    if response.status == 200:
                        self.delivered += 1
                        log.debug("notification %s %s delivered to %s (attempt %d)",
                                  note.event_type, note.operation_number, note.merchant_id, attempt)
                        return True
                    outcome = f"HTTP {response.status}"
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                outcome = type(exc).__name__
            if loop.time() + backoff > deadline:
                self.abandoned += 1
                log.warning("notification %s %s for %s abandoned after %d attempts (last: %s)",
                            note.event_type, note.operation_number, note.merchant_id, attempt, outcome)
                return False
            log.info("notification %s %s for %s: %s, retrying in %.1fs",
                     note.event_type, note.operation_number, note.merchant_id, outcome, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._max_backoff)
