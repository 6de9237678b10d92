"""refunds.serving over real sockets: request-head deadline, idle keep-alive, connection cap, metrics app.

Deadlines are short here so that the tests are quick; every wait for the server is generous,
and nothing asserts how fast the server was.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource

import pytest
from aiohttp import web

from refunds import serving
from refunds.serving import Limits

WAIT = 30  # seconds to wait for something the server must do (a close, an answer)


async def _slow(request: web.Request) -> web.Response:
    await asyncio.sleep(float(request.query.get("seconds", "0")))
    return web.Response(text="done")


def _app() -> web.Application:
    app = web.Application()
    app.router.add_get("/", _slow)
    app.router.add_post("/", _slow)
    return app


@contextlib.asynccontextmanager
async def _server(limits: Limits):
    async with serving.serving("test", _app(), "127.0.0.1", 0, limits) as server:
        yield server.sockets[0].getsockname()[1]


async def _closed_by_server(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sent until it closed the connection (fails if it never does)."""
    return await asyncio.wait_for(reader.read(), WAIT)


async def _ask(reader, writer, path: str = "/") -> bytes:
    """One keep-alive request on an open connection; its status line."""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
    await writer.drain()
    status = await asyncio.wait_for(reader.readline(), WAIT)
    while (await asyncio.wait_for(reader.readline(), WAIT)) not in (b"\r\n", b""):
        pass
    await asyncio.wait_for(reader.readexactly(4), WAIT)  # "done"
    return status


async def test_half_a_request_line_is_closed_after_the_header_timeout():
    async with _server(Limits(header_timeout=0.5, idle_timeout=600)) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /hea")
        assert await _closed_by_server(reader) == b""
        writer.close()


async def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout():
    async with _server(Limits(header_timeout=0.5, idle_timeout=600)) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await _closed_by_server(reader) == b""
        writer.close()


@pytest.mark.slow
async def test_a_head_trickled_byte_by_byte_is_closed_all_the_same():
    """The deadline is for the whole head, not between bytes (slowloris sends a byte now and then)."""
    async with _server(Limits(header_timeout=1, idle_timeout=600)) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        closed = asyncio.ensure_future(_closed_by_server(reader))
        for byte in b"GET / HTTP/1.1\r\nX-Slow: " + b"a" * 1000:
            if closed.done():
                break
            writer.write(bytes([byte]))
            await asyncio.sleep(0.05)
        assert await closed == b""
        writer.close()


@pytest.mark.slow
async def test_a_handler_slower_than_the_deadlines_still_answers_and_keep_alive_goes_on():
    async with _server(Limits(header_timeout=0.3, idle_timeout=0.3)) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert (await _ask(reader, writer, "/?seconds=1")).startswith(b"HTTP/1.1 200")
        assert (await _ask(reader, writer, "/?seconds=1")).startswith(b"HTTP/1.1 200")  # same connection
        assert await _closed_by_server(reader) == b""  # then idle: closed
        writer.close()


async def test_an_idle_keep_alive_connection_is_closed_after_the_idle_timeout():
    async with _server(Limits(header_timeout=600, idle_timeout=0.5)) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert (await _ask(reader, writer)).startswith(b"HTTP/1.1 200")
        assert await _closed_by_server(reader) == b""
        writer.close()


@pytest.mark.slow
async def test_a_slow_body_is_the_handlers_to_time_out_not_the_head_deadline():
    """Once the head is in, the handler decides (the intake and the receiver answer 408)."""
    async def reads_body(request: web.Request) -> web.Response:
        try:
            async with asyncio.timeout(0.5):
                await request.read()
        except TimeoutError:
            return web.Response(status=408, text="slow")
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/", reads_body)
    limits = Limits(header_timeout=0.2, idle_timeout=600)
    # lingering_time: aiohttp's read of the unread body after the answer (10 s), which a shutdown waits out
    async with serving.serving("test", app, "127.0.0.1", 0, limits, lingering_time=0.5) as server:
        reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
        writer.write(b"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: 100\r\n\r\n{")
        assert (await asyncio.wait_for(reader.readline(), WAIT)).startswith(b"HTTP/1.1 408")
        writer.close()


async def test_beyond_the_cap_new_connections_get_503_while_established_ones_are_answered():
    async with _server(Limits(header_timeout=600, idle_timeout=600, max_connections=3)) as port:
        established = await asyncio.open_connection("127.0.0.1", port)
        assert (await _ask(*established)).startswith(b"HTTP/1.1 200")
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        for _ in range(3):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            refused = await _closed_by_server(reader)
            assert refused.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 1" in refused, refused
            writer.close()
        assert (await _ask(*established)).startswith(b"HTTP/1.1 200")  # still served
        idle[0][1].close()
        await asyncio.wait_for(_until_accepted(port), WAIT)  # room again once one has gone
        for _, writer in (*idle, established):
            writer.close()


async def _until_accepted(port: int) -> None:
    while True:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        answer = await reader.read()
        writer.close()
        if answer.startswith(b"HTTP/1.1 200"):
            return
        await asyncio.sleep(0.05)


async def test_metrics_app_serves_metrics_only():
    async with serving.serving("metrics", serving.metrics_app(), "127.0.0.1", 0, Limits()) as server:
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), WAIT)
        writer.close()
    assert answer.startswith(b"HTTP/1.1 200") and b"refund_http_connections" in answer


def test_the_connection_cap_stays_under_the_descriptor_limit(monkeypatch):
    limits = {"now": (256, 256)}
    monkeypatch.setattr(resource, "getrlimit", lambda which: limits["now"])
    monkeypatch.setattr(resource, "setrlimit", lambda which, value: (_ for _ in ()).throw(ValueError("no")))
    budget = serving.connection_budget(1024)
    assert 0 < budget < 256 * 3 // 4
    limits["now"] = (1024, 65536)  # a soft limit under the hard one is raised
    raised = []
    monkeypatch.setattr(resource, "setrlimit", lambda which, value: raised.append(value))
    assert serving.connection_budget(1024) == 1024
    assert raised and raised[0][0] >= (1024 + serving.METRICS_CONNECTIONS) * 4 // 3
