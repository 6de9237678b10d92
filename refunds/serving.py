"""Listening sockets that idle, slow or too many clients cannot exhaust (the intake, the receiver).

aiohttp by itself waits as long as a client likes for a request head (a half-sent request
line held its socket 601 s) and accepts connections until the process runs out of file
descriptors, after which every accept fails. Here each connection owes a complete request
head within ``header_timeout`` of opening (or of the head's first byte), an idle keep-alive
connection is closed after ``idle_timeout``, and beyond ``max_connections`` a new connection
is answered 503 and closed. Request bodies have their handlers' own deadlines (408).
docs/DEPLOYMENT.md explains the settings and the descriptor limits around them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, generate_latest

log = logging.getLogger("serving")

METRICS_CONNECTIONS = 8  # Prometheus and a curl or two; its own cap, so a full public port never hides the metrics
REFUSING_SECONDS = 1.0  # a refused connection's request is read and dropped this long (an eighth of the cap at most)
_BUSY_BODY = b'{"error": {"code": "unavailable", "message": "too many connections; retry later"}}\n'
BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
        b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY))

connections_open = Gauge("refund_http_connections", "HTTP connections open now", ["listener"])
connections_closed = Counter(
    "refund_http_connections_closed_total",
    "HTTP connections the server ended: over HTTP_MAX_CONNECTIONS (503) or no request head in time",
    ["listener", "reason"],
)


@dataclass(frozen=True)
class Limits:
    header_timeout: float = 10.0
    idle_timeout: float = 75.0
    max_connections: int = 1024

    @classmethod
    def from_settings(cls, settings) -> Limits:
        """The settings' limits, with no more connections than this process's descriptors can hold."""
        return cls(settings.http_header_timeout, settings.http_idle_timeout,
                   connection_budget(settings.http_max_connections))


def connection_budget(wanted: int) -> int:
    """``wanted``, or fewer when the descriptor limit cannot hold them with a quarter to spare (Postgres,
    Redis, journal files, the metrics port, refused connections); the soft limit is raised first, up to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = (wanted + METRICS_CONNECTIONS) * 4 // 3
    if soft != resource.RLIM_INFINITY and soft < need:
        raised = need if hard == resource.RLIM_INFINITY else min(need, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
    if soft == resource.RLIM_INFINITY or soft >= need:
        return wanted
    budget = max(1, soft * 3 // 4 - METRICS_CONNECTIONS)
    log.warning("only %d file descriptors (RLIMIT_NOFILE, hard %d): at most %d connections, not %d "
                "(HTTP_MAX_CONNECTIONS); raise LimitNOFILE or the runtime's nofile limit", soft, hard, budget, wanted)
    return budget


class Listener:
    """One port's connections: counted, capped, each under its deadlines; the protocol factory for ``create_server``."""

    def __init__(self, name: str, runner: web.AppRunner, limits: Limits):
        self.name, self.runner, self.limits = name, runner, limits
        self.open: dict[asyncio.BaseTransport, _Connection] = {}
        self.refusing: set[_Connection] = set()
        self.warned = -60.0  # when the cap was last logged (once a minute at most)
        self.gauge = connections_open.labels(name)

    def __call__(self) -> asyncio.Protocol:
        return _Connection(self)

    @web.middleware
    async def track(self, request: web.Request, handler) -> web.StreamResponse:
        """Mark the connection busy while a handler runs: its deadlines are for waiting on a request only."""
        connection = self.open.get(request.transport)
        if connection is None:
            return await handler(request)
        connection.started()
        try:
            return await handler(request)
        finally:
            connection.finished()


class _Connection(asyncio.Protocol):
    """aiohttp's protocol for one connection, behind the cap and the deadlines."""

    def __init__(self, listener: Listener):
        self.listener = listener
        self.inner = None  # aiohttp's RequestHandler; None when refused
        self.transport: asyncio.Transport | None = None
        self.busy = 0      # requests in a handler now
        self.head = False  # a request head is owed: the connection is new, or one has begun to arrive
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        listener = self.listener
        self.transport = transport
        if len(listener.open) >= listener.limits.max_connections:
            self._refuse(transport)
            return
        listener.open[transport] = self
        listener.gauge.inc()
        self.inner = listener.runner.server()
        self.inner.connection_made(transport)
        self.head = True
        self._deadline(listener.limits.header_timeout)

    def _refuse(self, transport) -> None:
        """503, then what the client sent is read and dropped for a moment before the close:
        closing on unread bytes would reset the connection, and the client might never read the 503."""
        listener = self.listener
        connections_closed.labels(listener.name, "max_connections").inc()
        if time.monotonic() - listener.warned >= 60:
            listener.warned = time.monotonic()
            log.warning("%s port: %d connections open (HTTP_MAX_CONNECTIONS): new ones are answered 503",
                        listener.name, len(listener.open))
        transport.write(BUSY)
        if len(listener.refusing) >= listener.limits.max_connections // 8:  # no descriptors for manners
            transport.close()
            return
        transport.write_eof()
        listener.refusing.add(self)
        self._deadline(REFUSING_SECONDS)

    def data_received(self, data: bytes) -> None:
        if self.inner is None:
            return  # refused: dropped
        if not self.busy and not self.head:
            self.head = True
            self._deadline(self.listener.limits.header_timeout)
        self.inner.data_received(data)

    def eof_received(self):
        return self.inner.eof_received() if self.inner is not None else None

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.inner is None:
            self.listener.refusing.discard(self)
            return
        self.listener.open.pop(self.transport, None)
        self.listener.gauge.dec()
        self.inner.connection_lost(exc)

    def started(self) -> None:
        self.busy += 1
        self.head = False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def finished(self) -> None:
        self.busy -= 1
        if not self.busy and self.transport is not None and not self.transport.is_closing():
            self._deadline(self.listener.limits.idle_timeout)

    def _deadline(self, seconds: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = asyncio.get_running_loop().call_later(seconds, self._expire)

    def _expire(self) -> None:
        self.timer = None
        if self.busy or self.transport is None or self.transport.is_closing():
            return
        if self.head:
            connections_closed.labels(self.listener.name, "header_timeout").inc()
        self.transport.close()  # aiohttp's connection_lost follows


@contextlib.asynccontextmanager
async def serving(name: str, app: web.Application, host: str, port: int, limits: Limits,
                  **runner_options) -> AsyncIterator[asyncio.Server]:
    """``app`` listening on host:port under ``limits`` until the block ends, then a graceful stop
    (in-flight requests finish, the app's cleanup hooks run)."""
    runner = web.AppRunner(app, **runner_options)
    listener = Listener(name, runner, limits)
    app.middlewares.insert(0, listener.track)
    await runner.setup()
    try:
        server = await asyncio.get_running_loop().create_server(listener, host, port)
    except BaseException:
        await runner.cleanup()
        raise
    try:
        yield server
    finally:
        server.close()  # no new connections; then aiohttp's own shutdown of the open ones
        await runner.cleanup()
        await server.wait_closed()


def metrics_app() -> web.Application:
    """/metrics alone: served on a port of its own, never on a public one (merchant ids are label values)."""
    app = web.Application()
    app.router.add_get("/metrics", metrics_view)
    return app


async def metrics_view(request: web.Request) -> web.Response:
    return web.Response(body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})
