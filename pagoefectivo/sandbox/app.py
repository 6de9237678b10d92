"""The sandbox PagoEfectivo gateway's HTTP surface (docs/PROTOCOL.md §1-§7).

Published ("Integración Api CIP – Documentación Técnica 1.1"): the authorization, CIP
creation (``POST /v1/cips``), the envelope with its codes at their HTTP statuses and their
texts. Every answer, unknown routes and wrong methods included, is that JSON envelope.

Order of checks on a refund request (the first failing one answers):
latency → source IP in the global allow list (607) → Bearer token (400/508) → token issued
to that merchantId, merchant registered (400/508) → source IP in the merchant's allow list
(607) → rate limits (429) and injected errors (500/166) → the Origin header and required
fields (111: 112 each) → field values and types (111: 113 each) → timestamp within 5
minutes (606) → RSA signature (605) → externalRef replay or reuse (604) → original
transaction paid to that merchant (603) → currency (111: 113) → refund window (602) →
refundable amount (601) → provider decision (success | pending | failure) and execution.

With every chaos knob at its default the only extra work is a few dictionary lookups:
nothing sleeps, not even ``sleep(0)``.
"""

from __future__ import annotations

import asyncio
import html
import hmac
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from aiohttp import web

from pagoefectivo import protocol

from .allowlist import permits
from .chaos import Chaos, ChaosConfig, ChaosError
from .notifier import Notifier
from .registry import Registration, Registry
from .seed import Seed, SeedError, parse_merchant
from .state import Cip, Conflict, OverRefundable, RefundRecord, SandboxState
from .wire import (
    AUTHORIZATION_FIELDS, CIP_FIELDS, PAYMENT_FIELDS, RATE_LIMITED, REFUND_FIELDS, RefundOrder, Refusal, Problems,
    bearer_token, check_origin, json_response, operator_refusal, parse_authorization, parse_cip, parse_payment,
    parse_refund, read_object, refusal, source_ip_refusal, token_refusal,
)

log = logging.getLogger("pagoefectivo.sandbox")

# The gateway's own rule, not the project's setting: days after payment a refund is accepted.
REFUND_WINDOW_DAYS = {"cash": 90, "bank_transfer": 90}
PENDING_SETTLE_SECONDS = (0.05, 0.2)
DECLINED = "failure"
# The document: "Si no se envía la fecha a expirar se tomará el tiempo acordado por defecto" (p. 9).
DEFAULT_CIP_TERM = timedelta(days=7)
# Answers the document has no code for: the HTTP status as the code (like the modelled "429").
HTTP_MESSAGES = {404: "Recurso no encontrado.", 405: "Método no permitido.", 413: "Solicitud demasiado grande."}


@dataclass
class Sandbox:
    """Everything one gateway instance holds; reachable as ``app[SANDBOX]`` (tests use it)."""

    state: SandboxState
    chaos: Chaos
    registry: Registry
    notifier: Notifier
    notify_base_url: str | None


SANDBOX = web.AppKey("sandbox", Sandbox)


