"""refundctl: the operator's command line (README lists its commands). One module per command group."""

from __future__ import annotations

import argparse
import sys

from refunds.errors import ConfigError, RefundsError
from . import admin, merchants, notifications, payments, refunds, reports, services, tokens

GROUPS = (services, admin, merchants, tokens, payments, refunds, notifications, reports)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="refundctl", description="PagoEfectivo refunds for marketplaces")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        if getattr(args, "passthrough", False):
            return args.func(args, extra)
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return args.func(args)
    except ConfigError as exc:
        print(f"refundctl: {exc}", file=sys.stderr)
        return 2
    except (RefundsError, OSError) as exc:
        print(f"refundctl: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
