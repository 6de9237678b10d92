"""Messages a worker process had fetched when it died go back to their queue within seconds
(WORKER_DEAD_AFTER_SECONDS and dramatiq's maintenance), not after dramatiq's default minute."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest

from tests.helpers import ROOT

REDIS_DB = 11  # module_redis_url: a Redis database of our own (flushed around each test)

# A process that fetches five messages with our brokers' options, says so, and holds them unacked.
FETCH_AND_HOLD = """
import sys, time
from refunds.delivery import QUEUE, producer_broker
consumer = producer_broker().consume(QUEUE, prefetch=5, timeout=100)
held = []
for message in consumer:
    if message is not None:
        held.append(message)
    if len(held) == 5:
        print("holding", flush=True)
        time.sleep(3600)
"""


@pytest.mark.slow
def test_messages_of_a_worker_killed_with_sigkill_go_back_to_the_queue_within_seconds(queue, monkeypatch):
    from refunds import delivery
    from refunds.settings import get_settings

    monkeypatch.setenv("WORKER_DEAD_AFTER_SECONDS", "2")
    get_settings.cache_clear()
    delivery.producer_broker.cache_clear()
    try:
        sent = [str(uuid.uuid4()) for _ in range(5)]
        assert all(delivery.deliver(refund_id) for refund_id in sent)
        holder = subprocess.Popen([sys.executable, "-c", FETCH_AND_HOLD], cwd=ROOT, env={**os.environ},
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "holding"
            assert queue.llen("dramatiq:refunds") == 0  # all five fetched: in the holder's ack set
        finally:
            holder.send_signal(signal.SIGKILL)
            holder.wait(10)

        # live consumers, polling as the workers do; their commands run the maintenance that
        # hands a dead process's messages back
        received: list[str] = []
        stop = threading.Event()

        def consume() -> None:
            consumer = delivery.producer_broker().consume(delivery.QUEUE, prefetch=5, timeout=100)
            try:
                while not stop.is_set():
                    message = next(consumer)
                    if message is not None:
                        received.append(message.args[0])
                        consumer.ack(message)
            finally:
                consumer.close()

        threads = [threading.Thread(target=consume) for _ in range(4)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 20  # dramatiq's defaults: 60 s, then about 12 s more
        while len(received) < 5 and time.monotonic() < deadline:
            time.sleep(0.1)
        stop.set()
        for thread in threads:
            thread.join(5)
        assert sorted(received) == sorted(sent)
    finally:
        get_settings.cache_clear()
        delivery.producer_broker.cache_clear()
