"""``python -m receiver``: serve the notify_url until SIGTERM or SIGINT.

Settings: DATABASE_URL, REFUNDS_MASTER_KEY (or REFUNDS_MASTER_KEY_FILE), RECEIVER_PORT
(default 8081), RECEIVER_HOST (default 0.0.0.0). A missing or malformed one stops the
process at start with one line naming it (exit 2).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

from aiohttp import web

from refunds.errors import ConfigError
from refunds.settings import get_settings
from refunds.vault import Vault

from .app import create_app

DEFAULT_HOST = "0.0.0.0"


def main() -> int:
    try:
        settings = get_settings()
        database_url = settings.require("database_url")
        vault = Vault(settings.master_key())
        level = logging.getLevelName(settings.log_level.upper())
        if not isinstance(level, int):
            raise ConfigError(f"LOG_LEVEL is malformed: {settings.log_level!r} is not a logging level")
    except ConfigError as exc:
        print(f"receiver: {exc}", file=sys.stderr)
        return 2
    host = os.environ.get("RECEIVER_HOST", "").strip() or DEFAULT_HOST
    port = settings.receiver_port
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        asyncio.run(serve(create_app(database_url=database_url, vault=vault), host, port))
    except OSError as exc:  # the port is taken, or the host is not ours
        print(f"receiver: cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


async def serve(app: web.Application, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    runner = web.AppRunner(app, access_log=None)  # one line per notification is logged by the app
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        print(f"receiver listening on http://{host}:{port}", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    sys.exit(main())
