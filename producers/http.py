"""The intake API (its OpenAPI document at /openapi.json): refund requests over HTTP, for any service.

Thin on purpose: this module authenticates, checks the JSON shape and the token's
merchant scope; ``enqueue_refund`` does everything else, so the API, the CLI and Python
callers accept exactly the same refunds with the same idempotency.

Order of checks on ``POST /v1/refunds``, cheapest and least trusting first: declared size
(413) → a Bearer header at all (401) → body read with a hard cap (413) → JSON (400) → the
token itself (401) → fields (422) → merchant scope (403, nothing written) → enqueue
(202/200/409/422). Database connections are taken only once the body is in (so a slow
client never holds one), a token seen before costs no query at all (the accepting statement
re-checks it, see ``create_refund``), and concurrent requests share the accepting statement
(``producers.accept_batch``). Round trips are what intake throughput is made of. Every error has the
body ``{"error": {"code", "message", "field"?}}``. A Postgres outage answers 503, never a
stack trace; retrying then is safe because ``external_ref`` makes the request idempotent.

``python -m producers.http`` serves it (DATABASE_URL, REDIS_URL, INTAKE_PORT, INTAKE_HOST).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
from dataclasses import dataclass
from decimal import Decimal
from uuid import UUID

import asyncpg
import redis.asyncio as aioredis
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from refunds.database import OUTAGE_ERRORS as DB_OUTAGE_ERRORS, Database, Unavailable, describe
from refunds import metrics, service
from refunds.errors import IdempotencyConflict, NotFound, RefundRefused
from refunds.money import CURRENCIES
from refunds.records import Refund, find_by_external_ref, find_refund, refund_events
from refunds.settings import get_settings
from refunds.states import STATES
from refunds.tokens import MAX_TOKEN_LENGTH, ApiToken, TokenCache, TokenRevoked, authenticate, hash_token

from .accept_batch import AcceptBatcher
from .approvals import ApprovalError, NotAwaitingApproval, SamePerson, decide
from .enqueue import AMOUNT, EXTERNAL_REF, MAX_REASON, accept_refund, hand_over

log = logging.getLogger("intake")

MAX_BODY = 16 * 1024
REQUEST_TIMEOUT = 15.0  # a Postgres that hangs (rather than refuses) still yields a prompt 503
PROBE_TIMEOUT = 3.0
API_VERSION = "1.0.0"


# --- request fields: the one table that the validator and /openapi.json both read ---------

@dataclass(frozen=True)
class Field:
    """One JSON string field of a request body, with the rules the handler enforces."""

    name: str
    description: str
    example: str
    required: bool = True
    max_length: int | None = None
    pattern: str | None = None
    enum: tuple[str, ...] | None = None
    code: str = "invalid_field"  # error code when the value breaks a rule
    rule: str = ""  # the rule in words, for the error message

    def check(self, value: object) -> str:
        """Return the value if it follows the rules; raise RefundRefused naming this field."""
        if not isinstance(value, str):
            kind = {bool: "a boolean", list: "an array", dict: "an object"}.get(type(value), "a number")
            raise RefundRefused(self.code, f"{self.name} must be a string ({self.rule}), not {kind}", self.name)
        if "\x00" in value or not _encodable(value):
            raise RefundRefused(self.code, f"{self.name} must be text without NUL characters or lone surrogates", self.name)
        if (
            (self.enum is not None and value not in self.enum)
            or (self.max_length is not None and len(value) > self.max_length)
            or (self.pattern is not None and not re.fullmatch(self.pattern, value))
            or (self.required and value == "")
        ):
            raise RefundRefused(self.code, f"{self.name} must be {self.rule}", self.name)
        return value

    def schema(self) -> dict:
        schema: dict = {"type": "string", "description": self.description, "example": self.example}
        if self.required:
            schema["minLength"] = 1
        if self.max_length is not None:
            schema["maxLength"] = self.max_length
        if self.pattern is not None:
            schema["pattern"] = self.pattern
        if self.enum is not None:
            schema["enum"] = list(self.enum)
        if not self.required:
            schema["nullable"] = True
        return schema


def _encodable(value: str) -> bool:
    """Whether Postgres can store it: JSON may carry lone surrogates (\\ud800) that UTF-8 cannot."""
    try:
        value.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


REFUND_FIELDS: tuple[Field, ...] = (
    Field(
        "merchant_id", "The marketplace seller that took the payment; the token must be scoped to it.",
        "seller-1", max_length=64, pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        rule="1-64 characters of letters, digits, and _ . -",
    ),
    Field(
        "original_transaction_id", "The paid PagoEfectivo transaction (CIP number) to refund.",
        "2900123", max_length=64, pattern=r"^\S(.*\S)?$",
        rule="a non-empty string of at most 64 characters, without surrounding spaces",
    ),
    Field(
        "amount", "Amount to refund: a decimal string with at most 2 decimals, greater than 0. Never a JSON number.",
        "10.50", max_length=15, pattern=AMOUNT.pattern, code="invalid_amount",
        rule='a decimal string with at most 2 decimals, such as "10.50"',
    ),
    Field(
        "currency", "Currency of the payment being refunded.", "PEN", enum=CURRENCIES, code="invalid_currency",
        rule="one of " + ", ".join(CURRENCIES),
    ),
    Field(
        "external_ref",
        "Your idempotency key for this refund, unique per merchant: repeating a request with the same"
        " external_ref and terms returns the first answer (200); other terms are refused (409).",
        "order-1234-refund-1", max_length=64, pattern=EXTERNAL_REF.pattern,
        rule="1-64 characters of letters, digits, and _ . : -",
    ),
    Field(
        "reason", "Why the refund is made; kept with the refund.", "damaged item", required=False,
        max_length=MAX_REASON, rule=f"a string of at most {MAX_REASON} characters",
    ),
)

DECISION_FIELDS: tuple[Field, ...] = (
    Field(
        "message", "A note kept in the refund's event history with the decision.", "checked with the seller",
        required=False, max_length=MAX_REASON, rule=f"a string of at most {MAX_REASON} characters",
    ),
)


def object_schema(fields: tuple[Field, ...]) -> dict:
    schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {f.name: f.schema() for f in fields},
    }
    required = [f.name for f in fields if f.required]
    if required:
        schema["required"] = required
    return schema


def validate(body: object, fields: tuple[Field, ...]) -> dict:
    """Check a parsed JSON body against a field table; raise RefundRefused naming the first bad field."""
    if not isinstance(body, dict):
        raise RefundRefused("invalid_body", "the request body must be a JSON object", None)
    known = {f.name for f in fields}
    for name in body:
        if name not in known:
            raise RefundRefused("unknown_field", f"{name!r} is not a field of this request", name)
    values = {}
    for f in fields:
        value = body.get(f.name)
        if value is None:
            if f.required:
                raise RefundRefused("missing_field", f"{f.name} is required", f.name)
            values[f.name] = None
            continue
        values[f.name] = f.check(value)
    return values


# --- errors ---------------------------------------------------------------------------------

class ApiError(Exception):
    """An answer other than success, with the contract's error body."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.field, self.headers = status, code, message, field, headers


