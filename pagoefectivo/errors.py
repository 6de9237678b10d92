"""Every gateway answer that is not a success, as one flat hierarchy.

::

    GatewayError                  code, message, field, http_status, details
    ├── TransientError            nothing was executed; send again after a pause
    │   ├── RateLimited           HTTP 429; wait ``retry_after`` seconds (no retry budget used)
    │   └── ClockSkew             local clock > 5 min off the gateway's Date header: signed
    │                             requests are refused locally, and a refusal of one while
    │                             the skew shows (113 on dateRequest, 606) is reported as this
    ├── PermanentError            the gateway refused this request; resending cannot help
    │   └── EnvironmentMismatch   sandbox credentials or URL meet production (or the reverse);
    │                             refused locally, before any network call
    └── OutcomeUnknown            the request may have been executed; settle it with the
                                  status lookup, never by a blind resend

What maps where (``pagoefectivo.client``; codes by ``client.CODE_CLASSES``, whatever the
HTTP status they arrive with, as "Integración Api CIP – Documentación Técnica 1.1" gives
each code one meaning):

- TransientError: code 166 at any status; HTTP 500/502/503/504 with a code the table does
  not know; connection refused or failed before the request was written (DNS, connect
  timeout); and any other answer that is not the gateway's envelope (a proxy's refusal, a
  503: nothing was executed by the gateway).
- RateLimited: HTTP 429, ``retry_after`` from ``Retry-After`` (seconds or an HTTP date);
  the modelled code "429" at another status waits one second.
- PermanentError: codes 111 (the published answer to invalid fields, its ``data`` naming
  each with 112 or 113), 112, 113, 511 and 601-607 (each with its code, message and
  field), 508 when it survives one token refresh and one retry, and any other code the
  gateway answers with its envelope at a status that is not 500/502/503/504.
- OutcomeUnknown: a read timeout or a dropped connection after a refund request was sent,
  a 2xx answer that cannot be read, HTTP 500/502/504 without the envelope (a proxy that
  forwarded the request and lost or timed out on the answer), or code 100 at a non-2xx status. (On a call that
  changes nothing, such as the status lookup or the authorization, the same faults are
  TransientError.)

The worker (``workers.sender``) acts on the class, never on the message: retry later,
wait, fail the refund with the code, or ask for the status first.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base of all PagoEfectivo client errors. Messages never carry secrets or tokens."""

    def __init__(self, message: str, *, code: str | None = None, field: str | None = None,
                 http_status: int | None = None, details: list[dict] | None = None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.field = field
        self.http_status = http_status
        self.details = details or []  # the envelope's data: [{"code","message","field"}]


class TransientError(GatewayError):
    """Nothing happened at the gateway: code 166, a 5xx with its envelope, a 503, or no connection."""


class RateLimited(TransientError):
    """HTTP 429: over the merchant's rate at the gateway."""

    def __init__(self, message: str, *, retry_after: float, **kwargs):
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class ClockSkew(TransientError):
    """The local clock is more than 5 minutes off the gateway's: signatures would be refused."""

    def __init__(self, message: str, *, skew_seconds: float, **kwargs):
        super().__init__(message, **kwargs)
        self.skew_seconds = skew_seconds


class PermanentError(GatewayError):
    """Codes 111, 112, 113, 511, 508 (after one refresh) and 601-607: the request itself is refused."""


class EnvironmentMismatch(PermanentError):
    """Sandbox credentials or URL aimed at production, or the other way round."""


class OutcomeUnknown(GatewayError):
    """The request may have been executed: read timeout, or the connection dropped after sending."""