def create_app(config: ChaosConfig | None = None, *, seed: Seed | None = None,
               notify_base_url: str | None = None) -> web.Application:
    """The gateway application, knowing the merchants and payments of ``seed`` (if any) and
    those onboarded later; its HTTP session for notifications is made on start."""
    chaos = Chaos(config)
    state = SandboxState()
    registry = Registry()
    if seed is not None:
        for merchant in seed.merchants:
            if merchant.env == "sandbox":  # production credentials are unknown to a sandbox gateway
                registry.register(merchant)
        for payment in seed.payments:
            state.add_cip(merchant_id=payment.merchant_id, transaction_code=payment.transaction_id,
                          amount=payment.amount, currency=payment.currency, method=payment.method,
                          paid_at=payment.paid_at, number=payment.transaction_id)
    app = web.Application(middlewares=[_errors])
    app[SANDBOX] = Sandbox(state, chaos, registry, Notifier(chaos),
                           notify_base_url.rstrip("/") if notify_base_url else None)
    app.cleanup_ctx.append(_lifecycle)
    app.router.add_post("/v1/authorizations", authorize)
    app.router.add_post("/v1/cips", post_cip)
    app.router.add_post("/v1/refunds", post_refund)
    app.router.add_get("/v1/refunds/{external_ref}", get_refund)
    app.router.add_get("/sandbox/cips/{document_id}.html", cip_document)
    app.router.add_put("/sandbox/merchants/{merchant_id}", put_merchant)
    app.router.add_get("/sandbox/merchants/{merchant_id}", get_merchant)
    app.router.add_post("/sandbox/payments", sandbox_payment)
    app.router.add_post("/sandbox/cips/{cip}/payment", pay_cip)
    app.router.add_get("/sandbox/ledger", ledger)
    app.router.add_get("/sandbox/chaos", get_chaos)
    app.router.add_post("/sandbox/chaos", post_chaos)
    app.router.add_get("/healthz", healthz)
    return app


async def _lifecycle(app: web.Application):
    sandbox = app[SANDBOX]
    await sandbox.notifier.start()
    try:
        yield
    finally:
        await sandbox.notifier.close()


@web.middleware
async def _errors(request: web.Request, handler):
    """Every answer is the JSON envelope: refusals (their reasons logged), unknown routes and
    wrong methods, and anything unexpected as 500/166, never a stack trace on the wire."""
    try:
        return await handler(request)
    except Refusal as exc:
        if exc.reasons:
            log.info("%s %s refused %s (%s): %s", request.method, request.path, exc.code, exc.status,
                     "; ".join(exc.reasons))
        return exc.response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.status >= 500:
            return Refusal(exc.status, protocol.INTERNAL_ERROR).response()
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return Refusal(exc.status, str(exc.status), [], message=HTTP_MESSAGES.get(exc.status, exc.reason),
                       headers=headers).response()
    except Exception:
        log.exception("internal error on %s %s", request.method, request.path)
        return Refusal(500, protocol.INTERNAL_ERROR).response()


def _now() -> datetime:
    return datetime.now(timezone.utc)


# --- 4.1 authorization --------------------------------------------------------------

async def authorize(request: web.Request) -> web.Response:
    sandbox = request.app[SANDBOX]
    await sandbox.chaos.latency()
    _check_source(request, sandbox)
    auth = parse_authorization(await read_object(request, AUTHORIZATION_FIELDS))
    now = _now()
    if not protocol.within_tolerance(auth.date_request, now):
        problems = Problems()
        problems.invalid("dateRequest", "dateRequest must be Lima time (-05:00) within 5 minutes of the gateway clock")
        problems.raise_any()
    given = auth.hash_string.strip().lower().encode("utf-8")
    for merchant in sandbox.registry.merchants_by_credentials(auth.access_key, auth.service_id):
        expected = protocol.auth_hash(auth.service_id, auth.access_key, merchant.secret_key,
                                      auth.date_request).encode("utf-8")
        if hmac.compare_digest(expected, given):
            _check_source(request, sandbox, merchant)
            code_service = merchant.service_code
            token, grant = sandbox.state.issue_token(merchant.merchant_id, merchant.service_id, now,
                                                     code_service=code_service)
            return json_response(protocol.envelope(protocol.OK, {
                "token": token, "codeService": code_service,
                "tokenStart": protocol.lima_timestamp(grant.start),
                "tokenExpires": protocol.lima_timestamp(grant.expires),
            }), status=201)
    raise token_refusal("accessKey, idService or hashString is not valid", "hashString")


def _grant(request: web.Request, sandbox: Sandbox):
    grant = sandbox.state.token_grant(bearer_token(request), _now())
    if grant is None:
        raise token_refusal("the token is unknown or expired")
    return grant


