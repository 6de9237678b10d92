"""Four eyes: approving or rejecting a refund that waits for approval.

One implementation for every door (the intake API's /approve and /reject, and
``refundctl refund approve|reject``), so the rules cannot drift apart:

* only a refund in ``awaiting_approval`` can be decided, and only once (the state
  machine's conditional move makes a concurrent second decision lose);
* the approver must not be the requester (names compared without case, so "Alice"
  cannot approve what "alice" asked for); a refund that needs approval always names its
  requester (``producers.enqueue`` refuses one that does not, ``requester_unnamed``);
* the decision is audited in ``refund_events`` with actor ``approver:NAME``;
* an approved refund is handed to the workers only after COMMIT.
"""

from __future__ import annotations

import logging
from uuid import UUID

import asyncpg

from refunds.delivery import Courier, deliver_async
from refunds.errors import NotFound, RefundsError
from refunds.records import Refund, find_refund
from refunds.requests import free_text
from refunds.states import transition

log = logging.getLogger(__name__)

# decision -> (state it moves the refund to, past tense for the audit message)
DECISIONS = {"approve": ("queued", "approved"), "reject": ("rejected", "rejected")}


class ApprovalError(RefundsError):
    """A decision that the four-eyes rules refuse; ``code`` is stable for APIs."""

    code = "approval_refused"


class SamePerson(ApprovalError):
    code = "same_person"


class NotAwaitingApproval(ApprovalError):
    code = "not_awaiting_approval"


def approver_actor(name: str) -> str:
    return f"approver:{name}"


async def decide(
    conn: asyncpg.Connection,
    refund_id: UUID,
    *,
    decision: str,
    approver: str,
    note: str | None = None,
    merchants: frozenset[str] | None = None,
    courier: Courier | None = None,
) -> Refund:
    """Approve (-> queued, then delivered) or reject (-> rejected, amount released) a waiting refund.

    ``merchants`` limits the decision to refunds of those merchants (an API token's scope);
    a refund outside it is reported as not found, so a token cannot learn that it exists.
    Raises NotFound, NotAwaitingApproval, SamePerson (or RefundRefused for a bad note);
    nothing is written then.
    """
    if decision not in DECISIONS:
        raise ValueError(f"decision must be one of {', '.join(DECISIONS)}")
    to_state, verb = DECISIONS[decision]
    note = free_text(note, "message")
    refund = await find_refund(conn, refund_id)
    if refund is None or (merchants is not None and refund.merchant_id not in merchants):
        raise NotFound(f"no refund {refund_id}")
    if refund.state != "awaiting_approval":
        raise NotAwaitingApproval(f"refund {refund.refund_id} is {refund.state}, not awaiting approval")
    if refund.requested_by is not None and refund.requested_by.casefold() == approver.casefold():
        raise SamePerson(f"{approver!r} requested this refund and cannot also {decision} it")
    async with conn.transaction():
        moved = await transition(
            conn, refund.refund_id, to_state, actor=approver_actor(approver),
            message=f"{verb} by {approver}" + (f": {note}" if note else ""), only_from=("awaiting_approval",),
        )
        if moved is None:
            raise NotAwaitingApproval(f"refund {refund.refund_id} was decided by someone else meanwhile")
        if to_state == "queued":  # the outbox grace period starts now, not at creation
            await conn.execute("UPDATE refunds SET delivered_at = now() WHERE refund_id = $1", moved.refund_id)
    log.info("refund %s %s by %s", moved.refund_id, verb, approver)
    if to_state == "queued":
        await deliver_async(moved.refund_id, courier=courier)  # after COMMIT: a worker must find it queued
    return moved
