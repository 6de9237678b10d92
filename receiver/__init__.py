"""The notify_url receiver: PagoEfectivo notifications in, payments and refund outcomes applied once.

``python -m receiver`` runs it; ``create_app`` builds the aiohttp application (tests and
embedders run it themselves). The application is imported on first use, so that
``refundctl`` reading the notifications table (``receiver.inbox``) does not load aiohttp.
"""

from __future__ import annotations

__all__ = ["MAX_BODY", "create_app"]


def __getattr__(name: str):
    if name in __all__:
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
