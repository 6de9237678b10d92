"""A service started as its own process (``python -m ...``), talked to over raw sockets."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys

from tests.helpers import ROOT

WAIT = 60  # seconds to wait for something the server must do: generous, never a speed check


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.asynccontextmanager
async def process(module: str, env: dict, *args: str, **options):
    """``python -m module args`` once it printed its "listening" line; SIGTERM (exit 0) at the end."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", module, *args, cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL, **options)
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), WAIT)
        assert b" listening on " in line, line
        yield proc
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), WAIT) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def once(port: int, path: str) -> bytes:
    """GET ``path`` on a connection of its own; the whole answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n".encode())
    try:
        return await asyncio.wait_for(reader.read(), WAIT)
    finally:
        writer.close()


async def half_sent_is_closed(port: int) -> bytes:
    """Half a request line, then nothing: what the server sent before it closed (fails if it never does)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /hea")
    try:
        return await asyncio.wait_for(reader.read(), WAIT)
    finally:
        writer.close()
