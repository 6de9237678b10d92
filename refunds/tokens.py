"""Intake API tokens: bearer secrets scoped to merchants, stored only as SHA-256.

A token is shown once, at creation; the database keeps its hash, so a leaked table
does not let anyone call the API. Tokens carry 256 random bits, so a plain (unsalted)
hash is enough and lets ``authenticate`` find a token with one indexed lookup instead
of comparing secrets in Python. The token's name is the caller's identity: it is
recorded as ``requested_by`` and as the approver of a refund.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections import OrderedDict
from dataclasses import dataclass

import asyncpg

from .errors import RefundsError

PREFIX = "rfd_"  # makes a leaked token recognisable to secret scanners and to people
NAME = re.compile(r"^[A-Za-z0-9_.@:-]{1,64}$")  # a token's, and an operator's in the audit trail
NAME_RULE = "1-64 characters of letters, digits, and _ . @ : -"
MAX_TOKEN_LENGTH = 256  # anything longer is not one of ours; refuse before hashing


class TokenError(RefundsError):
    """A token cannot be created as asked (bad name, name taken, unknown merchant)."""


class TokenRevoked(RefundsError):
    """The token was revoked (or lost the merchant) while its request was on its way."""


@dataclass(frozen=True)
class ApiToken:
    name: str
    merchants: frozenset[str]
    token_hash: str | None = None  # set by authenticate: what ACTIVE_TOKEN_SQL checks

    def allows(self, merchant_id: str) -> bool:
        return merchant_id in self.merchants


# "The token that asked is still active and may act for this merchant", as SQL: a writer puts
# it in the same statement as its write ($token_hash, $merchant_id), so a token revoked while
# a request is in flight can no longer write, and a cached lookup (TokenCache) is safe to use.
ACTIVE_TOKEN_SQL = (
    "EXISTS (SELECT 1 FROM api_tokens WHERE token_hash = {token_hash} AND revoked_at IS NULL"
    " AND {merchant_id} = ANY (merchants))"
)


class TokenCache:
    """Recently authenticated tokens, by hash, so the intake's hot path skips one query.

    A hit is a claim, not a proof: it may be revoked since. The intake only uses a hit
    when the write itself re-checks the token (ACTIVE_TOKEN_SQL), and checks with the
    database before any other answer. A hash always names the same token and scope: a
    re-created token gets a new secret, so entries never go stale, they only go dead.
    """

    def __init__(self, size: int = 1024):
        self._size = size
        self._tokens: OrderedDict[str, ApiToken] = OrderedDict()

    def get(self, token_hash: str) -> ApiToken | None:
        found = self._tokens.get(token_hash)
        if found is not None:
            self._tokens.move_to_end(token_hash)
        return found

    def put(self, token: ApiToken) -> None:
        self._tokens[token.token_hash] = token
        self._tokens.move_to_end(token.token_hash)
        while len(self._tokens) > self._size:
            self._tokens.popitem(last=False)

    def forget(self, token_hash: str) -> None:
        self._tokens.pop(token_hash, None)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


async def create_token(conn: asyncpg.Connection, name: str, merchants: list[str]) -> str:
    """Create a token named ``name`` for these merchants and return it (the only time it is seen).

    A name held by an active token is refused; the name of a revoked token may be reused
    (a person's token is rotated, and the audit trail keeps one identity for them).
    """
    if not isinstance(name, str) or not NAME.match(name):
        raise TokenError(f"token name must be {NAME_RULE}")
    wanted = list(dict.fromkeys(merchants or []))  # de-duplicated, order kept
    if not wanted:
        raise TokenError("a token needs at least one merchant")
    token = PREFIX + secrets.token_urlsafe(32)
    async with conn.transaction():
        found = {
            row["merchant_id"]
            for row in await conn.fetch("SELECT merchant_id FROM merchants WHERE merchant_id = ANY($1::text[])", wanted)
        }
        missing = [m for m in wanted if m not in found]
        if missing:
            raise TokenError(f"merchant {missing[0]!r} does not exist" + (
                f" (nor {', '.join(repr(m) for m in missing[1:])})" if len(missing) > 1 else ""
            ))
        created = await conn.fetchval(
            """INSERT INTO api_tokens (name, token_hash, merchants) VALUES ($1, $2, $3)
               ON CONFLICT (name) DO UPDATE
                   SET token_hash = EXCLUDED.token_hash, merchants = EXCLUDED.merchants,
                       created_at = now(), revoked_at = NULL
                   WHERE api_tokens.revoked_at IS NOT NULL
               RETURNING name""",
            name, hash_token(token), wanted,
        )
    if created is None:
        raise TokenError(f"a token named {name!r} already exists; revoke it first or choose another name")
    return token


async def authenticate(conn: asyncpg.Connection, token: str | None) -> ApiToken | None:
    """The active token with this secret, or None (unknown, revoked or malformed)."""
    if not token or len(token) > MAX_TOKEN_LENGTH:
        return None
    token_hash = hash_token(token)
    row = await conn.fetchrow(
        "SELECT name, merchants FROM api_tokens WHERE token_hash = $1 AND revoked_at IS NULL", token_hash
    )
    return ApiToken(row["name"], frozenset(row["merchants"]), token_hash) if row else None


async def list_tokens(conn: asyncpg.Connection) -> list[dict]:
    """Every token, active or revoked, without its hash."""
    rows = await conn.fetch("SELECT name, merchants, created_at, revoked_at FROM api_tokens ORDER BY name")
    return [
        {
            "name": row["name"],
            "merchants": list(row["merchants"]),
            "created_at": row["created_at"].isoformat(),
            "revoked_at": row["revoked_at"].isoformat() if row["revoked_at"] else None,
            "active": row["revoked_at"] is None,
        }
        for row in rows
    ]


async def revoke_token(conn: asyncpg.Connection, name: str) -> bool:
    """Revoke the named token at once; False if there is no active token by that name."""
    status = await conn.execute(
        "UPDATE api_tokens SET revoked_at = now() WHERE name = $1 AND revoked_at IS NULL", name
    )
    return status == "UPDATE 1"
