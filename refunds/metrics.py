"""Prometheus metrics of CONTRACT §5. Names and labels are fixed: dashboards and alerts use them.

Label values are bounded (no refund ids, no amounts). The ``merchant`` label can be
turned off with REFUNDS_METRICS_MERCHANT_LABEL=0 for marketplaces with very many sellers.
"""

from __future__ import annotations

import os

from prometheus_client import Counter, Gauge, Histogram

MERCHANT_LABEL = os.environ.get("REFUNDS_METRICS_MERCHANT_LABEL", "1").lower() not in ("0", "false", "no", "off")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
COMPLETION_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 21600, 86400)


def merchant_label(merchant_id: str) -> str:
    return merchant_id if MERCHANT_LABEL else "all"


refunds_accepted_total = Counter("refunds_accepted_total", "Refund requests accepted by a producer", ["merchant"])
refunds_rejected_total = Counter("refunds_rejected_total", "Refund requests refused at intake", ["reason"])
refunds_completed_total = Counter("refunds_completed_total", "Refunds that reached a final state", ["status"])
refund_completion_seconds = Histogram(
    "refund_completion_seconds", "Time from acceptance to final state", buckets=COMPLETION_BUCKETS
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
refund_notification_seconds = Histogram(
    "refund_notification_seconds", "Time to answer a notification", buckets=LATENCY_BUCKETS
)
refund_rate_limit_waits_total = Counter(
    "refund_rate_limit_waits_total", "Refunds deferred by the per-merchant rate limit", ["merchant"]
)
refunds_in_state = Gauge("refunds_in_state", "Refunds per state", ["state"], multiprocess_mode="max")
refund_outbox_oldest_seconds = Gauge(
    "refund_outbox_oldest_seconds", "Age of the oldest accepted refund not yet handed to the gateway",
    multiprocess_mode="max",
)


def observe_completion(refund, to_state: str) -> None:
    """Count a refund that just reached its first final state (call after COMMIT).

    A refund settled later out of manual review is not counted again: its completed_at
    stays at the first final state, so it differs from updated_at.
    """
    status = {"succeeded": "succeeded", "failed": "failed", "manual_review": "manual_review"}.get(to_state)
    if status is None or refund.completed_at != refund.updated_at:
        return
    refunds_completed_total.labels(status).inc()
    if refund.completed_at and refund.created_at:
        refund_completion_seconds.observe((refund.completed_at - refund.created_at).total_seconds())
