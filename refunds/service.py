"""The life of a long-running HTTP service process (intake, receiver, sandbox), written once.

Settings are read before anything starts, so a missing one stops the process with one
line naming it (exit 2); a port that cannot be bound is one line too (exit 1); SIGTERM
and SIGINT finish in-flight requests and run the app's cleanup hooks.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Callable

import uvloop  # libuv's event loop: the services spend their time in socket round trips

from . import logs
from .errors import ConfigError
from .settings import Settings, get_settings


def load_settings(name: str, check: Callable[[Settings], object] | None = None) -> Settings | None:
    """Settings with logging configured, or None after printing ``name: <problem>`` to stderr."""
    try:
        settings = get_settings()
        level = logging.getLevelName(settings.log_level.upper())
        if not isinstance(level, int):
            raise ConfigError(f"LOG_LEVEL is malformed: {settings.log_level!r} is not a logging level")
        if check is not None:
            check(settings)
    except ConfigError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return None
    logs.configure(name, level)  # one JSON object per line on stderr
    return settings


def run(name: str, app, host: str, port: int, **runner_options) -> int:
    """Serve ``app`` until SIGTERM/SIGINT; the exit status for ``main``."""
    try:
        uvloop.run(_serve(name, app, host, port, runner_options))
    except OSError as exc:  # the port is taken, or the host is not ours
        print(f"{name}: cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


async def _serve(name: str, app, host: str, port: int, runner_options: dict) -> None:
    from aiohttp import web

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    runner = web.AppRunner(app, **runner_options)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        print(f"{name} listening on http://{host}:{port}", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()
