"""The dramatiq broker the workers consume from (Redis), with the AsyncIO middleware."""

from __future__ import annotations

import logging
import os

from .metrics import WorkerMetrics  # before anything imports prometheus_client: it sets up multiprocess mode

import dramatiq  # noqa: E402
from dramatiq.brokers.redis import RedisBroker  # noqa: E402
from dramatiq.middleware import AsyncIO  # noqa: E402

from refunds import logs  # noqa: E402
from refunds.settings import get_settings  # noqa: E402

from .resources import WorkerResources  # noqa: E402


class JsonLogs(dramatiq.Middleware):
    """Worker processes log JSON lines too, through the pipe dramatiq already set up to its parent."""

    def after_process_boot(self, broker):
        logs.adopt_handlers("worker")
        if os.environ.get("LOG_LEVEL"):  # else dramatiq's own level (-v for debug)
            logging.getLogger().setLevel(get_settings().log_level.upper())


def setup_broker() -> RedisBroker:
    broker = RedisBroker(url=get_settings().require("redis_url"))
    broker.add_middleware(JsonLogs())
    broker.add_middleware(WorkerMetrics())
    broker.add_middleware(AsyncIO())
    broker.add_middleware(WorkerResources(), before=AsyncIO)
    dramatiq.set_broker(broker)
    return broker
