"""The dramatiq broker the workers consume from (Redis), with the AsyncIO middleware."""

from __future__ import annotations

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import AsyncIO

from refunds.settings import get_settings

from .resources import WorkerResources


def setup_broker() -> RedisBroker:
    broker = RedisBroker(url=get_settings().require("redis_url"))
    broker.add_middleware(AsyncIO())
    broker.add_middleware(WorkerResources(), before=AsyncIO)
    dramatiq.set_broker(broker)
    return broker
