"""``python -m pagoefectivo.sandbox`` / ``refundctl sandbox serve``: run the gateway until SIGTERM or SIGINT.

The gateway is a party of its own: it starts knowing nobody (or what ``--seed FILE``
holds) and learns merchants through the onboarding call, payments through its own CIPs.
``--notify-base-url`` (default: REFUNDS_NOTIFY_URL) is where merchants registered without
a notify URL get ``cip.paid``.
Every chaos key is also a flag (``latency_ms`` → ``--latency-ms``); mappings take JSON,
``--allowed-ips`` takes ``CIDR,CIDR``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import fields
from datetime import datetime, timezone

import uvloop
from aiohttp import web

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


class JsonLines(logging.Formatter):
    """One JSON object per line, as the services log (an exception as its one-line cause)."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(),
                "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        if record.exc_info and record.exc_info[1] is not None:
            line["cause"] = f"{type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
        return json.dumps(line, default=str)


def flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def build_parser(prog: str = "python -m pagoefectivo.sandbox") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="The PagoEfectivo sandbox gateway (docs/PROTOCOL.md).")
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"listen address (default {DEFAULT_HOST})")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"listen port (default {DEFAULT_PORT})")
    parser.add_argument("--seed", metavar="FILE", default=None,
                        help="merchants and payments known from the start (docs/PROTOCOL.md)")
    parser.add_argument("--notify-base-url", metavar="URL", default=os.environ.get("REFUNDS_NOTIFY_URL") or None,
                        help="cip.paid for merchants registered without a notify URL goes to"
                             " URL/pagoefectivo/notifications/{merchantId} (default: REFUNDS_NOTIFY_URL)")
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


def main(argv: list[str] | None = None, serve=None) -> int:
    """Run the gateway; ``serve(app, host, port) -> exit status`` replaces aiohttp's own
    ``run_app`` (``refundctl sandbox serve`` passes one with header deadlines and a connection cap)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    config = chaos_from_args(parser, args)
    seed = None
    if args.seed is not None:
        try:
            seed = load_seed(args.seed)
        except SeedError as exc:
            print(f"sandbox: --seed {exc}", file=sys.stderr)
            return 2
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLines())
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    app = create_app(config, seed=seed, notify_base_url=args.notify_base_url)
    if serve is not None:
        return serve(app, args.host, args.port)
    try:
        # access_log off: refunds are logged by the app, tokens never are
        web.run_app(app, host=args.host, port=args.port, access_log=None, loop=uvloop.new_event_loop(),
                    keepalive_timeout=15,
                    print=lambda _: print(f"sandbox listening on http://{args.host}:{args.port}", flush=True))
    except OSError as exc:
        print(f"sandbox: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 3
    return 0
