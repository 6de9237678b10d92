"""Money is Decimal with exactly two places; floats are refused, never rounded.

One amount rule for every door (refund requests, payments recorded or imported, notifications,
a merchant's approval threshold): a string is ASCII digits with at most 2 decimals and at most
12 digits before the point (numeric(14, 2)), over 0; no sign, exponent, digit separator,
surrounding space or non-ASCII digit, so that "1e3" or "5_0" is never read as 1000 or 50.
"""

import re
from decimal import Decimal

from .errors import RefundRefused

CURRENCIES = ("PEN", "USD")
CENT = Decimal("0.01")
MAX_AMOUNT = Decimal("999999999999.99")
AMOUNT_PATTERN = r"^[0-9]{1,12}(\.[0-9]{1,2})?$"
AMOUNT_RULE = 'a decimal string with at most 2 decimals, such as "10.50"'
_AMOUNT = re.compile(AMOUNT_PATTERN)
_PLAIN_DECIMAL = re.compile(r"-?[0-9]+(\.[0-9]+)?")  # what a refusal can name more exactly than the rule


def parse_amount(value: object, field: str = "amount") -> Decimal:
    """A positive Decimal with 2 places from a decimal string, a Decimal or an integer (a JSON number
    a gateway sent); a float or anything else is refused, naming ``field`` and what is wrong."""
    if isinstance(value, str):
        if _AMOUNT.fullmatch(value) is None:
            raise RefundRefused("invalid_amount", _string_refusal(value, field), field)
        value = Decimal(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        value = Decimal(value)
    elif not isinstance(value, Decimal) or not value.is_finite():
        raise RefundRefused("invalid_amount", f"{field} must be {AMOUNT_RULE}, not {_kind(value)}", field)
    return _checked(value, field)


def _kind(value: object) -> str:
    if isinstance(value, Decimal):
        return f"{value}"  # NaN, Infinity
    if isinstance(value, bool):
        return "a boolean"
    return "null" if value is None else f"a {type(value).__name__}"


def _checked(value: Decimal, field: str) -> Decimal:
    if value.as_tuple().exponent < -2:
        raise RefundRefused("invalid_amount", f"{field} {value} has more than 2 decimals", field)
    if value <= 0:
        raise RefundRefused("invalid_amount", f"{field} must be greater than 0", field)
    if value > MAX_AMOUNT:
        raise RefundRefused("invalid_amount", f"{field} {value} is over {MAX_AMOUNT}", field)
    return value.quantize(CENT)


def _string_refusal(text: str, field: str) -> str:
    """Why ``text`` is not an amount: the exact reason for a plain decimal (a sign, decimals, size),
    else the rule."""
    if _PLAIN_DECIMAL.fullmatch(text) is not None:
        try:
            _checked(Decimal(text), field)
        except RefundRefused as refused:
            return refused.message
    return f"{field} must be {AMOUNT_RULE}"


def parse_currency(value: object, field: str = "currency") -> str:
    if value not in CURRENCIES:
        raise RefundRefused("invalid_currency", f"{field} must be one of {', '.join(CURRENCIES)}", field)
    return value  # type: ignore[return-value]


def format_amount(value: Decimal) -> str:
    return str(value.quantize(CENT))
