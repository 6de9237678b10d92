"""``python -m receiver`` against half-sent requests and slow bodies, and where its /metrics is."""

from __future__ import annotations

import asyncio
import os

from aiohttp.test_utils import TestServer
import pytest

from receiver import app as receiver_app
from refunds.merchants import NOTIFY_PATH
from tests.served import WAIT, free_port, half_sent_is_closed, once, process

SETTINGS = ("DATABASE_URL", "REFUNDS_MASTER_KEY", "REFUNDS_MASTER_KEY_FILE", "RECEIVER_PORT", "RECEIVER_HOST",
            "RECEIVER_METRICS_PORT", "METRICS_HOST", "HTTP_HEADER_TIMEOUT", "HTTP_IDLE_TIMEOUT", "HTTP_MAX_CONNECTIONS")


@pytest.mark.slow
async def test_half_sent_requests_are_closed_and_metrics_are_on_their_own_port_only(database_url, master_key,
                                                                                   tmp_path):
    port, metrics_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    env.update(DATABASE_URL=database_url, REFUNDS_MASTER_KEY=master_key, RECEIVER_PORT=str(port),
               RECEIVER_HOST="127.0.0.1", RECEIVER_METRICS_PORT=str(metrics_port), METRICS_HOST="127.0.0.1",
               RECEIVER_JOURNAL_DIR=str(tmp_path / "journal"), HTTP_HEADER_TIMEOUT="1")
    async with process("receiver", env):
        assert await half_sent_is_closed(port) == b""
        public = await once(port, "/metrics")
        assert public.startswith(b"HTTP/1.1 404") and b"refund_notifications_total" not in public
        scraped = await once(metrics_port, "/metrics")
        assert scraped.startswith(b"HTTP/1.1 200") and b"refund_notifications_total" in scraped
        assert (await once(port, "/healthz")).startswith(b"HTTP/1.1 200")


async def test_a_body_that_never_finishes_is_408(database_url, vault, make_merchant, monkeypatch):
    monkeypatch.setattr(receiver_app, "BODY_TIMEOUT", 0.3)
    await make_merchant("m1")
    server = TestServer(receiver_app.create_app(database_url=database_url, vault=vault))
    await server.start_server()
    try:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        writer.write((f"POST {NOTIFY_PATH.format(merchant_id='m1')} HTTP/1.1\r\nHost: receiver\r\n"
                      "Content-Type: application/json\r\nContent-Length: 200\r\n\r\n{\"data\": ").encode())
        status_line = await asyncio.wait_for(reader.readline(), WAIT)
        writer.close()
    finally:
        await server.close()
    assert status_line.startswith(b"HTTP/1.1 408"), status_line
