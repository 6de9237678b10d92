"""Signed notification delivery, as PagoEfectivo publishes it: one attempt, and one second
attempt if the first is not answered 200 (API CIP 1.1, §5.2, page 14); then the notification
is abandoned and only the status lookup can tell the merchant.

The document does not say when the second attempt comes: here 10 s after the first. The chaos
knob ``notification_retries`` (1 by default) allows up to 11 retries on a provider-like
schedule (10 s, 1 min, 5 min, 15 min, 30 min, 1 h, 2 h, 4 h, 8 h, 16 h, 24 h: about 2⅓ days),
read when a delivery starts. ``notification_time_scale`` multiplies every delay, so 0.001 runs
the whole long schedule in about 3⅓ minutes and 0.00001 in 2 seconds; it is read before each
wait, so a change reaches deliveries already waiting.

At most ``connections`` attempts are under way at once (100, aiohttp's default pool); the
others wait for their turn, and each attempt's timeout runs from its start: a notification
still waiting behind the notifier's own queue has not been sent, so it cannot have timed out.

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

from .chaos import LONG_RETRY_SCHEDULE_S, Chaos

log = logging.getLogger("pagoefectivo.sandbox.notifier")


@dataclass(frozen=True)
class Notification:
    url: str
    merchant_id: str
    event_type: str
    operation_number: str
    body: bytes = field(repr=False)
    signature: str = field(repr=False)


# seconds to wait before each retry (after the immediate first attempt), at time scale 1; the
# first ``notification_retries`` of them are used (one by default, as published)
RETRY_SCHEDULE_S: tuple[float, ...] = LONG_RETRY_SCHEDULE_S


class Notifier:
    def __init__(self, chaos: Chaos, *, schedule: tuple[float, ...] = RETRY_SCHEDULE_S,
                 attempt_timeout: float = 10.0, connections: int = 100):
        self._chaos = chaos
        self._schedule = tuple(schedule)
        self._timeout = aiohttp.ClientTimeout(total=attempt_timeout)
        self._connections = connections
        self._turns = asyncio.Semaphore(connections)  # an attempt takes a turn, then its timeout starts
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task] = set()
        self.attempts = 0  # POSTs made, answered or not
        self.delivered = 0
        self.abandoned = 0

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=self._connections))

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

    def retry_delays(self) -> list[float]:
        """The waits before each retry, in seconds, at the current retries and time scale."""
        scale = self._chaos.config.notification_time_scale
        return [delay * scale for delay in self._retries()]

    def _retries(self) -> tuple[float, ...]:
        return self._schedule[:self._chaos.config.notification_retries]

    async def _deliver(self, note: Notification) -> bool:
        """POST until a 200, waiting out the schedule between attempts; False when abandoned."""
        headers = {"Content-Type": "application/json", protocol.SIGNATURE_HEADER: note.signature}
        schedule = self._retries()
        attempts = 1 + len(schedule)
        for attempt in range(1, attempts + 1):
            try:
                assert self._session is not None, "the notifier is not started"
                async with self._turns:
                    self.attempts += 1
                    async with self._session.post(note.url, data=note.body, headers=headers,
                                                  timeout=self._timeout) as response:
                        await response.read()
                        status = response.status
                if status == 200:
                    self.delivered += 1
                    log.debug("notification %s %s delivered to %s (attempt %d)",
                              note.event_type, note.operation_number, note.merchant_id, attempt)
                    return True
                outcome = f"HTTP {status}"
            except (TimeoutError, aiohttp.ClientError) as exc:
                outcome = type(exc).__name__
            if attempt == attempts:
                break
            wait = schedule[attempt - 1] * self._chaos.config.notification_time_scale
            log.info("notification %s %s for %s: %s, retry %d of %d in %.3gs",
                     note.event_type, note.operation_number, note.merchant_id, outcome, attempt,
                     len(schedule), wait)
            await asyncio.sleep(wait)
        self.abandoned += 1
        log.warning("notification %s %s for %s abandoned after %d attempts (last: %s)",
                    note.event_type, note.operation_number, note.merchant_id, attempts, outcome)
        return False
