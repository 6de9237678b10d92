"""The one private dramatiq contract the project relies on, checked against the installed dramatiq.

The intake writes many messages in one pipelined Redis write by running dramatiq's own enqueue
script (``refunds.delivery.enqueue_script_call``). A dramatiq release that changes the script's
arguments must fail here, loudly, before it can make workers misread the queue.
"""

from __future__ import annotations

from importlib.metadata import version

from dramatiq import Message
from dramatiq.brokers.redis import RedisBroker
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from refunds.delivery import QUEUE, SEND_REFUND, enqueue_script_call, send_refund_message


class _Recorder:
    """Stands in for the registered script: records the call instead of running it."""

    def __init__(self, script):
        self.script = script.script
        self.calls: list[tuple[list, list]] = []

    def __call__(self, keys=None, args=None, client=None):
        self.calls.append((list(keys), list(args)))


def test_the_installed_dramatiq_is_one_the_pin_allows():
    from importlib.metadata import requires

    pins = [Requirement(line) for line in requires("pagoefectivo-refunds") if line.startswith("dramatiq")]
    assert pins and version("dramatiq") in SpecifierSet(str(pins[0].specifier))


def test_enqueue_script_call_is_what_redis_broker_enqueue_passes(redis_url):
    broker = RedisBroker(url=redis_url, middleware=[], maintenance_chance=0)
    recorder = _Recorder(broker.scripts["dispatch"])
    broker.scripts["dispatch"] = recorder
    try:
        sent = broker.enqueue(send_refund_message("3f0e0bd4-55a2-4e43-9f0a-4b8cc3b1a6f1", slot_ms=1234))
    finally:
        broker.close()

    assert len(recorder.calls) == 1, "RedisBroker.enqueue no longer runs the dispatch script once"
    keys, args = recorder.calls[0]
    ours_keys, ours = enqueue_script_call(broker, sent, timestamp_ms=args[1])
    assert keys == ours_keys
    assert len(args) == len(ours), f"dramatiq passes {len(args)} arguments, we pass {len(ours)}"
    # position 7 is dramatiq's max unpack size, read only by maintenance (off here and in ours)
    assert args[:7] + args[8:] == ours[:7] + ours[8:]
    assert args[6] == 0 and args[0] == "enqueue"
    assert Message.decode(args[-1]).actor_name == SEND_REFUND and Message.decode(args[-1]).queue_name == QUEUE


def test_a_far_slot_is_written_as_enqueue_with_a_delay_writes_it(redis_url):
    """A refund booked ahead goes to dramatiq's delay queue with an eta, as enqueue(delay=) puts it."""
    from refunds.delivery import _messages, _Slot

    broker = RedisBroker(url=redis_url, middleware=[], maintenance_chance=0)
    recorder = _Recorder(broker.scripts["dispatch"])
    broker.scripts["dispatch"] = recorder
    refund_id = "3f0e0bd4-55a2-4e43-9f0a-4b8cc3b1a6f1"
    try:
        by_dramatiq = broker.enqueue(send_refund_message(refund_id), delay=5_000)
    finally:
        broker.close()
    [ours] = _messages([refund_id], [_Slot(slot_ms=by_dramatiq.options["eta"], booked_at_ms=0)])
    assert recorder.calls[0][1][2] == by_dramatiq.queue_name == ours.queue_name
    assert set(by_dramatiq.options) - {"redis_message_id"} == set(ours.options) == {"eta"}
    assert ours.options["eta"] == by_dramatiq.options["eta"]