# Errors that mean "try again later", not "this request is wrong".
OUTAGE_ERRORS: tuple[type[BaseException], ...] = (Unavailable, *DB_OUTAGE_ERRORS)

HTTP_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
    408: "request_timeout", 409: "conflict", 413: "body_too_large", 415: "unsupported_media_type",
    422: "invalid_request", 503: "unavailable",
}


def error_response(status: int, code: str, message: str, field: str | None = None, headers: dict | None = None) -> web.Response:
    error = {"code": code, "message": message}
    if field:
        error["field"] = field
    return web.json_response({"error": error}, status=status, headers=headers)


@web.middleware
async def errors_middleware(request: web.Request, handler) -> web.StreamResponse:
    """Turn every failure into the contract's error body; a stack trace never leaves the process."""
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT):
            return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.code, exc.message, exc.field, exc.headers)
    except IdempotencyConflict as exc:
        return error_response(409, exc.code, exc.message, exc.field)
    except RefundRefused as exc:
        return error_response(422, exc.code, exc.message, exc.field)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = exc.reason if exc.status != 413 else f"the request body is over {MAX_BODY} bytes"
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return error_response(exc.status, HTTP_CODES.get(exc.status, "error"), message, headers=allow)
    except OUTAGE_ERRORS as exc:
        log.warning("%s %s: database unavailable (%s)", request.method, request.path, describe(exc))
        return error_response(503, "unavailable", "the refund store is unavailable; retry later", headers={"Retry-After": "1"})
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return error_response(500, "internal_error", "internal error; the request may be retried")


