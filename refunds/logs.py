"""Logs: one JSON object per line, from every process, with no secrets in them.

Why JSON: log pipelines (Loki, CloudWatch, Elastic) index fields, so an operator can ask
"every line about refund X" or "every line for merchant M" without regexes. Context
fields (``refund_id``, ``merchant``, ``external_ref``, ``cause``) come from ``extra=...``
or from ``context(...)``, which tags every line logged inside it (also from library code).

Why redaction here: the gateway client can log whole request and response bodies when
``REFUNDS_LOG_BODIES=1`` (a debugging switch), and those bodies carry the hashString,
the accessKey, signatures and bearer tokens. ``redact`` removes them by field name, and
every formatted line is scrubbed of bearer tokens, intake tokens and PEM private keys as
a last line of defence.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import logging
import os
import re
import sys
import traceback
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone

REDACTED = "[REDACTED]"
# Field names (compared without case, "-" or "_") whose values are never logged.
SENSITIVE_FIELDS = frozenset({
    "secret", "secretkey", "privatekey", "privatekeypem", "password", "masterkey", "refundsmasterkey",
    "signature", "pesignature", "hashstring", "accesskey", "token", "accesstoken", "authorization",
})
CONTEXT_FIELDS = ("refund_id", "merchant", "external_ref", "request_id", "cause")
_TEXT_PATTERNS = (
    (re.compile(r"-----BEGIN[A-Z ]*PRIVATE KEY-----.*?(-----END[A-Z ]*PRIVATE KEY-----|$)", re.S), REDACTED),
    (re.compile(r"(?i)\b(bearer)\s+(?!\[REDACTED\])[A-Za-z0-9._~+/=-]+"), r"\1 " + REDACTED),
    (re.compile(r"\brfd_[A-Za-z0-9_-]{8,}"), "rfd_" + REDACTED),  # intake API tokens (refunds.tokens.PREFIX)
)
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}
_context: contextvars.ContextVar[dict] = contextvars.ContextVar("refunds_log_context", default={})
_service = "refunds"


def log_bodies_enabled() -> bool:
    """REFUNDS_LOG_BODIES=1: log gateway request/response bodies (redacted). Read on each call: tests flip it."""
    return os.environ.get("REFUNDS_LOG_BODIES", "").strip().lower() in ("1", "true", "yes", "on")


def _sensitive(key: object) -> bool:
    return isinstance(key, str) and _normalized(key) in SENSITIVE_FIELDS


@functools.lru_cache(maxsize=4096)
def _normalized(key: str) -> str:
    """A field name without case, "-" or "_" (cached: every log line asks for the same few names)."""
    return re.sub(r"[^a-z0-9]", "", key.lower())


def scrub(text: str) -> str:
    """Remove bearer tokens, intake tokens and PEM private keys from free text."""
    if "PRIVATE KEY" not in text and "rfd_" not in text and "bearer" not in text.lower():
        return text  # the common case: none of the patterns can match, skip the regexes
    for pattern, replacement in _TEXT_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def redact(value):
    """A copy of ``value`` (JSON-like: mappings, lists, strings, numbers) safe to log.

    Values under a sensitive field name (secretKey, privateKey, signature, token, hashString,
    accessKey, Authorization, ...) become "[REDACTED]", at any depth; strings are scrubbed.
    """
    if isinstance(value, Mapping):
        return {k: (REDACTED if _sensitive(k) and v not in (None, "") else redact(v)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(item) for item in value]
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("utf-8", errors="replace")
        try:
            return redact(json.loads(value))
        except ValueError:
            return scrub(value[:4096])
    if isinstance(value, str):
        return scrub(value)
    return value


def log_exchange(logger: logging.Logger, method: str, path: str, request_body, status: int | None,
                 response_body, *, headers: Mapping | None = None) -> None:
    """Log one gateway exchange with its bodies, redacted; nothing unless REFUNDS_LOG_BODIES=1."""
    if not log_bodies_enabled():
        return
    logger.info("gateway exchange %s %s -> %s", method, path, status, extra={
        "event": "gateway_exchange", "http_method": method, "path": path, "status": status,
        "request_headers": redact(dict(headers)) if headers else None,
        "request_body": redact(request_body), "response_body": redact(response_body),
    })


@contextlib.contextmanager
def context(**fields) -> Iterator[None]:
    """Tag every line logged inside (this task or thread) with these fields, e.g. refund_id."""
    token = _context.set({**_context.get(), **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _context.reset(token)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, service, logger, msg, context fields, extras, cause."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "service": _service,
            "pid": record.process,
            "logger": record.name,
            "msg": scrub(record.getMessage()),
        }
        doc.update(_context.get())
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                doc[key] = REDACTED if _sensitive(key) else redact(_plain(value))
        if record.exc_info and record.exc_info[0] is not None:
            exc = record.exc_info[1]
            doc.setdefault("cause", f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
            doc["traceback"] = scrub("".join(traceback.format_exception(*record.exc_info)))
        if isinstance(doc.get("cause"), str):
            doc["cause"] = scrub(doc["cause"])
        return json.dumps(doc, ensure_ascii=False, default=str, separators=(",", ":"))


def _plain(value):
    """Values JSON can carry as they are; anything else (UUID, Decimal, datetime) as its str."""
    if value is None or isinstance(value, (str, int, float, bool, list, dict, tuple)):
        return value
    return str(value)


def configure(service: str, level: int | str = logging.INFO, *, stream=None) -> None:
    """Route every logger of this process to one JSON-lines handler (stderr by default)."""
    global _service
    _service = service
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


def adopt_handlers(service: str) -> None:
    """Keep the handlers a host program set up (dramatiq's pipe to its parent), format them as JSON."""
    global _service
    _service = service
    root = logging.getLogger()
    if not root.handlers:
        configure(service, root.level or logging.INFO)
        return
    for handler in root.handlers:
        handler.setFormatter(JsonFormatter())
