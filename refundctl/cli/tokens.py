"""refundctl token: intake API tokens scoped to merchants.

A token's secret is printed once, at ``create``; ``list`` shows names, scopes and
dates, never a secret or its hash. ``revoke`` takes effect on the next request.
"""

from __future__ import annotations

import asyncio

from .common import (
    NotFound, emit, emit_page, name, page, table, with_conn, with_json, with_page,
)


def cmd_token_create(args) -> int:
    from refunds.tokens import create_token

    token = asyncio.run(with_conn(lambda conn: create_token(conn, args.name, args.merchant)))
    emit(args, {"name": args.name, "token": token}, lambda: print(token))
    return 0


def cmd_token_list(args) -> int:
    from refunds.tokens import list_tokens

    tokens, cursor = page(args, asyncio.run(with_conn(list_tokens)), lambda t: (t["name"],), parts=1)
    emit_page(args, "tokens", tokens, cursor, lambda: table(
        "intake API tokens", ["name", "merchants", "created", "revoked"],
        [[t["name"], ", ".join(t["merchants"]), t["created_at"], t["revoked_at"] or ""] for t in tokens],
    ))
    return 0


def cmd_token_revoke(args) -> int:
    from refunds.tokens import revoke_token

    if not asyncio.run(with_conn(lambda conn: revoke_token(conn, args.name))):
        raise NotFound(f"no active token named {args.name!r}")
    emit(args, {"name": args.name, "revoked": True}, lambda: print(f"token {args.name} revoked"))
    return 0


def register(sub) -> None:
    token = sub.add_parser("token", help="intake API tokens scoped to merchants").add_subparsers(dest="token_command", required=True)
    create = with_json(token.add_parser("create", help="an intake API token scoped to merchants"))
    create.add_argument("--name", required=True, type=name)
    create.add_argument("--merchant", required=True, action="append")
    create.set_defaults(func=cmd_token_create)
    with_page(token.add_parser("list", help="every token, active or revoked (never the secret)")).set_defaults(
        func=cmd_token_list)
    revoke = with_json(token.add_parser("revoke", help="revoke a token at once"))
    revoke.add_argument("name")
    revoke.set_defaults(func=cmd_token_revoke)
