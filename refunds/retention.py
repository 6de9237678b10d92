"""How long the database keeps what it no longer needs, and deleting it without hurting traffic.

Notification rows are the receiver's deduplication memory. PagoEfectivo redelivers for
hours or days, not months, and re-applying a very late one is harmless anyway (a payment
is recorded once; refund moves only go forward), so they are kept 30 days at least.

Audit rows (``refund_events``) are a different matter: they are the history of money
moving, so they have their own purge with a floor of 180 days, and it removes only the
history of refunds that are settled (succeeded, failed, rejected) and have not changed
since the cutoff: never part of a history, never a refund still open or in manual review.

Webhook events (with their deliveries and attempts) follow the audit rows: kept as long,
removed once every delivery of the event is over (delivered or failed) and the event is
older than the cutoff; an event still being delivered is never removed.

Each batch is its own short transaction (a ``DELETE`` of at most ``batch`` rows found by
``ctid``), so a purge never holds locks for long nor builds one huge transaction; run it
from the scheduler, on a connection outside any transaction.
"""

from __future__ import annotations

import asyncpg

MIN_NOTIFICATION_DAYS = 30
MIN_AUDIT_DAYS = 180
# manual_review is final for the state machine but still waits for an operator: never purged
SETTLED = ("succeeded", "failed", "rejected")

_NOTIFICATIONS = """
DELETE FROM notifications
 WHERE ctid = ANY (ARRAY(SELECT ctid FROM notifications WHERE received_at < $1 LIMIT $2))
"""

_AUDIT = """
DELETE FROM refund_events
 WHERE ctid = ANY (ARRAY(
       SELECT e.ctid FROM refund_events e JOIN refunds r USING (refund_id)
        WHERE r.state = ANY ($3::text[]) AND r.updated_at < $1 AND e.occurred_at < $1
        LIMIT $2))
"""


_WEBHOOK_EVENTS = """
DELETE FROM webhook_events
 WHERE ctid = ANY (ARRAY(
       SELECT e.ctid FROM webhook_events e
        WHERE e.occurred_at < $1
          AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d
                          WHERE d.event_id = e.event_id AND d.state IN ('pending', 'sending'))
        LIMIT $2))
"""


async def purge_notifications(conn: asyncpg.Connection, *, older_than_days: int = MIN_NOTIFICATION_DAYS,
                              batch: int = 1000) -> int:
    """Delete notification rows received more than ``older_than_days`` ago; the number deleted."""
    _check(older_than_days, MIN_NOTIFICATION_DAYS, "notification rows")
    return await _purge(conn, _NOTIFICATIONS, older_than_days, batch)


async def purge_audit_events(conn: asyncpg.Connection, older_than_days: int, *, batch: int = 1000) -> int:
    """Delete the audit history of refunds settled and untouched for ``older_than_days``."""
    _check(older_than_days, MIN_AUDIT_DAYS, "audit rows (refund_events)")
    return await _purge(conn, _AUDIT, older_than_days, batch, list(SETTLED))


async def purge_webhook_events(conn: asyncpg.Connection, older_than_days: int, *, batch: int = 1000) -> int:
    """Delete webhook events older than ``older_than_days`` whose deliveries are all over (and,
    with them, their deliveries and attempts); kept as long as the audit rows at least."""
    _check(older_than_days, MIN_AUDIT_DAYS, "webhook events")
    return await _purge(conn, _WEBHOOK_EVENTS, older_than_days, batch)


def _check(days: int, minimum: int, what: str) -> None:
    if isinstance(days, bool) or not isinstance(days, int) or days < minimum:
        raise ValueError(f"{what} are kept at least {minimum} days; refusing to purge those newer than {days!r} days")


async def _purge(conn: asyncpg.Connection, sql: str, days: int, batch: int, *extra) -> int:
    if batch < 1:
        raise ValueError("batch must be at least 1")
    if conn.is_in_transaction():
        raise RuntimeError("a purge commits batch by batch; call it outside a transaction")
    # one cutoff for the whole run, from the database's clock
    cutoff = await conn.fetchval("SELECT now() - make_interval(days => $1)", days)
    deleted = 0
    while True:
        status = await conn.execute(sql, cutoff, batch, *extra)  # autocommit: one short transaction
        count = int(status.rpartition(" ")[2])
        deleted += count
        if count < batch:
            return deleted