CHALLENGE = {"WWW-Authenticate": 'Bearer realm="refunds"'}
DATABASE = web.AppKey("database", Database)
REDIS_URL = web.AppKey("redis_url", str)
REDIS = web.AppKey("redis", aioredis.Redis)
OPENAPI = web.AppKey("openapi", bytes)
TOKENS = web.AppKey("tokens", TokenCache)
ACCEPTS = web.AppKey("accepts", AcceptBatcher)


# --- the application --------------------------------------------------------------------------

def create_app(*, database_url: str, redis_url: str | None = None) -> web.Application:
    """The intake application; its Postgres pool and Redis client are made on start, on the running loop.

    ``redis_url`` (default: REDIS_URL) is only probed by /readyz here; refunds reach Redis
    through ``refunds.delivery``.
    """
    app = web.Application(client_max_size=MAX_BODY, middlewares=[errors_middleware])
    app[DATABASE] = Database(database_url)
    app[REDIS_URL] = redis_url or get_settings().require("redis_url")
    app[OPENAPI] = json.dumps(openapi_document(), indent=2).encode()
    app[TOKENS] = TokenCache()
    # 4 flushes of up to 64 refunds: the pool's 10 connections leave room for token lookups and reads
    app[ACCEPTS] = AcceptBatcher(app[DATABASE].connection, max_batch=64, max_inflight=4)
    app.on_startup.append(_start)
    app.on_cleanup.append(_stop)
    app.router.add_post("/v1/refunds", create_refund)
    app.router.add_get("/v1/refunds", find_refund_by_external_ref)
    app.router.add_get("/v1/refunds/{refund_id}", show_refund)
    app.router.add_post("/v1/refunds/{refund_id}/approve", approve_refund)
    app.router.add_post("/v1/refunds/{refund_id}/reject", reject_refund)
    app.router.add_get("/openapi.json", openapi_view)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_view)
    return app


async def _start(app: web.Application) -> None:
    app[REDIS] = aioredis.Redis.from_url(
        app[REDIS_URL], socket_connect_timeout=PROBE_TIMEOUT, socket_timeout=PROBE_TIMEOUT,
    )
    await app[DATABASE].start()


async def _stop(app: web.Application) -> None:
    await app[DATABASE].close()
    if REDIS in app:
        await app[REDIS].aclose()


# --- request helpers --------------------------------------------------------------------------

def _bearer(request: web.Request) -> str:
    """The token of the Authorization header (401 without one); not yet checked."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "unauthorized", "an Authorization: Bearer <token> header is required", headers=CHALLENGE)
    return token.strip()


def _unauthorized() -> ApiError:
    return ApiError(401, "unauthorized", "the token is unknown or revoked", headers=CHALLENGE)


async def _authenticate(request: web.Request) -> ApiToken:
    """The request's active token, looked up in the database (401 otherwise)."""
    secret = _bearer(request)
    pool = await request.app[DATABASE].pool()
    async with pool.acquire() as conn:
        found = await authenticate(conn, secret)
    if found is None:
        raise _unauthorized()
    return found


def _check_declared_size(request: web.Request) -> None:
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise ApiError(413, "body_too_large", f"the request body is over {MAX_BODY} bytes")


async def _read_json(request: web.Request, *, optional: bool = False) -> object:
    """The body as JSON, read with a hard cap; floats become Decimal so nothing is rounded."""
    _check_declared_size(request)
    raw = await request.read()  # client_max_size stops a longer (chunked) body with 413
    if optional and not raw.strip():
        return {}
    try:
        return json.loads(raw.decode("utf-8"), parse_float=Decimal, object_pairs_hook=_no_duplicate_keys)
    except UnicodeDecodeError:
        raise ApiError(400, "malformed_json", "the request body is not UTF-8") from None
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, "malformed_json", f"the request body is not valid JSON: {exc}") from None


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
        raise ApiError(400, "invalid_refund_id", "refund_id must be a UUID", "refund_id") from None


def _refused(exc: RefundRefused) -> None:
    """Count a refusal made here (enqueue_refund counts its own)."""
    metrics.refunds_rejected_total.labels(exc.code).inc()


