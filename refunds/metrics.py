"""Prometheus metrics (listed in docs/OPERATIONS.md). Names and labels are fixed: dashboards and alerts use them.

Label values are bounded (no refund ids, no amounts). The ``merchant`` label is bounded
per process (``merchant_label``) and can be turned off with REFUNDS_METRICS_MERCHANT_LABEL=0.

Who exports what: the intake (accepted, rejected) and the receiver (notifications,
contradictions, completions) on their own /metrics; the workers (gateway requests, rate-limit waits,
completions, dramatiq_*) from all their processes on METRICS_PORT (``workers.metrics``);
the scheduler the gauges read from Postgres and Redis (``DatabaseGauges``) on
SCHEDULER_METRICS_PORT. Dashboards and alerts sum across them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .settings import get_settings

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
COMPLETION_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 21600, 86400)


# Each process names at most this many merchants in its labels; the rest are "other". It bounds
# the series a process exports (a completion histogram is 19 series per merchant), whatever the
# number of sellers; docs/OPERATIONS.md says what "other" means on a dashboard.
MERCHANT_LABEL_LIMIT = 200
OTHER_MERCHANTS = "other"
_labelled: set[str] = set()
_labelled_lock = threading.Lock()


def merchant_label(merchant_id: str) -> str:
    """The merchant's id as a label value: itself for the first MERCHANT_LABEL_LIMIT merchants this
    process meets, "other" past them, "all" when REFUNDS_METRICS_MERCHANT_LABEL=0."""
    if not get_settings().refunds_metrics_merchant_label:
        return "all"
    if merchant_id in _labelled:
        return merchant_id
    with _labelled_lock:
        if len(_labelled) < MERCHANT_LABEL_LIMIT:
            _labelled.add(merchant_id)
            return merchant_id
    return OTHER_MERCHANTS


refunds_accepted_total = Counter("refunds_accepted_total", "Refund requests accepted by a producer", ["merchant"])
refunds_rejected_total = Counter("refunds_rejected_total", "Refund requests refused at intake", ["reason"])
refunds_completed_total = Counter("refunds_completed_total", "Refunds that reached a final state",
                                  ["status", "merchant"])
refund_completion_seconds = Histogram(
    "refund_completion_seconds", "Time from acceptance to final state", ["merchant"], buckets=COMPLETION_BUCKETS
)
refund_gateway_requests_total = Counter(
    "refund_gateway_requests_total", "Refund requests sent to the gateway, by outcome", ["outcome"]
)
refund_gateway_request_seconds = Histogram(
    "refund_gateway_request_seconds", "Gateway refund request latency", buckets=LATENCY_BUCKETS
)
refund_notifications_total = Counter(
    "refund_notifications_total", "Notifications received", ["event_type", "result"]
)
# A refund outcome from the gateway that contradicts a state of ours (receiver.events, verdict
# "late"): never benign, so it has its own counter, which pages. ``gateway``: succeeded or failed.
refund_outcome_contradictions_total = Counter(
    "refund_outcome_contradictions_total",
    "Refund outcomes from the gateway that contradict our record (not applied), by our state and the gateway's",
    ["merchant", "ours", "gateway"],
)
refund_notification_seconds = Histogram(
    "refund_notification_seconds", "Time to answer a notification", buckets=LATENCY_BUCKETS
)
refund_rate_limit_waits_total = Counter(
    "refund_rate_limit_waits_total", "Refunds deferred by the per-merchant rate limit", ["merchant"]
)
refund_webhook_attempts_total = Counter(
    "refund_webhook_attempts_total", "Webhook delivery attempts, by what followed: delivered, retry (later) or failed"
    " (the retry horizon passed)", ["result"])
refund_webhook_attempt_seconds = Histogram(
    "refund_webhook_attempt_seconds", "Time a webhook endpoint took to answer (or to time out)",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
refund_requeues_total = Counter(
    "refund_requeues_total",
    "Refunds the workers re-queued with a delay, by cause: rate_limit (its slot, a pause, a 429), retry (a fault)",
    ["cause"],
)
REQUEUE_CAUSES = ("rate_limit", "retry")

GATEWAY_OUTCOMES = ("success", "pending", "failure", "rate_limited", "timeout", "error")
COMPLETION_STATUSES = ("succeeded", "failed", "manual_review")


def initialise_worker_series() -> None:
    """Create the worker's bounded label sets at 0, so a ratio such as errors / all exists
    (as 0) before the first error, and alerts and dashboards never see "no data" in a healthy system.
    Completions are per merchant: ``initialise_merchant_series``."""
    for outcome in GATEWAY_OUTCOMES:
        refund_gateway_requests_total.labels(outcome)
    for cause in REQUEUE_CAUSES:
        refund_requeues_total.labels(cause)


def initialise_merchant_series(merchant_ids: Iterable[str]) -> None:
    """Known merchants' completion series at 0 (as many as the label bound takes), so that
    increase() counts a merchant's first completion: a series born at 1 shows no increase."""
    for merchant_id in merchant_ids:
        merchant = merchant_label(merchant_id)
        for status in COMPLETION_STATUSES:
            refunds_completed_total.labels(status, merchant)
        refund_completion_seconds.labels(merchant)


