"""Every value in the database sealed by the vault, and their re-wrap under a new master key
(``refundctl keys rotate-master``): one list of the sealed columns, so a rotation misses none."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from . import merchants, webhooks
from .errors import VaultError
from .vault import Vault


@dataclass(frozen=True)
class SealedColumns:
    """Where one table keeps values sealed by the vault: its key column, and its sealed columns.
    A value of column ``<field>_sealed`` is bound to ``identity(key, "<field>")``."""

    table: str
    key: str
    columns: tuple[str, ...]
    identity: Callable[[object, str], str]

    def identity_of(self, key, column: str) -> str:
        return self.identity(key, column.removesuffix("_sealed"))


def sealed_tables() -> tuple[SealedColumns, ...]:
    """Every table holding sealed values, each with its sealed columns: what a master-key rotation
    re-wraps. A new sealed column belongs here (tests/refunds/test_vault.py compares this list with
    the schema's ``*_sealed`` columns)."""
    return (
        SealedColumns("merchants", "merchant_id",
                      ("secret_key_sealed", "private_key_sealed", "previous_secret_key_sealed"), merchants.sealed_identity),
        SealedColumns("webhook_endpoints", "endpoint_id", ("secret_sealed", "previous_secret_sealed"),
                      webhooks.sealed_identity),
    )


async def rewrap_all(conn, vault: Vault) -> dict[str, int]:
    """Re-wrap the data key of every sealed value in the database with the current master key.

    Each table of ``sealed_tables()``, one short transaction per row (its sealed columns, current
    and previous secrets alike, together), so the services keep working meanwhile. Returns the
    number of rows re-wrapped per table. A value that does not open raises VaultError naming it
    and what was re-wrapped before it; running it again is safe (the current key re-wraps its own).
    """
    done: dict[str, int] = {}
    for spec in sealed_tables():
        done[spec.table] = 0
        columns = ", ".join(spec.columns)
        assignments = ", ".join(f"{column} = ${n}" for n, column in enumerate(spec.columns, 2))
        keys = [r[0] for r in await conn.fetch(f"SELECT {spec.key} FROM {spec.table} ORDER BY {spec.key}")]
        for key in keys:
            async with conn.transaction():
                row = await conn.fetchrow(f"SELECT {columns} FROM {spec.table} WHERE {spec.key} = $1 FOR UPDATE", key)
                if row is None:  # deleted since the list was read
                    continue
                values = []
                for column in spec.columns:
                    identity = spec.identity_of(key, column)
                    try:
                        values.append(None if row[column] is None else vault.rewrap(row[column], identity))
                    except VaultError as exc:
                        so_far = ", ".join(f"{count} {table}" for table, count in done.items())
                        raise VaultError(f"{identity} ({spec.table}.{column}): {exc}; re-wrapped before it:"
                                         f" {so_far} (running it again is safe)") from None
                await conn.execute(f"UPDATE {spec.table} SET {assignments} WHERE {spec.key} = $1", key, *values)
            done[spec.table] += 1
    return done