async def _with_events(conn: asyncpg.Connection, refund: Refund) -> dict:
    return {**refund.to_json(), "events": await refund_events(conn, refund.refund_id)}


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
        async with pool.acquire() as conn:
            token = await authenticate(conn, secret)
        if token is None:
            raise _unauthorized()
        tokens.put(token)
    try:
        try:
            fields = validate(body, REFUND_FIELDS)
        except RefundRefused as exc:
            _refused(exc)
            raise
        if not token.allows(fields["merchant_id"]):
            raise ApiError(403, "merchant_not_allowed",
                           f"this token may not act for merchant {fields['merchant_id']!r}", "merchant_id")
        result = await accept_refund(pool, **fields, requested_by=token.name, token_hash=token.token_hash,
                                     accept=request.app[ACCEPTS].accept)
    except TokenRevoked:
        tokens.forget(token.token_hash)
        raise _unauthorized() from None
    except (RefundRefused, ApiError):
        if not confirmed:
            async with pool.acquire() as conn:
                active = await authenticate(conn, secret)
            if active is None:
                tokens.forget(token.token_hash)
                raise _unauthorized() from None
        raise
    await hand_over(result, pool)  # committed, and the connection is back in the pool
    return web.json_response(result.to_json(), status=result.http_status)


async def show_refund(request: web.Request) -> web.Response:
    token = await _authenticate(request)
    refund_id = _refund_id(request)
    pool = await request.app[DATABASE].pool()
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        refund = await find_refund(conn, refund_id)
        if refund is None or not token.allows(refund.merchant_id):  # do not tell others it exists
            raise ApiError(404, "not_found", f"no refund {refund_id}")
        return web.json_response(await _with_events(conn, refund))


async def find_refund_by_external_ref(request: web.Request) -> web.Response:
    token = await _authenticate(request)
    lookup = {}
    for f in REFUND_FIELDS:
        if f.name in ("merchant_id", "external_ref"):
            value = request.query.get(f.name)
            if not value:
                raise ApiError(400, "missing_parameter", f"query parameter {f.name} is required", f.name)
            try:
                lookup[f.name] = f.check(value)
            except RefundRefused as exc:
                raise ApiError(400, "invalid_parameter", exc.message, f.name) from None
    if not token.allows(lookup["merchant_id"]):
        raise ApiError(403, "merchant_not_allowed", f"this token may not act for merchant {lookup['merchant_id']!r}", "merchant_id")
    pool = await request.app[DATABASE].pool()
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        refund = await find_by_external_ref(conn, lookup["merchant_id"], lookup["external_ref"])
        if refund is None:
            raise ApiError(404, "not_found", f"no refund with external_ref {lookup['external_ref']!r} for this merchant")
        return web.json_response(await _with_events(conn, refund))


async def approve_refund(request: web.Request) -> web.Response:
    return await _decide(request, "approve")


async def reject_refund(request: web.Request) -> web.Response:
    return await _decide(request, "reject")


DECISION_STATUS = {SamePerson: 403, NotAwaitingApproval: 409}


async def _decide(request: web.Request, decision: str) -> web.Response:
    """Approve or reject a refund waiting for approval; the approver is the token (rules in producers.approvals)."""
    token = await _authenticate(request)
    refund_id = _refund_id(request)
    note = validate(await _read_json(request, optional=True), DECISION_FIELDS)["message"]
    pool = await request.app[DATABASE].pool()
    async with pool.acquire() as conn:
        try:
            moved = await decide(conn, refund_id, decision=decision, approver=token.name, note=note,
                                 merchants=token.merchants)
        except NotFound as exc:
            raise ApiError(404, "not_found", str(exc)) from None
        except ApprovalError as exc:
            raise ApiError(DECISION_STATUS.get(type(exc), 409), exc.code, str(exc)) from None
        return web.json_response(await _with_events(conn, moved))


# --- probes, metrics, the document --------------------------------------------------------------

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
            {"status": "unavailable", "down": down, "error": {"code": "unavailable", "message": f"{' and '.join(down)} unreachable"}},
            status=503,
        )
    return web.json_response({"status": "ok"})


