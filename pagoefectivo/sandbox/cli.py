"""``python -m pagoefectivo.sandbox`` / ``refundctl sandbox serve``: run the gateway until SIGTERM or SIGINT.

Merchants and payments come from the project's database (DATABASE_URL, with
REFUNDS_MASTER_KEY or REFUNDS_MASTER_KEY_FILE to open the secrets) or, with ``--seed FILE``,
from a seed file alone (then neither is required, and the database is not read).
REFUNDS_NOTIFY_URL is where merchants without their own notify URL get ``cip.paid``.
Every chaos key is also a flag (``latency_ms`` → ``--latency-ms``); mappings take JSON,
``--allowed-ips`` takes ``CIDR,CIDR``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

from refunds import service
from refunds.vault import vault_from_settings

from .app import create_app
from .chaos import ChaosConfig, ChaosError
from .seed import SeedError, load_seed

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8090


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not JSON: {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


_FLAG_TYPES = {"rate": float, "duration": float, "seconds": int, "limits": _json_object, "mix": _json_object,
               "scale": float, "cidrs": str, "merchant_cidrs": _json_object}
_METAVARS = {"rate": "P", "duration": "N", "seconds": "S", "limits": "JSON", "mix": "JSON", "scale": "X",
             "cidrs": "CIDR,...", "merchant_cidrs": "JSON"}


def flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def build_parser(prog: str = "python -m pagoefectivo.sandbox") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="The PagoEfectivo sandbox gateway (docs/PROTOCOL.md).")
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"listen address (default {DEFAULT_HOST})")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"listen port (default {DEFAULT_PORT})")
    parser.add_argument("--seed", metavar="FILE", default=None,
                        help="merchants and payments from this JSON file instead of DATABASE_URL (docs/PROTOCOL.md)")
    chaos = parser.add_argument_group("chaos", "gateway faults; the same keys as POST /sandbox/chaos")
    for f in fields(ChaosConfig):
        kind = f.metadata["kind"]
        chaos.add_argument(flag(f.name), dest=f.name, type=_FLAG_TYPES[kind], default=None, metavar=_METAVARS[kind],
                           help=f"{f.metadata['help']} (default {json.dumps(ChaosConfig().to_json()[f.name])})")
    return parser


def chaos_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> ChaosConfig:
    changes = {key: getattr(args, key) for key in ChaosConfig.keys() if getattr(args, key) is not None}
    try:
        return ChaosConfig().merged(changes)
    except ChaosError as exc:
        name, _, inner = exc.key.partition(".")
        parser.error(f"{flag(name)}{' ' + inner if inner else ''}: {exc.message}")
        raise  # not reached: parser.error exits


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    config = chaos_from_args(parser, args)
    if args.seed is not None:
        try:
            seed = load_seed(args.seed)
        except SeedError as exc:
            print(f"sandbox: --seed {exc}", file=sys.stderr)
            return 2
        settings = service.load_settings("sandbox")
        if settings is None:
            return 2
        app = create_app(config, seed=seed, notify_base_url=settings.refunds_notify_url)
    else:
        settings = service.load_settings("sandbox", lambda s: (s.require("database_url"), s.master_key()))
        if settings is None:
            return 2
        app = create_app(config, database_url=settings.database_url, vault=vault_from_settings(settings),
                         notify_base_url=settings.refunds_notify_url)
    # access_log off: refunds are logged by the app, tokens never are
    return service.run("sandbox", app, args.host, args.port, access_log=None)