def _check_source(request: web.Request, sandbox: Sandbox, merchant: Registration | None = None) -> None:
    """607 unless the caller's address is in every allow list that applies: the global one
    and, once the merchant is known, its own (from the seed, or ``merchant_allowed_ips``)."""
    config = sandbox.chaos.config
    if merchant is None:
        lists = (config.allowed_ips,)
    else:
        lists = (merchant.allowed_ips, config.merchant_allowed_ips.get(merchant.merchant_id, ()))
    for cidrs in lists:
        if cidrs and not permits(cidrs, request.remote):
            raise source_ip_refusal(request.remote)


def _registered(request: web.Request, sandbox: Sandbox, merchant_id: str) -> Registration:
    merchant = sandbox.registry.merchant(merchant_id)
    if merchant is None:
        raise token_refusal("the merchant is not registered", "merchantId")
    _check_source(request, sandbox, merchant)
    return merchant


# --- 4.2 refund request ---------------------------------------------------------------

def _faults(sandbox: Sandbox, merchant_id: str, *, merchant_limit: bool) -> None:
    chaos, config = sandbox.chaos, sandbox.chaos.config
    if merchant_limit and (wait := chaos.over_merchant_limit(merchant_id)) is not None:
        raise _rate_limited(wait)
    if chaos.hit(config.rate_limited_rate):
        raise _rate_limited(config.retry_after_s)
    if chaos.hit(config.error_rate):
        raise Refusal(500, protocol.INTERNAL_ERROR)


def _rate_limited(seconds: int) -> Refusal:
    return Refusal(429, RATE_LIMITED, message="Demasiadas solicitudes.", headers={"Retry-After": str(seconds)})


def _original(sandbox: Sandbox, order: RefundOrder) -> Cip:
    """The paid transaction: a CIP this sandbox knows for that merchant, paid."""
    cip = sandbox.state.cip(order.merchant_id, order.original_transaction_id)
    if cip is None:
        raise refusal(protocol.TRANSACTION_UNKNOWN, "no paid transaction with this id for this merchant",
                      "originalTransactionId")
    if cip.paid_at is None:
        raise refusal(protocol.TRANSACTION_UNKNOWN, "the CIP is not paid", "originalTransactionId")
    return cip


def _signed_by(merchant: Registration, order: RefundOrder) -> bool:
    try:
        return protocol.verify_fields(order.fields, order.signature, merchant.public_key_pem)
    except ValueError:  # a registered key that does not load: nothing verifies against it
        return False


async def post_refund(request: web.Request) -> web.Response:
    sandbox = request.app[SANDBOX]
    await sandbox.chaos.latency()
    _check_source(request, sandbox)
    grant = _grant(request, sandbox)
    body = await read_object(request, REFUND_FIELDS)
    claimed = body.get("merchantId")
    if claimed not in (None, "") and str(claimed) != grant.merchant_id:
        raise token_refusal("the token was not issued to this merchantId", "merchantId")
    merchant = _registered(request, sandbox, grant.merchant_id)
    _faults(sandbox, grant.merchant_id, merchant_limit=True)
    order = parse_refund(body, request.headers)
    now = _now()
    if abs(order.timestamp - now) > protocol.MAX_CLOCK_SKEW:
        raise refusal(protocol.TIMESTAMP_OUT_OF_TOLERANCE, "timestamp is more than 5 minutes off the gateway clock",
                      "timestamp")
    if not _signed_by(merchant, order):
        raise refusal(protocol.SIGNATURE_INVALID, "signature does not verify with the registered public key",
                      "signature")
    try:
        earlier = sandbox.state.replay(order)
    except Conflict:
        raise _reused() from None
    if earlier is not None:
        return _refund_answer(earlier)
    original = _original(sandbox, order)
    if original.currency != order.currency:
        raise refusal(protocol.INVALID_VALUE, f"the transaction was paid in {original.currency}", "currency")
    window = timedelta(days=REFUND_WINDOW_DAYS.get(original.method, 90))
    if now - original.paid_at > window:
        raise refusal(protocol.REFUND_WINDOW_CLOSED, f"refunds are accepted up to {window.days} days after payment",
                      "originalTransactionId")
    try:
        record, new = sandbox.state.record_refund(order, paid_amount=original.amount,
                                                  status=sandbox.chaos.draw_status(), now=now)
    except Conflict:
        raise _reused() from None
    except OverRefundable as exc:
        raise refusal(protocol.AMOUNT_OVER_REFUNDABLE, f"at most {exc.available:.2f} can still be refunded",
                      "refundAmount") from None
    if new:
        log.info("refund %s/%s %s: %s %s %s", record.merchant_id, record.external_ref, record.refund_id,
                 record.status, record.amount, record.currency)
        _notify_refund(sandbox, merchant, order, record)
        if sandbox.chaos.hit(sandbox.chaos.config.timeout_after_commit_rate):
            await _lose_answer(request, sandbox.chaos.config.timeout_hold_s)
    return _refund_answer(record)


