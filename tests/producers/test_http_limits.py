"""``python -m producers.http`` against idle, half-sent and too many connections, and where /metrics is.

Seen before (issue 16): sockets holding half a request were kept for good, and 260 of them under
a 256 descriptor limit made the intake reset every legitimate request.
"""

from __future__ import annotations

import asyncio
import os
import resource

import pytest

from tests.served import WAIT, free_port, half_sent_is_closed, once, process

SETTINGS = ("DATABASE_URL", "REDIS_URL", "INTAKE_PORT", "INTAKE_HOST", "INTAKE_METRICS_PORT", "METRICS_HOST",
            "HTTP_HEADER_TIMEOUT", "HTTP_IDLE_TIMEOUT", "HTTP_MAX_CONNECTIONS")


def _env(**values) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    env.update(values)
    return env


def _descriptors(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    return apply


async def _ask(reader, writer, path: str) -> bytes:
    """One request on an established keep-alive connection; its status line."""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
    status = await asyncio.wait_for(reader.readline(), WAIT)
    length = 0
    while (line := await asyncio.wait_for(reader.readline(), WAIT)) not in (b"\r\n", b""):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    await asyncio.wait_for(reader.readexactly(length), WAIT)
    return status


async def _end(reader) -> bytes:
    """What the server sent before it closed; b"reset" when it refused too many at once to read
    their requests first (closing on unread bytes resets a connection)."""
    try:
        return await asyncio.wait_for(reader.read(), WAIT)
    except ConnectionResetError:
        return b"reset"


@pytest.mark.slow
async def test_half_sent_requests_neither_starve_the_intake_nor_stay(database_url, redis_url):
    """260 connections holding half a request, under a 256 descriptor limit: those beyond the
    cap are answered 503 at once, the rest are closed at the header timeout, and a client
    already connected is answered throughout."""
    port, metrics_port = free_port(), free_port()
    env = _env(DATABASE_URL=database_url, REDIS_URL=redis_url, INTAKE_PORT=str(port),
               INTAKE_HOST="127.0.0.1", INTAKE_METRICS_PORT=str(metrics_port), METRICS_HOST="127.0.0.1",
               HTTP_HEADER_TIMEOUT="5")
    async with process("producers.http", env, preexec_fn=_descriptors(256)):
        client = await asyncio.open_connection("127.0.0.1", port)
        assert (await _ask(*client, "/readyz")).startswith(b"HTTP/1.1 200")
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(260)]
        for _, writer in held:
            writer.write(b"GET /readyz HTTP/1.1\r\nHost: te")
        assert (await _ask(*client, "/readyz")).startswith(b"HTTP/1.1 200")  # Postgres and Redis still reachable
        ends = await asyncio.gather(*(_end(reader) for reader, _ in held))
        refused = [end for end in ends if end.startswith(b"HTTP/1.1 503 ")]
        assert refused and all(end in (b"", b"reset", refused[0]) for end in ends), {end[:40] for end in ends}
        assert ends.count(b"") > 0  # the accepted ones: closed at the header timeout, unanswered
        for _, writer in held:
            writer.close()
        assert (await _ask(*client, "/healthz")).startswith(b"HTTP/1.1 200")
        client[1].close()
        assert (await once(port, "/healthz")).startswith(b"HTTP/1.1 200")


@pytest.mark.slow
async def test_metrics_are_on_their_own_port_only(database_url, redis_url):
    port, metrics_port = free_port(), free_port()
    env = _env(DATABASE_URL=database_url, REDIS_URL=redis_url, INTAKE_PORT=str(port),
               INTAKE_HOST="127.0.0.1", INTAKE_METRICS_PORT=str(metrics_port), METRICS_HOST="127.0.0.1",
               HTTP_HEADER_TIMEOUT="1")
    async with process("producers.http", env):
        public = await once(port, "/metrics")
        assert public.startswith(b"HTTP/1.1 404") and b"refunds_accepted_total" not in public
        scraped = await once(metrics_port, "/metrics")
        assert scraped.startswith(b"HTTP/1.1 200") and b"refunds_accepted_total" in scraped
        assert (await once(metrics_port, "/readyz")).startswith(b"HTTP/1.1 404")  # nothing else there
        assert await half_sent_is_closed(port) == b""
        assert await half_sent_is_closed(metrics_port) == b""
