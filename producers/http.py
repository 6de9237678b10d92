"""The intake API (its OpenAPI document at /openapi.json): refund requests over HTTP, for any service.

Thin on purpose: this module authenticates, validates the body with the models every door
uses (``refunds.requests``, which also make the document's schemas) and checks the token's
merchant scope; ``producers.enqueue`` does everything else, so the API, the CLI and Python
callers accept exactly the same refunds with the same idempotency.

Order of checks on ``POST /v1/refunds``, cheapest and least trusting first: declared size
(413) → a Bearer header at all (401) → body read with a hard cap (413) → JSON (400) → the
token itself (401) → fields (422) → merchant scope (403, nothing written) → enqueue
(202/200/409/422). Database connections are taken only once the body is in (so a slow
client never holds one), a token seen before costs no query at all (the accepting statement
re-checks it, see ``create_refund``), and concurrent requests share the accepting statement
(``producers.accept_batch``). Round trips are what intake throughput is made of. Every error has the
body ``{"error": {"code", "message", "field"?, "request_id"}}``. A Postgres outage answers 503, never a
stack trace; retrying then is safe because ``external_ref`` makes the request idempotent.

Conventions of payment APIs: every answer carries ``X-Request-Id`` (the caller's, when it sent
a usable one, else a new one), and every log line of the request carries it beside the
``refund_id``. ``Idempotency-Key`` (Stripe's header) may stand for ``external_ref``: it is the
same key, so a request may send either or both (equal); a replayed answer (200) is marked
``Idempotent-Replayed: true``.

``python -m producers.http`` serves it (DATABASE_URL, REDIS_URL, INTAKE_PORT, INTAKE_HOST), and its
/metrics on INTAKE_METRICS_PORT only (merchant ids are label values: not for the public port).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from datetime import timedelta
from uuid import UUID

import asyncpg
import redis.asyncio as aioredis
from aiohttp import web
from pydantic import ValidationError
from pydantic.json_schema import models_json_schema

from refunds.database import OUTAGE_ERRORS as DB_OUTAGE_ERRORS, Database, Unavailable, describe
from refunds.delivery import Courier
from refunds import db, metrics, service
from refunds.http_api import (
    ERRORS, LOG_FIELDS, REQUEST_ID, REQUEST_ID_HEADER, AccessLog, error_body, error_response, request_ids,
)
from refunds.errors import NotFound, RefundRefused
from refunds.records import (
    Refund, find_by_external_ref, find_refund, list_refunds, page_cursor, parse_cursor, refund_events,
)
from refunds import webhooks
from refunds.requests import (
    ANSWER_MODELS, EXTERNAL_REF, REQUEST_MODELS, Decision, M, RefundListQuery, RefundLookup, RefundRequest,
    WebhookRequest, WebhookRotation, refund_view, refusal_codes, validated,
)
from refunds.vault import vault_from_settings
from refunds.settings import get_settings
from refunds.tokens import MAX_TOKEN_LENGTH, ApiToken, TokenCache, TokenRevoked, authenticate, hash_token

from .accept_batch import AcceptBatcher
from .approvals import ApprovalError, decide
from .enqueue import accept_request, hand_over

log = logging.getLogger("intake")

MAX_BODY = 16 * 1024
REQUEST_TIMEOUT = 15.0  # a Postgres that hangs (rather than refuses) still yields a prompt 503
# A body still arriving after this long is the client's fault (408), not an outage: read under its
# own, shorter bound, so that its TimeoutError is never taken for the database's.
BODY_TIMEOUT = 10.0
PROBE_TIMEOUT = 3.0
API_VERSION = "1.0.0"


# --- errors ---------------------------------------------------------------------------------

class ApiError(Exception):
    """An answer other than success, with the contract's error body; its status is the code's
    (``refunds.http_api.ERRORS``)."""

    def __init__(self, code: str, message: str, field: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.code, self.message, self.field, self.headers = code, message, field, headers


# Errors that mean "try again later", not "this request is wrong".
OUTAGE_ERRORS: tuple[type[BaseException], ...] = (Unavailable, *DB_OUTAGE_ERRORS)

# The error codes each operation answers (docs/API.md has their meanings): the document
# enumerates them per operation and status, and a test holds every code raised here, in
# ``producers.enqueue``, ``producers.approvals`` and ``refunds.webhooks`` to these lists.
WITH_TOKEN = ("unauthorized", "unavailable", "internal_error")
WITH_BODY = ("malformed_json", "request_timeout", "body_too_large")
ACCEPT_REFUSALS = ("unknown_merchant", "refunds_disabled", "unknown_transaction", "currency_mismatch",
                   "refund_window_closed", "amount_over_refundable", "requester_unnamed",
                   "external_ref_conflict")  # producers.enqueue
DECISION_ERRORS = (*WITH_TOKEN, *WITH_BODY, *refusal_codes(Decision), "invalid_refund_id", "not_found",
                   "same_person", "not_awaiting_approval", "approval_refused")  # producers.approvals
OPERATION_ERRORS: dict[str, tuple[str, ...]] = {
    "createRefund": (*WITH_TOKEN, *WITH_BODY, *refusal_codes(RefundRequest), "idempotency_key_mismatch",
                     "merchant_not_allowed", *ACCEPT_REFUSALS),
    "listRefunds": (*WITH_TOKEN, "missing_parameter", "invalid_parameter", "merchant_not_allowed", "not_found"),
    "getRefund": (*WITH_TOKEN, "invalid_refund_id", "not_found"),
    "approveRefund": DECISION_ERRORS,
    "rejectRefund": DECISION_ERRORS,
    "createWebhook": (*WITH_TOKEN, *WITH_BODY, *refusal_codes(WebhookRequest), "merchant_not_allowed",
                      "unknown_merchant", "url_not_allowed", "invalid_event_types"),
    "listWebhooks": WITH_TOKEN,
    "disableWebhook": (*WITH_TOKEN, "invalid_endpoint_id", "not_found"),
    "rotateWebhookSecret": (*WITH_TOKEN, *WITH_BODY, *refusal_codes(WebhookRotation), "invalid_endpoint_id",
                            "not_found"),
}
# what aiohttp itself raises: a path with no route, a method its route does not take, a body over client_max_size
AIOHTTP_ERRORS = {ERRORS[code].status: code for code in ("not_found", "method_not_allowed", "body_too_large")}
# every code the intake answers: its operations', aiohttp's, and a validation outside
# refunds.requests.validated (a bug, logged) answered invalid_request
INTAKE_ERRORS = tuple(dict.fromkeys(
    [code for codes in OPERATION_ERRORS.values() for code in codes] + [*AIOHTTP_ERRORS.values(), "invalid_request"]))


@web.middleware
async def errors_middleware(request: web.Request, handler) -> web.StreamResponse:
    """Turn every failure into the contract's error body; a stack trace never leaves the process."""
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT):
            return await handler(request)
    except ApiError as exc:
        return error_response(request, exc.code, exc.message, exc.field, exc.headers)
    except RefundRefused as exc:  # 422, or 409 for an IdempotencyConflict: the code's status
        return error_response(request, exc.code, exc.message, exc.field)
    except ValidationError as exc:  # input validated without refunds.requests.validated: still the caller's fault
        log.warning("%s %s: validation outside refunds.requests.validated (%s)", request.method, request.path, exc.title)
        first = exc.errors(include_url=False)[0]
        field = str(first["loc"][0]) if first["loc"] else None
        return error_response(request, "invalid_request", first["msg"], field)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if (code := AIOHTTP_ERRORS.get(exc.status)) is not None:
            message = exc.reason if exc.status != 413 else f"the request body is over {MAX_BODY} bytes"
            allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            return error_response(request, code, message, headers=allow)
        log.error("%s %s: aiohttp answered %s, which has no error code here", request.method, request.path, exc.status)
    except OUTAGE_ERRORS as exc:
        log.warning("%s %s: database unavailable (%s)", request.method, request.path, describe(exc))
        return error_response(request, "unavailable", "the refund store is unavailable; retry later",
                              headers={"Retry-After": "1"})
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
    return error_response(request, "internal_error", "internal error; the request may be retried")


