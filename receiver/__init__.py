"""The notify_url receiver: PagoEfectivo notifications in, payments and refund outcomes applied once.

``python -m receiver`` runs it; ``create_app`` builds the aiohttp application (tests and
embedders run it themselves).
"""

from .app import MAX_BODY, create_app

__all__ = ["MAX_BODY", "create_app"]
