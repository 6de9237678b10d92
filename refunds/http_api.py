"""What every HTTP service of ours answers alike (the intake, the receiver): the error body, its
codes, and the request id.

Every error is ``{"error": {"code", "message", "field"?, "request_id"}}``, its ``code`` one of
``ERRORS``: the one list of the codes our services answer, each with its HTTP status and what it
means. Answers are built from it (``error_answer``: the status comes with the code), the intake's
OpenAPI document enumerates its codes from it (per operation, ``producers.http``), and
docs/API.md lists it. Every answer carries ``X-Request-Id``: the caller's when it sent a usable
one (1-128 of letters, digits and ``._:-``), else a new one; the request's log lines carry it too
(``refunds.logs.context``), so a call can be joined to what it did. ``AccessLog`` writes one
line per request with that id and what the handler added to it (``LOG_FIELDS``: the intake's
line for a refund it accepted names the refund).
"""

from __future__ import annotations

import logging
import re
import uuid
from dataclasses import dataclass

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from . import logs

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-Id"
USABLE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
REQUEST_ID = web.RequestKey("request_id", str)
LOG_FIELDS = web.RequestKey("log_fields", dict)  # added to the request's access line (AccessLog)


@dataclass(frozen=True)
class ErrorCode:
    """An ``error.code`` our services answer with: its HTTP status and its meaning (docs/API.md)."""

    code: str
    status: int
    meaning: str


ERRORS: dict[str, ErrorCode] = {error.code: error for error in (
    # the request as sent
    ErrorCode("malformed_json", 400, "The body is not UTF-8 JSON, or repeats a key."),
    ErrorCode("missing_parameter", 400, "A required query parameter is absent; `field` names it."),
    ErrorCode("invalid_parameter", 400, "A query parameter breaks its rule (a cursor not of this list, an unknown"
                                        " state, a limit out of range); `field` names it."),
    ErrorCode("invalid_refund_id", 400, "The path's refund_id is not a UUID."),
    ErrorCode("invalid_endpoint_id", 400, "The path's endpoint_id is not a UUID."),
    ErrorCode("malformed", 400, "Receiver: the notification's body was not received whole, or is not a"
                                " notification."),
    ErrorCode("unauthorized", 401, "No `Authorization: Bearer` token, or an unknown or revoked one."),
    ErrorCode("invalid_signature", 401, "Receiver: PE-Signature is missing or does not verify."),
    ErrorCode("merchant_not_allowed", 403, "The token may not act for this merchant; nothing was written."),
    ErrorCode("same_person", 403, "The approver requested this refund: four eyes need another person."),
    ErrorCode("forbidden", 403, "Receiver: this source address may not send notifications."),
    ErrorCode("not_found", 404, "No such refund, webhook endpoint or path (at the receiver: merchant); a refund of"
                                " a merchant the token may not act for is not found either, nor a webhook endpoint"
                                " that another caller (or an operator) registered."),
    ErrorCode("method_not_allowed", 405, "The path does not take this method; `Allow` lists those it does."),
    ErrorCode("request_timeout", 408, "The body did not arrive in time."),
    ErrorCode("external_ref_conflict", 409, "This merchant used external_ref before for a different refund."),
    ErrorCode("not_awaiting_approval", 409, "The refund is not waiting for approval: decided already, or it never"
                                            " needed one."),
    ErrorCode("approval_refused", 409, "The four-eyes rules refuse this decision (for a reason with no code of its"
                                       " own)."),
    ErrorCode("body_too_large", 413, "The body is over the service's limit (16 KiB at the intake)."),
    # the body's fields (`field` names the one at fault)
    ErrorCode("invalid_body", 422, "The body is not a JSON object."),
    ErrorCode("unknown_field", 422, "A field this request does not have (a misspelt one is not taken for a"
                                    " missing one)."),
    ErrorCode("missing_field", 422, "A required field is absent or null."),
    ErrorCode("invalid_field", 422, "A field breaks its rule, which the message states."),
    ErrorCode("invalid_amount", 422, "amount is not a decimal string over 0 with at most 2 decimals (a JSON"
                                     " number is refused)."),
    ErrorCode("invalid_currency", 422, "currency is not one of the currencies taken (PEN, USD)."),
    ErrorCode("idempotency_key_mismatch", 422, "The Idempotency-Key header and external_ref differ."),
    ErrorCode("invalid_url", 422, "A webhook url that is not a well-formed http(s) URL with a host (and a port, if"
                                  " any, from 0 to 65535)."),
    ErrorCode("url_not_allowed", 422, "A webhook url whose address is loopback, link-local or private (unless"
                                      " WEBHOOK_ALLOWED_NETWORKS allows it)."),
    ErrorCode("invalid_event_types", 422, "Webhook event types that are unknown, or none."),
    ErrorCode("invalid_request", 422, "A field is invalid (a rule checked outside the request models)."),
    # the refund, refused on our books (nothing was written; the same request may succeed later)
    ErrorCode("unknown_merchant", 422, "No such merchant."),
    ErrorCode("refunds_disabled", 422, "Refunds are switched off for this merchant."),
    ErrorCode("unknown_transaction", 422, "original_transaction_id is not a payment of this merchant that we know"
                                          " was paid (yet: once its payment is recorded, send the request again)."),
    ErrorCode("currency_mismatch", 422, "currency differs from the payment's."),
    ErrorCode("refund_window_closed", 422, "The payment is older than its method's refund window."),
    ErrorCode("amount_over_refundable", 422, "amount is over what is left to refund of the payment."),
    ErrorCode("requester_unnamed", 422, "The refund needs a second person's approval, and nobody is named as asking"
                                        " for it (the intake names the token; the Python API takes requested_by)."),
    # the service
    ErrorCode("internal_error", 500, "A fault of ours, logged with the request id; the request may be retried."),
    ErrorCode("unavailable", 503, "A store the service needs is unavailable; retry after `Retry-After` (every"
                                  " request here is idempotent)."),
)}