CHALLENGE = {"WWW-Authenticate": 'Bearer realm="refunds"'}
DATABASE = web.AppKey("database", Database)
REDIS_URL = web.AppKey("redis_url", str)
REDIS = web.AppKey("redis", aioredis.Redis)
OPENAPI = web.AppKey("openapi", bytes)
TOKENS = web.AppKey("tokens", TokenCache)
ACCEPTS = web.AppKey("accepts", AcceptBatcher)
COURIER = web.AppKey("courier", Courier)


# --- the application --------------------------------------------------------------------------

def create_app(*, database_url: str, redis_url: str | None = None) -> web.Application:
    """The intake application; its Postgres pool and Redis client are made on start, on the running loop.

    ``redis_url`` (default: REDIS_URL) is only probed by /readyz here; refunds reach Redis
    through ``refunds.delivery``.
    """
    app = web.Application(client_max_size=MAX_BODY, middlewares=[request_ids, errors_middleware])
    app[DATABASE] = Database(database_url)
    app[REDIS_URL] = redis_url or get_settings().require("redis_url")
    app[OPENAPI] = json.dumps(openapi_document(), indent=2).encode()
    app[TOKENS] = TokenCache()
    # 4 flushes of up to 64 refunds: the pool's 10 connections leave room for token lookups and reads
    app[ACCEPTS] = AcceptBatcher(app[DATABASE].connection, max_batch=64, max_inflight=4)
    app[COURIER] = Courier()  # hands accepted refunds to the workers; closed with the app
    app.on_startup.append(_start)
    app.on_cleanup.append(_stop)
    app.router.add_post("/v1/refunds", create_refund)
    app.router.add_get("/v1/refunds", list_or_find_refunds)
    app.router.add_get("/v1/refunds/{refund_id}", show_refund)
    app.router.add_post("/v1/refunds/{refund_id}/approve", approve_refund)
    app.router.add_post("/v1/refunds/{refund_id}/reject", reject_refund)
    app.router.add_post("/v1/webhooks", create_webhook)
    app.router.add_get("/v1/webhooks", list_webhooks)
    app.router.add_post("/v1/webhooks/{endpoint_id}/disable", disable_webhook)
    app.router.add_post("/v1/webhooks/{endpoint_id}/rotate-secret", rotate_webhook_secret)
    app.router.add_get("/openapi.json", openapi_view)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)  # /metrics: on INTAKE_METRICS_PORT only (refunds.serving)
    return app


