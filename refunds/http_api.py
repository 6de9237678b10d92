"""What every HTTP service of ours answers alike (the intake, the receiver): the error body and
the request id.

Every error is ``{"error": {"code", "message", "field"?, "request_id"}}``. Every answer carries
``X-Request-Id``: the caller's when it sent a usable one (1-128 of letters, digits and
``._:-``), else a new one; the request's log lines carry it too (``refunds.logs.context``), so
a call can be joined to what it did.
"""

from __future__ import annotations

import re
import uuid

from aiohttp import web

from . import logs

REQUEST_ID_HEADER = "X-Request-Id"
USABLE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
REQUEST_ID = web.RequestKey("request_id", str)


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


def error_body(code: str, message: str, field: str | None = None, *, request_id: str | None = None) -> dict:
    error = {"code": code, "message": message}
    if field:
        error["field"] = field
    if request_id:
        error["request_id"] = request_id
    return {"error": error}


def error_response(request: web.Request, status: int, code: str, message: str, field: str | None = None,
                   headers: dict | None = None) -> web.Response:
    """The error body for ``request``, naming it."""
    return web.json_response(error_body(code, message, field, request_id=request.get(REQUEST_ID)), status=status,
                             headers=headers)
