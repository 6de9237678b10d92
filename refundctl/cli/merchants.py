"""refundctl merchant: marketplace sellers and their PagoEfectivo credentials."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from pathlib import Path

from .common import (
    Usage, emit, emit_page, hours, http_url, merchant_id, page, positive, table, vault, with_conn, with_json, with_page,
)

MAX_OVERLAP_HOURS = 30 * 24  # a rotation's overlap: PagoEfectivo switches at its own pace, within a month


def cmd_merchant_add(args) -> int:
    from pagoefectivo.protocol import public_key_pem

    from refunds.merchants import add_merchant

    secret = Path(args.secret_key_file).read_text().strip()
    private_pem = Path(args.private_key_file).read_bytes()
    try:
        public_pem = public_key_pem(private_pem)
    except (ValueError, TypeError) as exc:
        raise Usage(f"--private-key-file is not an unencrypted PEM RSA private key: {exc}") from None
    if not secret:
        raise Usage("--secret-key-file is empty")
    sealer = vault()

    async def run(conn):
        return await add_merchant(
            conn, sealer, merchant_id=args.id, env=args.env, service_id=args.service_id, access_key=args.access_key,
            secret_key=secret, private_key_pem=private_pem, public_key_pem=public_pem,
            rate_limit=args.rate_limit, refund_mode=args.refund_mode, notify_url=args.notify_url,
            approval_threshold=args.approval_threshold,
        )

    merchant = asyncio.run(with_conn(run))
    emit(args, merchant.public_view(), lambda: print(f"merchant {merchant.merchant_id} saved ({merchant.env})"))
    return 0


def cmd_merchant_list(args) -> int:
    from refunds.merchants import list_merchants

    merchants = asyncio.run(with_conn(list_merchants))
    shown, cursor = page(args, merchants, lambda m: (m.merchant_id,), parts=1)
    views = [m.public_view() for m in shown]
    emit_page(args, "merchants", views, cursor, lambda: table(
        "merchants", ["merchant", "env", "service id", "rate/s", "mode", "approval above"],
        [[v["merchant_id"], v["env"], v["service_id"], v["rate_limit"], v["refund_mode"], v["approval_threshold"]] for v in views],
    ))
    return 0



def cmd_merchant_keygen(args) -> int:
    """A merchant's RSA key pair: the private key (signs its refund requests) stays in FILE, readable
    by its owner alone, for ``merchant add --private-key-file``; the public key is printed, for
    PagoEfectivo (or ``sandbox onboard``) to verify the signatures with."""
    import os

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from pagoefectivo.protocol import public_key_pem

    key = rsa.generate_private_key(public_exponent=65537, key_size=args.bits)
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    try:
        fd = os.open(args.file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never over an existing key
    except FileExistsError:
        raise Usage(f"{args.file} exists: a key is never overwritten; give another file") from None
    with os.fdopen(fd, "wb") as out:
        out.write(private_pem)
    public_pem = public_key_pem(private_pem)
    emit(args, {"private_key_file": args.file, "public_key_pem": public_pem}, lambda: print(public_pem, end=""))
    return 0


def cmd_merchant_rotate_secret(args) -> int:
    from datetime import timedelta

    from refunds.merchants import rotate_secret

    secret = Path(args.secret_key_file).read_text().strip()
    sealer = vault()
    try:
        until = asyncio.run(with_conn(lambda conn: rotate_secret(
            conn, sealer, args.id, secret, overlap=timedelta(hours=args.overlap_hours))))
    except ValueError as exc:
        raise Usage(f"--secret-key-file: {exc}") from None
    emit(args, {"merchant_id": args.id, "previous_secret_valid_until": until.isoformat()},
         lambda: print(f"merchant {args.id}: new secret in use; the old one verifies notifications until {until}"))
    return 0


# Each option's rule as the merchants table's CHECK states it (refunds/schema.sql), so bad input is
# refused by name before anything is written rather than by the database after.
MAX_SERVICE_ID = 2**63 - 1  # bigint
MAX_RATE_LIMIT = Decimal("99999999.99")  # numeric(10, 2)


def _service_id(text: str) -> int:
    """--service-id: bigint, CHECK (service_id > 0)."""
    import argparse

    value = positive(text)
    if value > MAX_SERVICE_ID:
        raise argparse.ArgumentTypeError(f"{text!r} is over {MAX_SERVICE_ID}")
    return value


def _access_key(text: str) -> str:
    """PagoEfectivo's accessKey (alphanumeric, 20 in its document): a key with a space, or none, only
    fails later, at the gateway's authorization."""
    import argparse

    if not text or len(text) > 64 or any(ch.isspace() or not ch.isprintable() for ch in text):
        raise argparse.ArgumentTypeError("must be 1-64 printable characters without spaces")
    return text