async def _start(app: web.Application) -> None:
    app[REDIS] = aioredis.Redis.from_url(
        app[REDIS_URL], socket_connect_timeout=PROBE_TIMEOUT, socket_timeout=PROBE_TIMEOUT,
    )
    await app[DATABASE].start()


async def _stop(app: web.Application) -> None:
    await app[DATABASE].close()
    await app[COURIER].close()
    if REDIS in app:
        await app[REDIS].aclose()


# --- request helpers --------------------------------------------------------------------------

def _bearer(request: web.Request) -> str:
    """The token of the Authorization header (401 without one); not yet checked."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError("unauthorized", "an Authorization: Bearer <token> header is required", headers=CHALLENGE)
    return token.strip()


def _unauthorized() -> ApiError:
    return ApiError("unauthorized", "the token is unknown or revoked", headers=CHALLENGE)


async def _authenticate(request: web.Request) -> ApiToken:
    """The request's active token, looked up in the database (401 otherwise)."""
    secret = _bearer(request)
    pool = await request.app[DATABASE].pool()
    async with db.acquire(pool) as conn:
        found = await authenticate(conn, secret)
    if found is None:
        raise _unauthorized()
    return found


def _check_declared_size(request: web.Request) -> None:
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise ApiError("body_too_large", f"the request body is over {MAX_BODY} bytes")


async def _read_json(request: web.Request, *, optional: bool = False) -> object:
    """The body as JSON, read with a hard cap. No field takes a JSON number (``amount`` is a
    decimal string), so numbers stay int/float here for the models to refuse."""
    _check_declared_size(request)
    try:
        async with asyncio.timeout(BODY_TIMEOUT):
            raw = await request.read()  # client_max_size stops a longer (chunked) body with 413
    except TimeoutError:
        log.warning("%s %s: the request body did not arrive within %.0f s (from %s)", request.method, request.path,
                    BODY_TIMEOUT, request.remote)
        raise ApiError("request_timeout", f"the request body did not arrive within {BODY_TIMEOUT:.0f} s") from None
    if optional and not raw.strip():
        return {}
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except UnicodeDecodeError:
        raise ApiError("malformed_json", "the request body is not UTF-8") from None
    except (ValueError, RecursionError) as exc:
        raise ApiError("malformed_json", f"the request body is not valid JSON: {exc}") from None


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    """Refuse {"amount": "1", "amount": "100"}: two readers could disagree on which one counts."""
    result = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _refund_id(request: web.Request) -> UUID:
    try:
        return UUID(request.match_info["refund_id"])
    except ValueError:
        raise ApiError("invalid_refund_id", "refund_id must be a UUID", "refund_id") from None


def _refused(exc: RefundRefused) -> None:
    """Count a refusal made here (enqueue_refund counts its own)."""
    metrics.refunds_rejected_total.labels(exc.code).inc()


async def _with_events(conn: asyncpg.Connection, refund: Refund) -> dict:
    return {**refund_view(refund), "events": await refund_events(conn, refund.refund_id)}


# --- refunds ----------------------------------------------------------------------------------