def _reused() -> Refusal:
    return refusal(protocol.EXTERNAL_REF_REUSED, "externalRef was used before with other parameters", "externalRef")


def _refund_answer(record: RefundRecord) -> web.Response:
    return json_response(protocol.envelope(protocol.OK, record.answer()))


async def _lose_answer(request: web.Request, hold_seconds: float) -> None:
    """Chaos: the refund is committed, but its answer never arrives (the connection drops)."""
    if hold_seconds > 0:
        await asyncio.sleep(hold_seconds)
    if request.transport is not None:
        request.transport.close()
    raise web.HTTPInternalServerError()  # written to a closed transport: nothing reaches the client


def _notify_refund(sandbox: Sandbox, merchant: Registration, order: RefundOrder, record: RefundRecord) -> None:
    """refund.succeeded for an executed refund (a pending one settles ~50-200 ms later),
    refund.failed for a decline."""
    data = {
        "refundId": record.refund_id, "externalRef": record.external_ref,
        "originalTransactionId": record.original_transaction_id, "refundAmount": record.amount,
        "currency": record.currency, "merchantId": record.merchant_id,
        "status": "success" if record.executed else DECLINED,
    }
    if not record.executed:
        data.update(code=record.reason_code, reason=record.decline_reason)
    payload = {
        "eventType": "refund.succeeded" if record.executed else "refund.failed",
        "operationNumber": sandbox.state.next_operation_number(),
        "data": data,
    }
    pending = record.status == "pending"
    sandbox.notifier.send(
        order.notify_url, merchant.merchant_id, payload, merchant.secret_key,
        delay=sandbox.chaos.uniform(*PENDING_SETTLE_SECONDS) if pending else 0.0,
        on_due=(lambda: sandbox.state.settle(record)) if pending else None,
    )


# --- 4.3 refund status ----------------------------------------------------------------

async def get_refund(request: web.Request) -> web.Response:
    sandbox = request.app[SANDBOX]
    await sandbox.chaos.latency()
    _check_source(request, sandbox)
    grant = _grant(request, sandbox)
    merchant_id = request.headers.get(protocol.MERCHANT_HEADER, "").strip()
    problems = Problems()
    if not merchant_id:
        problems.missing(protocol.MERCHANT_HEADER)
    problems.raise_any()
    if merchant_id != grant.merchant_id:
        raise token_refusal("the token was not issued to this merchant", protocol.MERCHANT_HEADER)
    _registered(request, sandbox, merchant_id)
    _faults(sandbox, merchant_id, merchant_limit=False)
    check_origin(problems, request.headers)
    problems.raise_any()
    record = sandbox.state.refund(merchant_id, request.match_info["external_ref"])
    if record is None:
        raise refusal(protocol.TRANSACTION_UNKNOWN, "no refund with this externalRef", "externalRef", status=404)
    return _refund_answer(record)


# --- CIP creation (API CIP 1.1 §5.1.2) ---------------------------------------------------