async def initialise_known_merchants(conn, *, contradictions: Iterable[tuple[str, str]] = ()) -> int:
    """``initialise_merchant_series`` for the merchants of the store, the first MERCHANT_LABEL_LIMIT
    by id (the label bound takes no more); ``conn`` is an asyncpg connection or pool. Returns how
    many. Workers and the receiver call it at start; a merchant added later starts at its first
    completion in each process. The receiver passes its ``contradictions`` (our state, the
    gateway's) to start those series too (``initialise_contradiction_series``)."""
    rows = await conn.fetch("SELECT merchant_id FROM merchants ORDER BY merchant_id LIMIT $1", MERCHANT_LABEL_LIMIT)
    merchant_ids = [row["merchant_id"] for row in rows]
    initialise_merchant_series(merchant_ids)
    if contradictions:
        initialise_contradiction_series(merchant_ids, contradictions)
    return len(rows)


_contradiction_labels: set[str] = set()  # merchant labels whose contradiction series exist (bounded as labels are)


def initialise_contradiction_series(merchant_ids: Iterable[str], contradictions: Iterable[tuple[str, str]]) -> None:
    """These merchants' ``refund_outcome_contradictions_total`` at 0, once per label a process: a
    merchant's first contradiction pages only as an increase() of a series that was at 0."""
    pairs = tuple(contradictions)
    for merchant_id in merchant_ids:
        merchant = merchant_label(merchant_id)
        if merchant in _contradiction_labels:
            continue
        for ours, gateway in pairs:
            refund_outcome_contradictions_total.labels(merchant, ours, gateway)
        _contradiction_labels.add(merchant)


def initialise_receiver_series(event_types: Iterable[str]) -> None:
    """The receiver's label sets at 0. A series born at 1 shows no increase() in Prometheus, so
    without this the first invalid signature after a start would not fire the alert."""
    refund_notifications_total.labels("unknown", "invalid_signature")  # the type is unknown before the signature
    for event_type in event_types:
        for result in ("applied", "duplicate"):
            refund_notifications_total.labels(event_type, result)


class DatabaseGauges(Collector):
    """refunds_in_state, the oldest outbox and pending ages and the queue depth, as the scheduler last read them.

    A collector registered by the scheduler alone, not module-level Gauges: those would be
    exported (as zeros) by every process that imports this module, and a dashboard summing
    them could not tell the scheduler's truth from the others' zeros.
    """

    def __init__(self) -> None:
        self.in_state: dict[str, int] = {}
        self.outbox_oldest: float | None = None
        self.pending_oldest: float | None = None
        self.queue: dict[tuple[str, str], int] = {}
        self.last_pass: float | None = None
        self.webhooks: dict[str, int] = {}  # webhook deliveries not yet made, per state
        self.webhook_undelivered_oldest: float | None = None

    def collect(self):
        if self.in_state:
            family = GaugeMetricFamily("refunds_in_state", "Refunds per state (from Postgres)", labels=["state"])
            for state, count in sorted(self.in_state.items()):
                family.add_metric([state], count)
            yield family
        if self.outbox_oldest is not None:
            yield GaugeMetricFamily(
                "refund_outbox_oldest_seconds",
                "Age of the oldest accepted refund not yet handed to the gateway (0 when none)",
                value=self.outbox_oldest,
            )
        if self.pending_oldest is not None:
            yield GaugeMetricFamily(
                "refund_pending_oldest_seconds",
                "Time the oldest pending refund (accepted by the gateway, not settled) has been pending (0 when none)",
                value=self.pending_oldest,
            )
        if self.queue:
            family = GaugeMetricFamily(
                "refund_queue_messages", "Messages in the Redis work queue (ready, delayed, dead_letter)",
                labels=["queue", "kind"],
            )
            for (queue, kind), count in sorted(self.queue.items()):
                family.add_metric([queue, kind], count)
            yield family
        if self.webhooks:
            family = GaugeMetricFamily("refund_webhook_deliveries", "Webhook deliveries not yet made: pending, sending (from Postgres)",
                                       labels=["state"])
            for state, count in sorted(self.webhooks.items()):
                family.add_metric([state], count)
            yield family
        if self.webhook_undelivered_oldest is not None:
            yield GaugeMetricFamily(
                "refund_webhook_undelivered_oldest_seconds",
                "Age of the oldest webhook event some endpoint has not received yet (0 when none)",
                value=self.webhook_undelivered_oldest,
            )
        if self.last_pass is not None:
            yield GaugeMetricFamily(
                "refund_scheduler_last_pass_timestamp_seconds",
                "Unix time of the scheduler's last complete pass (outbox sweep and gauges)",
                value=self.last_pass,
            )


def observe_completion(refund, to_state: str) -> None:
    """Count a refund that just reached its first final state (call after COMMIT).

    A refund settled later out of manual review is not counted again: its completed_at
    stays at the first final state, so it differs from updated_at.
    """
    if to_state not in COMPLETION_STATUSES or refund.completed_at != refund.updated_at:
        return
    merchant = merchant_label(refund.merchant_id)
    refunds_completed_total.labels(to_state, merchant).inc()
    if refund.completed_at and refund.created_at:
        refund_completion_seconds.labels(merchant).observe((refund.completed_at - refund.created_at).total_seconds())