async def create_refund(request: web.Request) -> web.Response:
    """POST /v1/refunds: for a known token, one row of an accepting statement shared with the
    requests that arrive meanwhile (``producers.accept_batch``).

    The token comes from TokenCache when it was seen before; the accepting statement then
    re-checks it (nothing is written for a token revoked meanwhile), and any other answer
    is given only after the database confirmed the token, so a revoked token learns nothing.
    """
    _check_declared_size(request)  # before anything else: refusing it costs nothing
    secret = _bearer(request)
    body = await _read_json(request)
    tokens = request.app[TOKENS]
    pool = await request.app[DATABASE].pool()
    token = tokens.get(hash_token(secret)) if len(secret) <= MAX_TOKEN_LENGTH else None
    confirmed = token is None
    if token is None:
        async with db.acquire(pool) as conn:
            token = await authenticate(conn, secret)
        if token is None:
            raise _unauthorized()
        tokens.put(token)
    try:
        try:
            asked = validated(RefundRequest, _with_idempotency_key(request, body))
        except RefundRefused as exc:
            _refused(exc)
            raise
        _scoped(token, asked.merchant_id)
        result = await accept_request(pool, asked, requested_by=token.name, token_hash=token.token_hash,
                                      accept=request.app[ACCEPTS].accept, request_id=request[REQUEST_ID])
    except TokenRevoked:
        tokens.forget(token.token_hash)
        raise _unauthorized() from None
    except (RefundRefused, ApiError):
        if not confirmed:
            async with db.acquire(pool) as conn:
                active = await authenticate(conn, secret)
            if active is None:
                tokens.forget(token.token_hash)
                raise _unauthorized() from None
        raise
    await hand_over(result, pool, request.app[COURIER])  # committed, and the connection is back in the pool
    refund = result.refund
    request[LOG_FIELDS] = {"refund_id": str(refund.refund_id), "merchant": refund.merchant_id,
                           "external_ref": refund.external_ref, "result": "accepted" if result.created else "replayed"}
    return web.json_response(result.to_json(), status=result.http_status,
                             headers=None if result.created else {IDEMPOTENT_REPLAYED: "true"})


IDEMPOTENCY_KEY = "Idempotency-Key"
IDEMPOTENT_REPLAYED = "Idempotent-Replayed"


def _with_idempotency_key(request: web.Request, body: object) -> object:
    """The body with ``external_ref`` from the Idempotency-Key header when it has none; the two
    are one key, so a request that sends both must send the same."""
    key = request.headers.get(IDEMPOTENCY_KEY)
    if key is None or not isinstance(body, dict):
        return body
    if body.get("external_ref") in (None, ""):
        return {**body, "external_ref": key}
    if body["external_ref"] != key:
        raise RefundRefused("idempotency_key_mismatch", f"the {IDEMPOTENCY_KEY} header and external_ref differ:"
                            " they are the same key; send one, or both equal", "external_ref")
    return body


async def show_refund(request: web.Request) -> web.Response:
    token = await _authenticate(request)
    refund_id = _refund_id(request)
    pool = await request.app[DATABASE].pool()
    async with db.acquire(pool) as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        refund = await find_refund(conn, refund_id)
        if refund is None or not token.allows(refund.merchant_id):  # do not tell others it exists
            raise ApiError("not_found", f"no refund {refund_id}")
        return web.json_response(await _with_events(conn, refund))


def _query(request: web.Request, model: type[M]) -> M:
    """The query string as ``model`` (an empty parameter counts as missing); 400 naming the parameter."""
    try:
        return validated(model, {name: value for name in model.model_fields if (value := request.query.get(name))})
    except RefundRefused as exc:
        if exc.code == "missing_field":
            raise ApiError("missing_parameter", f"query parameter {exc.field} is required", exc.field) from None
        raise ApiError("invalid_parameter", exc.message, exc.field) from None


def _scoped(token: ApiToken, merchant_id: str) -> None:
    if not token.allows(merchant_id):
        raise ApiError("merchant_not_allowed", f"this token may not act for merchant {merchant_id!r}",
                       "merchant_id")