async def metrics_view(request: web.Request) -> web.Response:
    return web.Response(body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def openapi_view(request: web.Request) -> web.Response:
    return web.Response(body=request.app[OPENAPI], content_type="application/json")


def openapi_document() -> dict:
    """The OpenAPI 3.0 document; request bodies come from the same field tables the handlers validate with.

    Every status a handler can answer is listed with its body schema, so a client generated
    from it (and the schemathesis run in the tests) sees no undocumented answer.
    """

    def ref(name: str) -> dict:
        return {"$ref": f"#/components/schemas/{name}"}

    def answer(description: str, schema: str = "Error", headers: dict | None = None) -> dict:
        response = {"description": description, "content": {"application/json": {"schema": ref(schema)}}}
        if headers:
            response["headers"] = headers
        return response

    unauthorized = answer("No token, or an unknown or revoked one", headers={
        "WWW-Authenticate": {"description": "Bearer challenge", "schema": {"type": "string"}}})
    unavailable = answer("The refund store is unavailable; retry (every request here is idempotent)", headers={
        "Retry-After": {"description": "seconds to wait", "schema": {"type": "string"}}})
    too_large = answer(f"The body is over {MAX_BODY} bytes")
    refund_id = {"name": "refund_id", "in": "path", "required": True, "schema": {"type": "string", "format": "uuid"}}

    def decision(verb: str) -> dict:
        return {
            "operationId": f"{verb}Refund",
            "summary": f"{verb.capitalize()} a refund waiting for approval (the approver is the token's name)",
            "parameters": [refund_id],
            "requestBody": {"required": False, "content": {"application/json": {"schema": ref("Decision")}}},
            "responses": {
                "200": answer("Decided; the refund with its events", "RefundWithEvents"),
                "400": answer("Malformed refund_id, or the body is not JSON"),
                "401": unauthorized,
                "403": answer("The token's name is the refund's requester (code same_person)"),
                "404": answer("No such refund for this token's merchants"),
                "409": answer("The refund is not awaiting approval (code not_awaiting_approval)"),
                "413": too_large,
                "422": answer("Invalid body field"),
                "503": unavailable,
            },
        }

    def plain(operation_id: str, summary: str, responses: dict) -> dict:
        return {"get": {"operationId": operation_id, "summary": summary, "security": [], "responses": responses}}

    # what a client can do next with the refund_id an answer carries
    follow = {
        name: {"operationId": operation_id, "parameters": {"refund_id": "$response.body#/refund_id"}}
        for name, operation_id in (("GetRefund", "getRefund"), ("ApproveRefund", "approveRefund"),
                                   ("RejectRefund", "rejectRefund"))
    }

    def with_links(response: dict) -> dict:
        return {**response, "links": follow}

    text = {"type": "string"}
    optional_string = {"type": "string", "nullable": True}
    timestamp = {"type": "string", "format": "date-time"}
    states = {"type": "string", "enum": list(STATES)}
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "PagoEfectivo refunds intake API",
            "version": API_VERSION,
            "description": "Refund requests for marketplace sellers paid through PagoEfectivo. Amounts are"
                           " decimal strings with at most 2 decimals, never JSON numbers.",
        },
        "security": [{"bearerAuth": []}],
        "paths": {
            "/v1/refunds": {
                "post": {
                    "operationId": "createRefund",
                    "summary": "Request a refund",
                    "requestBody": {"required": True, "content": {"application/json": {"schema": ref("RefundRequest")}}},
                    "responses": {
                        "202": with_links(answer("Accepted: queued, or waiting for approval", "Accepted")),
                        "200": with_links(answer("A replay of an identical earlier request", "Accepted")),
                        "400": answer("The body is not JSON (code malformed_json)"),
                        "401": unauthorized,
                        "403": answer("The token is not scoped to merchant_id; nothing was written"),
                        "409": answer("external_ref was already used with other parameters"),
                        "413": too_large,
                        "422": answer("Validation failed (including refunds_disabled); error.field names the field"),
                        "503": unavailable,
                    },
                },
                "get": {
                    "operationId": "findRefund",
                    "summary": "Find a refund by its external_ref",
                    "parameters": [
                        {"name": f.name, "in": "query", "required": True, "schema": f.schema()}
                        for f in REFUND_FIELDS if f.name in ("merchant_id", "external_ref")
                    ],
                    "responses": {
                        "200": answer("The refund with its events", "RefundWithEvents"),
                        "400": answer("A query parameter is missing or malformed"),
                        "401": unauthorized,
                        "403": answer("The token is not scoped to merchant_id"),
                        "404": answer("No such refund"),
                        "503": unavailable,
                    },
                },
            },
            "/v1/refunds/{refund_id}": {
                "get": {
                    "operationId": "getRefund",
                    "summary": "A refund's state and event history",
                    "parameters": [refund_id],
                    "responses": {
                        "200": answer("The refund with its events", "RefundWithEvents"),
                        "400": answer("refund_id is not a UUID"),
                        "401": unauthorized,
                        "404": answer("No such refund for this token's merchants"),
                        "503": unavailable,
                    },
                },
            },
            "/v1/refunds/{refund_id}/approve": {"post": decision("approve")},
            "/v1/refunds/{refund_id}/reject": {"post": decision("reject")},
            "/openapi.json": plain("openapi", "This document", {"200": {
                "description": "OpenAPI 3 document", "content": {"application/json": {"schema": {"type": "object"}}}}}),
            "/healthz": plain("healthz", "The process is up", {"200": answer("up", "Status")}),
            "/readyz": plain("readyz", "Postgres and Redis are reachable", {
                "200": answer("ready", "Status"),
                "503": answer("not ready; down names what is unreachable", "NotReady"),
            }),
            "/metrics": plain("metrics", "Prometheus metrics", {"200": {
                "description": "Prometheus text format", "content": {"text/plain": {"schema": text}}}}),
        },
        "components": {
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer", "description": "refundctl token create"}},
            "schemas": {
                "RefundRequest": object_schema(REFUND_FIELDS),
                "Decision": object_schema(DECISION_FIELDS),
                "Accepted": {
                    "type": "object", "required": ["refund_id", "external_ref", "state"], "additionalProperties": False,
                    "properties": {
                        "refund_id": {"type": "string", "format": "uuid"},
                        "external_ref": text,
                        "state": states,
                    },
                },
                "Event": {
                    "type": "object", "required": ["from_state", "to_state", "actor", "code", "message", "occurred_at"],
                    "properties": {
                        "from_state": {**states, "nullable": True}, "to_state": states, "actor": text,
                        "code": optional_string, "message": optional_string, "occurred_at": timestamp,
                    },
                },
                "RefundWithEvents": {
                    "type": "object",
                    "required": ["refund_id", "merchant_id", "external_ref", "original_transaction_id", "amount",
                                 "currency", "state", "created_at", "updated_at", "events"],
                    "properties": {
                        "refund_id": {"type": "string", "format": "uuid"},
                        "merchant_id": text, "external_ref": text, "original_transaction_id": text,
                        "amount": {"type": "string", "pattern": AMOUNT.pattern, "example": "10.50"},
                        "currency": {"type": "string", "enum": list(CURRENCIES)},
                        "reason": optional_string, "state": states, "requested_by": optional_string,
                        "attempts": {"type": "integer"}, "provider_refund_id": optional_string,
                        "provider_code": optional_string, "provider_message": optional_string,
                        "created_at": timestamp, "updated_at": timestamp,
                        "completed_at": {**timestamp, "nullable": True},
                        "events": {"type": "array", "items": ref("Event")},
                    },
                },
                "Status": {
                    "type": "object", "required": ["status"], "properties": {"status": {"type": "string", "enum": ["ok"]}},
                },
                "NotReady": {
                    "type": "object", "required": ["status", "down", "error"],
                    "properties": {
                        "status": {"type": "string", "enum": ["unavailable"]},
                        "down": {"type": "array", "items": {"type": "string", "enum": ["postgres", "redis"]}},
                        "error": ref("ErrorDetail"),
                    },
                },
                "ErrorDetail": {
                    "type": "object", "required": ["code", "message"],
                    "properties": {"code": text, "message": text, "field": text},
                },
                "Error": {
                    "type": "object", "required": ["error"], "additionalProperties": False,
                    "properties": {"error": ref("ErrorDetail")},
                },
            },
        },
    }


# --- python -m producers.http -------------------------------------------------------------------

DEFAULT_HOST = "0.0.0.0"
ACCESS_LOG_FORMAT = '%a "%r" %s %b %Tfs'  # the request line has no token: it is only in a header


def main() -> int:
    settings = service.load_settings("intake", lambda s: (s.require("database_url"), s.require("redis_url")))
    if settings is None:
        return 2
    host = os.environ.get("INTAKE_HOST", "").strip() or DEFAULT_HOST
    app = create_app(database_url=settings.database_url, redis_url=settings.redis_url)
    return service.run("intake", app, host, settings.intake_port, access_log_format=ACCESS_LOG_FORMAT)


if __name__ == "__main__":
    sys.exit(main())
