"""The dramatiq broker the workers consume from (Redis), with the AsyncIO middleware."""

from __future__ import annotations

import logging

from .metrics import WorkerMetrics  # before anything imports prometheus_client: it sets up multiprocess mode

import dramatiq  # noqa: E402
from dramatiq.brokers.redis import RedisBroker  # noqa: E402
from dramatiq.middleware import AsyncIO  # noqa: E402

from refunds import logs, service  # noqa: E402
from refunds.delivery import broker_options  # noqa: E402
from refunds.settings import get_settings  # noqa: E402

from .resources import UvloopPolicy, WorkerResources  # noqa: E402


UNHANDLED = "Failed to process message %s with unhandled exception."  # dramatiq's line for an actor that raised


class OutagesInOneLine(logging.Filter):
    """A message that failed because Postgres or Redis was away is retried by dramatiq, and is
    an outage, not a bug: its line says what was away (``refunds.service.failure``) instead of
    carrying a traceback. Anything else keeps its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if record.msg == UNHANDLED and error is not None:
            known = service.failure(error)
            if known is not None and known[0] == service.UNAVAILABLE:
                record.msg, record.args = "Failed to process message %s: %s; it is retried", (*record.args, known[1])
                record.exc_info = record.exc_text = None
        return True


class JsonLogs(dramatiq.Middleware):
    """Worker processes log JSON lines too, through the pipe dramatiq already set up to its parent,
    outages in one line."""

    def after_process_boot(self, broker):
        logs.adopt_handlers("worker")
        for handler in logging.getLogger().handlers:
            handler.addFilter(OutagesInOneLine())
        if "log_level" in get_settings().model_fields_set and get_settings().log_level:  # else dramatiq's own (-v)
            logging.getLogger().setLevel(get_settings().log_level.upper())


# How long an idle consumer sleeps between polls of Redis, at most (dramatiq's default is
# its worker timeout, 1 s). A refund released from the delay queue at its rate-limit slot,
# or newly handed over, waits for the next poll: a second of that is a second of the
# merchant's allowance lost, and of its latency. Each poll is one cheap script call.
POLL_MS = 100


class PromptRedisBroker(RedisBroker):
    """dramatiq's Redis broker, with consumers that never sleep longer than ``POLL_MS``."""

    def consume(self, queue_name, prefetch=1, timeout=POLL_MS):
        return super().consume(queue_name, prefetch, min(timeout, POLL_MS))


def setup_broker() -> RedisBroker:
    broker = PromptRedisBroker(**broker_options())
    broker.add_middleware(JsonLogs())
    broker.add_middleware(WorkerMetrics())
    broker.add_middleware(UvloopPolicy())
    broker.add_middleware(AsyncIO())
    broker.add_middleware(WorkerResources())
    dramatiq.set_broker(broker)
    return broker