async def list_or_find_refunds(request: web.Request) -> web.Response:
    """GET /v1/refunds: with external_ref, that refund and its events; without, a page of the
    merchant's refunds (``RefundList``)."""
    if request.query.get("external_ref"):
        return await find_refund_by_external_ref(request)
    token = await _authenticate(request)
    query = _query(request, RefundListQuery)
    _scoped(token, query.merchant_id)
    try:
        after = parse_cursor(query.after) if query.after else None
    except ValueError as exc:
        raise ApiError("invalid_parameter", str(exc), "after") from None
    pool = await request.app[DATABASE].pool()
    async with db.acquire(pool) as conn:
        found = await list_refunds(conn, merchant_id=query.merchant_id, state=query.state, after=after,
                                   limit=query.limit + 1)
    page = found[:query.limit]
    return web.json_response({"refunds": [refund_view(refund) for refund in page],
                              "next_cursor": page_cursor(page[-1]) if len(found) > query.limit else None})


async def find_refund_by_external_ref(request: web.Request) -> web.Response:
    token = await _authenticate(request)
    lookup = _query(request, RefundLookup)
    _scoped(token, lookup.merchant_id)
    pool = await request.app[DATABASE].pool()
    async with db.acquire(pool) as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        refund = await find_by_external_ref(conn, lookup.merchant_id, lookup.external_ref)
        if refund is None:
            raise ApiError("not_found", f"no refund with external_ref {lookup.external_ref!r} for this merchant")
        return web.json_response(await _with_events(conn, refund))


async def approve_refund(request: web.Request) -> web.Response:
    return await _decide(request, "approve")


async def reject_refund(request: web.Request) -> web.Response:
    return await _decide(request, "reject")


async def _decide(request: web.Request, decision: str) -> web.Response:
    """Approve or reject a refund waiting for approval; the approver is the token (rules in producers.approvals)."""
    token = await _authenticate(request)
    refund_id = _refund_id(request)
    note = validated(Decision, await _read_json(request, optional=True)).message
    pool = await request.app[DATABASE].pool()
    async with db.acquire(pool) as conn:
        try:
            moved = await decide(conn, refund_id, decision=decision, approver=token.name, note=note,
                                 merchants=token.merchants, courier=request.app[COURIER])
        except NotFound as exc:
            raise ApiError("not_found", str(exc)) from None
        except ApprovalError as exc:
            raise ApiError(exc.code, str(exc)) from None
        return web.json_response(await _with_events(conn, moved))


# --- webhook subscriptions (docs/WEBHOOKS.md) ---------------------------------------------------

def _webhook_view(endpoint: webhooks.Endpoint, secret: str | None = None) -> dict:
    return {**endpoint.to_json(), **({"secret": secret} if secret else {})}


def _manages(token: ApiToken, endpoint: webhooks.Endpoint) -> bool:
    """The token made this endpoint (an operator's has no owner) and may still act for each of its merchants."""
    return endpoint.owner == token.name and all(token.allows(m) for m in endpoint.merchants)


async def _scoped_endpoint(request: web.Request, token: ApiToken, conn) -> webhooks.Endpoint:
    """The path's endpoint, when the token manages it (``_manages``); else 404, as for a refund of a
    merchant outside the token's scope: another caller's endpoint, or an operator's, stays unknown."""
    try:
        endpoint_id = UUID(request.match_info["endpoint_id"])
    except ValueError:
        raise ApiError("invalid_endpoint_id", "endpoint_id must be a UUID", "endpoint_id") from None
    try:
        endpoint = await webhooks.get_endpoint(conn, endpoint_id)
    except NotFound:
        endpoint = None
    if endpoint is None or not _manages(token, endpoint):
        raise ApiError("not_found", f"no webhook endpoint {endpoint_id}")
    return endpoint


async def create_webhook(request: web.Request) -> web.Response:
    """POST /v1/webhooks: an endpoint for the token's service, which alone manages it through the intake
    (its owner); its secret is in this answer only."""
    token = await _authenticate(request)
    asked = validated(WebhookRequest, await _read_json(request))
    for merchant_id in asked.merchants:
        _scoped(token, merchant_id)
    settings = get_settings()
    pool = await request.app[DATABASE].pool()
    async with db.acquire(pool) as conn:
        try:
            endpoint, secret = await webhooks.add_endpoint(
                conn, vault_from_settings(settings), name=token.name, owner=token.name, url=asked.url,
                merchants=asked.merchants, event_types=list(asked.event_types or webhooks.EVENT_TYPES),
                allowed_networks=webhooks.parse_networks(settings.webhook_allowed_networks))
        except NotFound as exc:
            raise ApiError("unknown_merchant", str(exc), "merchants") from None
    return web.json_response(_webhook_view(endpoint, secret), status=201)


async def list_webhooks(request: web.Request) -> web.Response:
    """GET /v1/webhooks: the endpoints the token manages (``_manages``), never another caller's or an operator's."""
    token = await _authenticate(request)
    pool = await request.app[DATABASE].pool()
    async with db.acquire(pool) as conn:
        endpoints = await webhooks.list_endpoints(conn, owner=token.name)
    return web.json_response({"webhooks": [_webhook_view(e) for e in endpoints if _manages(token, e)]})


