"""The life of a long-running HTTP service process (intake, receiver, sandbox), written once.

Settings are read before anything starts, so a missing one stops the process with one
line naming it (exit 2); a port that cannot be bound, or a database or Redis away at start,
is one line too (exit 3); SIGTERM and SIGINT finish in-flight requests and run the app's
cleanup hooks. The exit statuses and the one line each expected failure prints are here,
for refundctl too, so that every command and service answers the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import signal
import sys
from collections.abc import Callable

import uvloop  # libuv's event loop: the services spend their time in socket round trips

from . import logs
from .errors import ConfigError, RefundsError, VaultError
from .settings import Settings, get_settings

log = logging.getLogger("service")

# Exit statuses of every service and refundctl command (README "Exit statuses"). systemd's
# RestartPreventExitStatus=2: a configuration error is not fixed by a restart; an outage may be.
OK = 0
FINDINGS = 1  # the command ran and found something: disagreements, refused rows, no such refund
USAGE = 2  # a bad argument or setting
UNAVAILABLE = 3  # a dependency is away: the database, Redis, the gateway
INTERRUPTED = 130  # Ctrl-C, as shells count it


class Usage(RefundsError):
    """A command's arguments do not make sense together (one alone is argparse's to refuse)."""


class Unavailable(RefundsError):
    """A dependency (the gateway, a port to listen on, ...) is away; trying again later may work."""


def failure(exc: BaseException) -> tuple[int, str] | None:
    """The exit status and one line for an expected failure; None for a bug, which keeps its traceback."""
    import asyncpg
    import redis.exceptions

    if isinstance(exc, (ConfigError, VaultError, Usage)):
        return USAGE, str(exc)
    if isinstance(exc, Unavailable):
        return UNAVAILABLE, str(exc)
    if isinstance(exc, RefundsError):
        return FINDINGS, str(exc)
    if isinstance(exc, asyncpg.InvalidAuthorizationSpecificationError):  # wrong user or password
        return USAGE, f"database refused the login (DATABASE_URL): {exc}"
    if isinstance(exc, asyncpg.CheckViolationError):
        # bad input that the command's own checks let through. The primary message names the table
        # and the constraint; str(exc) would add the DETAIL, the whole row (sealed secrets too).
        return USAGE, f"database refused a value: {exc.message or 'a check constraint failed'}"
    if isinstance(exc, asyncpg.ForeignKeyViolationError):
        return USAGE, f"database refused a value: {_missing_reference(exc)}"
    if isinstance(exc, asyncpg.DataError):  # a date or number outside what its column holds
        return USAGE, f"database refused a value: {exc.args[0] if exc.args else type(exc).__name__}"
    if isinstance(exc, OverflowError):  # a date too far off for Python's calendar (year 1 or 9999 and beyond)
        return USAGE, f"a value is out of range: {exc}"
    if isinstance(exc, asyncpg.ClientConfigurationError):  # what only asyncpg checks: a DSN's sslmode, ...
        return USAGE, f"DATABASE_URL is malformed: {exc}"
    if isinstance(exc, asyncpg.UndefinedTableError):
        return UNAVAILABLE, f"database has no schema yet (run refundctl db migrate): {exc}"
    if isinstance(exc, (asyncpg.InvalidCatalogNameError, asyncpg.exceptions.PostgresConnectionError,
                        asyncpg.exceptions.OperatorInterventionError, asyncpg.exceptions.InsufficientResourcesError)):
        return UNAVAILABLE, f"database unavailable: {exc}"
    if isinstance(exc, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)):
        return UNAVAILABLE, f"Redis unavailable: {exc}"
    if isinstance(exc, OSError) and exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL):  # names the address
        return UNAVAILABLE, f"cannot listen: {exc}"
    if isinstance(exc, OSError) and exc.filename is not None:  # a file named in an argument or setting
        return USAGE, f"{exc.filename}: {exc.strerror}"
    if isinstance(exc, OSError):  # refused, reset, unknown host, timed out: asyncpg lets these through as they are
        return UNAVAILABLE, f"{_client_of(exc)} unavailable: {exc.strerror or exc or type(exc).__name__}"
    return None


def _missing_reference(exc) -> str:
    """A foreign key violation as one line, from its table and constraint alone: the DETAIL holds the
    key's values (the caller's input, or a whole row's for some constraints), never echoed. A row naming
    one that does not exist (``payment record --merchant nosuch``) names the column its constraint is
    on, when the constraint has Postgres's own name, ``<table>_<columns>_fkey``."""
    table, constraint, message = exc.table_name, exc.constraint_name, exc.message or ""
    if not (table and constraint) or not message.startswith("insert or update"):
        return message or "a foreign key constraint failed"  # a row still referred to: both tables named
    columns = constraint.removeprefix(f"{table}_").removesuffix("_fkey")
    if constraint == f"{table}_{columns}_fkey" and columns:
        return f'the {columns} given for {table} does not exist (foreign key constraint "{constraint}")'
    return f'a row of {table} refers to one that does not exist (foreign key constraint "{constraint}")'