async def post_cip(request: web.Request) -> web.Response:
    """``POST /v1/cips``: a CIP pending payment, answered 201 as in the document's example (p. 12),
    ``code`` and ``cip`` as JSON numbers there."""
    sandbox = request.app[SANDBOX]
    await sandbox.chaos.latency()
    _check_source(request, sandbox)
    grant = _grant(request, sandbox)
    merchant = _registered(request, sandbox, grant.merchant_id)
    _faults(sandbox, grant.merchant_id, merchant_limit=False)
    now = _now()
    order = parse_cip(await read_object(request, CIP_FIELDS), request.headers, now)
    if order.service_id is not None and order.service_id != grant.service_id:
        raise token_refusal("serviceId is not the service the token was issued to", "serviceId")
    if order.amount > (limit := merchant.max_cip_amount):
        raise refusal(protocol.CIP_AMOUNT_OVER_MAXIMUM, f"amount over this merchant's maximum of {limit}", "amount")
    expiry = order.date_expiry or now + DEFAULT_CIP_TERM
    cip = sandbox.state.add_cip(merchant_id=merchant.merchant_id, transaction_code=order.transaction_code,
                                amount=order.amount, currency=order.currency, method="cash", paid_at=None,
                                date_expiry=expiry, fields=order.fields)
    log.info("cip %s for %s: %s %s, expires %s", cip.cip, merchant.merchant_id, cip.amount, cip.currency,
             protocol.lima_timestamp(expiry))
    return json_response({"code": int(protocol.OK), "message": protocol.MESSAGES[protocol.OK], "data": {
        "cip": int(cip.cip), "currency": cip.currency, "amount": cip.amount, "transactionCode": cip.transaction_code,
        "dateExpiry": protocol.lima_timestamp(expiry),
        "cipUrl": f"{request.url.origin()}/sandbox/cips/{cip.document_id}.html",
    }}, status=201)


async def cip_document(request: web.Request) -> web.Response:
    """The CIP's HTML document (``cipUrl``): what the customer takes to pay."""
    cip = request.app[SANDBOX].state.cip_document(request.match_info["document_id"])
    if cip is None:
        raise web.HTTPNotFound()
    rows = [("CIP", cip.cip), ("Monto", f"{cip.currency} {cip.amount}"),
            ("Vence", protocol.lima_timestamp(cip.date_expiry) if cip.date_expiry else "-"),
            ("Concepto", cip.fields.get("paymentConcept", "")), ("Estado", "Pagado" if cip.paid_at else
                                                                 "Pendiente de pago")]
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return web.Response(text=f"<!doctype html><html lang=\"es\"><head><meta charset=\"utf-8\"><title>CIP {cip.cip}"
                             f"</title></head><body><h1>PagoEfectivo (sandbox)</h1><table>{cells}</table></body></html>",
                        content_type="text/html")


# --- 4.5 sandbox-only endpoints ---------------------------------------------------------

async def put_merchant(request: web.Request) -> web.Response:
    """Onboarding: a merchant registers (or re-registers, to rotate keys) its service, access
    key, secret, public key and notify URL, as it would with PagoEfectivo; 201 when new."""
    sandbox = request.app[SANDBOX]
    merchant_id = request.match_info["merchant_id"]
    before = sandbox.registry.merchant(merchant_id)
    try:
        merchant = parse_merchant(await read_object(request), "merchant", merchant_id=merchant_id)
        sandbox.registry.register(merchant)
    except (SeedError, ValueError) as exc:
        where, _, _ = str(exc).partition(":")
        raise operator_refusal(str(exc), where.removeprefix("merchant.") if "." in where else None) from None
    if before is None:
        log.info("merchant %s onboarded (service %s)", merchant_id, merchant.service_id)
    elif before.secret_key != merchant.secret_key:
        sandbox.state.revoke_tokens(merchant_id)  # tokens issued under the old secret end with it
    return json_response(merchant.to_json(), status=201 if before is None else 200)


async def get_merchant(request: web.Request) -> web.Response:
    merchant = request.app[SANDBOX].registry.merchant(request.match_info["merchant_id"])
    if merchant is None:
        raise web.HTTPNotFound()
    return json_response(merchant.to_json())


