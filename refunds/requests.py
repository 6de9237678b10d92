"""A refund request and the intake API's other bodies and answers, as pydantic models.

One validation for every door: the intake API, ``producers.enqueue_refund`` (and the
synchronous producer), CSV import and ``refundctl`` all build a ``RefundRequest`` through
``validated``, which turns pydantic's ValidationError into RefundRefused with the stable
``code``, the ``field`` at fault and the rule in words. The same models are the schemas of
the intake's OpenAPI document (``producers.http.openapi_document``), so what the document
promises is what every door checks.

The rules:

* Identifiers (``merchant_id``, ``original_transaction_id``, ``external_ref``) with leading or
  trailing whitespace are refused, never stripped. They are compared exactly (idempotency,
  the payment lookup), a JSON Schema pattern can state "refused" but not "stripped", and a
  caller whose key arrives altered cannot find its refund by the key it sent.
* No control characters: identifiers carry none, free text (``reason``, a decision's
  ``message``) only tab and line breaks. Lone surrogates (valid in JSON, not in UTF-8) are
  refused, so Postgres never sees a value it cannot store.
* ``amount`` is a decimal string with at most 2 decimals and at most 12 digits before the
  point, greater than 0 (a ``Decimal`` is accepted too from Python). A number is refused at
  every door: a float cannot hold cents exactly, and an integer may mean soles or céntimos.
* Unknown fields are refused (a misspelt ``ammount`` must not pass as a missing one).
"""

from __future__ import annotations

import functools
import typing
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Literal, TypeVar
from urllib.parse import urlsplit
from uuid import UUID

import yarl
from pydantic import (
    AfterValidator, BaseModel, ConfigDict, Field, PlainSerializer, PlainValidator, StringConstraints, TypeAdapter,
    ValidationError, WithJsonSchema, field_validator,
)
from pydantic_core import PydanticCustomError

from . import money
from .errors import RefundRefused
from .money import AMOUNT_PATTERN as AMOUNT
from .money import CURRENCIES, format_amount
from .states import STATES

MAX_ID = 64
MAX_TEXT = 255
MERCHANT_ID = r"^[A-Za-z0-9_.-]{1,64}$"  # as schema.sql's CHECK on merchants
EXTERNAL_REF = r"^[A-Za-z0-9_.:-]{1,64}$"
_CONTROL = r"\x00-\x1f\x7f-\x9f"
IDENTIFIER = rf"^[^\s{_CONTROL}]([^{_CONTROL}]*[^\s{_CONTROL}])?$"
TEXT = r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]*$"  # tab, LF and CR allowed


@dataclass(frozen=True)
class Rule:
    """How a refusal of a field reads: its error code and the rule in words ("<field> must be <rule>")."""

    rule: str
    code: str = "invalid_field"


AMOUNT_RULE = Rule(money.AMOUNT_RULE, "invalid_amount")


def _amount(value: object) -> Decimal:
    """``refunds.money``'s amount rule, and no number: a float cannot hold cents exactly, and an
    integer may mean soles or céntimos (a Decimal is accepted from Python)."""
    if not isinstance(value, (str, Decimal)):
        raise PydanticCustomError("refused", f"amount must be {AMOUNT_RULE.rule}, not {_kind(value)}")
    try:
        return money.parse_amount(value)
    except RefundRefused as refused:
        raise PydanticCustomError("refused", refused.message) from None


MerchantId = Annotated[str, StringConstraints(max_length=MAX_ID, pattern=MERCHANT_ID),
                       Rule("1-64 characters of letters, digits, and _ . -")]
TransactionId = Annotated[str, StringConstraints(max_length=MAX_ID, pattern=IDENTIFIER),
                          Rule("1-64 characters without control characters or surrounding spaces")]
ExternalRef = Annotated[str, StringConstraints(max_length=MAX_ID, pattern=EXTERNAL_REF),
                        Rule("1-64 characters of letters, digits, and _ . : -")]
Amount = Annotated[
    Decimal, PlainValidator(_amount), PlainSerializer(format_amount, return_type=str),
    WithJsonSchema({"type": "string", "pattern": AMOUNT, "maxLength": 15}), AMOUNT_RULE,
]
Currency = Annotated[Literal[CURRENCIES], Rule("one of " + ", ".join(CURRENCIES), "invalid_currency")]
TEXT_RULE = Rule(f"text of at most {MAX_TEXT} characters, with no control characters other than tab and line breaks")
Text = Annotated[str, StringConstraints(max_length=MAX_TEXT, pattern=TEXT), TEXT_RULE]
State = Literal[STATES]