_CLIENTS = {"asyncpg": "database", "redis": "Redis", "aiohttp": "HTTP peer"}


def _client_of(exc: BaseException) -> str:
    """Which dependency a bare OSError is about: the client library its traceback went through."""
    frame = exc.__traceback__
    while frame is not None:
        package = frame.tb_frame.f_globals.get("__name__", "").partition(".")[0]
        if package in _CLIENTS:
            return _CLIENTS[package]
        frame = frame.tb_next
    return "connection"


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


def run(name: str, app, host: str, port: int, *, metrics_port: int = 0, **runner_options) -> int:
    """Serve ``app`` until SIGTERM/SIGINT, and /metrics alone on ``metrics_port`` (0: not served);
    the exit status for ``main``. Both listen under HTTP_HEADER_TIMEOUT, HTTP_IDLE_TIMEOUT and
    HTTP_MAX_CONNECTIONS (``refunds.serving``)."""
    return guarded(name, lambda: uvloop.run(_serve(name, app, host, port, metrics_port, runner_options)))


def guarded(name: str, body: Callable[[], int | None]) -> int:
    """Run a process's ``body``; an expected failure ends it with ``name: <one line>`` and its status."""
    try:
        return body() or OK
    except KeyboardInterrupt:
        return INTERRUPTED
    except Exception as exc:
        found = failure(exc)
        if found is None:
            raise
        print(f"{name}: {found[1]}", file=sys.stderr)
        return found[0]


async def _serve(name: str, app, host: str, port: int, metrics_port: int, runner_options: dict) -> None:
    from . import serving

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    limits = serving.Limits.from_settings(get_settings())
    async with serving.serving("public", app, host, port, limits, **runner_options), \
            contextlib.AsyncExitStack() as extras:
        if metrics_port:
            await _serve_metrics(extras, name, metrics_port, limits)
        print(f"{name} listening on http://{host}:{port}", flush=True)  # both ports are open now
        await stop.wait()


async def _serve_metrics(extras: contextlib.AsyncExitStack, name: str, port: int, limits) -> None:
    """/metrics alone on its own port (METRICS_HOST, as the workers'); one that cannot be bound is
    logged and the service runs on without it: its requests matter more, the target-down alert tells."""
    from . import serving

    host = get_settings().metrics_host
    limits = dataclasses.replace(limits, max_connections=serving.METRICS_CONNECTIONS)
    try:
        await extras.enter_async_context(
            serving.serving("metrics", serving.metrics_app(), host, port, limits, access_log=None))
    except OSError as exc:
        log.error("%s metrics: cannot listen on %s:%d: %s", name, host, port, exc.strerror or exc)
        return
    log.info("%s metrics on http://%s:%d/metrics", name, host, port)
