"""The receiver starts its series at 0 (real Postgres): the completions and contradictions of the
merchants in the store, bounded as the workers bound theirs (refunds.metrics.initialise_known_merchants),
and its notification results; so increase() counts the first of each after a start."""

from __future__ import annotations

import logging
import os
import uuid

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from pagoefectivo.protocol import SIGNATURE_HEADER, dumps, notification_signature
from receiver import create_app, events
from refunds import metrics
from tests.served import free_port, once, process


@pytest.fixture
def fresh_labels(monkeypatch):
    """A process that has labelled no merchant yet, with room for two."""
    monkeypatch.setattr(metrics, "_labelled", set())
    monkeypatch.setattr(metrics, "_contradiction_labels", set())
    monkeypatch.setattr(metrics, "MERCHANT_LABEL_LIMIT", 2)


def completed(status: str, merchant: str) -> float | None:
    return REGISTRY.get_sample_value("refunds_completed_total", {"status": status, "merchant": merchant})


def timed(merchant: str) -> float | None:
    return REGISTRY.get_sample_value("refund_completion_seconds_count", {"merchant": merchant})


def contradictions(merchant: str) -> list[float | None]:
    return [REGISTRY.get_sample_value("refund_outcome_contradictions_total",
                                      {"merchant": merchant, "ours": ours, "gateway": gateway})
            for ours, gateway in events.CONTRADICTIONS]


async def test_the_first_merchants_of_the_store_start_at_zero_within_the_bound(database_url, vault, make_merchant,
                                                                              fresh_labels):
    prefix = f"rx{uuid.uuid4().hex[:8]}"
    # made out of order: the bound takes the first by id, as the workers do
    for suffix in ("c", "a", "b"):
        await make_merchant(f"{prefix}-{suffix}")
    async with TestClient(TestServer(create_app(database_url=database_url, vault=vault))) as client:
        assert (await client.get("/healthz")).status == 200
        for merchant in (f"{prefix}-a", f"{prefix}-b"):
            assert [completed(status, merchant) for status in metrics.COMPLETION_STATUSES] == [0, 0, 0], merchant
            assert timed(merchant) == 0, merchant
            assert contradictions(merchant) == [0] * len(events.CONTRADICTIONS), merchant
        assert completed("succeeded", f"{prefix}-c") is None and timed(f"{prefix}-c") is None
        assert contradictions(f"{prefix}-c") == [None] * len(events.CONTRADICTIONS)
        assert metrics.merchant_label(f"{prefix}-c") == metrics.OTHER_MERCHANTS  # the bound is spent


async def test_a_merchant_added_after_the_start_has_its_contradictions_at_zero_from_its_first_notification(
        database_url, vault, make_merchant, fresh_labels):
    merchant = f"rx{uuid.uuid4().hex[:8]}"
    async with TestClient(TestServer(create_app(database_url=database_url, vault=vault))) as client:
        keys = await make_merchant(merchant)
        assert contradictions(merchant) == [None] * len(events.CONTRADICTIONS)
        body = dumps({"eventType": "cip.paid", "operationNumber": "op-1",
                      "data": {"cip": "1", "currency": "PEN", "amount": 10, "merchantId": merchant}})
        response = await client.post(f"/pagoefectivo/notifications/{merchant}", data=body, headers={
            "Content-Type": "application/json", SIGNATURE_HEADER: notification_signature(body, keys.secret_key)})
        assert response.status == 200
        assert contradictions(merchant) == [0] * len(events.CONTRADICTIONS)


async def test_a_receiver_whose_postgres_is_away_at_start_serves_without_them(vault, fresh_labels, caplog):
    away = f"postgresql://refunds:refunds@127.0.0.1:{free_port()}/refunds"
    with caplog.at_level(logging.WARNING, logger="receiver"):
        async with TestClient(TestServer(create_app(database_url=away, vault=vault))) as client:
            assert (await client.get("/healthz")).status == 200
    assert any("merchant metric series not initialised" in r.getMessage() for r in caplog.records)
    assert metrics._labelled == set()


@pytest.mark.slow
async def test_the_process_exports_them_at_zero_from_its_start(database_url, master_key, make_merchant, tmp_path):
    merchant = f"rx{uuid.uuid4().hex[:8]}"
    await make_merchant(merchant)
    port, metrics_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RECEIVER_", "REFUNDS_", "HTTP_"))}
    env.update(DATABASE_URL=database_url, REFUNDS_MASTER_KEY=master_key, RECEIVER_PORT=str(port),
               RECEIVER_HOST="127.0.0.1", RECEIVER_METRICS_PORT=str(metrics_port), METRICS_HOST="127.0.0.1",
               RECEIVER_JOURNAL_DIR=str(tmp_path / "journal"))
    async with process("receiver", env):
        answer = (await once(metrics_port, "/metrics")).decode()
    samples = {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
               for family in text_string_to_metric_families(answer.split("\r\n\r\n", 1)[1])
               for sample in family.samples}

    def value(name: str, **labels: str) -> float | None:
        return samples.get((name, tuple(sorted(labels.items()))))

    for status in metrics.COMPLETION_STATUSES:
        assert value("refunds_completed_total", status=status, merchant=merchant) == 0, status
    assert value("refund_completion_seconds_count", merchant=merchant) == 0
    for ours, gateway in events.CONTRADICTIONS:
        assert value("refund_outcome_contradictions_total", merchant=merchant, ours=ours, gateway=gateway) == 0
    assert value("refund_notifications_total", event_type="unknown", result="invalid_signature") == 0
    for event_type in ("cip.paid", "refund.succeeded", "refund.failed"):
        assert value("refund_notifications_total", event_type=event_type, result="applied") == 0, event_type
