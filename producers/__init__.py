"""Producers: every door through which a refund request enters (Python, HTTP, CLI, CSV)."""

from .enqueue import EnqueueResult, RefundRequest, enqueue_refund

__all__ = ["EnqueueResult", "RefundRequest", "enqueue_refund"]