async def disable_webhook(request: web.Request) -> web.Response:
    token = await _authenticate(request)
    pool = await request.app[DATABASE].pool()
    async with db.acquire(pool) as conn:
        endpoint = await _scoped_endpoint(request, token, conn)
        return web.json_response(_webhook_view(await webhooks.disable_endpoint(conn, endpoint.endpoint_id)))


async def rotate_webhook_secret(request: web.Request) -> web.Response:
    token = await _authenticate(request)
    overlap = validated(WebhookRotation, await _read_json(request, optional=True)).overlap_hours
    pool = await request.app[DATABASE].pool()
    async with db.acquire(pool) as conn:
        endpoint = await _scoped_endpoint(request, token, conn)
        rotated, secret = await webhooks.rotate_secret(conn, vault_from_settings(get_settings()),
                                                       endpoint.endpoint_id, overlap=timedelta(hours=overlap))
    return web.json_response(_webhook_view(rotated, secret))


# --- probes, the document ---------------------------------------------------------------------

async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """200 when Postgres and Redis both answer; else 503 naming what is down (details go to the log)."""

    async def postgres() -> None:
        pool = await request.app[DATABASE].pool()
        async with pool.acquire(timeout=PROBE_TIMEOUT) as conn:
            await conn.fetchval("SELECT 1", timeout=PROBE_TIMEOUT)

    async def redis() -> None:
        await request.app[REDIS].ping()

    checks = {"postgres": postgres, "redis": redis}
    results = await asyncio.gather(
        *(asyncio.wait_for(check(), PROBE_TIMEOUT + 1) for check in checks.values()), return_exceptions=True,
    )
    down = []
    for name, result in zip(checks, results):
        if isinstance(result, BaseException):
            log.warning("readyz: %s unavailable (%s)", name, describe(result))
            down.append(name)
    if down:
        return web.json_response(
            {"status": "unavailable", "down": down,
             **error_body("unavailable", f"{' and '.join(down)} unreachable", request_id=request.get(REQUEST_ID))},
            status=503,
        )
    return web.json_response({"status": "ok"})


SCHEMA_REF = "#/components/schemas/{model}"


async def openapi_view(request: web.Request) -> web.Response:
    return web.Response(body=request.app[OPENAPI], content_type="application/json")


