"""refundctl token: intake API tokens scoped to merchants."""

from __future__ import annotations

import asyncio

from .common import (
    emit, with_conn, with_json,
)


def cmd_token_create(args) -> int:
    from ..tokens import create_token

    token = asyncio.run(with_conn(lambda conn: create_token(conn, args.name, args.merchant)))
    emit(args, {"name": args.name, "token": token}, lambda: print(token))
    return 0



def register(sub) -> None:
    token = sub.add_parser("token").add_subparsers(dest="token_command", required=True)
    create = with_json(token.add_parser("create", help="an intake API token scoped to merchants"))
    create.add_argument("--name", required=True)
    create.add_argument("--merchant", required=True, action="append")
    create.set_defaults(func=cmd_token_create)
