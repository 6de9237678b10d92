"""A worker's message that failed because Postgres or Redis was away is logged in one line
(dramatiq retries it); a bug keeps its traceback."""

from __future__ import annotations

import io
import json
import logging
import socket

import asyncpg
import pytest
import redis

from refunds import logs
from workers.broker import UNHANDLED, OutagesInOneLine


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def logged(raise_it) -> dict:
    """What dramatiq's worker thread logs for an actor that raised, as the worker's handlers write it."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    handler.addFilter(OutagesInOneLine())
    logger = logging.getLogger("dramatiq.worker._WorkerThread")
    logger.addHandler(handler)
    try:
        try:
            raise_it()
        except Exception:
            logger.error(UNHANDLED, "send_refunds([...])", exc_info=True)
    finally:
        logger.removeHandler(handler)
    [line] = stream.getvalue().splitlines()
    return json.loads(line)


def test_postgres_away_is_one_line():
    import asyncio

    port = closed_port()
    line = logged(lambda: asyncio.run(asyncpg.connect(f"postgresql://refunds@127.0.0.1:{port}/refunds", timeout=2)))
    assert line["msg"].startswith("Failed to process message send_refunds([...]): database unavailable")
    assert line["msg"].endswith("; it is retried") and "traceback" not in line


@pytest.mark.slow
def test_redis_away_is_one_line():
    port = closed_port()
    line = logged(lambda: redis.Redis(port=port, socket_connect_timeout=1).ping())
    assert "Redis unavailable" in line["msg"] and "traceback" not in line


def test_a_bug_keeps_its_traceback():
    line = logged(lambda: {}["missing"])
    assert line["msg"] == "Failed to process message send_refunds([...]) with unhandled exception."
    assert "KeyError" in line["traceback"]


def test_other_lines_pass_untouched():
    record = logging.LogRecord("dramatiq.worker", logging.WARNING, __file__, 1, "Consumer %s", ("x",), None)
    assert OutagesInOneLine().filter(record) and record.getMessage() == "Consumer x"