class _Request(BaseModel):
    """A request body: strict types, unknown fields refused, immutable once validated."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class RefundRequest(_Request):
    """A refund request: the body of POST /v1/refunds, checked alike at every other door (Python, CSV, refundctl)."""

    # ``parse`` builds it from Python values, ``validated`` from a JSON body; both raise RefundRefused.

    merchant_id: MerchantId = Field(
        description="The marketplace seller that took the payment; the token must be scoped to it.",
        examples=["seller-1"])
    original_transaction_id: TransactionId = Field(
        description="The paid PagoEfectivo transaction (CIP number) to refund.", examples=["2900123"])
    amount: Amount = Field(
        description="Amount to refund: a decimal string with at most 2 decimals, greater than 0."
                    " Never a JSON number.", examples=["10.50"])
    currency: Currency = Field(description="Currency of the payment being refunded.", examples=["PEN"])
    external_ref: ExternalRef = Field(
        description="Your idempotency key for this refund, unique per merchant: repeating a request with the"
                    " same external_ref and terms returns the first answer (200); other terms are refused (409).",
        examples=["order-1234-refund-1"])
    reason: Text | None = Field(
        default=None, description="Why the refund is made; kept with the refund (an empty string is none).",
        examples=["damaged item"])

    @field_validator("reason")
    @classmethod
    def _no_empty_reason(cls, value: str | None) -> str | None:
        return value or None

    @classmethod
    def parse(cls, *, merchant_id, original_transaction_id, amount, currency, external_ref, reason=None) -> RefundRequest:
        """The request from Python values; raises RefundRefused naming the first bad field."""
        return validated(cls, {
            "merchant_id": merchant_id, "original_transaction_id": original_transaction_id, "amount": amount,
            "currency": currency, "external_ref": external_ref, "reason": reason,
        })


class RefundLookup(BaseModel):
    """The query of GET /v1/refunds: a refund by its merchant and external_ref (other parameters ignored)."""

    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)

    merchant_id: MerchantId = Field(description="The refund's merchant; the token must be scoped to it.",
                                    examples=["seller-1"])
    external_ref: ExternalRef = Field(description="The external_ref the refund was requested with.",
                                      examples=["order-1234-refund-1"])


class Decision(_Request):
    """The body of an approval or a rejection (it may be left out)."""

    message: Text | None = Field(default=None, description="A note kept in the refund's event history with the decision.",
                                 examples=["checked with the seller"])


# --- answers: every field the server sends is required; null where it may be null ------------------

class _Answer(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Accepted(_Answer):
    """The answer to a refund request: 202 when accepted now, 200 for a replay of an identical one."""

    refund_id: UUID
    external_ref: str
    state: State


class Event(_Answer):
    """One audit row of a refund's history; ``from_state`` is null for the first."""

    from_state: State | None
    to_state: State
    actor: str
    code: str | None
    message: str | None
    occurred_at: datetime


class RefundView(_Answer):
    """A refund as stored (``refund_view``)."""

    refund_id: UUID
    merchant_id: str
    external_ref: str
    original_transaction_id: str
    amount: Amount
    currency: Currency
    reason: str | None
    state: State
    requested_by: str | None
    attempts: int
    provider_refund_id: str | None
    provider_code: str | None
    provider_message: str | None
    created_at: datetime
    updated_at: datetime
    completed_at: datetime | None


def refund_view(refund) -> dict:
    """A ``refunds.records.Refund`` as the intake API and refundctl show it: ``RefundView``'s fields,
    JSON-ready (amounts as strings, times in ISO 8601), read from the record without validating it."""
    return {name: _json_ready(getattr(refund, name)) for name in RefundView.model_fields}


def _json_ready(value):
    if isinstance(value, Decimal):
        return format_amount(value)
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value) if isinstance(value, UUID) else value


class RefundWithEvents(RefundView):
    """A refund as stored, with its whole event history."""

    events: list[Event]


class RefundList(_Answer):
    """A page of a merchant's refunds, oldest first; ``next_cursor`` asks for the next page (null: the last)."""

    refunds: list[RefundView]
    next_cursor: str | None


MAX_PAGE = 100
CURSOR = r"^[A-Za-z0-9_-]{1,200}$"