def request_id_of(request: web.Request) -> str:
    """The caller's X-Request-Id when it is usable, else a new one."""
    given = request.headers.get(REQUEST_ID_HEADER, "")
    return given if USABLE_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


@web.middleware
async def request_ids(request: web.Request, handler) -> web.StreamResponse:
    """Name the request: its log lines carry the id, and so do its answer's header and error body."""
    request[REQUEST_ID] = request_id = request_id_of(request)
    with logs.context(request_id=request_id):
        response = await handler(request)
    response.headers[REQUEST_ID_HEADER] = request_id
    return response


class AccessLog(AbstractAccessLogger):
    """One line per request: its request line, status, size and time, its request id, and the
    fields its handler set in ``LOG_FIELDS`` (never a header or the body: no token, no secret)."""

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        line = f"{request.method} {request.path_qs} HTTP/{request.version.major}.{request.version.minor}"
        self.logger.info('%s "%s" %d %d %.3fs', request.remote, line, response.status, response.body_length, time,
                         extra={"remote_address": request.remote, "first_request_line": line,
                                "response_status": response.status, "response_size": response.body_length,
                                "ms": round(time * 1000, 1), "request_id": request.get(REQUEST_ID),
                                **request.get(LOG_FIELDS, {})})


def error_body(code: str, message: str, field: str | None = None, *, request_id: str | None = None) -> dict:
    error = {"code": code, "message": message}
    if field:
        error["field"] = field
    if request_id:
        error["request_id"] = request_id
    return {"error": error}


def error_answer(code: str, message: str, field: str | None = None, *,
                 request_id: str | None = None) -> tuple[int, dict]:
    """The status and body of error ``code``. A code missing from ``ERRORS`` is a bug of ours
    (tests/producers/test_openapi_errors.py looks for one): logged, and answered internal_error."""
    error = ERRORS.get(code)
    if error is None:
        log.error("error code %r is not in refunds.http_api.ERRORS; answered internal_error", code)
        error, message, field = ERRORS["internal_error"], "internal error; the request may be retried", None
    return error.status, error_body(error.code, message, field, request_id=request_id)


def error_response(request: web.Request, code: str, message: str, field: str | None = None,
                   headers: dict | None = None) -> web.Response:
    """The error answer for ``request``, naming it; its status is the code's."""
    status, body = error_answer(code, message, field, request_id=request.get(REQUEST_ID))
    return web.json_response(body, status=status, headers=headers)
