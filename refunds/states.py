"""The refund state machine: the only code that changes a refund's state or writes its audit rows.

Moves follow ``MOVES``: forward, except an operator's retry of a failed refund or one in
manual review (back to ``queued``, through ``retry``). Each is one conditional UPDATE plus a
``refund_events`` audit row in the same statement, so a late or duplicate event can never
move a refund backwards, and two processes racing for the same move see exactly one winner. A caller
that writes more in the same statement builds on ``moved_if`` (the receiver's notification
rows) or ``first_events`` (the intake's accepted refunds).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

import asyncpg

from .errors import InvalidTransition, NotFound
from .records import COLUMNS, Refund, find_refund, from_row
from .sql import Statement

STATES = (
    "queued", "awaiting_approval", "submitted", "pending",
    "succeeded", "failed", "rejected", "manual_review",
)
FINAL = frozenset({"succeeded", "failed", "rejected", "manual_review"})
OPEN = frozenset({"queued", "submitted", "pending"})
# a refund left pending is first asked about after this many seconds (see status_schedule)
FIRST_STATUS_CHECK = 60.0

# from-state -> the states it may move to
MOVES: dict[str, frozenset[str]] = {
    "awaiting_approval": frozenset({"queued", "rejected"}),
    "queued": frozenset({"submitted", "succeeded", "failed", "manual_review"}),
    "submitted": frozenset({"pending", "succeeded", "failed", "manual_review"}),
    "pending": frozenset({"succeeded", "failed", "manual_review"}),
    # an operator (or a late provider answer) may still settle a refund sent to review,
    # and an operator may retry it (see ``retry``)
    "manual_review": frozenset({"succeeded", "failed", "queued"}),
    # only through ``retry``: an operator's new attempt after a failure that was not the request's fault
    "failed": frozenset({"queued"}),
}
# Provider codes that say the request itself is wrong: retrying cannot help.
NOT_RETRYABLE_CODES = frozenset({"111", "112", "113", "601", "602", "603", "604", "605", "606", "607"})


def _with_audit_rows(locked_update: str, event: str, *, also_returning: str = "", between: str = "",
                     then_select: str = "SELECT * FROM moved") -> Statement:
    """One statement that locks refunds, moves them and writes their audit rows.

    A data-modifying CTE: one round trip and one implicit transaction (or part of the
    caller's), so each move and its ``refund_events`` row are written together or not at
    all. ``$refund_ids`` are the refunds; ``previous`` locks their rows FOR UPDATE in id
    order (two batches never wait on each other in a cycle), so ``previous.state`` is the
    state each move really starts from. ``locked_update`` updates ``refunds r`` from
    ``previous``; ``event`` selects each audit row's to_state, actor, code and message from
    ``moved`` (which returns the refund's columns, ``from_state`` and ``also_returning``).
    ``between``: more CTEs after ``previous`` (the update may depend on them);
    ``then_select``: what the statement returns.
    """
    return Statement(f"""
        WITH previous AS (SELECT refund_id, state FROM refunds WHERE refund_id = ANY($refund_ids::uuid[])
                          ORDER BY refund_id FOR UPDATE),
        {between}
        moved AS ({locked_update}
                  RETURNING {', '.join('r.' + c.strip() for c in COLUMNS.split(','))},
                            previous.state AS from_state {also_returning}),
        audit AS (INSERT INTO refund_events (refund_id, from_state, to_state, actor, code, message)
                  SELECT refund_id, from_state, {event} FROM moved)
        {then_select}""")


def first_events(accepted: str) -> str:
    """The audit row of each refund as it is accepted: the INSERT for a CTE of a statement
    whose ``accepted`` query gives (refund_id, state, actor) of the refunds it just created."""
    return f"""INSERT INTO refund_events (refund_id, from_state, to_state, actor, message)
               SELECT refund_id, NULL, state, actor, 'accepted' FROM ({accepted}) AS accepted"""


# For each move, in the order of $refund_ids: its to_state, code, message and provider refund id.
# $allowed: the allowed moves as 'from>to'; $final: the final states; $first_check_seconds: when a
# pending refund is first asked about; $actor: who the audit rows name.
_MOVE = """UPDATE refunds r SET
           state = m.to_state,
           updated_at = now(),
           completed_at = CASE WHEN m.to_state = ANY($final::text[]) THEN COALESCE(r.completed_at, now()) END,
           claimed_until = CASE WHEN m.to_state = ANY($final::text[]) OR m.to_state = 'pending' THEN NULL
                                ELSE r.claimed_until END,
           next_check_at = CASE WHEN m.to_state = 'pending' THEN now() + make_interval(secs => $first_check_seconds)
                                WHEN m.to_state = ANY($final::text[]) THEN NULL ELSE r.next_check_at END,
           provider_code = COALESCE(m.code, r.provider_code),
           provider_message = COALESCE(m.message, r.provider_message),
           provider_refund_id = COALESCE(m.provider_refund_id, r.provider_refund_id)
       FROM previous
       JOIN unnest($refund_ids::uuid[], $to_states::text[], $codes::text[], $messages::text[],
                   $provider_refund_ids::text[])
            AS m (refund_id, to_state, code, message, provider_refund_id) USING (refund_id)
       WHERE r.refund_id = previous.refund_id AND previous.state || '>' || m.to_state = ANY($allowed::text[])"""
_MOVE_EVENT = "state, $actor, given_code, given_message"
_MOVE_RETURNING = ", m.code AS given_code, m.message AS given_message"
_MOVE_AND_RECORD = _with_audit_rows(_MOVE, _MOVE_EVENT, also_returning=_MOVE_RETURNING)

_CLAIM_AND_RECORD = _with_audit_rows(
    # provider_code after a claim: the code the previous attempt released its claim with, or
    # NULL when that claim expired instead (its worker may have died mid-request)
    """UPDATE refunds r SET
           state = 'submitted', attempts = r.attempts + 1, updated_at = now(),
           claimed_until = now() + make_interval(secs => $claim_seconds),
           provider_code = CASE WHEN r.claimed_until IS NULL THEN r.provider_code END
       FROM previous
       WHERE r.refund_id = previous.refund_id AND (previous.state = 'queued'
             OR (previous.state = 'submitted' AND (r.claimed_until IS NULL OR r.claimed_until < now())))""",
    """'submitted', $actor, NULL, 'attempt ' || attempts
       || CASE WHEN from_state = 'submitted' THEN ' (previous claim expired)' ELSE '' END""",
)


def sources_of(to_state: str) -> list[str]:
    if to_state not in STATES:
        raise InvalidTransition(f"unknown state {to_state!r}")
    return [source for source, targets in MOVES.items() if to_state in targets]


@dataclass(frozen=True)
class Move:
    """One requested move: to ``to_state``, with what the provider said (if anything)."""
    refund_id: UUID
    to_state: str
    code: str | None = None
    message: str | None = None
    provider_refund_id: str | None = None


ALLOWED_MOVES = [f"{source}>{target}" for source, targets in MOVES.items() for target in targets]


async def transition(
    conn: asyncpg.Connection,
    refund_id: UUID,
    to_state: str,
    *,
    actor: str,
    code: str | None = None,
    message: str | None = None,
    only_from: tuple[str, ...] | None = None,
    provider_refund_id: str | None = None,
) -> Refund | None:
    """Move a refund to ``to_state`` if the machine allows it from its current state.

    Returns the updated refund, or None when the refund is not in a state this move may
    start from (already moved by someone else, or a late event): nothing is written then.
    """
    sources = sources_of(to_state)
    if only_from is not None:
        sources = [s for s in sources if s in only_from]
    [moved] = await transition_many(conn, [Move(refund_id, to_state, code, message, provider_refund_id)],
                                    actor=actor, allowed=[f"{source}>{to_state}" for source in sources])
    return moved


async def transition_many(conn: asyncpg.Connection, moves: Sequence[Move], *, actor: str,
                          allowed: Sequence[str] = ALLOWED_MOVES) -> list[Refund | None]:
    """``transition`` for several refunds (each at most once) in one statement; results in order."""
    rows = await conn.fetch(_MOVE_AND_RECORD.text,
                            *_MOVE_AND_RECORD.args(**move_parameters(moves, actor=actor, allowed=allowed)))
    moved = {row["refund_id"]: from_row(row) for row in rows}
    return [moved.get(m.refund_id) for m in moves]


def moved_if(condition_ctes: str, condition: str, then_select: str) -> Statement:
    """The statement of ``transition_many``, for a caller that writes something else in the same
    statement and moves only if that succeeded: ``condition_ctes`` follow ``previous`` (the
    locked rows), ``condition`` is ANDed to the move, ``then_select`` is what the statement
    returns (``previous``, ``moved`` and the caller's CTEs are in scope). The caller's parts
    name their own parameters beside those of ``move_parameters``."""
    return _with_audit_rows(_MOVE + f" AND ({condition})", _MOVE_EVENT, also_returning=_MOVE_RETURNING,
                            between=condition_ctes, then_select=then_select)


def move_parameters(moves: Sequence[Move], *, actor: str, allowed: Sequence[str] = ALLOWED_MOVES) -> dict:
    """The move's parameters in ``transition_many``'s statement (and in ``moved_if``'s)."""
    for move in moves:
        sources_of(move.to_state)  # an unknown state is a bug: refuse the whole batch before writing
    return {
        "refund_ids": [m.refund_id for m in moves], "to_states": [m.to_state for m in moves],
        "codes": [m.code for m in moves], "messages": [m.message for m in moves],
        "provider_refund_ids": [m.provider_refund_id for m in moves],
        "allowed": list(allowed), "final": list(FINAL), "first_check_seconds": FIRST_STATUS_CHECK, "actor": actor,
    }


async def retry(conn: asyncpg.Connection, refund_id: UUID, *, actor: str) -> Refund:
    """An operator's retry of a refund in manual_review, or failed for a cause retrying can fix.

    The refund goes back to ``queued`` (its amount is reserved again, so this is refused if
    the payment no longer has room); the caller delivers it after COMMIT. The worker asks
    the gateway for its status before sending again, since an earlier attempt may have landed.
    """
    async with conn.transaction():
        return await _retry(conn, refund_id, actor)


async def _retry(conn: asyncpg.Connection, refund_id: UUID, actor: str) -> Refund:
    current = await conn.fetchrow(
        "SELECT state, provider_code FROM refunds WHERE refund_id = $1 FOR UPDATE", refund_id)
    if current is None:
        raise NotFound(f"refund {refund_id} does not exist")
    if current["state"] not in ("manual_review", "failed"):
        raise InvalidTransition(f"only a refund in manual_review or failed can be retried, not one in {current['state']}")
    if current["state"] == "failed" and current["provider_code"] in NOT_RETRYABLE_CODES:
        raise InvalidTransition(
            f"refund failed with provider code {current['provider_code']}: the request itself was refused, "
            "a retry cannot succeed")
    try:
        moved = await transition(conn, refund_id, "queued", actor=actor, message="operator retry",
                                 only_from=("manual_review", "failed"))
    except asyncpg.CheckViolationError:
        raise InvalidTransition("the payment no longer has enough refundable amount for this refund") from None
    if moved is None:
        raise InvalidTransition("the refund changed state meanwhile; look again")
    await conn.execute(
        "UPDATE refunds SET delivered_at = now(), status_checks = 0, next_check_at = NULL WHERE refund_id = $1",
        refund_id)
    return await find_refund(conn, refund_id)


async def claim_many(conn: asyncpg.Connection, refund_ids: Sequence[UUID], *, actor: str,
                     claim_seconds: int) -> list[tuple[Refund, str] | None]:
    """Take the exclusive right to talk to the gateway about these refunds for a while; one statement.

    A queued refund becomes ``submitted``; a ``submitted`` refund whose previous claim
    expired (its worker died or gave up) may be claimed again. For each refund, in order:
    the refund and the state it was claimed from, or None when another worker holds it or
    it has moved on.
    """
    rows = await conn.fetch(_CLAIM_AND_RECORD.text, *_CLAIM_AND_RECORD.args(
        refund_ids=list(refund_ids), claim_seconds=claim_seconds, actor=actor))
    claimed = {row["refund_id"]: (from_row(row), row["from_state"]) for row in rows}
    # a refund asked for twice is claimed once: only its first asker may talk to the gateway
    return [claimed.pop(refund_id, None) for refund_id in refund_ids]


_RENEW_CLAIMS = Statement(
    """UPDATE refunds r SET claimed_until = now() + make_interval(secs => $claim_seconds)
       FROM unnest($refund_ids::uuid[], $held_until::timestamptz[]) AS h (refund_id, claimed_until)
       WHERE r.refund_id = h.refund_id AND r.state = 'submitted' AND r.claimed_until = h.claimed_until
       RETURNING r.refund_id, r.claimed_until""")


async def renew_claims(conn: asyncpg.Connection, held: Sequence[tuple[UUID, datetime]], *,
                       claim_seconds: float) -> dict[UUID, datetime]:
    """Extend claims still held: each is matched by the ``claimed_until`` its holder last set, so a
    claim that expired and was taken by another worker is never extended by the one that lost it.
    The new ``claimed_until`` of each claim extended; one statement."""
    rows = await conn.fetch(_RENEW_CLAIMS.text, *_RENEW_CLAIMS.args(
        claim_seconds=claim_seconds, refund_ids=[refund_id for refund_id, _ in held],
        held_until=[until for _, until in held]))
    return {row["refund_id"]: row["claimed_until"] for row in rows}


async def release_claim(conn: asyncpg.Connection, refund_id: UUID, *, code: str | None, message: str | None) -> None:
    """Give up the claim early (a transient fault) so the next delivery may retry at once.

    ``code`` is how this attempt ended and replaces the last one's, even when None: the next
    attempt sends without asking for status only when it says nothing was sent
    (``workers.sender.NOTHING_SENT``), and an older attempt's code must never say it for this one.
    """
    await conn.execute(
        """UPDATE refunds SET claimed_until = NULL, updated_at = now(),
                  provider_code = $2, provider_message = COALESCE($3, provider_message)
           WHERE refund_id = $1 AND state = 'submitted'""",
        refund_id, code, message,
    )