class RefundListQuery(BaseModel):
    """The query of GET /v1/refunds without external_ref: a merchant's refunds, a page at a time."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    merchant_id: MerchantId = Field(description="The merchant whose refunds to list; the token must be scoped to it.",
                                    examples=["seller-1"])
    state: Annotated[State | None, Rule("one of " + ", ".join(STATES), "invalid_state")] = Field(
        default=None, description="Only refunds in this state.")
    limit: Annotated[int, Field(ge=1, le=MAX_PAGE), Rule(f"a whole number from 1 to {MAX_PAGE}")] = Field(
        default=50, description=f"At most this many refunds (1-{MAX_PAGE}, default 50).")
    after: Annotated[str | None, StringConstraints(pattern=CURSOR), Rule("a next_cursor of an earlier page")] = Field(
        default=None, description="The next_cursor of the previous page.")


def _no_default(schema: dict) -> None:
    schema.pop("default", None)


class ErrorDetail(_Answer):
    """What went wrong: a stable code, a message for people, and the request field at fault if there is one."""

    code: str
    message: str
    field: Annotated[str | None, WithJsonSchema({"type": "string"})] = Field(default=None, json_schema_extra=_no_default)
    request_id: Annotated[str | None, WithJsonSchema({"type": "string"})] = Field(
        default=None, json_schema_extra=_no_default,
        description="The request's X-Request-Id: quote it when asking about this answer.")


class Error(_Answer):
    """Every error answer's body."""

    error: ErrorDetail


class Status(_Answer):
    status: Literal["ok"]


class NotReady(_Answer):
    """/readyz when a dependency is down: which one."""

    status: Literal["unavailable"]
    down: list[Literal["postgres", "redis"]]
    error: ErrorDetail


# --- webhook subscriptions (docs/WEBHOOKS.md) ------------------------------------------------------

EventType = Literal["refund.accepted", "refund.pending", "refund.succeeded", "refund.failed", "refund.rejected",
                    "refund.manual_review"]
WEBHOOK_URL = r"^https?://[^\s]{1,2040}$"
WEBHOOK_URL_RULE = Rule("an http(s) URL with a host", "invalid_url")


def _webhook_url(value: str) -> str:
    """A URL (already of WEBHOOK_URL's shape) that both parsers it meets take whole: urllib's, which
    the address check uses (``refunds.webhooks.check_url``), and yarl's, which the worker's HTTP
    client sends with; with a host, and a port (if any) from 0 to 65535. Else "refused", the reason named."""
    try:
        parts = urlsplit(value)  # "http://[::1" raises here
        parts.port  # noqa: B018  (raises for a port that is not a number from 0 to 65535)
        sent = yarl.URL(value)  # "http://[::1]x/" passes urllib, not the client
        sent.host, sent.port  # noqa: B018  (decoded when asked: "http://xn--/" raises here)
        problem = "" if parts.hostname else "it has no host"
    except ValueError as exc:  # UnicodeError (a bad IDNA label) is one
        problem = str(exc) or type(exc).__name__
    if problem:
        raise PydanticCustomError("refused", "url must be {rule}: {problem}",
                                  {"rule": WEBHOOK_URL_RULE.rule, "problem": problem})
    return value


WebhookUrl = Annotated[str, StringConstraints(max_length=2048, pattern=WEBHOOK_URL), AfterValidator(_webhook_url),
                       WEBHOOK_URL_RULE]


class WebhookRequest(_Request):
    """The body of POST /v1/webhooks: an endpoint of the calling service (the token's name), which alone
    manages it through the intake."""

    url: WebhookUrl = (
        Field(description="Where events are POSTed; a public address (private ones only if the deployment allows).",
              examples=["https://checkout.example.com/hooks"]))
    merchants: Annotated[list[MerchantId], Field(min_length=1, max_length=100),
                         Rule("a list of 1-100 merchant ids the token may act for")] = Field(
        description="The merchants whose refunds' events it receives; the token must be scoped to each.",
        examples=[["seller-1"]])
    event_types: Annotated[list[EventType] | None, Field(min_length=1), Rule("a list of event types")] = Field(
        default=None, description="The events it wants (default: all).")


class WebhookRotation(_Request):
    """The body of POST /v1/webhooks/{endpoint_id}/rotate-secret (it may be left out)."""

    overlap_hours: Annotated[float, Field(ge=0, le=168), Rule("hours from 0 to 168")] = Field(
        default=24.0, description="How long the old secret keeps signing beside the new one.")