def _positive_cents(what: str, limit: Decimal | None = None):
    """A type for a numeric(_, 2) column with CHECK (> 0): refunds.money's amount rule (over 0, at most
    2 decimals, never rounded, so 0.001 is not stored as 0.00), and the column's ``limit`` if it is
    narrower than an amount's numeric(14, 2)."""
    import argparse

    from refunds.errors import RefundRefused
    from refunds.money import parse_amount

    def parse(text: str) -> Decimal:
        try:
            value = parse_amount(text, what)
        except RefundRefused as exc:
            raise argparse.ArgumentTypeError(exc.message) from None
        if limit is not None and value > limit:
            raise argparse.ArgumentTypeError(f"{what} {value} is over {limit}")
        return value

    return parse


def register(sub) -> None:
    merchant = sub.add_parser("merchant", help="sellers and their PagoEfectivo credentials").add_subparsers(dest="merchant_command", required=True)
    add = with_json(merchant.add_parser("add", help="add or update a seller and its credentials"))
    add.add_argument("--id", required=True, type=merchant_id)
    add.add_argument("--env", required=True, choices=["sandbox", "production"])
    add.add_argument("--service-id", required=True, type=_service_id)
    add.add_argument("--access-key", required=True, type=_access_key)
    add.add_argument("--secret-key-file", required=True)
    add.add_argument("--private-key-file", required=True)
    add.add_argument("--rate-limit", type=_positive_cents("the rate", MAX_RATE_LIMIT), default=Decimal("10"),
                     help="refunds per second at the gateway, over 0, at most 2 decimals (default 10)")
    add.add_argument("--approval-threshold", type=_positive_cents("the threshold"), default=None,
                     help="refunds above this amount wait for approval: over 0, at most 2 decimals")
    add.add_argument("--refund-mode", default="auto", choices=["auto", "approval", "off"])
    add.add_argument("--notify-url", default=None, type=http_url,
                     help="where the gateway sends this merchant's notifications (http or https)")
    add.set_defaults(func=cmd_merchant_add)
    with_page(merchant.add_parser("list", help="by merchant id")).set_defaults(func=cmd_merchant_list)
    keygen = with_json(merchant.add_parser(
        "keygen", help="make a merchant's RSA key pair: the private key into FILE (0600), the public key printed"))
    keygen.add_argument("file", help="where the private key goes (PEM); it must not exist yet")
    keygen.add_argument("--bits", type=int, choices=[2048, 3072, 4096], default=2048)
    keygen.set_defaults(func=cmd_merchant_keygen)
    rotate = with_json(merchant.add_parser("rotate-secret", help="replace a merchant's secretKey, with an overlap"))
    rotate.add_argument("--id", required=True)
    rotate.add_argument("--secret-key-file", required=True)
    rotate.add_argument("--overlap-hours", type=hours(MAX_OVERLAP_HOURS), default=24.0,
                        help="how long the old secret still verifies notifications: 0 to"
                             f" {MAX_OVERLAP_HOURS} (30 days; default 24)")
    rotate.set_defaults(func=cmd_merchant_rotate_secret)
