"""refundctl: the operator's command line (README lists its commands). One module per command group.

Every expected failure is one line on stderr and an exit status from ``refunds.service``
(0 ok, 1 findings, 2 usage or configuration, 3 a dependency unavailable); a reader that
stops early (``| head``) ends the command quietly with 141, as it would any Unix tool.
"""

from __future__ import annotations

import argparse
import os
import sys

from refunds import service

from . import admin, merchants, notifications, payments, refunds, reports, services, tokens, webhooks

GROUPS = (services, admin, merchants, tokens, payments, refunds, notifications, reports, webhooks)
CLOSED_PIPE = 128 + 13  # killed by SIGPIPE, as the shell reports it for cat or grep


class Parser(argparse.ArgumentParser):
    """A bad argument is one line and exit 2, like every other expected failure; usage stays in --help."""

    def error(self, message: str):
        self.exit(service.USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version as installed

    try:
        return installed("pagoefectivo-refunds")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="refundctl", description="PagoEfectivo refunds for marketplaces")
    parser.add_argument("--version", action="version", version=f"refundctl {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            return _main(list(sys.argv[1:] if argv is None else argv))
        finally:
            sys.stdout.flush()  # a closed pipe shows here, inside main, not at exit (--help and --version too)
    except BrokenPipeError:
        return _reader_left()


def _main(argv: list[str]) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return service.guarded("refundctl", lambda: _run(args, extra))


def _run(args, extra: list[str]) -> int:
    try:
        status = args.func(args, extra) if getattr(args, "passthrough", False) else args.func(args)
        sys.stdout.flush()
    except BrokenPipeError:  # here, before service.guarded could take it for a connection lost
        return _reader_left()
    return status


def _reader_left() -> int:
    """The reader of our stdout is gone: point stdout at devnull, so that no later flush complains."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return CLOSED_PIPE


if __name__ == "__main__":
    sys.exit(main())
