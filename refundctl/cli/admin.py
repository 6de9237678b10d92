"""refundctl db and keys: schema migration and master keys."""

from __future__ import annotations

import asyncio

from .common import Usage, dsn, emit, vault, with_conn, with_json


def cmd_db_migrate(args) -> int:
    from refunds import db

    asyncio.run(db.migrate(dsn()))
    emit(args, {"schema": "applied"}, lambda: print("schema applied"))
    return 0


def cmd_db_create(args) -> int:
    """Create the database DATABASE_URL names, on its server (through the server's ``postgres``
    database), unless it exists: the first step on a fresh Postgres, without its client tools."""
    from urllib.parse import unquote, urlsplit, urlunsplit

    import asyncpg

    from refunds import db

    parts = urlsplit(dsn())
    name = unquote(parts.path.lstrip("/"))
    if not name:
        raise Usage("DATABASE_URL names no database (postgresql://user@host:5432/NAME)")

    async def create() -> bool:
        conn = await db.connect(urlunsplit(parts._replace(path="/postgres")))
        try:
            await conn.execute('CREATE DATABASE "%s"' % name.replace('"', '""'))
        except asyncpg.DuplicateDatabaseError:
            return False
        finally:
            await conn.close()
        return True

    created = asyncio.run(create())
    emit(args, {"database": name, "created": created},
         lambda: print(f"database {name} {'created' if created else 'exists already'}"))
    return 0


def cmd_keys_generate(args) -> int:
    from refunds.vault import generate_master_key

    key = generate_master_key()
    emit(args, {"master_key": key}, lambda: print(key))
    return 0


def cmd_keys_rotate_master(args) -> int:
    """Re-wrap every data key with REFUNDS_MASTER_KEY (the new key): merchants' secrets and private
    keys, webhook endpoints' secrets (``refunds.rekey.sealed_tables``).

    Runs while the services keep working: first give every process the new key as
    REFUNDS_MASTER_KEY and the old one in REFUNDS_PREVIOUS_MASTER_KEYS, then run this,
    then drop the old key.
    """
    from refunds.rekey import rewrap_all

    sealer = vault()
    counts = asyncio.run(with_conn(lambda conn: rewrap_all(conn, sealer)))  # every table holding sealed values
    said = " and ".join(f"{count} {table.replace('_', ' ')}" for table, count in counts.items())
    emit(args, {f"{table}_rewrapped": count for table, count in counts.items()},
         lambda: print(f"re-wrapped the data keys of {said} with the current master key"))
    return 0


def register(sub) -> None:
    dbp = sub.add_parser("db", help="create the database and apply the schema").add_subparsers(dest="db_command", required=True)
    with_json(dbp.add_parser("create", help="create the database DATABASE_URL names, unless it exists")).set_defaults(
        func=cmd_db_create)
    with_json(dbp.add_parser("migrate", help="apply schema.sql (safe to run again)")).set_defaults(func=cmd_db_migrate)

    keys = sub.add_parser("keys", help="the master key that seals merchants' secrets: generate, rotate").add_subparsers(dest="keys_command", required=True)
    with_json(keys.add_parser("generate", help="print a new REFUNDS_MASTER_KEY")).set_defaults(func=cmd_keys_generate)
    with_json(keys.add_parser(
        "rotate-master", help="re-wrap every data key with REFUNDS_MASTER_KEY (old key in REFUNDS_PREVIOUS_MASTER_KEYS)"
    )).set_defaults(func=cmd_keys_rotate_master)
