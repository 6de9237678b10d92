"""Dramatiq workers: `dramatiq workers` sets up the Redis broker and loads the actors."""

import sys

from refunds.errors import ConfigError

from .broker import setup_broker

try:
    broker = setup_broker()
except ConfigError as exc:  # one line naming the setting, not a traceback
    # the package is imported first by `dramatiq workers` and by `python -m workers.scheduler` alike
    service = "scheduler" if "workers.scheduler" in sys.orig_argv else "worker"
    print(f"{service}: {exc}", file=sys.stderr)
    raise SystemExit(2) from None

from . import actors  # noqa: E402  (actors need the broker set first)

__all__ = ["broker", "actors"]
