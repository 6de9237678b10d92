"""Every gateway answer that is not a success, as one flat hierarchy.

The worker treats each class differently:
- TransientError: nothing happened at the gateway; safe to send again (after a pause).
- RateLimited: a TransientError that must wait ``retry_after`` and never uses retry budget.
- PermanentError: the gateway refused the request; sending it again cannot help.
- OutcomeUnknown: the request may have reached the gateway; settle it with the status
  call before anything else, never by a blind resend.
- EnvironmentMismatch / ClockSkew: refused locally, before any network call.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base of all PagoEfectivo client errors."""

    def __init__(self, message: str, *, code: str | None = None, field: str | None = None, http_status: int | None = None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.field = field
        self.http_status = http_status


class TransientError(GatewayError):
    """HTTP 500/502/503/504, code 166, or a connection that failed before sending."""


class RateLimited(TransientError):
    """HTTP 429: over the merchant's rate at the gateway."""

    def __init__(self, message: str, *, retry_after: float, **kwargs):
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class ClockSkew(TransientError):
    """The local clock is more than 5 minutes off the gateway's: signatures would be refused."""


class PermanentError(GatewayError):
    """Codes 111, 112, 113, 508 (after one refresh) and 601-607: the request itself is refused."""


class EnvironmentMismatch(PermanentError):
    """Sandbox credentials aimed at production, or the other way round."""


class OutcomeUnknown(GatewayError):
    """The request may have been executed: read timeout, or the connection dropped after sending."""