async def sandbox_payment(request: web.Request) -> web.Response:
    """A customer pays: a new CIP, paid now, announced to the merchant by a signed cip.paid.
    With ``transactionId`` (and ``paidAt``), a payment made before this run, under that id."""
    sandbox = request.app[SANDBOX]
    now = _now()
    order = parse_payment(await read_object(request, PAYMENT_FIELDS), now)
    merchant = sandbox.registry.merchant(order.merchant_id)
    if merchant is None:
        raise operator_refusal("no sandbox merchant with this id (onboard it first)", "merchantId")
    if order.transaction_id and (known := sandbox.state.cip(merchant.merchant_id, order.transaction_id)):
        if (known.amount, known.currency, known.paid_at is None) != (order.amount, order.currency, False):
            raise operator_refusal("transactionId is known with another amount or currency, or unpaid",
                                   "transactionId")
        return json_response({"cip": known.cip})  # recorded before: the same payment, told once
    cip = sandbox.state.add_cip(merchant_id=merchant.merchant_id, transaction_code=order.transaction_code,
                                amount=order.amount, currency=order.currency, method=order.method,
                                paid_at=order.paid_at or now, number=order.transaction_id)
    if order.notify:
        _announce_payment(sandbox, merchant, cip)
    return json_response({"cip": cip.cip})


async def pay_cip(request: web.Request) -> web.Response:
    """The customer pays a CIP made by ``POST /v1/cips`` (at an agent, by its number): the
    merchant gets a signed cip.paid."""
    sandbox = request.app[SANDBOX]
    number = request.match_info["cip"]
    found = sorted((cip for (_, n), cip in sandbox.state.cips.items() if n == number),
                   key=lambda cip: cip.paid_at is not None)  # an unpaid one first
    if not found:
        raise refusal(protocol.TRANSACTION_UNKNOWN, "no CIP with this number", "cip", status=404)
    try:
        cip = sandbox.state.pay(found[0], _now())
    except ValueError as exc:
        raise operator_refusal(str(exc), "cip", status=409) from None
    merchant = sandbox.registry.merchant(cip.merchant_id)
    if merchant is not None:
        _announce_payment(sandbox, merchant, cip)
    return json_response({"cip": cip.cip, "paymentDate": protocol.lima_timestamp(cip.paid_at)})


def _announce_payment(sandbox: Sandbox, merchant: Registration, cip: Cip) -> None:
    """The signed cip.paid to the merchant's notify URL (API CIP 1.1 §5.2, p. 14)."""
    url = merchant.notify_url_or(sandbox.notify_base_url)
    if url is None:
        log.warning("cip %s for %s: no notify URL (merchant has none, REFUNDS_NOTIFY_URL unset)",
                    cip.cip, merchant.merchant_id)
        return
    sandbox.notifier.send(url, merchant.merchant_id, {
        "eventType": "cip.paid",
        "operationNumber": sandbox.state.next_operation_number(),
        "data": {"cip": cip.cip, "currency": cip.currency, "amount": cip.amount,
                 "transactionCode": cip.transaction_code, "paymentDate": protocol.lima_timestamp(cip.paid_at),
                 "merchantId": merchant.merchant_id, "method": cip.method},
    }, merchant.secret_key)


async def ledger(request: web.Request) -> web.Response:
    return json_response([entry.to_json() for entry in request.app[SANDBOX].state.ledger])


async def get_chaos(request: web.Request) -> web.Response:
    return json_response(request.app[SANDBOX].chaos.config.to_json())


async def post_chaos(request: web.Request) -> web.Response:
    chaos = request.app[SANDBOX].chaos
    try:
        config = chaos.update(await read_object(request))
    except ChaosError as exc:
        raise operator_refusal(exc.message, exc.key) from None
    log.info("chaos now %s", config.to_json())
    return json_response(config.to_json())


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})
