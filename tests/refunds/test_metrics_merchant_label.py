"""The merchant label is bounded per process, and completions carry it (refunds.metrics)."""

import uuid
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest
from prometheus_client import REGISTRY

from refunds import metrics
from refunds.db import create_pool


@pytest.fixture
def fresh_labels(monkeypatch):
    monkeypatch.setattr(metrics, "_labelled", set())
    monkeypatch.setattr(metrics, "MERCHANT_LABEL_LIMIT", 3)


def test_past_the_bound_merchants_are_other_and_the_first_keep_their_ids(fresh_labels):
    assert [metrics.merchant_label(f"s-{i}") for i in range(5)] == ["s-0", "s-1", "s-2", "other", "other"]
    assert metrics.merchant_label("s-1") == "s-1"  # a labelled merchant stays labelled


def test_a_completion_is_counted_and_timed_under_its_merchant(fresh_labels):
    now = datetime.now(timezone.utc)
    refund = SimpleNamespace(merchant_id="seller-9", created_at=now - timedelta(seconds=3), completed_at=now,
                             updated_at=now)
    before = REGISTRY.get_sample_value("refunds_completed_total", {"status": "failed", "merchant": "seller-9"}) or 0
    timed = REGISTRY.get_sample_value("refund_completion_seconds_count", {"merchant": "seller-9"}) or 0
    metrics.observe_completion(refund, "failed")
    assert REGISTRY.get_sample_value("refunds_completed_total", {"status": "failed", "merchant": "seller-9"}) == before + 1
    assert REGISTRY.get_sample_value("refund_completion_seconds_count", {"merchant": "seller-9"}) == timed + 1


def test_known_merchants_start_at_zero_within_the_bound(fresh_labels):
    metrics.initialise_merchant_series(["k-1", "k-2", "k-3", "k-4"])
    for status in metrics.COMPLETION_STATUSES:
        assert REGISTRY.get_sample_value("refunds_completed_total", {"status": status, "merchant": "k-3"}) == 0
    assert REGISTRY.get_sample_value("refund_completion_seconds_count", {"merchant": "k-1"}) == 0
    assert REGISTRY.get_sample_value("refunds_completed_total", {"status": "failed", "merchant": "k-4"}) is None


async def test_the_store_s_first_merchants_by_id_start_at_zero_from_a_pool(database_url, make_merchant, fresh_labels):
    """What a worker process does at boot with its pool (the receiver: tests/receiver/test_receiver_metrics.py)."""
    prefix = f"kp{uuid.uuid4().hex[:8]}"
    for suffix in ("d", "b", "a", "c"):
        await make_merchant(f"{prefix}-{suffix}")
    pool = await create_pool(database_url, min_size=1, max_size=1)
    try:
        assert await metrics.initialise_known_merchants(pool) == 3  # the bound (3 here) by id
    finally:
        await pool.close()
    for suffix in ("a", "b", "c"):
        assert REGISTRY.get_sample_value("refunds_completed_total",
                                         {"status": "succeeded", "merchant": f"{prefix}-{suffix}"}) == 0
    assert REGISTRY.get_sample_value("refund_completion_seconds_count", {"merchant": f"{prefix}-d"}) is None