class WebhookEndpoint(_Answer):
    """A webhook endpoint, never with its secret."""

    endpoint_id: UUID
    name: str
    url: str
    merchants: list[str]
    event_types: list[EventType]
    created_at: datetime
    disabled_at: datetime | None
    previous_secret_valid_until: datetime | None


class WebhookWithSecret(WebhookEndpoint):
    """A new endpoint, or a rotated secret: the signing secret is shown this once."""

    secret: str


class WebhookList(_Answer):
    """The endpoints the token's service registered, every merchant of which the token may still act for."""

    webhooks: list[WebhookEndpoint]


# --- ValidationError -> RefundRefused ------------------------------------------------------------

M = TypeVar("M", bound=BaseModel)


def validated(model: type[M], data: object) -> M:
    """``model`` from ``data`` (a JSON body or Python values); raises RefundRefused naming the first bad field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise refusal(model, exc) from None


def refusal(model: type[BaseModel], exc: ValidationError) -> RefundRefused:
    """The first problem of ``exc`` as RefundRefused; an unknown field is reported before the others."""
    errors = exc.errors(include_url=False)
    error = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    if not error["loc"]:
        return RefundRefused("invalid_body", "the request body must be a JSON object", None)
    name = str(error["loc"][0])
    if error["type"] == "extra_forbidden":
        return RefundRefused("unknown_field", f"{name!r} is not a field of this request", name)
    field = model.model_fields[name]
    if error["type"] == "missing" or (error["input"] is None and field.is_required()):
        return RefundRefused("missing_field", f"{name} is required", name)
    rule = rules(model)[name]
    if error["type"] == "refused":
        return RefundRefused(rule.code, error["msg"], name)
    value = error["input"]
    return RefundRefused(rule.code, f"{name} must be {rule.rule}" + ("" if isinstance(value, str) else f", not {_kind(value)}"), name)


def refusal_codes(model: type[BaseModel]) -> tuple[str, ...]:
    """Every code ``validated(model, ...)`` can refuse with (``refusal``): the body's shape, then each field's rule."""
    shape = ["invalid_body"]
    if model.model_config.get("extra") == "forbid":
        shape.append("unknown_field")
    if any(field.is_required() for field in model.model_fields.values()):
        shape.append("missing_field")
    return tuple(dict.fromkeys([*shape, *(rule.code for rule in rules(model).values())]))


@functools.cache
def rules(model: type[BaseModel]) -> dict[str, Rule]:
    """Each field's Rule, from its type's annotations (also inside ``X | None``)."""
    found = {}
    for name, field in model.model_fields.items():
        candidates = list(field.metadata)
        for arg in typing.get_args(field.annotation):
            candidates.extend(getattr(arg, "__metadata__", ()))
        found[name] = next((c for c in candidates if isinstance(c, Rule)), Rule("valid"))
    return found


def _kind(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float, Decimal)):
        return "a number"
    return {list: "an array", dict: "an object", type(None): "null"}.get(type(value), f"a {type(value).__name__}")


REQUEST_MODELS: tuple[type[BaseModel], ...] = (RefundRequest, Decision, WebhookRequest, WebhookRotation)
ANSWER_MODELS: tuple[type[BaseModel], ...] = (Accepted, RefundWithEvents, RefundList, Status, NotReady, Error,
                                               WebhookEndpoint, WebhookWithSecret, WebhookList)


_FREE_TEXT = TypeAdapter(Text | None, config=ConfigDict(strict=True))
_WEBHOOK_URL = TypeAdapter(WebhookUrl, config=ConfigDict(strict=True))


def free_text(value: object, field: str) -> str | None:
    """``value`` by the rule of a request's free text (as ``reason``); else RefundRefused naming ``field``."""
    try:
        return _FREE_TEXT.validate_python(value)
    except ValidationError:
        raise RefundRefused(TEXT_RULE.code, f"{field} must be {TEXT_RULE.rule}", field) from None


def webhook_url(value: object, name: str = "url") -> str:
    """``value`` by the rule of a webhook request's ``url`` (for refundctl's --url); else RefundRefused
    (field ``url``) whose message calls it ``name``."""
    try:
        return _WEBHOOK_URL.validate_python(value)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        problem = error["ctx"]["problem"] if error["type"] == "refused" else None
        raise RefundRefused(WEBHOOK_URL_RULE.code, f"{name} must be {WEBHOOK_URL_RULE.rule}"
                            + (f": {problem}" if problem else ""), "url") from None