def openapi_document() -> dict:
    """The OpenAPI 3.1 document: its schemas are the JSON Schemas of the models every door
    validates with (``refunds.requests``), the paths around them are written here.

    Every status a handler can answer is listed with its body schema, so a client generated
    from it (and the schemathesis run in the tests) sees no undocumented answer. ``error.code``
    is an enum (``ErrorCode``: every code the intake answers), and each operation's error answers
    narrow it to the codes of ``OPERATION_ERRORS`` with that status, each described: generated
    clients type the code, strict validators refuse a code the operation does not answer.
    """
    _, generated = models_json_schema(
        [(model, "validation") for model in (*REQUEST_MODELS, *ANSWER_MODELS)], ref_template=SCHEMA_REF)
    schemas = generated["$defs"]
    schemas["ErrorCode"] = {"type": "string", "enum": list(INTAKE_ERRORS), "title": "ErrorCode",
                            "description": "Every code this API answers with (docs/API.md); each operation lists"
                                           " those it answers, per status"}
    schemas["ErrorDetail"]["properties"]["code"] = {"$ref": SCHEMA_REF.format(model="ErrorCode")}
    lookup = RefundLookup.model_json_schema(ref_template=SCHEMA_REF)
    listing = RefundListQuery.model_json_schema(ref_template=SCHEMA_REF)

    def ref(name: str) -> dict:
        return {"$ref": SCHEMA_REF.format(model=name)}

    request_id_header = {"description": "The request's id: the caller's X-Request-Id, or a new one",
                         "schema": {"type": "string"}}

    def answer(description: str, schema: str | dict = "Error", headers: dict | None = None) -> dict:
        body = ref(schema) if isinstance(schema, str) else schema
        return {"description": description, "content": {"application/json": {"schema": body}},
                "headers": {REQUEST_ID_HEADER: request_id_header, **(headers or {})}}

    def query(schema: dict, name: str, required: bool) -> dict:
        prop = schema["properties"][name]
        return {"name": name, "in": "query", "required": required, "description": prop.get("description", ""),
                "schema": {k: v for k, v in prop.items() if k not in ("description", "title")}}

    request_id_param = {"name": REQUEST_ID_HEADER, "in": "header", "required": False, "schema": {"type": "string"},
        "description": "Your id for this request (1-128 of letters, digits and ._:-), echoed in the answer and"
                       " logged with the refund; one is made when absent or unusable."}
    secured = [{"bearerAuth": []}]
    status_headers = {
        401: {"WWW-Authenticate": {"description": "Bearer challenge", "schema": {"type": "string"}}},
        503: {"Retry-After": {"description": "seconds to wait", "schema": {"type": "string"}}},
    }

    def failures(operation_id: str) -> dict:
        """The operation's error answers: one per status, its codes listed and enumerated (an Error
        whose error.code is narrowed beside the $ref, which JSON Schema 2020-12 applies together)."""
        by_status: dict[int, list] = {}
        for code in dict.fromkeys(OPERATION_ERRORS[operation_id]):
            by_status.setdefault(ERRORS[code].status, []).append(ERRORS[code])
        return {
            str(status): answer("\n".join(f"- `{e.code}`: {e.meaning}" for e in errors), {
                **ref("Error"), "properties": {"error": {"properties": {"code": {"enum": [e.code for e in errors]}}}},
            }, headers=status_headers.get(status))
            for status, errors in sorted(by_status.items())
        }

    refund_id = {"name": "refund_id", "in": "path", "required": True, "schema": {"type": "string", "format": "uuid"}}

    def decision(verb: str) -> dict:
        return {
            "operationId": f"{verb}Refund",
            "tags": ["approvals"],
            "summary": f"{verb.capitalize()} a refund waiting for approval (the approver is the token's name)",
            "security": secured,
            "parameters": [refund_id, request_id_param],
            "requestBody": {"required": False, "content": {"application/json": {"schema": ref("Decision")}}},
            "responses": {
                "200": answer("Decided; the refund with its events", "RefundWithEvents"),
                **failures(f"{verb}Refund"),
            },
        }

    endpoint_id = {"name": "endpoint_id", "in": "path", "required": True, "schema": {"type": "string", "format": "uuid"}}

    def webhook_action(operation_id: str, summary: str, schema: str, body: str | None = None) -> dict:
        operation = {
            "operationId": operation_id, "tags": ["webhooks"], "summary": summary, "security": secured,
            "parameters": [endpoint_id, request_id_param],
            "responses": {"200": answer("Done; the endpoint", schema), **failures(operation_id)},
        }
        if body:
            operation["requestBody"] = {"required": False, "content": {"application/json": {"schema": ref(body)}}}
        return operation

    def plain(operation_id: str, summary: str, responses: dict) -> dict:
        return {"get": {"operationId": operation_id, "tags": ["service"], "summary": summary, "security": [],
                        "responses": responses}}

    # what a client can do next with the refund_id an answer carries
    follow = {
        name: {"operationId": operation_id, "parameters": {"refund_id": "$response.body#/refund_id"}}
        for name, operation_id in (("GetRefund", "getRefund"), ("ApproveRefund", "approveRefund"),
                                   ("RejectRefund", "rejectRefund"))
    }

    def with_links(response: dict) -> dict:
        return {**response, "links": follow}

    return {
        "openapi": "3.1.0",
        "info": {
            "title": "PagoEfectivo refunds intake API",
            "version": API_VERSION,
            "description": "Refund requests for marketplace sellers paid through PagoEfectivo. Amounts are"
                           " decimal strings with at most 2 decimals, never JSON numbers.",
        },
        "servers": [{"url": "/", "description": "this intake (INTAKE_PORT)"}],
        "security": secured,
        "tags": [{"name": "refunds"}, {"name": "approvals"}, {"name": "webhooks"},
                 {"name": "service", "description": "probes, this document"}],
        "paths": {
            "/v1/refunds": {
                "post": {
                    "operationId": "createRefund",
                    "tags": ["refunds"],
                    "summary": "Request a refund",
                    "security": secured,
                    "parameters": [request_id_param, {
                        "name": IDEMPOTENCY_KEY, "in": "header", "required": False,
                        "schema": {"type": "string", "pattern": EXTERNAL_REF, "maxLength": 64},
                        "description": "The same key as external_ref (Stripe's header): it stands for external_ref"
                                       " when the body has none; both sent must be equal (else 422"
                                       " idempotency_key_mismatch)."}],
                    "requestBody": {"required": True, "content": {"application/json": {"schema": ref("RefundRequest")}}},
                    "responses": {
                        "202": with_links(answer("Accepted: queued, or waiting for approval", "Accepted")),
                        "200": with_links(answer("A replay of an identical earlier request", "Accepted", headers={
                            IDEMPOTENT_REPLAYED: {"description": "true: this answer replays the first one",
                                                  "schema": {"type": "string", "enum": ["true"]}}})),
                        **failures("createRefund"),
                    },
                },
                "get": {
                    "operationId": "listRefunds",
                    "tags": ["refunds"],
                    "summary": "A merchant's refunds a page at a time; with external_ref, that one refund and its events",
                    "security": secured,
                    "parameters": [
                        query(listing, "merchant_id", True),
                        {**query(lookup, "external_ref", False), "description": "The external_ref the refund was"
                         " requested with: the answer is then that refund with its events (404 if none)"},
                        query(listing, "state", False), query(listing, "limit", False), query(listing, "after", False),
                        request_id_param,
                    ],
                    "responses": {
                        "200": answer("Without external_ref, a page of refunds (RefundList); with it, the refund with"
                                      " its events (RefundWithEvents)",
                                      {"oneOf": [ref("RefundList"), ref("RefundWithEvents")]}),
                        **failures("listRefunds"),
                    },
                },
            },
            "/v1/refunds/{refund_id}": {
                "get": {
                    "operationId": "getRefund",
                    "tags": ["refunds"],
                    "summary": "A refund's state and event history",
                    "security": secured,
                    "parameters": [refund_id, request_id_param],
                    "responses": {
                        "200": answer("The refund with its events", "RefundWithEvents"),
                        **failures("getRefund"),
                    },
                },
            },
            "/v1/webhooks": {
                "post": {
                    "operationId": "createWebhook", "tags": ["webhooks"], "security": secured,
                    "summary": "Register an endpoint of the token's service for the events of its merchants"
                               " (docs/WEBHOOKS.md); the signing secret is in this answer only",
                    "parameters": [request_id_param],
                    "requestBody": {"required": True,
                                    "content": {"application/json": {"schema": ref("WebhookRequest")}}},
                    "responses": {
                        "201": answer("Registered; keep the secret: it is not shown again", "WebhookWithSecret"),
                        **failures("createWebhook"),
                    },
                },
                "get": {
                    "operationId": "listWebhooks", "tags": ["webhooks"], "security": secured,
                    "summary": "The endpoints this token's service registered, all of whose merchants it may"
                               " still act for (never a secret)",
                    "parameters": [request_id_param],
                    "responses": {"200": answer("The endpoints", "WebhookList"), **failures("listWebhooks")},
                },
            },
            "/v1/webhooks/{endpoint_id}/disable": {"post": webhook_action(
                "disableWebhook", "Stop an endpoint's events; its undelivered ones fail", "WebhookEndpoint")},
            "/v1/webhooks/{endpoint_id}/rotate-secret": {"post": webhook_action(
                "rotateWebhookSecret", "A new signing secret, in this answer only; the old one keeps signing"
                " beside it for overlap_hours", "WebhookWithSecret", body="WebhookRotation")},
            "/v1/refunds/{refund_id}/approve": {"post": decision("approve")},
            "/v1/refunds/{refund_id}/reject": {"post": decision("reject")},
            "/openapi.json": plain("openapi", "This document", {"200": {
                "description": "OpenAPI 3 document", "content": {"application/json": {"schema": {"type": "object"}}}}}),
            "/healthz": plain("healthz", "The process is up", {"200": answer("up", "Status")}),
            "/readyz": plain("readyz", "Postgres and Redis are reachable", {
                "200": answer("ready", "Status"),
                "503": answer("not ready; down names what is unreachable", "NotReady"),
            }),
        },
        "components": {
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer", "description": "refundctl token create"}},
            "schemas": schemas,
        },
    }


# --- python -m producers.http -------------------------------------------------------------------

DEFAULT_HOST = "0.0.0.0"


def main() -> int:
    # the vault too (the webhook routes seal and open endpoint secrets): without a master key the
    # intake does not start (one line, exit 2), as the receiver and the workers
    settings = service.load_settings("intake", lambda s: (s.require("database_url"), s.require("redis_url"),
                                                          vault_from_settings(s)))
    if settings is None:
        return 2
    host = os.environ.get("INTAKE_HOST", "").strip() or DEFAULT_HOST
    app = create_app(database_url=settings.database_url, redis_url=settings.redis_url)
    return service.run("intake", app, host, settings.intake_port, metrics_port=settings.intake_metrics_port,
                       access_log_class=AccessLog)  # one line a request, a refund's named in it


if __name__ == "__main__":
    sys.exit(main())
